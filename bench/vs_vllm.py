"""semipd against vLLM's CPU build, side by side on this machine: output throughput, TTFT, TPOT and ITL on the
same model, the same client and the same requests, and a check that both produce the same greedy token ids.

For each of --rounds rounds the two servers are started in turn, never both at once, and the order alternates
round by round (semipd first in round 1, vLLM first in round 2, ...), so a machine that slows down or speeds up
over the run does not favour one system. Each server gets --warmup unmeasured requests, then every workload:

  burst-uniform     bench_engine's workload: --num-requests requests at t=0, prompts of --prompt-len tokens and
                    outputs of --output-len tokens, uniform (the output throughput figure)
  burst-longtail    the same prompts, bench_engine's long-tail output lengths (75% short, 25% long)
  light             --light-requests requests at a constant --light-rate req/s, --light-input prompt and
                    --light-output output tokens (the inter-token latency at light load figure: ITL p50/p90)

The requests go out through `semipd bench`'s client (semipd.loadgen: open loop, streamed /v1/completions,
temperature 0, ignore_eos, its TTFT/TPOT/ITL definitions, which are `vllm bench serve`'s) with prompts as token
ids (the tokenizer cannot make them differ) and `return_token_ids`, so the greedy ids of every timed request are
compared between the two systems. The model is bench_engine's cached random Llama (~100M parameters; --quick: a
small one).

vLLM runs from its own virtual environment (--vllm-python; docs/benchmarks.md has the install commands) with
VLLM_TARGET_DEVICE=cpu, VLLM_CPU_KVCACHE_SPACE (GiB, the same as semipd's --kv-cache-memory) and
VLLM_CPU_OMP_THREADS_BIND (every core). Both get the same --dtype explicitly: vLLM's `auto` would run a float32
checkpoint in bfloat16 on a CPU that has it. The `vllm-cpu` package answers importlib.metadata under its own
name, not `vllm`, which vLLM's CLI looks itself up by; the launcher redirects that one lookup.

    python bench/vs_vllm.py --rounds 3 --dtype float32 --output vs_vllm.json
    python bench/vs_vllm.py --rounds 1 --dtype bfloat16
    python bench/vs_vllm.py --quick --rounds 1          # small model, a few requests
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_engine
from bench_engine import ModelShape, make_workload, parse_range, prepare_model, spawn_server, start_server, stop_server

SYSTEMS = ("semipd", "vllm")
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
# `vllm serve` with importlib.metadata.version("vllm") answered by the installed distribution `vllm-cpu`
VLLM_LAUNCHER = ("import importlib.metadata as m, sys; v = m.version; "
                 "m.version = lambda name: v('vllm-cpu' if name == 'vllm' else name); "
                 "sys.argv = ['vllm', *sys.argv[1:]]; from vllm.entrypoints.cli.main import main; sys.exit(main())")
# (label, summary key, percentile or None): what the table shows, in milliseconds except throughput
FIGURES = (("out tok/s", "output_throughput", None), ("TTFT p50", "ttft_s", "p50"), ("TTFT p90", "ttft_s", "p90"),
           ("TPOT p50", "tpot_s", "p50"), ("TPOT p90", "tpot_s", "p90"), ("ITL p50", "itl_s", "p50"),
           ("ITL p90", "itl_s", "p90"))


@dataclass(frozen=True)
class Case:
    name: str
    specs: tuple            # loadgen RequestSpecs whose `prompt` is a list of token ids

    def describe(self) -> dict:
        arrivals = [s.arrival_s for s in self.specs]
        return {"requests": len(self.specs), "last_arrival_s": max(arrivals),
                "prompt_tokens": [s.prompt_tokens for s in self.specs],
                "output_tokens": [s.output_tokens for s in self.specs]}


def make_cases(tokenizer, args) -> list[Case]:
    """The three workloads, seeded: the same requests for both systems and every round."""
    from semipd.loadgen.workload import RequestSpec

    def specs(work, gap_s: float) -> tuple:
        return tuple(RequestSpec(i, i * gap_s, len(p), m, prompt=p)
                     for i, (p, m) in enumerate(zip(work.prompts, work.output_lens)))

    burst = [make_workload(tokenizer, args.num_requests, args.prompt_len, args.output_len, dist, args.seed)
             for dist in ("uniform", "longtail")]
    light = make_workload(tokenizer, args.light_requests, (args.light_input,) * 2, (args.light_output,) * 2,
                          "uniform", args.seed + 1)
    return [Case("burst-uniform", specs(burst[0], 0.0)), Case("burst-longtail", specs(burst[1], 0.0)),
            Case(f"light-{args.light_rate:g}rps", specs(light, 1.0 / args.light_rate))]


# ---- the two servers --------------------------------------------------------------------------------------

def vllm_command(python: str, model_dir: Path, port: int, dtype: str, max_num_seqs: int, kv_gib: float,
                 cores: int, extra: list[str]) -> tuple[list[str], dict]:
    """vLLM's CPU server and the environment it needs, as the harness starts it."""
    cmd = [python, "-c", VLLM_LAUNCHER, "serve", str(model_dir), "--served-model-name", model_dir.name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(max_num_seqs),
           *extra]
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": f"{kv_gib:g}",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}" if cores > 1 else "0"}
    return cmd, env


