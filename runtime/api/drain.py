"""Shutting down without dropping anyone. On SIGTERM the server keeps listening and answers 503 to new work, so
clients and load balancers get a clear answer instead of a refused connection; it exits once in-flight requests
are done or the grace period ends, which aborts the rest in the engine so each still gets a proper ending (an
error event and [DONE], or a 503)."""
import asyncio
import logging
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from semipd.runtime.protocol import APIError, error_body

log = logging.getLogger("semipd.server")

DRAINING_RETRY_AFTER_S = 1        # a draining pod's clients: retry at once, the Service sends them to another pod
SHUTDOWN_CANCEL_S = 2.0           # after the grace period, how long uvicorn waits before cancelling requests
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class DrainState:
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    engine_requests: set = field(default_factory=set)      # ids of the engine requests the handlers wait on
    cut: bool = False                                       # the grace period is over: those were aborted

    def __post_init__(self):
        self.idle.set()

    def cut_short(self, out) -> bool:
        """Aborted by the drain when the grace period ended (not by its client)."""
        return out.finished and out.finish_reason == "abort" and self.cut

    async def finish_in_flight(self, engine, grace_s: float) -> None:
        """Wait up to grace_s for the requests in flight; then abort them in the engine and wait a little more."""
        log.info("shutting down: refusing new requests, waiting up to %.0fs for %d in flight", grace_s,
                 self.in_flight)
        try:
            await asyncio.wait_for(self.idle.wait(), grace_s)
        except asyncio.TimeoutError:
            log.warning("grace period over with %d requests in flight; ending them", self.in_flight)
            # Aborted, each request's final output ends its response with an error (a stream: an error event
            # and [DONE]); only what still hangs after that is left to uvicorn's cancellation.
            self.cut = True
            for request_id in list(self.engine_requests):
                engine.abort(request_id)
            try:
                await asyncio.wait_for(self.idle.wait(), SHUTDOWN_CANCEL_S)
            except asyncio.TimeoutError:
                log.warning("%d requests still in flight; cancelling them", self.in_flight)


def shut_down_error() -> APIError:
    return APIError(503, "the server shut down before this request finished (its grace period ended)",
                    type="service_unavailable", code="shutting_down",
                    headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})


class DrainMiddleware:
    """Counts generation requests in flight and refuses new ones once shutdown has begun. Pure ASGI, so a
    streaming response counts until its last byte is sent."""

    def __init__(self, app, state: DrainState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        state = self.state
        if state.draining:
            body = error_body("the server is shutting down", "service_unavailable", code="shutting_down")
            headers = {"Retry-After": str(DRAINING_RETRY_AFTER_S)}
            return await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
        state.in_flight += 1
        state.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            if state.in_flight == 0:
                state.idle.set()
