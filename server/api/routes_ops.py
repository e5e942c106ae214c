"""Operations: /health (engine progress, draining) and /metrics (Prometheus)."""
from __future__ import annotations

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
        stall = state.engine_stall()
        if stall is not None:
            return error_response(503, stall, code="engine_stalled")
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
