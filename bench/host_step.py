"""The engine's host time per decode step, with the model taken out (not a test).

A real Engine (scheduler, block manager with prefix caching, model runner, sampler, output processor with the
tiny model's tokenizer) runs its decode worker's step, Engine._decode_step, over a batch of B sequences that sit
at about C tokens of context each (C plus 0-15, so their block boundaries differ and a few of them take a new
block every step). The model is replaced by ForwardStandIn, whose forward returns a preallocated tensor: what
is left is everything the decode worker does per step on the host: scheduling, block-table and input building,
sampling (greedy) and its bookkeeping, output processing (detokenizing, streaming) and the handoff back to the
scheduler, metrics and gauges. Each step is timed whole, less its output processing (OutputProcessor, which
runs outside the scheduler's lock), and in phases; medians and 90th percentiles over the timed steps.

Two paths through ModelRunner.decode:
  eager  the CPU path: the ForwardBatch is built from the sequences each step.
  graph  the CUDA path's host work: a DecodeGraph is captured (on CPU, with the stand-ins in CudaStandIns for
         torch.cuda's graph and stream calls) and each step fills its static buffers and "replays" it.
Each max_model_len in --max-model-len gets its own engine, so the figures show whether a per-step cost grows
with it.

    python bench/host_step.py                                  # batch 64, ~8K contexts, max_model_len 8K and 128K
    python bench/host_step.py --paths eager --max-model-len 8192 --steps 100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "semipd-host-step-model"
# schedule: Scheduler.schedule_decode; inputs: ModelRunner.decode less the stand-in (batch tensors, or the graph's
# buffers); sample: sample_step; handoff: Scheduler.decoded less output; output: OutputProcessor.append_token
# (detokenizing, stop checks, streaming, per-token metrics); other: the rest of the step (metrics, gauges, split).
PHASES = ("schedule", "inputs", "sample", "handoff", "output")


class ForwardStandIn:
    """A stand-in for the model: forward and compute_logits return preallocated tensors, so a decode step
    costs only its host work. The logits are fixed random values, so greedy sampling gives varied tokens."""

    def __init__(self, hidden_size: int, vocab_size: int, max_rows: int):
        self.hidden = torch.zeros(max_rows, hidden_size)
        self.logits = torch.randn(max_rows, vocab_size, generator=torch.Generator().manual_seed(0))
        self.seconds = 0.0           # time spent in this stand-in (subtracted from the "inputs" phase)

    def __call__(self, batch):
        started = time.perf_counter()
        out = self.hidden[:batch.input_ids.shape[0]]
        self.seconds += time.perf_counter() - started
        return out

    def compute_logits(self, hidden):
        started = time.perf_counter()
        out = self.logits[:hidden.shape[0]]
        self.seconds += time.perf_counter() - started
        return out


class _GraphStandIn:
    """torch.cuda.CUDAGraph on CPU: capture ran the stand-in model once; replay has nothing to redo."""

    def replay(self):
        pass


class _StreamStandIn:
    cuda_stream = None           # the key decode() looks graphs up under when the step has no stream (CPU)

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


@contextlib.contextmanager
def cuda_stand_ins():
    """What DecodeGraph and capture_decode_graphs call in torch.cuda, replaced by CPU stand-ins while capturing."""
    names = {"CUDAGraph": _GraphStandIn, "graph_pool_handle": lambda: None, "current_stream": _StreamStandIn,
             "stream": lambda s: contextlib.nullcontext(), "graph": lambda *a, **k: contextlib.nullcontext()}
    saved = {n: getattr(torch.cuda, n) for n in names}
    try:
        for n, value in names.items():
            setattr(torch.cuda, n, value)
        yield
    finally:
        for n, value in saved.items():
            setattr(torch.cuda, n, value)


def prepare_model(model_dir: Path, max_positions: int) -> Path:
    """The tiny model (one layer, one KV head: its forward is never run here), one directory per position limit."""
    from semipd.runtime.tiny_model import write_tiny_model
    path = model_dir / f"positions-{max_positions}"
    if not (path / "model.safetensors").exists():
        write_tiny_model(path, num_layers=1, num_kv_heads=1, max_position_embeddings=max_positions)
    return path


def make_engine(model_dir: Path, args, max_model_len: int, path: str):
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.engine import Engine
    per_seq = -(-(args.context + 16 + args.warmup + args.steps) // args.block_size)
    config = EngineConfig(model=str(model_dir), device="cpu", max_model_len=max_model_len,
                          max_num_seqs=args.batch, block_size=args.block_size,
                          num_kv_blocks=max(args.batch * per_seq, -(-max_model_len // args.block_size)) + 16)
    engine = Engine(config)
    mc = engine.runner.model_config
    stand_in = ForwardStandIn(mc.hidden_size, mc.vocab_size, max(args.batch, 512))
    engine.runner.model = stand_in
    if path == "graph":
        with cuda_stand_ins():
            engine.runner.capture_decode_graphs([_StreamStandIn()], args.batch)
        if not engine.runner.decode_graphs:
            raise SystemExit("graph capture with the CPU stand-ins failed (see the log)")
    return engine, stand_in


def fill_batch(engine, args) -> None:
    """B sequences as the prefill worker hands them over: prompt computed and registered, first token out."""
    from semipd.runtime.sampling import Sampled, SamplingParams
    from semipd.runtime.sequence import Sequence, Status
    rng = random.Random(0)
    vocab = engine.runner.model_config.vocab_size
    sched, bm = engine.scheduler, engine.block_manager
    for i in range(args.batch):
        prompt = [rng.randrange(vocab) for _ in range(args.context + rng.randrange(16))]
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=engine.max_model_len - len(prompt))
        seq = Sequence(f"host-step-{i}", prompt, params, lambda out: None, engine.runner.device)
        if not bm.allocate(seq, len(prompt)):
            raise SystemExit("the KV pool is too small for this batch and context")
        seq.num_computed_tokens = len(prompt)
        bm.register_computed(seq)
        engine.output.append_token(seq, Sampled(rng.randrange(vocab)))
        seq.status = Status.DECODE
        sched.by_id[seq.request_id] = seq
        sched.running.append(seq)


@contextlib.contextmanager
def phase_timers(engine, stand_in, totals: dict):
    """Wrap the step's parts to time them; the wrappers cost a microsecond or so each."""
    import semipd.runtime.engine as engine_module

    def timed(name, fn, minus_stand_in=False, minus_output=False):
        def wrapper(*a, **k):
            before, output_before = stand_in.seconds, totals["output"]
            started = time.perf_counter()
            out = fn(*a, **k)
            took = time.perf_counter() - started
            took -= stand_in.seconds - before if minus_stand_in else 0.0
            took -= totals["output"] - output_before if minus_output else 0.0
            totals[name] += took
            return out
        return wrapper

    sched, runner, output = engine.scheduler, engine.runner, engine.output
    saved = (sched.schedule_decode, sched.decoded, runner.decode, engine_module.sample_step, output.append_token)
    sched.schedule_decode = timed("schedule", saved[0])
    sched.decoded = timed("handoff", saved[1], minus_output=True)
    runner.decode = timed("inputs", saved[2], minus_stand_in=True)
    engine_module.sample_step = timed("sample", saved[3])
    output.append_token = timed("output", saved[4])   # the engine passes self.output.append_token to decoded
    try:
        yield
    finally:
        engine_module.sample_step = saved[3]
        for obj, name in ((sched, "schedule_decode"), (sched, "decoded"), (runner, "decode"),
                          (output, "append_token")):
            vars(obj).pop(name, None)


