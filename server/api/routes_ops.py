"""Operations: /health (engine progress, draining) and /metrics (Prometheus)."""
from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from loramux.server.api.errors import error_response
from loramux.server.api.state import ServerState


def ops_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        if state.draining:
            return error_response(503, "the server is shutting down", code="draining")
        silent = time.monotonic() - state.engine.last_progress
        if silent > state.settings.health_timeout_s:
            return error_response(503, f"the engine loop has made no progress for {silent:.0f} s",
                                  code="engine_stalled")
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
