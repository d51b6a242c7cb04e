"""A deliberately slow OpenAI-compatible server whose latencies are known, to check a load generator's arithmetic.

Every request waits `ttft_s` (+ `ttft_per_token_s` per prompt token) before its first token, then streams one
token every `tpot_s`, `chunk_tokens` tokens per chunk after the first. Every `slow_every`-th request (counted in
the order requests arrive, from 1) waits `slow_ttft_s` instead; every `fail_every`-th answers 500, every `drop_every`-th
loses its connection after the first token; a prompt longer
than `max_prompt_tokens` answers 400 like vLLM. With `concurrency`, at most that many requests are served at once
and the others queue (their wait is part of their TTFT), so queueing is predictable. `tokenize` adds vLLM's
`POST /tokenize`. With `api_key`, requests without that bearer token get 401.

The "tokenizer": a word of up to 4 characters is one token, longer words ceil(len/4) tokens; completions add one
BOS token, chat adds CHAT_OVERHEAD template tokens. Output tokens are the text " tok".

    python -m semipd.loadgen.testserver --port 8100 --ttft 0.2 --tpot 0.02     # stand-alone
    with SlowServer(ServerSettings(ttft_s=0.1)) as server: ...                  # in a test: server.url
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

CHAT_OVERHEAD = 5
MODEL = "slow-model"


@dataclass
class ServerSettings:
    ttft_s: float = 0.05
    tpot_s: float = 0.01
    ttft_per_token_s: float = 0.0
    chunk_tokens: int = 1
    slow_every: int = 0
    slow_ttft_s: float = 0.5
    fail_every: int = 0
    drop_every: int = 0           # every k-th request: the connection drops after the first token
    max_prompt_tokens: int = 100_000
    concurrency: int = 0
    tokenize: bool = False
    api_key: str | None = None
    usage: bool = True


def count_tokens(text: str) -> int:
    return sum(max(1, math.ceil(len(w) / 4)) for w in text.split())


def make_app(settings: ServerSettings):
    app = FastAPI()
    state = {"received": 0, "served": 0, "dropped": 0}
    app.state.counts = state
    sem = asyncio.Semaphore(settings.concurrency) if settings.concurrency else None

    def error(status: int, message: str):
        return JSONResponse({"object": "error", "error": {"message": message, "type": "invalid_request_error",
                                                          "code": status}}, status_code=status)

    def authorized(request: Request) -> bool:
        return not settings.api_key or request.headers.get("authorization") == f"Bearer {settings.api_key}"

    def prompt_tokens(body: dict, chat: bool) -> int:
        if chat:
            return CHAT_OVERHEAD + sum(count_tokens(str(m.get("content", ""))) for m in body.get("messages", []))
        return 1 + count_tokens(str(body.get("prompt", "")))

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return error(401, "bad API key")
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

    if settings.tokenize:
        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await request.json()
            n = prompt_tokens(body, "messages" in body)
            return {"count": n, "tokens": list(range(n)), "max_model_len": settings.max_prompt_tokens}

    async def generate(request: Request, chat: bool):
        if not authorized(request):
            return error(401, "bad API key")
        received = time.perf_counter()
        body = await request.json()
        state["received"] += 1
        n = state["received"]
        n_prompt = prompt_tokens(body, chat)
        if settings.fail_every and n % settings.fail_every == 0:
            return error(500, "injected failure")
        if n_prompt > settings.max_prompt_tokens:
            return error(400, f"This model's maximum context length is {settings.max_prompt_tokens} tokens; "
                              f"the prompt has {n_prompt}")
        n_out = int(body.get("max_tokens") or 16)
        ttft = (settings.slow_ttft_s if settings.slow_every and n % settings.slow_every == 0 else settings.ttft_s)
        ttft += settings.ttft_per_token_s * n_prompt
        include_usage = settings.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        begin = received
        if sem is not None:
            await sem.acquire()    # queue before the first token: the wait is part of TTFT, as in a real server
            begin = max(received, time.perf_counter())
        try:
            # the first chunk is sent at begin + ttft, so the status and headers come with it
            await asyncio.sleep(max(0.0, begin + ttft - time.perf_counter()))
        except BaseException:
            if sem is not None:
                sem.release()
            raise

        def chunk(k: int, last: bool) -> bytes:
            text = " tok" * k
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": "length" if last else None} if chat
                      else {"index": 0, "text": text, "finish_reason": "length" if last else None})
            return b"data: " + json.dumps({"object": "chat.completion.chunk" if chat else "text_completion",
                                           "model": MODEL, "choices": [choice]}).encode() + b"\n\n"

        async def events():
            try:
                start = time.perf_counter()
                if chat:
                    yield b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                      "content": ""}}]}).encode() + b"\n\n"
                yield chunk(1, n_out == 1)
                if settings.drop_every and n % settings.drop_every == 0:
                    state["dropped"] += 1
                    raise ConnectionAbortedError("dropped on purpose")   # uvicorn cuts the response off
                sent = 1
                while sent < n_out:
                    k = min(settings.chunk_tokens, n_out - sent)
                    # an absolute schedule: token i is due at start + i * tpot, whatever the loop's own lag
                    await asyncio.sleep(max(0.0, start + (sent + k - 1) * settings.tpot_s - time.perf_counter()))
                    sent += k
                    yield chunk(k, sent == n_out)
                if include_usage:
                    yield b"data: " + json.dumps({"choices": [], "usage": {
                        "prompt_tokens": n_prompt, "completion_tokens": n_out,
                        "total_tokens": n_prompt + n_out}}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                state["served"] += 1
            finally:
                if sem is not None:
                    sem.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowServer:
    """The server on a free loopback port in a background thread (its own event loop)."""

    def __init__(self, settings: ServerSettings | None = None, port: int | None = None):
        import uvicorn
        self.settings = settings or ServerSettings()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = make_app(self.settings)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def counts(self) -> dict:
        return self.app.state.counts

    def __enter__(self) -> "SlowServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the slow test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m semipd.loadgen.testserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft", type=float, default=0.05, help="seconds before the first token")
    p.add_argument("--ttft-per-token", type=float, default=0.0, help="extra seconds per prompt token")
    p.add_argument("--tpot", type=float, default=0.01, help="seconds between tokens")
    p.add_argument("--chunk-tokens", type=int, default=1)
    p.add_argument("--slow-every", type=int, default=0)
    p.add_argument("--slow-ttft", type=float, default=0.5)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--tokenize", action="store_true")
    args = p.parse_args(argv)
    import uvicorn
    settings = ServerSettings(ttft_s=args.ttft, tpot_s=args.tpot, ttft_per_token_s=args.ttft_per_token,
                              chunk_tokens=args.chunk_tokens, slow_every=args.slow_every,
                              slow_ttft_s=args.slow_ttft, fail_every=args.fail_every,
                              max_prompt_tokens=args.max_prompt_tokens, concurrency=args.concurrency,
                              tokenize=args.tokenize)
    uvicorn.run(make_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
