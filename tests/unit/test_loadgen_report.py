"""semipd.loadgen.report and the pure parts of the client and CLI: percentiles match numpy, TPOT/attainment/
goodput follow their definitions, the highest rate at the goal stops at the first miss, the files round-trip, the
ITL spreading of multi-token chunks, URL forms, the plots, and bad flags are argparse usage errors naming the flag."""
import csv
import json
import random

import numpy as np
import pytest

from semipd.loadgen import cli, report
from semipd.loadgen.client import normalize_url, spread_gaps
from semipd.loadgen.plots import legend_label, plot_sweep
from semipd.loadgen.report import SLO, RequestResult, max_rate_at, percentile, summarize

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)
    assert percentile([], 50) is None


def result(i, ttft, e2e, tokens, error=None):
    return RequestResult(i, arrival_s=i * 0.1, sent_s=i * 0.1, prompt_tokens=10, output_tokens=tokens, ttft_s=ttft,
                         e2e_s=e2e, itl_s=[(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else [],
                         error=error)


def test_tpot_and_slo_definitions():
    r = result(0, 0.25, 1.25, 9)                              # binary-exact figures: TPOT 1.0 / 8
    assert r.tpot_s == 0.125
    assert r.meets(SLO(ttft_s=0.25, tpot_s=0.125))          # targets are inclusive
    assert not r.meets(SLO(ttft_s=0.24))
    assert not r.meets(SLO(tpot_s=0.124))
    assert r.meets(SLO())
    one = result(1, 0.2, 0.2, 1)
    assert one.tpot_s is None and one.meets(SLO(tpot_s=0.001))   # an undefined TPOT holds
    failed = RequestResult(2, 0, 0, 10, error="HTTP 500")
    assert not failed.ok and failed.tpot_s is None and not failed.meets(SLO())


def test_summary_arithmetic():
    rs = [result(i, 0.1 if i % 4 else 0.9, 1.0, 10) for i in range(12)] + [RequestResult(12, 0, 0, 5, error="x")]
    s = summarize(rs, duration_s=4.0, slo=SLO(ttft_s=0.5))
    assert (s["requests"], s["completed"], s["failed"]) == (13, 12, 1)
    assert s["slo_met"] == 9                                  # 3 slow ones and the failure miss
    assert s["attainment"] == pytest.approx(9 / 13)
    assert s["goodput"] == pytest.approx(9 / 4.0)
    assert s["request_throughput"] == pytest.approx(12 / 4.0)
    assert s["output_throughput"] == pytest.approx(120 / 4.0)
    assert s["input_throughput"] == pytest.approx(120 / 4.0)
    assert s["ttft_s"]["p50"] == pytest.approx(np.percentile([r.ttft_s for r in rs[:12]], 50))
    assert s["ttft_s"]["mean"] == pytest.approx(np.mean([r.ttft_s for r in rs[:12]]))
    assert s["errors"] == {"x": 1}


def run(rate, attainment):
    return {"rate": rate, "summary": {"attainment": attainment}}


def test_max_rate_at_stops_at_the_first_miss():
    assert max_rate_at([run(1, 1.0), run(2, 0.95), run(3, 0.8), run(4, 0.99)], 0.9) == 2
    assert max_rate_at([run(3, 0.95), run(1, 1.0), run(2, 0.9)], 0.9) == 3     # sorted by rate; goal inclusive
    assert max_rate_at([run(1, 0.5)], 0.9) is None
    assert max_rate_at([run(1, None)], 0.9) is None


def test_document_json_and_csv_round_trip(tmp_path):
    rs = [result(i, 0.1, 0.5, 5) for i in range(3)]
    runs = [{"rate": 2.0, "summary": summarize(rs, 1.5, SLO(0.2)), "requests": [r.record() for r in rs]}]
    doc = report.document("semipd bench", "lbl", {"rate": 2.0}, SLO(0.2), runs, simulated=False, extra={"x": 1})
    assert doc["max_rate_at_goal"] == 2.0 and doc["x"] == 1 and doc["simulated"] is False
    report.write_json(tmp_path / "r.json", doc)
    assert report.read_json(tmp_path / "r.json") == json.loads(json.dumps(doc))
    (tmp_path / "other.json").write_text('{"schema": "x"}')
    with pytest.raises(ValueError, match="not a semipd"):
        report.read_json(tmp_path / "other.json")
    report.write_csv(tmp_path / "r.csv", runs)
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 3 and float(rows[0]["tpot_s"]) == pytest.approx(0.1)
    assert float(rows[0]["itl_mean_s"]) == pytest.approx(0.1) and rows[0]["rate"] == "2.0"


def test_spread_gaps_of_multi_token_chunks():
    # one token per chunk: the gaps themselves
    assert spread_gaps([0.0, 0.1, 0.3], 3) == pytest.approx([0.1, 0.2])
    # 7 tokens in 4 chunks: 6 after the first over 3 chunks, 2 each, each gap halved
    assert spread_gaps([1.0, 1.2, 1.6, 1.8], 7) == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.1, 0.1])
    # uneven: 5 tokens after the first over 3 chunks -> 1, 2, 2; the list sums to last - first
    g = spread_gaps([0.0, 0.2, 0.4, 0.5], 6)
    assert len(g) == 5 and sum(g) == pytest.approx(0.5)
    # more chunks than tokens: chunks given no token fold their gap into the next
    g = spread_gaps([0.0, 0.1, 0.2, 0.3], 3)
    assert len(g) == 2 and sum(g) == pytest.approx(0.3)
    assert spread_gaps([0.5], 1) == [] and spread_gaps([0.5, 0.6], 1) == []


