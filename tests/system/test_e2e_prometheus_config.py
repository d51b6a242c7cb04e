"""e2e/prometheus.yaml, the plain Prometheus of the kind walk-through, labels the engine pods' series as the
system tier's Prometheus does, which is how the Prometheus Operator renders the operator's PodMonitor: the same
relabelling, rule for rule, after kubernetes SD in place of the system tier's stand-in for it. So the SLO loop
that the system tier closes on its Prometheus selects the same series on e2e's."""
from pathlib import Path

import pytest
import yaml

from prometheus_server import scrape_config

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parents[2]


def e2e_prometheus() -> dict:
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "e2e" / "prometheus.yaml").read_text()) if d]
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["prometheus.yml"])


def test_the_e2e_scrape_job_relabels_as_the_podmonitor_does():
    [job] = e2e_prometheus()["scrape_configs"]
    ours = scrape_config("http://unused")
    assert job["relabel_configs"] == ours["relabel_configs"]
    assert (job["metrics_path"], job["scheme"]) == (ours["metrics_path"], ours["scheme"])
    [sd] = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"


def test_the_e2e_prometheus_may_discover_the_pods_it_scrapes():
    """Kubernetes SD lists pods in the namespaces it names; the Role bound to Prometheus must allow exactly that."""
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "e2e" / "prometheus.yaml").read_text()) if d]
    [sd] = e2e_prometheus()["scrape_configs"][0]["kubernetes_sd_configs"]
    [role] = [d for d in docs if d["kind"] == "Role"]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sd["namespaces"]["names"] == [role["metadata"]["namespace"]] == [binding["metadata"]["namespace"]]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prometheus",
                                    "namespace": deployment["metadata"]["namespace"]}]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "prometheus"
    example = yaml.safe_load((REPO_ROOT / "e2e" / "example.yaml").read_text())
    assert example["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert example["spec"]["prometheus"]["url"] == f"http://prometheus.{deployment['metadata']['namespace']}:9090"
