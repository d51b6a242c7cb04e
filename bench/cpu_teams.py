"""Why runtime/cpu_threads.py sizes the workers' OpenMP teams as it does (not a test).

One decode step of bench_engine's model at batch 2, 2 torch threads, timed in three settings:
  main thread            the model runs where it was loaded: one OpenMP team in the process
  worker, main's team    a worker thread runs it after the main thread ran a 2-thread team (loading): two teams,
                         more helper threads than cores, so libgomp stops spinning (the engine before 2026-12-02)
  worker, loaded apart   the model was loaded on a thread that ended (Engine on CPU now): one team again
Besides the step time it reports the kernel's count of voluntary context switches per step over all threads:
a helper that sleeps between parallel regions, instead of spinning, shows up there.

    python bench/cpu_teams.py [--dtype bfloat16] [--batch 2] [--context 100] [--steps 25]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import DEFAULT_CACHE, ModelShape, prepare_model  # noqa: E402
from decode_step import semipd_batch  # noqa: E402


def voluntary_switches() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def timed_steps(runner, seqs, steps: int) -> tuple[float, float]:
    """(median ms per step, voluntary context switches per step) on the calling thread, 2 torch threads."""
    torch.set_num_threads(2)
    with torch.inference_mode():
        for _ in range(3):
            runner.decode(seqs)
        times, switches = [], voluntary_switches()
        for _ in range(steps):
            start = time.perf_counter()
            runner.decode(seqs)
            times.append(time.perf_counter() - start)
        switches = voluntary_switches() - switches
    return statistics.median(times) * 1e3, switches / steps


def on_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn(*args)))
    t.start()
    t.join()
    return out["value"]


def main(argv=None) -> int:
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.cpu_threads import in_own_thread
    from semipd.runtime.model_runner import ModelRunner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    model_dir = prepare_model(ModelShape(), DEFAULT_CACHE)
    config = EngineConfig(model=str(model_dir), device="cpu", dtype=args.dtype, kv_cache_memory=1.0)

    apart = in_own_thread(ModelRunner, config)     # first, while the main thread has run no team yet
    apart_seqs = semipd_batch(apart, args.batch, args.context)
    rows = {"worker, loaded apart": [], "main thread": [], "worker, main's team": []}
    for _ in range(args.rounds):
        rows["worker, loaded apart"].append(on_thread(timed_steps, apart, apart_seqs, args.steps))
    torch.set_num_threads(2)
    here = ModelRunner(config)                     # the main thread's team is born here
    here_seqs = semipd_batch(here, args.batch, args.context)
    for _ in range(args.rounds):
        rows["main thread"].append(timed_steps(here, here_seqs, args.steps))
        rows["worker, main's team"].append(on_thread(timed_steps, here, here_seqs, args.steps))
    print(f"decode step, {ModelShape().name}, {args.dtype}, batch {args.batch}, context {args.context}, "
          f"2 torch threads, {os.cpu_count()} cores; median of {args.steps} steps, {args.rounds} rounds")
    for name, results in rows.items():
        ms = ", ".join(f"{m:.1f}" for m, _ in results)
        sw = statistics.median(s for _, s in results)
        print(f"  {name:22s} {ms} ms   voluntary context switches per step {sw:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