def semipd_extra(dtype: str, semipd_args: list[str]) -> list[str]:
    """The flags added to bench_engine's `semipd serve` command line (which sets float32, the KV size and
    max-num-seqs); the later --dtype wins."""
    return ["--dtype", dtype, *semipd_args]


@dataclass
class Launched:
    proc: object
    url: str
    command: list[str]
    env: dict


def launch(system: str, args, model_dir: Path, log_path: Path) -> Launched:
    if system == "semipd":
        proc, url, cmd = start_server(model_dir, args.max_num_seqs, semipd_extra(args.dtype, args.semipd_args),
                                      log_path)
        return Launched(proc, url, cmd, {})
    port = bench_engine._free_port()
    cmd, env = vllm_command(args.vllm_python, model_dir, port, args.dtype, args.max_num_seqs, 1, os.cpu_count() or 1,
                            args.vllm_args)
    env |= dict(args.vllm_env)
    # not from the repository root: its operator/ would shadow the standard library's for vLLM's `python -c`
    # and the `python -m` subprocesses it starts
    proc, url = spawn_server(cmd, port, log_path, "vllm serve", env=env, timeout_s=args.start_timeout,
                             cwd=log_path.parent)
    return Launched(proc, url, cmd, env)


async def drive(url: str, model: str, cases: list[Case], warmup: int, timeout_s: float) -> dict:
    """Warm up, then each workload in turn on one server: {case: {"summary", "requests"}}."""
    from semipd.loadgen import client as cl, report
    from semipd.loadgen.workload import RequestSpec

    target = cl.Target(url, model=model, timeout_s=timeout_s, return_token_ids=True)
    prompts = cl.PromptFactory()           # every spec carries its prompt, so nothing to calibrate
    first = cases[0].specs[0]
    out = {}
    async with cl.make_client(None, timeout_s) as http:
        warm = [RequestSpec(-1 - i, 0.0, 8, 4, prompt=first.prompt[:8]) for i in range(warmup)]
        bad = [r.error for r in await cl.warm_up(http, target, warm, prompts) if r.error]
        if bad:
            raise RuntimeError(f"warm-up failed at {url}: {bad[0]}")
        for case in cases:
            results, duration = await cl.run_trace(http, target, list(case.specs), prompts)
            out[case.name] = {"summary": report.summarize(results, duration, report.SLO()),
                              "requests": [r.record() for r in results]}
    return out


# ---- comparing ------------------------------------------------------------------------------------------

def token_agreement(a: list[dict], b: list[dict]) -> dict:
    """How many requests produced the same output ids on both systems (request records with "token_ids"), and
    where the others first differ."""
    same, mismatches, common = 0, [], 0
    for x, y in zip(a, b):
        ids_x, ids_y = x.get("token_ids") or [], y.get("token_ids") or []
        if ids_x and ids_x == ids_y:
            same += 1
            common += len(ids_x)
            continue
        k = next((i for i, (p, q) in enumerate(zip(ids_x, ids_y)) if p != q), min(len(ids_x), len(ids_y)))
        common += k
        mismatches.append({"index": x["index"], "first_difference": k, "lengths": [len(ids_x), len(ids_y)]})
    compared = sum(max(len(x.get("token_ids") or []), len(y.get("token_ids") or [])) for x, y in zip(a, b))
    return {"requests": min(len(a), len(b)), "identical": same, "mismatches": mismatches,
            "tokens_compared": compared, "tokens_before_first_difference": common}


