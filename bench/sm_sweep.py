"""Prefill latency and decode step latency versus the SMs each phase gets: each phase alone on its green context,
then both at once (each on its own side of the same split), plus the whole GPU as the reference.

Workloads (bfloat16, one copy of the weights read by both phases, as in the engine):
- default: Llama-3-8B-shaped layers. Prefill of N tokens = QKV, causal attention (SDPA), O, gate/up, SiLU·mul,
  down. Decode step of batch B = the same GEMMs on B rows plus paged decode attention over a `--context`-token
  KV cache through semipd's Triton kernel (load_ops("triton")), replayed from a CUDA graph captured on the
  decode stream of each split (as the engine does; --no-cuda-graph for eager).
- --model DIR: the real engine model through semipd.runtime.model_runner.ModelRunner (prefill of one N-token
  prompt; decode step of B sequences of --context tokens), eager.

Timing: CUDA events around every call, `--warmup` calls first, medians reported. "with other" runs the other phase
on the other stream at the same time (prefill against decode at --partner-batch, decode against prefill at
--partner-tokens), each phase issued from its own thread and synchronised after every call like the engine's two
workers, and keeps only the calls that lay entirely inside the other phase's busy window.

    python bench/sm_sweep.py [--splits 16,64,112] [--tokens 512,2048,8192] [--batches 1,16,64] [--json out.json]
    python bench/sm_sweep.py --dry-run      # no GPU: the plan, table and JSON from a synthetic latency model
"""
from __future__ import annotations

import argparse
import math
import sys
import threading
from dataclasses import asdict, dataclass

from gpu_common import (EXIT_OK, add_common_args, fmt_ms, format_table, int_list, median, refuse_without_cuda,
                        time_on_stream, write_json)

PROG = "sm_sweep"
HOPPER_SMS = 132


@dataclass(frozen=True)
class Target:
    """Where the two phases run: one split of the green-context backend, or the whole GPU for both."""
    label: str
    prefill_sms: int
    decode_sms: int


@dataclass
class Row:
    target: str
    prefill_sms: int
    decode_sms: int
    phase: str                  # prefill | decode
    size: int                   # tokens (prefill) or batch (decode)
    alone_ms: float | None
    with_other_ms: float | None
    partner: str                # what ran on the other stream for with_other_ms
    samples: int                # calls kept for with_other_ms
    note: str = ""
    context: int | None = None  # decode: KV tokens per sequence, when it differs from meta["context"]

    @property
    def slowdown(self) -> float | None:
        if self.alone_ms and self.with_other_ms:
            return self.with_other_ms / self.alone_ms
        return None


def sweep(measure, targets: list[Target], tokens: list[int], batches: list[int], partner_tokens: int,
          partner_batch: int, concurrent: bool) -> list[Row]:
    """The plan, whatever does the measuring: `measure.alone(target, phase, size)` -> (ms, note) and
    `measure.together(target, tokens, batch)` -> (prefill ms, decode ms, prefill n, decode n)."""
    rows = []
    for t in targets:
        for phase, sizes, partner in (("prefill", tokens, f"decode B={partner_batch}"),
                                      ("decode", batches, f"prefill N={partner_tokens}")):
            for size in sizes:
                alone, note = measure.alone(t, phase, size)
                both, kept = None, 0
                if concurrent:
                    n, b = (size, partner_batch) if phase == "prefill" else (partner_tokens, size)
                    p_ms, d_ms, p_kept, d_kept = measure.together(t, n, b)
                    both, kept = (p_ms, p_kept) if phase == "prefill" else (d_ms, d_kept)
                rows.append(Row(t.label, t.prefill_sms, t.decode_sms, phase, size, alone, both,
                                partner if concurrent else "", kept, note))
    return rows


def table(rows: list[Row]) -> str:
    body = [[r.target, r.prefill_sms, r.decode_sms, r.phase, r.size, fmt_ms(r.alone_ms), fmt_ms(r.with_other_ms),
             None if r.slowdown is None else f"{r.slowdown:.2f}x", r.partner or None] for r in rows]
    return format_table(["target", "P SMs", "D SMs", "phase", "N/B", "alone ms", "with other ms", "slowdown",
                         "other stream ran"], body)


# ---- dry run: a synthetic latency model, only so the plan and output can be checked without a GPU -------------

