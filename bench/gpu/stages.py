"""The suite's own stages (bench/gpu/suite.py runs each as `python bench/gpu/stages.py NAME --result FILE`, in its
own process): environment, compiled kernels against their references, engine greedy parity against transformers
over HTTP, and engine throughput and decode step time against the roofline. Everything else the suite runs is an
existing script (pytest, bench/sm_sweep.py, bench/switch_latency.py).

Each stage rewrites its result file after every part, so a stage cut off by its time cap still leaves what it
measured. Exit 0: done and every check passed; 1: a check failed (the result's "reason" says which); anything
else: it crashed. --dry-run: the same code on CPU with tiny shapes (float32 where the engine's CPU path needs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "kernels"), str(ROOT / "tests" / "engine")]


class Result(dict):
    """The stage's JSON, written through on every update."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def put(self, **items):
        self.update(items)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def cuda_device(dry_run: bool):
    import torch
    return torch.device("cpu" if dry_run else "cuda", None if dry_run else 0)


# ---- a) environment ---------------------------------------------------------------------------------------

def env_stage(args, out: Result) -> int:
    import platform

    import torch
    import transformers
    import triton
    import bench_kernels
    out.put(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
            triton=triton.__version__, transformers=transformers.__version__, cuda_available=torch.cuda.is_available(),
            env={k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
                                                "CUDA_DEVICE_MAX_CONNECTIONS", "TRITON_INTERPRET")})
    device = cuda_device(args.dry_run)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.put(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                capability=f"{props.major}.{props.minor}", driver=_driver_version(), nvidia_smi=_nvidia_smi())
    else:
        out.put(device="cpu (dry run)", sms=None)
    # The same copy measurement bench_kernels divides by: 2 GiB device-to-device, bytes read plus written.
    shapes = bench_kernels.TINY if args.dry_run else bench_kernels.FULL
    out.put(hbm_gbps=bench_kernels.Bench(torch, device, shapes).hbm_gbps, copy_bytes=shapes.copy_bytes)
    if device.type == "cuda":
        from semipd.runtime.partition import GreenContextBackend
        try:
            backend = GreenContextBackend(device)
            out.put(green_contexts=backend.describe(), candidate_splits=sorted(backend.splits))
        except Exception as exc:  # the engine falls back to shared streams; the suite must say so loudly
            out.put(green_contexts=None, reason=f"green contexts unavailable: {exc}")
            return 1
    return 0


def _driver_version():
    try:
        from cuda.bindings import driver as cu
        cu.cuInit(0)
        return cu.cuDriverGetVersion()[1]
    except Exception as exc:
        return f"unknown ({exc})"


def _nvidia_smi():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                               "clocks.max.mem", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


# ---- c) compiled kernels against their references ---------------------------------------------------------

