"""Output throughput, TTFT and TPOT of the semipd engine against transformers `generate`, side by side, on CPU.

The workload: N requests that all arrive at t=0, each with its own prompt (a window of real text, length drawn
uniformly from --prompt-len) and its own output length (drawn from --output-len, uniform or long-tail), with
ignore_eos so every request produces exactly its requested tokens. The systems serve it one after another,
never at the same time:

  semipd               `semipd serve` as a subprocess on loopback, N concurrent streamed /v1/completions
                       requests over httpx (or, with --path inprocess, Engine.generate in this process)
  transformers batch   one left-padded batch of all N prompts, greedy, max_new_tokens = the longest request;
                       only each row's requested tokens count as output (that is what a client would get).
                       It runs once per --hf-threads count and the fastest is the baseline: on a shared CPU
                       OpenMP barriers can make more threads much slower, and the baseline should be its best.
  transformers seq     one request at a time, for context

Per request, as `vllm bench serve` defines them: TTFT = first token - arrival (t=0 for everyone, so queueing
counts), E2E = last token - arrival, TPOT = (E2E - TTFT) / (tokens - 1). Output tok/s = useful output tokens /
wall time from t=0 until the last request is done. For transformers the token times come from a streamer, as if
it streamed (the batch's tokens all arrive at the same step times).

The model is a random Llama written by semipd.runtime.tiny_model and cached. Its tokenizer is extended with
plain word tokens up to the model's vocabulary size, so every id the model can emit decodes to text: without
that, ids past the tokenizer's 512 would decode to nothing and the server would send no chunk until the end.

    python bench/bench_engine.py                 # ~100M model, 16 requests (a few minutes on 2 cores)
    python bench/bench_engine.py --quick         # small model, 4 requests (under a minute)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from semipd.runtime.cpu_threads import cpu_share

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("SEMIPD_CACHE", Path.home() / ".cache" / "semipd")) / "bench"
MODEL_MARKER = "bench-model.json"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    vocab_size: int = 32000

    @property
    def name(self) -> str:
        return (f"llama-h{self.hidden_size}-i{self.intermediate_size}-l{self.num_layers}-a{self.num_heads}"
                f"-kv{self.num_kv_heads}-v{self.vocab_size}")


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    distribution: str


@dataclass
class RequestResult:
    ttft: float
    e2e: float
    tokens: int
    text: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class Row:
    system: str
    wall_s: float
    useful_tokens: int
    computed_tokens: int          # tokens the system generated, wasted ones included
    requests: list[RequestResult] = field(default_factory=list)
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall_s

    def summary(self) -> dict:
        ttft = [r.ttft for r in self.requests]
        tpot = [r.tpot for r in self.requests if r.tpot is not None]
        return {"system": self.system, "output_tok_s": self.tok_s, "wall_s": self.wall_s,
                "useful_tokens": self.useful_tokens, "computed_tokens": self.computed_tokens,
                "ttft_mean_s": statistics.fmean(ttft), "ttft_median_s": statistics.median(ttft),
                "ttft_p99_s": _p99(ttft), "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
                "tpot_median_s": statistics.median(tpot) if tpot else None,
                "tpot_p99_s": _p99(tpot) if tpot else None, "note": self.note}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


# ---- model and workload ----------------------------------------------------------------------------------

def prepare_model(shape: ModelShape, cache_dir: Path) -> Path:
    """Write the random model once per shape; later runs reuse it (renamed into place only when complete)."""
    from semipd.runtime.tiny_model import write_tiny_model

    final = cache_dir / shape.name
    if (final / MODEL_MARKER).exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=cache_dir))
    try:
        write_tiny_model(tmp, "llama", hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                         vocab_size=shape.vocab_size, dtype="float32", seed=0)
        extend_tokenizer(tmp / "tokenizer.json", shape.vocab_size)
        (tmp / MODEL_MARKER).write_text(json.dumps(asdict(shape)) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def extend_tokenizer(path: Path, vocab_size: int) -> None:
    """Give every model id a token: ids past the BPE vocabulary become ' word' tokens (no merges reach them, so
    encoding is unchanged; they only decode). Lowercase letters are their own byte-level symbols."""
    data = json.loads(path.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab)
    next_id = max(vocab.values()) + 1
    n = 0
    while next_id < vocab_size:
        word, k = "", n
        while True:
            word = chr(ord("a") + k % 26) + word
            k = k // 26 - 1
            if k < 0:
                break
        n += 1
        token = "\u0120" + word          # the byte-level symbol for a leading space
        if token not in taken:
            vocab[token] = next_id
            taken.add(token)
            next_id += 1
    path.write_text(json.dumps(data, ensure_ascii=False))


def make_workload(tokenizer, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  distribution: str, seed: int) -> Workload:
    """Prompts are windows of the tiny model's English corpus; lengths are seeded, so runs are comparable."""
    from semipd.runtime.tiny_model import CORPUS

    rng = random.Random(seed)
    text_ids = tokenizer(CORPUS, add_special_tokens=False).input_ids
    prompts = []
    for _ in range(n):
        length = rng.randint(*prompt_len)
        start = rng.randrange(len(text_ids))
        prompts.append([text_ids[(start + i) % len(text_ids)] for i in range(length)])
    lo, hi = output_len
    if distribution == "uniform":
        outs = [rng.randint(lo, hi) for _ in range(n)]
    elif distribution == "longtail":
        # most requests short, a quarter long: the padded batch pays for the long ones on every row
        short_hi = lo + (hi - lo) // 4
        outs = [rng.randint(hi - (hi - lo) // 4, hi) if rng.random() < 0.25 else rng.randint(lo, short_hi)
                for _ in range(n)]
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return Workload(prompts, outs, distribution)


# ---- semipd over HTTP --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def semipd_command(model_dir: Path, port: int, n: int, extra: list[str]) -> list[str]:
    """`semipd serve` on CPU in float32 with a 1 GiB KV pool, a batch limit of `n`, then `extra` (a later flag
    wins over an earlier one)."""
    return [sys.executable, "-m", "semipd.runtime.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-num-seqs", str(max(n, 1)),
            "--kv-cache-memory", "1", "--log-level", "warning", *extra]


def start_server(model_dir: Path, n: int, extra: list[str], log_path: Path):
    port = _free_port()
    cmd = semipd_command(model_dir, port, n, extra)
    proc, url = spawn_server(cmd, port, log_path, "semipd serve")
    return proc, url, cmd


def spawn_server(cmd: list[str], port: int, log_path: Path, what: str, env: dict | None = None,
                 timeout_s: float = 300, cwd: Path = ROOT):
    """Start an OpenAI-compatible server on loopback `port` and wait until GET /health answers 200. `env`: the
    variables to set on top of this process's environment."""
    import httpx

    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            env=None if env is None else os.environ | env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} was not ready after {timeout_s:g} s; see {log_path}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _stream_one(client, url: str, model: str, prompt: list[int], max_tokens: int, t0: float):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    ttft = last = None
    tokens, parts = 0, []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if chunk.get("choices"):
                if ttft is None:
                    ttft = now - t0
                last = now - t0
                parts.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return RequestResult(ttft, last, tokens, "".join(parts))


