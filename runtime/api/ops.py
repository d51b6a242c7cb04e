"""Operations: the probes (/health, and /ping, vLLM's name for it) and Prometheus' /metrics."""
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from semipd.runtime.api.context import context

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    ctx = context(request)
    # a dead worker thread means no request can finish: let the orchestrator restart the pod
    if ctx.drain.draining or getattr(ctx.engine, "worker_error", None) is not None:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/ping", operation_id="ping_get")      # vLLM's name for /health, which SageMaker probes
@router.post("/ping", operation_id="ping_post")
async def ping(request: Request):
    return await health(request)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(context(request).engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
