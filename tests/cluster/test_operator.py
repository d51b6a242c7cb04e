"""The operator as a real process against a real kube-apiserver + etcd + kube-controller-manager.

There is no kubelet: ReplicaSets create pods that stay Pending, and a FakeKubelet (named so) reports pods
Ready where a test needs it. Every wait polls with a deadline; nothing sleeps and then asserts."""
import base64
import copy
import uuid

import pytest

import argocd_health
from semipd.operator import builders, crd, names, spec as specs, tokens
from semipd.operator.kube import ApiError, Kube
from semipd.operator.testing import FakeKubelet, OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90  # seconds: a bound for the operator and the controllers to act, not a performance claim
GROUP_PATH = (names.API_VERSION, names.PLURAL)


@pytest.fixture(scope="module")
def kube(control_plane) -> Kube:
    control_plane.require_controllers()
    k = Kube(control_plane.api_client())
    crd.install(k)
    return k


@pytest.fixture
def operator(start_operator) -> OperatorProcess:
    return start_operator()


def manifest(name: str, **spec) -> dict:
    body = {"model": {"hostPath": "/srv/models/tiny"},
            # Never pulled: there is no kubelet.
            "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port()},
            "replicas": 1}
    body.update(spec)
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": body}


def create(kube: Kube, namespace: str, obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    return kube.create(obj, names.PLURAL)


def get_spd(kube, namespace, name) -> dict:
    return kube.get(*GROUP_PATH, namespace, name)


def patch_spec(kube, namespace, name, spec: dict) -> dict:
    return kube.merge_patch(*GROUP_PATH, namespace, name, {"spec": spec})


def deployment(kube, namespace, name):
    return kube.get_or_none("apps/v1", "deployments", namespace, name)


def ours(kube, api_version, plural, namespace, name) -> list[dict]:
    return kube.list(api_version, plural, namespace, names.selector_string(name))


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def reconciled(kube, namespace, name):
    """The object once the operator has applied its current generation (observedGeneration moves on failed
    passes too, so the conditions must also say that it went well)."""
    def check():
        obj = get_spd(kube, namespace, name)
        st = obj.get("status") or {}
        return obj if (st.get("observedGeneration") == obj["metadata"]["generation"]
                       and condition(obj, "Stalled").get("status") == "False"
                       and condition(obj, "Reconciling").get("reason") != "RetryingConflict") else None
    return check


def replica_sets(kube, namespace, name) -> list[dict]:
    return ours(kube, "apps/v1", "replicasets", namespace, name)


def live_pods(kube, namespace, name) -> list[dict]:
    return [p for p in ours(kube, "v1", "pods", namespace, name) if not p["metadata"].get("deletionTimestamp")]


def events(kube, namespace, name) -> list[dict]:
    return [e for e in kube.list("v1", "events", namespace) if e["involvedObject"].get("name") == name
            and e["involvedObject"].get("kind") == names.KIND]


def owner_is(obj: dict, owner: dict) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller") and r["kind"] == names.KIND
               for r in refs)


