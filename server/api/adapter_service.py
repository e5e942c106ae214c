"""Adapters through the API: validate, store, register, unregister, read back.

Every way an adapter arrives (an upload, a merge, a folder under an allowed
root) ends in `save_and_register` or `register`, so the rules are written
once: the name is free and safe, the adapter validates against the base
model and fits the device pool, it is stored atomically, and a failed
registration leaves nothing behind. Validation, hashing and file I/O run in
threads, under one lock, so one adapter's bytes at a time are in memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loramux.adapters_store import arithmetic
from loramux.adapters_store.files import AdapterFilesChanged, PinnedFile
from loramux.adapters_store.peft_format import CONFIG_NAME, MAX_CONFIG_BYTES, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME, \
    AdapterError, LoraAdapter, load_peft_adapter, parse_peft_adapter, peft_files
from loramux.adapters_store.registry import AdapterRegistry, RegisteredAdapter
from loramux.adapters_store.sources import AdapterSource, FolderLoader
from loramux.adapters_store.store import AdapterStore, check_name
from loramux.server.api.generation import GenerationService
from loramux.server.api.protocol import AdapterInfo, MergeRequest
from loramux.server.api.state import ServerState, adapter_info
from loramux.server.config import ModelConfig
from loramux.server.errors import Conflict, Forbidden, Invalid, LoramuxError, Unprocessable

log = logging.getLogger("loramux.adapters")


def _invalid_adapter(exc: AdapterError) -> Unprocessable:
    return Unprocessable(str(exc), exc.field, "invalid_adapter")


def restore_stored(registry: AdapterRegistry, store: AdapterStore, cfg: ModelConfig, max_rank: int) -> int:
    """Register every adapter the store holds, before the server starts; one
    that no longer validates or fits (e.g. above a new --max-lora-rank) is
    logged and skipped. Metadata only: weights stay on disk until needed.
    How many were registered."""
    count = 0
    for adapter, meta in store.iter_all(cfg, max_rank):
        info = adapter_info(adapter, meta.sha256, meta.size, meta.created, "upload")
        try:
            source = AdapterSource.from_store(store.path(adapter.name), adapter, cfg, max_rank)
            registry.register(RegisteredAdapter(adapter.name, source, info))
        except (LoramuxError, OSError) as exc:
            log.error("skipping stored adapter %r: %s", adapter.name, exc)
            continue
        count += 1
    log.info("%d adapters loaded from %s", count, store.root)
    return count


class AdapterService:
    def __init__(self, state: ServerState, generation: GenerationService):
        self.state = state
        self.engine = state.engine
        self.registry = state.adapters
        self.generation = generation  # reads registered adapters' weights for merges
        core = state.engine.engine
        self.model_cfg = core.model.cfg
        self.max_rank = core.config.max_lora_rank
        self.pool = core.adapters  # only its fixed sizes are read here (check_fits)

    @property
    def lock(self) -> asyncio.Lock:
        return self.state.adapter_lock

    # -- rules --------------------------------------------------------------

    def info(self, name: str) -> AdapterInfo:
        return self.registry.lookup(name).info

    def check_new_name(self, name: str) -> None:
        try:
            check_name(name)
        except AdapterError as exc:
            raise Unprocessable(str(exc), "name", "invalid_adapter_name") from None
        state = self.state
        if name in self.registry or name == state.settings.served_model_name or state.store.exists(name):
            raise Conflict(f"adapter `{name}` already exists", "name", "adapter_exists")

    async def parse(self, config_bytes: bytes, weights_bytes: bytes, name: str) -> LoraAdapter:
        try:
            adapter = await asyncio.to_thread(parse_peft_adapter, config_bytes, weights_bytes, self.model_cfg,
                                              self.max_rank, name)
        except AdapterError as exc:
            raise _invalid_adapter(exc) from None
        self.pool.check_fits(adapter.rank)  # now, not at serve time, for one the pool could never hold
        return adapter

    # -- registration -------------------------------------------------------

    async def register(self, source: AdapterSource, info: AdapterInfo) -> None:
        """Register the adapter's metadata; its weights stay on disk until a request needs them."""
        self.registry.register(RegisteredAdapter(source.name, source, info))

    async def save_and_register(self, adapter: LoraAdapter, config_bytes: bytes, weights_bytes: bytes) -> AdapterInfo:
        """Store a validated adapter atomically and register it; nothing is left if that fails."""
        store = self.state.store
        meta = await asyncio.to_thread(store.save, adapter.name, config_bytes, weights_bytes)
        info = adapter_info(adapter, meta.sha256, meta.size, meta.created, "upload")
        try:
            await self.register(AdapterSource.from_store(store.path(adapter.name), adapter, self.model_cfg,
                                                         self.max_rank), info)
        except BaseException:
            await asyncio.to_thread(store.delete, adapter.name)
            raise
        return info

    async def unregister(self, name: str) -> AdapterInfo:
        # New requests get 404 from here on; in-flight ones keep their weights:
        # the pool reads them into memory before the files go.
        entry = await asyncio.to_thread(self.registry.unregister, name)
        await self.engine.call(lambda e: self.state.metrics.forget_adapter(name))
        if entry.info.source == "upload":
            await asyncio.to_thread(self.state.store.delete, name)
        return entry.info

    # -- the ways in --------------------------------------------------------

    @contextlib.asynccontextmanager
    async def read_upload(self, request: Request):
        """(name, config file, weights file) of a multipart upload. The Gate caps
        the body at --max-upload-bytes; files spool to temporary files (held
        in memory only up to 1 MiB each) and are gone when the block ends."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Invalid("send multipart/form-data with `name`, adapter_config.json and adapter_model.safetensors")
        try:
            form = await MultiPartParser(request.headers, request.stream(), max_files=4, max_fields=4,
                                         max_part_size=4096).parse()
        except MultiPartException as exc:
            raise Invalid(f"malformed multipart body: {exc}") from None
        try:
            name = form.get("name")
            parts: dict[str, UploadFile] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    parts[key] = value
                    parts.setdefault(value.filename or "", value)
            if not isinstance(name, str):
                raise Invalid("the form field `name` is missing", "name")
            if WEIGHTS_NAME not in parts and any(p in parts for p in PICKLE_WEIGHTS_NAMES):
                raise Unprocessable(f"{WEIGHTS_NAME}: pickled weights are never loaded; upload safetensors",
                                    WEIGHTS_NAME, "invalid_adapter")
            for needed in (CONFIG_NAME, WEIGHTS_NAME):
                if needed not in parts:
                    raise Invalid(f"the file `{needed}` is missing", needed)
            yield name, parts[CONFIG_NAME], parts[WEIGHTS_NAME]
        finally:
            await form.close()

    @staticmethod
    async def read_part(part: UploadFile, limit: int | None = None) -> bytes:
        await part.seek(0)
        data = await part.read(-1 if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise Unprocessable(f"{part.filename}: larger than the limit of {limit} bytes", CONFIG_NAME,
                                "invalid_adapter")
        return data

    async def upload(self, request: Request) -> AdapterInfo:
        async with self.read_upload(request) as (name, config_part, weights_part), self.lock:
            # under the lock, so that one upload's bytes at a time are in memory
            self.check_new_name(name)
            config_bytes = await self.read_part(config_part, MAX_CONFIG_BYTES)
            weights_bytes = await self.read_part(weights_part)
            adapter = await self.parse(config_bytes, weights_bytes, name)
            return await self.save_and_register(adapter, config_bytes, weights_bytes)

    async def merge(self, body: MergeRequest) -> tuple[AdapterInfo, dict[str, float] | None]:
        """Store Σ weight_i · ΔW_i of registered adapters as a new adapter
        (adapters_store/arithmetic.py); with svd, each module's relative error."""
        max_rank = self.max_rank
        if body.rank is not None and body.rank > max_rank:
            raise Invalid(f"rank {body.rank} is above this server's max_lora_rank {max_rank}", "rank")
        async with self.lock:
            self.check_new_name(body.name)
            entries = self.generation.lookup_all([s.adapter for s in body.sources], "sources.{}")
            loaded = await self.generation.load_sources(entries)
            sources = [arithmetic.Source(a, s.weight) for a, s in zip(loaded, body.sources)]
            errors = None
            if body.method == "concat":
                merged = await asyncio.to_thread(arithmetic.concat, body.name, sources)
            else:
                merged, errors = await asyncio.to_thread(arithmetic.svd, body.name, sources, body.rank)
            if merged.rank > max_rank:
                raise Invalid(f"the merged adapter has rank {merged.rank} (concat: the sum of the sources' ranks), "
                              f"above this server's max_lora_rank {max_rank}; use method svd", "rank")
            adapter, config_bytes, weights_bytes = await asyncio.to_thread(
                arithmetic.as_peft, merged, self.model_cfg, max_rank)
            self.pool.check_fits(adapter.rank)
            return await self.save_and_register(adapter, config_bytes, weights_bytes), errors

    async def load_path(self, name: str, lora_path: str) -> AdapterInfo:
        """vLLM's load_lora_adapter: a PEFT folder under an allowed root,
        pinned to the files validated now (server/adapters_store/files.py)."""
        if "\0" in lora_path:
            raise Invalid("lora_path must not contain a NUL byte", "lora_path")
        async with self.lock:
            self.check_new_name(name)
            path = Path(lora_path).resolve()
            roots = [r.resolve() for r in self.state.settings.allowed_adapter_roots]
            if not any(path.is_relative_to(r) for r in roots):
                raise Forbidden("lora_path is not under an allowed adapter root (--allowed-adapter-root)",
                                "lora_path", "path_not_allowed")
            try:  # symlinks are resolved once, here; the real files must stay under the roots too
                (pinned_config, config_bytes), (pinned_weights, weights) = await asyncio.to_thread(
                    lambda: (PinnedFile.read(path / CONFIG_NAME), PinnedFile.read(path / WEIGHTS_NAME)))
            except OSError:
                try:  # the reason, named as for any folder (e.g. only a pickled adapter_model.bin)
                    await asyncio.to_thread(load_peft_adapter, path, self.model_cfg, self.max_rank, name)
                except AdapterError as exc:
                    raise _invalid_adapter(exc) from None
                raise Unprocessable(f"lora_path: {CONFIG_NAME} and {WEIGHTS_NAME} could not be read as regular "
                                    "files", "lora_path", "invalid_adapter") from None
            if not all(any(f.path.is_relative_to(r) for r in roots) for f in (pinned_config, pinned_weights)):
                raise Forbidden("lora_path's files lead outside the allowed adapter roots", "lora_path",
                                "path_not_allowed")
            adapter = await self.parse(config_bytes, weights, name)
            info = adapter_info(adapter, hashlib.sha256(weights).hexdigest(), len(weights), int(time.time()),
                                "path")
            source = AdapterSource.from_folder(path, adapter, self.model_cfg, self.max_rank,
                                               {CONFIG_NAME: pinned_config, WEIGHTS_NAME: pinned_weights})
            await self.register(source, info)
            return info

    async def files(self, name: str) -> list[tuple[str, object]]:
        """The adapter's PEFT files as validated: open files of its folder, or
        bytes for one held in memory (its files were deleted while requests
        used it). Conflict if a folder's file is not the one registered."""
        source = self.registry.lookup(name).source

        def open_files():
            if isinstance(source.load, FolderLoader):
                return source.load.open_files()
            config_bytes, weights_bytes = peft_files(source.load())
            return [(CONFIG_NAME, config_bytes), (WEIGHTS_NAME, weights_bytes)]

        try:
            return await asyncio.to_thread(open_files)
        except AdapterFilesChanged as exc:
            raise Conflict(f"adapter `{name}`: its files changed on disk since it was registered ({exc}); "
                           "unload and load it again", "name", "adapter_changed") from None
