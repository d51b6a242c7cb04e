"""System-tier fixtures: the cluster tier's control plane (tests/conftest.py) plus a real Prometheus that finds
the pods through it, real engines standing in for the pods (operator/testing.py::LocalKubelet) and the tiny
model they serve.

    def test_x(control_plane, namespace, prometheus, local_kubelet, tiny_model, tmp_path):
        kube = Kube(control_plane.api_client())
        ...create a SemiPDService "tiny" with replicas: 2...
        pods = local_kubelet("tiny").wait_running(2)   # {pod name: LocalPod}; pods[n].url serves
        prometheus.query('up{namespace="%s"}' % namespace)  # one sample per pod, labelled pod=<name>
        prometheus.stop(); prometheus.start()              # same URL and data afterwards
"""
import os

import pytest

import cluster_harness
from prometheus_server import PodDiscovery, PrometheusServer, find_binary
from semipd.operator.kube import Kube
from semipd.operator.testing import LocalKubelet

HOW_TO_GET = "install Debian's Prometheus server: `apt-get install prometheus` (.ci/run does this)"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from semipd.runtime.tiny_model import write_tiny_model
    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture
def prometheus(control_plane, namespace, tmp_path):
    """A Prometheus server on loopback scraping the pods of `namespace` every second, found through the API
    server (see prometheus_server.py). Skips without the binary (SEMIPD_PROMETHEUS may name one off PATH), or
    fails where the system tier must run (SEMIPD_REQUIRE_CLUSTER=1)."""
    binary = os.environ.get("SEMIPD_PROMETHEUS") or find_binary()
    if not binary:
        cluster_harness.unavailable(f"no `prometheus` on PATH; {HOW_TO_GET}")
    discovery = PodDiscovery(Kube(control_plane.api_client()), [namespace]).start()
    server = PrometheusServer(binary, discovery.url, tmp_path / "prometheus")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        discovery.stop()


@pytest.fixture
def local_kubelet(control_plane, namespace, tmp_path):
    """local_kubelet(service) -> a started LocalKubelet running that service's pods in `namespace`; every engine
    is stopped at teardown."""
    started = []

    def start(service: str) -> LocalKubelet:
        kubelet = LocalKubelet(Kube(control_plane.api_client()), namespace, service, tmp_path / f"pods-{service}")
        started.append(kubelet)
        return kubelet.start()
    yield start
    for kubelet in started:
        kubelet.stop()
