"""What the handlers share, built once per app and kept on app.state: the engine and its tokenizer, the drain,
the thread pool that takes slow work off the event loop, the tool-call parser and the admin token."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from semipd.runtime.admin_token import AdminToken
from semipd.runtime.api.bodies import json_body
from semipd.runtime.api.drain import DrainState
from semipd.runtime.api.prompts import check_model
from semipd.runtime.config import ServerConfig
from semipd.runtime.engine import Engine
from semipd.runtime.protocol import parse_request
from semipd.runtime.tools import BY_ARCHITECTURE, ToolParser, make_parser


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    max_token_id: int               # the largest id in the vocabulary
    drain: DrainState
    # Parsing, chat templates and tokenizing take time in proportion to the body (seconds for megabytes); on
    # the event loop they would freeze every stream and /health meanwhile. The tokenizer releases the GIL.
    prompt_pool: ThreadPoolExecutor
    tool_parser: ToolParser
    admin_token: AdminToken
    policy: str                     # the partition policy: static, slo or external

    @classmethod
    def create(cls, engine: Engine, server_config: ServerConfig) -> "ServerContext":
        tokenizer = engine.tokenizer
        parser = server_config.tool_call_parser
        if parser == "auto":
            parser = BY_ARCHITECTURE[engine.runner.model_config.architecture]
        return cls(engine, tokenizer, max(tokenizer.get_vocab().values()), DrainState(),
                   ThreadPoolExecutor(thread_name_prefix="semipd-prompt"), make_parser(parser),
                   AdminToken(server_config.admin_token, server_config.admin_token_file),
                   engine.config.partition_policy)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.prompt_pool, fn, *args)

    def close(self) -> None:
        self.prompt_pool.shutdown(wait=False, cancel_futures=True)


def context(request: Request) -> ServerContext:
    return request.app.state.context


async def from_body(request: Request, model, handle):
    """The JSON body parsed as `model`, the model it names checked, then handle(context, req): all off the
    event loop."""
    ctx = context(request)
    return await ctx.off_loop(_parsed, ctx, await json_body(request), model, handle)


def _parsed(ctx: ServerContext, raw: bytes, model, handle):
    req = parse_request(raw, model)
    check_model(ctx.engine, req.model)
    return handle(ctx, req)
