"""The one path from a generation request to the engine and back, shared by /v1/completions and
/v1/chat/completions: the body parsed off the event loop, checked against the vocabulary and the context length,
its grammar compiled, n choices per prompt added to the engine (runtime/choices.py), then an SSE stream or one
JSON body. A client that goes away aborts its engine requests; so does the drain once the grace period is over,
and the client then gets a 503 or, mid-stream, an error event."""
import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from semipd.runtime.api.context import ServerContext, context, from_body
from semipd.runtime.api.drain import shut_down_error
from semipd.runtime.choices import ChoiceRenderer, Choices
from semipd.runtime.engine import EngineOverloaded
from semipd.runtime.guided import GuidedSpec
from semipd.runtime.protocol import APIError, ResponseShape, bad_request, error_body, resolve_max_tokens, sse

log = logging.getLogger("semipd.server")

RETRY_AFTER_S = 1                 # what a full queue tells clients; the queue drains within a few steps
DISCONNECT_POLL_S = 0.1           # how often a request not yet streaming checks for a vanished client
GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


@dataclass
class Generation:
    """A generation request as its endpoint parsed it: what generate() takes to the engine."""
    req: object                             # CompletionRequest or ChatCompletionRequest
    prompts: list[list[int]]
    prompt_param: str                       # the field the prompts came from, named in errors
    default_cap: int | None                 # max_tokens when the client gives none; None: all that fits
    chat: bool
    echo: list[str] | None = None           # completions with echo: each prompt's text
    replies: Callable | None = None         # tools in play: makes a choice's ToolReply
    forced: GuidedSpec | None = None        # the grammar of a forced tool call


