"""The operator's side of the engine contract against the REAL engine process: the arguments the operator
builds start `semipd serve`, and push_split moves its split (or says plainly why it could not)."""
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from semipd.operator import builders, names, pods, spec
from semipd.operator.testing import free_port, poll

pytestmark = pytest.mark.engine

TOKEN = "operator-test-token"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """`semipd serve` with builders.engine_args, the pod's mount paths mapped to local directories."""
    from semipd.runtime.tiny_model import write_tiny_model
    root = tmp_path_factory.mktemp("pod")
    model = write_tiny_model(root / "model")
    port = free_port()
    s = spec.parse("tiny", "ns", {"model": {"hostPath": str(model)}, "partition": {"backend": "cpu"},
                                  "engine": {"image": "unused", "port": port,
                                             "args": ["--device", "cpu", "--kv-cache-memory", "0.05"]}})
    (root / "podinfo").mkdir()
    (root / "podinfo" / "sm-partition").write_text("")  # the annotation is not there yet: an empty file
    (root / "admin").mkdir()
    (root / "admin" / "token").write_text(TOKEN)
    local = {names.MODEL_DIR: str(model), names.PODINFO_DIR: str(root / "podinfo"),
             names.ADMIN_DIR: str(root / "admin")}

    def remap(arg: str) -> str:
        for mount, path in local.items():
            if arg == mount or arg.startswith(mount + "/"):
                return path + arg[len(mount):]
        return arg
    args = [remap(a) for a in builders.engine_args(s)]
    args[args.index("--host") + 1] = "127.0.0.1"
    log = root / "engine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "semipd.runtime.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT)

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited {proc.returncode}: {log.read_text()[-3000:]}")
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    try:
        poll(healthy, 180, interval=0.5, what="engine health", log=lambda: log.read_text())
        yield port, root
    finally:
        proc.terminate()
        proc.wait(timeout=40)


def current(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/admin/partition", headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=5).json()


def test_push_moves_the_split_and_reports_the_rounded_sms(engine):
    port, _ = engine
    result = pods.push_split("127.0.0.1", port, TOKEN, 0.3, timeout=5)
    state = current(port)
    assert result.ok and result.error is None
    assert result.prefill_sms == state["prefill_sms"] and state["requested"] == {"prefill": 0.3}
    assert abs(state["prefill_fraction"] - 0.3) <= state["granularity"] / state["total_sms"]


def test_push_failures_say_why_without_the_token(engine):
    port, _ = engine
    wrong = pods.push_split("127.0.0.1", port, "not-the-token", 0.4, timeout=5)
    assert not wrong.ok and "HTTP 403" in wrong.error and "wrong admin token" in wrong.error
    assert "not-the-token" not in wrong.error
    refused = pods.push_split("127.0.0.1", free_port(), TOKEN, 0.4, timeout=5)
    assert not refused.ok and "/admin/partition" in refused.error and TOKEN not in refused.error


def test_the_engine_follows_the_annotation_file(engine):
    port, root = engine
    (root / "podinfo" / "sm-partition").write_text("prefill=0.75")
    state = poll(lambda: (s := current(port))["requested"] == "prefill=0.75" and s, 30,
                 what="the engine to read the partition file")
    assert state["source"] == "partition-file"
