"""One level-based pass over a SemiPDService: make the children match the spec, sync each pod's split, write the
status. Every trigger (create/update/resume, a child's event, the timer) runs this same pass, so it must be
idempotent: fixed names, server-side apply, a Secret created once. No kopf in here; `emit` posts events."""
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import kopf

from semipd.operator import builders, conditions, names, pods, spec as specs, status, tokens
from semipd.operator.control import Control
from semipd.operator.kube import ApiError, Kube
from semipd.operator.kube import path as kube_path
from semipd.policy import Decision

log = logging.getLogger("semipd.operator.reconcile")

Emit = Callable[..., None]


@dataclass(frozen=True)
class Settings:
    push_timeout: float = 2.0       # seconds for one PUT /admin/partition
    retry_after: float = 15.0       # seconds before a failed push of the same split is tried again
    prometheus_timeout: float = 5.0  # seconds one PromQL query may take


class Rejected(Exception):
    """The children cannot be applied as the spec stands: kopf stops retrying (a spec change retries). `reason`
    says whether background passes may still retry: ApplyFailed/InvalidSpec cannot pass by themselves,
    NameConflict (a child's name taken by someone else's object) can, once that object goes."""

    def __init__(self, message: str, reason: str = "ApplyFailed"):
        super().__init__(message)
        self.reason = reason


