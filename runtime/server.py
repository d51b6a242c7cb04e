"""The HTTP front end: OpenAI completions/chat (SSE streaming), models, vLLM's side endpoints (/tokenize,
/detokenize, /version, /ping), /openapi.json, health, metrics, and the admin API.

Choices worth knowing (also in docs): completions default to max_tokens = min(16, what fits), like OpenAI;
chat defaults to everything that fits in max_model_len. GET /admin/partition needs the token like PUT (the
operator has it anyway, and the split plus the allowed values say more about the deployment than /metrics).
PUT /admin/partition obeys only under --partition-policy external; static and slo answer 409, since the split
then has another owner (nobody, or the in-engine policy). The token file is followed (runtime/admin_token.py).
On SIGTERM the server keeps listening and answers 503 to new work, so clients and load balancers get a clear
answer instead of a refused connection; it exits once in-flight requests are done or the grace period ends,
which aborts the rest in the engine so each still gets a proper ending (an error event and [DONE], or a 503).
"""
import asyncio
import hmac
import importlib.metadata
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from semipd.runtime.admin_token import AdminToken
from semipd.runtime.api.bodies import BodyLimitMiddleware, json_body
from semipd.runtime.api.drain import SHUTDOWN_CANCEL_S, DrainMiddleware, DrainState, shut_down_error
from semipd.runtime.api.openapi import json_request, openapi_document
from semipd.runtime.config import EngineConfig, ServerConfig
from semipd.runtime.engine import Engine, EngineOverloaded
from semipd.runtime.loader import ModelLoadError
from semipd.runtime.partition import PartitionError
from semipd.runtime.choices import ChoiceRenderer, Choices
from semipd.runtime.tools import BY_ARCHITECTURE, ToolReply, forced_call_grammar, make_parser
from semipd.runtime.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS, APIError, ChatCompletionRequest, CompletionRequest, ResponseShape,
    bad_request, error_body, parse_request, resolve_max_tokens, sse,
)
from semipd.runtime.tokenize_api import DetokenizeRequest, TokenizeRequest

log = logging.getLogger("semipd.server")

RETRY_AFTER_S = 1                 # what a full queue tells clients; the queue drains within a few steps
DISCONNECT_POLL_S = 0.1           # how often a request not yet streaming checks for a vanished client
POLICY_OWNS_SPLIT = {      # why a PUT cannot move the split, and how to make it possible
    "static": "the partition policy is static: the split stays at its start-up value; start the server with "
              "--partition-policy external to set it through this API (or change --sm-split and restart)",
    "slo": "the split is owned by the in-engine SLO policy (--partition-policy slo); start the server with "
           "--partition-policy external to set it through this API",
}


def package_version() -> str:
    try:
        return importlib.metadata.version("semipd")
    except importlib.metadata.PackageNotFoundError:      # run from a source tree that is not installed
        return "0+unknown"


