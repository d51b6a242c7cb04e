"""The GPU benchmarks' host-side paths, which must work anywhere: refusing cleanly without CUDA, argument
checking, the sweep plan and its table, a split switch timed through the real engine (on CPU, cpu backend), and
the kernel benchmark's dry run (its tiny shapes through the Triton interpreter)."""
import json
import math
import subprocess
import sys

import pytest

import bench_kernels
import gpu_common
import sm_disjointness
import sm_sweep
import switch_latency

pytestmark = pytest.mark.unit


def _has_cuda():
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU: the scripts would run, not refuse")
@pytest.mark.parametrize("script", [sm_disjointness, sm_sweep, switch_latency])
def test_scripts_refuse_with_exit_2_and_one_line_without_cuda(script, capsys):
    assert script.main([]) == gpu_common.EXIT_NO_GPU
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no CUDA device" in err and "--dry-run" in err


def test_int_list_rejects_bad_input():
    import argparse
    assert gpu_common.int_list("8, 64,120") == [8, 64, 120]
    for bad in ("8,x", "", "0", "-8"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_common.int_list(bad)


def test_format_table_aligns_columns_and_shows_missing_values():
    lines = gpu_common.format_table(["a", "long name"], [[1, None], [123, "x"]]).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split() == ["1", "-"]


def test_sweep_plans_every_phase_size_and_split(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert sm_sweep.main(["--dry-run", "--splits", "8,64", "--tokens", "512,8192", "--batches", "1,64",
                          "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # the whole GPU plus two splits, each with 2 prefill sizes and 2 decode batches
    assert len(rows) == 3 * 4
    assert {(r["target"], r["phase"], r["size"]) for r in rows} >= {("split 8", "prefill", 8192),
                                                                     ("split 64", "decode", 64)}
    for r in rows:
        assert r["slowdown"] == pytest.approx(r["with_other_ms"] / r["alone_ms"])
        assert r["partner"] == ("decode B=16" if r["phase"] == "prefill" else "prefill N=2048")
    assert "SYNTHETIC" in capsys.readouterr().out


def test_sweep_without_concurrency_leaves_the_column_empty(tmp_path):
    out = tmp_path / "s.json"
    assert sm_sweep.main(["--dry-run", "--splits", "64", "--no-concurrent", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["with_other_ms"] is None and r["slowdown"] is None for r in rows)


def test_concurrent_samples_are_only_calls_inside_the_other_phases_busy_window():
    prefill = [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    decode = [(-2.0, -1.0), (1.0, 2.0), (2.0, 4.0), (18.0, 19.0), (25.0, 31.0)]
    p_ms, d_ms, p_n, d_n = sm_sweep.concurrent_medians(prefill, decode)
    # decode was busy from -2 to 31, covering every prefill call; the first and last decode calls stick out
    assert (p_ms, p_n) == (10.0, 3)
    assert (d_ms, d_n) == (1.0, 3)
    assert sm_sweep.concurrent_medians(prefill, []) == (None, None, 0, 0)


def test_sweep_rejects_bad_numbers():
    with pytest.raises(SystemExit) as exc:
        sm_sweep.main(["--dry-run", "--iters", "0"])
    assert exc.value.code == 2


def test_switch_is_timed_through_the_real_engine_on_cpu(tmp_path):
    out = tmp_path / "w.json"
    assert switch_latency.main(["--dry-run", "--switches", "2", "--dwell", "0", "--decode-requests", "2",
                                "--prompt-len", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    samples = data["engine_switch"]["samples"]
    assert len(samples) == 2
    # each switch moved to a different split, and the engine's histogram recorded it
    assert samples[0]["to_prefill_sms"] != samples[1]["to_prefill_sms"]
    assert all(s["metric_ms"] > 0 and s["wall_ms"] > 0 for s in samples)
    assert data["controller_us"] > 0


def test_kernel_bench_dry_run_times_every_kernel_and_shape(tmp_path):
    # A subprocess: the script sets TRITON_INTERPRET=1 before importing the kernels, which only works in a fresh
    # interpreter (decoration fixes the mode), and that must not leak into this one.
    out = tmp_path / "k.json"
    done = subprocess.run([sys.executable, bench_kernels.__file__, "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    s = bench_kernels.TINY
    expected = {"decode_attention": len(s.decode_batches) * len(s.decode_contexts),
                "prefill_attention": len(s.prefill_tokens) + 2,  # fresh prompts, 8 short ones, a chunk
                "store_kv": len(s.rows), "rms_norm": len(s.rows), "rms_norm+residual": len(s.rows),
                "rotary_embedding": len(s.rows), "silu_and_mul": len(s.rows)}
    results = data["results"]
    assert {k: sum(r["kernel"] == k for r in results) for k in expected} == expected
    assert len(results) == sum(expected.values())
    assert data["dry_run"] is True and data["shapes"]["head_dim"] == s.head_dim
    for r in results:
        assert r["bytes"] > 0 and r["ms"] > 0 and r["baseline_ms"] > 0, r
        assert math.isclose(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e9), r
    assert all(r["tflops"] > 0 for r in results if r["kernel"] == "prefill_attention")
    assert all("splits" in r["extra"] for r in results if r["kernel"] == "decode_attention")
    # The table: a device line, the header and its rule, then one row per result.
    lines = done.stdout.splitlines()
    table = lines[1:lines.index(f"wrote {out}")]
    assert lines[0].startswith("cpu (TRITON_INTERPRET=1)")
    assert table[0].split()[:3] == ["kernel", "shape", "ms"] and set(table[1]) <= {"-", " "}
    assert [row.split()[0] for row in table[2:]] == [r["kernel"] for r in results]
