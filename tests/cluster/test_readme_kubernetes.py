"""README's Kubernetes section run with the real kubectl and helm against the real API server, as a user pastes
it: the CRD applied server-side, `helm install`, the SemiPDService heredoc, `kubectl get spd`, the everyday
commands (get -o wide, describe, explain, patch, and scale refused while the operator owns the count), the CRD
upgrade and `helm upgrade`, and `semipd operator` run outside the cluster until it reconciles the service.
e2e/'s manifests (its Prometheus and its SemiPDService) are applied here too, since e2e/run.sh itself needs Docker.

The only edits: the namespaces (`default` -> the test's namespace, through the kubeconfig's context and the
heredoc; `semipd-system` -> a namespace of the test's) and the operator's port (a free one). There is no kubelet,
so pods never run: the port-forward is e2e/'s to show."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helm_chart  # noqa: E402
from cluster_harness import unavailable  # noqa: E402
from doc_snippets import REPO, blocks, heredocs, shell_commands  # noqa: E402
from semipd.operator import crd, names  # noqa: E402
from semipd.operator.kube import Kube  # noqa: E402
from semipd.operator.testing import free_port, poll  # noqa: E402

pytestmark = pytest.mark.cluster

WAIT = 90


def kubectl_binary() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        unavailable("no kubectl: put one on PATH or set KUBECTL (.ci/build-kubectl.sh builds one from Go modules)")
    return found


class Shell:
    """Runs README's lines with kubectl and helm on PATH, a kubeconfig whose context namespace is the test's, and
    the test's namespaces in place of `default` and `semipd-system`."""

    def __init__(self, control_plane, namespace: str, tmp_path: Path):
        self.namespace, self.system = namespace, f"{namespace}-op"
        config = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
        for context in config["contexts"]:
            context["context"]["namespace"] = namespace
        self.kubeconfig = tmp_path / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(config))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, binary in (("kubectl", kubectl_binary()), ("helm", helm_chart.helm_binary())):
            (bin_dir / name).symlink_to(binary)
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def localize(self, text: str) -> str:
        return text.replace("namespace: default", f"namespace: {self.namespace}").replace("semipd-system", self.system)

    def run(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", self.localize(script)], cwd=REPO,
                                capture_output=True, text=True, timeout=300, env=self.env)
        if check:
            assert result.returncode == 0, f"{script}\n--- exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result


def kubernetes_blocks() -> list[str]:
    """The shell blocks of README's Kubernetes section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Kubernetes\n")
    end = text.index("\n## ", start + 1)
    first_line = text[:start].count("\n") + 1
    last_line = text[:end].count("\n") + 1
    return [b.text for b in blocks("README.md", {"bash"}) if first_line <= b.line <= last_line]


@pytest.fixture
def shell(control_plane, namespace, tmp_path):
    control_plane.require_controllers()
    sh = Shell(control_plane, namespace, tmp_path)
    crd.install(Kube(control_plane.api_client()))
    yield sh
    kube = Kube(control_plane.api_client())
    for item in kube.list(names.API_VERSION, names.PLURAL, namespace):   # no operator is left to remove it
        kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                         {"metadata": {"finalizers": None}})
    sh.run(f"helm uninstall semipd -n {sh.system} --wait=false || true; "
           f"kubectl delete namespace {sh.system} --wait=false --ignore-not-found", check=False)


def test_readme_kubernetes_section_as_written(shell, control_plane, tmp_path):
    install, port_forward, everyday, upgrade, operator = kubernetes_blocks()
    assert "helm install" in install and "port-forward" in port_forward and "helm upgrade" in upgrade

    out = shell.run(install).stdout
    assert "semipdservice.semipd.io/qwen3 created" in out
    assert re.search(r"^NAME\s+READY\s+REPLICAS\s+SPLIT\s+TTFT\s+TPOT\s+AGE$", out, re.M), out
    assert re.search(r"^qwen3\s", out, re.M)
    [manifest] = heredocs(install)
    assert yaml.safe_load(manifest)["kind"] == "SemiPDService"

    for command in shell_commands(everyday):
        result = shell.run(command, check=False)
        if command.startswith("kubectl scale"):
            # README: refused while `autoscaling` is set, with a message naming the owner
            assert result.returncode != 0 and "autoscaling" in result.stderr, result.stderr
        else:
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if command.startswith("kubectl explain"):
                assert "FIELDS" in result.stdout and "initial" in result.stdout
            if command.startswith("kubectl patch"):
                assert "qwen3 patched" in result.stdout

    shell.run(upgrade)

    [command] = shell_commands(operator)
    port = free_port()
    argv = shlex.split(command.replace("--namespace default", f"--namespace {shell.namespace}")
                       .replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
    assert argv[:2] == ["semipd", "operator"]
    log = open(tmp_path / "operator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "semipd.runtime.cli", *argv[1:]], cwd=REPO, env=shell.env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: _ok(f"http://127.0.0.1:{port}/readyz"), WAIT, what="the operator's /readyz")
        kube = Kube(control_plane.api_client())
        poll(lambda: kube.get("apps/v1", "deployments", shell.namespace, "qwen3"), WAIT,
             what="the Deployment of the README's SemiPDService")
        spd = kube.get(names.API_VERSION, names.PLURAL, shell.namespace, "qwen3")
        assert spd["spec"]["partition"]["min"] == 0.3        # README's patch, kept through the upgrade
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_e2e_manifests_are_accepted(shell, tmp_path):
    """e2e/prometheus.yaml and e2e/example.yaml through `kubectl apply` (the API server validates every field;
    kubectl's default field validation is strict), with `default` and `monitoring` made the test's namespaces."""
    copies = []
    for name in ("prometheus.yaml", "example.yaml"):
        text = shell.localize((REPO / "e2e" / name).read_text())
        text = re.sub(r"\bmonitoring\b", f"{shell.system}", text)
        copies.append(tmp_path / name)
        copies[-1].write_text(text)
    out = shell.run(f"kubectl apply -f {copies[0]}").stdout
    for made in ("namespace/", "serviceaccount/prometheus", "role.rbac.authorization.k8s.io/prometheus-pod-discovery",
                 "rolebinding.rbac.authorization.k8s.io/prometheus-pod-discovery", "configmap/prometheus",
                 "deployment.apps/prometheus", "service/prometheus"):
        assert f"{made}" in out and " created" in out, out
    out = shell.run(f"kubectl apply -f {copies[1]}").stdout
    assert "semipdservice.semipd.io/tiny created" in out
    spd = yaml.safe_load(shell.run("kubectl get spd tiny -o yaml").stdout)
    assert spd["spec"]["prometheus"]["url"] == f"http://prometheus.{shell.system}:9090"
