"""Engine-tier fixtures: tiny random models written once per session, and the REAL server started as a process
(`python -m semipd.runtime.cli serve ...`) on loopback.

    def test_x(start_server, tiny_llama_dir):
        server = start_server("--max-num-waiting", "2", env={"SEMIPD_ADMIN_TOKEN": "t"})
        httpx.get(server.url + "/health")

`start_server` (per test) and `start_server_module` (per module) take the serve flags; `--model` defaults to the
tiny llama (`start_server_without_model` passes none), `--port` to a free port and `--max-model-len` to 512
(`--max-model-len default` leaves it to the engine). Every server is stopped (SIGTERM, then SIGKILL) when its scope ends.
`default_server` is one shared server (max_model_len 2048) for tests that need no special flags.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from semipd.runtime.tiny_model import write_tiny_model

START_TIMEOUT_S = 180.0       # model load + torch import on a busy 2-core machine
DEFAULT_MAX_MODEL_LEN = 512   # small context so "too long" cases stay cheap
SHARED_MAX_MODEL_LEN = 2048   # default_server: room for requests long enough to be cut short visibly


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: Path | None, log_dir: Path, *args: str, env: dict | None = None) -> Server:
    """model_dir None starts `semipd serve` with no --model: the embedded default."""
    args = list(args)
    if "--model" not in args and model_dir is not None:
        args = ["--model", str(model_dir)] + args
    if "--max-model-len" not in args:
        args += ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN)]
    elif args[args.index("--max-model-len") + 1] == "default":     # the engine's own default
        del args[args.index("--max-model-len"):args.index("--max-model-len") + 2]
    if "--port" not in args:
        args += ["--port", str(free_port())]
    port = args[args.index("--port") + 1]
    log_path = log_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if k != "SEMIPD_ADMIN_TOKEN"}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "semipd.runtime.cli", "serve", "--host", "127.0.0.1", *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, args)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before it was healthy:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"server not healthy after {START_TIMEOUT_S:.0f}s:\n{server.log()}")
        time.sleep(0.3)


class _Launcher:
    def __init__(self, model_dir: Path, log_dir: Path):
        self.model_dir, self.log_dir, self.servers = model_dir, log_dir, []

    def __call__(self, *args: str, env: dict | None = None) -> Server:
        server = launch(self.model_dir, self.log_dir, *args, env=env)
        self.servers.append(server)
        return server

    def stop_all(self):
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", arch="qwen3")


@pytest.fixture
def start_server(tiny_llama_dir, tmp_path):
    launcher = _Launcher(tiny_llama_dir, tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def start_server_without_model(tmp_path):
    """Like start_server, but no --model: `semipd serve` picks the embedded default itself."""
    launcher = _Launcher(None, tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def start_server_module(tiny_llama_dir, tmp_path_factory):
    launcher = _Launcher(tiny_llama_dir, tmp_path_factory.mktemp("server"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="session")
def default_server(tiny_llama_dir, tmp_path_factory) -> Server:
    launcher = _Launcher(tiny_llama_dir, tmp_path_factory.mktemp("server"))
    server = launcher("--max-model-len", str(SHARED_MAX_MODEL_LEN))
    yield server
    launcher.stop_all()


def _read_sse(response: httpx.Response) -> list:
    """SSE events of a streamed response: dicts, and the final "[DONE]" as a string. Fails on bad framing."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _read_metric(server: Server, name: str, **labels) -> float:
    """One sample from the server's /metrics (its own model_name/engine labels need not be given)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name} {labels} not in /metrics")


@pytest.fixture(scope="session")
def read_sse():
    return _read_sse


@pytest.fixture(scope="session")
def read_metric():
    return _read_metric
