"""bench/profile_engine.py against the real server: a step-time profile read from the engine's own metrics, in
exactly the format bench/sm_sweep.py writes on a GPU, so the simulator's calibrated model reads either."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.engine

BENCH = Path(__file__).resolve().parents[2] / "bench"
TOKEN = "profile-token-51aa"
sys.path.insert(0, str(BENCH))
from sm_sweep import Row  # noqa: E402


def profile(server, *flags, token=TOKEN):
    return subprocess.run([sys.executable, str(BENCH / "profile_engine.py"), "--url", server.url, *flags],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "SEMIPD_ADMIN_TOKEN": token})


def test_a_profile_of_two_splits_has_every_row_in_sm_sweeps_format(start_server, tmp_path):
    server = start_server("--partition-backend", "cpu", "--emulate-sm-share", env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    out = tmp_path / "profile.json"
    done = profile(server, "--splits", "32,96", "--tokens", "16,64", "--batches", "1,4", "--decode-tokens", "24", "--context", "16",
                   "--repeats", "2", "--partner-tokens", "64", "--partner-batch", "2", "--calibrate",
                   "--calibrate-at", "64", "--calibration-rates", "8", "--calibration-requests", "12",
                   "--calibration-input-len", "32", "--calibration-output-len", "8", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    fields = {f.name for f in dataclasses.fields(Row)} | {"slowdown"}
    assert all(set(row) == fields for row in doc["rows"])
    plan = {(r["prefill_sms"], r["phase"], r["size"]) for r in doc["rows"]}
    assert plan == {(p, phase, n) for p in (32, 96) for phase, sizes in (("prefill", (16, 64)), ("decode", (1, 4)))
                    for n in sizes}
    assert all(r["prefill_sms"] + r["decode_sms"] == doc["meta"]["sms"] == 132 for r in doc["rows"])
    assert all(r["alone_ms"] > 0 for r in doc["rows"])
    assert doc["meta"]["api_overhead_ms"] is not None
    assert all(r["context"] == 16 + 12 for r in doc["rows"] if r["phase"] == "decode")   # prompt + half the output
    # the serving run that calibrates the rows ran at the split asked for, through semipd bench
    cal = doc["meta"]["calibration"]
    assert cal["prefill_factor"] > 0 and cal["decode_factor"] > 0 and cal["api_overhead_ms"] >= 0
    assert [(r["run"]["prefill_sms"], r["run"]["requests"]) for r in cal["runs"]] == [(64, 12)]
    state = httpx.get(server.url + "/admin/partition", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert state["prefill_sms"] == 64
    # and the simulator reads the file, calibration included
    from semipd.sim.models import Profile
    model = Profile.load(out)
    assert model.factors == {"prefill": cal["prefill_factor"], "decode": cal["decode_factor"]}
    assert model.api_overhead_s == pytest.approx(cal["api_overhead_ms"] / 1000)


def test_an_engine_whose_split_has_another_owner_is_refused_clearly(start_server):
    server = start_server("--partition-backend", "cpu", "--partition-policy", "static",
                          env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    done = profile(server, "--splits", "32", "--tokens", "16", "--batches", "1")
    assert done.returncode == 1
    assert "--partition-policy external" in done.stderr and "Traceback" not in done.stderr


def test_a_wrong_token_is_refused_without_printing_it(start_server):
    server = start_server("--partition-backend", "cpu", env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    done = profile(server, "--splits", "32", token="not-the-token")
    assert done.returncode == 1
    assert "token" in done.stderr and "not-the-token" not in done.stderr + done.stdout
