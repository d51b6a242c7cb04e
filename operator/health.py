"""The operator's own HTTP endpoint: /healthz, /readyz and Prometheus /metrics (semipd_operator_*) on one port.

It is served by an aiohttp server inside kopf's own event loop, not by kopf's `liveness_endpoint`: kopf's serves
one path and nothing else, so readiness and metrics would need a second and third port. Answering from that loop
is the liveness check: a loop that is blocked or gone answers nothing, and the probe fails.

/readyz is 200 once kopf's start-up activities have finished (the CRD was listed and the token key read: the API
server answered) and, with peering, once the operator has read its peering object and knows its role; the body
says which role: `standalone`, `active` or `standby`. A standby is ready (it is healthy and will take over), so
a Deployment of two replicas rolls normally; which one is active is in the body and in
semipd_operator_peering_active.

The metrics are fed where the operator already decides or acts (handlers.py, pods.py, control.py): no framework."""
import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import prometheus_client
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("semipd.operator.health")

P = "semipd_operator_"
RECONCILES = Counter(P + "reconciles", "Reconcile passes of a SemiPDService, by trigger and result "
                     "(ok, rejected: the spec cannot be applied, retry: a transient failure, error: unexpected)",
                     ["trigger", "result"])
ERRORS = Counter(P + "errors", "Failures the operator met, by reason", ["reason"])
PASSES_IN_FLIGHT = Gauge(P + "passes_in_flight", "Reconcile passes running now")
PASSES_WAITING = Gauge(P + "passes_waiting", "Reconcile passes waiting for a running pass of the same service")
PASSES_QUEUED = Gauge(P + "passes_queued", "Services marked dirty: a running pass goes round once more for them")
DECISION_SECONDS = Histogram(P + "decision_seconds", "Seconds one SLO control step takes, from the Prometheus read "
                             "to the policy's decision", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PUSHES = Counter(P + "split_pushes", "PUT /admin/partition pushes of a split to engine pods, by result", ["result"])
PEERING_ACTIVE = Gauge(P + "peering_active", "1 where this operator acts (standalone, or the active peer), "
                       "0 where it is a standby")
READY = Gauge(P + "ready", "1 once the operator has started and knows its role")


def api_error_reason(e: Exception) -> str:
    status = getattr(e, "status", None)
    return f"ApiError{status}" if status else type(e).__name__


@dataclass
class Peering:
    """How this operator finds its role: its identity and priority in the named kopf peering object."""
    name: str
    identity: str
    priority: int
    clusterwide: bool
    namespaces: tuple[str, ...] = ()


def role_from(status: dict | None, me: Peering, now: datetime | None = None) -> str:
    """kopf's own rule (kopf/_core/engines/peering.py): a peer pauses while another live peer has a higher or the
    same priority. Without our own record yet, kopf has not touched the object, and we cannot say."""
    now = now or datetime.now(timezone.utc)
    status = status or {}
    if me.identity not in status:
        return "unknown"
    for identity, peer in status.items():
        if identity == me.identity or not isinstance(peer, dict):
            continue
        try:
            seen = datetime.fromisoformat(str(peer["lastseen"]).replace("Z", "+00:00"))
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=timezone.utc)
            alive = (now - seen).total_seconds() < float(peer.get("lifetime", 60))
            priority = int(peer.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if alive and priority >= me.priority:
            return "standby"
    return "active"


@dataclass
class Health:
    started: asyncio.Event = field(default_factory=asyncio.Event)   # kopf's ready_flag: start-up activities done
    peering: Peering | None = None
    role: str = "standalone"

    def __post_init__(self):
        self.role = "unknown" if self.peering else "standalone"

    def ready(self) -> bool:
        return self.started.is_set() and self.role != "unknown"

    def set_role(self, role: str) -> None:
        if role != self.role:
            log.info("peering role: %s -> %s", self.role, role)
        self.role = role
        PEERING_ACTIVE.set(1 if role in ("active", "standalone") else 0)

    async def watch_role(self, read_status, interval: float) -> None:
        """Re-read the peering object's status every `interval` s (read_status: a blocking call, run in a thread)."""
        while True:
            try:
                status = await asyncio.to_thread(read_status)
                self.set_role(role_from(status, self.peering))
            except Exception as e:   # the API server away: keep the last role, say so in the log
                ERRORS.labels(reason="PeeringReadFailed").inc()
                log.warning("cannot read the peering object: %s", e)
            await asyncio.sleep(interval)

    async def healthz(self, _request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request) -> web.Response:
        READY.set(1 if self.ready() else 0)
        if not self.started.is_set():
            return web.Response(status=503, text="starting\n")
        return web.Response(status=200 if self.ready() else 503, text=f"{self.role}\n")

    async def metrics(self, _request) -> web.Response:
        READY.set(1 if self.ready() else 0)
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def serve(self, host: str, port: int) -> web.AppRunner:
        PEERING_ACTIVE.set(1 if self.role == "standalone" else 0)
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("serving /healthz, /readyz and /metrics on %s:%d", host, port)
        return runner
