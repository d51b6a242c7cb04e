"""The streaming client of `semipd bench`: sends a trace of RequestSpecs to an OpenAI-compatible server, open loop.

Each request goes at its arrival time whether or not earlier ones have finished (only `max_concurrency`, when
given, holds a request back; its latencies are then measured from when it was actually sent, as `vllm bench
serve` does, and `sent_s - arrival_s` shows the lag). A request that fails (an HTTP error status, a refused or
dropped connection, a timeout, an error event in the stream) is recorded with a short reason; it never stops
the run.

Timing, per request (time.perf_counter, from just before the request is written):
- TTFT: the first SSE chunk that carries output text (a chat role-only chunk, an empty-text chunk and the usage
  chunk carry none);
- token arrivals: every chunk carrying text. The output token count is usage.completion_tokens from the usage
  chunk (stream_options.include_usage) or, without one, the number of such chunks. When n tokens came in c
  chunks (n > c: a server that coalesces), the n-1 tokens after the first are spread over the c-1 later chunks
  as evenly as integers allow, and a chunk carrying k tokens after a gap g counts as k gaps of g/k: the ITL list
  of a request always has n-1 entries summing to (last chunk - first chunk);
- e2e: the end of the stream (`data: [DONE]` or the connection closing after it).

Prompts of N tokens (when the trace has no prompt texts): built from words the server's own tokenizer counts as
one token each. The counting is done by vLLM's `POST /tokenize` when the server has it, else by asking the server
(a request with max_tokens 1 whose usage.prompt_tokens is the count): a head word is repeated 10 and 30 times to
find the fixed overhead (BOS, chat template) and that it is one token per repetition, then each candidate word once
(20 repetitions after the head). A prompt is the head word and N - overhead - 1 words drawn at random (seeded by
the request index, so requests share no prefix and a prefix cache cannot make them cheap) from those one-token
words; one check of a 40-word random prompt confirms the counts add up. If no candidate is one token, or the check
fails, the prompt's word count is scaled from the measured tokens per word instead and `prompts.method` says
"estimated". Whatever was planned, each result records the server's own usage.prompt_tokens.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import httpx

from semipd.loadgen.report import RequestResult
from semipd.loadgen.workload import RequestSpec

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
CANDIDATE_WORDS = ("the of and to in is you that it he for on are as with they at be one we can all "
                   "so up out if an do by my no go me us am or").split()
ONE_TOKEN_WORDS_WANTED = 8
HEAD_TRIES = 6                 # head words tried (two counts each) before falling back to an estimate
REASON_CHARS = 120


class BenchError(Exception):
    """A condition that stops `semipd bench` before the run (unreachable server, no model): one line for the user."""


@dataclass
class Target:
    base_url: str                          # http://host:port, without /v1
    endpoint: str = "completions"          # or "chat"
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 600.0               # per request, from sending it to the end of its stream
    ignore_eos: bool = True
    temperature: float = 0.0
    return_token_ids: bool = False         # ask for each chunk's token ids (a vLLM extension semipd serves too)

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {self.endpoint!r}")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: str | list[int], max_tokens: int) -> dict:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens, "temperature": self.temperature}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.return_token_ids:
            body["return_token_ids"] = True
        return body


def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/`, `http://host:8000/v1` -> `http://host:8000`. Raises ValueError."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r} (e.g. http://127.0.0.1:8000)")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text[:REASON_CHARS]}" if text else name


def _error_message(status: int, raw: bytes) -> str:
    """`HTTP 400: the message of the OpenAI error body` (or the start of whatever the body was), one line."""
    text = raw.decode(errors="replace").strip()
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif isinstance(body, dict) and "detail" in body:
            text = str(body["detail"])
    except (json.JSONDecodeError, ValueError):
        pass
    text = " ".join(text.split())[:REASON_CHARS]
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


async def list_models(client: httpx.AsyncClient, target: Target) -> list[str]:
    """GET /v1/models; BenchError with one clear line when the server cannot be reached or refuses."""
    url = target.base_url + "/v1/models"
    try:
        resp = await client.get(url, headers=target.headers(), timeout=min(30.0, target.timeout_s))
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach the server at {target.base_url} ({_reason(exc)})") from None
    if resp.status_code in (401, 403):
        raise BenchError(f"the server at {target.base_url} refused the API key (HTTP {resp.status_code}); "
                         "pass --api-key or set OPENAI_API_KEY")
    if resp.status_code != 200:
        raise BenchError(f"GET {url} answered {_error_message(resp.status_code, resp.content)}; "
                         "is this an OpenAI-compatible server?")
    try:
        return [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"GET {url} did not return an OpenAI model list; is this an OpenAI-compatible server?") \
            from None


# --- prompts -------------------------------------------------------------------------------------------------

class PromptFactory:
    """Prompts of a requested token count for one server (see the module doc for how they are made)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.method = "none"         # "tokenize" | "usage" (exact, additive words) | "estimated"
        self.counter = "none"        # "tokenize" | "usage"
        self.head = "the"
        self.words: list[str] = []
        self.overhead = 1            # tokens a prompt of just the head word costs, minus the head word's one
        self.tokens_per_word = 1.0
        self.head_tokens = 1.0       # what the head word costs (1 unless estimated from a multi-token word)
        self.calibration_requests = 0

    def describe(self) -> dict:
        return {"method": self.method, "counter": self.counter, "head": self.head, "words": self.words,
                "overhead_tokens": self.overhead, "tokens_per_word": self.tokens_per_word,
                "calibration_requests": self.calibration_requests}

    async def calibrate(self, client: httpx.AsyncClient, target: Target) -> None:
        count = await self._counter(client, target)
        fallback = None
        for word in CANDIDATE_WORDS[:HEAD_TRIES]:
            c10, c30 = await count(" ".join([word] * 10)), await count(" ".join([word] * 30))
            if c30 - c10 == 20:
                self.head, self.overhead = word, c10 - 10
                break
            if fallback is None and c30 > c10:
                fallback = (word, c10, c30)
        else:
            if fallback is None:
                raise BenchError("cannot calibrate prompt lengths: the server counts no tokens for repeated words")
            word, c10, c30 = fallback
            per = (c30 - c10) / 20
            self.method, self.head, self.words = "estimated", word, [word]
            self.tokens_per_word = self.head_tokens = per
            self.overhead = round(c10 - 10 * per)
            return
        self.words = [self.head]
        for word in CANDIDATE_WORDS:
            if len(self.words) >= ONE_TOKEN_WORDS_WANTED:
                break
            if word != self.head and await count(self.head + (" " + word) * 20) == self.overhead + 1 + 20:
                self.words.append(word)
        measured = await count(self._text(40, random.Random(self.seed - 1)))
        if measured == self.overhead + 1 + 40:
            self.method = self.counter
        else:
            self.method = "estimated"
            self.tokens_per_word = max(0.1, (measured - self.overhead - 1) / 40)

    async def _counter(self, client: httpx.AsyncClient, target: Target):
        async def by_tokenize(text: str) -> int:
            self.calibration_requests += 1
            body = {"model": target.model}
            if target.endpoint == "chat":
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            resp = await client.post(target.base_url + "/tokenize", json=body, headers=target.headers(),
                                     timeout=min(60.0, target.timeout_s))
            resp.raise_for_status()
            data = resp.json()
            return int(data["count"]) if "count" in data else len(data["tokens"])

        async def by_usage(text: str) -> int:
            self.calibration_requests += 1
            result = await send_one(client, target, RequestSpec(-1, 0.0, 0, 1, text), text, time.perf_counter())
            if result.error is not None or result.prompt_tokens <= 0:
                raise BenchError(f"cannot calibrate prompt lengths: a one-token request to {target.url} failed "
                                 f"({result.error or 'no usage.prompt_tokens in its usage chunk'})")
            return result.prompt_tokens

        try:
            await by_tokenize("the")
            self.counter = "tokenize"
            return by_tokenize
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.calibration_requests = 0
            self.counter = "usage"
            return by_usage

    def _text(self, words: int, rng: random.Random) -> str:
        return " ".join([self.head] + [rng.choice(self.words) for _ in range(max(0, words))])

    def prompt(self, spec: RequestSpec) -> str:
        if spec.prompt is not None:
            return spec.prompt
        rng = random.Random(self.seed * 1_000_003 + spec.index)
        if self.method == "estimated":
            words = round((spec.prompt_tokens - self.overhead - self.head_tokens) / self.tokens_per_word)
            return self._text(max(0, words), rng)
        return self._text(spec.prompt_tokens - self.overhead - 1, rng)


