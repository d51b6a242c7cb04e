"""The HTTP API, one module per endpoint family, each with its APIRouter:

    openai_routes.py  /v1/models, /v1/completions, /v1/chat/completions
    side.py           vLLM's /tokenize, /detokenize, /version
    ops.py            /health, /ping, /metrics
    admin.py          /admin/partition

and what they share: context.py (the engine, tokenizer, drain, thread pool, tool parser, admin token: one object
per app, on app.state), generation.py (the one request-to-engine path of both generation endpoints),
prompts.py (model check, tokenizing, chat templates), bodies.py (size limit, JSON content type), drain.py
(shutdown), openapi.py (/openapi.json). runtime/server.py wires them into the app and runs it.
"""
