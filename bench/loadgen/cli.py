"""`semipd bench`: drive any OpenAI-compatible server (semipd, vLLM, SGLang, ...) with streaming requests at a
request rate or a sweep of rates, open loop, and report TTFT, TPOT, ITL and end-to-end latency percentiles, SLO
attainment, goodput and, over a sweep, the highest rate meeting the attainment goal.

    semipd bench --url http://127.0.0.1:8000 --rate 4 --num-requests 200 --input-len 512 --output-len 128
    semipd bench --url http://127.0.0.1:8000 --rate-sweep 1:8:1 --duration 60 --slo-ttft 0.5 --slo-tpot 0.05 \\
        --output sweep.json --csv sweep.csv --plot sweep.png
    semipd bench plot measured.json simulated.json --output fig.png

Definitions, the JSON schema and more examples: docs/bench.md."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from semipd.loadgen import report
from semipd.loadgen.args import (fraction, length, nonnegative_int, parse_sweep, positive_float, positive_int,
                                  temperature, url)
from semipd.loadgen.workload import Workload, read_jsonl

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semipd bench", description=__doc__,
                                formatter_class=type("F", (argparse.ArgumentDefaultsHelpFormatter,
                                                           argparse.RawDescriptionHelpFormatter), {}))
    p.add_argument("--url", type=url, required=True,
                   help="the server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="POST /v1/completions or /v1/chat/completions")
    p.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=None,
                   help="bearer token (default: $OPENAI_API_KEY if set); never printed or written")
    load = p.add_argument_group("load")
    rate = load.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=positive_float, help="requests per second")
    rate.add_argument("--rate-sweep", type=parse_sweep, metavar="START:STOP:STEP",
                      help="run each rate in turn (STOP included), e.g. 1:8:1")
    size = load.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=positive_int, help="requests per rate (default 100 unless --duration)")
    size.add_argument("--duration", type=positive_float, help="seconds of arrivals per rate")
    load.add_argument("--burstiness", type=positive_float, default=1.0,
                      help="gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier, > 1 more regular")
    load.add_argument("--input-len", type=length, default="128",
                      help="prompt tokens: N, fixed:N, uniform:LOW:HIGH or lognormal:MEDIAN[:SIGMA[:LOW:HIGH]]")
    load.add_argument("--output-len", type=length, default="64",
                      help="output tokens (sent as max_tokens with ignore_eos), same forms as --input-len")
    load.add_argument("--dataset", metavar="FILE.jsonl",
                      help='JSONL of lengths {"input_tokens": N, "output_tokens": M} or of prompts {"prompt": "...", '
                           '"output_tokens": M}; what it gives replaces --input-len/--output-len')
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompt words")
    load.add_argument("--max-concurrency", type=positive_int,
                      help="at most this many requests in flight (default: no cap, pure open loop)")
    load.add_argument("--warmup", type=nonnegative_int, default=0,
                      help="requests sent one by one before the run, not counted")
    req = p.add_argument_group("requests")
    req.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request before it fails")
    req.add_argument("--temperature", type=temperature, default=0.0)
    req.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="do not send ignore_eos (a vLLM extension) so outputs may end early")
    slo = p.add_argument_group("SLOs")
    slo.add_argument("--slo-ttft", type=positive_float, metavar="SECONDS", help="TTFT target")
    slo.add_argument("--slo-tpot", type=positive_float, metavar="SECONDS", help="TPOT target")
    slo.add_argument("--goal", type=fraction, default=0.9,
                     help="attainment target a sweep's highest rate is read at")
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.json", help="write the result document (docs/bench.md)")
    out.add_argument("--csv", metavar="FILE.csv", help="write one row per request")
    out.add_argument("--plot", metavar="FILE.png", help="write P90/P99 TTFT and TPOT and attainment versus rate")
    out.add_argument("--label", help="name of this run in the JSON and in plot legends (default: model@host)")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (it is off anyway when stderr is not a terminal)")
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semipd bench plot", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="overlay several `semipd bench` / `semipd simulate` results in one PNG "
                                            "(P90/P99 TTFT and TPOT and attainment versus rate); simulated results "
                                            "are labelled so")
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--output", "-o", metavar="FILE.png", required=True)
    return p


def _workload(args, parser) -> Workload:
    inp, outp, prompts = args.input_len, args.output_len, ()
    if args.dataset:
        try:
            d_in, d_out, prompts = read_jsonl(args.dataset)
        except ValueError as exc:
            parser.error(f"argument --dataset: {exc}")
        inp = d_in or inp
        outp = d_out or outp
    num = args.num_requests if args.num_requests or args.duration else 100
    rate = args.rate if args.rate is not None else args.rate_sweep[0]
    return Workload(rate=rate, input=inp, output=outp, burstiness=args.burstiness, num_requests=num,
                    duration_s=args.duration, seed=args.seed, prompts=prompts)


# --- printing --------------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return f"{v * 1000:9.1f}" if v is not None else f"{'-':>9}"


def format_run(rate: float, summary: dict, slo: report.SLO) -> str:
    s = summary
    lines = [f"rate {rate:g} req/s: {s['completed']}/{s['requests']} completed in {s['duration_s']:.2f} s, "
             f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
             f"{s['input_throughput']:.1f} input tok/s",
             f"  {'(ms)':<6}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}"]
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        st = s[key]
        lines.append(f"  {name:<6}{_ms(st['p50'])}{_ms(st['p90'])}{_ms(st['p99'])}{_ms(st['mean'])}")
    targets = [f"TTFT <= {slo.ttft_s * 1000:g} ms" for _ in [0] if slo.ttft_s is not None] + \
              [f"TPOT <= {slo.tpot_s * 1000:g} ms" for _ in [0] if slo.tpot_s is not None]
    att = s["attainment"]
    lines.append(f"  SLO attainment {att * 100:.1f}% ({s['slo_met']}/{s['requests']}"
                 f"{'; ' + ', '.join(targets) if targets else '; no SLO given: every completed request counts'}), "
                 f"goodput {s['goodput']:.2f} req/s" if att is not None else "  no requests")
    for reason, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  failed x{n}: {reason}")
    return "\n".join(lines)


def format_sweep(runs: list[dict], goal: float) -> str:
    lines = ["", f"{'rate':>8}{'attain':>8}{'goodput':>9}{'p90 TTFT':>10}{'p90 TPOT':>10}{'failed':>8}"]
    for run in runs:
        s = run["summary"]
        lines.append(f"{run['rate']:>8g}{s['attainment'] * 100:>7.1f}%{s['goodput']:>9.2f}"
                     f"{_ms(s['ttft_s']['p90']):>10}{_ms(s['tpot_s']['p90']):>10}{s['failed']:>8}")
    best = report.max_rate_at(runs, goal)
    lines.append(f"highest rate with attainment >= {goal * 100:g}%: "
                 + (f"{best:g} req/s" if best is not None else f"none (the lowest rate, {runs[0]['rate']:g} req/s, "
                                                              "already misses it)"))
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------------------

async def _bench(args, workload: Workload, rates: list[float], slo: report.SLO) -> int:
    from semipd.loadgen import client as cl

    target = cl.Target(args.url, endpoint=args.endpoint, model=args.model,
                       api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
                       timeout_s=args.timeout, ignore_eos=args.ignore_eos, temperature=args.temperature)
    progress = args.progress and sys.stderr.isatty()
    async with cl.make_client(args.max_concurrency, args.timeout) as http:
        models = await cl.list_models(http, target)
        if target.model is None:
            if not models:
                raise cl.BenchError(f"the server at {target.base_url} lists no models; pass --model")
            target.model = models[0]
        elif target.model not in models:
            print(f"semipd bench: warning: {target.model!r} is not in the server's model list {models}",
                  file=sys.stderr)
        prompts = cl.PromptFactory(seed=args.seed)
        if not workload.prompts:
            await prompts.calibrate(http, target)
        label = args.label or f"{target.model}@{target.base_url.split('://', 1)[1]}"
        print(f"semipd bench: {target.model} at {target.url}, prompts {prompts.method}"
              + (f" ({prompts.calibration_requests} calibration requests)" if prompts.calibration_requests else ""),
              flush=True)
        if args.warmup:
            warm = workload.requests()[:args.warmup]
            while len(warm) < args.warmup:
                warm += warm[:args.warmup - len(warm)]
            bad = [r for r in await cl.warm_up(http, target, warm, prompts) if r.error]
            if bad:
                print(f"semipd bench: warning: {len(bad)} of {args.warmup} warm-up requests failed "
                      f"({bad[0].error})", file=sys.stderr)
        runs: list[dict] = []
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for rate in rates:
            wl = workload.at_rate(rate)
            specs = wl.requests()
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(specs), desc=f"{rate:g} req/s", unit="req", leave=False, file=sys.stderr)
            results, duration = await cl.run_trace(http, target, specs, prompts, args.max_concurrency,
                                                   on_done=(lambda _r: bar.update(1)) if bar else None)
            if bar is not None:
                bar.close()
            summary = report.summarize(results, duration, slo)
            runs.append({"rate": rate, "summary": summary, "requests": [r.record() for r in results]})
            print(format_run(rate, summary, slo), flush=True)
            _write(args, label, workload, slo, runs, target, prompts, started, final=False)
        if len(rates) > 1:
            print(format_sweep(runs, slo.attainment), flush=True)
        _write(args, label, workload, slo, runs, target, prompts, started, final=True)
    return 0


def _write(args, label, workload, slo, runs, target, prompts, started, final: bool) -> None:
    """After every rate (so an interrupted sweep keeps what it measured) and at the end."""
    if args.output:
        described = workload.describe()
        if args.rate_sweep:
            described["rates"] = args.rate_sweep
        doc = report.document("semipd bench", label, described, slo, runs, simulated=False, extra={
            "server": {"url": target.base_url, "endpoint": target.endpoint, "model": target.model},
            "client": {"max_concurrency": args.max_concurrency, "timeout_s": args.timeout,
                       "ignore_eos": args.ignore_eos, "temperature": args.temperature, "warmup": args.warmup},
            "prompts": prompts.describe(), "started_at": started, "complete": final})
        report.write_json(args.output, doc)
    if final and args.csv:
        report.write_csv(args.csv, runs)
    if final and args.plot:
        from semipd.loadgen.plots import plot_sweep
        plot_sweep([{"label": label, "simulated": False, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                                                                 "attainment": slo.attainment}, "runs": runs}],
                   args.plot)


def _plot_main(argv: list[str]) -> int:
    p = _plot_parser()
    args = p.parse_args(argv)
    docs = []
    for path in args.results:
        try:
            docs.append(report.read_json(path))
        except (OSError, ValueError) as exc:
            print(f"semipd bench plot: {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 1
    from semipd.loadgen.plots import plot_sweep
    plot_sweep(docs, args.output)
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        return _plot_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in ("output", "csv", "plot"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"argument --{flag}: the folder of {path} does not exist")
    try:
        workload = _workload(args, parser)
    except ValueError as exc:
        parser.error(str(exc))
    rates = args.rate_sweep or [args.rate]
    slo = report.SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot, attainment=args.goal)
    from semipd.loadgen.client import BenchError
    try:
        return asyncio.run(_bench(args, workload, rates, slo))
    except BenchError as exc:
        print(f"semipd bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("semipd bench: interrupted; rates finished so far are in --output", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