def run_steps(engine, stand_in, args) -> dict:
    totals = dict.fromkeys(PHASES, 0.0)
    steps, phases = [], {p: [] for p in PHASES + ("other",)}
    with torch.inference_mode(), phase_timers(engine, stand_in, totals):
        for i in range(args.warmup + args.steps):
            for p in PHASES:
                totals[p] = 0.0
            before = stand_in.seconds
            started = time.perf_counter()
            if not engine._decode_step():
                raise SystemExit("the decode batch emptied early")
            took = time.perf_counter() - started - (stand_in.seconds - before)
            if i >= args.warmup:
                steps.append(took)
                for p in PHASES:
                    phases[p].append(totals[p])
                phases["other"].append(took - sum(totals.values()))
    if len(engine.scheduler.running) != args.batch:
        raise SystemExit(f"{args.batch - len(engine.scheduler.running)} sequences left the batch early")
    without_output = [t - o for t, o in zip(steps, phases["output"])]
    return {"median_ms": 1e3 * statistics.median(steps), "p90_ms": 1e3 * percentile(steps, 90),
            "without_output_median_ms": 1e3 * statistics.median(without_output),
            "without_output_p90_ms": 1e3 * percentile(without_output, 90),
            "phases_median_ms": {p: 1e3 * statistics.median(v) for p, v in phases.items()},
            "forward_stand_in_ms": 1e3 * stand_in.seconds / (args.warmup + args.steps)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8000, help="tokens of context per sequence (plus 0-15)")
    p.add_argument("--max-model-len", type=int, nargs="+", default=[8192, 131072])
    p.add_argument("--paths", nargs="+", choices=["eager", "graph"], default=["eager", "graph"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=150, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: half the cores)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.context + 16 + args.warmup + args.steps > min(args.max_model_len):
        raise SystemExit("--context plus the steps exceeds the smallest --max-model-len")
    model_dir = prepare_model(args.model_dir, max(args.max_model_len))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"decode host time per step: batch {args.batch}, context ~{args.context}, block size "
          f"{args.block_size}, {args.steps} steps after {args.warmup}, torch threads {torch.get_num_threads()}")
    print(f"{'':20} {'whole step':^19}  {'less output':^19}   {'phase medians':^60}")
    print(f"{'path':<6} {'max_model_len':>13} {'median':>9} {'p90':>9}  {'median':>9} {'p90':>9}   "
          + "".join(f"{p:>10}" for p in PHASES + ("other",)))
    results = []
    for max_model_len in args.max_model_len:
        for path in args.paths:
            engine, stand_in = make_engine(model_dir, args, max_model_len, path)
            fill_batch(engine, args)
            r = run_steps(engine, stand_in, args) | {"path": path, "max_model_len": max_model_len}
            results.append(r)
            print(f"{path:<6} {max_model_len:>13} {r['median_ms']:>6.3f} ms {r['p90_ms']:>6.3f} ms  "
                  f"{r['without_output_median_ms']:>6.3f} ms {r['without_output_p90_ms']:>6.3f} ms   "
                  + "".join(f"{r['phases_median_ms'][p]:>7.3f} ms" for p in PHASES + ("other",)), flush=True)
            engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
