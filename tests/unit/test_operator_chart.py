"""The Helm chart: its plain files parse, its RBAC stays least-privilege, and, where a `helm` binary exists
(HELM or PATH), its templates render to the objects the chart promises."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "charts" / "semipd"


def rules() -> list[dict]:
    return (yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
            + yaml.safe_load((CHART / "files" / "rbac-podmonitors.yaml").read_text()))


def test_plain_files_parse():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "semipd" and chart["version"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["watchNamespaces"] == [] and values["rbac"]["create"] is True
    crd = yaml.safe_load((CHART / "crds" / "semipdservice.yaml").read_text())
    assert crd["kind"] == "CustomResourceDefinition"


def test_rbac_is_least_privilege():
    verbs = {}
    for rule in rules():
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in rule["verbs"] and group != "*" and resource != "*"
                verbs[(group, resource)] = set(rule["verbs"])
    assert verbs[("", "secrets")] == {"create"}                 # never read a Secret where it serves
    assert verbs[("semipd.io", "semipdservices/finalizers")] == {"update"}  # OwnerReferencesPermissionEnforcement
    # Garbage collection deletes children; the one exception is a budget whose option was removed.
    assert [k for k, v in verbs.items() if "delete" in v] == [("policy", "poddisruptionbudgets")]
    assert verbs[("semipd.io", "semipdservices/status")] == {"get", "patch"}
    assert verbs[("", "pods")] == {"get", "list", "watch", "patch"}
    assert verbs[("", "events")] == {"create"}
    assert not any("kopf" in group for group, _ in verbs)       # standalone: no peering objects


def helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found:
        pytest.skip("no helm binary (set HELM=/path/to/helm); the plain-file tests above still ran")
    return found


def render(*values: str) -> list[dict]:
    out = subprocess.run([helm(), "template", "rel", str(CHART), "--namespace", "ops", "--kube-version", "1.31.0", *values],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_templates_render_clusterwide():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service",
                     "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["command"] == ["semipd"] and c["args"][0] == "operator" and "--all-namespaces" in c["args"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["rules"] == rules()
    # The one Secret it may read, named, in its own namespace.
    key_role = next(d for d in docs if d["kind"] == "Role")
    assert key_role["metadata"]["namespace"] == "ops"
    assert [r for r in key_role["rules"] if "get" in r["verbs"]] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["rel-semipd-token-key"], "verbs": ["get"]}]
    assert "--token-key-secret=ops/rel-semipd-token-key" in c["args"]
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    assert "system:serviceaccount:ops:rel-semipd" in policy["spec"]["matchConditions"][0]["expression"]


def test_templates_render_namespaced_without_podmonitors():
    docs = render("--set", "operator.watchNamespaces={a,b}", "--set", "rbac.podMonitors=false",
                  "--set", "example.enabled=true")
    roles = [d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-token-key")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    assert all("monitoring.coreos.com" not in str(r["rules"]) for r in roles)
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args and "--all-namespaces" not in args
    example = next(d for d in docs if d["kind"] == "SemiPDService")
    assert example["spec"]["model"] == {"imagePath": "/models/tiny-llama"}
    assert example["spec"]["resources"]["gpus"] == 0 and example["spec"]["partition"]["backend"] == "cpu"
    assert example["metadata"]["labels"]["app.kubernetes.io/component"] == "example"


def test_probes_metrics_service_and_monitor():
    docs = render("--set", "metrics.serviceMonitor.enabled=true")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080}] and "--http=0.0.0.0:8080" in c["args"]
    assert (c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]) == (
        {"path": "/healthz", "port": "http"}, {"path": "/readyz", "port": "http"})
    assert not any(a.startswith("--peering") for a in c["args"])      # the default: standalone, one replica
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0] | {"interval": None} == {"port": "http", "path": "/metrics", "interval": None}
    assert all(monitor["spec"]["selector"]["matchLabels"][k] == v for k, v in svc["metadata"]["labels"].items()
               if k in monitor["spec"]["selector"]["matchLabels"])
    assert not any(d["kind"].endswith("KopfPeering") for d in docs)
    # the older value name still sets the port
    c = next(d for d in render("--set", "operator.livenessPort=9090", "--set", "operator.httpPort=null")
             if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"] == [{"name": "http", "containerPort": 9090}]


def test_ha_peers_with_its_rbac_and_peering_object():
    docs = render("--set", "operator.ha.enabled=true")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=semipd-operator" in args and "--peering-lifetime=60" in args
    (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert peering["apiVersion"] == "kopf.dev/v1" and peering["metadata"]["name"] == "semipd-operator"
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"]} in role["rules"]
    docs = render("--set", "operator.ha.enabled=true", "--set", "operator.watchNamespaces={a,b}")
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering") == ["a", "b"]
    roles = [d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-token-key")]
    assert all({"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
                "verbs": ["get", "list", "watch", "patch"]} in r["rules"] for r in roles) and len(roles) == 2
    # the peering CRDs ship with the chart, the same as crds/
    repo = CHART.parents[1]
    assert (CHART / "crds" / "kopfpeering.yaml").read_text() == (repo / "crds" / "kopfpeering.yaml").read_text()


def test_lint():
    subprocess.run([helm(), "lint", str(CHART), "--strict"], check=True, capture_output=True, text=True)
    subprocess.run([helm(), "lint", str(CHART), "--strict", "--set", "operator.watchNamespaces={a}",
                    "--set", "example.enabled=true"], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("bad, says", [
    (["--set", "operator.watchNamespace={a}"], "watchNamespace"),        # a typo is not silently ignored
    (["--set", "operator.logLevel=verbose"], "logLevel"),
    (["--set", "operator.statusInterval=0"], "statusInterval"),
    (["--set", "operator.watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
    (["--set", "rbac.admissionPolicy=maybe"], "admissionPolicy"),
])
def test_values_schema_refuses_what_would_render_a_broken_operator(bad, says):
    out = subprocess.run([helm(), "template", "rel", str(CHART), "--kube-version", "1.31.0", *bad],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr
    assert says in out.stderr
