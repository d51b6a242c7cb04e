"""The operator runs under exactly the objects the Helm chart renders (helm template: its ServiceAccount, roles,
bindings and admission policy) with a real ServiceAccount token: that is enough for everything it does, and,
checked by the API server's own authorizer and admission, it can neither read a Secret nor change a Pod,
Deployment or Service that is not its own."""
import pytest

import cluster_harness
import helm_chart
from semipd.operator import crd, names
from semipd.operator.kube import ApiError, Kube
from semipd.operator.testing import FakeKubelet, OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90


@pytest.fixture
def apps_namespace(control_plane):
    """Where the SemiPDService lives; the `namespace` fixture is the operator's own (its release namespace)."""
    yield from cluster_harness.fresh_namespace(control_plane)


def bystanders(admin: Kube, namespace: str) -> None:
    """Objects someone else made, in the namespace the operator serves."""
    meta = {"name": "bystander", "namespace": namespace}
    admin.create({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"password": "aHVudGVyMg=="}},
                 "secrets")
    admin.create({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                  "spec": {"containers": [{"name": "c", "image": "registry.invalid/app:1"}]}}, "pods")
    admin.create({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                  "spec": {"ports": [{"port": 80}], "selector": {"app": "bystander"}}}, "services")


@pytest.mark.parametrize("scope", ["Role in one namespace", "ClusterRole, every namespace"])
def test_operator_works_under_the_charts_rbac(control_plane, namespace, apps_namespace, tmp_path, scope):
    control_plane.require_controllers()
    admin = Kube(control_plane.api_client())
    crd.install(admin)
    apps = apps_namespace
    clusterwide = scope.startswith("ClusterRole")
    release = helm_chart.install(admin, namespace, *([] if clusterwide else
                                                     ["--set", f"operator.watchNamespaces={{{apps}}}"]))
    op = None
    try:
        # Not a sleep: until the authorizer itself grants every rule, a freshly started operator may meet a 403.
        release.wait_until_granted(admin)
        token = release.token(admin)
        kubeconfig = helm_chart.sa_kubeconfig(control_plane.kubeconfig, token, tmp_path / "sa.kubeconfig")
        args = release.operator_args()
        assert f"--token-key-secret={release.token_key_secret}" in args
        op = OperatorProcess(kubeconfig, [] if clusterwide else [apps], tmp_path / "operator.log",
                             token_key_secret=release.token_key_secret).start(timeout=WAIT)
        spd = admin.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                            "metadata": {"name": "rbac", "namespace": apps},
                            "spec": {"model": {"hostPath": "/srv/models/tiny"}, "replicas": 2,
                                     "disruptionBudget": {"maxUnavailable": 1},
                                     "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port()}}},
                           names.PLURAL)

        def reconciled():
            obj = admin.get(names.API_VERSION, names.PLURAL, apps, "rbac")
            return obj if (obj.get("status") or {}).get("observedGeneration") == 1 else None
        poll(reconciled, WAIT, what="reconciled under the chart's RBAC", log=op.log)
        for api_version, plural, name in (("apps/v1", "deployments", "rbac"), ("v1", "services", "rbac"),
                                          ("v1", "secrets", "rbac-admin-token"),
                                          ("policy/v1", "poddisruptionbudgets", "rbac")):
            assert admin.get(api_version, plural, apps, name)["metadata"]["ownerReferences"][0]["uid"] == \
                spd["metadata"]["uid"]
        # The operator made its key in its own namespace (the one Secret it reads).
        key_ns, key_name = release.token_key_secret.split("/")
        assert admin.get("v1", "secrets", key_ns, key_name)["data"]["key"]

        pods = poll(lambda: (p := admin.list("v1", "pods", apps, "semipd.io/service=rbac")) and len(p) == 2
                    and all((x["metadata"].get("annotations") or {}).get(names.SPLIT_ANNOTATION) for x in p) and p,
                    WAIT, what="pods annotated (pods: patch, allowed by the policy on its own pods)", log=op.log)
        for p in pods:
            FakeKubelet(admin).report_ready(apps, p["metadata"]["name"])
        poll(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                         admin.get(names.API_VERSION, names.PLURAL, apps, "rbac")["status"]["conditions"]),
             WAIT, what="Ready=True (pod watch and status patch allowed)", log=op.log)
        # Pushes need the admin token, derived from the key without reading the service's Secret.
        poll(lambda: all(e.get("lastError") for e in
                         admin.get(names.API_VERSION, names.PLURAL, apps, "rbac")["status"]["pods"]),
             WAIT, what="push outcomes recorded", log=op.log)

        # Watches work: a deleted Service comes back.
        old = admin.get("v1", "services", apps, "rbac")
        admin.delete("v1", "services", apps, "rbac")
        poll(lambda: (s := admin.get_or_none("v1", "services", apps, "rbac")) and
             s["metadata"]["uid"] != old["metadata"]["uid"], WAIT, what="Service re-created", log=op.log)
        events = [e for e in admin.list("v1", "events", apps) if e["reason"] == "Created"]
        assert events and all(e["involvedObject"]["name"] == "rbac" for e in events)
        # Only this test's namespaces: a cluster-wide operator also meets other tests' leftovers, whose namespaces
        # may be terminating (where the API server refuses new objects with a 403).
        ours = [line for line in op.log().splitlines() if any(
            f"/namespaces/{ns}/" in line or f"{ns}/rbac" in line for ns in (apps, namespace))]
        assert not [line for line in ours if 'HTTP/1.1" 403' in line or "Forbidden" in line]

        # ... and nothing more than that.
        as_operator = Kube(control_plane.api_client(token=token))
        bystanders(admin, apps)
        bystanders(admin, namespace)
        sa = release.service_account
        for ns in (apps, namespace, "kube-system"):
            for verb in ("get", "list", "watch", "update", "patch", "delete"):
                assert not helm_chart.can(admin, sa, verb, "secrets", ns), (verb, ns)
        assert helm_chart.can(admin, sa, "get", "secrets", key_ns, name=key_name)
        for method, url in (
                ("GET", f"/api/v1/namespaces/{apps}/secrets/bystander"),
                ("GET", f"/api/v1/namespaces/{apps}/secrets/rbac-admin-token"),    # even the one it made
                ("GET", f"/api/v1/namespaces/{namespace}/secrets/bystander"),      # nor others next to its key
                ("GET", f"/api/v1/namespaces/{apps}/secrets"),
                ("GET", "/api/v1/secrets"),
                ("DELETE", f"/apis/apps/v1/namespaces/{apps}/deployments/rbac"),
                ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")):
            with pytest.raises(ApiError) as err:
                as_operator.request(method, url)
            assert err.value.status == 403, (method, url)

        # Pods, Services (and Deployments) RBAC must let it patch; the chart's admission policy lets it change
        # only its own. Polled: the API server loads a new policy asynchronously, like RBAC.
        def refused(plural):
            try:
                as_operator.merge_patch("v1", plural, apps, "bystander",
                                        {"metadata": {"annotations": {names.SPLIT_ANNOTATION: "prefill=0.9"}}})
            except ApiError as e:
                return e.status == 403 and "only objects it manages" in e.message and e.message
            return False
        for plural in ("pods", "services"):
            poll(lambda: refused(plural), WAIT, what=f"the policy refusing a patch of someone else's {plural}")
        own = pods[0]["metadata"]["name"]
        as_operator.merge_patch("v1", "pods", apps, own, {"metadata": {"annotations": {"probe": "allowed"}}})
        assert admin.get("v1", "pods", apps, own)["metadata"]["annotations"]["probe"] == "allowed"

        # PodDisruptionBudgets are the one kind it deletes (when spec.disruptionBudget goes): only its own.
        admin.create({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                      "metadata": {"name": "bystander", "namespace": apps},
                      "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "bystander"}}}},
                     "poddisruptionbudgets")

        def delete_refused():
            try:
                as_operator.delete("policy/v1", "poddisruptionbudgets", apps, "bystander")
            except ApiError as e:
                return e.status == 403 and "only objects it manages" in e.message
            raise AssertionError("the operator deleted someone else's PodDisruptionBudget")
        poll(delete_refused, WAIT, what="the policy refusing to delete someone else's budget")
        admin.merge_patch(names.API_VERSION, names.PLURAL, apps, "rbac", {"spec": {"disruptionBudget": None}})
        poll(lambda: admin.get_or_none("policy/v1", "poddisruptionbudgets", apps, "rbac") is None, WAIT,
             what="its own budget deleted under the chart's RBAC and policy", log=op.log)
    finally:
        if op is not None:
            op.stop()
        for ns in (apps, namespace):
            for item in admin.list(names.API_VERSION, names.PLURAL, ns):
                admin.merge_patch(names.API_VERSION, names.PLURAL, ns, item["metadata"]["name"],
                                  {"metadata": {"finalizers": None}})
        release.uninstall(admin)


def test_without_rights_the_operator_stops_at_start_saying_why(control_plane, namespace, tmp_path):
    """A ServiceAccount with no role: the start-up check fails loudly instead of serving nothing."""
    admin = Kube(control_plane.api_client())
    crd.install(admin)
    admin.create({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "nobody", "namespace": namespace}}, "serviceaccounts")
    token = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/nobody/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 600}})["status"]["token"]
    kubeconfig = helm_chart.sa_kubeconfig(control_plane.kubeconfig, token, tmp_path / "nobody.kubeconfig")
    op = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start(wait=False)
    try:
        code = op.proc.wait(timeout=WAIT)
    finally:
        op.stop()
    assert code == 1 and "Traceback" not in op.log().split("Activity 'check-crd' failed permanently")[-1]
    assert f"cannot list semipdservices.semipd.io in {namespace}" in op.log()
    assert "RBAC" in op.log()


