"""`semipd serve --partition-policy`: who may move the split. external (the default) obeys the admin API and the
partition file; static keeps the start-up split and answers a PUT with 409; slo runs the SLO policy inside the
engine on its own measurements, and a PUT is 409 there too. Flag combinations that would give the split two
owners stop start-up with one line and exit status 2. The admin token file is followed while the server runs."""
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.engine

TOKEN = "policy-test-token-5e1a"


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def partition(server, method="GET", token=TOKEN, **kw) -> httpx.Response:
    return httpx.request(method, server.url + "/admin/partition", headers=auth(token), timeout=30, **kw)


def serve_exit(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semipd.runtime.cli", "serve", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "SEMIPD_CACHE": "/nonexistent/never-made"})


@pytest.mark.parametrize("flags, words", [
    (["--partition-policy", "static", "--partition-file", "/tmp/f"], "--partition-file"),
    (["--partition-policy", "slo", "--slo-ttft-ms", "100", "--partition-file", "/tmp/f"], "owns the split"),
    (["--partition-policy", "slo"], "needs a target"),
    (["--slo-tpot-ms", "50"], "need --partition-policy slo"),
    (["--partition-policy", "slo", "--slo-ttft-ms", "100", "--partition-min", "0.9", "--partition-max", "0.2"],
     "--partition-min"),
    (["--emulate-sm-share", "--partition-backend", "shared"], "cpu"),
])
def test_two_owners_or_impossible_settings_stop_start_up(flags, words):
    out = serve_exit(*flags)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("semipd serve: error:") and words in lines[0], lines


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def static_server(start_server_module, token_file):
    return start_server_module("--device", "cpu", "--partition-backend", "cpu", "--partition-policy", "static",
                               "--sm-split", "prefill=40", "--admin-token-file", str(token_file))


def test_external_is_the_default_and_says_so(start_server_module):
    server = start_server_module("--device", "cpu", "--partition-backend", "cpu", env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    assert partition(server).json()["policy"] == "external"
    r = partition(server, "PUT", json={"prefill": 16})
    assert r.status_code == 200 and r.json()["prefill_sms"] == 16 and r.json()["policy"] == "external"


def test_static_keeps_the_start_up_split(static_server):
    r = partition(static_server, "PUT", json={"prefill": 0.75})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "partition_policy_static" and error["type"] == "conflict_error"
    assert "static" in error["message"] and "--partition-policy external" in error["message"]
    state = partition(static_server).json()
    assert (state["policy"], state["prefill_sms"], state["source"]) == ("static", 40, "cli")


def test_static_still_checks_the_token_first(static_server):
    assert partition(static_server, "PUT", token="wrong", json={"prefill": 0.75}).status_code == 403


def test_a_rewritten_token_file_is_followed(static_server, token_file):
    assert partition(static_server).status_code == 200
    new = "rotated-token-77b0"
    token_file.write_text(new + "\n")
    st = token_file.stat()
    os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # a visible change on coarse clocks
    assert partition(static_server).status_code == 403                        # the old token no longer opens
    assert partition(static_server, token=new).status_code == 200
    token_file.write_text("")                                                 # a half-written rewrite
    assert partition(static_server, token=new).status_code == 200            # keeps the last good token
    log = static_server.log()
    assert "keeping the previous token" in log and new not in log and TOKEN not in log


def test_slo_policy_moves_the_split_toward_prefill_when_ttft_misses(start_server):
    # a 1 ms TTFT target every request misses, a TPOT target none can: the policy must give prefill SMs
    server = start_server("--device", "cpu", "--partition-backend", "cpu", "--partition-policy", "slo",
                          "--sm-split", "prefill=48", "--slo-ttft-ms", "1", "--slo-tpot-ms", "100000",
                          "--policy-interval", "1", "--partition-cooldown", "0", env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    before = partition(server).json()
    assert (before["policy"], before["prefill_sms"], before["source"]) == ("slo", 48, "cli")
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                client.post(server.url + "/v1/completions", json={"prompt": "some load", "max_tokens": 4})

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 90
        state = before
        while not (state["source"] == "slo-policy" and state["prefill_sms"] > 48):
            assert time.monotonic() < deadline, f"the SLO policy never moved the split: {state}\n{server.log()}"
            time.sleep(0.5)
            state = partition(server).json()
    finally:
        stop.set()
        worker.join(30)
    assert state["decision"]["reason"] and state["decision"]["ttft_s"] > 0.001
    r = partition(server, "PUT", json={"prefill": 16})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "partition_policy_slo"
    assert "in-engine SLO policy" in r.json()["error"]["message"]
    assert partition(server).json()["prefill_sms"] > 48
    assert "SLO policy: prefill share" in server.log()
