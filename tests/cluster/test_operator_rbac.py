"""The operator runs under exactly the Helm chart's RBAC rules (charts/semipd/files/*.yaml) with a real
ServiceAccount token: least privilege is enough for everything it does, and nothing more is granted."""
import uuid
from pathlib import Path

import pytest
import yaml

from semipd.operator import crd, names
from semipd.operator.kube import ApiError, Kube
from semipd.operator.testing import FakeKubelet, OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90
CHART = Path(__file__).resolve().parents[2] / "charts" / "semipd"
RBAC = "rbac.authorization.k8s.io/v1"


def chart_rules() -> list[dict]:
    return (yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
            + yaml.safe_load((CHART / "files" / "rbac-podmonitors.yaml").read_text()))


def service_account_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> str:
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("scope", ["Role in one namespace", "ClusterRole, every namespace"])
def test_operator_works_under_the_charts_rbac(control_plane, namespace, tmp_path, scope):
    control_plane.require_controllers()
    admin = Kube(control_plane.api_client())
    crd.install(admin)
    clusterwide = scope.startswith("ClusterRole")
    role_name = f"semipd-operator-{uuid.uuid4().hex[:6]}"
    admin.create({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "semipd-operator", "namespace": namespace}}, "serviceaccounts")
    subject = {"kind": "ServiceAccount", "name": "semipd-operator", "namespace": namespace}
    if clusterwide:
        role = {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": role_name}, "rules": chart_rules()}
        binding = {"apiVersion": RBAC, "kind": "ClusterRoleBinding", "metadata": {"name": role_name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
                   "subjects": [subject]}
        admin.create(role, "clusterroles")
        admin.create(binding, "clusterrolebindings")
    else:
        meta = {"name": role_name, "namespace": namespace}
        admin.create({"apiVersion": RBAC, "kind": "Role", "metadata": meta, "rules": chart_rules()}, "roles")
        admin.create({"apiVersion": RBAC, "kind": "RoleBinding", "metadata": meta,
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
                      "subjects": [subject]}, "rolebindings")
    token = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/semipd-operator/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 3600}})["status"]["token"]
    as_operator = Kube(control_plane.api_client(token=token))
    kubeconfig = service_account_kubeconfig(control_plane.kubeconfig, token, tmp_path / "sa.kubeconfig")

    op = OperatorProcess(kubeconfig, [] if clusterwide else [namespace], tmp_path / "operator.log")
    try:
        op.start(timeout=WAIT)
        spd = admin.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                            "metadata": {"name": "rbac", "namespace": namespace},
                            "spec": {"model": {"hostPath": "/srv/models/tiny"}, "replicas": 2,
                                     "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port()}}},
                           names.PLURAL)

        def reconciled():
            obj = admin.get(names.API_VERSION, names.PLURAL, namespace, "rbac")
            return obj if (obj.get("status") or {}).get("observedGeneration") == 1 else None
        poll(reconciled, WAIT, what="reconciled under the chart's RBAC", log=op.log)
        for api_version, plural, name in (("apps/v1", "deployments", "rbac"), ("v1", "services", "rbac"),
                                          ("v1", "secrets", "rbac-admin-token")):
            assert admin.get(api_version, plural, namespace, name)["metadata"]["ownerReferences"][0]["uid"] == \
                spd["metadata"]["uid"]

        pods = poll(lambda: (p := admin.list("v1", "pods", namespace, "semipd.io/service=rbac")) and len(p) == 2
                    and all((x["metadata"].get("annotations") or {}).get(names.SPLIT_ANNOTATION) for x in p) and p,
                    WAIT, what="pods annotated (pods: patch)", log=op.log)
        for p in pods:
            FakeKubelet(admin).report_ready(namespace, p["metadata"]["name"])
        poll(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                         admin.get(names.API_VERSION, names.PLURAL, namespace, "rbac")["status"]["conditions"]),
             WAIT, what="Ready=True (pod watch and status patch allowed)", log=op.log)
        # The push needs the admin token (secrets: get) and records its outcome per pod.
        poll(lambda: all(e.get("lastError") for e in
                         admin.get(names.API_VERSION, names.PLURAL, namespace, "rbac")["status"]["pods"]),
             WAIT, what="push outcomes recorded", log=op.log)

        # Watches work: a deleted Service comes back.
        old = admin.get("v1", "services", namespace, "rbac")
        admin.delete("v1", "services", namespace, "rbac")
        poll(lambda: (s := admin.get_or_none("v1", "services", namespace, "rbac")) and
             s["metadata"]["uid"] != old["metadata"]["uid"], WAIT, what="Service re-created", log=op.log)
        events = [e for e in admin.list("v1", "events", namespace) if e["reason"] == "Created"]
        assert events and all(e["involvedObject"]["name"] == "rbac" for e in events)
        # Only this test's namespace: a cluster-wide operator also meets other tests' leftovers, whose namespaces
        # may be terminating (where the API server refuses new objects with a 403).
        ours = [line for line in op.log().splitlines() if f"/namespaces/{namespace}/" in line or
                f"{namespace}/rbac" in line]
        assert not [line for line in ours if 'HTTP/1.1" 403' in line or "Forbidden" in line]

        # ... and nothing more is granted than the chart says.
        for method, url in (("GET", f"/api/v1/namespaces/{namespace}/secrets"),
                            ("DELETE", f"/apis/apps/v1/namespaces/{namespace}/deployments/rbac"),
                            ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")):
            with pytest.raises(ApiError) as err:
                as_operator.request(method, url)
            assert err.value.status == 403, (method, url)
    finally:
        op.stop()
        for item in admin.list(names.API_VERSION, names.PLURAL, namespace):
            admin.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                              {"metadata": {"finalizers": None}})
        if clusterwide:
            admin.delete(RBAC, "clusterrolebindings", None, role_name)
            admin.delete(RBAC, "clusterroles", None, role_name)


def test_without_rights_the_operator_stops_at_start_saying_why(control_plane, namespace, tmp_path):
    """A ServiceAccount with no role: the start-up check fails loudly instead of serving nothing."""
    admin = Kube(control_plane.api_client())
    crd.install(admin)
    admin.create({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "nobody", "namespace": namespace}}, "serviceaccounts")
    token = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/nobody/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 600}})["status"]["token"]
    kubeconfig = service_account_kubeconfig(control_plane.kubeconfig, token, tmp_path / "nobody.kubeconfig")
    op = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start(wait=False)
    try:
        code = op.proc.wait(timeout=WAIT)
    finally:
        op.stop()
    assert code == 1 and "Traceback" not in op.log().split("Activity 'check-crd' failed permanently")[-1]
    assert f"cannot list semipdservices.semipd.io in {namespace}" in op.log()
    assert "RBAC" in op.log()
