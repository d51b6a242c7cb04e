"""The replica count, decided jointly with the splits and on a slower clock.

Scale out when some pod finds no split that meets every target at the predicted load, or a pod's latency is at
twice a target or more (the split walking to its bound one cooled-down step at a time would come too late: the
simulator saw a fleet stay `Steady` while the load quadrupled), by as many pods as that load needs (from the fitted capacity of a pod; without one, in proportion to how far the latencies are over,
at most doubling, as AIBrix and Knative cap a step), never again while new pods are still starting. Scale in only
when fewer pods would do for a whole stabilisation window (the largest count wanted in that window wins, as with
the HPA), sized by what pods were seen to take within their targets, down to the minimum; zero traffic counts as
low load, not as missing metrics."""
import math

from semipd.policy.split import Assessment
from semipd.policy.state import RECOMMENDATION_LIMIT, PolicyState
from semipd.policy.types import PolicyConfig, ReplicaBounds, ReplicaDecision

MAX_GROWTH = 2.0    # without a capacity estimate, one scale-out at most doubles the pods
OVERLOAD = 2.0      # a latency at twice its target is past what moving SMs one step at a time fixes in time
CALM = 0.8          # the median pod's latencies under this share of their targets: removing pods by capacity is safe


def _clamp(n: int, bounds: ReplicaBounds) -> int:
    return max(bounds.min, min(bounds.max, n))


