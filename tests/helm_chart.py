"""The Helm chart (charts/semipd) rendered by a real `helm template` and applied to a test control plane, so the
cluster tests run the operator under exactly the objects the chart makes: its ServiceAccount, its (Cluster)Role
and bindings, the token-key Role and the admission policy. Only the operator's own Deployment is left out: the
operator runs as a local process (there is no kubelet), with a token of the chart's ServiceAccount.

helm comes from $HELM or the PATH (`.ci/run` sets HELM to `.ci/build-helm.sh | tail -n1`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from semipd.operator.kube import ApiError, Kube

CHART = Path(__file__).resolve().parents[1] / "charts" / "semipd"
PLURALS = {"ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles", "ClusterRoleBinding":
           "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings", "Deployment": "deployments", "Service": "services",
           "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
           "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings"}


def chart_rules() -> list[dict]:
    """The rules the chart grants in every namespace it serves (files/rbac-*.yaml, before templating)."""
    return (yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
            + yaml.safe_load((CHART / "files" / "rbac-podmonitors.yaml").read_text()))


def helm_binary() -> str:
    import cluster_harness
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found:
        cluster_harness.unavailable("no helm binary: set HELM=$(.ci/build-helm.sh | tail -n1)")
    return found


def render(release: str, namespace: str, *values: str, kube_version: str = "1.37.0") -> list[dict]:
    out = subprocess.run([helm_binary(), "template", release, str(CHART), "--namespace", namespace,
                          "--kube-version", kube_version, *values],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@dataclass
class Release:
    name: str
    namespace: str
    objects: list[dict]
    applied: list[dict] = field(default_factory=list)

    @property
    def fullname(self) -> str:
        return f"{self.name}-semipd"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def token_key_secret(self) -> str:
        return f"{self.namespace}/{self.fullname}-token-key"

    def operator_args(self) -> list[str]:
        """The operator's arguments as the chart's Deployment gives them."""
        (dep,) = [o for o in self.objects if o["kind"] == "Deployment"]
        return dep["spec"]["template"]["spec"]["containers"][0]["args"]

    def token(self, admin: Kube, seconds: int = 3600) -> str:
        return admin.request("POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.fullname}/token",
                             body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                   "spec": {"expirationSeconds": seconds}})["status"]["token"]

    def rules(self) -> list[tuple[str | None, list[dict]]]:
        """(namespace or None for cluster-wide, rules) of every Role and ClusterRole the chart rendered."""
        return [(o["metadata"].get("namespace") if o["kind"] == "Role" else None, o["rules"])
                for o in self.objects if o["kind"] in ("Role", "ClusterRole")]

    def wait_until_granted(self, admin: Kube, timeout: float = 60.0) -> None:
        for namespace, rules in self.rules():
            wait_until_granted(admin, self.service_account, rules, namespace, timeout)

    def uninstall(self, admin: Kube) -> None:
        """Cluster-scoped objects go; namespaced ones go with the test's namespace."""
        for obj in reversed(self.applied):
            if not obj["metadata"].get("namespace"):
                try:
                    admin.delete(obj["apiVersion"], PLURALS[obj["kind"]], None, obj["metadata"]["name"])
                except ApiError as e:
                    if not e.not_found:
                        raise


def install(admin: Kube, namespace: str, *values: str, with_deployment: bool = False) -> Release:
    """`helm template` the chart into `namespace` under a fresh release name and apply what it renders."""
    name = f"r{uuid.uuid4().hex[:6]}"
    release = Release(name, namespace, render(name, namespace, *values))
    for obj in release.objects:
        if obj["kind"] == "Deployment" and not with_deployment:
            continue
        admin.apply(obj, PLURALS[obj["kind"]])
        release.applied.append(obj)
    return release


def can(admin: Kube, user: str, verb: str, resource: str, namespace: str | None = None, group: str = "",
        subresource: str = "", name: str = "") -> bool:
    """`kubectl auth can-i --as USER`: a SubjectAccessReview, answered by the API server's own authorizer."""
    attrs = {"verb": verb, "resource": resource, "group": group, "subresource": subresource, "name": name}
    if namespace:
        attrs["namespace"] = namespace
    groups = ["system:serviceaccounts", "system:authenticated"]
    if user.startswith("system:serviceaccount:"):
        groups.append("system:serviceaccounts:" + user.split(":")[2])
    review = admin.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body={
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": attrs}})
    return bool(review["status"].get("allowed"))


def wait_until_granted(admin: Kube, user: str, rules: list[dict], namespace: str | None,
                       timeout: float = 60.0) -> None:
    """RBAC is enforced from the API server's informer cache, so a binding just created may not count yet; a
    process started now could meet a 403 (the flake of test_operator_works_under_the_charts_rbac). Wait until
    the authorizer grants every verb of every rule, as checked by that same authorizer."""
    checks = [(verb, group, *resource.partition("/")[::2], name)
              for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]
              for verb in rule["verbs"] for name in rule.get("resourceNames") or [""]]
    deadline = time.monotonic() + timeout
    while True:
        missing = [c for c in checks if not can(admin, user, c[0], c[2], namespace, c[1], c[3], c[4])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"RBAC still denies {user} after {timeout:g} s: {missing}")
        time.sleep(0.2)


def sa_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> str:
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    path.chmod(0o600)
    return str(path)
