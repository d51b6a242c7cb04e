"""Helpers for running the operator against a real API server (the cluster tests, e2e): the operator as a
real subprocess, polling with a deadline, and a fake kubelet for control planes that have no kubelet."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from semipd.operator.kube import Kube


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn, timeout: float = 60.0, interval: float = 0.2, what: str = "condition", log=None):
    """Call fn() until it returns something truthy and return that; on timeout fail with the last value (and
    the operator's log tail, if given). Never sleeps a fixed time and then asserts."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except Exception as e:  # an object not there yet, a transient API error
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            tail = f"\n--- operator log (tail) ---\n{log()[-6000:]}" if log else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last value: {last!r}{tail}")
        time.sleep(interval)


class OperatorProcess:
    """`python -m semipd.operator.main` as a child process with its own session, so kill() is a real SIGKILL
    of exactly this process and nothing else."""

    def __init__(self, kubeconfig: str, namespaces: list[str], log_path: Path, status_interval: float = 2.0,
                 push_timeout: float = 1.0, extra: list[str] | None = None):
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = Path(log_path)
        self.status_interval = status_interval
        self.push_timeout = push_timeout
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, wait: bool = True, timeout: float = 60.0) -> "OperatorProcess":
        self.port = free_port()
        cmd = [sys.executable, "-m", "semipd.operator.main", "--kubeconfig", self.kubeconfig,
               "--liveness", f"http://127.0.0.1:{self.port}/healthz",
               "--status-interval", str(self.status_interval), "--push-timeout", str(self.push_timeout),
               "--log-level", "debug"]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        cmd += self.extra
        log = open(self.log_path, "ab")
        log.write(f"\n=== start: {' '.join(cmd)}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        if wait:
            self.wait_live(timeout)
        return self

    def wait_live(self, timeout: float = 60.0) -> None:
        def live():
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        poll(live, timeout, what="the operator's liveness endpoint", log=self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final patches; whatever was half done stays half done."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class FakeKubelet:
    """Stands in for the kubelet the test control plane lacks: it reports a pod as Running and Ready with an IP,
    the way a kubelet would once the engine's /health answered. Nothing runs; only the pod's status moves."""

    def __init__(self, kube: Kube):
        self.kube = kube

    def report_ready(self, namespace: str, name: str, ip: str = "127.0.0.1") -> dict:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds = [{"type": t, "status": "True", "lastTransitionTime": now}
                 for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        return self.kube.merge_patch("v1", "pods", namespace, name, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now, "conditions": conds}},
            subresource="status")


class LocalPod:
    """Runs what a kubelet would run for one pod, here, as a local process: the engine container's command
    and arguments exactly as the operator built them, with each mount path mapped to a local directory
    (hostPath as is; the Secret's keys and the downward-API files written out, the latter kept in step with
    the pod's annotations as the kubelet does), listening on 127.0.0.1. Used with FakeKubelet.report_ready."""

    def __init__(self, kube: Kube, pod: dict, workdir: Path, sync_interval: float = 0.5):
        self.kube = kube
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.workdir = Path(workdir)
        self.sync_interval = sync_interval
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._downward: list[tuple[Path, list[dict]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, daemon=True)

    @property
    def log_path(self) -> Path:
        return self.workdir / "engine.log"

    def _local_mounts(self) -> dict[str, str]:
        spec = self.pod["spec"]
        (container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        local = {}
        for mount in container.get("volumeMounts") or []:
            vol = volumes[mount["name"]]
            target = self.workdir / "volumes" / mount["name"]
            if "hostPath" in vol:
                local[mount["mountPath"]] = vol["hostPath"]["path"]
                continue
            target.mkdir(parents=True, exist_ok=True)
            if "secret" in vol:
                secret = self.kube.get("v1", "secrets", self.namespace, vol["secret"]["secretName"])
                for item in vol["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]:
                    (target / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
            elif "downwardAPI" in vol:
                self._downward.append((target, vol["downwardAPI"]["items"]))
            local[mount["mountPath"]] = str(target)
        self._write_downward_api(self.pod)
        return local

    def _write_downward_api(self, pod: dict) -> None:
        annotations = pod["metadata"].get("annotations") or {}
        for target, items in self._downward:
            for item in items:
                field = item["fieldRef"]["fieldPath"]
                if field == "metadata.annotations":
                    text = "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(annotations.items()))
                else:  # metadata.annotations['key']: an absent annotation projects as an empty file
                    text = annotations.get(field.split("['", 1)[1].rstrip("']"), "")
                tmp = target / f".{item['path']}.tmp"
                tmp.write_text(text)
                os.replace(tmp, target / item["path"])  # atomic, like the kubelet's writer

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self._write_downward_api(self.kube.get("v1", "pods", self.namespace, self.name))
            except Exception:
                pass  # the pod may be gone; the test decides what that means

    def start(self, health_timeout: float = 180.0) -> "LocalPod":
        (container,) = self.pod["spec"]["containers"]
        mounts = self._local_mounts()
        ordered = sorted(mounts, key=len, reverse=True)

        def remap(value: str) -> str:
            for mount_path in ordered:
                if value == mount_path or value.startswith(mount_path + "/"):
                    return mounts[mount_path] + value[len(mount_path):]
            return value

        args = [remap(a) for a in container.get("args") or []]
        if "--host" in args:
            args[args.index("--host") + 1] = "127.0.0.1"
        self.port = int(args[args.index("--port") + 1])
        if container.get("command") != ["semipd"]:
            raise ValueError(f"unexpected command {container.get('command')}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update({e["name"]: remap(e["value"]) for e in container.get("env") or [] if "value" in e})
        cmd = [sys.executable, "-m", "semipd.runtime.cli", *args]
        with open(self.log_path, "wb") as log:
            log.write(f"=== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._thread.start()

        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        poll(healthy, health_timeout, interval=0.5, what="the engine's /health", log=self.log)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