def figure(summary: dict, key: str, pct: str | None) -> float | None:
    value = summary[key] if pct is None else summary[key][pct]
    return value if value is None or pct is None else value * 1e3


def medians(rounds: list[dict], systems: list[str], case_names: list[str]) -> dict:
    """{system: {case: {figure label: median over rounds}}}; a figure no round has is None."""
    out: dict = {}
    for system in systems:
        for name in case_names:
            per = {}
            for label, key, pct in FIGURES:
                values = [figure(r["results"][system][name]["summary"], key, pct) for r in rounds
                          if system in r["results"]]
                values = [v for v in values if v is not None]
                per[label] = statistics.median(values) if values else None
            out.setdefault(system, {})[name] = per
    return out


def format_table(rounds: list[dict], systems: list[str], case_names: list[str]) -> str:
    """Per workload and system: the median over rounds of each figure (ms, tok/s), then each round's tok/s and
    ITL p50; and the greedy ids agreement of each round."""
    med = medians(rounds, systems, case_names)
    head = f"{'workload':<18}{'system':<8}" + "".join(f"{label:>11}" for label, _, _ in FIGURES) + \
        "   per round: tok/s | ITL p50 ms"
    lines = [head, "-" * len(head)]
    for name in case_names:
        for system in systems:
            row = f"{name:<18}{system:<8}"
            for label, _, _ in FIGURES:
                v = med[system][name][label]
                row += f"{v:>11.1f}" if v is not None else f"{'-':>11}"
            per = [r["results"][system][name]["summary"] for r in rounds if system in r["results"]]
            row += "   " + " ".join(f"{s['output_throughput']:.1f}" for s in per) + " | " + \
                " ".join(f"{(s['itl_s']['p50'] or 0) * 1e3:.1f}" for s in per)
            lines.append(row)
        if len(systems) == 2:
            ratio = [med[systems[0]][name]["out tok/s"], med[systems[1]][name]["out tok/s"]]
            itl = [med[systems[0]][name]["ITL p50"], med[systems[1]][name]["ITL p50"]]
            if None not in ratio and None not in itl:
                lines.append(f"{'':<18}semipd/vllm: output tok/s {ratio[0] / ratio[1]:.2f}x, "
                             f"ITL p50 {itl[0] / itl[1]:.2f}x")
    for i, r in enumerate(rounds, 1):
        if r.get("agreement"):
            parts = [f"{name} {a['identical']}/{a['requests']}" for name, a in r["agreement"].items()]
            lines.append(f"round {i} ({' then '.join(r['order'])}): identical greedy ids: {', '.join(parts)}")
    return "\n".join(lines)


# ---- the run ----------------------------------------------------------------------------------------------