class Retry(Exception):
    """A state that passes by itself (for example a child still being deleted): try again after `delay` s."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


def _no_emit(reason: str, message: str, warning: bool = False) -> None:
    pass


def reconcile(kube: Kube, body: dict, token_key: bytes, settings: Settings = Settings(), emit: Emit = _no_emit,
              now: datetime | None = None, control: Control | None = None) -> dict:
    """Apply the children of `body` (a fresh read of the SemiPDService), apply the control loop's latest decision
    (`control`: per-pod splits, replica target) and write the status. Returns the status written.
    observedGeneration is written only when everything was applied."""
    now = now or datetime.now(timezone.utc)
    meta = body["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    old_status = body.get("status") or {}
    try:
        spec = specs.parse(name, namespace, body.get("spec") or {})
    except specs.SpecError as e:
        _fail(kube, body, str(e), "InvalidSpec", emit, now)
        raise Rejected(str(e), "InvalidSpec") from None

    view = _View.of(control, spec)
    try:
        token = ensure_secret(kube, spec, body, token_key, emit)
        deployment, template_hash, history = apply_deployment(kube, spec, body, old_status.get("history"),
                                                              emit, now, view.replicas)
        apply_service(kube, spec, body, emit)
        apply_disruption_budget(kube, spec, body, emit)
        apply_pod_monitor(kube, spec, body, emit)
    except Rejected as e:
        _fail(kube, body, str(e), e.reason, emit, now, view.metrics)
        raise
    except ApiError as e:
        if e.invalid:
            # 422/400: the object as built is invalid. Retrying the same spec cannot help.
            _fail(kube, body, e.message, "ApplyFailed", emit, now, view.metrics)
            raise Rejected(e.message) from None
        if e.status == 403:
            # RBAC forbids it: an administrator can fix that without a spec change, so retry, slowly.
            _fail(kube, body, e.message, "Forbidden", emit, now, view.metrics)
            raise Retry(e.message, delay=60) from None
        if e.conflict:
            # 409 from a create (AlreadyExists) or a name still held by an object being deleted: passes by itself,
            # but say so while it lasts.
            _fail(kube, body, e.message, "RetryingConflict", emit, now, view.metrics)
            raise Retry(e.message) from None
        raise

    previous = {p.get("name"): p for p in old_status.get("pods") or []}
    entries = pods.sync(kube, namespace, name, spec.engine.port, view.plan_for(spec, previous), token,
                        old_status.get("pods"), now, settings.push_timeout, settings.retry_after, emit)
    history = _record_splits(entries, previous, view, history, emit, now)
    observed = conditions.Observed(
        desired_replicas=builders.desired_replicas(spec, deployment["spec"].get("replicas")),
        deployment=deployment, metrics=view.metrics,
        ttft_target_ms=spec.slo.ttft_ms, tpot_target_ms=spec.slo.tpot_ms)
    conds = conditions.merge(old_status.get("conditions"), conditions.compute(observed), generation,
                             status.stamp(now))
    new = status.assemble(service=name, deployment=deployment, conditions=conds, split=status.split_summary(entries,
                          default=builders.split_string(spec.partition.initial)),
                          template_hash=template_hash, pods=entries, history=history)
    new["slo"] = status.slo_figures(spec.slo.percentile, view.metrics, view.measured_at)
    if spec.autoscaling is not None:
        new["autoscaling"] = view.autoscaling_status(deployment)
    if view.state is not None:
        new["policyState"] = view.state
    if generation is not None:
        new["observedGeneration"] = generation
    write_status(kube, body, new)
    return new


@dataclass(frozen=True)
class _View:
    """A consistent snapshot of the control loop's last step, as this pass applies it."""
    decision: Decision | None = None
    metrics: conditions.Metrics = conditions.Metrics()
    per_pod: dict = field(default_factory=dict)
    measured_at: float | None = None
    state: str | None = None
    timing: tuple[float, float] | None = None

    @classmethod
    def of(cls, control: Control | None, spec: specs.ServiceSpec) -> "_View":
        if spec.prometheus.url and not spec.slo.targets:
            return cls(metrics=conditions.Metrics(configured=True, error="spec.slo sets no latency target, so "
                                                  "Prometheus is not read", error_reason="NoTargets"))
        if control is None or not spec.controlled:
            return cls(metrics=conditions.Metrics(configured=bool(spec.prometheus.url)))
        with control.lock:
            return cls(control.decision, control.metrics, dict(control.per_pod), control.measured_at,
                       None if control.state is None else control.state.to_json(), control.timing)

    @property
    def replicas(self) -> tuple[int, str, str] | None:
        r = None if self.decision is None else self.decision.replicas
        return None if r is None else (r.target, r.reason, r.message)

    def plan_for(self, spec: specs.ServiceSpec, previous: dict):
        """Each pod's split: the policy's decision; for a pod it has not decided yet, the split it was given
        before; for a new pod, partition.initial. Without a control loop, partition.initial for every pod."""
        initial = builders.split_string(spec.partition.initial)
        splits = {} if self.decision is None else self.decision.splits

        def plan(pod: str) -> pods.Plan:
            if pod in splits:
                d = splits[pod]
                return pods.Plan(builders.split_string(d.split), d.reason, d.message)
            if self.decision is not None and (previous.get(pod) or {}).get("desired"):
                return pods.Plan(previous[pod]["desired"], previous[pod].get("reason") or "Initial")
            return pods.Plan(initial, "Spec" if self.decision is None else "Initial")
        return plan

    def log_decision(self, entry: dict, before: str) -> None:
        """The control loop's latency, from the newest sample behind a decision to the engine acknowledging it:
        the sample's age when the read began (an upper bound: Prometheus answered a little later), the read and
        the decision, and the pass that pushed it."""
        age = (self.per_pod.get(entry["name"]) or (None, None, None))[2]
        if self.timing is None or age is None or entry.get("applied") != entry["desired"]:
            return
        read_started, decided_at = self.timing
        acked = datetime.now(timezone.utc).timestamp()
        log.info("split decision on pod %s: %s -> %s (%s); newest sample %.2f s old, read and decided in %.2f s, "
                 "acknowledged %.2f s later [decision_latency_s=%.3f]", entry["name"], before, entry["desired"],
                 entry["reason"], age, decided_at - read_started, acked - decided_at, age + acked - read_started)

    def message(self, pod: str) -> str:
        d = None if self.decision is None else self.decision.splits.get(pod)
        return "" if d is None else d.message

    def autoscaling_status(self, deployment: dict) -> dict:
        r = None if self.decision is None else self.decision.replicas
        current = int(deployment["spec"].get("replicas") or 0)
        if r is None:
            return {"desiredReplicas": current, "reason": "NotDecided",
                    "message": "the control loop has not decided yet (Prometheus and SLO targets are needed)"}
        return {"desiredReplicas": r.target, "reason": r.reason, "message": r.message}