async def _http_run(url: str, model: str, work: Workload) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(work.prompts) + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await _stream_one(client, url, model, work.prompts[0][:8], 4, time.perf_counter())   # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_stream_one(client, url, model, p, m, t0)
                                         for p, m in zip(work.prompts, work.output_lens)))
        return list(results), time.perf_counter() - t0


def run_semipd_http(model_dir: Path, work: Workload, extra: list[str], log_path: Path) -> Row:
    proc, url, cmd = start_server(model_dir, len(work.prompts), extra, log_path)
    try:
        results, wall = asyncio.run(_http_run(url, model_dir.name, work))
    finally:
        stop_server(proc)
    tokens = sum(r.tokens for r in results)
    return Row("semipd (HTTP)", wall, tokens, tokens, results, note=" ".join(cmd[1:]))


# ---- semipd in process -------------------------------------------------------------------------------------

def make_engine(model_dir: Path, n: int, threads: int | None, extra: dict | None = None):
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.engine import Engine

    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_num_seqs=max(n, 1),
                          kv_cache_memory=1, torch_threads=threads, **(extra or {}))
    engine = Engine(config)
    engine.start()
    return engine


async def _engine_one(engine, rid: str, prompt: list[int], max_tokens: int, t0: float) -> RequestResult:
    from semipd.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ttft = last = None
    tokens, parts = 0, []
    async for out in engine.generate(rid, prompt, params):
        now = time.perf_counter()
        if out.token_ids:
            if ttft is None:
                ttft = now - t0
            last = now - t0
        parts.append(out.text)
        tokens = out.completion_tokens
    return RequestResult(ttft, last, tokens, "".join(parts))


