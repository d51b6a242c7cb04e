"""One CPU decode step, semipd's model runner against transformers, side by side in one process (not a test).

For each batch size B, B sequences sit at the same context length; each system runs one decode step (one new
token per row) over its own KV cache: semipd's paged pool through ModelRunner.decode, transformers' DynamicCache
through model.forward. The steps are interleaved so both see the same machine state; the median is reported.
A second table times the model's matmuls alone, F.linear on dense weights against the oneDNN-packed weights the
engine serves from, which is where most of the difference comes from.

    python bench/decode_step.py                       # 124.7M model (bench_engine's), 1 and 2 threads
    python bench/decode_step.py --threads 2 --batch 1,16 --context 500
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import DEFAULT_CACHE, ModelShape, prepare_model  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def semipd_batch(runner, batch: int, context: int):
    from semipd.runtime.sampling import SamplingParams
    from semipd.runtime.sequence import Sequence

    seqs = []
    for i in range(batch):
        seq = Sequence(f"r{i}", [1 + (i * 7 + j) % 400 for j in range(context)], SamplingParams(max_tokens=8),
                       lambda out: None, runner.device)
        if not runner.block_manager.allocate(seq, context + 1):
            raise SystemExit("the KV pool is too small for this batch and context; lower --batch or --context")
        seq.num_computed_tokens = context - 1          # the cache holds all but the newest token
        seqs.append(seq)
    return seqs


def step_table(model_dir: Path, threads: int, batches: list[int], context: int, repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from semipd.runtime.config import EngineConfig
    from semipd.runtime.model_runner import ModelRunner

    torch.set_num_threads(threads)
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", kv_cache_memory=1.0))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for batch in batches:
            seqs = semipd_batch(runner, batch, context)
            cache = hf(input_ids=torch.randint(1, 400, (batch, context - 1)), use_cache=True).past_key_values
            token = torch.randint(1, 400, (batch, 1))
            ours, theirs = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                runner.decode(seqs)
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                hf(input_ids=token, past_key_values=cache, use_cache=True)
                theirs.append(time.perf_counter() - start)
                cache.crop(-1)                          # back to the same context for the next repeat
            for seq in seqs:
                runner.block_manager.free(seq)
            rows.append({"threads": threads, "batch": batch, "semipd_ms": median_ms(ours),
                         "transformers_ms": median_ms(theirs)})
            print(f"  threads {threads}  B={batch:3d}  semipd {rows[-1]['semipd_ms']:7.1f} ms   "
                  f"transformers {rows[-1]['transformers_ms']:7.1f} ms", flush=True)
    return rows


def linear_table(shape: ModelShape, threads: int, batches: list[int], repeats: int) -> list[dict]:
    """Every matmul weight of the model (random, so the sizes and the DRAM traffic are real)."""
    from semipd.runtime.layers import linear, pack_for_cpu

    torch.set_num_threads(threads)
    h, kv = shape.hidden_size, shape.hidden_size // shape.num_heads * shape.num_kv_heads
    weights = []
    for _ in range(shape.num_layers):
        weights += [torch.randn(h + 2 * kv, h), torch.randn(h, h), torch.randn(2 * shape.intermediate_size, h),
                    torch.randn(h, shape.intermediate_size)]
    weights.append(torch.randn(shape.vocab_size, h))
    packed = [pack_for_cpu(w) for w in weights]
    if any(p is None for p in packed):
        print("  oneDNN packing is not available in this torch build")
        return []
    rows = []
    for batch in batches:
        inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
        dense, onednn = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            dense.append(time.perf_counter() - start)
            start = time.perf_counter()
            for w, p in zip(weights, packed):
                linear(inputs[w.shape[1]], None, None, p)
            onednn.append(time.perf_counter() - start)
        rows.append({"threads": threads, "batch": batch, "f_linear_ms": median_ms(dense),
                     "onednn_packed_ms": median_ms(onednn)})
        print(f"  threads {threads}  M={batch:3d}  F.linear {rows[-1]['f_linear_ms']:7.1f} ms   "
              f"oneDNN packed {rows[-1]['onednn_packed_ms']:7.1f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=_ints, default=[1, 2], help="torch thread counts, comma-separated")
    p.add_argument("--batch", type=_ints, default=[1, 4, 16], help="decode batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=300, help="tokens already in each sequence's cache")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    shape = ModelShape()
    model_dir = prepare_model(shape, DEFAULT_CACHE)
    print(f"decode step, {shape.name}, context {args.context}, median of {args.repeats} interleaved steps")
    for threads in args.threads:
        step_table(model_dir, threads, args.batch, args.context, args.repeats)
    print("all matmul weights of the model once (what one decode step multiplies)")
    for threads in args.threads:
        linear_table(shape, threads, args.batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
