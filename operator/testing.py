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

from semipd.operator.kube import Kube, path as kube_path


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
                 push_timeout: float = 1.0, extra: list[str] | None = None, token_key_secret: str | None = None):
        self.kubeconfig = kubeconfig
        # The operator's own Secret (tokens.py); by default in the first namespace it serves, which a test's
        # operator may write to.
        self.token_key_secret = token_key_secret or f"{namespaces[0] if namespaces else 'default'}/semipd-token-key"
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
               "--http", f"127.0.0.1:{self.port}",
               "--status-interval", str(self.status_interval), "--push-timeout", str(self.push_timeout),
               "--token-key-secret", self.token_key_secret, "--log-level", "debug"]
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

    def get(self, path: str) -> httpx.Response:
        """GET one of the operator's own endpoints: /healthz, /readyz, /metrics."""
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the operator's /metrics samples of that name with those labels (0 where there is none yet)."""
        from prometheus_client.parser import text_string_to_metric_families
        return sum(sample.value for family in text_string_to_metric_families(self.get("/metrics").text)
                   for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

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
    the pod's annotations as the kubelet does), listening on ``host`` (a loopback address: several pods can then
    share the container port, as pods with their own IPs do). Used with FakeKubelet.report_ready."""

    def __init__(self, kube: Kube, pod: dict, workdir: Path, sync_interval: float = 0.5, host: str = "127.0.0.1"):
        self.kube = kube
        self.host = host
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
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
            args[args.index("--host") + 1] = self.host
        else:
            args += ["--host", self.host]
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
        # Not poll(): an engine that exits, or a stop() from another thread (a stand-in kubelet whose pod was
        # deleted while it started), must end the wait at once rather than at the deadline.
        deadline = time.monotonic() + health_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self._stop.is_set():
                raise RuntimeError("stopped before its /health answered")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {health_timeout:g} s waiting for the engine's /health:\n"
                                     f"{self.log()[-6000:]}")
            time.sleep(0.5)

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


class LocalKubelet:
    """A stand-in kubelet (fake: the test control plane has none) for the pods of one SemiPDService: it polls
    the service's pods through the API server and, for each new one, gives it its own loopback address
    (127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 is loopback on Linux, so every pod keeps the container port,
    as pods with their own IPs do), runs it as a LocalPod on that address and, once /health answers, reports it
    Running and Ready with that podIP. A deleted pod's process is stopped. Pods start concurrently, each in its
    own thread, since one engine takes 10-20 s to come up on a busy machine.

        kubelet = LocalKubelet(kube, namespace, "tiny", tmp_path / "pods").start()
        pods = kubelet.wait_running(2)     # {pod name: LocalPod}, each serving on pods[name].url
        pids = kubelet.pids()              # {pod name: process id}; equal later = nothing restarted
        kubelet.stop()                     # every engine, SIGTERM then SIGKILL
    """

    def __init__(self, kube: Kube, namespace: str, service: str, workdir: Path, interval: float = 0.5,
                 health_timeout: float = 180.0):
        from semipd.operator import names
        self.kube = kube
        self.namespace = namespace
        self.selector = names.selector_string(service)
        self.workdir = Path(workdir)
        self.interval = interval
        self.health_timeout = health_timeout
        self.pods: dict[str, LocalPod] = {}      # running (or starting) pods by name
        self.started: list[tuple[str, str, int]] = []  # (pod, address, pid) for every engine ever started
        self.errors: dict[str, str] = {}        # pods whose engine failed to start: why
        self._uids: dict[str, str] = {}         # pod name -> the uid we run under that name
        self._seen: set[str] = set()            # uids ever started
        self._ready: set[str] = set()
        self._next_address = 2
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._starters: list[threading.Thread] = []

    def start(self) -> "LocalKubelet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:
                pass  # a transient API error: the next pass sees the same pods again
            self._stop.wait(self.interval)

    def _sync(self) -> None:
        listed = {p["metadata"]["uid"]: p for p in self.kube.list("v1", "pods", self.namespace, self.selector)}

        def deleted(uid):
            return uid not in listed or listed[uid]["metadata"].get("deletionTimestamp") is not None
        with self._lock:
            stopping = [(uid, self.pods.pop(name)) for name, uid in list(self._uids.items())
                        if name in self.pods and deleted(uid)]
            for _, local in stopping:
                self._ready.discard(local.name)
            for uid, pod in listed.items():
                if uid in self._seen or deleted(uid):
                    continue
                self._seen.add(uid)  # a pod is started once: a failed engine is reported, not restarted
                name = pod["metadata"]["name"]
                self._uids[name] = uid
                local = LocalPod(self.kube, pod, self.workdir / name, host=f"127.0.0.{self._next_address}")
                self._next_address += 1  # never reused, so no new pod meets an old one's lingering sockets
                self.pods[name] = local
                starter = threading.Thread(target=self._run, args=(local,), daemon=True)
                self._starters.append(starter)
                starter.start()
        for uid, local in stopping:
            local.stop()
            if uid in listed:  # what a kubelet does once the containers are gone: finish the graceful deletion
                self.kube.request("DELETE", kube_path("v1", "pods", self.namespace, local.name),
                                  query={"gracePeriodSeconds": "0"})

    def _run(self, local: LocalPod) -> None:
        (self.workdir / local.name).mkdir(parents=True, exist_ok=True)
        error = None
        try:
            local.start(health_timeout=self.health_timeout)
            FakeKubelet(self.kube).report_ready(self.namespace, local.name, ip=local.host)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            current = self.pods.get(local.name) is local  # not deleted (or the kubelet stopped) meanwhile
            if current and error is None:
                self.started.append((local.name, local.host, local.proc.pid))
                self._ready.add(local.name)
            elif current:
                self.errors[local.name] = error
        if error is not None or not current:
            local.stop()

    def wait_running(self, count: int, timeout: float = 180.0) -> dict[str, LocalPod]:
        """Wait until exactly ``count`` pods serve and are reported Ready; an engine that failed to start fails
        the wait at once, with its log."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.errors:
                    raise AssertionError(f"an engine failed to start: {self.errors}")
                ready = {n: p for n, p in self.pods.items() if n in self._ready}
                if len(ready) == count == len(self.pods):
                    return ready
                seen = {n: ("ready" if n in ready else "starting") for n in self.pods}
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {count} pods serving and Ready; "
                                     f"pods: {seen}")
            time.sleep(0.5)

    def serving(self) -> dict[str, LocalPod]:
        """The pods whose engines answer and are reported Ready now (what a Service would route to)."""
        with self._lock:
            return {n: p for n, p in self.pods.items() if n in self._ready}

    def pids(self) -> dict[str, int]:
        """Process id of each running pod's engine."""
        with self._lock:
            return {n: p.proc.pid for n, p in self.pods.items() if p.proc is not None and p.proc.poll() is None}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            pods = list(self.pods.values())
            self.pods.clear()
        threads = [threading.Thread(target=p.stop) for p in pods]  # each waits for its engine's graceful exit
        for t in threads:
            t.start()
        for t in threads + self._starters:  # a start still under way ends at once: its pod was stopped
            t.join()
