"""`semipd bench` as a user runs it (a subprocess) against our real engine on loopback (the shared tiny-model
server): every request completes with the asked lengths, and each record is consistent in itself."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_semipd_bench_against_semipd_serve(default_server, tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "semipd.runtime.cli", "bench", "--url", default_server.url,
                           "--rate", "2", "--num-requests", "8", "--input-len", "32", "--output-len", "8",
                           "--slo-ttft", "5", "--slo-tpot", "1", "--output", str(out), "--csv", str(tmp_path / "x.csv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rate 2 req/s: 8/8 completed" in proc.stdout and "TTFT" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["server"]["model"] == "tiny-llama" and doc["simulated"] is False
    # prompt lengths were calibrated with the server's own vLLM-style /tokenize
    assert doc["prompts"]["counter"] == "tokenize"
    (run,) = doc["runs"]
    s, reqs = run["summary"], run["requests"]
    assert (s["requests"], s["completed"], s["failed"]) == (8, 8, 0)
    for r in reqs:
        assert r["error"] is None
        assert r["output_tokens"] == 8                       # max_tokens with ignore_eos
        assert abs(r["prompt_tokens"] - 32) <= 2, r           # the server's own count
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) == 7 and all(g >= 0 for g in r["itl_s"])
        assert sum(r["itl_s"]) <= r["e2e_s"] - r["ttft_s"] + 1e-6
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 7)
        assert r["sent_s"] >= r["arrival_s"] - 1e-3          # open loop: never sent before it was due
    assert s["output_throughput"] == pytest.approx(64 / s["duration_s"])
    assert s["attainment"] == s["slo_met"] / 8
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 9
