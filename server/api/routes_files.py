"""OpenAI's Files API (/v1/files...), for fine-tuning data.

An upload is read under the store's cap as it streams (413 past it, before
the rest is read), validated as a training file (server/finetune/data.py;
400 naming the line) and only then stored (adapters_store/file_store.py).
Only `purpose: "fine-tune"` is accepted: there is no batch or assistants API
here. Stored files never expire.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loramux.adapters_store.file_store import FileStore
from loramux.server.api.protocol import ErrorResponse
from loramux.server.errors import Invalid, NotFound, TooLarge
from loramux.server.finetune.data import parse_training_jsonl

PURPOSE = "fine-tune"
MAX_LIST = 10000  # OpenAI's largest page
# multipart framing and the `purpose` field, on top of the file's own bytes
FORM_OVERHEAD = 64 * 1024
_CHUNK = 1 << 20


# The body read_upload parses, for /openapi.json (the route reads the stream itself).
_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "JSONL training data"},
                   "purpose": {"type": "string", "enum": [PURPOSE]}}}}}}


def _too_large(cap: int) -> TooLarge:
    return TooLarge(f"the file is larger than the limit of {cap} bytes (--max-file-bytes)", "file", "file_too_large")


async def _capped(stream, cap: int):
    """The request body's chunks, stopped with a 413 past `cap` bytes."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > cap:  # stop reading: the rest of the body is never read
            raise _too_large(cap)
        yield chunk


@contextlib.asynccontextmanager
async def read_upload(request: Request, cap: int):
    """(filename, purpose, file part) of a multipart upload whose file is at
    most `cap` bytes. The part spools to a temporary file (in memory up to
    1 MiB), gone when the block ends, whatever happens."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Invalid("send multipart/form-data with `file` and `purpose`", "file")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap + FORM_OVERHEAD:
        raise _too_large(cap)
    try:
        form = await MultiPartParser(request.headers, _capped(request.stream(), cap + FORM_OVERHEAD),
                                     max_files=1, max_fields=4, max_part_size=4096).parse()
    except MultiPartException as exc:
        raise Invalid(f"malformed multipart body: {exc.message}", "file") from None
    try:
        for key in form:
            if key not in ("file", "purpose"):
                raise Invalid(f"`{key}` is not supported" + (": files here never expire; delete them instead"
                                                             if key.startswith("expires_after") else ""), key)
        purpose, part = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str):
            raise Invalid("the form field `purpose` is missing", "purpose")
        if purpose != PURPOSE:
            raise Invalid(f"purpose must be {PURPOSE!r} (there is no batch or assistants API here), got {purpose!r}",
                          "purpose")
        if not isinstance(part, UploadFile):
            raise Invalid("the form field `file` must be a file upload (with a filename)", "file")
        if part.size is not None and part.size > cap:
            raise _too_large(cap)
        yield part.filename or "", purpose, part
    finally:
        await form.close()


def _list_page(files: list, has_more: bool) -> dict:
    data = [f.to_openai() for f in files]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _open_content(store: FileStore, file_id: str):
    """(open file, size) of a stored file's bytes; the descriptor keeps them
    readable even if the file is deleted while they stream."""
    try:
        f = open(store.content_path(file_id), "rb")
    except FileNotFoundError:  # deleted since content_path looked
        raise NotFound(f"no file `{file_id}`", "file_id", "file_not_found") from None
    return f, os.fstat(f.fileno()).st_size


def _chunks(f):
    with f:
        while chunk := f.read(_CHUNK):
            yield chunk


def files_router(store: FileStore) -> APIRouter:
    router = APIRouter()
    # one upload's bytes (and its parsed rows) in memory at a time
    upload_lock = asyncio.Lock()

    @router.post("/v1/files", responses={k: {"model": ErrorResponse} for k in (400, 413)},
                 openapi_extra={"requestBody": _UPLOAD_BODY})
    async def create_file(request: Request):
        """multipart `file` (JSONL training data) and `purpose` ("fine-tune")."""
        async with read_upload(request, store.max_bytes) as (filename, purpose, part), upload_lock:
            await part.seek(0)
            data = await part.read()
            await asyncio.to_thread(parse_training_jsonl, data)
            stored = await asyncio.to_thread(store.save, filename, purpose, data)
        return stored.to_openai()

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST),
                         order: Literal["asc", "desc"] = "desc"):
        page, has_more = await asyncio.to_thread(store.list, purpose, after, limit, order)
        return _list_page(page, has_more)

    @router.get("/v1/files/{file_id}", responses={404: {"model": ErrorResponse}})
    async def retrieve_file(file_id: str):
        return (await asyncio.to_thread(store.get, file_id)).to_openai()

    @router.get("/v1/files/{file_id}/content", responses={404: {"model": ErrorResponse}})
    async def file_content(file_id: str):
        """The file's bytes, as uploaded."""
        f, size = await asyncio.to_thread(_open_content, store, file_id)
        return StreamingResponse(_chunks(f), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @router.delete("/v1/files/{file_id}", responses={404: {"model": ErrorResponse}})
    async def delete_file(file_id: str):
        if not await asyncio.to_thread(store.delete, file_id):
            raise NotFound(f"no file `{file_id}`", "file_id", "file_not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    return router
