"""`semipd simulate`: predict SLO attainment of semipd pods (or unified serving) with the real policy module.

    semipd simulate --gpu h100 --rate-sweep 20:80:10 --duration 120 --input-len lognormal:150:1.0:4:4096 \\
        --output-len lognormal:120:0.9:2:2048 --slo-ttft 0.3 --slo-tpot 0.15 --mode policy --output sim.json
    semipd simulate fleet --help        # many pods under a bursty diurnal trace, three autoscalers
    semipd simulate compare --help      # regenerate docs/simulate.md's comparisons

Every figure it prints or writes is SIMULATED, and says so."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from semipd.loadgen import report
from semipd.loadgen.args import fraction, length, parse_sweep, positive_float, positive_int
from semipd.loadgen.cli import format_run, format_sweep
from semipd.loadgen.workload import Workload, parse_length, read_jsonl

BANNER = "SIMULATED: figures from a model of the GPU and the engine, not a measurement"
MODES = ("unified", "static", "semipd-rule", "policy")


def _split(text: str) -> float:
    t = text.split("=", 1)[1] if text.startswith("prefill=") else text
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use prefill=0.5 (a share) or prefill=64 (SMs) (got {text!r})") from None
    if v >= 1:
        v = v / 132
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"the prefill share must be in (0, 1) or SMs in [8, 124] (got {text!r})")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GPU and engine model")
    g.add_argument("--gpu", choices=("h100", "h200", "profile"), default="h100",
                   help="analytic roofline of an H100/H200 SXM, or a calibrated profile (--profile)")
    g.add_argument("--profile", metavar="FILE.json", help="step-time profile in bench/sm_sweep.py's JSON format")
    g.add_argument("--model-config", default="llama-3-8b",
                   help="model shapes: a preset (llama-3-8b, llama-3-70b, qwen3-8b) or a HF config.json")
    g.add_argument("--max-num-seqs", type=positive_int, default=512, help="decode batch limit per pod")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="prefill token budget per step (unified: prefill + decode tokens per step)")
    g.add_argument("--num-kv-blocks", type=positive_int,
                   help="KV blocks of 16 tokens per pod (default: what fits in the GPU's memory beside the weights)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semipd simulate", description=__doc__.split("\n\n")[0] + " " + BANNER,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    load = p.add_argument_group("load (the same workload description as semipd bench)")
    rate = load.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=positive_float, help="requests per second")
    rate.add_argument("--rate-sweep", type=parse_sweep, metavar="START:STOP:STEP", help="rates to sweep")
    size = load.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=positive_int, help="requests per rate (default 1000 unless --duration)")
    size.add_argument("--duration", type=positive_float, help="seconds of arrivals per rate")
    load.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    load.add_argument("--input-len", type=length, default=parse_length("lognormal:150:1.0:4:4096"),
                      help="prompt tokens: N, uniform:LOW:HIGH or lognormal:MEDIAN[:SIGMA[:LOW:HIGH]]")
    load.add_argument("--output-len", type=length, default=parse_length("lognormal:120:0.9:2:2048"),
                      help="output tokens, same forms")
    load.add_argument("--dataset", metavar="FILE.jsonl", help="JSONL of lengths (input_tokens, output_tokens)")
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths")
    add_model_args(p)
    ctl = p.add_argument_group("who moves the split")
    ctl.add_argument("--mode", choices=MODES, default="policy",
                     help="unified: one time-shared GPU; static: the split stays; semipd-rule: semi-PD's feedback "
                          "rule; policy: semipd.policy.decide")
    ctl.add_argument("--policy-mode", choices=("inprocess", "operator"), default="inprocess",
                     help="inprocess: the engine's own SLO loop on exact measurements; operator: Prometheus-scraped "
                          "histograms, windowed and delayed")
    ctl.add_argument("--split", type=_split, default=0.5, help="start-up split: prefill=0.5 or prefill=64")
    ctl.add_argument("--pods", type=positive_int, default=1, help="pods behind a least-loaded router")
    slo = p.add_argument_group("SLOs")
    slo.add_argument("--slo-ttft", type=positive_float, metavar="SECONDS", help="TTFT target")
    slo.add_argument("--slo-tpot", type=positive_float, metavar="SECONDS", help="TPOT target")
    slo.add_argument("--goal", type=fraction, default=0.9, help="attainment the highest-rate figure is read at")
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.json", help="write the result document (semipd bench's format)")
    out.add_argument("--csv", metavar="FILE.csv", help="one row per request")
    out.add_argument("--plot", metavar="FILE.png", help="P90/P99 TTFT and TPOT and attainment versus rate")
    out.add_argument("--label", help="name of this run in the JSON and plot legends")
    out.add_argument("--quiet", action="store_true", help="only the sweep table")
    return p


def _check_outputs(parser, args) -> None:
    for flag in ("output", "csv", "plot"):
        path = getattr(args, flag, None)
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"argument --{flag}: the folder of {path} does not exist")


def build_model(parser, args):
    from semipd.sim.models import GPUS, kv_blocks_for, make_model
    from semipd.sim.pod import PodConfig
    if args.gpu == "profile" and not args.profile:
        parser.error("argument --gpu profile: needs --profile FILE.json")
    if args.profile and args.gpu != "profile":
        parser.error("argument --profile: use it with --gpu profile")
    try:
        model, gpu, shape = make_model(args.gpu, args.model_config, args.profile)
    except ValueError as exc:
        parser.error(str(exc))
    if args.gpu == "profile" and "200" in str(getattr(model, "meta", {}).get("device", "")):
        gpu = GPUS["h200"]
    blocks = args.num_kv_blocks or kv_blocks_for(gpu, shape, args.block_size)
    if blocks < 1:
        parser.error(f"the model's weights do not leave room for a KV cache on {gpu.name}; give --num-kv-blocks")
    cfg = PodConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    num_kv_blocks=blocks, block_size=args.block_size, record_itl=True)
    return model, cfg


def make_controller(mode: str, policy_mode: str, slo: report.SLO, split: float):
    from semipd.sim import control
    if mode in ("unified", "static"):
        return control.Static()
    if mode == "semipd-rule":
        return control.SemiPDRule(slo.ttft_s, slo.tpot_s)
    if policy_mode == "operator":
        return control.OperatorPolicy(control.operator_config(slo.ttft_s, slo.tpot_s, initial=split))
    return control.InProcessPolicy(control.inprocess_settings(slo.ttft_s, slo.tpot_s))


def _workload(parser, args) -> Workload:
    inp, outp = args.input_len, args.output_len
    if args.dataset:
        try:
            d_in, d_out, prompts = read_jsonl(args.dataset)
        except ValueError as exc:
            parser.error(f"argument --dataset: {exc}")
        if prompts:
            parser.error("argument --dataset: the simulator needs lengths (input_tokens), not prompts")
        inp, outp = d_in or inp, d_out or outp
    num = args.num_requests if args.num_requests or args.duration else 1000
    rate = args.rate if args.rate is not None else args.rate_sweep[0]
    try:
        return Workload(rate=rate, input=inp, output=outp, burstiness=args.burstiness, num_requests=num,
                        duration_s=args.duration, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))


def simulate_sweep(workload, rates, model, cfg, mode, policy_mode, slo, split, pods=1, progress=None,
                   keep_requests=True) -> list[dict]:
    from semipd.sim.run import run_pods, sweep
    kind = "unified" if mode == "unified" else "semipd"

    def one(reqs):
        return run_pods(reqs, model, kind, cfg, make_controller(mode, policy_mode, slo, split), pods, split)
    return sweep(workload, rates, one, slo, progress, keep_requests)


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_outputs(parser, args)
    if args.mode == "policy" and not (args.slo_ttft or args.slo_tpot):
        parser.error("--mode policy needs a target: --slo-ttft and/or --slo-tpot")
    if args.mode == "semipd-rule" and not (args.slo_ttft or args.slo_tpot):
        parser.error("--mode semipd-rule needs a target: --slo-ttft and/or --slo-tpot")
    workload = _workload(parser, args)
    model, cfg = build_model(parser, args)
    rates = [args.rate] if args.rate is not None else args.rate_sweep
    slo = report.SLO(args.slo_ttft, args.slo_tpot, args.goal)
    label = args.label or f"{args.mode}{'-' + args.policy_mode if args.mode == 'policy' else ''} {args.gpu}"
    print(f"{BANNER}\nmodel: {model.name}; mode {args.mode}; {args.pods} pod(s)", flush=True)
    started = time.monotonic()

    def progress(rate, summary, out):
        if not args.quiet:
            print(f"[SIMULATED] {format_run(rate, summary, slo)}\n  switches {out.extra()['switches']}, "
                  f"final split {out.extra()['final_splits']}, preemptions {out.extra()['preemptions']} "
                  f"({time.monotonic() - started:.1f} s so far)", flush=True)
    runs = simulate_sweep(workload, rates, model, cfg, args.mode, args.policy_mode, slo, args.split, args.pods,
                          progress)
    print("SIMULATED" + format_sweep(runs, args.goal))
    doc = report.document(tool="semipd simulate", label=label, workload=workload.describe(), slo=slo, runs=runs,
                          simulated=True, extra={"sim": {"model": model.describe(), "mode": args.mode,
                                                         "policy_mode": args.policy_mode, "pods": args.pods,
                                                         "split": args.split, "max_num_seqs": cfg.max_num_seqs,
                                                         "max_num_batched_tokens": cfg.max_num_batched_tokens,
                                                         "num_kv_blocks": cfg.num_kv_blocks}})
    if args.output:
        report.write_json(args.output, doc)
        print(f"wrote {args.output} (simulated)")
    if args.csv:
        report.write_csv(args.csv, runs)
        print(f"wrote {args.csv} (simulated)")
    if args.plot:
        from semipd.loadgen.plots import plot_sweep
        plot_sweep([doc], args.plot)
        print(f"wrote {args.plot} (simulated)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "fleet":
            from semipd.sim.fleet import main as fleet_main
            return fleet_main(argv[1:])
        if argv and argv[0] == "compare":
            from semipd.sim.compare import main as compare_main
            return compare_main(argv[1:])
        return _main(argv)
    except SystemExit as exc:       # argparse's usage errors: exit 2, help: 0
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