class SyntheticMeasure:
    """Not a measurement: Semi-PD-style a/x + b curves (named so in the output)."""

    def alone(self, t: Target, phase: str, size: int):
        if phase == "prefill":
            return 0.9 * size / 1000 * HOPPER_SMS / t.prefill_sms + 0.2, "synthetic"
        return 0.3 + 0.02 * size + 2.0 * 40 / min(t.decode_sms, 40), "synthetic"

    def together(self, t: Target, tokens: int, batch: int):
        p, _ = self.alone(t, "prefill", tokens)
        d, _ = self.alone(t, "decode", batch)
        return p * 1.1, d * 1.25, 5, 20


# ---- the GPU ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16


class SyntheticLayers:
    """Llama-3-8B-shaped layer weights, [in, out] so a step is `x @ w`; `layers` passes reuse the one copy."""

    def __init__(self, shape: Shape, layers: int, device, ops):
        import torch
        s, self.shape, self.layers, self.ops = shape, shape, layers, ops
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

        def w(rows, cols):
            return (torch.randn(rows, cols, device=device) / math.sqrt(rows)).to(torch.bfloat16)

        self.wqkv, self.wo = w(s.hidden, q + 2 * kv), w(q, s.hidden)
        self.wgu, self.wdown = w(s.hidden, 2 * s.intermediate), w(s.intermediate, s.hidden)

    def mlp(self, x):
        return self.ops.silu_and_mul(x @ self.wgu) @ self.wdown

    def prefill(self, tokens: int, device):
        import torch
        import torch.nn.functional as F
        s = self.shape
        x0 = torch.randn(tokens, s.hidden, device=device, dtype=torch.bfloat16)
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim

        def run():
            x = x0
            for _ in range(self.layers):
                qkv = x @ self.wqkv
                q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
                q = q.view(1, tokens, s.heads, s.head_dim).transpose(1, 2)
                k = k.view(1, tokens, s.kv_heads, s.head_dim).transpose(1, 2)
                v = v.view(1, tokens, s.kv_heads, s.head_dim).transpose(1, 2)
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                x = self.mlp(attn.transpose(1, 2).reshape(tokens, q_size) @ self.wo)
            return x
        return run

    def decode(self, batch: int, context: int, device):
        import torch
        from semipd.kernels import DecodeWorkspace
        s = self.shape
        blocks = -(-context // s.block_size)
        cache_shape = (batch * blocks, s.block_size, s.kv_heads, s.head_dim)
        k_cache = torch.randn(cache_shape, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn(cache_shape, device=device, dtype=torch.bfloat16)
        tables = torch.arange(batch * blocks, device=device, dtype=torch.int32).view(batch, blocks)
        seq_lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        workspace = DecodeWorkspace(batch, s.heads, s.head_dim, 32, device)  # no allocation inside a graph
        x0 = torch.randn(batch, s.hidden, device=device, dtype=torch.bfloat16)
        q_size, scale = s.heads * s.head_dim, s.head_dim ** -0.5

        def run():
            x = x0
            for _ in range(self.layers):
                q = (x @ self.wqkv)[:, :q_size].view(batch, s.heads, s.head_dim)
                attn = self.ops.decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, workspace)
                x = self.mlp(attn.reshape(batch, q_size) @ self.wo)
            return x
        return run


class ModelWork:
    """The engine's own model and KV pool (ModelRunner): prefill one prompt of N tokens; decode B sequences."""

    def __init__(self, model_dir: str, device, tokens: list[int], batches: list[int], context: int):
        from semipd.runtime.config import EngineConfig
        from semipd.runtime.model_runner import ModelRunner
        block = 16
        needed = sum(-(-n // block) for n in tokens) + sum(b * -(-(context + 1) // block) for b in batches)
        longest = max(max(tokens), context + 1)
        self.runner = ModelRunner(EngineConfig(model=model_dir, device=str(device), dtype="bfloat16",
                                               kernel_backend="triton", block_size=block,
                                               num_kv_blocks=needed + 8, max_model_len=longest + 1))
        self.vocab = self.runner.model_config.vocab_size
        self.context = context

    def _sequence(self, name: str, length: int):
        import torch
        from semipd.runtime.sampling import SamplingParams
        from semipd.runtime.sequence import Sequence
        ids = torch.randint(0, self.vocab, (length,)).tolist()
        seq = Sequence(name, ids, SamplingParams(temperature=0.0), lambda out: None, self.runner.device)
        if not self.runner.block_manager.allocate(seq, length):
            raise RuntimeError("the benchmark's KV pool is too small")
        return seq

    def prefill(self, tokens: int, device):
        seq = self._sequence(f"prefill-{tokens}", tokens)
        return lambda: self.runner.prefill([(seq, tokens)], [True])   # recomputes the same prompt every call

    def decode(self, batch: int, context: int, device):
        seqs = [self._sequence(f"decode-{batch}-{i}", context) for i in range(batch)]
        return lambda: self.runner.decode(seqs)   # rewrites the last position's KV: same shapes every step


class GpuMeasure:
    def __init__(self, work, streams: dict[Target, tuple], tokens, batches, context, device, warmup, iters,
                 cuda_graph: bool):
        self.streams, self.device, self.warmup, self.iters = streams, device, warmup, iters
        self.prefill_fns = {n: work.prefill(n, device) for n in tokens}
        self.decode_eager = {b: work.decode(b, context, device) for b in batches}
        self.cuda_graph = cuda_graph
        self._decode: dict[tuple[Target, int], tuple] = {}

    def decode_fn(self, t: Target, batch: int):
        """A CUDA graph captured on this target's decode stream (a graph keeps the SMs of the stream it was
        captured on, so each split needs its own), or the eager step."""
        key = (t, batch)
        if key not in self._decode:
            import torch
            eager, stream = self.decode_eager[batch], self.streams[t][1]
            fn, note = eager, "eager"
            if self.cuda_graph:
                try:
                    time_on_stream(eager, stream, 3, 0)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        eager()
                    fn, note = graph.replay, "cuda graph"
                except Exception as exc:  # report it and measure eager rather than give up the sweep
                    note = f"eager (graph capture failed: {type(exc).__name__}: {exc})"
            self._decode[key] = (fn, note)
        return self._decode[key]

    def alone(self, t: Target, phase: str, size: int):
        prefill_stream, decode_stream = self.streams[t]
        if phase == "prefill":
            fn, stream, note = self.prefill_fns[size], prefill_stream, "eager"
        else:
            (fn, note), stream = self.decode_fn(t, size), decode_stream
        return median(time_on_stream(fn, stream, self.warmup, self.iters)), note

    def together(self, t: Target, tokens: int, batch: int):
        """Both phases at once, each issued from its own thread and synchronised after every call, as the
        engine's two workers do: prefill runs `iters` calls while decode steps repeat until prefill is done."""
        import torch
        ps, ds = self.streams[t]
        p_fn, (d_fn, _) = self.prefill_fns[tokens], self.decode_fn(t, batch)
        # One clock for both streams: they wait on a gate event behind a short sleep, so each stream's t0 event
        # fires at the same moment, and every call is timed from its own stream's t0.
        torch.cuda.synchronize(self.device)
        torch.cuda._sleep(2_000_000)
        gate = torch.cuda.Event()
        gate.record()
        t0 = {}
        for name, s in (("p", ps), ("d", ds)):
            s.wait_event(gate)
            t0[name] = torch.cuda.Event(enable_timing=True)
            t0[name].record(s)
        calls = {"p": [], "d": []}
        prefill_done = threading.Event()
        errors = []

        def loop(key, fn, stream):
            def more():
                return len(calls["p"]) < self.iters if key == "p" else not prefill_done.is_set()
            try:
                torch.cuda.set_device(self.device)
                with torch.inference_mode():
                    while more():
                        calls[key].append(_timed(fn, stream))
                        stream.synchronize()
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
            finally:
                if key == "p":
                    prefill_done.set()

        threads = [threading.Thread(target=loop, args=("d", d_fn, ds)),
                   threading.Thread(target=loop, args=("p", p_fn, ps))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        spans = {k: [(t0[k].elapsed_time(a), t0[k].elapsed_time(b)) for a, b in v] for k, v in calls.items()}
        return concurrent_medians(spans["p"], spans["d"])


def concurrent_medians(prefill: list[tuple[float, float]], decode: list[tuple[float, float]]):
    """From (start, end) spans on one clock: the median duration of each phase's calls that lay entirely inside
    the other phase's busy window, and how many there were."""
    def inside(spans, other):
        if not spans or not other:
            return []
        lo, hi = min(a for a, _ in other), max(b for _, b in other)
        return [b - a for a, b in spans if a >= lo and b <= hi]

    p_in, d_in = inside(prefill, decode), inside(decode, prefill)
    return median(p_in), median(d_in), len(p_in), len(d_in)


def _timed(fn, stream):
    import torch
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
    return start, end


def gpu_targets(args, device):
    """The whole GPU on two ordinary streams, then each requested split's green-context stream pair."""
    import torch
    from semipd.runtime.partition import GreenContextBackend
    total = torch.cuda.get_device_properties(device).multi_processor_count
    streams = {Target("full", total, total): (torch.cuda.Stream(device), torch.cuda.Stream(device))}
    backend = GreenContextBackend(device)
    wanted = args.splits or sorted(backend.splits)
    missing = [p for p in wanted if p not in backend.splits]
    if missing:
        raise ValueError(f"prefill sizes {missing} are not candidate splits; choose from {sorted(backend.splits)}")
    for p in wanted:
        split = backend.splits[p]
        streams[Target(f"split {p}", split.prefill_sms, split.decode_sms)] = backend.streams(split)
    return streams, backend


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--splits", type=int_list, default=None, help="prefill SM counts (default: every candidate)")
    parser.add_argument("--tokens", type=int_list, default=[512, 2048, 8192], help="prefill sizes N")
    parser.add_argument("--batches", type=int_list, default=[1, 16, 64], help="decode batch sizes B")
    parser.add_argument("--context", type=int, default=1024, help="KV tokens per decode sequence")
    parser.add_argument("--layers", type=int, default=1, help="synthetic layers per call (default 1)")
    parser.add_argument("--partner-tokens", type=int, default=2048, help="prefill size run against decode")
    parser.add_argument("--partner-batch", type=int, default=16, help="decode batch run against prefill")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--model", metavar="DIR", help="time the real model through ModelRunner instead")
    parser.add_argument("--no-cuda-graph", action="store_true", help="synthetic decode: eager, not graphed")
    parser.add_argument("--no-concurrent", action="store_true", help="only each phase alone")
    args = parser.parse_args(argv)
    for name in ("context", "layers", "warmup", "iters", "partner_tokens", "partner_batch"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tokens = sorted(set(args.tokens) | {args.partner_tokens})
    batches = sorted(set(args.batches) | {args.partner_batch})
    if args.dry_run:
        splits = args.splits or list(range(8, HOPPER_SMS - 7, 8))
        if max(splits) >= HOPPER_SMS:
            print(f"{PROG}: --splits must leave decode some of the {HOPPER_SMS} SMs", file=sys.stderr)
            return 2
        targets = [Target("full", HOPPER_SMS, HOPPER_SMS)] + [Target(f"split {p}", p, HOPPER_SMS - p)
                                                                for p in splits]
        rows = sweep(SyntheticMeasure(), targets, args.tokens, args.batches, args.partner_tokens,
                     args.partner_batch, not args.no_concurrent)
        print("dry run: SYNTHETIC latencies from a made-up a/x+b model, no GPU, nothing measured")
        print(table(rows))
        meta = {"device": "synthetic (dry run)", "sms": HOPPER_SMS, "context": args.context,
                "workload": "synthetic a/x+b model"}
        write_json(args.json, {"dry_run": True, "meta": meta,
                               "rows": [asdict(r) | {"slowdown": r.slowdown} for r in rows]})
        return EXIT_OK
    refused = refuse_without_cuda(PROG)
    if refused is not None:
        return refused
    import torch
    from semipd.kernels import load_ops
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    try:
        streams, backend = gpu_targets(args, device)
    except (RuntimeError, ImportError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if args.model:
        try:
            work = ModelWork(args.model, device, tokens, batches, args.context)
        except (ValueError, OSError) as exc:
            print(f"{PROG}: cannot use --model {args.model}: {exc}", file=sys.stderr)
            return 1
        graphs = False                      # ModelRunner builds its inputs on the host every step
    else:
        work = SyntheticLayers(Shape(), args.layers, device, load_ops("triton"))
        graphs = not args.no_cuda_graph
    measure = GpuMeasure(work, streams, tokens, batches, args.context, device, args.warmup, args.iters, graphs)
    with torch.inference_mode():
        rows = sweep(measure, list(streams), args.tokens, args.batches, args.partner_tokens, args.partner_batch,
                     not args.no_concurrent)
    props = torch.cuda.get_device_properties(device)
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "workload": args.model or f"llama-3-8b-shaped x{args.layers} layer(s)", "context": args.context,
            "warmup": args.warmup, "iters": args.iters, "partition": backend.describe()}
    print(f"{meta['device']} ({meta['sms']} SMs), {meta['workload']}, decode context {args.context}, "
          f"medians of {args.iters} calls")
    print(table(rows))
    notes = sorted({r.note for r in rows if r.note not in ("", "eager", "cuda graph")})
    for note in notes:
        print(f"note: {note}")
    write_json(args.json, {"meta": meta, "rows": [asdict(r) | {"slowdown": r.slowdown} for r in rows]})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
