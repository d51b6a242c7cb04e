"""Kernel benchmarks against the roofline: time, bytes moved, achieved bandwidth and its fraction of the HBM
bandwidth measured in the same run, next to a torch baseline timed in the same run.

Shapes are Llama-3-8B-like (Hq 32, Hkv 8, D 128, page 16, bfloat16, hidden 4096, intermediate 14336).
- decode_attention: batch 1..256 at context 1k..8k, each batch's own block table over a shared random page pool;
  baseline torch SDPA on the same K/V stored densely (no paging), enable_gqa.
- prefill_attention: one fresh prompt of 1k..8k tokens, 8 prompts of 1k, and a 2k chunk after a 6k cached
  prefix; baseline SDPA on dense K/V (lower-right causal for the chunk). Also reports TFLOP/s (it is compute-bound).
- store_kv, rms_norm (+ residual), rotary_embedding, silu_and_mul at 1, 256 and 8192 tokens; baseline the torch
  reference (the CPU path, eager PyTorch on the GPU).

Timing: CUDA events around each call, after warmup; the L2 cache is flushed before every call so small cases
are not served from L2; medians. "bytes" is the minimum traffic (every input read once, every output written
once); "HBM %" divides the achieved rate by a device-to-device copy of a large buffer measured at start.

    python bench/bench_kernels.py [--only decode,prefill] [--json out.json]
    python bench/bench_kernels.py --dry-run   # no GPU: tiny shapes on CPU under TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from gpu_common import EXIT_OK, add_common_args, format_table, median, refuse_without_cuda, write_json

PROG = "bench_kernels"
KERNELS = ("decode", "prefill", "store_kv", "rms_norm", "rotary", "silu_and_mul")


@dataclass(frozen=True)
class Shapes:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    decode_batches: list
    decode_contexts: list
    prefill_tokens: list
    rows: list  # token counts for the elementwise kernels
    hidden: int
    intermediate: int
    warmup: int
    iters: int
    copy_bytes: int  # buffer size for the bandwidth measurement


FULL = Shapes(32, 8, 128, 16, [1, 8, 32, 64, 128, 256], [1024, 2048, 4096, 8192], [1024, 2048, 4096, 8192],
              [1, 256, 8192], 4096, 14336, warmup=10, iters=50, copy_bytes=2 << 30)
TINY = Shapes(4, 2, 64, 16, [1, 3], [40], [24], [2], 64, 96, warmup=1, iters=2, copy_bytes=1 << 20)


@dataclass
class Result:
    kernel: str
    shape: str
    ms: float
    bytes: int
    gbps: float
    hbm_frac: float
    baseline: str
    baseline_ms: float
    tflops: float | None = None
    extra: dict = field(default_factory=dict)


class Bench:
    """Times callables on one device and turns bytes into bandwidth against the measured copy rate."""

    def __init__(self, torch, device, shapes: Shapes):
        self.torch, self.device, self.shapes = torch, device, shapes
        self.cuda = device.type == "cuda"
        # Writing 256 MiB evicts the 50 MB L2 between calls.
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None
        self.results: list[Result] = []
        self.hbm_gbps = self._copy_bandwidth()

    def time_ms(self, fn) -> float:
        torch = self.torch
        for _ in range(self.shapes.warmup):
            fn()
        samples = []
        for _ in range(self.shapes.iters):
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return median(samples)

    def _copy_bandwidth(self) -> float:
        n = self.shapes.copy_bytes
        src = self.torch.empty(n, dtype=self.torch.uint8, device=self.device).fill_(1)
        dst = self.torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * n / (ms * 1e-3) / 1e9  # a copy reads and writes every byte

    def record(self, kernel, shape, fn, nbytes, baseline_name, baseline_fn, flops=None, **extra):
        ms = self.time_ms(fn)
        baseline_ms = self.time_ms(baseline_fn)
        gbps = nbytes / (ms * 1e-3) / 1e9
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        self.results.append(Result(kernel, shape, ms, nbytes, gbps, gbps / self.hbm_gbps, baseline_name,
                                   baseline_ms, tflops, extra))


def bench_decode(b: Bench, ops, dtype):
    torch, s = b.torch, b.shapes
    import torch.nn.functional as F
    from semipd.kernels import DecodeWorkspace
    from semipd.kernels.decode_attention import DEFAULT_MAX_SPLITS, choose_num_splits
    elem = torch.finfo(dtype).bits // 8
    pages_per_seq = math.ceil(max(s.decode_contexts) / s.block_size)
    pool = max(s.decode_batches) * pages_per_seq
    cache_shape = (pool, s.block_size, s.num_kv_heads, s.head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=b.device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=b.device)
    scale = s.head_dim ** -0.5
    for ctx in s.decode_contexts:
        for batch in s.decode_batches:
            pages = math.ceil(ctx / s.block_size)
            tables = torch.randperm(pool, device=b.device)[:batch * pages].view(batch, pages).to(torch.int32)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=b.device)
            q = torch.randn(batch, s.num_q_heads, s.head_dim, dtype=dtype, device=b.device)
            workspace = DecodeWorkspace(batch, s.num_q_heads, s.head_dim, DEFAULT_MAX_SPLITS, b.device)
            # The same K/V, stored densely for the baseline: [B, Hkv, ctx, D].
            k_dense = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
            v_dense = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
            q4 = q.unsqueeze(2)
            nbytes = (2 * batch * ctx * s.num_kv_heads * s.head_dim * elem  # K and V
                      + 2 * q.numel() * elem + tables.numel() * 4 + batch * 4)  # q, out, table, lengths
            b.record("decode_attention", f"B={batch} ctx={ctx}",
                     lambda: ops.decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, workspace),
                     nbytes, "sdpa dense",
                     lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, scale=scale, enable_gqa=True),
                     splits=choose_num_splits(batch, s.num_kv_heads, b.device))
            del k_dense, v_dense


def bench_prefill(b: Bench, ops, dtype):
    torch, s = b.torch, b.shapes
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    elem = torch.finfo(dtype).bits // 8
    longest = max(s.prefill_tokens)
    cases = [(f"1x{n}", [n], [n]) for n in s.prefill_tokens]
    cases.append((f"8x{longest // 8}", [longest // 8] * 8, [longest // 8] * 8))
    cases.append((f"chunk {longest // 4} after {longest - longest // 4}", [longest // 4], [longest]))
    scale = s.head_dim ** -0.5
    group = s.num_q_heads // s.num_kv_heads
    for name, q_lens, seq_lens_list in cases:
        batch = len(q_lens)
        pages = math.ceil(max(seq_lens_list) / s.block_size)
        pool = batch * pages
        cache_shape = (pool, s.block_size, s.num_kv_heads, s.head_dim)
        k_cache = torch.randn(cache_shape, dtype=dtype, device=b.device)
        v_cache = torch.randn(cache_shape, dtype=dtype, device=b.device)
        tables = torch.randperm(pool, device=b.device).view(batch, pages).to(torch.int32)
        seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32, device=b.device)
        cu = torch.tensor([0] + list(_cumsum(q_lens)), dtype=torch.int32, device=b.device)
        q = torch.randn(sum(q_lens), s.num_q_heads, s.head_dim, dtype=dtype, device=b.device)
        visible = sum(sum(L - ql + i + 1 for i in range(ql)) for ql, L in zip(q_lens, seq_lens_list))
        flops = 4 * s.num_q_heads * s.head_dim * visible  # QK^T and PV, 2 FLOPs per multiply-add
        nbytes = 2 * q.numel() * elem + 2 * sum(seq_lens_list) * s.num_kv_heads * s.head_dim * elem
        # Baseline on dense tensors [B, Hq, L, D] with the KV heads already expanded (not timed).
        ql, L = q_lens[0], seq_lens_list[0]
        qd = q.view(batch, ql, s.num_q_heads, s.head_dim).transpose(1, 2)
        kd = k_cache[tables.long()].flatten(1, 2)[:, :L].transpose(1, 2).repeat_interleave(group, 1).contiguous()
        vd = v_cache[tables.long()].flatten(1, 2)[:, :L].transpose(1, 2).repeat_interleave(group, 1).contiguous()
        if ql == L:
            baseline = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)  # noqa: E731
        else:
            mask = causal_lower_right(ql, L)
            baseline = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)  # noqa: E731
        b.record("prefill_attention", name,
                 lambda: ops.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max(q_lens), scale),
                 nbytes, "sdpa dense", baseline, flops=flops)
        del k_cache, v_cache, kd, vd


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def bench_elementwise(b: Bench, ops, ref, dtype, which):
    torch, s = b.torch, b.shapes
    from semipd.kernels import build_cos_sin_cache
    elem = torch.finfo(dtype).bits // 8
    hq, hkv, d = s.num_q_heads, s.num_kv_heads, s.head_dim
    for rows in s.rows:
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, device=b.device)
        if which == "store_kv":
            pool_pages = math.ceil(rows / s.block_size) + 1
            caches = [torch.zeros(pool_pages, s.block_size, hkv, d, dtype=dtype, device=b.device) for _ in range(2)]
            key, value = randn(rows, hkv, d), randn(rows, hkv, d)
            slots = torch.randperm(pool_pages * s.block_size, device=b.device)[:rows]
            nbytes = 4 * key.numel() * elem + rows * 8
            b.record("store_kv", f"T={rows}", lambda: ops.store_kv(key, value, *caches, slots), nbytes,
                     "torch ref", lambda: ref.store_kv(key, value, *caches, slots))
        elif which == "rms_norm":
            x, res, w = randn(rows, s.hidden), randn(rows, s.hidden), randn(s.hidden)
            b.record("rms_norm", f"T={rows} H={s.hidden}", lambda: ops.rms_norm(x, w, 1e-5),
                     2 * x.numel() * elem + w.numel() * elem, "torch ref", lambda: ref.rms_norm(x, w, 1e-5))
            b.record("rms_norm+residual", f"T={rows} H={s.hidden}", lambda: ops.rms_norm(x, w, 1e-5, res),
                     4 * x.numel() * elem + w.numel() * elem, "torch ref", lambda: ref.rms_norm(x, w, 1e-5, res))
        elif which == "rotary":
            cache = build_cos_sin_cache(d, 8192, 500000.0, device=b.device)
            positions = torch.randint(0, 8192, (rows,), device=b.device)
            q, k = randn(rows, hq, d), randn(rows, hkv, d)
            nbytes = 2 * (q.numel() + k.numel()) * elem + rows * (d * 4 + 8)
            b.record("rotary_embedding", f"T={rows}", lambda: ops.rotary_embedding(positions, q, k, cache), nbytes,
                     "torch ref", lambda: ref.rotary_embedding(positions, q, k, cache))
        elif which == "silu_and_mul":
            x = randn(rows, 2 * s.intermediate)
            b.record("silu_and_mul", f"T={rows} I={s.intermediate}", lambda: ops.silu_and_mul(x),
                     3 * rows * s.intermediate * elem, "torch ref", lambda: ref.silu_and_mul(x))


def print_table(b: Bench, torch_version, triton_version, device_name):
    print(f"{device_name}  torch {torch_version}  triton {triton_version}  "
          f"measured copy bandwidth {b.hbm_gbps:.0f} GB/s")
    headers = ["kernel", "shape", "ms", "MB", "GB/s", "HBM %", "TFLOP/s", "baseline", "base ms", "speedup", "notes"]
    rows = [[r.kernel, r.shape, f"{r.ms:.4f}", f"{r.bytes / 1e6:.2f}", f"{r.gbps:.0f}", f"{100 * r.hbm_frac:.1f}",
             None if r.tflops is None else f"{r.tflops:.1f}", r.baseline, f"{r.baseline_ms:.4f}",
             f"{r.baseline_ms / r.ms:.2f}x", " ".join(f"{k}={v}" for k, v in r.extra.items()) or None]
            for r in b.results]
    print(format_table(headers, rows))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--only", default=",".join(KERNELS),
                        help=f"comma-separated subset of {','.join(KERNELS)} (default: all)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)
    only = [k for k in args.only.split(",") if k]
    unknown = sorted(set(only) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    args.only = only
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        # Must be set before the Triton modules are imported (load_ops below): decoration fixes the mode.
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        refused = refuse_without_cuda(PROG)
        if refused is not None:
            return refused
    import torch
    import triton

    from semipd.kernels import load_ops
    device = torch.device("cpu" if args.dry_run else args.device)
    shapes = TINY if args.dry_run else FULL
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ops, ref = load_ops("triton"), load_ops("torch")
    bench = Bench(torch, device, shapes)
    with torch.inference_mode():
        if "decode" in args.only:
            bench_decode(bench, ops, dtype)
        if "prefill" in args.only:
            bench_prefill(bench, ops, dtype)
        for which in ("store_kv", "rms_norm", "rotary", "silu_and_mul"):
            if which in args.only:
                bench_elementwise(bench, ops, ref, dtype, which)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print_table(bench, torch.__version__, triton.__version__, device_name)
    write_json(args.json, {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                           "dtype": args.dtype, "dry_run": args.dry_run, "hbm_gbps": bench.hbm_gbps,
                           "shapes": asdict(shapes), "results": [asdict(r) for r in bench.results]})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