def build_app(engine: Engine, server_config: ServerConfig) -> FastAPI:
    # /openapi.json, but no /docs: the Swagger page would load its script from a CDN
    app = FastAPI(title="semipd", version=package_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = lambda: openapi_document(app)
    drain = DrainState()
    app.state.drain = drain
    app.add_middleware(DrainMiddleware, state=drain)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_body_bytes)
    # Parsing, chat templates and tokenizing take time in proportion to the body (seconds for megabytes); on
    # the event loop they would freeze every stream and /health meanwhile. The tokenizer releases the GIL.
    prompt_pool = ThreadPoolExecutor(thread_name_prefix="semipd-prompt")
    app.state.prompt_pool = prompt_pool
    tokenizer = engine.tokenizer
    max_token_id = max(tokenizer.get_vocab().values())
    admin_token = AdminToken(server_config.admin_token, server_config.admin_token_file)
    tool_parser = make_parser(server_config.tool_call_parser if server_config.tool_call_parser != "auto"
                              else BY_ARCHITECTURE[engine.runner.model_config.architecture])
    policy = engine.config.partition_policy

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind, code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    # --- OpenAI surface -------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "semipd",
                "root": engine.model_dir, "parent": None, "max_model_len": engine.max_model_len,
                "permission": []}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")      # :path, as served names may hold a slash ("org/model")
    async def model_by_id(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", openapi_extra=json_request(CompletionRequest))
    async def completions(request: Request):
        req, prompts, echo = await off_loop(completion_prompt, await json_body(request))
        return await generate(request, req, prompts, "prompt", COMPLETION_DEFAULT_MAX_TOKENS, chat=False,
                              echo=echo)

    @app.post("/v1/chat/completions", openapi_extra=json_request(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req, ids, tools = await off_loop(chat_prompt, await json_body(request))
        replies = forced = None
        if tools:
            choice = req.effective_tool_choice
            replies = lambda: ToolReply(tools, choice, tool_parser)   # noqa: E731
            forced = forced_call_grammar(tools, choice, req.parallel_tool_calls is not False)
        return await generate(request, req, [ids], "messages", None, chat=True, replies=replies, forced=forced)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(prompt_pool, fn, *args)

    def completion_prompt(raw: bytes) -> tuple[CompletionRequest, list[list[int]], list[str] | None]:
        req = parse_request(raw, CompletionRequest)
        check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise bad_request("echo: not supported together with logprobs (the prompt's logprobs are not "
                              "computed)", "echo")
        prompts = [encode(p, "prompt", add_special_tokens=True) if isinstance(p, str) else list(p)
                   for p in req.prompt]
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompt] if req.echo else None
        return req, prompts, echo

    def chat_prompt(raw: bytes) -> tuple[ChatCompletionRequest, list[int], list[dict] | None]:
        req = parse_request(raw, ChatCompletionRequest)
        check_model(req.model)
        tools = req.tool_dicts() if req.calls_tools else None
        return req, encode(render_chat(req.messages, tools=tools), "messages", add_special_tokens=False), tools

    def render_chat(messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                    tools: list[dict] | None = None) -> str:
        if not tokenizer.chat_template:
            raise bad_request("messages: this model has no chat template; use /v1/completions", "messages")
        try:
            return tokenizer.apply_chat_template([m.for_template() for m in messages], tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message)
        except Exception as e:      # the template itself may reject a conversation (e.g. role order)
            raise bad_request(f"messages: the chat template rejected them: {e}", "messages") from None

    # --- vLLM's side endpoints ------------------------------------------------------------------------------
    @app.post("/tokenize", openapi_extra=json_request(TokenizeRequest))
    async def tokenize(request: Request):
        return await off_loop(tokenize_body, await json_body(request))

    def tokenize_body(raw: bytes) -> dict:
        req = parse_request(raw, TokenizeRequest)
        check_model(req.model)
        if req.prompt is not None:
            ids = encode(req.prompt, "prompt", add_special_tokens=req.special_tokens)
        else:
            text = render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
            ids = encode(text, "messages", add_special_tokens=req.special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", openapi_extra=json_request(DetokenizeRequest))
    async def detokenize(request: Request):
        return await off_loop(detokenize_body, await json_body(request))

    def detokenize_body(raw: bytes) -> dict:
        req = parse_request(raw, DetokenizeRequest)
        check_model(req.model)
        outside = [t for t in req.tokens if not 0 <= t <= max_token_id]
        if outside:
            raise bad_request(f"tokens: token id {outside[0]} is outside the vocabulary (ids 0 to {max_token_id})",
                              "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/version")
    async def version():
        return {"version": app.version}

    def encode(text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        except (TypeError, ValueError, UnicodeError):       # the tokenizer's own words would mean nothing here
            raise bad_request(f"{param}: the text cannot be tokenized", param) from None

    def check_model(name: str | None):
        if name is not None and name != engine.model_name:
            raise APIError(404, f"model: the model '{name}' does not exist; this server serves "
                                f"'{engine.model_name}'", type="not_found_error", param="model",
                           code="model_not_found")

    async def generate(request: Request, req, prompts: list[list[int]], prompt_param: str, default_cap,
                       chat: bool, echo: list[str] | None = None, replies=None, forced=None):
        """Every request's path to the engine: n choices per prompt, each its own engine request. `replies`
        makes each chat choice's ToolReply (tools in play); `forced`: the grammar of a forced tool call."""
        for key in (req.logit_bias or {}):
            if key > max_token_id:
                raise bad_request(f"logit_bias: token id {key} is outside the vocabulary (largest id "
                                  f"{max_token_id})", "logit_bias")
        if req.stop_token_ids and max(req.stop_token_ids) > max_token_id:
            raise bad_request(f"stop_token_ids: token id {max(req.stop_token_ids)} is outside the vocabulary "
                              f"(largest id {max_token_id})", "stop_token_ids")
        grammar, spec = None, forced or req.guided_spec
        if spec is not None:                    # compiled off the event loop: a big schema takes a while
            param = "tools" if forced else next(
                name for name in ("response_format", "guided_json", "guided_regex", "guided_choice",
                                  "guided_grammar") if getattr(req, name) is not None)
            try:
                grammar = await off_loop(engine.guided.compile, spec)
            except ValueError as e:
                raise bad_request(f"{param}: {e}", param) from None
        specs = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise bad_request(f"{prompt_param}: must not be empty", prompt_param)
            if max(ids) > max_token_id:
                raise bad_request(f"{prompt_param}: token id {max(ids)} is outside the vocabulary "
                                  f"(largest id {max_token_id})", prompt_param)
            max_tokens = resolve_max_tokens(req.requested_max_tokens, len(ids), engine.max_model_len, default_cap,
                                            prompt_param)
            params = replace(req.sampling_params(max_tokens), guided=grammar)
            try:
                engine.validate(ids, params)
            except ValueError as e:
                raise bad_request(str(e), prompt_param) from None
            for i in range(req.n):
                # seeded choices must differ from each other, and each still repeats with the same seed
                seeded = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
                specs.append((p * req.n + i, ids, seeded))

        shape = ResponseShape(chat, engine.model_name, req.include_usage, req.return_token_ids)
        log.info("request %s: %d prompt(s) of %s tokens, n %d, max_tokens %d, stream %s", shape.id, len(prompts),
                 "/".join(str(len(ids)) for ids in prompts[:4]), req.n, specs[0][2].max_tokens, req.stream)
        # the drain knows every engine request, to abort them when the grace period ends
        choices = Choices(engine, shape.id, specs, registry=drain.engine_requests)
        render = ChoiceRenderer(chat, tokenizer, prompts, req.n, echo)
        if req.stream:
            # Wait for the first output before sending headers: a full queue must still be able to say 503.
            first = await until_disconnect(request, choices.open())
            if first is None:
                return Response(status_code=499)
            if drain.cut_short(first[1]):
                choices.abort()
                raise shut_down_error()
            body = stream_tools(shape, choices, render, first, replies) if replies else \
                stream(shape, choices, render, first)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await until_disconnect(request, choices.collect())
        if result is None:
            return Response(status_code=499)
        if drain.cut and any(outs[-1].finish_reason == "abort" for outs in result.values()):
            raise shut_down_error()
        bodies = []
        for index, outs in sorted(result.items()):
            text, finish, *rest = render.full(index, outs)
            calls = None
            if replies and finish == "stop":
                text, found = replies().whole(text)
                calls, finish = ([c.body() for c in found], "tool_calls") if found else (None, finish)
            bodies.append(shape.choice(index, text, finish, *rest, tool_calls=calls))
        return shape.full(bodies, render.usage(result))

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

    async def stream(shape: ResponseShape, choices: "Choices", render: "ChoiceRenderer", first):
        # Text-less outputs (a token held back as a possible stop-string prefix or an incomplete character)
        # are folded into the next chunk, so every chunk a client sees carries at least one token.
        held: dict[int, list] = {}
        try:
            async for index, out in choices.follow(first):
                held.setdefault(index, []).append(out)
                if drain.cut_short(out):
                    text, _, token_ids, logprobs = render.chunk(index, held.pop(index))
                    if text:
                        yield sse(shape.chunk(index, text, None, token_ids, logprobs))
                    yield sse(shut_down_error().body())
                    break
                if out.text or out.finished:
                    yield sse(shape.chunk(index, *render.chunk(index, held.pop(index))))
            else:
                if shape.include_usage:
                    yield sse(shape.usage_chunk(render.usage(choices.last)))
        except Exception:
            log.exception("request %s failed while streaming", shape.id)
            yield sse(error_body("internal error while generating", "server_error"))
        finally:
            choices.abort()
        yield sse("[DONE]")

    async def stream_tools(shape: ResponseShape, choices: "Choices", render: "ChoiceRenderer", first, replies):
        """A chat stream whose choices may call tools: content deltas until a call starts, then the calls."""
        per_choice: dict[int, ToolReply] = {}
        try:
            async for index, out in choices.follow(first):
                if drain.cut_short(out):
                    yield sse(shut_down_error().body())
                    break
                reply = per_choice.setdefault(index, replies())
                text, finish, token_ids, logprobs = render.chunk(index, [out])
                for delta in reply.feed(text):
                    yield sse(shape.chat_delta(index, delta, None, token_ids, logprobs))
                    token_ids, logprobs = (), None
                if out.finished:
                    deltas, called = reply.finish() if finish == "stop" else ([], False)
                    if not deltas:
                        deltas = [{}]
                    for delta in deltas[:-1]:
                        yield sse(shape.chat_delta(index, delta, None))
                    yield sse(shape.chat_delta(index, deltas[-1], "tool_calls" if called else finish))
            else:
                if shape.include_usage:
                    yield sse(shape.usage_chunk(render.usage(choices.last)))
        except Exception:
            log.exception("request %s failed while streaming", shape.id)
            yield sse(error_body("internal error while generating", "server_error"))
        finally:
            choices.abort()
        yield sse("[DONE]")

    # --- operations -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        # a dead worker thread means no request can finish: let the orchestrator restart the pod
        if drain.draining or getattr(engine, "worker_error", None) is not None:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/ping", operation_id="ping_get")      # vLLM's name for /health, which SageMaker probes
    @app.post("/ping", operation_id="ping_post")
    async def ping():
        return await health()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def authorize(request: Request):
        token = admin_token.current()
        if not token:
            raise APIError(403, "the admin API is disabled; start the server with --admin-token-file PATH or "
                                "SEMIPD_ADMIN_TOKEN to enable it", type="permission_error", code="admin_disabled")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "missing bearer token (Authorization: Bearer <admin token>)",
                           type="authentication_error", code="missing_token",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(403, "wrong admin token", type="permission_error", code="invalid_token")

    def partition_state() -> dict:
        state = {**engine.partition.get(), "policy": policy}
        if engine.slo_loop is not None:
            state["decision"] = engine.slo_loop.last   # the in-engine policy's latest decision and its reason
        return state

    @app.get("/admin/partition")
    async def get_partition(request: Request):
        authorize(request)
        return partition_state()

    @app.put("/admin/partition")
    async def put_partition(request: Request):
        authorize(request)
        if policy != "external":
            raise APIError(409, POLICY_OWNS_SPLIT[policy], type="conflict_error", code=f"partition_policy_{policy}")
        value = parse_partition(await json_body(request))
        try:
            result = engine.partition.set(value, source="admin-api")
        except PartitionError as e:
            raise APIError(422, str(e), param="prefill", code="impossible_partition",
                           extra={"allowed_prefill_sms": list(e.allowed)}) from None
        except ValueError as e:
            raise bad_request(f"prefill: {e}", "prefill") from None
        log.info("partition set by admin API: %s", {k: result.get(k) for k in ("prefill_sms", "decode_sms")})
        return {**result, "policy": policy}

    return app


def parse_partition(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict) or set(data) != {"prefill"}:
        raise bad_request('body must be {"prefill": <SMs as an integer, or a fraction in (0, 1)>}', "prefill")
    value = data["prefill"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request("prefill: must be a number (SMs, or a fraction in (0, 1))", "prefill")
    return {"prefill": value}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it would stop listening at once and re-raise SIGTERM after
    shutdown (exit status -15); the drain below does both jobs the way a Kubernetes pod needs."""

    @contextmanager
    def capture_signals(self):
        yield


async def _serve_async(engine: Engine, server_config: ServerConfig) -> None:
    app = build_app(engine, server_config)
    drain: DrainState = app.state.drain
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, lifespan="off",
                            log_level=server_config.log_level, timeout_graceful_shutdown=SHUTDOWN_CANCEL_S)
    server = _Server(config)
    loop = asyncio.get_running_loop()

    async def drain_then_exit():
        await drain.finish_in_flight(engine, server_config.graceful_timeout)
        server.should_exit = True

    def on_signal(sig: signal.Signals):
        if drain.draining:       # a second signal: stop now
            log.warning("%s again: exiting without waiting", sig.name)
            server.should_exit = True
            server.force_exit = True
            return
        drain.draining = True
        loop.create_task(drain_then_exit())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.serve()
    finally:
        app.state.prompt_pool.shutdown(wait=False, cancel_futures=True)
    if not server.started:
        raise OSError(f"could not listen on {server_config.host}:{server_config.port}")


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    logging.basicConfig(level=server_config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(engine_config)
    except (ModelLoadError, ValueError, OSError) as e:      # a model or flag we cannot serve: say why, in one line
        log.error("cannot start: %s", e)
        return 1
    engine.start()
    try:
        asyncio.run(_serve_async(engine, server_config))
    except (OSError, SystemExit) as e:      # uvicorn exits (1) when it cannot bind
        log.error("server failed: %s", e)
        return 1
    finally:
        engine.shutdown()
    log.info("shut down cleanly")
    return 0