# --- one request -------------------------------------------------------------------------------------------

def _chunk_text(data: dict, chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choice.get("text") or ""


def spread_gaps(chunk_times: list[float], tokens: int) -> list[float]:
    """ITLs of one request: `tokens` output tokens arrived in chunks at `chunk_times` (the first chunk holds the
    first token). The tokens after the first are shared among the later chunks as evenly as integers allow
    (the later chunks get the remainder, so the last chunk always holds the last token); a chunk with k tokens
    after a gap g gives k gaps of g/k. A chunk given no token (more chunks than tokens) folds its gap into the next."""
    later = len(chunk_times) - 1
    rest = tokens - 1
    if later <= 0 or rest <= 0:
        return []
    base, extra = divmod(rest, later)
    gaps: list[float] = []
    carried_from = chunk_times[0]
    for j in range(1, len(chunk_times)):
        k = base + (1 if j > later - extra else 0)
        if k == 0:
            continue
        g = chunk_times[j] - carried_from
        gaps.extend([g / k] * k)
        carried_from = chunk_times[j]
    return gaps


async def send_one(client: httpx.AsyncClient, target: Target, spec: RequestSpec, prompt: str,
                   t0: float) -> RequestResult:
    """One streamed request, timed from now; `t0` is the run's start (for sent_s). Never raises for a failure
    of the request itself: the result's `error` says what went wrong."""
    start = time.perf_counter()
    result = RequestResult(spec.index, spec.arrival_s, start - t0, spec.prompt_tokens)
    chunk_times: list[float] = []
    token_ids: list[int] = []
    usage: dict | None = None
    done = False

    async def go():
        nonlocal usage, done
        async with client.stream("POST", target.url, json=target.body(prompt, spec.output_tokens),
                                 headers=target.headers()) as resp:
            if resp.status_code != 200:
                result.error = _error_message(resp.status_code, await resp.aread())
                return
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    data = json.loads(payload)
                except json.JSONDecodeError:
                    result.error = f"bad SSE data: {payload[:60]}"
                    return
                if not isinstance(data, dict):
                    continue
                if "error" in data:
                    result.error = "error in stream: " + _error_message(200, payload.encode()).removeprefix(
                        "HTTP 200: ")
                    return
                if data.get("usage"):
                    usage = data["usage"]
                if target.return_token_ids and data.get("choices"):
                    token_ids.extend(data["choices"][0].get("token_ids") or ())
                if _chunk_text(data, target.endpoint == "chat"):
                    chunk_times.append(now)

    try:
        await asyncio.wait_for(go(), timeout=target.timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timeout after {target.timeout_s:g} s"
    except httpx.HTTPError as exc:
        result.error = _reason(exc)
    end = time.perf_counter()
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)
    if result.error is not None:
        return result
    if not done:
        result.error = "stream ended without data: [DONE]"
        return result
    if not chunk_times:
        result.error = "no output tokens in the stream"
        return result
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else len(chunk_times)
    result.output_tokens = tokens
    result.ttft_s = chunk_times[0] - start
    result.e2e_s = end - start
    result.itl_s = spread_gaps(chunk_times, tokens)
    if target.return_token_ids:
        result.token_ids = token_ids
    return result


# --- a run ---------------------------------------------------------------------------------------------------

def make_client(max_concurrency: int | None, timeout_s: float) -> httpx.AsyncClient:
    """One connection pool for the whole run; unlimited connections unless capped (open loop needs as many as
    there are requests in flight)."""
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency or 256)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)))


