"""The operator and the real engine, end to end: the pod's engine container runs as a local process (LocalPod,
standing in for the kubelet this control plane lacks) with exactly the arguments the operator built, and the
operator moves its SM split in place, through the annotation file and PUT /admin/partition."""
import base64

import httpx
import pytest

from semipd.operator import names
from semipd.operator.kube import Kube
from semipd.operator.testing import FakeKubelet, LocalPod, OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from semipd.runtime.tiny_model import write_tiny_model
    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


def test_operator_moves_a_real_engines_split_in_place(control_plane, namespace, tmp_path, tiny_model):
    control_plane.require_controllers()
    kube = Kube(control_plane.api_client())
    from semipd.operator import crd
    crd.install(kube)
    op = OperatorProcess(control_plane.kubeconfig, [namespace], tmp_path / "operator.log").start(timeout=WAIT)
    local = None
    try:
        kube.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                     "metadata": {"name": "tiny", "namespace": namespace},
                     "spec": {"model": {"hostPath": tiny_model}, "replicas": 1, "resources": {"gpus": 0},
                              "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port(),
                                         "args": ["--device", "cpu", "--kv-cache-memory", "0.05"]},
                              "partition": {"initial": 0.5, "backend": "cpu"}}}, names.PLURAL)

        def annotated_pod():
            pods = kube.list("v1", "pods", namespace, names.selector_string("tiny"))
            return pods[0] if len(pods) == 1 and (pods[0]["metadata"].get("annotations") or {}).get(
                names.SPLIT_ANNOTATION) == "prefill=0.5" else None
        pod = poll(annotated_pod, WAIT, what="the pod, annotated", log=op.log)
        local = LocalPod(kube, pod, tmp_path / "pod").start()
        FakeKubelet(kube).report_ready(namespace, pod["metadata"]["name"])

        def entry(applied):
            def check():
                st = kube.get(names.API_VERSION, names.PLURAL, namespace, "tiny").get("status") or {}
                pods = st.get("pods") or []
                return pods[0] if len(pods) == 1 and pods[0].get("applied") == applied else None
            return check
        first = poll(entry("prefill=0.5"), WAIT, what="the engine acknowledging prefill=0.5", log=op.log)
        assert "lastError" not in first

        token = base64.b64decode(kube.get("v1", "secrets", namespace, "tiny-admin-token")["data"]["token"]).decode()
        admin = f"http://127.0.0.1:{local.port}/admin/partition"
        assert httpx.get(admin, timeout=5).status_code == 401  # the engine does enforce the token
        engine = httpx.get(admin, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert engine["prefill_sms"] == first["appliedSMs"] and engine["backend"] == "cpu"
        assert abs(engine["prefill_fraction"] - 0.5) <= engine["granularity"] / engine["total_sms"]

        generation = kube.get("apps/v1", "deployments", namespace, "tiny")["metadata"]["generation"]
        kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, "tiny", {"spec": {"partition": {"initial": 0.25}}})
        moved = poll(entry("prefill=0.25"), WAIT, what="the engine acknowledging prefill=0.25", log=op.log)
        engine = httpx.get(admin, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert engine["prefill_sms"] == moved["appliedSMs"] < first["appliedSMs"]
        assert abs(engine["prefill_fraction"] - 0.25) <= engine["granularity"] / engine["total_sms"]
        # The same process served throughout, and the Deployment was not touched.
        assert local.proc.poll() is None
        assert kube.get("apps/v1", "deployments", namespace, "tiny")["metadata"]["generation"] == generation
        pods = kube.list("v1", "pods", namespace, names.selector_string("tiny"))
        assert [p["metadata"]["uid"] for p in pods] == [pod["metadata"]["uid"]]
        # The engine also follows the downward-API file (the path that works without any push).
        poll(lambda: "prefill=0.25" in (tmp_path / "pod" / "volumes" / "podinfo" / "sm-partition").read_text(),
             WAIT, what="the projected annotation file")
        assert token not in op.log()
    finally:
        if local is not None:
            local.stop()
        op.stop()
        for item in kube.list(names.API_VERSION, names.PLURAL, namespace):
            kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                             {"metadata": {"finalizers": None}})
