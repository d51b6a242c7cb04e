"""The operator's own endpoints and HA, on the real control plane: /healthz, /readyz and /metrics of the process
the tests start, and two operators sharing a kopf peering object where only one acts and the other takes over
when the first is killed. Every wait polls with a deadline; nothing sleeps and then asserts."""
import pytest

from semipd.operator import crd, names
from semipd.operator.kube import Kube
from semipd.operator.testing import OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90  # seconds: a bound for the operator and the controllers to act, not a performance claim
GROUP_PATH = (names.API_VERSION, names.PLURAL)
RECONCILES = "semipd_operator_reconciles_total"
PEERING = "semipd-operator"


@pytest.fixture(scope="module")
def kube(control_plane) -> Kube:
    control_plane.require_controllers()
    k = Kube(control_plane.api_client())
    crd.install(k)
    crd.install_peering(k)
    return k



def create(kube: Kube, namespace: str, obj: dict, plural: str = names.PLURAL) -> dict:
    obj["metadata"]["namespace"] = namespace
    return kube.create(obj, plural)


def manifest(name: str, **spec) -> dict:
    body = {"model": {"hostPath": "/srv/models/tiny"},
            "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port()}, "replicas": 1}
    body.update(spec)
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": body}


def deployment_replicas(kube, namespace, name):
    d = kube.get_or_none("apps/v1", "deployments", namespace, name)
    return None if d is None else d["spec"]["replicas"]


def ready_as(op: OperatorProcess, role: str):
    def check():
        r = op.get("/readyz")
        return r.status_code == 200 and r.text.strip() == role
    return check


def test_the_operator_serves_health_readiness_and_its_own_metrics(kube, namespace, start_operator):
    op = start_operator()
    assert op.get("/healthz").status_code == 200
    poll(ready_as(op, "standalone"), WAIT, what="/readyz: standalone", log=op.log)
    before = op.metric(RECONCILES, trigger="spec", result="ok")
    text = op.get("/metrics").text
    for series in ("semipd_operator_passes_in_flight", "semipd_operator_peering_active 1.0",
                   "semipd_operator_decision_seconds_bucket", "semipd_operator_ready 1.0"):
        assert series in text, series
    create(kube, namespace, manifest("m1"))
    poll(lambda: deployment_replicas(kube, namespace, "m1") == 1, WAIT, what="the Deployment", log=op.log)
    poll(lambda: op.metric(RECONCILES, trigger="spec", result="ok") > before, WAIT,
         what="the reconcile counter to count the create", log=op.log)
    # A spec the API server accepts but the operator cannot apply is counted as rejected, with its reason.
    bad = manifest("m2")
    bad["spec"]["podTemplate"] = {"spec": {"containers": [{"name": "engine", "image": "other:1"}]}}
    create(kube, namespace, bad)
    poll(lambda: op.metric(RECONCILES, result="rejected") >= 1, WAIT, what="a rejected pass", log=op.log)
    assert op.metric("semipd_operator_errors_total", reason="InvalidSpec") >= 1


def test_two_peered_operators_one_acts_and_the_other_takes_over_when_it_dies(kube, namespace, start_operator):
    create(kube, namespace, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
           "kopfpeerings")
    peered = ["--peering", PEERING, "--peering-lifetime", "10"]
    active = start_operator("active.log", extra=peered + ["--priority", "20"])
    poll(ready_as(active, "active"), WAIT, what="the first operator active", log=active.log)
    standby = start_operator("standby.log", extra=peered + ["--priority", "10"])
    poll(ready_as(standby, "standby"), WAIT, what="the second operator standby", log=standby.log)
    assert standby.metric("semipd_operator_peering_active") == 0
    # kopf starts a peer with mandatory peering paused; the standby's watch streams stay paused.
    assert "watch-stream for semipdservices.v1alpha1.semipd.io in" in standby.log()

    create(kube, namespace, manifest("ha"))
    poll(lambda: deployment_replicas(kube, namespace, "ha") == 1, WAIT, what="the Deployment", log=active.log)
    # The active one has done the create and two timer passes (2 s apart); the standby has done nothing.
    poll(lambda: active.metric(RECONCILES, trigger="refresh") >= 2, WAIT, what="refresh passes", log=active.log)
    assert active.metric(RECONCILES, trigger="spec") >= 1
    assert standby.metric(RECONCILES) == 0
    assert standby.metric("semipd_operator_split_pushes_total") == 0
    assert "Resuming operations" not in standby.log()

    active.kill()
    kube.merge_patch(*GROUP_PATH, namespace, "ha", {"spec": {"replicas": 2}})   # made while nobody acts
    poll(ready_as(standby, "active"), WAIT, what="the standby to become active", log=standby.log)
    poll(lambda: deployment_replicas(kube, namespace, "ha") == 2, WAIT, what="the change reconciled by the new one",
         log=standby.log)
    assert standby.metric(RECONCILES, result="ok") >= 1
    deployments = [d for d in kube.list("apps/v1", "deployments", namespace, names.selector_string("ha"))]
    assert [d["metadata"]["name"] for d in deployments] == ["ha"]