def _record_splits(entries: list[dict], previous: dict, view: _View, history: list, emit: Emit,
                   now: datetime) -> list:
    """Each pod's measured figures into its entry; each changed split into the history, an event and the log."""
    for entry in entries:
        for key, value in _measured(view.per_pod.get(entry["name"])).items():
            if value is None:
                entry.pop(key, None)    # a list item is written whole: a None would be a literal null
            else:
                entry[key] = value
        before = (previous.get(entry["name"]) or {}).get("desired")
        if before and before != entry["desired"]:
            view.log_decision(entry, before)
            emit("SplitChanged", f"pod {entry['name']}: {before} -> {entry['desired']} in place ({entry['reason']})")
            history = status.record(history, "Split", before, entry["desired"], entry["reason"], now,
                                    pod=entry["name"], message=view.message(entry["name"]))
    return history


def _measured(measured: tuple | None) -> dict:
    ttft, tpot, _ = measured or (None, None, None)
    return {"ttftMs": None if ttft is None else round(ttft * 1000, 1),
            "tpotMs": None if tpot is None else round(tpot * 1000, 2)}


def _not_ours(obj: dict | None, owner: dict) -> str | None:
    """Why an existing object holding a child's name is not the operator's to take over, or None. It adopts only
    what it made (its managed-by label: an orphan of an earlier SemiPDService of this name), never an object of
    another owner or one someone made by hand; the chart's admission policy refuses the operator any update of an
    object without that label, so trying would only be a 403."""
    if obj is None:
        return None
    meta = obj.get("metadata", {})
    if any(r.get("controller") and r.get("uid") != owner["metadata"]["uid"] for r in meta.get("ownerReferences") or []):
        return "belongs to another owner"
    if (meta.get("labels") or {}).get(names.MANAGED_BY_LABEL) != names.MANAGED_BY:
        return f"is not managed by {names.MANAGED_BY}"
    return None


def _adopt(obj: dict, owner: dict, existing: dict | None) -> dict:
    why = _not_ours(existing, owner)
    if why:
        raise Rejected(f"{obj['kind']} {obj['metadata']['name']} already exists and {why}; "
                       "delete it or rename this SemiPDService", "NameConflict")
    kopf.append_owner_reference(obj, owner=owner)
    return obj


def ensure_secret(kube: Kube, spec: specs.ServiceSpec, owner: dict, token_key: bytes, emit: Emit) -> str:
    """The admin token, derived from the operator key (tokens.py), and its Secret, which the pods mount. The
    Secret is only ever created, never read: a 409 means it is there already. Were it made by someone else with
    another token, pushes answer 403 and say so per pod (status.pods[].lastError); deleting it lets the operator
    make the right one."""
    meta = owner["metadata"]
    token = tokens.derive_admin_token(token_key, meta["namespace"], meta["name"], meta["uid"])
    name = names.admin_secret_name(spec.name)
    try:
        kube.create(_adopt(builders.admin_secret(spec, token), owner, None), "secrets")
    except ApiError as e:
        if not e.conflict:
            raise
    else:
        emit("Created", f"Secret {name} with the service's admin token")
    return token