async def _engine_run(engine, work: Workload, tag: str) -> tuple[list[RequestResult], float]:
    await _engine_one(engine, f"{tag}-warmup", work.prompts[0][:8], 4, time.perf_counter())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_engine_one(engine, f"{tag}-{i}", p, m, t0)
                                     for i, (p, m) in enumerate(zip(work.prompts, work.output_lens))))
    return list(results), time.perf_counter() - t0


def run_semipd_inprocess(model_dir: Path, work: Workload, threads: int | None) -> Row:
    engine = make_engine(model_dir, len(work.prompts), threads)
    try:
        results, wall = asyncio.run(_engine_run(engine, work, "bench"))
    finally:
        engine.shutdown()
    tokens = sum(r.tokens for r in results)
    return Row("semipd (in-process)", wall, tokens, tokens, results,
               note=f"Engine.generate, {cpu_share(threads)} torch thread(s) per worker while both work")


# ---- where the engine's time goes (py-spy) -----------------------------------------------------------------

# innermost Python frame (file, function) -> category; the first match wins, "*" matches any function
CATEGORIES = [
    ("threading.py", "Condition.wait", "idle (waiting for work)"),     # py-spy misses some idle native waits
    ("threading.py", "Event.wait", "idle (waiting for work)"),
    ("reference.py", "decode_attention", "attention, decode (torch reference)"),
    ("reference.py", "prefill_attention", "attention, prefill (torch reference)"),
    ("reference.py", "store_kv", "store_kv"),
    ("reference.py", "rms_norm", "rms_norm"),
    ("reference.py", "rotary_embedding", "rotary"),
    ("reference.py", "rotate", "rotary"),
    ("reference.py", "silu_and_mul", "silu_and_mul"),
    ("layers.py", "linear", "matmul (linear layers and lm_head)"),
    ("layers.py", "Linear.forward", "matmul (linear layers and lm_head)"),
    ("models.py", "CausalLM.compute_logits", "lm_head (matmul)"),
    ("models.py", "Embedding.forward", "embedding"),
    ("layers.py", "*", "model glue (python)"),
    ("models.py", "*", "model glue (python)"),
    ("module.py", "*", "model glue (python)"),
    ("model_runner.py", "*", "batch building (model_runner)"),
    ("sampling.py", "*", "sampling"),
    ("detokenizer.py", "*", "detokenization"),
    ("tokenization_utils_base.py", "*", "detokenization"),
    ("tokenization_utils_tokenizers.py", "*", "detokenization"),
    ("engine.py", "*", "scheduling, locks, output (engine)"),
    ("sequence.py", "*", "scheduling, locks, output (engine)"),
    ("block_manager.py", "*", "scheduling, locks, output (engine)"),
    ("metrics.py", "*", "metrics"),
    ("server.py", "*", "HTTP server (handlers, SSE)"),
    ("protocol.py", "*", "HTTP server (handlers, SSE)"),
    ("base_events.py", "*", "event loop"),
    ("selector_events.py", "*", "event loop"),
    ("metrics_core.py", "*", "metrics"),
]


def _category(stack: list[str]) -> str:
    python = [f for f in stack if f.endswith(")") and ".py:" in f]
    for frame in reversed(python):
        func, _, where = frame.rpartition(" (")
        base = where.rsplit("/", 1)[-1].split(":", 1)[0]
        if base == "reference.py" and func == "gather_kv":      # charge it to the attention that called it
            continue
        for file, name, category in CATEGORIES:
            if base == file and (name == "*" or func == name):
                return category
    return "other"


def profile_summary(raw: Path) -> dict:
    """Samples per thread and category from `py-spy record --threads --format raw` output."""
    table: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]
        cat = _category(frames[1:])
        table.setdefault(thread, {}).setdefault(cat, 0)
        table[thread][cat] += int(count)
    for thread in sorted(table, key=lambda t: -sum(table[t].values())):
        total = sum(table[thread].values())
        print(f"thread {thread}: {total} samples")
        for cat, n in sorted(table[thread].items(), key=lambda kv: -kv[1]):
            print(f"  {100 * n / total:5.1f}%  {n:>7}  {cat}")
    return table


# ---- transformers ------------------------------------------------------------------------------------------