def test_helm_install_into_the_cluster_and_its_notes(control_plane, namespace):
    """A real `helm install` (the chart's own CRD handling, hooks and ordering) into the real API server; the
    operator pod stays Pending (no kubelet), everything else is made. NOTES.txt tells the user what to do next."""
    import subprocess
    admin = Kube(control_plane.api_client())
    release = f"n{namespace[-6:]}"
    helm = [helm_chart.helm_binary(), "--kubeconfig", control_plane.kubeconfig, "--namespace", namespace]
    out = subprocess.run([*helm, "install", release, str(helm_chart.CHART), "--set",
                          f"operator.watchNamespaces={{{namespace}}}", "--wait=false"],
                         capture_output=True, text=True, env=control_plane.env())
    try:
        assert out.returncode == 0, out.stderr
        notes = out.stdout.split("NOTES:", 1)[1]
        assert f"rollout status deployment/{release}-semipd" in notes and f"namespace: {namespace}" in notes
        assert f"{release}-semipd-token-key" in notes and "argocd-health.lua" in notes and "--server-side" in notes
        dep = admin.get("apps/v1", "deployments", namespace, f"{release}-semipd")
        assert f"--token-key-secret={namespace}/{release}-semipd-token-key" in \
            dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert admin.get("admissionregistration.k8s.io/v1", "validatingadmissionpolicies", None,
                         f"{release}-semipd-own-objects-only")
    finally:
        subprocess.run([*helm, "uninstall", release], capture_output=True, text=True, env=control_plane.env())
