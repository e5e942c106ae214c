"""One HTTP request through an ASGI app in this process, its response as a stream.

The ingress hands a replica a `ForwardedRequest` (plain data, so Ray can
pickle it); the replica runs it through the same FastAPI app `loramux serve`
builds and yields the response as it is produced:

    yield ResponseHead(status, headers)     once, first
    yield b"..."                             every body chunk (an SSE event as soon as it is sent)

httpx's ASGITransport would collect the whole body first, which defeats
streaming; so the app is called directly. When the consumer stops reading
(the client went away), the app sees `http.disconnect`, as under uvicorn, and
frees its engine request.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[str, str], ...]  # as received, names in any case
    body: bytes


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: tuple[tuple[str, str], ...]


_END = object()


async def stream_through(app, request: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
    """`request` through the ASGI `app`: its ResponseHead, then its body chunks."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()  # the consumer stopped reading
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query_string, "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(_END)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message is _END:
                break
            if message["type"] == "http.response.start":
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", []))
                yield ResponseHead(message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task  # an exception the app did not turn into a response surfaces here
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
