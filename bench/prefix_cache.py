"""TTFT and output throughput on a multi-turn chat workload with the prefix cache on and off, side by side.

The workload: C conversations at once, each T turns. Every conversation starts with the same system prompt
(S tokens); turn k sends the whole history (system prompt, every earlier user message and the model's own
replies, as token ids so the history is exactly what was computed) plus a new user message of U tokens, and waits
for the streamed reply (R tokens, ignore_eos) before its next turn. That is what a chat front-end sends, and
what prefix caching exists for: from the second turn on, all but the newest user message was computed before.

Both servers are `semipd serve` on CPU with bench_engine's ~100M random Llama (or --quick's small one), started
one after the other, never at the same time; the only difference is --no-enable-prefix-caching. Per turn:
TTFT (send to first token) and the cached tokens the server reports (usage.prompt_tokens_details); per run: output
tok/s over the wall time, and vllm:prefix_cache_hits_total / queries_total from /metrics.

    python bench/prefix_cache.py                       # 8 conversations x 4 turns (a few minutes on 2 cores)
    python bench/prefix_cache.py --quick               # small model, 4 x 3 (under a minute)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_engine  # noqa: E402


async def turn(client, url: str, prompt: list[int], reply_len: int) -> dict:
    body = {"prompt": prompt, "max_tokens": reply_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, ids, usage = None, [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                ttft = ttft if ttft is not None else time.perf_counter() - sent
                ids += chunk["choices"][0]["token_ids"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": ttft, "reply": ids, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "output_tokens": len(ids)}


async def conversation(client, url: str, system: list[int], users: list[list[int]], reply_len: int) -> list[dict]:
    history, turns = list(system), []
    for k, user in enumerate(users):
        history += user
        result = await turn(client, url, history, reply_len)
        result["turn"] = k
        history += result["reply"]
        turns.append(result)
    return turns


async def drive(url: str, work: dict) -> tuple[list[dict], float]:
    import httpx
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as client:
        await turn(client, url, work["system"][:8], 2)          # warm-up (its 8 tokens cache no full block)
        t0 = time.perf_counter()
        convs = await asyncio.gather(*(conversation(client, url, work["system"], users, work["reply_len"])
                                       for users in work["users"]))
        return [t for conv in convs for t in conv], time.perf_counter() - t0


def make_work(vocab: int, conversations: int, turns: int, system_len: int, user_len: int, reply_len: int,
              seed: int) -> dict:
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(10, vocab) for _ in range(n)]   # noqa: E731
    return {"system": ids(system_len), "users": [[ids(user_len) for _ in range(turns)] for _ in range(conversations)],
            "reply_len": reply_len}


def metric(url: str, name: str) -> float:
    import httpx
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def run(model_dir: Path, work: dict, cache: bool, log_dir: Path) -> dict:
    n = len(work["users"])
    extra = ["--max-num-batched-tokens", "512"]       # max_model_len: the model's (2048)
    extra += [] if cache else ["--no-enable-prefix-caching"]
    proc, url, cmd = bench_engine.start_server(model_dir, n, extra, log_dir / f"server-cache-{cache}.log")
    try:
        turns, wall = asyncio.run(drive(url, work))
        hits, queries = metric(url, "vllm:prefix_cache_hits_total"), metric(url, "vllm:prefix_cache_queries_total")
    finally:
        bench_engine.stop_server(proc)
    later = [t for t in turns if t["turn"] > 0]
    return {"prefix_cache": cache, "command": " ".join(cmd[2:]), "wall_s": wall,
            "output_tok_s": sum(t["output_tokens"] for t in turns) / wall,
            "ttft_mean_s": statistics.fmean(t["ttft"] for t in turns),
            "ttft_first_turn_mean_s": statistics.fmean(t["ttft"] for t in turns if t["turn"] == 0),
            "ttft_later_turns_mean_s": statistics.fmean(t["ttft"] for t in later) if later else None,
            "ttft_p90_s": sorted(t["ttft"] for t in turns)[int(0.9 * (len(turns) - 1))],
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
            "cached_tokens": sum(t["cached_tokens"] for t in turns),
            "metrics_hit_rate": hits / queries if queries else 0.0, "turns": turns}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, 4 conversations x 3 turns")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=768, help="tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=64, help="tokens of each user message")
    p.add_argument("--reply-len", type=int, default=32, help="tokens of each reply")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON here")
    args = p.parse_args(argv)
    shape = bench_engine.ModelShape()
    if args.quick:
        shape = bench_engine.ModelShape(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                                        num_kv_heads=2, vocab_size=2048)
        args.conversations, args.turns = 4, 3
    model_dir = bench_engine.prepare_model(shape, bench_engine.DEFAULT_CACHE)
    work = make_work(shape.vocab_size, args.conversations, args.turns, args.system_len, args.user_len,
                     args.reply_len, args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="semipd-prefix-cache-"))
    rows = [run(model_dir, work, cache, log_dir) for cache in (True, False)]
    print(f"model {shape.name}; {args.conversations} conversations x {args.turns} turns; system {args.system_len}, "
          f"user {args.user_len}, reply {args.reply_len} tokens")
    print(f"{'prefix cache':<13} {'out tok/s':>9} {'TTFT mean':>10} {'turn 1':>8} {'turns 2+':>9} {'p90':>8} "
          f"{'cached/prompt':>14}")
    for r in rows:
        later = r["ttft_later_turns_mean_s"]
        print(f"{'on' if r['prefix_cache'] else 'off':<13} {r['output_tok_s']:>9.1f} {r['ttft_mean_s'] * 1e3:>8.0f}ms "
              f"{r['ttft_first_turn_mean_s'] * 1e3:>6.0f}ms {(later or 0) * 1e3:>7.0f}ms {r['ttft_p90_s'] * 1e3:>6.0f}ms "
              f"{r['cached_tokens']:>6}/{r['prompt_tokens']:<7}")
    same = sum(a["reply"] == b["reply"] for a, b in zip(rows[0]["turns"], rows[1]["turns"]))
    print(f"replies equal with the cache on and off (greedy): {same} of {len(rows[0]['turns'])} turns")
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": bench_engine.machine_info(), "args": vars(args),
                                                 "model": shape.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