@pytest.mark.parametrize("url, base", [("http://h:8000", "http://h:8000"), ("http://h:8000/", "http://h:8000"),
                                       ("http://h:8000/v1", "http://h:8000"), ("https://h/x/v1/", "https://h/x")])
def test_url_forms(url, base):
    assert normalize_url(url) == base


def test_sweep_parsing():
    assert cli.parse_sweep("1:4:1") == [1, 2, 3, 4]
    assert cli.parse_sweep("0.1:0.5:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5]    # float steps, inclusive end
    assert cli.parse_sweep("1:2.5:1") == [1, 2]
    assert cli.parse_sweep("3:3:1") == [3]


@pytest.mark.parametrize("argv, flag", [
    (["--rate", "1"], "--url"),
    (["--url", "http://h:1"], "--rate"),
    (["--url", "ftp://h", "--rate", "1"], "--url"),
    (["--url", "http://h:1", "--rate", "-1"], "--rate"),
    (["--url", "http://h:1", "--rate", "x"], "--rate"),
    (["--url", "http://h:1", "--rate", "nan"], "--rate"),
    (["--url", "http://h:1", "--rate", "1", "--rate-sweep", "1:2:1"], "--rate-sweep"),
    (["--url", "http://h:1", "--rate-sweep", "2:1:1"], "--rate-sweep"),
    (["--url", "http://h:1", "--rate-sweep", "1:2"], "--rate-sweep"),
    (["--url", "http://h:1", "--rate-sweep", "1:2:0"], "--rate-sweep"),
    (["--url", "http://h:1", "--rate", "1", "--num-requests", "0"], "--num-requests"),
    (["--url", "http://h:1", "--rate", "1", "--num-requests", "2", "--duration", "3"], "--duration"),
    (["--url", "http://h:1", "--rate", "1", "--input-len", "uniform:9"], "--input-len"),
    (["--url", "http://h:1", "--rate", "1", "--output-len", "0"], "--output-len"),
    (["--url", "http://h:1", "--rate", "1", "--goal", "1.5"], "--goal"),
    (["--url", "http://h:1", "--rate", "1", "--slo-ttft", "0"], "--slo-ttft"),
    (["--url", "http://h:1", "--rate", "1", "--slo-tpot", "-0.1"], "--slo-tpot"),
    (["--url", "http://h:1", "--rate", "1", "--burstiness", "0"], "--burstiness"),
    (["--url", "http://h:1", "--rate", "1", "--endpoint", "embeddings"], "--endpoint"),
    (["--url", "http://h:1", "--rate", "1", "--warmup", "-2"], "--warmup"),
    (["--url", "http://h:1", "--rate", "1", "--max-concurrency", "0"], "--max-concurrency"),
    (["--url", "http://h:1", "--rate", "1", "--output", "/no/such/dir/x.json"], "--output"),
    (["--url", "http://h:1", "--rate", "1", "--dataset", "/no/such/file.jsonl"], "--dataset"),
    (["--url", "http://h:1", "--rate", "1", "--bogus"], "--bogus"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: semipd bench" in err and flag in err


def test_bad_dataset_line_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"input_tokens": 3}\nnope\n')
    with pytest.raises(SystemExit) as exc:
        cli.main(["--url", "http://h:1", "--rate", "1", "--dataset", str(f)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--dataset" in err and ":2: not JSON" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--rate-sweep START:STOP:STEP" in out and "(default: 0.9)" in out


def doc(label, simulated, rates):
    runs = []
    for r in rates:
        rs = [result(i, 0.05 * r, 0.05 * r + 0.4, 9) for i in range(5)]
        runs.append({"rate": r, "summary": summarize(rs, 2.0, SLO(0.2, 0.06)), "requests": []})
    return report.document("t", label, {}, SLO(0.2, 0.06), runs, simulated=simulated)


def test_plot_sweep_writes_a_png_and_labels_simulated(tmp_path):
    docs = [doc("measured", False, [1, 2, 3]), doc("model", True, [1, 2, 3, 4]), doc("one rate", False, [2])]
    path = plot_sweep(docs, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert legend_label(docs[1]) == "model (simulated)"
    assert legend_label(docs[0]) == "measured"
    assert legend_label({"label": "x (simulated)", "simulated": True}) == "x (simulated)"
    with pytest.raises(ValueError):
        plot_sweep([], tmp_path / "g.png")


def test_bench_plot_command(tmp_path, capsys):
    report.write_json(tmp_path / "a.json", doc("a", False, [1, 2]))
    report.write_json(tmp_path / "b.json", doc("b", True, [1, 2]))
    assert cli.main(["plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output",
                     str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "missing.json"), "-o", str(tmp_path / "p.png")]) == 1
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["plot", str(tmp_path / "a.json")])
    assert exc.value.code == 2
