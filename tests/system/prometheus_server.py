"""A real Prometheus server (Debian's `prometheus` binary) on loopback for the system tier, scraping the engine
pods it discovers through the test control plane's API server, relabelled as the Prometheus Operator does for
the PodMonitor operator/builders.py::pod_monitor writes. So the labels the operator's queries select on
(namespace, pod, container, endpoint, job) are the ones a cluster's Prometheus gives.

Debian builds Prometheus without Kubernetes service discovery (removed in 1.5.0 for its dependencies, see the
package's NEWS.Debian), so `kubernetes_sd_configs` is not available. PodDiscovery stands in for it: it lists the
pods from the real API server on each request and serves them to Prometheus's `http_sd_configs` as the target
groups kubernetes SD with `role: pod` makes, with the same `__meta_kubernetes_pod_*` labels; the relabelling
after it is the PodMonitor's, unchanged.

The PodMonitor selects one service's pods by their semipd.io/service label; the job here keeps every pod that
has the label and names the job after it, which is one such PodMonitor per SemiPDService."""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from semipd.operator.kube import Kube

SCRAPE_INTERVAL = "1s"
SCRAPE_TIMEOUT = "900ms"
READY_TIMEOUT_S = 60.0
SERVICE_LABEL_META = "__meta_kubernetes_pod_label_semipd_io_service"  # the label semipd.io/service, sanitised


def find_binary() -> str | None:
    return shutil.which("prometheus")


def scrape_config(discovery_url: str) -> dict:
    """The scrape job: the pods PodDiscovery serves, then the PodMonitor's relabelling."""
    return {
        "job_name": "semipd-podmonitor",
        "honor_labels": False,
        "metrics_path": "/metrics",  # podMetricsEndpoints[0].path
        "scheme": "http",
        "http_sd_configs": [{"url": discovery_url, "refresh_interval": "1s"}],
        "relabel_configs": [
            # the Prometheus Operator never scrapes finished pods
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            # selector.matchLabels {semipd.io/service: NAME}
            {"action": "keep", "source_labels": [SERVICE_LABEL_META.replace("_label_", "_labelpresent_")],
             "regex": "true"},
            # podMetricsEndpoints[0].port: "http" (one target per declared container port; keep that one)
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http"},
            {"source_labels": ["__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_container_port_number"],
             "separator": ":", "target_label": "__address__"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "endpoint", "replacement": "http"},
            # job = NAMESPACE/PODMONITOR_NAME; the operator names the PodMonitor after the service
            {"source_labels": ["__meta_kubernetes_namespace", SERVICE_LABEL_META], "separator": "/",
             "target_label": "job"},
        ],
    }


def _sanitise(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_target_groups(pod: dict) -> list[dict]:
    """What kubernetes SD (role: pod) makes of one pod: a group per pod, a target per declared container port,
    none until the pod has an IP."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    ready = next((c["status"].lower() for c in status.get("conditions") or [] if c["type"] == "Ready"), "unknown")
    labels = {
        "__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_uid": meta["uid"],
        "__meta_kubernetes_pod_ready": ready, "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
    }
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if owner:
        labels["__meta_kubernetes_pod_controller_kind"] = owner["kind"]
        labels["__meta_kubernetes_pod_controller_name"] = owner["name"]
    for kind in ("label", "annotation"):
        for key, value in (meta.get(f"{kind}s") or {}).items():
            labels[f"__meta_kubernetes_pod_{kind}_{_sanitise(key)}"] = value
            labels[f"__meta_kubernetes_pod_{kind}present_{_sanitise(key)}"] = "true"
    groups = []
    for init, containers in ((False, spec.get("containers") or []), (True, spec.get("initContainers") or [])):
        for c in containers:
            for port in c.get("ports") or [{}]:  # a container without ports is one target at the bare IP
                number = port.get("containerPort")
                target = {"__meta_kubernetes_pod_container_name": c["name"],
                          "__meta_kubernetes_pod_container_image": c.get("image", ""),
                          "__meta_kubernetes_pod_container_init": str(init).lower()}
                if number is not None:
                    target |= {"__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                               "__meta_kubernetes_pod_container_port_number": str(number),
                               "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}
                address = f"{ip}:{number}" if number is not None else ip
                groups.append({"targets": [address], "labels": labels | target})
    return groups


class PodDiscovery:
    """Serves the pods of some namespaces, read from the API server on every request, to http_sd_configs."""

    def __init__(self, kube: Kube, namespaces: list[str]):
        self.kube = kube
        self.namespaces = list(namespaces)
        discovery = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    body, code = json.dumps(discovery.target_groups()).encode(), 200
                except Exception as e:  # Prometheus keeps the last good targets on an error
                    body, code = str(e).encode(), 500
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/targets"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def target_groups(self) -> list[dict]:
        return [g for ns in self.namespaces for pod in self.kube.list("v1", "pods", ns)
                for g in pod_target_groups(pod)]

    def start(self) -> "PodDiscovery":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class PrometheusServer:
    """One Prometheus process: start() (again after stop(): same port, same data), stop() (SIGTERM: what a
    test needs to show the operator freezing without metrics), query(promql) -> the result vector."""

    def __init__(self, binary: str, discovery_url: str, workdir: Path):
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "prometheus.log"
        self.config_path = self.workdir / "prometheus.yml"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_TIMEOUT,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [scrape_config(discovery_url)],
        }, sort_keys=False))

    def start(self, timeout: float = READY_TIMEOUT_S) -> "PrometheusServer":
        cmd = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data_dir}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # /-/ready answers 200 once the data is loaded and the server serves
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus not ready after {timeout:g} s:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, promql: str) -> list[dict]:
        """An instant query; the result vector ([{"metric": {...}, "value": [ts, "1.5"]}, ...]). A stopped server
        raises httpx.ConnectError; a bad query raises ValueError with Prometheus's own error."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        if body.get("status") != "success":
            raise ValueError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        """The active scrape targets, with their labels, health and last error (what /targets shows)."""
        return httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=10).json()["data"][
            "activeTargets"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
