"""Side-by-side runs of the real engine, driven by `semipd bench` exactly as a user would drive it.

    python bench/compare.py modes --out results/      # unified vs static split vs SLO policy, one rate sweep each
    python bench/compare.py modes --device cuda ...   # the same on a GPU, green contexts instead of the stand-in
    python bench/compare.py fidelity --out results/   # the simulator, calibrated here, against the real engine

`modes` (alias `cpu`): the engine in three modes over the same Poisson rate sweep and the same trace:
  unified  --partition-backend shared: both phases on the whole machine (the unified baseline)
  static   a fixed split (--partition-policy static): on CPU the --emulate-sm-share stand-in, on CUDA green contexts
  slo      the same, the split moved by the in-engine SLO policy (--partition-policy slo)
A CPU has no SM isolation: the two workers share the cores whatever the split, and --emulate-sm-share is a named
stand-in that stretches each step to what its share would cost. So this proves the machinery (the same flags,
the same policy, the split moving under load), not the gain; the gain needs a GPU (docs/simulate.md predicts it,
docs/gpu.md measures it).

`fidelity`: one engine at a fixed split with --emulate-sm-share is profiled from its own step-time metrics
(bench/profile_engine.py), then serves Poisson traces at several rates through `semipd bench`; `semipd simulate`
replays the same traces on that profile, and the table sets predicted p50/p90 TTFT and TPOT against measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_engine import start_server, stop_server  # noqa: E402
from gpu_common import format_table  # noqa: E402
from profile_engine import EngineClient  # noqa: E402

# bench_engine.start_server starts a CPU float32 engine with a 1 GiB pool; on CUDA these flags come after and win
# (16 GiB: room for every request of the sweep, and for a peer on the same GPU)
CUDA = ["--device", "cuda", "--dtype", "bfloat16", "--kv-cache-memory", "16"]
SPLIT = {"cpu": ["--partition-backend", "cpu", "--emulate-sm-share"],       # the named stand-in
         "cuda": CUDA + ["--partition-backend", "greenctx"]}
MODES = {
    "unified": ["--partition-backend", "shared"],
    "static": ["--partition-policy", "static"],
    "slo": ["--partition-policy", "slo", "--policy-interval", "2", "--policy-window", "10",
            "--partition-cooldown", "4"],
}


def mode_flags(mode: str, device: str) -> list[str]:
    if mode == "unified":
        return (CUDA if device == "cuda" else []) + MODES[mode]
    return SPLIT[device] + MODES[mode]
ENGINE = ["--max-num-seqs", "64", "--max-num-batched-tokens", "512", "--max-model-len", "1024"]


def semipd(*args: str) -> None:
    cmd = [sys.executable, "-m", "semipd.runtime.cli", *args]
    print("+ semipd " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def workload_flags(args, rate_flag: list[str]) -> list[str]:
    return [*rate_flag, "--input-len", args.input_len, "--output-len", args.output_len, "--seed", str(args.seed),
            "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--no-progress"]


def model_dir() -> Path:
    from semipd.runtime.tiny_model import default_model_dir
    return default_model_dir()


def run_modes(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for mode in args.modes:
        flags = mode_flags(mode, args.device) + ENGINE + ["--sm-split", f"prefill={args.split}"]
        if mode == "slo":
            flags += ["--slo-ttft-ms", str(args.slo_ttft * 1000), "--slo-tpot-ms", str(args.slo_tpot * 1000),
                      "--log-level", "info"]          # its split moves are logged at info
        log_path = out / f"serve-{mode}.log"
        proc, url, cmd = start_server(model_dir(), 64, flags, log_path)
        try:
            path = out / f"cpu-{mode}.json"
            semipd("bench", "--url", url, "--label", f"{args.device.upper()} engine, {mode}",
                   *workload_flags(args, ["--rate-sweep", args.rate_sweep, "--duration", str(args.duration)]),
                   "--output", str(path))
        finally:
            stop_server(proc)
        doc = json.loads(path.read_text())
        doc["engine_command"] = " ".join(cmd[2:])
        doc["split_moves"] = split_moves(log_path)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        docs.append((mode, doc))
    semipd("bench", "plot", *[str(out / f"cpu-{m}.json") for m, _ in docs], "--output", str(out / "cpu-modes.png"))
    print(cpu_table(docs))
    return 0


def split_moves(log_path: Path) -> list[str]:
    """The in-engine policy's split changes, from its log ("SLO policy: prefill share A -> B ...: Reason: ...")."""
    moves = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "SLO policy: prefill share" in line:
            moves.append(line.split("SLO policy: ", 1)[1][:200])
    return moves