def apply_deployment(kube: Kube, spec: specs.ServiceSpec, owner: dict, history: list, emit: Emit,
                     now: datetime, decided: tuple[int, str, str] | None = None) -> tuple[dict, str, list]:
    """`decided`: the policy's (replica target, reason, message), applied only under spec.autoscaling."""
    current = kube.get_or_none("apps/v1", "deployments", spec.namespace, spec.name)
    current_replicas = current["spec"].get("replicas") if current else None
    target, reason, message = decided if decided else (None, "Spec", "")
    replicas = builders.desired_replicas(spec, current_replicas, target)
    if spec.autoscaling is None or target is None:
        reason, message = "Spec", ""
    obj = _adopt(builders.deployment(spec, replicas), owner, current)
    new_hash = obj["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]
    result = kube.apply(obj, "deployments")
    if current is None:
        emit("Created", f"Deployment {spec.name} with {replicas} pod(s), template {new_hash}")
        return result, new_hash, history
    old_hash = (current["metadata"].get("annotations") or {}).get(names.TEMPLATE_HASH_ANNOTATION)
    if old_hash != new_hash:
        emit("RollingUpdate", f"pod template changed ({old_hash} -> {new_hash}): replacing pods")
        history = status.record(history, "Rollout", old_hash, new_hash, "Spec", now)
    if current_replicas != replicas:
        emit("Scaled", f"Deployment {spec.name}: {current_replicas} -> {replicas} pod(s), no restart ({reason}"
                       f"{': ' + message if message else ''})")
        history = status.record(history, "Scale", current_replicas, replicas, reason, now, message=message)
    return result, new_hash, history


def apply_service(kube: Kube, spec: specs.ServiceSpec, owner: dict, emit: Emit) -> dict:
    current = kube.get_or_none("v1", "services", spec.namespace, spec.name)
    result = kube.apply(_adopt(builders.service(spec), owner, current), "services")
    if current is None:
        emit("Created", f"Service {spec.name} on port {spec.engine.port}")
    return result


def apply_disruption_budget(kube: Kube, spec: specs.ServiceSpec, owner: dict, emit: Emit) -> dict | None:
    """Apply the PodDisruptionBudget spec.disruptionBudget asks for; without one, delete the operator's own (and
    only that one: an object of that name that is not this service's is never touched)."""
    current = kube.get_or_none("policy/v1", "poddisruptionbudgets", spec.namespace, spec.name)
    wanted = builders.pod_disruption_budget(spec)
    if wanted is None:
        if current is None or _not_ours(current, owner) or not _owned_by(current, owner):
            return None
        uid = current["metadata"]["uid"]
        try:
            kube.request("DELETE", kube_path("policy/v1", "poddisruptionbudgets", spec.namespace, spec.name),
                         body={"preconditions": {"uid": uid}})     # the one checked above, not a newer one
        except ApiError as e:
            if not (e.not_found or e.conflict):
                raise
        else:
            emit("Deleted", f"PodDisruptionBudget {spec.name}: spec.disruptionBudget was removed")
        return None
    result = kube.apply(_adopt(wanted, owner, current), "poddisruptionbudgets")
    if current is None:
        emit("Created", f"PodDisruptionBudget {spec.name}")
    return result


def _owned_by(obj: dict, owner: dict) -> bool:
    return any(r.get("controller") and r.get("uid") == owner["metadata"]["uid"]
               for r in obj["metadata"].get("ownerReferences") or [])


def apply_pod_monitor(kube: Kube, spec: specs.ServiceSpec, owner: dict, emit: Emit) -> bool:
    """Only where the Prometheus Operator's CRD exists (404 otherwise) and RBAC allows it (403 otherwise)."""
    obj = _adopt(builders.pod_monitor(spec), owner, None)
    try:
        kube.apply(obj, "podmonitors")
    except ApiError as e:
        if e.not_found or e.status == 403:
            return False
        raise
    return True


def _fail(kube: Kube, body: dict, message: str, reason: str, emit: Emit, now: datetime,
          metrics: conditions.Metrics = conditions.Metrics()) -> None:
    """Record why the children could not be applied. observedGeneration advances all the same: this generation
    was seen, and Stalled/Reconciling say how it went (kstatus reads a failed spec as failed, not as pending).
    The Warning event is posted when the failure is new, not on every pass that meets it again."""
    meta = body["metadata"]
    old = body.get("status") or {}
    before = next((c for c in old.get("conditions") or [] if c.get("type") == names.PROGRESSING), {})
    if (before.get("reason"), before.get("message")) != (reason, message):
        emit(reason, message, warning=True)
    try:
        deployment = kube.get_or_none("apps/v1", "deployments", meta["namespace"], meta["name"])
    except ApiError:
        deployment = None
    observed = conditions.Observed(desired_replicas=0, deployment=deployment, failure=message,
                                   failure_reason=reason, metrics=metrics)
    conds = conditions.merge(old.get("conditions"), conditions.compute(observed), meta.get("generation"),
                             status.stamp(now))
    new = {"conditions": conds, **status.deployment_counts(deployment)}
    if meta.get("generation") is not None:
        new["observedGeneration"] = meta["generation"]
    write_status(kube, body, new)


def write_status(kube: Kube, body: dict, new: dict) -> None:
    if not status.changed(body.get("status"), new):
        return
    meta = body["metadata"]
    try:
        kube.merge_patch(names.API_VERSION, names.PLURAL, meta["namespace"], meta["name"], {"status": new},
                         subresource="status")
    except ApiError as e:
        if not e.not_found:  # deleted meanwhile: nothing to report to
            raise
