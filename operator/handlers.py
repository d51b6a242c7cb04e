"""kopf handlers: thin triggers around reconcile.reconcile, which every one of them runs.

Triggers: the SemiPDService's create/update/resume (errors go back to kopf: retry or stop), events of the
children it owns (a Deployment or Service deleted by hand comes back at once; pod changes refresh the per-pod
split), and a timer that keeps the status fresh and re-creates what has no watch (the Secret).

Passes for one service never overlap, and each starts from a fresh read of the object, so observedGeneration
can only move forward. A background trigger that finds a pass running does not wait for it (no worker thread
ever blocks on another service's, or its own service's, slow pods): it marks the service dirty and the running
pass goes round once more. Per service, an async daemon runs the SLO control loop: it reads Prometheus and
decides outside any lock, then asks for a pass, which applies the decision."""
import asyncio
import logging
import threading
from dataclasses import dataclass

import kopf
import kubernetes.client

from semipd.operator import control, health, names, reconcile, spec as specs, tokens
from semipd.operator.kube import ApiError, Kube, path

log = logging.getLogger("semipd.operator")


@dataclass
class OperatorConfig:
    kube: Kube
    connection: kubernetes.client.Configuration
    status_interval: float = 30.0
    settings: reconcile.Settings = reconcile.Settings()
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    token_key_secret: tuple[str, str] = ("default", tokens.DEFAULT_KEY_SECRET)  # (namespace, name)
    token_key: bytes | None = None    # read (or made) at start-up, before any pass


class Passes:
    """One pass at a time per service. `run(wait=False)` never blocks: if a pass is running it leaves a note and
    that pass runs once more before it lets go, so the latest state is always applied and no thread waits."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._dirty: set[tuple[str, str]] = set()

    def run(self, key: tuple[str, str], fn, wait: bool) -> None:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            if not wait and not lock.acquire(blocking=False):
                self._dirty.add(key)
                health.PASSES_QUEUED.set(len(self._dirty))
                return
        if wait:
            with health.PASSES_WAITING.track_inprogress():
                lock.acquire()
        try:
            with health.PASSES_IN_FLIGHT.track_inprogress():
                while True:
                    with self._guard:
                        self._dirty.discard(key)
                        health.PASSES_QUEUED.set(len(self._dirty))
                    fn()
                    with self._guard:
                        if key not in self._dirty:
                            lock.release()
                            return
        except BaseException:
            lock.release()
            raise


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same client configuration the operator's own calls use."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None, scheme=scheme, token=token,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


def _emitter(body: dict):
    def emit(reason: str, message: str, warning: bool = False) -> None:
        (kopf.warn if warning else kopf.info)(body, reason=reason, message=message)
    return emit


def was_rejected(body: dict) -> bool:
    """The current generation already failed to apply: only a spec change (a new generation) retries it."""
    generation = body.get("metadata", {}).get("generation")
    for c in (body.get("status") or {}).get("conditions") or []:
        if (c.get("type") == names.PROGRESSING and c.get("reason") in ("ApplyFailed", "InvalidSpec")
                and c.get("observedGeneration") == generation):
            return True
    return False


SPEC_RETRIES = 10


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig) -> None:
    passes, controls = Passes(), control.Controls()
    last_timing: dict[tuple[str, str], tuple[float, float]] = {}   # the decision last observed, per service
    crd = dict(group=names.GROUP, version=names.VERSION, plural=names.PLURAL, registry=registry)
    ours = {names.MANAGED_BY_LABEL: names.MANAGED_BY}

    def run(namespace: str, name: str, skip_rejected: bool, wait: bool = False, trigger: str = "spec") -> None:
        def one_pass():
            body = cfg.kube.get_or_none(names.API_VERSION, names.PLURAL, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # gone or going: garbage collection removes the children
            if skip_rejected and was_rejected(body):
                return
            with _counted(trigger):
                reconcile.reconcile(cfg.kube, body, cfg.token_key, cfg.settings, _emitter(body),
                                    control=controls.get(namespace, name))
        passes.run((namespace, name), one_pass, wait)

    def control_step(namespace: str, name: str) -> float:
        """Read, decide, then ask for a pass to apply it; returns the seconds until the next step."""
        body = cfg.kube.get_or_none(names.API_VERSION, names.PLURAL, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            controls.forget(namespace, name)
            return cfg.status_interval
        meta = body["metadata"]
        try:
            spec = specs.parse(meta["name"], meta["namespace"], body.get("spec") or {})
        except specs.SpecError:
            return cfg.status_interval      # the spec handler reports an invalid spec
        if not spec.controlled:
            return cfg.status_interval      # nothing to decide; the refresh timer keeps the status fresh
        one = controls.get(namespace, name)
        control.step(cfg.kube, body, spec, one, timeout=cfg.settings.prometheus_timeout)
        with one.lock:
            timing, error = one.timing, one.metrics.error
        if error:
            health.ERRORS.labels(reason=one.metrics.error_reason).inc()   # QueryFailed or NoSeries
        if timing is not None and timing != last_timing.get((namespace, name)):
            last_timing[(namespace, name)] = timing
            health.DECISION_SECONDS.observe(max(0.0, timing[1] - timing[0]))
        _quietly(run, namespace, name, skip_rejected=True, trigger="slo-loop")
        return float(spec.prometheus.interval_seconds)

    @kopf.on.login(registry=registry, id="login")
    def login(**_):
        return connection_info(cfg.connection)

    @kopf.on.startup(registry=registry, id="check-crd")
    def check_crd(**_):
        """Fail at start, saying why, rather than serve nothing: scanning is off, so a CRD that is missing
        now would never be noticed later."""
        for namespace in cfg.namespaces or (None,):
            try:
                cfg.kube.request("GET", path(names.API_VERSION, names.PLURAL, namespace), query={"limit": "1"})
            except ApiError as e:
                raise kopf.PermanentError(
                    f"cannot list {names.PLURAL}.{names.GROUP}{f' in {namespace}' if namespace else ''}: {e} "
                    "(is crds/semipdservice.yaml applied, and does the operator's RBAC allow it?)") from None

    @kopf.on.startup(registry=registry, id="token-key")
    def load_token_key(**_):
        """After check-crd: the one Secret the operator reads, from which every service's admin token derives."""
        try:
            cfg.token_key = tokens.ensure_key(cfg.kube, *cfg.token_key_secret)
        except tokens.TokenKeyError as e:
            raise kopf.PermanentError(str(e)) from None

    # kopf retries a TemporaryError (a 409, a 403) this many times for one change, then gives it up; the refresh
    # timer keeps trying quietly at its interval, so a state that clears later still converges without a spec change.
    spec_handler = dict(crd, id="reconcile", retries=SPEC_RETRIES)

    @kopf.on.resume(**spec_handler)
    @kopf.on.create(**spec_handler)
    @kopf.on.update(**spec_handler)
    def reconcile_service(namespace, name, **_):
        try:
            run(namespace, name, skip_rejected=False, wait=True)
        except reconcile.Rejected as e:
            raise kopf.PermanentError(str(e)) from None
        except reconcile.Retry as e:
            raise kopf.TemporaryError(str(e), delay=e.delay) from None

    @kopf.timer(**crd, id="refresh", interval=cfg.status_interval, initial_delay=cfg.status_interval)
    def refresh(namespace, name, **_):
        _quietly(run, namespace, name, skip_rejected=True, trigger="refresh")

    # the first step waits a moment, so the spec handler's pass creates the children first
    @kopf.daemon(**crd, id="slo-loop", cancellation_timeout=10, initial_delay=1.0)
    async def slo_loop(namespace, name, stopped, **_):
        """Per service, at spec.prometheus.intervalSeconds. The blocking work runs in a worker thread, so one
        service's slow Prometheus or pods never hold up another's loop."""
        while not stopped:
            delay = await asyncio.to_thread(_quietly_step, control_step, namespace, name, cfg.status_interval)
            await stopped.wait(delay)

    @kopf.on.event("apps", "v1", "deployments", id="child", labels=ours, registry=registry)
    @kopf.on.event("v1", "services", id="child", labels=ours, registry=registry)
    @kopf.on.event("v1", "pods", id="child", labels=ours, registry=registry)
    def child_changed(event, body, namespace, **_):
        if event.get("type") is None:
            return  # the initial listing: resume handlers already reconcile every service at start
        owner = (body.get("metadata", {}).get("labels") or {}).get(names.SERVICE_LABEL)
        if owner:
            _quietly(run, namespace, owner, skip_rejected=True, trigger="child")


