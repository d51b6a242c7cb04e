"""`semipd simulate compare`: regenerate docs/simulate.md's two SIMULATED comparisons into one folder.

(i) Llama-3-8B on H100 and H200, ShareGPT-like lognormal lengths, SLOs from semi-PD's Table 2 (Llama3-8B,
    ShareGPT, tight: TTFT 0.3 s, TPOT 0.15 s): unified vs static vs semi-PD's rule vs our policy (in-process and
    operator mode) over one rate sweep; each mode's highest rate at 90 % attainment. One JSON per GPU and mode
    (semipd bench's format, simulated=True), one PNG per GPU, one table.
(ii) the fleet: at most 50 pods under a generated bursty diurnal day; GPU-hours and attainment of our joint
    split+replica policy vs a Dynamo-like planner vs a KEDA-like queue autoscaler. One JSON, one PNG, one table."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from semipd.loadgen import report
from semipd.loadgen.workload import Workload, parse_length

SWEEP_MODES = (("unified", "inprocess"), ("static", "inprocess"), ("semipd-rule", "inprocess"),
               ("policy", "inprocess"), ("policy", "operator"))


def _label(mode, policy_mode):
    return f"{mode} ({policy_mode})" if mode == "policy" else mode


def single_pod(out: Path, gpus, rates, duration, args, progress) -> str:
    from semipd.loadgen.plots import plot_sweep
    from semipd.sim.cli import simulate_sweep
    from semipd.sim.models import kv_blocks_for, make_model
    from semipd.sim.pod import PodConfig
    slo = report.SLO(args.slo_ttft, args.slo_tpot, 0.9)
    workload = Workload(rate=rates[0], input=parse_length(args.input_len), output=parse_length(args.output_len),
                        duration_s=duration, seed=args.seed)
    table = {}
    for gpu in gpus:
        model, g, shape = make_model(gpu, "llama-3-8b")
        cfg = PodConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        num_kv_blocks=kv_blocks_for(g, shape), record_itl=True)
        docs = []
        for mode, pmode in SWEEP_MODES:
            started = time.monotonic()
            runs = simulate_sweep(workload, rates, model, cfg, mode, pmode, slo, 0.5, keep_requests=False)
            label = f"{_label(mode, pmode)} {gpu}"
            doc = report.document("semipd simulate", label, workload.describe(), slo, runs, simulated=True,
                                  extra={"sim": {"model": model.describe(), "mode": mode, "policy_mode": pmode,
                                                 "max_num_seqs": cfg.max_num_seqs,
                                                 "max_num_batched_tokens": cfg.max_num_batched_tokens,
                                                 "num_kv_blocks": cfg.num_kv_blocks}})
            report.write_json(out / f"sweep-{gpu}-{mode}-{pmode}{args.tag}.json", doc)
            docs.append(doc)
            table[(gpu, _label(mode, pmode))] = (doc["max_rate_at_goal"], runs)
            progress(f"[SIMULATED] {gpu} {_label(mode, pmode)}: highest rate at 90 % attainment "
                     f"{doc['max_rate_at_goal']} req/s ({time.monotonic() - started:.0f} s)")
        plot_sweep(docs, out / f"sweep-{gpu}{args.tag}.png")
    lines = [f"SIMULATED: Llama-3-8B, highest rate (req/s) with >= 90 % of requests meeting TTFT <= {slo.ttft_s:g} s "
             f"and TPOT <= {slo.tpot_s:g} s",
             "| mode | " + " | ".join(f"{g.upper()} rate@90%" for g in gpus) + " | " +
             " | ".join(f"{g.upper()} vs unified" for g in gpus) + " |",
             "|---|" + "---|" * (2 * len(gpus))]
    for mode, pmode in SWEEP_MODES:
        key = _label(mode, pmode)
        vals = [table[(g, key)][0] for g in gpus]
        base = [table[(g, "unified")][0] for g in gpus]
        ratio = [f"{v / b:.2f}x" if v and b else "-" for v, b in zip(vals, base)]
        lines.append(f"| {key} | " + " | ".join(str(v) for v in vals) + " | " + " | ".join(ratio) + " |")
    lines += ["", "SIMULATED attainment per rate (%):", "| GPU | mode | " + " | ".join(f"{r:g}" for r in rates) + " |",
              "|---|---|" + "---|" * len(rates)]
    for gpu in gpus:
        for mode, pmode in SWEEP_MODES:
            key = _label(mode, pmode)
            runs = table[(gpu, key)][1]
            lines.append(f"| {gpu} | {key} | " + " | ".join(f"{r['summary']['attainment'] * 100:.0f}" for r in runs)
                         + " |")
    text = "\n".join(lines)
    (out / f"sweep-table{args.tag}.md").write_text(text + "\n")
    return text


def fleet(out: Path, args, progress) -> str:
    from semipd.sim.fleet import compare_fleet, format_table, plot_fleet
    from semipd.sim.models import kv_blocks_for, make_model
    from semipd.sim.pod import PodConfig
    from semipd.sim.traces import DayTrace
    model, g, shape = make_model("h100", "llama-3-8b")
    cfg = PodConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    num_kv_blocks=kv_blocks_for(g, shape), record_itl=False)
    trace = DayTrace(mean_rate=args.fleet_rate, day_s=args.fleet_day, seed=args.seed)
    slo = report.SLO(0.3, 0.15, 0.9)
    rows, outcomes, capacity = compare_fleet(model, cfg, trace, slo, ["ours", "dynamo", "keda"], 50, args.startup,
                                             0.5, None, progress=progress)
    doc = {"tool": "semipd simulate compare (fleet)", "simulated": True, "trace": trace.describe(),
           "slo": {"ttft_s": 0.3, "tpot_s": 0.15, "attainment": 0.9}, "model": model.describe(),
           "pod_capacity_rps": capacity, "startup_s": args.startup, "max_pods": 50, "rows": rows,
           "timelines": {o.autoscaler: o.timeline for o in outcomes},
           "logs": {o.autoscaler: o.log[-400:] for o in outcomes}}
    (out / "fleet.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_fleet(outcomes, trace, out / "fleet.png")
    text = format_table(rows) + f"\n(pod capacity for the dynamo-like planner: {capacity:g} req/s)"
    (out / "fleet-table.txt").write_text(text + "\n")
    return text


def main(argv: list[str]) -> int:
    from semipd.loadgen.args import parse_sweep, positive_float, positive_int
    p = argparse.ArgumentParser(prog="semipd simulate compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="docs/sim-results", help="folder for the JSON, PNG and tables")
    p.add_argument("--only", choices=("sweep", "fleet"), help="one of the two comparisons")
    p.add_argument("--gpus", default="h100,h200", help="comma-separated: h100, h200")
    p.add_argument("--rate-sweep", type=parse_sweep, default=parse_sweep("30:90:10"), metavar="START:STOP:STEP")
    p.add_argument("--duration", type=positive_float, default=120.0, help="seconds of arrivals per rate")
    p.add_argument("--input-len", default="lognormal:150:1.0:4:4096", help="ShareGPT-like prompts (mean ~250)")
    p.add_argument("--output-len", default="lognormal:120:0.9:2:2048", help="ShareGPT-like outputs (mean ~180)")
    p.add_argument("--max-num-seqs", type=positive_int, default=512, help="semi-PD's evaluation used 512")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.add_argument("--fleet-rate", type=positive_float, default=150.0, help="mean req/s of the day")
    p.add_argument("--fleet-day", type=positive_float, default=900.0, help="simulated seconds standing for 24 h")
    p.add_argument("--startup", type=positive_float, default=90.0, help="pod start-up seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=positive_float, default=0.3, help="semi-PD Table 2, Llama3-8B ShareGPT tight")
    p.add_argument("--slo-tpot", type=positive_float, default=0.15, help="semi-PD Table 2, Llama3-8B ShareGPT tight")
    p.add_argument("--tag", default="", help="suffix of the sweep's file names (another SLO set)")
    args = p.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if any(g not in ("h100", "h200") for g in gpus):
        p.error("argument --gpus: use h100 and/or h200")
    for spec in (args.input_len, args.output_len):
        try:
            parse_length(spec)
        except ValueError as exc:
            p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("SIMULATED comparisons: figures from a model of the GPU and the engine, not a measurement", flush=True)

    def progress(s):
        print(s, flush=True)
    if args.only in (None, "sweep"):
        print(single_pod(out, gpus, args.rate_sweep, args.duration, args, progress), flush=True)
    if args.only in (None, "fleet"):
        print(fleet(out, args, progress), flush=True)
    print(f"wrote {out}/ (simulated)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
