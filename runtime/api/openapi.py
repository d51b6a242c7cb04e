"""The OpenAPI document (/openapi.json), with what FastAPI cannot infer: handlers read their JSON themselves
(strict validation, OpenAI error bodies), so the body models are named here, with the errors each route answers
and the bodies of responses the handlers build themselves."""
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from semipd.runtime.api.drain import GENERATION_PATHS
from semipd.runtime.protocol import ChatCompletionRequest, CompletionRequest
from semipd.runtime.tokenize_api import DetokenizeRequest, TokenizeRequest

REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
ERROR_STATUSES = {"400": "invalid request", "404": "unknown model", "413": "body too large",
                  "415": "not application/json", "503": "overloaded or shutting down"}
ADMIN_ERRORS = {"400": "invalid split", "401": "missing or wrong token", "403": "admin API disabled",
                "409": "the split has another owner (static or slo policy)", "415": "not application/json"}


def json_request(model) -> dict:
    """openapi_extra for a route whose JSON body is `model`, and the errors such a route answers."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {"requestBody": {"required": True, "content": content}, "responses": _error_responses(ERROR_STATUSES)}


def openapi_document(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible API of semipd, with vLLM's side endpoints")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        nullable_string = {"anyOf": [{"type": "string"}, {"type": "null"}]}
        schemas["ErrorResponse"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": nullable_string, "code": nullable_string}}}}
        _document_bodies(doc["paths"])
        app.openapi_schema = doc
    return app.openapi_schema


def _error_responses(statuses: dict[str, str]) -> dict:
    return {status: {"description": why, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}} for status, why in statuses.items()}


def _document_bodies(paths: dict) -> None:
    """What FastAPI cannot infer from handlers that build their own responses: probes answer with no body,
    /metrics with Prometheus' text format, the generation routes with JSON or, when streamed, an SSE stream
    (each event a `data:` line), the admin API and a model lookup with their errors."""
    for path in ("/health", "/ping"):
        for operation in paths.get(path, {}).values():
            operation["responses"]["200"] = {"description": "serving (503 with no body while draining)"}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"] = {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path in GENERATION_PATHS:
        ok = paths.get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is not None:
            ok.setdefault("content", {})["text/event-stream"] = {"schema": {
                "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
    for operation in paths.get("/admin/partition", {}).values():
        operation["responses"].update(_error_responses(ADMIN_ERRORS))
    for operation in paths.get("/v1/models/{model_id}", {}).values():
        operation["responses"].update(_error_responses({"404": "unknown model"}))