class StepTimes:
    """A generate() streamer that only records when each new token (one per row) reaches the host."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        if value.dim() == 1:          # a step's new tokens; the prompt arrives first as [batch, prompt_len]
            self.times.append(time.perf_counter())

    def end(self):
        pass


def load_hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # ignore_eos: the same exact lengths as the engine; no early stop, no pad rows from EOS
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _generate(model, input_ids, attention_mask, max_new_tokens: int, streamer=None):
    pad = model.config.pad_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, streamer=streamer)
    if out.shape[1] != input_ids.shape[1] + max_new_tokens:
        raise RuntimeError(f"transformers stopped after {out.shape[1] - input_ids.shape[1]} of {max_new_tokens} "
                           "tokens; ignore_eos did not take")
    return out


def _left_pad(prompts: list[list[int]], pad: int):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def run_hf_batch(model, tokenizer, work: Workload, threads: int) -> Row:
    torch.set_num_threads(threads)
    pad = model.config.pad_token_id
    ids, mask = _left_pad(work.prompts, pad)
    _generate(model, *_left_pad([p[:8] for p in work.prompts[:2]], pad), 4)         # warm-up
    longest = max(work.output_lens)
    steps = StepTimes()
    t0 = time.perf_counter()
    out = _generate(model, ids, mask, longest, steps)
    wall = time.perf_counter() - t0
    if len(steps.times) != longest:
        raise RuntimeError(f"the streamer saw {len(steps.times)} steps, expected {longest}")
    results = []
    for row, want in enumerate(work.output_lens):
        text = tokenizer.decode(out[row, ids.shape[1]:ids.shape[1] + want].tolist(), skip_special_tokens=True)
        results.append(RequestResult(steps.times[0] - t0, steps.times[want - 1] - t0, want, text))
    padded = ids.numel()
    return Row(f"transformers batch ({threads}t)", wall, sum(work.output_lens), len(work.prompts) * longest, results,
               note=f"one left-padded batch [{ids.shape[0]} x {ids.shape[1]}] ({padded - int(mask.sum())} pad "
                    f"tokens in prefill), max_new_tokens={longest}")


def run_hf_sequential(model, tokenizer, work: Workload, threads: int) -> Row:
    torch.set_num_threads(threads)
    _generate(model, torch.tensor([work.prompts[0][:8]]), None, 4)                   # warm-up
    results = []
    t0 = time.perf_counter()
    for prompt, want in zip(work.prompts, work.output_lens):
        steps = StepTimes()
        out = _generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), want, steps)
        text = tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
        results.append(RequestResult(steps.times[0] - t0, steps.times[want - 1] - t0, want, text))
    wall = time.perf_counter() - t0
    return Row(f"transformers seq ({threads}t)", wall, sum(work.output_lens), sum(work.output_lens), results,
               note="one request at a time in arrival order; TTFT includes the wait for earlier requests")


# ---- report ------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "loadavg": os.getloadavg()}


def print_table(rows: list[Row]) -> None:
    head = (f"{'system':<24}{'out tok/s':>10}{'wall s':>9}{'useful':>8}{'computed':>9}"
            f"{'TTFT mean':>11}{'TTFT p99':>10}{'TPOT mean':>11}{'TPOT p99':>10}")
    print(head)
    print("-" * len(head))
    for row in rows:
        s = row.summary()
        print(f"{row.system:<24}{s['output_tok_s']:>10.1f}{s['wall_s']:>9.2f}{s['useful_tokens']:>8}"
              f"{s['computed_tokens']:>9}{s['ttft_mean_s'] * 1e3:>9.0f}ms{s['ttft_p99_s'] * 1e3:>8.0f}ms"
              f"{(s['tpot_mean_s'] or 0) * 1e3:>9.1f}ms{(s['tpot_p99_s'] or 0) * 1e3:>8.1f}ms")


def same_text(a: Row, b: Row) -> int:
    return sum(x.text == y.text for x, y in zip(a.requests, b.requests))


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be >= 1")
    return values


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-requests", "-n", type=int, default=16)
    p.add_argument("--prompt-len", type=parse_range, default=(16, 256), help="MIN:MAX, uniform")
    p.add_argument("--output-len", type=parse_range, default=(16, 256), help="MIN:MAX")
    p.add_argument("--distribution", choices=["uniform", "longtail"], default="uniform",
                   help="output lengths: uniform over MIN:MAX, or longtail (75%% in the lowest quarter of the "
                        "range, 25%% in the highest quarter)")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--intermediate-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--quick", action="store_true",
                   help="small model (hidden 256, 4 layers, vocab 4096), 4 requests, lengths 8:64: under a minute")
    p.add_argument("--path", choices=["http", "inprocess"], default="http",
                   help="how semipd is driven: `semipd serve` over loopback HTTP, or Engine.generate in process")
    p.add_argument("--engine-threads", type=int, default=None,
                   help="torch threads per engine worker (`semipd serve --torch-threads`; default: the engine's)")
    p.add_argument("--hf-threads", type=_int_list, default=sorted({1, os.cpu_count() or 1}),
                   help="torch thread counts to run transformers with, comma-separated; the batch runs once per "
                        "count, the best is the baseline (on a busy machine OpenMP barriers make more threads "
                        "much slower), and the sequential run uses the best count")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `semipd serve` flag, repeatable (e.g. --server-arg=--max-num-batched-tokens=2048)")
    p.add_argument("--skip", action="append", default=[], choices=["semipd", "batch", "sequential"],
                   help="leave a system out (repeatable)")
    p.add_argument("--profile-summary", type=Path, metavar="RAW",
                   help="only summarise a `py-spy record --native --threads --format raw` file (see docs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    if args.engine_threads is not None and args.engine_threads < 1:
        p.error("--engine-threads must be >= 1")
    if args.profile_summary:
        profile_summary(args.profile_summary)
        return 0

    if args.quick:
        shape = ModelShape(256, 688, 4, 4, 2, 4096)
        if args.num_requests == 16:
            args.num_requests = 4
        args.prompt_len, args.output_len = (8, 64), (8, 64)
    else:
        shape = ModelShape(args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads,
                           args.num_kv_heads, args.vocab_size)
    model_dir = prepare_model(shape, args.cache_dir)
    hf_model, tokenizer = load_hf(model_dir)
    n_params = sum(t.numel() for t in hf_model.parameters())
    work = make_workload(tokenizer, args.num_requests, args.prompt_len, args.output_len, args.distribution,
                         args.seed)
    info = machine_info()
    engine_threads = args.engine_threads
    per_worker = cpu_share(engine_threads)
    print(f"model {model_dir} ({shape.name}, {n_params / 1e6:.1f}M parameters, float32, CPU)")
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['loadavg'][0]:.2f}; "
          f"torch {info['torch']}, transformers {info['transformers']}")
    print(f"threads: transformers torch.set_num_threads(n) for n in {args.hf_threads}; semipd 2 workers x {per_worker} "
          f"thread(s) while both work, decode alone the rest "
          f"({'--engine-threads' if engine_threads else 'engine default: half the cores'})")
    print(f"workload: {len(work.prompts)} requests at t=0; prompt tokens {[len(x) for x in work.prompts]} "
          f"(sum {sum(len(x) for x in work.prompts)}); output tokens ({work.distribution}) {work.output_lens} "
          f"(sum {sum(work.output_lens)}, max {max(work.output_lens)})")

    rows: list[Row] = []
    if "semipd" not in args.skip:
        if args.path == "http":
            log_path = Path(tempfile.gettempdir()) / f"semipd-bench-server-{os.getpid()}.log"
            threads = ["--torch-threads", str(engine_threads)] if engine_threads else []
            rows.append(run_semipd_http(model_dir, work, threads + args.server_arg, log_path))
        else:
            rows.append(run_semipd_inprocess(model_dir, work, engine_threads))
    batches = [] if "batch" in args.skip else [run_hf_batch(hf_model, tokenizer, work, n) for n in args.hf_threads]
    rows += batches
    best = max(batches, key=lambda r: r.tok_s) if batches else None
    if "sequential" not in args.skip:
        threads = args.hf_threads[batches.index(best)] if best else args.hf_threads[-1]
        rows.append(run_hf_sequential(hf_model, tokenizer, work, threads))

    print()
    print_table(rows)
    ours = rows[0] if rows and rows[0].system.startswith("semipd") else None
    ratio = None
    if ours and best:
        ratio = ours.tok_s / best.tok_s
        print(f"\nsemipd / best transformers batch output throughput: {ratio:.2f}x (goal >= 1.5x)")
    if ours and rows[-1].system.startswith("transformers seq"):
        print(f"greedy text identical to transformers seq: {same_text(ours, rows[-1])}/{len(work.prompts)} requests")
    for row in rows:
        if row.note:
            print(f"  {row.system}: {row.note}")
    if args.json:
        report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  "machine": info | {"loadavg_after": os.getloadavg()}, "model": asdict(shape) | {
                      "dir": str(model_dir), "parameters": n_params},
                  "threads": {"transformers": args.hf_threads, "semipd_per_worker": per_worker},
                  "baseline": best.system if best else None,
                  "workload": {"prompt_lens": [len(x) for x in work.prompts], "output_lens": work.output_lens,
                               "distribution": work.distribution, "seed": args.seed},
                  "ratio_vs_batch": ratio,
                  "rows": [r.summary() | {"requests": [asdict(q) | {"tpot": q.tpot, "text": None}
                                                       for q in r.requests]} for r in rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
