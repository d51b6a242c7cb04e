"""The system tier's harness, end to end: the operator (a real process) makes a two-pod SemiPDService, the
stand-in kubelet runs both pods as real engines on their own loopback addresses, and a real Prometheus finds
them by itself through the API server and reports each pod's metrics under the labels a PodMonitor gives."""
import math

import httpx
import pytest

from semipd.operator import crd, names
from semipd.operator.kube import Kube
from semipd.operator.testing import OperatorProcess, free_port, poll

pytestmark = pytest.mark.system

WAIT = 120  # upper bounds for things to happen on a busy 2-core machine, never a performance claim
REQUESTS_PER_POD = 3


def by_pod(samples: list[dict]) -> dict[str, float]:
    return {s["metric"]["pod"]: float(s["value"][1]) for s in samples}


def test_prometheus_finds_and_scrapes_every_pod_through_the_api_server(
        control_plane, namespace, prometheus, local_kubelet, tiny_model, tmp_path):
    control_plane.require_controllers()  # the Deployment's pods come from the controllers
    kube = Kube(control_plane.api_client())
    crd.install(kube)
    op = OperatorProcess(control_plane.kubeconfig, [namespace], tmp_path / "operator.log").start(timeout=WAIT)
    try:
        kube.create({"apiVersion": names.API_VERSION, "kind": names.KIND,
                     "metadata": {"name": "tiny", "namespace": namespace},
                     "spec": {"model": {"hostPath": tiny_model}, "replicas": 2, "resources": {"gpus": 0},
                              "engine": {"image": "registry.invalid/semipd:1.0", "port": free_port(),
                                         "args": ["--device", "cpu", "--kv-cache-memory", "0.05"]},
                              "partition": {"initial": 0.5, "backend": "cpu"}}}, names.PLURAL)
        kubelet = local_kubelet("tiny")
        pods = kubelet.wait_running(2, timeout=WAIT)
        pids = kubelet.pids()
        assert len({p.host for p in pods.values()}) == 2  # each pod its own address, the same port

        # Prometheus discovered both pods itself (nobody told it an address) and scrapes them.
        def both_up():
            up = prometheus.query(f'up{{namespace="{namespace}"}}')
            return up if len(up) == 2 and all(s["value"][1] == "1" for s in up) else None
        up = poll(both_up, WAIT, what="both pods scraped", log=lambda: str(prometheus.targets()))
        assert {s["metric"]["pod"] for s in up} == set(pods)
        for s in up:
            pod = pods[s["metric"]["pod"]]
            assert s["metric"]["instance"] == f"{pod.host}:{pod.port}"  # the podIP the kubelet reported
            assert {k: s["metric"][k] for k in ("namespace", "container", "endpoint", "job")} == {
                "namespace": namespace, "container": names.ENGINE_CONTAINER, "endpoint": "http",
                "job": f"{namespace}/tiny"}

        # A few real completions on each pod; Prometheus reports each pod's own token count.
        generated = {}
        with httpx.Client(timeout=60) as client:
            for name, pod in pods.items():
                model = client.get(f"{pod.url}/v1/models").json()["data"][0]["id"]
                generated[name] = 0
                for i in range(REQUESTS_PER_POD):
                    r = client.post(f"{pod.url}/v1/completions", json={
                        "model": model, "prompt": f"Hello {i} from the system tier", "max_tokens": 8})
                    assert r.status_code == 200, r.text
                    generated[name] += r.json()["usage"]["completion_tokens"]
        poll(lambda: by_pod(prometheus.query(f'vllm:generation_tokens_total{{namespace="{namespace}"}}'))
             == generated, WAIT, what=f"generation_tokens_total per pod to reach {generated}")
        poll(lambda: by_pod(prometheus.query(f'sum by (pod) (vllm:request_success_total{{namespace="{namespace}"}})'))
             == {n: REQUESTS_PER_POD for n in pods}, WAIT, what="request_success_total per pod")

        # The query shape the SLO loop uses: a per-pod percentile from the histogram's rate over a window.
        ttft = (f'histogram_quantile(0.9, sum by (pod, le) '
                f'(rate(vllm:time_to_first_token_seconds_bucket{{namespace="{namespace}"}}[30s])))')

        def finite_per_pod():
            values = by_pod(prometheus.query(ttft))
            return values if set(values) == set(pods) and all(math.isfinite(v) for v in values.values()) else None
        values = poll(finite_per_pod, WAIT, what="a finite p90 TTFT for each pod")
        assert all(v > 0 for v in values.values())

        # Stopped, it cannot be reached (what the operator must notice); started again, it answers from the
        # same port and the same data.
        prometheus.stop()
        with pytest.raises(httpx.ConnectError):
            prometheus.query("up")
        prometheus.start()
        poll(lambda: by_pod(prometheus.query(f'vllm:generation_tokens_total{{namespace="{namespace}"}}'))
             == generated, WAIT, what="the same figures after a restart")

        assert kubelet.pids() == pids and len(kubelet.started) == 2  # each engine started once, still running

        # Scaled in: the pod the ReplicaSet deletes has its engine stopped, and Prometheus drops its target.
        kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, "tiny", {"spec": {"replicas": 1}})
        (kept,) = poll(lambda: kubelet.pids() if len(kubelet.pids()) == 1 else None, WAIT, what="one engine left")
        (dropped,) = set(pids) - {kept}
        assert kubelet.pids() == {kept: pids[kept]}
        poll(lambda: pods[dropped].proc.poll() is not None, WAIT, what="the deleted pod's engine to exit")
        # (the active targets, not `up`: a target removed soon after a restart may get no staleness marker, so
        # an instant query can still show its last sample within the 5-minute lookback)
        poll(lambda: {t["labels"]["pod"] for t in prometheus.targets()} == {kept}, WAIT,
             what="Prometheus to drop the deleted pod's target")
    finally:
        op.stop()
        for item in kube.list(names.API_VERSION, names.PLURAL, namespace):
            kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                             {"metadata": {"finalizers": None}})
