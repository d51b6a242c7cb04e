"""semipd simulate: the latency models, the pod's scheduling rules, the controllers, the CLI. All simulated."""
import json
import math

import pytest

from semipd.loadgen import report
from semipd.loadgen.report import SLO, summarize
from semipd.loadgen.workload import RequestSpec, Workload, parse_length
from semipd.sim import control
from semipd.sim.cli import main as cli_main
from semipd.sim.metrics import histogram_quantile
from semipd.sim.models import GPUS, PRESETS, Profile, Roofline, kv_blocks_for, make_model, model_shape
from semipd.sim.pod import Clock, PodConfig, make_pod, split_sms
from semipd.sim.run import run_pods
from semipd.sim.traces import DayTrace

pytestmark = pytest.mark.unit

H100 = Roofline(GPUS["h100"], PRESETS["llama-3-8b"])
SMALL = PodConfig(max_num_seqs=64, max_num_batched_tokens=512, num_kv_blocks=4000, block_size=16)


def profile_data():
    """A profile in sm_sweep.py's format: prefill a/x + b, decode saturating at 64 SMs, two decode contexts."""
    rows = []
    for p in (16, 64, 112):
        d = 132 - p
        for n in (512, 2048):
            ms = 0.02 * n * 132 / p + 1
            rows.append({"target": f"split {p}", "prefill_sms": p, "decode_sms": d, "phase": "prefill", "size": n,
                         "alone_ms": ms, "with_other_ms": ms * 1.1, "partner": "decode B=16", "samples": 5})
        for b in (1, 64):
            for ctx in (512, 2048):
                ms = (5 + 0.002 * b * ctx / 64) * 64 / min(d, 64)
                rows.append({"target": f"split {p}", "prefill_sms": p, "decode_sms": d, "phase": "decode",
                             "size": b, "context": ctx, "alone_ms": ms, "with_other_ms": ms * 1.2,
                             "partner": "prefill N=2048", "samples": 20})
    return {"meta": {"device": "test", "sms": 132, "context": 1024}, "rows": rows}


# ---- latency models ------------------------------------------------------------------------------------------

def test_roofline_decode_faster_with_more_sms_then_saturates():
    t = [H100.decode(32, 32 * 1024, s / 132) for s in (16, 32, 48, 66, 100, 132)]
    assert t[0] > t[1] > t[2] > t[3]
    assert t[3] == pytest.approx(t[4]) == pytest.approx(t[5])


def test_roofline_prefill_compute_bound_inverse_share_with_quadratic_attention():
    a, b = H100.prefill([(2048, 0)], 0.25), H100.prefill([(2048, 0)], 0.5)
    assert a / b == pytest.approx(2.0, rel=0.05)
    # attention's quadratic term: one 4096 prompt costs more than two 2048 ones
    assert H100.prefill([(4096, 0)], 1.0) > H100.prefill([(2048, 0), (2048, 0)], 1.0)
    # Llama-3-8B bf16 weights, 128 KiB of KV per token (research/anchors.md)
    shape = PRESETS["llama-3-8b"]
    assert shape.weight_bytes / 1e9 == pytest.approx(16.06, abs=0.01)
    assert shape.kv_bytes_per_token == 128 * 1024


def test_h200_decodes_faster_than_h100_and_holds_more_kv():
    h200 = Roofline(GPUS["h200"], PRESETS["llama-3-8b"])
    assert h200.decode(64, 64 * 1024, 1.0) < H100.decode(64, 64 * 1024, 1.0)
    assert kv_blocks_for(GPUS["h200"], PRESETS["llama-3-8b"]) > 2 * kv_blocks_for(GPUS["h100"], PRESETS["llama-3-8b"])


def test_model_config_from_hf_json(tmp_path):
    cfg = {"hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
           "intermediate_size": 5632, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    assert (shape.layers, shape.kv_heads, shape.hd) == (4, 4, 128)
    with pytest.raises(ValueError):
        model_shape(str(tmp_path / "nope"))


def test_profile_interpolates_sms_size_context_and_partner():
    prof = Profile(profile_data(), PRESETS["llama-3-8b"])
    # on a profiled point exactly
    assert prof.prefill([(2048, 0)], 64 / 132) * 1000 == pytest.approx(0.02 * 2048 * 132 / 64 + 1)
    # between sizes: linear
    mid = prof.prefill([(1280, 0)], 64 / 132)
    assert prof.prefill([(512, 0)], 64 / 132) < mid < prof.prefill([(2048, 0)], 64 / 132)
    # with the other phase busy: with_other_ms
    assert prof.prefill([(2048, 0)], 64 / 132, other_busy=True) == pytest.approx(
        1.1 * prof.prefill([(2048, 0)], 64 / 132))
    # decode over context: interpolated between the two profiled contexts
    d512, d2048 = prof.decode(64, 64 * 512, 68 / 132), prof.decode(64, 64 * 2048, 68 / 132)
    assert d512 < prof.decode(64, 64 * 1024, 68 / 132) < d2048
    # extrapolating beyond the largest size stays linear and positive
    assert prof.prefill([(4096, 0)], 64 / 132) > prof.prefill([(2048, 0)], 64 / 132) > 0


def test_profile_from_sm_sweep_dry_run_reads(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, "bench/sm_sweep.py", "--dry-run", "--json", str(out)], check=True,
                   capture_output=True)
    prof = Profile.load(out, PRESETS["llama-3-8b"])
    assert prof.decode(16, 16 * 1024, 0.25) > prof.decode(16, 16 * 1024, 0.5) > 0
    with pytest.raises(ValueError):
        Profile({"rows": []})


