"""OpenAI's fine-tuning routes (/v1/fine_tuning/jobs...), over FineTuningService."""
from __future__ import annotations

from fastapi import APIRouter, Query

from loramux.server.api.fine_tuning_service import FineTuningService
from loramux.server.api.protocol import ErrorResponse, FineTuningJobRequest

MAX_PAGE = 100


def _list(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more}


def fine_tuning_router(service: FineTuningService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/fine_tuning/jobs", responses={400: {"model": ErrorResponse}})
    async def create_job(body: FineTuningJobRequest):
        return await service.create(body)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=MAX_PAGE)):
        """Newest first; `after`: the id of the job the page starts after."""
        return _list(*await service.list(after, limit))

    @router.get("/v1/fine_tuning/jobs/{job_id}", responses={404: {"model": ErrorResponse}})
    async def retrieve_job(job_id: str):
        return await service.get(job_id)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses={k: {"model": ErrorResponse} for k in (400, 404)})
    async def cancel_job(job_id: str):
        """Stops a running job within one optimizer step (no adapter is made); the job as it then is."""
        return await service.cancel(job_id)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events", responses={404: {"model": ErrorResponse}})
    async def list_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=MAX_PAGE)):
        """Newest first: messages, and a `metrics` event (step, train_loss, valid_loss, learning_rate) a step."""
        return _list(*await service.events(job_id, after, limit))

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", responses={404: {"model": ErrorResponse}})
    async def list_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=MAX_PAGE)):
        """One per epoch, newest first (PEFT folders under the job's work/checkpoints/)."""
        return _list(*await service.checkpoints(job_id, after, limit))

    return router
