"""The HTTP server: build_app wires the endpoint families of runtime/api/ (OpenAI's, vLLM's side endpoints,
operations, admin) with the middleware and error handlers into one FastAPI app; serve runs it under uvicorn
with the drain (runtime/api/drain.py) on SIGTERM."""
import asyncio
import importlib.metadata
import logging
import signal
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from semipd.runtime.api import admin, openai_routes, ops, side
from semipd.runtime.api.bodies import BodyLimitMiddleware
from semipd.runtime.api.context import ServerContext
from semipd.runtime.api.drain import SHUTDOWN_CANCEL_S, DrainMiddleware, DrainState
from semipd.runtime.api.openapi import openapi_document
from semipd.runtime.config import EngineConfig, ServerConfig
from semipd.runtime.engine import Engine
from semipd.runtime.fetch import resolve_model
from semipd.runtime.loader import ModelLoadError
from semipd.runtime.protocol import APIError, error_body

__all__ = ["build_app", "serve", "DrainState", "DrainMiddleware", "BodyLimitMiddleware", "package_version"]

log = logging.getLogger("semipd.server")


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
    ctx = ServerContext.create(engine, server_config)
    app.state.context = ctx
    app.add_middleware(DrainMiddleware, state=ctx.drain)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_body_bytes)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    for family in (openai_routes, side, ops, admin):
        app.include_router(family.router)
    return app


async def api_error(_, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(_, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(e.detail), kind, code=str(e.status_code)), status_code=e.status_code)


async def unexpected_error(_, e: Exception):
    log.exception("unexpected error")
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it would stop listening at once and re-raise SIGTERM after
    shutdown (exit status -15); the drain does both jobs the way a Kubernetes pod needs."""

    @contextmanager
    def capture_signals(self):
        yield


async def _serve_async(engine: Engine, server_config: ServerConfig) -> None:
    app = build_app(engine, server_config)
    ctx: ServerContext = app.state.context
    drain = ctx.drain
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
        ctx.close()
    if not server.started:
        raise OSError(f"could not listen on {server_config.host}:{server_config.port}")


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    logging.basicConfig(level=server_config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(resolve_model(engine_config))
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