# ---- the pod -------------------------------------------------------------------------------------------------

def one(prompt, out, t=0.0, i=0):
    return RequestSpec(i, t, prompt, out)


def test_idle_pod_ttft_is_the_models_prefill_time():
    out = run_pods([one(1000, 10)], H100, "semipd", SMALL, split=0.5)
    r = out.results[0]
    share = split_sms(0.5) / 132
    expected = H100.prefill([(512, 0)], share) + H100.prefill([(488, 512)], share)   # chunked under the budget
    assert r.ttft_s == pytest.approx(expected)
    assert r.output_tokens == 10 and len(r.itl_s) == 9


def test_switch_takes_effect_at_the_next_iteration_boundary():
    clock = Clock()
    pod = make_pod("semipd", "p", clock, H100, SMALL, split=0.25, results=[])
    pod.step_log = []
    pod.add(one(512, 1, i=0))
    pod.add(one(512, 1, i=1))
    first_end = pod.step_log[0][2]
    clock.at(first_end / 2, lambda _: pod.set_split(0.75))      # mid-step
    clock.run()
    steps = [s for s in pod.step_log if s[0] == "prefill"]
    assert steps[0][3] == pytest.approx(split_sms(0.25) / 132)  # the running step kept its share
    assert steps[1][3] == pytest.approx(split_sms(0.75) / 132)  # the next one took the new share
    assert steps[1][1] == pytest.approx(first_end)


def test_kv_exhaustion_preempts_and_every_request_finishes():
    cfg = PodConfig(max_num_seqs=32, max_num_batched_tokens=1024, num_kv_blocks=120, block_size=16)
    reqs = [one(200, 300, t=0.01 * i, i=i) for i in range(12)]
    out = run_pods(reqs, H100, "semipd", cfg)
    assert out.extra()["preemptions"] > 0
    assert all(r.ok and r.output_tokens == 300 for r in out.results)
    assert out.pods[0].pool.free == out.pods[0].pool.total      # every block came back
    # the ITLs of a preempted request hold its recompute gap
    assert all(len(r.itl_s) == 299 for r in out.results)


def _decode_tpot_under_prefill_load(kind, prompt_rate):
    # 8 long decodes; then a stream of prompts arriving
    reqs = [one(100, 400, t=0.0, i=i) for i in range(8)]
    n = int(prompt_rate * 4)
    reqs += [one(2000, 2, t=0.5 + 4.0 * j / max(n, 1), i=8 + j) for j in range(n)]
    cfg = PodConfig(max_num_seqs=64, max_num_batched_tokens=2048, num_kv_blocks=20000)
    out = run_pods(reqs, H100, kind, cfg, split=0.5)
    return sorted(r.tpot_s for r in out.results[:8])[4]


def test_unified_tpot_grows_with_prefill_load_semipd_does_not():
    u0, u1 = _decode_tpot_under_prefill_load("unified", 0), _decode_tpot_under_prefill_load("unified", 16)
    s0, s1 = _decode_tpot_under_prefill_load("semipd", 0), _decode_tpot_under_prefill_load("semipd", 16)
    assert u1 > 1.8 * u0            # every mixed step carries the prompts' tokens
    assert s1 < 1.15 * s0           # decode keeps its SMs; only the shared-HBM contention term remains


def test_determinism_per_seed():
    w = Workload(rate=20, input=parse_length("lognormal:200:1.0:4:2048"), output=parse_length("uniform:2:100"),
                 num_requests=200, seed=3)
    a = run_pods(w.requests(), H100, "semipd", SMALL)
    b = run_pods(w.requests(), H100, "semipd", SMALL)
    assert [r.record() for r in a.results] == [r.record() for r in b.results]
    c = run_pods(Workload(**{**w.__dict__, "seed": 4}).requests(), H100, "semipd", SMALL)
    assert [r.ttft_s for r in c.results] != [r.ttft_s for r in a.results]


# ---- controllers ---------------------------------------------------------------------------------------------

