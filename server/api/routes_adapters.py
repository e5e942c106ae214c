"""loramux's adapter routes (/v1/adapters...) and vLLM's load/unload."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loramux.adapters_store.files import tar_stream
from loramux.server.api.adapter_service import AdapterService
from loramux.server.api.protocol import (
    AdapterInfo, AdapterList, ErrorResponse, LoadLoraAdapterRequest, MergeRequest, MergeResponse,
    UnloadLoraAdapterRequest,
)
from loramux.server.errors import Invalid


def _deleted(name: str) -> dict:
    return {"id": name, "object": "adapter", "deleted": True}


def adapters_router(service: AdapterService) -> APIRouter:
    router = APIRouter()
    state = service.state

    @router.post("/v1/adapters", status_code=201, response_model=AdapterInfo,
                 responses={k: {"model": ErrorResponse} for k in (400, 409, 413, 422)})
    async def upload_adapter(request: Request):
        info = await service.upload(request)
        return JSONResponse(info.model_dump(), status_code=201)

    @router.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters():
        return AdapterList(data=[e.info for e in state.adapters.entries()])

    @router.get("/v1/adapters/{name}", response_model=AdapterInfo)
    async def get_adapter(name: str):
        return service.info(name)

    @router.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        async with service.lock:
            await service.unregister(name)
        return _deleted(name)

    @router.post("/v1/adapters/merge", status_code=201, response_model=MergeResponse,
                 responses={k: {"model": ErrorResponse} for k in (400, 404, 409, 422)})
    async def merge_adapters(body: MergeRequest):
        info, errors = await service.merge(body)
        response = MergeResponse(**info.model_dump(), method=body.method, sources=body.sources, errors=errors)
        return JSONResponse(response.model_dump(), status_code=201)

    @router.get("/v1/adapters/{name}/download")
    async def download_adapter(name: str):
        """The adapter's PEFT files (adapter_config.json, adapter_model.safetensors) as a
        tar, streamed from the files that were validated; 409 if they changed since."""
        files = await service.files(name)
        return StreamingResponse(tar_stream(name, files), media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})

    @router.delete("/v1/models/{model}", responses={k: {"model": ErrorResponse} for k in (400, 404)})
    async def delete_model(model: str):
        """OpenAI's delete of a fine-tuned model: here, any adapter (the base cannot be deleted)."""
        if model == state.settings.served_model_name:
            raise Invalid(f"`{model}` is the base model; only adapters can be deleted", "model", "model_not_deletable")
        async with service.lock:
            await service.unregister(model)
        return {"id": model, "object": "model", "deleted": True}

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        return await service.load_path(body.lora_name, body.lora_path)

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        async with service.lock:
            await service.unregister(body.lora_name)
        return _deleted(body.lora_name)

    return router