async def generate(request: Request, model, prompts):
    """prompts(context, req) -> Generation, for a body that is a `model`; then n choices per prompt, each its
    own engine request."""
    ctx = context(request)
    gen = await from_body(request, model, prompts)
    req = gen.req
    check_vocabulary(ctx, req)
    specs = engine_requests(ctx, gen, await compile_grammar(ctx, gen))
    shape = ResponseShape(gen.chat, ctx.engine.model_name, req.include_usage, req.return_token_ids)
    log.info("request %s: %d prompt(s) of %s tokens, n %d, max_tokens %d, stream %s", shape.id, len(gen.prompts),
             "/".join(str(len(ids)) for ids in gen.prompts[:4]), req.n, specs[0][2].max_tokens, req.stream)
    # the drain knows every engine request, to abort them when the grace period ends
    choices = Choices(ctx.engine, shape.id, specs, registry=ctx.drain.engine_requests)
    render = ChoiceRenderer(gen.chat, ctx.tokenizer, gen.prompts, req.n, gen.echo)
    if req.stream:
        # Wait for the first output before sending headers: a full queue must still be able to say 503.
        first = await until_disconnect(request, choices.open())
        if first is None:
            return Response(status_code=499)
        if ctx.drain.cut_short(first[1]):
            choices.abort()
            raise shut_down_error()
        events = ToolDeltas(shape, render, gen.replies) if gen.replies else TextChunks(shape, render)
        return StreamingResponse(stream(ctx, shape, choices, render, first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await until_disconnect(request, choices.collect())
    if result is None:
        return Response(status_code=499)
    if ctx.drain.cut and any(outs[-1].finish_reason == "abort" for outs in result.values()):
        raise shut_down_error()
    return full_body(shape, render, result, gen.replies)


def check_vocabulary(ctx: ServerContext, req) -> None:
    for key in (req.logit_bias or {}):
        if key > ctx.max_token_id:
            raise bad_request(f"logit_bias: token id {key} is outside the vocabulary (largest id "
                              f"{ctx.max_token_id})", "logit_bias")
    if req.stop_token_ids and max(req.stop_token_ids) > ctx.max_token_id:
        raise bad_request(f"stop_token_ids: token id {max(req.stop_token_ids)} is outside the vocabulary "
                          f"(largest id {ctx.max_token_id})", "stop_token_ids")


async def compile_grammar(ctx: ServerContext, gen: Generation):
    """The request's compiled grammar (structured output or a forced tool call), or None."""
    spec = gen.forced or gen.req.guided_spec
    if spec is None:
        return None
    param = "tools" if gen.forced else next(name for name in GUIDED_FIELDS if getattr(gen.req, name) is not None)
    try:
        return await ctx.off_loop(ctx.engine.guided.compile, spec)     # off the loop: a big schema takes a while
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param) from None


def engine_requests(ctx: ServerContext, gen: Generation, grammar) -> list[tuple]:
    """(choice index, prompt ids, sampling params) of every choice, each checked by the engine."""
    req, param, specs = gen.req, gen.prompt_param, []
    for p, ids in enumerate(gen.prompts):
        if not ids:
            raise bad_request(f"{param}: must not be empty", param)
        if max(ids) > ctx.max_token_id:
            raise bad_request(f"{param}: token id {max(ids)} is outside the vocabulary "
                              f"(largest id {ctx.max_token_id})", param)
        max_tokens = resolve_max_tokens(req.requested_max_tokens, len(ids), ctx.engine.max_model_len,
                                        gen.default_cap, param)
        params = replace(req.sampling_params(max_tokens), guided=grammar)
        try:
            ctx.engine.validate(ids, params)
        except ValueError as e:
            raise bad_request(str(e), param) from None
        for i in range(req.n):
            # seeded choices must differ from each other, and each still repeats with the same seed
            seeded = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            specs.append((p * req.n + i, ids, seeded))
    return specs


async def until_disconnect(request: Request, coro):
    """Run coro, cancelling it (and so aborting the engine request) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    except EngineOverloaded as e:
        raise APIError(503, f"the server is overloaded: {e}", type="service_unavailable",
                       code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    finally:
        if not task.done():      # the handler itself was cancelled
            task.cancel()


def full_body(shape: ResponseShape, render: ChoiceRenderer, result: dict, replies) -> dict:
    """The JSON body of a request not streamed; a chat choice that stopped may have called tools."""
    bodies = []
    for index, outs in sorted(result.items()):
        text, finish, *rest = render.full(index, outs)
        calls = None
        if replies and finish == "stop":
            text, found = replies().whole(text)
            calls, finish = ([c.body() for c in found], "tool_calls") if found else (None, finish)
        bodies.append(shape.choice(index, text, finish, *rest, tool_calls=calls))
    return shape.full(bodies, render.usage(result))


async def stream(ctx: ServerContext, shape: ResponseShape, choices: Choices, render: ChoiceRenderer, first,
                 events):
    """The SSE stream: events for each output, the usage chunk if asked for, an error event if generating fails
    or the drain cuts it short, and [DONE] however it ends; unfinished engine requests are aborted."""
    try:
        async for index, out in choices.follow(first):
            if ctx.drain.cut_short(out):
                for body in events.cut(index, out):
                    yield sse(body)
                yield sse(shut_down_error().body())
                break
            for body in events.output(index, out):
                yield sse(body)
        else:
            if shape.include_usage:
                yield sse(shape.usage_chunk(render.usage(choices.last)))
    except Exception:
        log.exception("request %s failed while streaming", shape.id)
        yield sse(error_body("internal error while generating", "server_error"))
    finally:
        choices.abort()
    yield sse("[DONE]")


class TextChunks:
    """Completions, and chat without tools: each output's text as a chunk. Text-less outputs (a token held back
    as a possible stop-string prefix or an incomplete character) are folded into the next chunk, so every chunk
    a client sees carries at least one token."""

    def __init__(self, shape: ResponseShape, render: ChoiceRenderer):
        self.shape, self.render = shape, render
        self.held: dict[int, list] = {}

    def output(self, index: int, out):
        self.held.setdefault(index, []).append(out)
        if out.text or out.finished:
            yield self.shape.chunk(index, *self.render.chunk(index, self.held.pop(index)))

    def cut(self, index: int, out):
        """What the choice still holds, before the stream ends with the drain's error."""
        self.held.setdefault(index, []).append(out)
        text, _, token_ids, logprobs = self.render.chunk(index, self.held.pop(index))
        if text:
            yield self.shape.chunk(index, text, None, token_ids, logprobs)


class ToolDeltas:
    """A chat whose choices may call tools: content deltas until a call starts, then the calls."""

    def __init__(self, shape: ResponseShape, render: ChoiceRenderer, replies):
        self.shape, self.render, self.replies = shape, render, replies
        self.per_choice: dict = {}          # choice index -> its ToolReply

    def output(self, index: int, out):
        reply = self.per_choice.setdefault(index, self.replies())
        text, finish, token_ids, logprobs = self.render.chunk(index, [out])
        for delta in reply.feed(text):
            yield self.shape.chat_delta(index, delta, None, token_ids, logprobs)
            token_ids, logprobs = (), None
        if out.finished:
            deltas, called = reply.finish() if finish == "stop" else ([], False)
            if not deltas:
                deltas = [{}]
            for delta in deltas[:-1]:
                yield self.shape.chat_delta(index, delta, None)
            yield self.shape.chat_delta(index, deltas[-1], "tool_calls" if called else finish)

    def cut(self, index: int, out):
        return ()