async def run_trace(client: httpx.AsyncClient, target: Target, specs: list[RequestSpec], prompts: PromptFactory,
                    max_concurrency: int | None = None,
                    on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send every spec at its arrival time (open loop). Returns the results in trace order and the run's length:
    from the first send to the last completion."""
    texts = [prompts.prompt(s) for s in specs]          # made before the clock starts
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()
    ends: list[float] = []

    async def one(spec: RequestSpec, text: str) -> RequestResult:
        if sem is None:
            result = await send_one(client, target, spec, text, t0)
        else:
            async with sem:
                result = await send_one(client, target, spec, text, t0)
        ends.append(time.perf_counter())
        if on_done is not None:
            on_done(result)
        return result

    tasks = []
    for spec, text in zip(specs, texts):
        delay = t0 + spec.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(spec, text)))
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    first_sent = min((r.sent_s for r in results), default=0.0)
    duration = (max(ends) - t0 - first_sent) if ends else 0.0
    return list(results), duration


async def warm_up(client: httpx.AsyncClient, target: Target, specs: list[RequestSpec],
                  prompts: PromptFactory) -> list[RequestResult]:
    """Requests sent one after another before the measured run; their results are not reported."""
    t0 = time.perf_counter()
    out = []
    for spec in specs:
        out.append(await send_one(client, target, spec, prompts.prompt(spec), t0))
    return out


__all__ = ["BenchError", "Target", "PromptFactory", "normalize_url", "list_models", "send_one", "spread_gaps",
           "make_client", "run_trace", "warm_up", "ENDPOINTS"]