def _median(values: list[float]) -> float | None:
    known = sorted(v for v in values if v is not None and math.isfinite(v) and v > 0)
    return known[len(known) // 2] if known else None


def _capacity(assessments: list[Assessment], remembered: float | None = None) -> tuple[float | None, str]:
    """Prompt tokens/s one pod takes: from the fitted models when they are trusted, else what saturated pods (a
    queue waiting) actually prefilled, which is what a pod can serve at its split now. Scaling by that, not by
    how far the latency is over, keeps a backlog built while pods start from doubling the fleet again and again
    (the simulated fleet grew to 32 pods where 14 served the day)."""
    modelled = _median([a.capacity for a in assessments])
    if modelled is not None:
        return modelled, "per pod"
    served = _median([a.served for a in assessments if a.saturated])
    if served is not None:
        return served, "per pod as saturated pods served"
    return remembered, "per pod as saturated pods last served"


def _typical_pressure(assessments: list[Assessment]) -> float:
    """The median pod's worst latency over its target, among pods with traffic (0 without any)."""
    pressures = sorted(a.pressure for a in assessments if a.traffic)
    return pressures[len(pressures) // 2] if pressures else 0.0


def wanted(assessments: list[Assessment], current: int, bounds: ReplicaBounds,
           remembered: float | None = None, proven: float | None = None) -> tuple[int, str, str]:
    """(pods wanted now, reason, message) from this window and the two figures kept from earlier ones: what
    saturated pods last served (`remembered`, for scaling out) and the most a pod served within its targets
    (`proven`, for scaling in)."""
    valid = [a for a in assessments if a.valid]
    load = sum(a.load for a in valid)
    capacity, source = _capacity(valid, remembered)
    per_pod = None if capacity is None else capacity * bounds.target_utilization
    infeasible = any(a.feasible is False for a in valid)
    overloaded = [a for a in valid if a.traffic and a.pressure >= OVERLOAD]
    if infeasible or overloaded:
        reason, what = (("NoSplitMeetsSLO", "no split meets the targets on some pod") if infeasible else
                        ("Overloaded", f"{len(overloaded)} pod(s) at {OVERLOAD:g}x a target or more"))
        if per_pod:
            need = math.ceil(load / per_pod)
            why = f"{load:.0f} prompt tok/s at {per_pod:.0f} {source}"
        else:
            pressure = max(a.pressure for a in valid)
            need = math.ceil(current * min(MAX_GROWTH, max(pressure, 1.0)))
            why = f"latency at {pressure:.1f}x its target, no capacity model yet"
        return max(need, current + 1), reason, f"{what}: {why}"
    if not any(a.traffic for a in valid) and len(valid) == len(assessments):
        return bounds.min, "NoTraffic", "no requests on any pod"
    if len(valid) < len(assessments):
        return current, "MetricsMissing", "some pods have no usable metrics; not scaling in on partial data"
    # scale in by what a pod has been seen to serve within its targets: a lower bound of what it can take at
    # these SLOs, so scaling by it never removes a pod the load needs. What saturated pods served, or a model,
    # measures the pod at its limit, where latencies are far over (the simulated fleet scaled 17 -> 8 pods by
    # it and straight back out). The typical pod, not every pod, must be clear of its targets: on 14 pods one
    # always sat above half a target in some window, and the fleet kept its peak count all day.
    if proven and _typical_pressure(valid) <= CALM:
        per_pod_in = proven * bounds.target_utilization
        need = max(1, math.ceil(load / per_pod_in))
        if need < current:
            return need, "LowLoad", (f"{load:.0f} prompt tok/s fit in {need} pod(s) at {per_pod_in:.0f} per pod, "
                                     f"as pods served within the targets")
    if all(a.margin_ok for a in valid) and current > 1:
        return current - 1, "LowLoad", "every pod is well within its targets"
    return current, "Steady", f"{load:.0f} prompt tok/s on {current} pod(s)"


def decide_replicas(assessments: list[Assessment], cfg: PolicyConfig, state: PolicyState, now: float,
                    current: int, ready: int) -> ReplicaDecision:
    bounds = cfg.replicas
    if not (bounds.min <= current <= bounds.max):
        target = _clamp(current, bounds)
        return _scaled(state, now, current, target, "Bounds", f"kept inside [{bounds.min}, {bounds.max}]")
    if not any(a.valid for a in assessments) and assessments:
        return ReplicaDecision(current, False, "MetricsMissing", "no pod has usable metrics; holding the count")
    served = _median([a.served for a in assessments if a.valid and a.saturated])
    if served is not None:
        state.served_capacity = served
    # what a pod took (arrived and served: catching up on a backlog serves more than the load) while clear of
    # its targets; at a target exactly, a tenth of its requests already miss
    within = _median([min(a.served, a.load) for a in assessments if a.valid and a.traffic and a.pressure <= CALM])
    if within is not None:
        state.proven_capacity = max(state.proven_capacity or 0.0, within)
    need, reason, message = wanted(assessments, current, bounds, state.served_capacity, state.proven_capacity)
    need = _clamp(need, bounds)
    state.recommendations.append([now, need])
    window = bounds.scale_down_stabilization_s
    state.recommendations = [r for r in state.recommendations if now - r[0] <= window][-RECOMMENDATION_LIMIT:]
    if need > current:
        state.low_since = None
        if ready < current:
            return ReplicaDecision(current, False, "WaitingForPods",
                                   f"{ready}/{current} pods ready; {message}")
        if state.last_scale is not None and now - state.last_scale < cfg.window_s:
            return ReplicaDecision(current, False, "Settling",
                                   f"the last scaling was {now - state.last_scale:.0f} s ago, less than one "
                                   f"window ({cfg.window_s:.0f} s); {message}")
        return _scaled(state, now, current, need, reason, message)
    if need < current:
        state.low_since = state.low_since if state.low_since is not None else now
        held = now - state.low_since
        if held < window:
            return ReplicaDecision(current, False, "Stabilizing",
                                   f"{message}; scaling in after {window - held:.0f} s more of it")
        target = max(r[1] for r in state.recommendations)
        if target < current:
            return _scaled(state, now, current, target, reason, message)
        return ReplicaDecision(current, False, "Stabilizing", message)
    state.low_since = None
    return ReplicaDecision(current, False, reason, message)


def _scaled(state: PolicyState, now: float, current: int, target: int, reason: str, message: str) -> ReplicaDecision:
    state.last_scale = now
    state.low_since = None
    state.recommendations = []
    return ReplicaDecision(target, target != current, reason, f"{current} -> {target} pods: {message}")
