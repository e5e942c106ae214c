"""The replica deployment: one engine and the app `loramux serve` builds.

A replica is `loramux serve` without its socket: the same engine, scheduler,
adapter pool and kernels, and the same FastAPI app, which serves requests the
ingress forwards (server/ray_serve/asgi.py). Its adapters come from the
shared store (server/ray_serve/store_mirror.py); Ray's model multiplexing
decides which replica holds which adapter:

    ingress: handle.options(multiplexed_model_id="a1").forward.remote(req)
    Ray:     prefers a replica that reported "a1" as loaded
    replica: await self.load_adapter("a1")    registered here (from the store), warmed on the device;
                                              Ray evicts the least recently used beyond K
             then the request runs through the app

Every response carries `x-loramux-replica`, this replica's id, so affinity is
observable. No `@serve.batch`: the engine's own scheduler mixes adapters in
one batch, which batching by model id would defeat.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from loramux.server.assembly import assemble_state, engine_options
from loramux.server.ray_serve.asgi import ForwardedRequest, ResponseHead, stream_through
from loramux.server.ray_serve.metrics_board import PUSH_INTERVAL_S
from loramux.server.ray_serve.store_mirror import StoreMirror

log = logging.getLogger("loramux.ray_serve.replica")

REPLICA_HEADER = "x-loramux-replica"


def replica_capacity(args: argparse.Namespace) -> tuple[int, int]:
    """(max_ongoing_requests, adapters per replica K) for a replica with these options:
    a running batch plus one waiting batch, so the scheduler always has the next
    requests at hand (Ray's default of 5 would starve it); K the pool's adapter slots."""
    from loramux.server.config import EngineConfig

    config = EngineConfig(**{k: v for k, v in engine_options(args).items() if k in ("max_num_seqs",)})
    ongoing = args.max_ongoing_requests or 2 * config.max_num_seqs
    models = args.max_models_per_replica or config.max_adapter_slots
    return ongoing, models


class _HeldAdapter:
    """What Ray's multiplexer caches per adapter on a replica; Ray calls
    `__del__` when it evicts the adapter (LRU beyond K), in a thread."""

    def __init__(self, mirror: StoreMirror, name: str):
        self.mirror, self.name = mirror, name
        self._released = False

    def __del__(self):
        if not self._released:  # Ray's eviction, then once more at garbage collection
            self._released = True
            self.mirror.drop(self.name)


@serve.deployment(name="LoramuxReplica", ray_actor_options={"num_cpus": 1})
class LoramuxReplica:
    async def __init__(self, args: argparse.Namespace, max_adapters: int, board: DeploymentHandle):
        # async, so the metrics pusher starts on the replica's own event loop, where the app runs
        import torch

        from loramux.server.api.app import create_app

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        # fine-tuning jobs run on `loramux serve`: N replicas would each run the shared queue
        self.state = assemble_state(args, fine_tuning=False)
        self.mirror = StoreMirror(self.state)
        self.app = create_app(self.state)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.board = board
        self._pusher = asyncio.create_task(self._push_metrics())
        # K comes from the options, so the multiplexed loader is wired here (Ray detects it on the
        # instance); a plain function, as Ray keeps its cache on the function object
        async def load_adapter(name: str) -> _HeldAdapter:
            return await self._hold(name)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def _push_metrics(self) -> None:
        """This replica's /metrics to the board (server/ray_serve/metrics_board.py), every interval."""
        while True:
            try:
                await self.board.put.remote(self.replica_id, self.state.metrics.render().decode())
            except Exception as exc:  # the board restarting: the next push refills it
                log.warning("metrics push failed: %s", exc)
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def check_health(self) -> None:
        """Ray's health check: a stalled engine fails it, and Ray replaces the replica."""
        stall = self.state.engine_stall()
        if stall is not None:
            raise RuntimeError(stall)

    async def _hold(self, name: str) -> _HeldAdapter:
        entry = self.state.adapters.get(name)
        if entry is not None:  # warm it: the prefetch worker loads it onto the device off the engine thread
            digest = entry.digest
            await self.state.engine.call(lambda e: e.adapters.prefetch([digest], e.adapters.pinned()))
        return _HeldAdapter(self.mirror, name)

    async def forward(self, request: ForwardedRequest):
        """The response to `request` (a Ray streaming call): a ResponseHead, then body chunks."""
        name = serve.get_multiplexed_model_id()
        # in step with the store first (a delete through another replica reaches this one here);
        # an unknown name takes no multiplexing slot: the app answers 404 for it
        if name and await self.mirror.sync(name):
            await self.load_adapter(name)
        elif request.method == "GET" and request.path in ("/v1/models", "/v1/adapters"):
            await self.mirror.sync_all()
        elif request.path.startswith("/v1/adapters/"):
            await self.mirror.sync(request.path.split("/")[3])
        async for item in stream_through(self.app, request):
            if isinstance(item, ResponseHead):
                item = ResponseHead(item.status, item.headers + ((REPLICA_HEADER, self.replica_id),))
            yield item

    def __del__(self):
        """Ray's shutdown hook, called once in-flight requests finished (or the graceful timeout passed)."""
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.cancel()
            self.board.forget.remote(self.replica_id)
        state = getattr(self, "state", None)
        if state is not None:
            state.close()
