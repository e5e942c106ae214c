"""A replica's registry as a mirror of the adapter store every replica shares.

The shared store folder (adapters_store/store.py) is the one source of truth
of which uploaded adapters exist. Each replica's registry holds the ones it
was asked about; before a request names an adapter, the replica checks the
store:

    in the store, not registered here         register it (metadata; weights stay on disk)
    registered here, gone from the store      unregister it: the request gets 404 (a delete
                                              through another replica reached this one)
    registered here, other weights in store   unregister, then register the stored ones

The check reads one small file (meta.json), off the event loop. Ray's
multiplexing evicting an adapter from this replica unregisters it (`drop`):
the pool forgets its weights once in-flight requests finish with them. An
adapter unregistered here loses its metrics series, as after a delete through
the API; that runs in the engine thread (where the series are fed), at the
next check.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging

from loramux.adapters_store.peft_format import parse_peft_adapter
from loramux.adapters_store.registry import AdapterRegistry, RegisteredAdapter
from loramux.adapters_store.sources import AdapterSource
from loramux.adapters_store.store import META_NAME, NAME_RE, AdapterStore
from loramux.server.api.state import ServerState, adapter_info
from loramux.server.errors import LoramuxError

log = logging.getLogger("loramux.ray_serve.store")


class StoreMirror:
    def __init__(self, state: ServerState):
        self.state = state
        self.store: AdapterStore = state.store
        self.registry: AdapterRegistry = state.adapters
        core = state.engine.engine
        self.model_cfg = core.model.cfg
        self.max_rank = core.config.max_lora_rank
        self._unregistered: collections.deque[str] = collections.deque()  # their metrics still to forget

    def _stored_sha(self, name: str) -> str | None:
        try:
            return json.loads((self.store.path(name) / META_NAME).read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _register(self, name: str) -> None:
        config, weights, meta = self.store.read(name)
        adapter = parse_peft_adapter(config, weights, self.model_cfg, self.max_rank, name)
        info = adapter_info(adapter, meta.sha256, meta.size, meta.created, "upload")
        source = AdapterSource.from_store(self.store.path(name), adapter, self.model_cfg, self.max_rank)
        self.registry.register(RegisteredAdapter(name, source, info))

    def _sync(self, name: str) -> bool:
        """Bring `name` in line with the store (blocking I/O); whether it is registered now."""
        if not NAME_RE.fullmatch(name) or name == self.state.settings.served_model_name:
            return name in self.registry
        entry = self.registry.get(name)
        stored = self._stored_sha(name)
        if entry is not None and getattr(entry.info, "source", None) != "upload":
            return True  # a folder loaded on this replica (/v1/load_lora_adapter), not the store's
        if entry is not None and entry.info.sha256 != stored:
            self._unregister(name)
            entry = None
        if entry is None and stored is not None:
            try:
                self._register(name)
            except LoramuxError as exc:  # e.g. Conflict: registered concurrently; anything else: logged
                log.debug("adapter %r not registered from the store: %s", name, exc)
            except (OSError, ValueError) as exc:
                log.error("stored adapter %r is unreadable: %s", name, exc)
        return name in self.registry

    def _unregister(self, name: str) -> None:
        try:
            self.registry.unregister(name)  # in-flight requests keep its weights (AdapterPool.detach)
        except LoramuxError:
            return
        self._unregistered.append(name)

    async def _forget_metrics(self) -> None:
        while self._unregistered:
            name = self._unregistered.popleft()
            await self.state.engine.call(lambda e, name=name: self.state.metrics.forget_adapter(name))

    async def sync(self, name: str) -> bool:
        async with self.state.adapter_lock:
            registered = await asyncio.to_thread(self._sync, name)
            await self._forget_metrics()
            return registered

    async def sync_all(self) -> None:
        """Every stored adapter registered here and every deleted one gone (for listings)."""
        async with self.state.adapter_lock:
            def run():
                stored = set(self.store.names())
                for entry in self.registry.entries():
                    if getattr(entry.info, "source", None) == "upload" and entry.name not in stored:
                        self._unregister(entry.name)
                for name in stored:
                    self._sync(name)
            await asyncio.to_thread(run)
            await self._forget_metrics()

    def drop(self, name: str) -> None:
        """Ray evicted `name` from this replica: unregister an adapter that came from
        the store (blocking: the pool may read weights that in-flight requests hold)."""
        entry = self.registry.get(name)
        if entry is not None and getattr(entry.info, "source", None) == "upload":
            self._unregister(name)
