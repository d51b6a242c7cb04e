"""Conditions from observations: Ready only when the current template serves on every wanted pod, reasons that
say why not, metrics/SLO conditions that hold still without data, and transition times that move only on change."""
import pytest

from semipd.operator import conditions as c

pytestmark = pytest.mark.unit


def dep(generation=1, observed=1, replicas=2, ready=2, updated=2, conds=()):
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": updated, "conditions": list(conds)}}


def reasons(obs):
    return {x.type: (x.status, x.reason) for x in c.compute(obs)}


def test_all_ready():
    r = reasons(c.Observed(desired_replicas=2, deployment=dep()))
    assert r["Ready"] == ("True", "AllReplicasReady") and r["Progressing"] == ("False", "Complete")


@pytest.mark.parametrize("deployment, want, ready, progressing", [
    (None, 1, ("False", "DeploymentMissing"), ("True", "Creating")),
    (dep(ready=0), 2, ("False", "ReplicasNotReady"), ("True", "WaitingForPods")),
    (dep(generation=2, observed=1), 2, ("False", "Updating"), ("True", "RollingUpdate")),
    (dep(updated=1), 2, ("False", "Updating"), ("True", "RollingUpdate")),
    (dep(replicas=2), 3, ("False", "ReplicasNotReady"), ("True", "Scaling")),
    ({**dep(replicas=3, ready=2, updated=1)}, 2, ("False", "Updating"), ("True", "RollingUpdate")),
    (dep(replicas=2, ready=1, updated=1), 1, ("False", "Updating"), ("True", "RollingUpdate")),  # a surge pod
    (dep(replicas=3, ready=3, updated=3), 2, ("True", "AllReplicasReady"), ("True", "Scaling")),
    (dep(replicas=0, ready=0, updated=0), 0, ("False", "ScaledToZero"), ("False", "Complete")),
    (dep(ready=1, conds=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                          "message": "ReplicaSet x has timed out progressing."}]), 2,
     ("False", "ReplicasNotReady"), ("False", "ProgressDeadlineExceeded")),
])
def test_not_ready_says_why(deployment, want, ready, progressing):
    r = reasons(c.Observed(desired_replicas=want, deployment=deployment))
    assert r["Ready"] == ready and r["Progressing"] == progressing


def test_apply_failure_is_reported_on_ready_and_progressing():
    r = reasons(c.Observed(desired_replicas=1, deployment=dep(), failure="spec.x: Invalid value",
                           failure_reason="ApplyFailed"))
    assert r["Ready"] == ("False", "ApplyFailed") and r["Progressing"] == ("False", "ApplyFailed")


@pytest.mark.parametrize("deployment, want, reconciling, stalled", [
    (None, 1, ("True", "Creating"), ("False", "NotStalled")),
    (dep(ready=0), 2, ("True", "WaitingForPods"), ("False", "NotStalled")),
    (dep(generation=2, observed=1), 2, ("True", "RollingUpdate"), ("False", "NotStalled")),
    (dep(), 2, ("False", "Complete"), ("False", "NotStalled")),
    (dep(ready=1, conds=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                          "message": "timed out"}]), 2,
     ("False", "ProgressDeadlineExceeded"), ("True", "ProgressDeadlineExceeded")),
])
def test_kstatus_conditions_from_the_rollout(deployment, want, reconciling, stalled):
    r = reasons(c.Observed(desired_replicas=want, deployment=deployment))
    assert r["Reconciling"] == reconciling and r["Stalled"] == stalled


@pytest.mark.parametrize("reason, reconciling, stalled", [
    ("InvalidSpec", "False", "True"), ("ApplyFailed", "False", "True"), ("NameConflict", "False", "True"),
    ("Forbidden", "False", "True"), ("RetryingConflict", "True", "False"),
])
def test_permanent_failures_stall_and_transient_ones_keep_reconciling(reason, reconciling, stalled):
    r = reasons(c.Observed(desired_replicas=1, deployment=dep(), failure="x", failure_reason=reason))
    assert r["Reconciling"][0] == reconciling and r["Stalled"][0] == stalled
    assert r["Ready"] == ("False", reason)


def test_metrics_and_slo_without_prometheus_never_claim_anything():
    r = reasons(c.Observed(desired_replicas=1, deployment=dep(replicas=1, ready=1, updated=1),
                           ttft_target_ms=200))
    assert r["MetricsAvailable"] == ("False", "PrometheusNotConfigured")
    assert r["SLOMet"] == ("Unknown", "NoMetrics")
    configured = c.Observed(desired_replicas=1, deployment=None, metrics=c.Metrics(configured=True),
                            ttft_target_ms=200)
    assert reasons(configured)["MetricsAvailable"] == ("Unknown", "NotQueried")
    failed = c.Observed(desired_replicas=1, deployment=None, ttft_target_ms=200,
                        metrics=c.Metrics(configured=True, queried=True, error="connection refused"))
    assert reasons(failed)["MetricsAvailable"] == ("False", "QueryFailed")
    assert reasons(failed)["SLOMet"] == ("Unknown", "NoMetrics")


@pytest.mark.parametrize("ttft, tpot, expected", [
    (150.0, 20.0, ("True", "WithinTargets")),
    (250.0, 20.0, ("False", "TTFTAboveTarget")),
    (150.0, 60.0, ("False", "TPOTAboveTarget")),
    (None, None, ("Unknown", "NoMetrics")),
])
def test_slo_against_targets(ttft, tpot, expected):
    obs = c.Observed(desired_replicas=1, deployment=None, ttft_target_ms=200, tpot_target_ms=50,
                     metrics=c.Metrics(configured=True, queried=True, ttft_ms=ttft, tpot_ms=tpot))
    assert reasons(obs)["SLOMet"] == expected
    no_targets = c.Observed(desired_replicas=1, deployment=None,
                            metrics=c.Metrics(configured=True, queried=True, ttft_ms=1.0))
    assert reasons(no_targets)["SLOMet"] == ("Unknown", "NoTargets")


def test_transition_time_moves_only_when_status_changes():
    first = c.merge(None, c.compute(c.Observed(desired_replicas=2, deployment=dep(ready=0))), 1, "T1")
    again = c.merge(first, c.compute(c.Observed(desired_replicas=2, deployment=dep(ready=1))), 2, "T2")
    ready = {x["type"]: x for x in again}["Ready"]
    assert ready["lastTransitionTime"] == "T1" and ready["message"] == "1/2 pods ready"
    assert ready["observedGeneration"] == 2
    done = c.merge(again, c.compute(c.Observed(desired_replicas=2, deployment=dep())), 2, "T3")
    assert {x["type"]: x["lastTransitionTime"] for x in done}["Ready"] == "T3"
    assert [x["type"] for x in done] == ["Ready", "Progressing", "Reconciling", "Stalled", "MetricsAvailable",
                                         "SLOMet"]
