"""A streamed response that never starts still gives back what it held.

The app is driven in-process at the ASGI level, so the one window a live
server hardly ever shows can be opened on purpose: the client is gone before
the response begins (uvicorn's `send` raises OSError at http.response.start),
so the SSE event generator never runs, and neither does any `finally` in it.
The per-request mix and its references must be released all the same.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from helpers.live_server import BASE, make_api_files


@pytest.fixture(scope="module")
def app_and_engine(tmp_path_factory):
    from loramux.server.api.app import create_app
    from loramux.server.api.state import ServerSettings, ServerState
    from loramux.adapters_store.store import AdapterStore
    from loramux.server.config import EngineConfig
    from loramux.server.engine.engine import Engine
    from loramux.server.llm import load_base

    root = make_api_files(tmp_path_factory.mktemp("sse"))
    net, tokenizer, folder = load_base(str(root / "base"), "float32", "cpu")
    state = ServerState.assemble(
        Engine(net, tokenizer, EngineConfig(kv_cache_bytes=8 * 2**20, adapter_pool_bytes=4 * 2**20)),
        AdapterStore(root / "store"), ServerSettings(BASE, str(folder)))
    yield create_app(state), state.engine.engine, root
    state.engine.shutdown()


async def upload(app, root, name):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        folder = root / "allowed" / name
        r = await client.post("/v1/adapters", data={"name": name}, files={
            f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")})
        assert r.status_code == 201, r.text


async def call_gone_client(app, body: dict) -> list[dict]:
    """One request whose client is gone before the response starts."""
    payload = json.dumps(body).encode()
    sent: list[dict] = []
    received = False

    async def receive():
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.start":
            raise OSError("the client is gone")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                             (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    with pytest.raises(Exception):  # starlette turns the OSError into ClientDisconnect
        await app(scope, receive, send)
    return sent


def test_a_mix_is_released_when_the_stream_never_starts(app_and_engine):
    app, engine, root = app_and_engine

    async def scenario():
        for name in ("a1", "a2"):
            await upload(app, root, name)
        body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 8, "stream": True,
                "adapters": [{"name": "a1", "weight": 0.9}, {"name": "a2", "weight": 0.1}]}
        for _ in range(3):
            sent = await call_gone_client(app, body)
            assert [m["type"] for m in sent] == ["http.response.start"]
        for _ in range(200):  # the engine requests end by themselves (max_tokens) or were cancelled
            if engine.adapters.total_refs() == 0 and not engine.has_unfinished():
                break
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert engine.adapters.total_refs() == 0
    assert engine.adapters.mix_bytes() == 0
    assert engine.allocator.num_free == engine.allocator.num_blocks
