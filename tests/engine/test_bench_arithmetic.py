"""`semipd bench` against a deliberately slow OpenAI server of known latencies (semipd.loadgen.testserver, in a
thread on loopback): its measured TTFT, TPOT and ITL are the server's figures (tolerances are generous, this is
not a timing benchmark: a loaded 2-core machine adds delay, never removes it), attainment is exactly the share of
requests the server made slow, goodput and the sweep's highest rate follow, failed requests are recorded without
stopping the run, and an unreachable server is one clear line and a non-zero exit."""
import csv
import json
import os
import subprocess
import sys

import pytest

from semipd.loadgen import cli
from semipd.loadgen.testserver import ServerSettings, SlowServer, free_port

pytestmark = pytest.mark.engine

SLACK_S = 0.15        # what a busy machine may add to a latency; never subtracted


def bench(url: str, tmp_path, *flags: str, capsys=None) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    rc = cli.main(["--url", url, "--output", str(out), "--no-progress", *flags])
    assert rc == 0
    printed = capsys.readouterr().out if capsys else ""
    return json.loads(out.read_text()), printed


def test_latencies_are_the_servers_and_slow_requests_set_attainment(tmp_path, capsys):
    settings = ServerSettings(ttft_s=0.05, tpot_s=0.02, slow_every=4, slow_ttft_s=0.6, tokenize=True)
    with SlowServer(settings) as server:
        doc, printed = bench(server.url, tmp_path, "--rate", "16", "--num-requests", "16", "--input-len", "24",
                             "--output-len", "6", "--slo-ttft", "0.3", "--slo-tpot", "0.1", "--seed", "5",
                             capsys=capsys)
    (run,) = doc["runs"]
    s, reqs = run["summary"], run["requests"]
    assert s["completed"] == 16 and s["failed"] == 0
    assert doc["prompts"]["method"] == "tokenize"              # the server has /tokenize: no calibration requests
    assert all(r["prompt_tokens"] == 24 and r["output_tokens"] == 6 for r in reqs)
    slow = [r for r in reqs if r["ttft_s"] >= 0.6]
    fast = [r for r in reqs if r["ttft_s"] < 0.6]
    assert len(slow) == 4
    for r in fast:
        assert 0.05 <= r["ttft_s"] <= 0.05 + SLACK_S
    for r in slow:
        assert 0.6 <= r["ttft_s"] <= 0.6 + SLACK_S
    for r in reqs:
        assert len(r["itl_s"]) == 5
        assert sum(r["itl_s"]) == pytest.approx(5 * 0.02, abs=SLACK_S)
        assert 0.02 - 0.01 <= r["tpot_s"] <= 0.02 + 0.03     # the server keeps an absolute token schedule
        assert r["ttft_s"] < r["e2e_s"]
    assert 0.02 - 0.005 <= s["itl_s"]["p50"] <= 0.02 + 0.02
    assert 0.02 - 0.005 <= s["tpot_s"]["p50"] <= 0.02 + 0.02
    # every 4th request slow, SLO between the two TTFTs: attainment exactly 3/4
    assert s["slo_met"] == 12 and s["attainment"] == 0.75
    assert s["goodput"] == pytest.approx(12 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(16 / s["duration_s"])
    assert s["ttft_s"]["p90"] >= 0.6                        # 4 of 16 slow: the 90th percentile is a slow one
    assert 0.05 <= s["ttft_s"]["p50"] <= 0.05 + SLACK_S
    assert "SLO attainment 75.0% (12/16; TTFT <= 300 ms, TPOT <= 100 ms)" in printed
    assert doc["simulated"] is False and doc["tool"] == "semipd bench" and doc["schema"] == "semipd.bench/v1"
    assert doc["workload"]["rate"] == 16 and doc["slo"] == {"ttft_s": 0.3, "tpot_s": 0.1, "attainment": 0.9}


def test_multi_token_chunks_count_k_gaps_and_prompts_calibrate_from_usage(tmp_path):
    # no /tokenize: prompt lengths come from calibration against usage.prompt_tokens; chat adds template tokens
    settings = ServerSettings(ttft_s=0.05, tpot_s=0.02, chunk_tokens=3)
    with SlowServer(settings) as server:
        doc, _ = bench(server.url, tmp_path, "--endpoint", "chat", "--rate", "20", "--num-requests", "6",
                       "--input-len", "uniform:20:60", "--output-len", "10", "--seed", "2", "--warmup", "2")
        calibration = server.counts["received"] - 6 - 2           # the two warm-up requests are not reported
    reqs = doc["runs"][0]["requests"]
    assert len(reqs) == 6 and doc["client"]["warmup"] == 2
    assert doc["prompts"]["method"] == "usage" and doc["prompts"]["calibration_requests"] == calibration
    from semipd.loadgen.workload import Workload, parse_length
    planned = Workload(rate=20, input=parse_length("uniform:20:60"), output=parse_length("10"), num_requests=6,
                       seed=2).requests()
    assert [r["prompt_tokens"] for r in reqs] == [p.prompt_tokens for p in planned]     # exact, template included
    for r in reqs:
        assert r["output_tokens"] == 10
        # 10 tokens in chunks of 1, 3, 3, 3: 9 gaps, each a third of a 3-token chunk's gap (3 * 20 ms)
        assert len(r["itl_s"]) == 9
        for g in r["itl_s"]:
            assert 0.02 - 0.01 <= g <= 0.02 + 0.05
        assert r["tpot_s"] == pytest.approx(0.02, abs=0.03)


def test_sweep_finds_the_highest_rate_and_writes_json_csv_png(tmp_path, capsys):
    # one request at a time, each busy 50 ms + 3 x 10 ms: ~12 req/s of capacity. Regular arrivals (gamma shape 50)
    # at 5 req/s never queue; at 25 and 45 req/s the queue grows and TTFT leaves the 0.2 s SLO.
    settings = ServerSettings(ttft_s=0.05, tpot_s=0.01, concurrency=1, tokenize=True)
    with SlowServer(settings) as server:
        doc, printed = bench(server.url, tmp_path, "--rate-sweep", "5:45:20", "--num-requests", "10",
                             "--burstiness", "50", "--input-len", "16", "--output-len", "4", "--slo-ttft", "0.2",
                             "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"),
                             "--label", "slow server", capsys=capsys)
    assert [r["rate"] for r in doc["runs"]] == [5, 25, 45]
    low, mid, high = (r["summary"] for r in doc["runs"])
    assert low["attainment"] == 1.0
    assert mid["attainment"] < 0.9 and high["attainment"] < 0.9
    assert high["ttft_s"]["p99"] > 0.3                         # queueing is visible in TTFT
    assert doc["max_rate_at_goal"] == 5
    assert "highest rate with attainment >= 90%: 5 req/s" in printed
    assert doc["label"] == "slow server" and doc["complete"] is True
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 30 and {float(r["rate"]) for r in rows} == {5, 25, 45}
    assert all(float(r["ttft_s"]) > 0 for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_server_errors_are_failed_requests_and_the_run_goes_on(tmp_path, capsys):
    f = tmp_path / "lens.jsonl"
    # 200-token prompts are too long for this server (a 400, like vLLM's context-length error)
    f.write_text("\n".join(json.dumps({"input_tokens": n, "output_tokens": 3}) for n in (10, 10, 200)) + "\n")
    settings = ServerSettings(ttft_s=0.02, tpot_s=0.005, fail_every=5, drop_every=7, max_prompt_tokens=100,
                              tokenize=True)
    with SlowServer(settings) as server:
        doc, printed = bench(server.url, tmp_path, "--rate", "50", "--num-requests", "20", "--dataset", str(f),
                             capsys=capsys)
    (run,) = doc["runs"]
    s, reqs = run["summary"], run["requests"]
    assert s["requests"] == 20
    errors = s["errors"]
    http500 = sum(n for e, n in errors.items() if e.startswith("HTTP 500"))
    http400 = sum(n for e, n in errors.items() if e.startswith("HTTP 400"))
    assert http500 == 4                                       # every 5th request the server received
    # the 7th and 14th received are cut off after their first token, unless too long (then a 400 comes first);
    # which requests those are depends on the order they arrived in, so the server's own count decides
    cut = {e: n for e, n in errors.items() if not e.startswith(("HTTP 500", "HTTP 400"))}
    dropped = sum(cut.values())
    assert dropped == server.counts["dropped"] and dropped <= 2, (errors, server.counts)
    assert all(e.startswith(("RemoteProtocolError", "ReadError", "stream ended without")) for e in cut), cut
    assert http400 == sum(1 for r in reqs if r["prompt_tokens"] >= 200 and r["error"] and "400" in r["error"])
    assert http400 >= 1 and "maximum context length" in next(e for e in errors if e.startswith("HTTP 400"))
    assert s["failed"] == http500 + http400 + dropped and s["completed"] == 20 - s["failed"]
    assert s["attainment"] == s["completed"] / 20             # no SLO: every success counts, failures miss
    for r in reqs:
        assert (r["error"] is None) == (r["ttft_s"] is not None)
    assert "failed x4: HTTP 500: injected failure" in printed


def test_timeouts_are_recorded(tmp_path):
    settings = ServerSettings(ttft_s=0.8, tpot_s=0.01, tokenize=True)
    with SlowServer(settings) as server:
        doc, _ = bench(server.url, tmp_path, "--rate", "20", "--num-requests", "3", "--timeout", "0.3",
                       "--output-len", "3")
    s = doc["runs"][0]["summary"]
    assert s["failed"] == 3 and s["errors"] == {"timeout after 0.3 s": 3} and s["attainment"] == 0.0


def test_api_key_is_sent_and_never_printed(tmp_path, capsys, monkeypatch):
    settings = ServerSettings(ttft_s=0.01, tpot_s=0.001, tokenize=True, api_key="sk-secret-123")
    with SlowServer(settings) as server:
        rc = cli.main(["--url", server.url, "--rate", "10", "--num-requests", "2", "--no-progress"])
        first = capsys.readouterr()
        assert rc == 1 and "refused the API key" in first.err
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
        doc, _ = bench(server.url, tmp_path, "--rate", "10", "--num-requests", "2", "--output-len", "2")
        second = capsys.readouterr()
    assert doc["runs"][0]["summary"]["completed"] == 2
    assert "sk-secret" not in (tmp_path / "r.json").read_text() + first.out + first.err + second.out + second.err


def test_unreachable_server_is_one_clear_line_and_exit_1(tmp_path):
    port = free_port()          # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "semipd.runtime.cli", "bench", "--url", f"http://127.0.0.1:{port}",
                           "--rate", "1", "--num-requests", "1", "--output", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semipd bench: error: cannot reach the server at "
                                                   f"http://127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()