def kernels_stage(args, out: Result) -> int:
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: decoration fixes the mode
    import torch
    from kernel_cases import TOLERANCE, make_paged_kv
    from semipd.kernels import build_cos_sin_cache, load_ops
    device = cuda_device(args.dry_run)
    dtype = torch.bfloat16
    tol = TOLERANCE[dtype]
    # Llama-3-8B: 32 query heads, 8 KV heads, head dim 128, the engine's 16-token blocks; smaller in the dry run
    # (the interpreter is slow), same GQA ratio.
    hq, hkv, d, block = (8, 2, 64, 16) if args.dry_run else (32, 8, 128, 16)
    hidden, inter = (64, 96) if args.dry_run else (4096, 14336)
    lens = [1, 37, 70] if args.dry_run else [1, 16, 37, 1000, 2047, 4096, 8191, 500]
    rows = [5] if args.dry_run else [1, 257, 8192]
    triton_ops, ref = load_ops("triton"), load_ops("torch")
    checks = []
    out.put(tolerance=dict(tol, dtype="bfloat16", rule="kernel_cases.TOLERANCE: both sides compute in float32 "
                           "and round once to bfloat16, so |a-b| <= atol + rtol*|b| with 2 bf16 eps each; "
                           "store_kv must be exact"),
            shapes=dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block, hidden=hidden,
                        intermediate=inter), checks=checks)

    def check(name, shape, got, want, exact=False):
        got, want = got.float(), want.float()
        err = (got - want).abs()
        bound = 0.0 if exact else tol["atol"] + tol["rtol"] * want.abs()
        ok = bool(torch.isfinite(got).all()) and bool((err <= bound).all())
        checks.append(dict(kernel=name, shape=shape, ok=ok, max_abs_err=float(err.max()),
                           worst_excess=float((err - bound).max())))
        out.put(checks=checks)

    def paged(seq_lens, seed):
        kv = make_paged_kv(seq_lens, hkv, d, block, dtype, seed=seed)
        return [t.to(device) for t in (kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)]

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    with torch.inference_mode():
        k_cache, v_cache, tables, seq_lens = paged(lens, seed=1)
        q = randn(len(lens), hq, d)
        for splits in (None, 1, 4):  # the launcher's own choice, no split-K, a forced split-K merge
            kw = {} if splits is None else {"num_splits": splits}
            check("decode_attention", f"B={len(lens)} ctx<={max(lens)} splits={splits or 'auto'}",
                  triton_ops.decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5, **kw),
                  ref.decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5))
        # fresh prompts, a chunk after a cached prefix, one token after a prefix
        q_lens, kv_lens = ([13, 19, 1], [13, 40, 18]) if args.dry_run else ([1000, 512, 1, 300], [1000, 2512, 4096, 300])
        k_cache, v_cache, tables, seq_lens = paged(kv_lens, seed=2)
        cu = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(len(q_lens))], dtype=torch.int32, device=device)
        q = randn(sum(q_lens), hq, d)
        pargs = (q, k_cache, v_cache, tables, cu, seq_lens, max(q_lens), d ** -0.5)
        check("prefill_attention", f"q={q_lens} kv={kv_lens}", triton_ops.prefill_attention(*pargs),
              ref.prefill_attention(*pargs))
        rope = build_cos_sin_cache(d, 8192, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}, device=device)
        for t in rows:
            x, res, w = randn(t, hidden, scale=3.0), randn(t, hidden, scale=2.0), randn(hidden)
            check("rms_norm", f"T={t} H={hidden}", triton_ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
            for part, got, want in zip(("out", "residual"), triton_ops.rms_norm(x, w, 1e-5, res),
                                       ref.rms_norm(x, w, 1e-5, res)):
                check(f"rms_norm+residual ({part})", f"T={t} H={hidden}", got, want)
            qkv = randn(t, hq + 2 * hkv, d)  # q and k are strided views of one projection, as in the model
            positions = torch.randint(0, 8192, (t,), generator=gen).to(device)
            got = triton_ops.rotary_embedding(positions, qkv[:, :hq], qkv[:, hq:hq + hkv], rope)
            want = ref.rotary_embedding(positions, qkv[:, :hq], qkv[:, hq:hq + hkv], rope)
            for part, g, w_ in zip("qk", got, want):
                check(f"rotary_embedding ({part})", f"T={t}", g, w_)
            gu = randn(t, 2 * inter, scale=4.0)
            check("silu_and_mul", f"T={t} I={inter}", triton_ops.silu_and_mul(gu), ref.silu_and_mul(gu))
            pages = -(-t // block) + 1
            caches = [torch.full((pages, block, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(4)]
            key, value = randn(t, hkv, d), randn(t, hkv, d)
            slots = torch.randperm(pages * block, generator=gen)[:t].to(device)
            slots[0] = -1  # padding: must be skipped
            triton_ops.store_kv(key, value, caches[0], caches[1], slots)
            ref.store_kv(key, value, caches[2], caches[3], slots)
            for part, a, b in (("k", caches[0], caches[2]), ("v", caches[1], caches[3])):
                check(f"store_kv ({part})", f"T={t}", a.nan_to_num(7.0), b.nan_to_num(7.0), exact=True)
    failed = [f"{c['kernel']} {c['shape']}" for c in checks if not c["ok"]]
    out.put(correct=not failed)
    # Bandwidth: bench_kernels itself, at its Llama-3-8B shapes, its table to the log and its JSON next to ours.
    import bench_kernels
    bench_argv = ["--json", args.bench_json] + (["--dry-run"] if args.dry_run else [])
    rc = bench_kernels.main(bench_argv)
    summary = {}
    if rc == 0 and Path(args.bench_json).exists():
        data = json.loads(Path(args.bench_json).read_text())
        for r in data["results"]:
            best = summary.setdefault(r["kernel"], {"best_hbm_frac": 0.0})
            if r["hbm_frac"] > best["best_hbm_frac"]:
                best.update(best_hbm_frac=r["hbm_frac"], at=r["shape"], gbps=r["gbps"],
                            speedup_vs_baseline=r["baseline_ms"] / r["ms"])
        out.put(hbm_gbps=data["hbm_gbps"], bandwidth=summary)
    if failed or rc:
        out.put(reason=("outside tolerance: " + "; ".join(failed)) if failed else f"bench_kernels exited {rc}")
        return 1
    return 0


# ---- d) engine greedy parity against transformers, over HTTP ----------------------------------------------

# bf16 against float32 transformers on this model (CPU, 16 prompts x 24 tokens) agreed on 80% of the tokens before
# the first difference, every difference came at token 7 or later, and the reference's logits for the two tokens
# there were 0 to 0.0625 apart (bf16 logits of size ~8 step by 0.0625). So, per prompt:
FIRST_N = 4          # the first tokens must be equal, exactly
MIN_PREFIX = 0.6     # the agreed prefixes must cover this share of the reference tokens
NEAR_TIE = 0.25      # a later difference must be a near-tie: the reference's two logits within 4 bf16 steps


def parity_stage(args, out: Result) -> int:
    import concurrent.futures as cf

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import bench_engine
    import test_parity
    from semipd.runtime.tiny_model import write_tiny_model
    device, dtype = (("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16))
    tmp = Path(tempfile.mkdtemp(prefix="semipd-parity-"))
    # head dim 128 and 4 query heads per KV head, as Llama-3-8B, small enough to load in seconds; the dry run
    # takes the default tiny model and fewer prompts (its CPU float32 tokens must all be equal)
    dims = {} if args.dry_run else dict(hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=4,
                                        num_kv_heads=1)
    model_dir = write_tiny_model(tmp / "parity-llama", "llama", seed=3, **dims)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = test_parity.make_prompts(tok, n=4 if args.dry_run else 16, seed=2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    expected = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(device)
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=test_parity.MAX_TOKENS,
                              do_sample=False)
            expected.append(gen[0, ids.shape[1]:].tolist())
    out.put(model=str(model_dir), dtype=str(dtype), device=device, prompts=len(prompts),
            max_tokens=test_parity.MAX_TOKENS,
            rule=f"per prompt, tokens are compared up to the first difference (after it the two continue "
                 f"different texts); pass: the first {FIRST_N} tokens are equal, every later difference is a "
                 f"near-tie (the reference's logits for the two tokens within {NEAR_TIE}), and the agreed "
                 f"prefixes cover >= {MIN_PREFIX:.0%} of the reference tokens")
    extra = [] if args.dry_run else ["--device", "cuda", "--dtype", "bfloat16", "--kv-cache-memory", "4"]
    log_path = tmp / "server.log"
    proc, url, _ = bench_engine.start_server(model_dir, len(prompts), extra + ["--max-model-len", "512"], log_path)
    try:
        with cf.ThreadPoolExecutor(len(prompts)) as pool:  # all at once: batching and the handoff are on the path
            got = [ids for ids, _ in pool.map(lambda p: test_parity.complete(url, p), prompts)]
    finally:
        bench_engine.stop_server(proc)
    per_prompt, agreed, same_pos, total = [], 0, 0, 0
    problems = []
    with torch.inference_mode():
        for i, (p, want, have) in enumerate(zip(prompts, expected, got)):
            prefix = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            agreed += prefix
            total += len(want)
            same_pos += sum(a == b for a, b in zip(want, have))
            row = {"prompt": i, "agreed": prefix, "reference_tokens": len(want), "engine_tokens": len(have)}
            if prefix < max(len(want), len(have)):
                gap = _logit_gap(hf, tok, p, want, have, prefix, device)
                row["gap"] = gap
                if prefix < FIRST_N:
                    problems.append(f"prompt {i}: differs at token {prefix}, inside the first {FIRST_N}")
                elif gap > NEAR_TIE:
                    problems.append(f"prompt {i}: differs at token {prefix} where the reference's logits are "
                                    f"{gap:.3f} apart (not a near-tie)")
            per_prompt.append(row)
    ratio = agreed / max(1, total)
    if ratio < MIN_PREFIX:
        problems.append(f"agreed prefixes cover {ratio:.1%} of the reference tokens (< {MIN_PREFIX:.0%})")
    out.put(prefix_agreement=ratio, same_position_share=same_pos / max(1, total), per_prompt=per_prompt,
            exact_prompts=sum(r["agreed"] == r["reference_tokens"] == r["engine_tokens"] for r in per_prompt))
    if problems:
        out.put(reason="; ".join(problems[:5]), server_log_tail=log_path.read_text(errors="replace")[-3000:])
        return 1
    return 0


def _logit_gap(hf, tok, prompt, want, have, at, device):
    """The reference's logit for its own token minus its logit for the engine's, at the first difference; a side
    that stopped there chose EOS."""
    import torch
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    mine, theirs = (want[at] if at < len(want) else eos), (have[at] if at < len(have) else eos)
    ids = tok(prompt, return_tensors="pt").input_ids[0].tolist() + want[:at]
    logits = hf(torch.tensor([ids], device=device)).logits[0, -1].float()
    return float(logits[mine] - logits[theirs])


# ---- g) engine throughput and decode step time against the roofline ---------------------------------------

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256)


def engine_stage(args, out: Result) -> int:
    import torch
    import bench_engine
    dry = args.dry_run
    shape = (bench_engine.ModelShape(64, 128, 2, 4, 2, 600) if dry else
             bench_engine.ModelShape(num_layers=args.layers, **LLAMA3_8B))
    started = time.monotonic()
    model_dir = _bf16_model(shape, Path(args.cache_dir), dtype="float32" if dry else "bfloat16")
    out.put(model=shape.name, layers=shape.num_layers, model_write_s=time.monotonic() - started,
            note="Llama-3-8B layer shapes and vocabulary with fewer layers so it is written and loaded within the "
                 "stage's cap; the roofline ratio does not depend on the layer count" if not dry else "dry run")
    hbm = args.hbm_gbps or _copy_gbps(dry)
    out.put(hbm_gbps=hbm)
    out.put(decode_steps=_decode_steps(model_dir, shape, hbm, dry, args.context, out))
    # Throughput: bench_engine's workload and client against `semipd serve` on the GPU, then transformers generate
    # on one padded batch on the same GPU (bench_engine's runner, fed through an adapter that moves to the GPU).
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n, lens = (2, (4, 8)) if dry else (args.requests, (128, 512))
    work = bench_engine.make_workload(tokenizer, n, lens, (4, 8) if dry else (64, 256), "uniform", 0)
    extra = [] if dry else ["--device", "cuda", "--dtype", "bfloat16", "--kv-cache-memory", "16"]
    tmp = Path(tempfile.mkdtemp(prefix="semipd-engine-"))
    rows = [bench_engine.run_semipd_http(model_dir, work, extra, tmp / "server.log")]
    out.put(rows=[r.summary() for r in rows])
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # the same exact lengths as the engine's ignore_eos
    rows.append(bench_engine.run_hf_batch(OnDevice(hf), tokenizer, work, threads=1))
    bench_engine.print_table(rows)
    ratio = rows[0].tok_s / rows[1].tok_s
    print(f"semipd / transformers batch output throughput: {ratio:.2f}x")
    out.put(rows=[r.summary() for r in rows], throughput_ratio=ratio,
            workload={"requests": n, "prompt_lens": [len(p) for p in work.prompts], "output_lens": work.output_lens})
    return 0


class OnDevice:
    """transformers model whose generate takes bench_engine's CPU tensors: inputs move to the model's device and
    every step's tokens are waited for, so the streamer's step times are when tokens exist, not when launched."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def generate(self, input_ids, attention_mask=None, streamer=None, **kwargs):
        import torch
        dev = self.model.device
        if streamer is not None and dev.type == "cuda":
            streamer = _Synced(streamer)
        out = self.model.generate(input_ids=input_ids.to(dev), streamer=streamer, **kwargs,
                                  attention_mask=None if attention_mask is None else attention_mask.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out


class _Synced:
    def __init__(self, inner):
        self.inner = inner

    def put(self, value):
        import torch
        torch.cuda.current_stream().synchronize()
        self.inner.put(value)

    def end(self):
        self.inner.end()


def _bf16_model(shape, cache_dir: Path, dtype: str) -> Path:
    """bench_engine's cached random model, written in bfloat16 (half the bytes of its float32 default)."""
    import shutil
    import bench_engine
    from semipd.runtime.tiny_model import write_tiny_model
    final = cache_dir / f"{shape.name}-{dtype}"
    if (final / bench_engine.MODEL_MARKER).exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=cache_dir))
    write_tiny_model(tmp, "llama", hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                     num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                     vocab_size=shape.vocab_size, dtype=dtype, seed=0)
    bench_engine.extend_tokenizer(tmp / "tokenizer.json", shape.vocab_size)
    (tmp / bench_engine.MODEL_MARKER).write_text(json.dumps({"shape": shape.name, "dtype": dtype}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def _weight_bytes(model_dir: Path, elem: int) -> int:
    """What one decode step reads: every weight once, at the serving dtype, except the embedding table (a gather
    of B rows), unless the head is tied to it."""
    from safetensors import safe_open
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            tied = "lm_head.weight" not in names
            for name in names:
                if "embed_tokens" not in name or tied:
                    shape = f.get_slice(name).get_shape()
                    total += elem * (1 if not shape else math.prod(shape))
    return total


def _copy_gbps(dry: bool) -> float:
    import torch
    import bench_kernels
    shapes = bench_kernels.TINY if dry else bench_kernels.FULL
    return bench_kernels.Bench(torch, cuda_device(dry), shapes).hbm_gbps


def _decode_steps(model_dir: Path, shape, hbm_gbps: float, dry: bool, context: int, out: Result) -> list[dict]:
    """ModelRunner.decode at batch 1 and 64 (decode_step.py's sequences), eager and from the engine's CUDA graph,
    against (weights read + KV read) / measured copy bandwidth."""
    import torch
    import decode_step
    from gpu_common import median, time_on_stream
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.model_runner import ModelRunner
    batches, context = ([1, 2], 16) if dry else ([1, 64], context)
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cpu" if dry else "cuda",
                                      dtype="float32" if dry else "bfloat16", max_model_len=context + 8,
                                      num_kv_blocks=sum(b * (-(-(context + 1) // 16)) for b in batches) + 8))
    mc, elem = runner.model_config, runner.dtype.itemsize
    weights = _weight_bytes(model_dir, elem)
    stream = torch.cuda.Stream() if not dry else None
    if not dry:
        runner.capture_decode_graphs([stream], max(batches))
    rows = []
    for batch in batches:
        seqs = decode_step.semipd_batch(runner, batch, context)
        kv = 2 * mc.num_layers * batch * context * mc.num_kv_heads * mc.head_dim * elem
        roofline_ms = (weights + kv) / (hbm_gbps * 1e9) * 1e3
        row = {"batch": batch, "context": context, "weight_bytes": weights, "kv_bytes": kv, "roofline_ms": roofline_ms}
        if dry:
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                runner.decode(seqs)
                samples.append((time.perf_counter() - t0) * 1e3)
            row["eager_ms"] = median(samples)
        else:
            row["eager_ms"] = median(time_on_stream(lambda: runner._decode_eager(seqs), stream, 3, 20))
            row["graph_ms"] = median(time_on_stream(lambda: runner.decode(seqs, stream), stream, 3, 20))
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                for _ in range(20):
                    runner.decode(seqs, stream)
            stream.synchronize()
            row["graph_wall_ms"] = (time.perf_counter() - t0) / 20 * 1e3
        best = row.get("graph_ms") or row["eager_ms"]
        row["vs_roofline"] = best / roofline_ms
        for seq in seqs:
            runner.block_manager.free(seq)
        rows.append(row)
        out.put(decode_steps=rows)
    del runner
    if not dry:
        torch.cuda.empty_cache()
    return rows


# ---- entry point ------------------------------------------------------------------------------------------

STAGES = {"env": env_stage, "kernels": kernels_stage, "parity": parity_stage, "engine": engine_stage}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--result", required=True, type=Path, help="where this stage's JSON goes")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--bench-json", help="kernels: bench_kernels' own JSON")
    p.add_argument("--hbm-gbps", type=float, help="engine: the copy bandwidth stage a measured")
    p.add_argument("--layers", type=int, default=8, help="engine: Llama-3-8B-shaped layers in the model")
    p.add_argument("--requests", type=int, default=64, help="engine: requests in the throughput workload")
    p.add_argument("--context", type=int, default=1024, help="engine: KV tokens per sequence in the decode step")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "semipd-gpu-suite"))
    args = p.parse_args(argv)
    out = Result(args.result)
    out.put(stage=args.stage, dry_run=args.dry_run)
    return STAGES[args.stage](args, out)


if __name__ == "__main__":
    sys.exit(main())