def env_pair(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"want NAME=VALUE, got {text!r}")
    return name, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds; the order of the systems alternates")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="passed to both servers explicitly")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="the python of vLLM's CPU venv")
    p.add_argument("--semipd-args", type=shlex.split, default=[],
                   help="extra `semipd serve` flags, one string (e.g. \"--torch-threads 1\")")
    p.add_argument("--vllm-args", type=shlex.split, default=[],
                   help="extra `vllm serve` flags, one string (e.g. \"--max-num-batched-tokens 512\")")
    p.add_argument("--vllm-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="an extra variable for vLLM, repeatable (e.g. LD_PRELOAD=/venv/lib/libiomp5.so, which "
                        "vLLM's CPU docs advise, with tcmalloc)")
    p.add_argument("--skip", choices=SYSTEMS, help="run only the other system (no agreement check)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="both servers' batch limit")
    p.add_argument("--num-requests", "-n", type=int, default=16, help="requests of each burst workload")
    p.add_argument("--prompt-len", type=parse_range, default=(16, 256), help="burst prompts, MIN:MAX uniform")
    p.add_argument("--output-len", type=parse_range, default=(16, 256), help="burst outputs, MIN:MAX")
    p.add_argument("--light-rate", type=float, default=2.0, help="requests/s of the light load (constant gaps)")
    p.add_argument("--light-requests", type=int, default=30)
    p.add_argument("--light-input", type=int, default=64, help="prompt tokens of the light load")
    p.add_argument("--light-output", type=int, default=32, help="output tokens of the light load")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server start")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds vLLM may take to start")
    p.add_argument("--quick", action="store_true",
                   help="small model (hidden 256, 4 layers, vocab 4096), 4 burst requests of 8:64 tokens, 6 light "
                        "ones of 16 in / 8 out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=bench_engine.DEFAULT_CACHE)
    p.add_argument("--output", type=Path, help="write everything (commands, env, every request) to this JSON")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    for flag in ("rounds", "max_num_seqs", "num_requests", "light_requests", "light_input", "light_output"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.light_rate > 0 or args.warmup < 0:
        p.error("--light-rate must be > 0 and --warmup >= 0")
    if "--dtype" in args.semipd_args or any(a.startswith("--dtype=") for a in args.semipd_args + args.vllm_args) \
            or "--dtype" in args.vllm_args:
        p.error("pass the dtype with --dtype (both systems get it), not in --semipd-args/--vllm-args")
    if args.skip != "vllm" and not Path(args.vllm_python).is_file():
        p.error(f"--vllm-python {args.vllm_python}: no such file; create vLLM's CPU venv as docs/benchmarks.md "
                "says (section 'semipd vs vLLM CPU, side by side'), pass its python, or --skip vllm")
    if args.quick:
        if args.num_requests == 16:
            args.num_requests = 4
        args.prompt_len, args.output_len = (8, 64), (8, 64)
        args.light_requests, args.light_input, args.light_output = min(args.light_requests, 6), 16, 8
    return args


def vllm_versions(python: str) -> dict:
    """The versions in vLLM's venv, read outside the repository root (its operator/ shadows the stdlib's)."""
    import subprocess
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({n: m.version(n) for n in ('vllm-cpu', 'torch', 'transformers')}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=tempfile.gettempdir())
        return json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = ModelShape(256, 688, 4, 4, 2, 4096) if args.quick else ModelShape()
    model_dir = prepare_model(shape, args.cache_dir)
    from transformers import AutoTokenizer
    cases = make_cases(AutoTokenizer.from_pretrained(model_dir), args)
    systems = [s for s in SYSTEMS if s != args.skip]
    info = bench_engine.machine_info()
    print(f"model {model_dir} ({shape.name}), dtype {args.dtype}; {info['cpu']}, {info['cores']} cores, "
          f"load average {info['loadavg'][0]:.2f}")
    for case in cases:
        d = case.describe()
        print(f"  {case.name}: {d['requests']} requests over {d['last_arrival_s']:.1f} s, prompt tokens "
              f"{sum(d['prompt_tokens'])}, output tokens {d['output_tokens']}")
    logs = Path(tempfile.mkdtemp(prefix="semipd-vs-vllm-"))
    commands: dict = {}
    rounds = []
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        results = {}
        for system in order:
            log = logs / f"{system}-round{r + 1}.log"
            print(f"round {r + 1}/{args.rounds}: {system} (log {log})", flush=True)
            started = time.monotonic()
            server = launch(system, args, model_dir, log)
            ready = time.monotonic() - started
            try:
                results[system] = asyncio.run(drive(server.url, model_dir.name, cases, args.warmup, args.timeout))
            finally:
                stop_server(server.proc)
            commands[system] = {"command": server.command, "env": server.env, "startup_s": ready}
            for name, res in results[system].items():
                s = res["summary"]
                print(f"  {name}: {s['completed']}/{s['requests']} ok, {s['output_throughput']:.1f} tok/s, "
                      f"ITL p50 {(s['itl_s']['p50'] or 0) * 1e3:.1f} ms", flush=True)
                if s["failed"]:
                    print(f"    failures: {s['errors']}", flush=True)
        agreement = {}
        if len(systems) == 2:
            agreement = {case.name: token_agreement(results["semipd"][case.name]["requests"],
                                                    results["vllm"][case.name]["requests"]) for case in cases}
        rounds.append({"order": order, "results": results, "agreement": agreement})

    names = [c.name for c in cases]
    print()
    print(format_table(rounds, systems, names))
    if args.output:
        doc = {"command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
               "machine": info | {"loadavg_after": os.getloadavg()},
               "model": asdict(shape) | {"dir": str(model_dir), "dtype": args.dtype},
               "systems": commands | ({"vllm": commands.get("vllm", {}) | {"versions": vllm_versions(args.vllm_python)}}
                                      if "vllm" in systems else {}),
               "workloads": {c.name: c.describe() for c in cases},
               "medians": medians(rounds, systems, names), "rounds": rounds}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