def cpu_table(docs) -> str:
    rates = sorted({run["rate"] for _, d in docs for run in d["runs"]})
    body = []
    for rate in rates:
        row = [f"{rate:g}"]
        for _, d in docs:
            run = next((r for r in d["runs"] if r["rate"] == rate), None)
            s = run["summary"] if run else None
            row.append("-" if s is None else f"{s['attainment']:.2f} / {ms(s['ttft_s']['p90'])} / "
                                             f"{ms(s['tpot_s']['p90'])}")
        body.append(row)
    body.append(["rate @ goal"] + [f"{d['max_rate_at_goal']}" for _, d in docs])
    body.append(["split moves"] + [f"{len(d.get('split_moves', []))}" for _, d in docs])
    return format_table(["req/s"] + [f"{m}: attain / TTFT p90 / TPOT p90 ms" for m, _ in docs], body)


def ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def run_fidelity(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token = out / "admin-token"
    token.write_text("fidelity\n")
    profile = out / "cpu-profile.json"
    flags = ["--partition-backend", "cpu", "--emulate-sm-share", "--sm-split", f"prefill={args.split}",
             "--admin-token-file", str(token), *ENGINE]
    pinned = args.pin and len(os.sched_getaffinity(0)) >= 2
    if pinned:
        # the engine on one core, everything that measures it (profiler, calibration, semipd bench) on another,
        # so the client's own work does not land inside the engine's steps
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[0]})
    proc, url, cmd = start_server(model_dir(), 64, flags, out / "serve-fidelity.log")
    if pinned:
        os.sched_setaffinity(0, set(cores[1:]))
    measured = out / "fidelity-measured.json"
    try:
        splits = sorted({args.split, *args.profile_splits})
        subprocess.run([sys.executable, str(BENCH / "profile_engine.py"), "--url", url, "--admin-token-file",
                        str(token), "--splits", ",".join(map(str, splits)), "--calibrate",
                        "--calibrate-at", str(args.split), "--calibration-input-len", args.input_len,
                        "--calibration-output-len", args.output_len, "--json", str(profile)], check=True)
        EngineClient(url, token.read_text().strip(), 30).set_split(args.split)
        semipd("bench", "--url", url, "--label", "CPU engine (measured)",
               *workload_flags(args, ["--rate-sweep", args.rate_sweep, "--num-requests", str(args.num_requests)]),
               "--output", str(measured))
    finally:
        stop_server(proc)
    predicted = out / "fidelity-simulated.json"
    flags = workload_flags(args, ["--rate-sweep", args.rate_sweep, "--num-requests", str(args.num_requests)])
    semipd("simulate", "--gpu", "profile", "--profile", str(profile), "--mode", "static",
           "--split", f"prefill={args.split}", "--max-num-seqs", "64", "--max-num-batched-tokens", "512",
           "--label", "simulator on the CPU profile", *[f for f in flags if f != "--no-progress"], "--quiet",
           "--output", str(predicted))
    semipd("bench", "plot", str(measured), str(predicted), "--output", str(out / "fidelity.png"))
    print(fidelity_table(json.loads(measured.read_text()), json.loads(predicted.read_text())))
    return 0


def fidelity_table(measured: dict, predicted: dict) -> str:
    body = []
    worst = 0.0
    for run in measured["runs"]:
        sim = next(r for r in predicted["runs"] if r["rate"] == run["rate"])
        for metric in ("ttft_s", "tpot_s"):
            for q in ("p50", "p90"):
                m, p = run["summary"][metric][q], sim["summary"][metric][q]
                err = None if not m or p is None else (p - m) / m
                worst = max(worst, abs(err or 0))
                body.append([f"{run['rate']:g}", f"{metric[:-2].upper()} {q}", ms(m), ms(p),
                             "-" if err is None else f"{err * 100:+.0f}%"])
    table = format_table(["req/s", "figure", "measured ms", "simulated ms", "error"], body)
    return f"{table}\nlargest error: {worst * 100:.0f}% (goal: within 25%)"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("modes", "fidelity"):
        s = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           aliases=["cpu"] if name == "modes" else [])
        s.add_argument("--out", default="bench-results", help="folder for JSON, PNG and server logs")
        s.add_argument("--input-len", default="lognormal:128:0.6:16:480")
        s.add_argument("--output-len", default="uniform:16:64")
        s.add_argument("--slo-ttft", type=float, default=0.5, help="seconds")
        s.add_argument("--slo-tpot", type=float, default=0.06, help="seconds")
        s.add_argument("--split", type=int, default=64, help="prefill SMs of the static split (of 132)")
        s.add_argument("--seed", type=int, default=0)
    cpu, fid = sub.choices["modes"], sub.choices["fidelity"]
    cpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cuda: green-context splits (no stand-in), bfloat16")
    cpu.add_argument("--rate-sweep", default="2:12:2")
    cpu.add_argument("--duration", type=float, default=30.0, help="seconds per rate")
    cpu.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    fid.add_argument("--rate-sweep", default="2:8:3")
    fid.add_argument("--no-pin", dest="pin", action="store_false",
                     help="do not give the engine and the measuring clients separate cores")
    fid.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    fid.add_argument("--profile-splits", type=lambda t: [int(x) for x in t.split(",")], default=[32, 96],
                     help="more splits for the profile besides --split")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    code = run_modes(args) if args.what in ("modes", "cpu") else run_fidelity(args)
    print(f"compare {args.what}: {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
