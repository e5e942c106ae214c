"""The HTTP app: OpenAI completions and chat, models, files, fine-tuning jobs, adapters, health, metrics.

Assembly only: a Gate in front (drain, API key, body cap), the error table,
and routers over two services (generation, adapters). Names resolve in the
adapter registry (adapters_store/registry.py), once per request; the engine
and its adapter pool see only digests, and engine state is touched only in
the engine thread (`AsyncEngine`).

Errors leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
(server/api/errors.py): 400 invalid parameters or training file, 401 API key,
403 adapter path outside the allowed roots, 404 unknown model/adapter/file, 409
duplicate or changed adapter, 413 request body over --max-request-bytes (adapter
uploads: --max-upload-bytes; files: --max-file-bytes), 422 adapter fails
validation, 429 waiting queue, grammar compiler or mix budget full, 503
draining or unhealthy, 500 the engine failed this request (that request only)
or anything unexpected (details only in the log).

Nothing a request carries is processed on the event loop beyond parsing a
body under the cap: tokenizing, chat templates, adapter validation and file
I/O run in threads, so /health answers whatever clients send.
"""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fastapi import FastAPI

from loramux.server.api.adapter_service import AdapterService
from loramux.server.api.errors import install_handlers
from loramux.server.api.fine_tuning_service import FineTuningService
from loramux.server.api.gate import Gate
from loramux.server.api.generation import GenerationService
from loramux.server.api.routes_adapters import adapters_router
from loramux.server.api.routes_files import files_router
from loramux.server.api.routes_fine_tuning import fine_tuning_router
from loramux.server.api.routes_openai import openai_router
from loramux.server.api.routes_ops import ops_router
from loramux.server.api.routes_tokenizer import tokenizer_router
from loramux.server.api.state import ServerState
from loramux.server.compute_threads import helper_executor


def create_app(state: ServerState) -> FastAPI:
    generation = GenerationService(state)
    adapters = AdapterService(state, generation)
    fine_tuning = None
    if state.jobs is not None:
        settings = state.settings
        fine_tuning = FineTuningService(state.jobs, state.files, adapters, settings.served_model_name,
                                        Path(settings.model_root), settings.fine_tuning_threads,
                                        settings.max_fine_tuning_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # blocking work (asyncio.to_thread: adapter validation, merges) runs torch on one thread
        # per helper, so that no thread but the engine's keeps an OpenMP team
        asyncio.get_running_loop().set_default_executor(helper_executor())
        # fine-tuning's runners live on the server's event loop, from startup to shutdown
        if fine_tuning is not None:
            await fine_tuning.start()
        try:
            yield
        finally:
            if fine_tuning is not None:
                await fine_tuning.close()

    app = FastAPI(title="loramux", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.loramux = state
    app.add_middleware(Gate, state=state)
    install_handlers(app)
    app.include_router(openai_router(state, generation))
    app.include_router(tokenizer_router(generation))
    app.include_router(adapters_router(adapters))
    app.include_router(files_router(state.files))
    if fine_tuning is not None:
        app.include_router(fine_tuning_router(fine_tuning))
    app.include_router(ops_router(state))
    return app
