"""The operator under the Helm chart's RBAC on a control plane as strict as OpenShift's: kube-apiserver with
OwnerReferencesPermissionEnforcement on top of the default admission plugins. That plugin lets a request set
blockOwnerDeletion on an owner reference (kopf does, on every child) only if the requester may update the
owner's `finalizers` subresource. This module starts its own control plane (the only other one of the run)."""
import uuid

import pytest

import cluster_harness
import helm_chart
from semipd.operator import crd, names
from semipd.operator.kube import ApiError, Kube
from semipd.operator.testing import OperatorProcess, free_port, poll

pytestmark = pytest.mark.cluster

WAIT = 90
PLUGIN = "OwnerReferencesPermissionEnforcement"


@pytest.fixture(scope="module")
def strict_control_plane(request, tmp_path_factory):
    yield from cluster_harness.run_control_plane(request, tmp_path_factory, admission_plugins=(PLUGIN,))


@pytest.fixture
def strict_namespace(strict_control_plane):
    yield from cluster_harness.fresh_namespace(strict_control_plane)


def test_the_plugin_refuses_blocking_owner_references_without_finalizers_rights(strict_control_plane,
                                                                                strict_namespace):
    """The control: the plugin is really on, and it is the `semipdservices/finalizers` rule that makes the
    difference. Every chart rule but that one, and a child with blockOwnerDeletion is refused."""
    admin = Kube(strict_control_plane.api_client())
    crd.install(admin)
    ns = strict_namespace
    owner = admin.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                          "metadata": {"name": "owner", "namespace": ns},
                          "spec": {"model": {"hostPath": "/m"}, "engine": {"image": "registry.invalid/x:1"}}},
                         names.PLURAL)
    rules = [r for r in helm_chart.chart_rules() if r["resources"] != ["semipdservices/finalizers"]]
    rules.append({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]})
    user = "without-finalizers"
    admin.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": user, "namespace": ns}},
                 "serviceaccounts")
    rbac = "rbac.authorization.k8s.io/v1"
    admin.create({"apiVersion": rbac, "kind": "Role", "metadata": {"name": user, "namespace": ns}, "rules": rules},
                 "roles")
    admin.create({"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": user, "namespace": ns},
                  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
                  "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}]}, "rolebindings")
    helm_chart.wait_until_granted(admin, f"system:serviceaccount:{ns}:{user}", rules, ns)
    token = admin.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{user}/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 600}})["status"]["token"]
    as_user = Kube(strict_control_plane.api_client(token=token))

    def child(block: bool) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": f"child-{uuid.uuid4().hex[:6]}", "namespace": ns, "ownerReferences": [{
                    "apiVersion": names.API_VERSION, "kind": names.KIND, "name": "owner",
                    "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": block}]}}
    as_user.create(child(block=False), "configmaps")   # an owner reference alone needs nothing more
    with pytest.raises(ApiError) as err:
        as_user.create(child(block=True), "configmaps")
    assert err.value.status == 403 and "blockOwnerDeletion" in err.value.message


def test_the_charts_rbac_suffices_under_owner_references_enforcement(strict_control_plane, strict_namespace,
                                                                     tmp_path):
    admin = Kube(strict_control_plane.api_client())
    crd.install(admin)
    ns = strict_namespace
    release = helm_chart.install(admin, ns, "--set", f"operator.watchNamespaces={{{ns}}}")
    op = None
    try:
        release.wait_until_granted(admin)
        kubeconfig = helm_chart.sa_kubeconfig(strict_control_plane.kubeconfig, release.token(admin),
                                              tmp_path / "sa.kubeconfig")
        op = OperatorProcess(kubeconfig, [ns], tmp_path / "operator.log",
                             token_key_secret=release.token_key_secret).start(timeout=WAIT)
        spd = admin.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                            "metadata": {"name": "strict", "namespace": ns},
                            "spec": {"model": {"hostPath": "/srv/models/tiny"},
                                     "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port()}}},
                           names.PLURAL)
        poll(lambda: (admin.get(names.API_VERSION, names.PLURAL, ns, "strict").get("status") or {}).get(
            "observedGeneration") == 1, WAIT, what="reconciled with every child created", log=op.log)
        for api_version, plural, name in (("apps/v1", "deployments", "strict"), ("v1", "services", "strict"),
                                          ("v1", "secrets", "strict-admin-token")):
            (ref,) = admin.get(api_version, plural, ns, name)["metadata"]["ownerReferences"]
            assert ref["uid"] == spd["metadata"]["uid"] and ref["blockOwnerDeletion"] is True, plural
        # The controllers' own bootstrap roles hold under the plugin too: the ReplicaSet's pods exist.
        poll(lambda: admin.list("v1", "pods", ns, names.selector_string("strict")), WAIT, what="the pod created")
        assert "blockOwnerDeletion" not in op.log()
    finally:
        if op is not None:
            op.stop()
        for item in admin.list(names.API_VERSION, names.PLURAL, ns):
            admin.merge_patch(names.API_VERSION, names.PLURAL, ns, item["metadata"]["name"],
                              {"metadata": {"finalizers": None}})
        release.uninstall(admin)