class _counted:
    """Count one reconcile pass by its trigger and result, and its failures by reason."""

    def __init__(self, trigger: str):
        self.trigger = trigger

    def __enter__(self):
        return self

    def __exit__(self, kind, e, _tb):
        if e is None:
            result = "ok"
        elif isinstance(e, reconcile.Rejected):
            result = "rejected"
            health.ERRORS.labels(reason=e.reason).inc()
        elif isinstance(e, (reconcile.Retry, ApiError)):
            result = "retry"
            health.ERRORS.labels(reason="Retry" if isinstance(e, reconcile.Retry) else health.api_error_reason(e)).inc()
        else:
            result = "error"
            health.ERRORS.labels(reason=type(e).__name__).inc()
        health.RECONCILES.labels(trigger=self.trigger, result=result).inc()
        return False


def _quietly_step(step, namespace: str, name: str, fallback: float) -> float:
    try:
        return step(namespace, name)
    except ApiError as e:
        log.warning("control step for %s/%s failed: %s", namespace, name, e)
    except Exception:
        log.exception("control step for %s/%s failed", namespace, name)
    return fallback


def _quietly(fn, *args, **kwargs) -> None:
    """Background passes log their failures (the status already says them); the spec's own handler is the one
    that reports to kopf, so kopf's retries stay bounded to it."""
    try:
        fn(*args, **kwargs)
    except (reconcile.Rejected, reconcile.Retry) as e:
        log.info("reconcile deferred: %s", e)
    except ApiError as e:
        log.warning("reconcile failed: %s", e)
    except Exception:
        log.exception("reconcile failed")
