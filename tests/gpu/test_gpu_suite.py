"""The GPU suite cannot rot between device leases: prepare.sh downloads the wheels, and the suite's dry run takes
every stage's code path on CPU (the wheel install into a scratch target, pytest, the kernels under the Triton
interpreter, two real servers on loopback, the sweep, the switch, the roofline) and checks that everything its
processes import is in the GPU image or among the wheels."""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import suite  # noqa: E402

EXPECTED = {"wheels": "ok", "env": "ok", "pytest": "ok", "kernels": "ok", "parity": "ok", "sweep": "ok",
            "switch": "ok", "engine": "ok", "compare": "ok"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "prepare.sh"), str(dest)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return dest, done.stdout


@pytest.mark.engine
def test_prepare_downloads_every_wheel_under_the_carry_limit_and_prints_the_call(prepared):
    dest, stdout = prepared
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    names = {re.split(r"-\d", w, maxsplit=1)[0].lower() for w in wheels}
    assert names == set(suite.WHEELS), wheels
    assert all("cp312" in w or "py3-none-any" in w for w in wheels), wheels  # the device's Python 3.12
    assert sum(p.stat().st_size for p in dest.glob("*.whl")) < 64 * 2**20
    command = re.search(r"command: (.*)", stdout).group(1)
    assert len(command) <= 2000 and f"--wheels {dest}" in command and "bench/gpu/suite.py" in command
    assert f'carry:   ["{dest}"]' in stdout


@pytest.mark.engine
def test_dry_run_takes_every_stage_and_returns_what_the_device_tool_can_carry(prepared, tmp_path):
    dest, _ = prepared
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "suite.py"), "--dry-run", "--wheels",
                           str(dest), "--out", str(out), "--budget-s", "400"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    data = json.loads((out / "suite.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert {k: s["status"] for k, s in stages.items()} == EXPECTED, done.stdout[-4000:]
    assert stages["wheels"]["result"]["missing"] == []
    assert data["import_audit"]["missing"] == {}, "imported here, absent on the GPU machine: carry it as a wheel"
    # CPU float32 on both sides: every kernel inside tolerance and every greedy token equal
    assert all(c["ok"] for c in stages["kernels"]["result"]["checks"])
    assert stages["parity"]["result"]["prefix_agreement"] == 1.0
    assert stages["switch"]["result"]["switches"] == 2 and stages["switch"]["result"]["failed_requests"] == 0
    steps = stages["engine"]["result"]["decode_steps"]
    assert [s["batch"] for s in steps] == [1, 2] and all(s["vs_roofline"] > 0 for s in steps)
    assert stages["engine"]["result"]["throughput_ratio"] > 0
    # what comes back from $OUT: at most 8 plain files, names of letters, digits, '.', '_' and '-'
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compare.png", "kernels.json", "sm_profile.json", "suite.json", "suite.log", "switch.json"]
    # the engine's modes through semipd bench: each one's figures per rate, no per-request records
    compare = stages["compare"]["result"]
    assert set(compare) == {"cpu-unified", "cpu-static"}
    assert all(m["runs"] and m["runs"][0]["rate"] == 4 and "requests" not in m["runs"][0] for m in compare.values())
    assert json.loads((out / "sm_profile.json").read_text())["rows"]
    # the table is the last thing printed, one row per stage
    last = done.stdout.strip().splitlines()[-len(EXPECTED) - 1:]
    assert last[0].split()[:2] == ["stage", "status"] and [r.split()[0] for r in last[1:]] == list(EXPECTED)
    assert stages and elapsed < 400


@pytest.mark.unit
def test_a_stage_past_its_cap_is_stopped_with_what_it_started(tmp_path):
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), site=None, budget_s=60, only=None, wheels=None,
                              compare_arg=[])
    s = suite.Suite(args)
    marker = tmp_path / "child-ran"
    # a shell that starts a grandchild: the whole process group must go
    script = f"sleep 30 & echo $! > {marker}; wait"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        s.sub(["bash", "-c", script], cap=1)
    assert time.monotonic() - started < 20
    grandchild = int(marker.read_text())
    time.sleep(0.2)
    shutil.rmtree(s.scratch)
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone, or dead and not yet reaped


@pytest.mark.unit
def test_stages_beyond_the_budget_are_skipped_with_the_reason(tmp_path, capsys):
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "12", "--only", "wheels,compare"]) == 0
    data = json.loads((tmp_path / "suite.json").read_text())
    reasons = {s["name"]: (s["status"], s["reason"]) for s in data["stages"]}
    assert reasons["wheels"][0] == "skipped" and "no --wheels" in reasons["wheels"][1]
    assert reasons["env"] == ("skipped", "not in --only")
    assert reasons["compare"][0] == "skipped" and "budget" in reasons["compare"][1]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("compare")
