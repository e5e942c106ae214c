"""The HTTP app: OpenAI completions and chat, models, adapters, health, metrics.

Assembly only: a Gate in front (drain, API key, body cap), the error table,
and routers over two services (generation, adapters). Names resolve in the
adapter registry (adapters_store/registry.py), once per request; the engine
and its adapter pool see only digests, and engine state is touched only in
the engine thread (`AsyncEngine`).

Errors leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
(server/api/errors.py): 400 invalid parameters, 401 API key, 403 adapter path
outside the allowed roots, 404 unknown model/adapter, 409 duplicate or changed
adapter, 413 request body over --max-request-bytes (uploads:
--max-upload-bytes), 422 adapter fails validation, 429 waiting queue, grammar compiler or mix
budget full, 503 draining or unhealthy, 500 the engine failed this request
(that request only) or anything unexpected (details only in the log).

Nothing a request carries is processed on the event loop beyond parsing a
body under the cap: tokenizing, chat templates, adapter validation and file
I/O run in threads, so /health answers whatever clients send.
"""
from __future__ import annotations

from fastapi import FastAPI

from loramux.server.api.adapter_service import AdapterService
from loramux.server.api.errors import install_handlers
from loramux.server.api.gate import Gate
from loramux.server.api.generation import GenerationService
from loramux.server.api.routes_adapters import adapters_router
from loramux.server.api.routes_openai import openai_router
from loramux.server.api.routes_ops import ops_router
from loramux.server.api.routes_tokenizer import tokenizer_router
from loramux.server.api.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="loramux", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.loramux = state
    app.add_middleware(Gate, state=state)
    install_handlers(app)
    generation = GenerationService(state)
    app.include_router(openai_router(state, generation))
    app.include_router(tokenizer_router(generation))
    app.include_router(adapters_router(AdapterService(state, generation)))
    app.include_router(ops_router(state))
    return app