def test_children_status_conditions_and_events(kube, namespace, operator):
    m = manifest("chat", replicas=2, servedModelName="tiny-chat", slo={"ttftMs": 300, "tpotMs": 40},
                 engine={"image": "registry.invalid/semipd:1.0", "port": free_port(), "args": ["--seed", "7"]})
    created = create(kube, namespace, m)
    spd = poll(reconciled(kube, namespace, "chat"), WAIT, what="observedGeneration == 1", log=operator.log)

    dep = deployment(kube, namespace, "chat")
    svc = kube.get("v1", "services", namespace, "chat")
    secret = kube.get("v1", "secrets", namespace, "chat-admin-token")
    for child in (dep, svc, secret):
        assert owner_is(child, created), child["kind"]
        assert child["metadata"]["labels"][names.MANAGED_BY_LABEL] == names.MANAGED_BY

    parsed = specs.parse("chat", namespace, created["spec"])
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["semipd"] and c["args"] == builders.engine_args(parsed)
    assert c["args"][-2:] == ["--seed", "7"] and "--served-model-name" in c["args"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["hostPath"]["path"] == "/srv/models/tiny"
    assert "downwardAPI" in vols["podinfo"] and vols["admin-token"]["secret"]["secretName"] == "chat-admin-token"
    assert dep["spec"]["replicas"] == 2
    # A pod may take its whole startup-probe allowance to load a model before the rollout counts as failed.
    startup = c["startupProbe"]
    assert dep["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    assert dep["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION] == spd["status"]["podTemplateHash"]
    assert svc["spec"]["selector"] == {names.SERVICE_LABEL: "chat"}
    # The token is derived from the operator's key and this object's identity (never read back from the Secret).
    key = base64.b64decode(kube.get("v1", "secrets", namespace, "semipd-token-key")["data"]["key"])
    assert len(key) >= 32
    assert base64.b64decode(secret["data"]["token"]).decode() == tokens.derive_admin_token(
        key, namespace, "chat", created["metadata"]["uid"])

    # kopf keeps its state under semipd.io, never under its own domain or in status.
    annotations = poll(lambda: (a := get_spd(kube, namespace, "chat")["metadata"].get("annotations") or {}).get(
        f"{names.GROUP}/last-handled-configuration") and a, WAIT, what="kopf's annotations", log=operator.log)
    assert f"{names.GROUP}/last-handled-configuration" in annotations
    assert not any(k.startswith("kopf.zalando.org") for k in annotations)
    assert spd["metadata"]["finalizers"] == [names.FINALIZER] and "kopf" not in spd["status"]

    st = spd["status"]
    assert st["selector"] == "semipd.io/service=chat" and st["split"] == "prefill=0.5"
    assert (condition(spd, "MetricsAvailable")["status"], condition(spd, "MetricsAvailable")["reason"]) == (
        "False", "PrometheusNotConfigured")
    assert (condition(spd, "SLOMet")["status"], condition(spd, "SLOMet")["reason"]) == ("Unknown", "NoMetrics")
    assert condition(spd, "Ready")["status"] == "False"

    # The controller-manager makes the pods; the operator annotates each with the split.
    pods = poll(lambda: (p := live_pods(kube, namespace, "chat")) and len(p) == 2 and all(
        (x["metadata"].get("annotations") or {}).get(names.SPLIT_ANNOTATION) == "prefill=0.5" for x in p) and p,
        WAIT, what="2 annotated pods", log=operator.log)

    kubelet = FakeKubelet(kube)
    for p in pods:
        kubelet.report_ready(namespace, p["metadata"]["name"])

    def ready():
        obj = get_spd(kube, namespace, "chat")
        return obj if condition(obj, "Ready").get("reason") == "AllReplicasReady" else None
    spd = poll(ready, WAIT, what="Ready=True", log=operator.log)
    assert condition(spd, "Ready")["status"] == "True" and spd["status"]["readyReplicas"] == 2
    assert condition(spd, "Progressing")["reason"] == "Complete"

    # Nothing listens on the pods' admin port: the push fails, is recorded per pod, and is reported once.
    def push_failed():
        entries = get_spd(kube, namespace, "chat")["status"].get("pods") or []
        return entries if len(entries) == 2 and all(e.get("lastError") for e in entries) else None
    entries = poll(push_failed, WAIT, what="per-pod push errors in status", log=operator.log)
    assert {e["name"] for e in entries} == {p["metadata"]["name"] for p in pods}
    assert all(e["desired"] == "prefill=0.5" and "applied" not in e for e in entries)
    assert all("/admin/partition" in e["lastError"] for e in entries)

    reasons = poll(lambda: (r := {e["reason"] for e in events(kube, namespace, "chat")}) >= {
        "Created", "PartitionPushFailed"} and r, WAIT, what="events", log=operator.log)
    assert "Created" in reasons

    # The printer columns render from the status (what `kubectl get spd` shows).
    table = kube.request("GET", f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}/chat",
                         accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    columns = [col["name"] for col in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"]))
    assert (row["Ready"], row["Replicas"], row["Split"]) == ("True", 2, "prefill=0.5")


BAD = {
    "min above max": ({"replicas": None, "autoscaling": {"minReplicas": 4, "maxReplicas": 2}},
                      "minReplicas must be less than or equal to maxReplicas"),
    "split outside 0-1": ({"partition": {"initial": 1.5}}, "spec.partition.initial"),
    "split bounds crossed": ({"partition": {"min": 0.7, "max": 0.3, "initial": 0.5}},
                             "spec.partition.min must be less than or equal to spec.partition.max"),
    "two model sources": ({"model": {"hostPath": "/a", "uri": "hf://org/model"}},
                          "spec.model must set exactly one of: pvc, hostPath, imagePath, uri"),
    "no model source": ({"model": {}}, "spec.model must set exactly one of"),
    "no image": ({"engine": {"port": 8000}}, "spec.engine.image: Required value"),
    "bad gpu resource name": ({"resources": {"gpuResourceName": "nvidia.com/gpu/extra"}},
                              "spec.resources.gpuResourceName"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifests_are_rejected_with_readable_messages(kube, namespace, case):
    change, message = BAD[case]
    m = manifest(f"bad-{uuid.uuid4().hex[:6]}")
    m["spec"].update(change)
    m["spec"] = {k: v for k, v in m["spec"].items() if v is not None}
    with pytest.raises(ApiError) as err:
        create(kube, namespace, m)
    assert err.value.status == 422, err.value
    assert message in err.value.message, err.value.message


def test_served_model_name_is_immutable(kube, namespace):
    create(kube, namespace, manifest("named", servedModelName="a"))
    with pytest.raises(ApiError) as err:
        patch_spec(kube, namespace, "named", {"servedModelName": "b"})
    assert err.value.status == 422 and "spec.servedModelName is immutable" in err.value.message
    patch_spec(kube, namespace, "named", {"replicas": 3})  # other fields stay mutable


def test_scale_subresource_changes_only_the_deployments_replicas(kube, namespace, operator):
    create(kube, namespace, manifest("scaled"))
    poll(reconciled(kube, namespace, "scaled"), WAIT, what="reconciled", log=operator.log)
    before = deployment(kube, namespace, "scaled")
    rs_before = poll(lambda: replica_sets(kube, namespace, "scaled"), WAIT, what="a ReplicaSet")
    scale_path = f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}/scaled/scale"
    scale = kube.request("GET", scale_path)
    assert scale["spec"]["replicas"] == 1 and scale["status"]["selector"] == "semipd.io/service=scaled"
    spec_before = get_spd(kube, namespace, "scaled")["spec"]

    kube.request("PATCH", scale_path, body={"spec": {"replicas": 3}}, content_type="application/merge-patch+json")

    after = poll(lambda: (d := deployment(kube, namespace, "scaled"))["spec"]["replicas"] == 3 and d,
                 WAIT, what="Deployment replicas 3", log=operator.log)
    assert after["spec"]["template"] == before["spec"]["template"]
    assert (after["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]
            == before["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION])
    assert after["spec"]["strategy"] == before["spec"]["strategy"]
    assert [r["metadata"]["uid"] for r in replica_sets(kube, namespace, "scaled")] == [
        r["metadata"]["uid"] for r in rs_before]
    assert get_spd(kube, namespace, "scaled")["spec"] == {**spec_before, "replicas": 3}
    poll(lambda: len(live_pods(kube, namespace, "scaled")) == 3, WAIT, what="3 pods")
    obj = poll(lambda: (o := get_spd(kube, namespace, "scaled"))["status"].get("replicas") == 3 and o,
               WAIT, what="status.replicas 3 (the scale subresource's current count)", log=operator.log)
    assert kube.request("GET", scale_path)["status"]["replicas"] == 3
    assert any(h["kind"] == "Scale" and (h["from"], h["to"]) == ("1", "3") for h in obj["status"]["history"])


def test_scale_subresource_works_on_every_object_with_one_owner_of_the_count(kube, namespace, operator):
    """HPA and KEDA read and write /scale. It answers on an object that never set spec.replicas (the default
    fills it); on an autoscaled one the operator owns the count, so a write through /scale is refused with a
    message that names the owner, and dropping autoscaling hands the count back in one update."""
    plain = manifest("hpa")
    del plain["spec"]["replicas"]
    create(kube, namespace, plain)
    scale_path = f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}/hpa/scale"
    assert kube.request("GET", scale_path)["spec"]["replicas"] == 1

    def hpa_write():
        """What an HPA does: read the Scale, write it back whole with its resourceVersion; a 409 (the operator
        wrote the object's status meanwhile) is retried, as the HPA controller retries it."""
        scale = kube.request("GET", scale_path)
        scale["spec"]["replicas"] = 2
        try:
            return kube.request("PUT", scale_path, body=scale)
        except ApiError as e:
            if e.conflict:
                return None
            raise
    poll(hpa_write, WAIT, what="a Scale write that is not a 409")
    poll(lambda: deployment(kube, namespace, "hpa")["spec"]["replicas"] == 2, WAIT, what="Deployment at 2",
         log=operator.log)
    poll(lambda: kube.request("GET", scale_path)["status"].get("replicas") == 2, WAIT,
         what="status.replicas 2 through /scale", log=operator.log)

    auto = manifest("auto", autoscaling={"minReplicas": 2, "maxReplicas": 4})
    del auto["spec"]["replicas"]
    create(kube, namespace, auto)
    auto_path = f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}/auto/scale"
    assert kube.request("GET", auto_path)["spec"]["replicas"] == 1      # readable (the default), not a 500
    poll(lambda: deployment(kube, namespace, "auto")["spec"]["replicas"] == 2, WAIT,
         what="the operator's count: minReplicas", log=operator.log)
    with pytest.raises(ApiError) as err:
        kube.request("PATCH", auto_path, body={"spec": {"replicas": 5}}, content_type="application/merge-patch+json")
    assert err.value.status == 422 and "the operator owns the pod count" in err.value.message
    assert deployment(kube, namespace, "auto")["spec"]["replicas"] == 2
    # bounds are the knob under autoscaling; removing autoscaling and setting replicas at once is allowed
    patch_spec(kube, namespace, "auto", {"autoscaling": {"minReplicas": 3, "maxReplicas": 4}})
    poll(lambda: deployment(kube, namespace, "auto")["spec"]["replicas"] == 3, WAIT, what="Deployment at 3",
         log=operator.log)
    patch_spec(kube, namespace, "auto", {"autoscaling": None, "replicas": 1})
    poll(lambda: deployment(kube, namespace, "auto")["spec"]["replicas"] == 1, WAIT, what="Deployment at 1",
         log=operator.log)
    assert "autoscaling" not in get_spd(kube, namespace, "auto")["spec"]


def test_split_change_annotates_pods_without_rolling(kube, namespace, operator):
    create(kube, namespace, manifest("split", replicas=2))
    poll(reconciled(kube, namespace, "split"), WAIT, what="reconciled", log=operator.log)

    def annotated(value):
        def check():
            pods = live_pods(kube, namespace, "split")
            return pods if len(pods) == 2 and all(
                (p["metadata"].get("annotations") or {}).get(names.SPLIT_ANNOTATION) == value for p in pods) else None
        return check
    pods_before = poll(annotated("prefill=0.5"), WAIT, what="pods annotated prefill=0.5", log=operator.log)
    dep_before = deployment(kube, namespace, "split")
    rs_before = replica_sets(kube, namespace, "split")

    patch_spec(kube, namespace, "split", {"partition": {"initial": 0.3}})

    pods_after = poll(annotated("prefill=0.3"), WAIT, what="pods annotated prefill=0.3", log=operator.log)
    assert sorted(p["metadata"]["uid"] for p in pods_after) == sorted(p["metadata"]["uid"] for p in pods_before)
    obj = poll(reconciled(kube, namespace, "split"), WAIT, what="reconciled after the split change")
    assert obj["status"]["split"] == "prefill=0.3"
    poll(lambda: all(e["desired"] == "prefill=0.3" for e in get_spd(kube, namespace, "split")["status"]["pods"]),
         WAIT, what="status.pods desired prefill=0.3")
    dep_after = deployment(kube, namespace, "split")
    # Not a single write to the Deployment's spec: same generation, same template, same ReplicaSet.
    assert dep_after["metadata"]["generation"] == dep_before["metadata"]["generation"]
    assert dep_after["spec"]["template"] == dep_before["spec"]["template"]
    assert [r["metadata"]["uid"] for r in replica_sets(kube, namespace, "split")] == [
        r["metadata"]["uid"] for r in rs_before]
    assert any(h["kind"] == "Split" and (h["from"], h["to"]) == ("prefill=0.5", "prefill=0.3")
               for h in obj["status"]["history"])
    poll(lambda: any(e["reason"] == "SplitChanged" for e in events(kube, namespace, "split")), WAIT,
         what="a SplitChanged event")


def test_image_change_rolls_the_deployment(kube, namespace, operator):
    create(kube, namespace, manifest("rolled"))
    first = poll(reconciled(kube, namespace, "rolled"), WAIT, what="reconciled", log=operator.log)
    poll(lambda: len(replica_sets(kube, namespace, "rolled")) == 1, WAIT, what="one ReplicaSet")

    patch_spec(kube, namespace, "rolled", {"engine": {"image": "registry.invalid/semipd:1.1"}})

    obj = poll(reconciled(kube, namespace, "rolled"), WAIT, what="reconciled after the image change",
               log=operator.log)
    dep = deployment(kube, namespace, "rolled")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.invalid/semipd:1.1"
    assert dep["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION] == obj["status"]["podTemplateHash"]
    assert obj["status"]["podTemplateHash"] != first["status"]["podTemplateHash"]
    poll(lambda: len(replica_sets(kube, namespace, "rolled")) == 2, WAIT, what="a second ReplicaSet")
    assert any(h["kind"] == "Rollout" for h in obj["status"]["history"])
    # Old pods never turn into new ones here (no kubelet), so the rollout stays open, and Ready says so.
    poll(lambda: condition(get_spd(kube, namespace, "rolled"), "Ready").get("reason") == "Updating", WAIT,
         what="Ready=False Updating")


def test_children_deleted_by_hand_come_back(kube, namespace, operator):
    create(kube, namespace, manifest("phoenix"))
    poll(reconciled(kube, namespace, "phoenix"), WAIT, what="reconciled", log=operator.log)
    for api_version, plural, name in (("v1", "services", "phoenix"), ("apps/v1", "deployments", "phoenix"),
                                      ("v1", "secrets", "phoenix-admin-token")):
        old = kube.get(api_version, plural, namespace, name)
        kube.delete(api_version, plural, namespace, name)

        def back():
            obj = kube.get_or_none(api_version, plural, namespace, name)
            return obj if obj and obj["metadata"]["uid"] != old["metadata"]["uid"] else None
        new = poll(back, WAIT, what=f"{plural}/{name} re-created", log=operator.log)
        assert new["metadata"]["ownerReferences"] == old["metadata"]["ownerReferences"]
        if plural == "secrets":  # derived, so the same token: running pods keep working
            assert new["data"] == old["data"]


def test_killing_the_operator_anywhere_converges_without_duplicates(kube, namespace, start_operator):
    """SIGKILL at several points of the first reconcile (and once with a spec change while it is down); each
    restart converges to one Deployment, one Service, one Secret (the same one), one ReplicaSet."""
    points = {
        "right after the object is created": lambda name: True,
        "once the Secret exists": lambda name: kube.get_or_none("v1", "secrets", namespace, f"{name}-admin-token"),
        "once the Deployment exists": lambda name: deployment(kube, namespace, name),
    }
    for i, (point, reached) in enumerate(points.items()):
        name = f"crash{i}"
        op = start_operator()
        create(kube, namespace, manifest(name))
        poll(lambda: reached(name), WAIT, what=point, log=op.log)
        op.kill()
        secret_before = kube.get_or_none("v1", "secrets", namespace, f"{name}-admin-token")
        if i == 2:
            patch_spec(kube, namespace, name, {"replicas": 2})  # a change while nobody watches
        op = start_operator()
        obj = poll(reconciled(kube, namespace, name), WAIT, what=f"convergence after a kill {point}", log=op.log)
        want = 2 if i == 2 else 1
        poll(lambda: deployment(kube, namespace, name)["spec"]["replicas"] == want, WAIT, what="replicas")
        assert [d["metadata"]["name"] for d in ours(kube, "apps/v1", "deployments", namespace, name)] == [name]
        assert [s["metadata"]["name"] for s in ours(kube, "v1", "services", namespace, name)] == [name]
        secrets = ours(kube, "v1", "secrets", namespace, name)
        assert [s["metadata"]["name"] for s in secrets] == [f"{name}-admin-token"]
        if secret_before is not None:  # made once: never regenerated by a restart
            assert secrets[0]["metadata"]["uid"] == secret_before["metadata"]["uid"]
            assert secrets[0]["data"] == secret_before["data"]
        assert len(replica_sets(kube, namespace, name)) == 1
        assert obj["metadata"]["finalizers"] == [names.FINALIZER]
        op.stop()


def test_invalid_child_is_reported_once_and_not_retried(kube, namespace, operator):
    """maxSurge 0 with maxUnavailable 0 passes the CRD but the Deployment API refuses it (422)."""
    create(kube, namespace, manifest("stuck", rollout={"maxSurge": 0, "maxUnavailable": 0}))

    def failed():
        obj = get_spd(kube, namespace, "stuck")
        return obj if condition(obj, "Progressing").get("reason") == "ApplyFailed" else None
    obj = poll(failed, WAIT, what="Progressing=False ApplyFailed", log=operator.log)
    assert condition(obj, "Progressing")["status"] == "False"
    assert "maxUnavailable" in condition(obj, "Progressing")["message"]
    assert (condition(obj, "Ready")["status"], condition(obj, "Ready")["reason"]) == ("False", "ApplyFailed")
    # Seen and failed, for kstatus: observedGeneration is current, Stalled says so, nothing is in progress.
    assert obj["status"]["observedGeneration"] == 1
    assert (condition(obj, "Stalled")["status"], condition(obj, "Stalled")["reason"]) == ("True", "ApplyFailed")
    assert condition(obj, "Reconciling")["status"] == "False"
    assert argocd_health.health(obj)["status"] == "Degraded"
    assert deployment(kube, namespace, "stuck") is None

    # Let the status timer (every 2 s here) run several times: it must not try the same generation again.
    ticks = operator.log().count("Timer 'refresh' succeeded")
    poll(lambda: operator.log().count("Timer 'refresh' succeeded") >= ticks + 3, WAIT, what="3 more timer runs")
    failures = [e for e in events(kube, namespace, "stuck") if e["reason"] == "ApplyFailed"]
    assert len(failures) == 1 and failures[0]["type"] == "Warning"

    patch_spec(kube, namespace, "stuck", {"rollout": {"maxSurge": 0, "maxUnavailable": 1}})
    obj = poll(reconciled(kube, namespace, "stuck"), WAIT, what="reconciled once the spec is fixed",
               log=operator.log)
    assert obj["status"]["observedGeneration"] == 2
    assert deployment(kube, namespace, "stuck")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0, "maxUnavailable": 1}


def test_a_foreign_child_is_not_taken_over(kube, namespace, operator):
    owner = kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "someone-else", "namespace": namespace}}, "configmaps")
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "taken", "namespace": namespace, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "someone-else", "uid": owner["metadata"]["uid"],
            "controller": True}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "other"}}, "template": {
            "metadata": {"labels": {"app": "other"}},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/other:1"}]}}}}
    kube.create(foreign, "deployments")
    create(kube, namespace, manifest("taken"))

    def conflict():
        obj = get_spd(kube, namespace, "taken")
        return obj if condition(obj, "Progressing").get("reason") == "NameConflict" else None
    obj = poll(conflict, WAIT, what="Progressing=False NameConflict", log=operator.log)
    assert "belongs to another owner" in condition(obj, "Progressing")["message"]
    assert condition(obj, "Ready")["reason"] == "NameConflict"
    # Permanent until someone acts: Stalled, not Reconciling (a 409 from the API server would be the reverse).
    assert (condition(obj, "Stalled")["status"], condition(obj, "Reconciling")["status"]) == ("True", "False")
    dep = deployment(kube, namespace, "taken")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.invalid/other:1"
    assert [r["kind"] for r in dep["metadata"]["ownerReferences"]] == ["ConfigMap"]
    # Repeated passes meet the same conflict: one Warning event, not one per pass.
    ticks = operator.log().count("Timer 'refresh' succeeded")
    poll(lambda: operator.log().count("Timer 'refresh' succeeded") >= ticks + 2, WAIT, what="2 more timer runs")
    assert len([e for e in events(kube, namespace, "taken") if e["reason"] == "NameConflict"]) == 1

    # Nor is an object someone made by hand (no owner, not the operator's label): adopting it would change
    # someone else's workload, and the chart's admission policy would refuse the update anyway.
    kube.delete("apps/v1", "deployments", namespace, "taken")
    poll(lambda: deployment(kube, namespace, "taken") is None, WAIT, what="the foreign Deployment gone")
    handmade = copy.deepcopy(foreign)
    del handmade["metadata"]["ownerReferences"]
    kube.create(handmade, "deployments")
    poll(lambda: "is not managed by semipd-operator" in
         condition(get_spd(kube, namespace, "taken"), "Progressing").get("message", ""), WAIT,
         what="Conflict: not managed by semipd-operator", log=operator.log)
    assert [c["image"] for c in deployment(kube, namespace, "taken")["spec"]["template"]["spec"]["containers"]] \
        == ["registry.invalid/other:1"]

    # Once the other object is gone, the next pass takes the name (no spec change needed).
    kube.delete("apps/v1", "deployments", namespace, "taken")
    obj = poll(reconciled(kube, namespace, "taken"), WAIT, what="reconciled once the name is free",
               log=operator.log)
    assert owner_is(deployment(kube, namespace, "taken"), obj)


def test_a_secret_of_that_name_made_first_is_left_alone(kube, namespace, operator):
    """The operator only ever creates the admin Secret (it may not read Secrets): one that exists already is
    neither read nor overwritten, and the service still reconciles."""
    token = "my-own-admin-token"
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "byo-admin-token",
                                                                     "namespace": namespace},
                 "data": {"token": base64.b64encode(token.encode()).decode()}}, "secrets")
    create(kube, namespace, manifest("byo"))
    poll(reconciled(kube, namespace, "byo"), WAIT, what="reconciled", log=operator.log)
    secret = kube.get("v1", "secrets", namespace, "byo-admin-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == token
    assert "ownerReferences" not in secret["metadata"]
    assert token not in operator.log()


def test_pod_monitor_where_its_crd_exists(kube, namespace, operator):
    pm_crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "podmonitors.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": "PodMonitor", "plural": "podmonitors", "singular": "podmonitor",
                           "listKind": "PodMonitorList"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
    kube.apply(pm_crd, "customresourcedefinitions")
    try:
        poll(lambda: kube.list("monitoring.coreos.com/v1", "podmonitors", namespace) is not None, WAIT,
             what="PodMonitor API served")
        spd = create(kube, namespace, manifest("watched"))
        pm = poll(lambda: kube.get_or_none("monitoring.coreos.com/v1", "podmonitors", namespace, "watched"), WAIT,
                  what="a PodMonitor", log=operator.log)
        assert owner_is(pm, spd)
        assert pm["spec"]["selector"] == {"matchLabels": {names.SERVICE_LABEL: "watched"}}
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    finally:
        kube.delete("apiextensions.k8s.io/v1", "customresourcedefinitions", None, "podmonitors.monitoring.coreos.com")


def test_the_admin_secret_is_created_once_from_the_derived_token(kube, namespace):
    """Two passes (or two operators) create the admin Secret: the second gets the API server's real 409
    AlreadyExists, which means the Secret is there; both derive the same token, nothing is overwritten, and only
    the first says Created."""
    from semipd.operator import reconcile

    owner = create(kube, namespace, manifest("race"))
    spec, key = specs.parse("race", namespace, owner["spec"]), b"k" * 32
    emitted = []
    first = reconcile.ensure_secret(kube, spec, owner, key, lambda *a, **k: emitted.append(a))
    made = kube.get("v1", "secrets", namespace, "race-admin-token")
    second = reconcile.ensure_secret(kube, spec, owner, key, lambda *a, **k: emitted.append(a))
    assert first == second == tokens.derive_admin_token(key, namespace, "race", owner["metadata"]["uid"])
    assert [a[0] for a in emitted] == ["Created"]
    again = kube.get("v1", "secrets", namespace, "race-admin-token")
    assert again["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"]
    assert base64.b64decode(again["data"]["token"]).decode() == first


def test_deleting_the_service_lets_go_and_garbage_collection_removes_children(kube, namespace, operator):
    create(kube, namespace, manifest("gone"))
    poll(reconciled(kube, namespace, "gone"), WAIT, what="reconciled", log=operator.log)
    kube.delete(*GROUP_PATH, namespace, "gone")
    # kopf's finalizer is released by the running operator, so the object really goes ...
    poll(lambda: kube.get_or_none(*GROUP_PATH, namespace, "gone") is None, WAIT, what="the object deleted",
         log=operator.log)
    # ... and its children follow through their owner references (no deletion code in the operator). The
    # garbage collector notices a CRD installed moments ago only at its next discovery resync (30 s), hence
    # the longer bound.
    for api_version, plural in (("apps/v1", "deployments"), ("v1", "services"), ("v1", "secrets")):
        poll(lambda: ours(kube, api_version, plural, namespace, "gone") == [], 3 * WAIT,
             what=f"{plural} garbage-collected")


def test_kstatus_conditions_and_the_argocd_health_check_follow_the_service(kube, namespace, operator):
    """What Flux (kstatus) and Argo CD (the chart's Lua health check, run in Argo CD's interpreter) read, on the
    real object through its life: in progress while pods come up, healthy once they serve, failed (not pending)
    when a new spec cannot be applied, healthy again once fixed, suspended at zero replicas."""
    create(kube, namespace, manifest("gitops"))
    obj = poll(reconciled(kube, namespace, "gitops"), WAIT, what="reconciled", log=operator.log)
    assert condition(obj, "Reconciling")["status"] == "True" and condition(obj, "Ready")["status"] == "False"
    assert argocd_health.health(obj)["status"] == "Progressing"

    (pod,) = poll(lambda: live_pods(kube, namespace, "gitops"), WAIT, what="the pod")
    FakeKubelet(kube).report_ready(namespace, pod["metadata"]["name"])
    obj = poll(lambda: (o := get_spd(kube, namespace, "gitops")) and condition(o, "Ready").get("status") == "True"
               and o, WAIT, what="Ready=True", log=operator.log)
    assert (condition(obj, "Reconciling")["status"], condition(obj, "Stalled")["status"]) == ("False", "False")
    assert argocd_health.health(obj) == {"status": "Healthy", "message": "AllReplicasReady: 1/1 pods ready"}

    # A spec the Deployment API refuses: generation 2 is observed and reported failed, for both tools.
    patch_spec(kube, namespace, "gitops", {"rollout": {"maxSurge": 0, "maxUnavailable": 0}})
    obj = poll(lambda: (o := get_spd(kube, namespace, "gitops"))["status"].get("observedGeneration") == 2 and o,
               WAIT, what="generation 2 observed although it failed", log=operator.log)
    assert (condition(obj, "Stalled")["status"], condition(obj, "Stalled")["reason"]) == ("True", "ApplyFailed")
    assert condition(obj, "Reconciling")["status"] == "False"
    assert argocd_health.health(obj)["status"] == "Degraded"

    patch_spec(kube, namespace, "gitops", {"rollout": {"maxSurge": 0, "maxUnavailable": 1}})
    obj = poll(lambda: (o := get_spd(kube, namespace, "gitops"))["status"].get("observedGeneration") == 3
               and condition(o, "Ready").get("status") == "True" and o, WAIT, what="healthy again",
               log=operator.log)
    assert argocd_health.health(obj)["status"] == "Healthy"

    # Scaled to zero: Ready says so at once, while Reconciling may still be True until the pods are gone
    # (Progressing, rightly); the health settles on Suspended.
    patch_spec(kube, namespace, "gitops", {"replicas": 0})
    obj = poll(lambda: (o := get_spd(kube, namespace, "gitops"))["status"].get("observedGeneration") == 4
               and condition(o, "Ready").get("reason") == "ScaledToZero"
               and argocd_health.health(o)["status"] == "Suspended" and o, WAIT, what="scaled to zero, Suspended",
               log=operator.log)
    assert condition(obj, "Reconciling")["status"] == "False" and condition(obj, "Stalled")["status"] == "False"


POD_TEMPLATE = {
    "metadata": {"labels": {"team": "search"}, "annotations": {"example.com/owner": "search"}},
    "spec": {
        "containers": [
            {"name": "engine", "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
             "resources": {"limits": {"ephemeral-storage": "20Gi"}},
             "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]},
            {"name": "proxy", "image": "registry.invalid/envoy:1.31", "ports": [{"containerPort": 9901}]},
        ],
        "initContainers": [{"name": "warm-cache", "image": "registry.invalid/busybox:1.36",
                            "command": ["true"]}],
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
    },
}


def test_pod_template_renders_into_the_deployment_and_its_pods(kube, namespace, operator):
    """A sidecar, an init container, imagePullSecrets, tolerations and a sized /dev/shm from spec.podTemplate
    reach the Deployment and, through the real ReplicaSet controller, the pods; the engine stays the operator's."""
    created = create(kube, namespace, manifest("tpl", podTemplate=POD_TEMPLATE))
    # The API server kept the template (a structural schema would prune what it does not declare).
    assert created["spec"]["podTemplate"] == POD_TEMPLATE
    poll(reconciled(kube, namespace, "tpl"), WAIT, what="reconciled", log=operator.log)
    tpl = deployment(kube, namespace, "tpl")["spec"]["template"]
    pod = tpl["spec"]
    assert [c["name"] for c in pod["containers"]] == ["engine", "proxy"]
    assert [c["name"] for c in pod["initContainers"]] == ["warm-cache"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["tolerations"] == POD_TEMPLATE["spec"]["tolerations"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"} and "dshm" not in vols
    assert tpl["metadata"]["labels"]["team"] == "search" and tpl["metadata"]["labels"][names.SERVICE_LABEL] == "tpl"
    engine = pod["containers"][0]
    parsed = specs.parse("tpl", namespace, created["spec"])
    assert engine["image"] == "registry.invalid/semipd:1.0" and engine["args"] == builders.engine_args(parsed)
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in engine["env"]
    assert engine["resources"]["limits"]["ephemeral-storage"] == "20Gi"
    assert {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}["/dev/shm"] == "shm"
    # The controller-manager made a real pod from it.
    (p,) = poll(lambda: live_pods(kube, namespace, "tpl") or None, WAIT, what="a pod", log=operator.log)
    assert [c["name"] for c in p["spec"]["containers"]] == ["engine", "proxy"]
    assert [c["name"] for c in p["spec"]["initContainers"]] == ["warm-cache"]

    # The engine's image and args are the operator's: a template that sets them is refused, with the reason in
    # status, and the running Deployment is left as it was.
    hijack = copy.deepcopy(POD_TEMPLATE)
    hijack["spec"]["containers"][0].update(image="registry.invalid/other:6.6", args=["sleep", "inf"])
    patch_spec(kube, namespace, "tpl", {"podTemplate": hijack})

    def refused():
        obj = get_spd(kube, namespace, "tpl")
        return obj if obj["status"].get("observedGeneration") == 2 and condition(obj, "Stalled").get(
            "reason") == "InvalidSpec" else None
    obj = poll(refused, WAIT, what="Stalled=True InvalidSpec", log=operator.log)
    message = condition(obj, "Stalled")["message"]
    assert "args, image, which the operator owns" in message and "spec.engine.image" in message
    assert deployment(kube, namespace, "tpl")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.invalid/semipd:1.0"

    patch_spec(kube, namespace, "tpl", {"podTemplate": POD_TEMPLATE})
    poll(reconciled(kube, namespace, "tpl"), WAIT, what="reconciled once the template is fixed", log=operator.log)


def test_pod_template_schema_is_the_api_servers_own(kube, namespace):
    """The CRD's podTemplate schema is what operator/podschema.py makes of the OpenAPI this very API server
    serves (a Kubernetes upgrade that adds a PodSpec field fails here until the CRD is regenerated), and the
    server validates a template with it: unknown fields and wrong types are refused, not pruned."""
    from semipd.operator import podschema
    live = podschema.podtemplate_block(kube.request("GET", "/openapi/v3/api/v1"))
    ours_ = crd.schema()["properties"]["spec"]["properties"]["podTemplate"]["properties"]
    assert {k: ours_[k] for k in live} == live, (
        "regenerate: python -m semipd.operator.podschema --kubeconfig KUBECONFIG, then copy crds/ to the chart")

    m = manifest("typo", podTemplate={"spec": {"containers": [{"name": "side", "image": "x", "imagePullPolcy": "A"}]}})
    m["metadata"]["namespace"] = namespace
    with pytest.raises(ApiError) as err:
        kube.request("POST", f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}", body=m,
                     query={"fieldValidation": "Strict"})
    assert 'unknown field "spec.podTemplate.spec.containers[0].imagePullPolcy"' in err.value.message
    bad = manifest("badport", podTemplate={"spec": {"containers": [
        {"name": "side", "image": "x", "ports": [{"containerPort": "http"}]}]}})
    with pytest.raises(ApiError) as err:
        create(kube, namespace, bad)
    assert err.value.status == 422 and "containers[0].ports[0].containerPort" in err.value.message
    mixed = manifest("mixed", podTemplate={"nodeSelector": {"a": "b"}, "spec": {"schedulerName": "x"}})
    with pytest.raises(ApiError) as err:
        create(kube, namespace, mixed)
    assert err.value.status == 422 and "mixes the pod template form" in err.value.message


def test_disruption_budget_and_service_options_follow_the_spec(kube, namespace, operator):
    """spec.disruptionBudget makes a PodDisruptionBudget owned by the service (the real disruption controller
    counts the engine pods against it), changes with it and goes when the option is removed; spec.service sets the
    Service's type, annotations and load-balancer fields, and taking them away takes them off the Service."""
    annotations = {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}
    created = create(kube, namespace, manifest(
        "lb", replicas=2, disruptionBudget={"minAvailable": 1},
        service={"type": "LoadBalancer", "annotations": annotations, "labels": {"exposed": "yes"},
                 "loadBalancerSourceRanges": ["10.0.0.0/8"], "externalTrafficPolicy": "Local"}))
    poll(reconciled(kube, namespace, "lb"), WAIT, what="reconciled", log=operator.log)
    pdb = kube.get("policy/v1", "poddisruptionbudgets", namespace, "lb")
    assert owner_is(pdb, created) and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": {names.SERVICE_LABEL: "lb"}}
    # The disruption controller (kube-controller-manager) finds the engine pods through it.
    poll(lambda: (kube.get("policy/v1", "poddisruptionbudgets", namespace, "lb").get("status") or {}).get(
        "expectedPods") == 2, WAIT, what="the disruption controller counting 2 pods", log=operator.log)
    svc = kube.get("v1", "services", namespace, "lb")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["nodePort"] > 0
    assert svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"] and svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["healthCheckNodePort"] > 0       # allocated by the API server for Local
    assert svc["metadata"]["annotations"].items() >= annotations.items()
    assert svc["metadata"]["labels"]["exposed"] == "yes" and svc["metadata"]["labels"][names.MANAGED_BY_LABEL] == \
        names.MANAGED_BY

    patch_spec(kube, namespace, "lb", {"disruptionBudget": {"minAvailable": None, "maxUnavailable": "50%"}})
    poll(lambda: kube.get("policy/v1", "poddisruptionbudgets", namespace, "lb")["spec"].get("maxUnavailable") ==
         "50%", WAIT, what="the budget updated", log=operator.log)
    assert "minAvailable" not in kube.get("policy/v1", "poddisruptionbudgets", namespace, "lb")["spec"]

    # Exactly one of the two, as Kubernetes requires, is checked before anything is stored.
    with pytest.raises(ApiError) as err:
        patch_spec(kube, namespace, "lb", {"disruptionBudget": {"minAvailable": 1}})
    assert err.value.status == 422 and "exactly one of minAvailable, maxUnavailable" in err.value.message
    with pytest.raises(ApiError) as err:
        patch_spec(kube, namespace, "lb", {"service": {"type": "ClusterIP"}})
    assert err.value.status == 422 and "externalTrafficPolicy needs type NodePort or LoadBalancer" in err.value.message

    patch_spec(kube, namespace, "lb", {"disruptionBudget": None, "service": None})
    poll(lambda: kube.get_or_none("policy/v1", "poddisruptionbudgets", namespace, "lb") is None, WAIT,
         what="the budget deleted with its option", log=operator.log)

    def plain():
        s = kube.get("v1", "services", namespace, "lb")
        return s if s["spec"]["type"] == "ClusterIP" else None
    svc = poll(plain, WAIT, what="the Service back to ClusterIP", log=operator.log)
    assert "nodePort" not in svc["spec"]["ports"][0] and "loadBalancerSourceRanges" not in svc["spec"]
    assert not (svc["metadata"].get("annotations") or {}).keys() & annotations.keys()
    assert "exposed" not in svc["metadata"]["labels"]
    assert any(e["reason"] == "Deleted" for e in events(kube, namespace, "lb"))


def test_a_budget_that_is_not_the_services_is_never_deleted(kube, namespace, operator):
    foreign = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
               "metadata": {"name": "keep", "namespace": namespace},
               "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "other"}}}}
    kube.create(foreign, "poddisruptionbudgets")
    create(kube, namespace, manifest("keep"))     # no disruptionBudget: the operator must leave "keep" alone
    poll(reconciled(kube, namespace, "keep"), WAIT, what="reconciled", log=operator.log)
    assert kube.get("policy/v1", "poddisruptionbudgets", namespace, "keep")["spec"]["maxUnavailable"] == 1
    patch_spec(kube, namespace, "keep", {"disruptionBudget": {"maxUnavailable": 2}})

    def conflict():
        obj = get_spd(kube, namespace, "keep")
        return obj if condition(obj, "Stalled").get("reason") == "NameConflict" else None
    obj = poll(conflict, WAIT, what="Stalled=True NameConflict", log=operator.log)
    assert "PodDisruptionBudget keep already exists" in condition(obj, "Stalled")["message"]
    assert kube.get("policy/v1", "poddisruptionbudgets", namespace, "keep")["spec"]["maxUnavailable"] == 1