def _overload():
    # a TTFT-bound load at a decode-heavy start split: the policy must move SMs to prefill
    return Workload(rate=30, input=parse_length("fixed:1500"), output=parse_length("fixed:20"), duration_s=150,
                    seed=1).requests()


def test_inprocess_policy_calls_semipd_policy_decide_and_moves_the_split():
    ctl = control.InProcessPolicy(control.inprocess_settings(0.3, 0.15))
    out = run_pods(_overload(), H100, "semipd", PodConfig(num_kv_blocks=20000), ctl, split=0.2)
    assert ctl.describe()["decide"] == "semipd.policy.decide"
    reasons = {e["reason"] for e in ctl.log}
    assert "TTFTAboveTarget" in reasons          # semipd.policy's reason names, from its decisions
    assert out.pods[0].split > 0.2 and out.extra()["switches"] >= 1


def test_operator_mode_sees_metrics_later_than_inprocess():
    reqs = _overload()
    first_move = {}
    for name, ctl in (("inprocess", control.InProcessPolicy(control.inprocess_settings(0.3, 0.15))),
                      ("operator", control.OperatorPolicy(control.operator_config(0.3, 0.15, initial=0.2)))):
        run_pods(reqs, H100, "semipd", PodConfig(num_kv_blocks=20000), ctl, split=0.2)
        first_move[name] = min(e["t"] for e in ctl.log if e["changed"])
    assert first_move["operator"] > first_move["inprocess"]


def test_semipd_rule_steps_one_sm_group():
    ctl = control.SemiPDRule(0.3, 0.15, window=10)
    out = run_pods(_overload(), H100, "semipd", PodConfig(num_kv_blocks=20000), ctl, split=0.2)
    moves = [e for e in ctl.log if e["changed"]]
    assert moves and moves[0]["split"] == pytest.approx(split_sms(0.2) / 132 + 8 / 132, abs=1e-3)
    assert out.pods[0].split > 0.2


def test_histogram_quantile_like_prometheus():
    edges = [0.1, 0.5, 1.0]
    assert histogram_quantile(0.5, edges, [0, 10, 10, 10]) == pytest.approx(0.3)
    assert histogram_quantile(0.9, edges, [0, 0, 0, 10]) == 1.0           # in +Inf: the largest finite edge
    assert math.isnan(histogram_quantile(0.9, edges, [0, 0, 0, 0]))


def test_diurnal_trace_is_bursty_and_follows_the_day():
    tr = DayTrace(mean_rate=40, day_s=400, burstiness=0.5, seed=2)
    reqs = tr.requests()
    assert abs(len(reqs) / 400 - 40) < 4
    night = sum(1 for r in reqs if r.arrival_s < 50 or r.arrival_s > 350)
    noon = sum(1 for r in reqs if 150 <= r.arrival_s < 250)
    assert noon > 2 * night
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:]) if 150 <= a.arrival_s < 250]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 1.2                  # gamma shape 0.5 gives cv ~ 1.41; Poisson would give 1


def test_fleet_scales_out_and_costs_gpu_time():
    from semipd.sim.fleet import run_fleet
    reqs = DayTrace(mean_rate=25, day_s=300, seed=1).requests()
    o = run_fleet(reqs, H100, PodConfig(num_kv_blocks=20000, record_itl=False), "keda", SLO(0.3, 0.15), None,
                  max_pods=6, startup_s=30)
    assert max(n for _, n, _ in o.timeline) > 1
    assert o.gpu_hours > o.duration_s / 3600          # more than one pod's worth
    assert all(r.ok for r in o.results)


# ---- the CLI -------------------------------------------------------------------------------------------------

def test_cli_writes_a_simulated_report(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = cli_main(["--rate-sweep", "5:10:5", "--num-requests", "60", "--slo-ttft", "0.3", "--slo-tpot", "0.15",
                   "--mode", "policy", "--output", str(out), "--csv", str(tmp_path / "s.csv")])
    assert rc == 0
    doc = report.read_json(out)
    assert doc["simulated"] is True and doc["tool"] == "semipd simulate"
    assert [r["rate"] for r in doc["runs"]] == [5, 10] and doc["max_rate_at_goal"] == 10
    assert "SIMULATED" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--rate", "0"],
    ["--rate", "1", "--rate-sweep", "1:2:1"],
    ["--rate", "1", "--gpu", "a100"],
    ["--rate", "1", "--gpu", "profile", "--mode", "static"],
    ["--rate", "1", "--mode", "policy"],
    ["--rate", "1", "--input-len", "lognormal:x"],
    ["--rate", "1", "--split", "prefill=2.5"],
    ["--rate", "1", "--mode", "static", "--model-config", "/nonexistent"],
    ["--rate", "1", "--output", "/nonexistent/dir/x.json"],
    ["fleet", "--amplitude", "1.5"],
])
def test_bad_flags_exit_2(argv, capsys):
    assert cli_main(argv) == 2
    assert "error" in capsys.readouterr().err
