"""OpenAI's endpoints: models, completions and chat completions. Each generation endpoint only turns its request
into prompt token ids (and, for chat with tools, how replies are read); runtime/api/generation.py does the rest.

Completions default to max_tokens = min(16, what fits), like OpenAI; chat defaults to everything that fits in
max_model_len."""
from functools import partial

from fastapi import APIRouter, Request

from semipd.runtime.api.context import ServerContext, context
from semipd.runtime.api.generation import Generation, generate
from semipd.runtime.api.openapi import json_request
from semipd.runtime.api.prompts import check_model, encode, render_chat
from semipd.runtime.protocol import COMPLETION_DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, bad_request
from semipd.runtime.tools import ToolReply, forced_call_grammar

router = APIRouter()


def model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "semipd",
            "root": engine.model_dir, "parent": None, "max_model_len": engine.max_model_len, "permission": []}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(context(request).engine)]}


@router.get("/v1/models/{model_id:path}")      # :path, as served names may hold a slash ("org/model")
async def model_by_id(request: Request, model_id: str):
    engine = context(request).engine
    check_model(engine, model_id)
    return model_card(engine)


@router.post("/v1/completions", openapi_extra=json_request(CompletionRequest))
async def completions(request: Request):
    return await generate(request, CompletionRequest, completion)


@router.post("/v1/chat/completions", openapi_extra=json_request(ChatCompletionRequest))
async def chat_completions(request: Request):
    return await generate(request, ChatCompletionRequest, chat)


def completion(ctx: ServerContext, req: CompletionRequest) -> Generation:
    if req.echo and req.logprobs is not None:
        raise bad_request("echo: not supported together with logprobs (the prompt's logprobs are not "
                          "computed)", "echo")
    prompts = [encode(ctx.tokenizer, p, "prompt", add_special_tokens=True) if isinstance(p, str) else list(p)
               for p in req.prompt]
    echo = [p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in req.prompt] if req.echo else None
    return Generation(req, prompts, "prompt", COMPLETION_DEFAULT_MAX_TOKENS, chat=False, echo=echo)


def chat(ctx: ServerContext, req: ChatCompletionRequest) -> Generation:
    tools = req.tool_dicts() if req.calls_tools else None
    ids = encode(ctx.tokenizer, render_chat(ctx.tokenizer, req.messages, tools=tools), "messages",
                 add_special_tokens=False)
    gen = Generation(req, [ids], "messages", None, chat=True)
    if tools:
        choice = req.effective_tool_choice
        gen.replies = partial(ToolReply, tools, choice, ctx.tool_parser)
        gen.forced = forced_call_grammar(tools, choice, req.parallel_tool_calls is not False)
    return gen
