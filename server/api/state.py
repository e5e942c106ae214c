"""What the HTTP front end is configured with and holds while it runs."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from loramux.adapters_store.file_store import DEFAULT_MAX_BYTES, FileStore
from loramux.adapters_store.peft_format import LoraAdapter
from loramux.adapters_store.registry import AdapterRegistry
from loramux.adapters_store.store import AdapterStore
from loramux.server.api.protocol import AdapterInfo
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.engine import Engine
from loramux.server.engine.grammar_compiler import DEFAULT_TIMEOUT_S, GrammarCompiler
from loramux.server.finetune.job_store import JobStore
from loramux.server.metrics import KVCacheInfo, Metrics


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    model_root: str  # the base model's folder, shown as `root` in /v1/models
    api_key: str | None = None
    allowed_adapter_roots: tuple[Path, ...] = ()
    max_upload_bytes: int = 512 * 2**20
    max_request_bytes: int = 16 * 2**20  # any other request body
    health_timeout_s: float = 60.0  # /health fails when the engine loop is silent this long
    grammar_timeout_s: float = DEFAULT_TIMEOUT_S  # a structured-output spec that compiles longer: 400
    fine_tuning_threads: int = 1  # torch threads of a job's worker process
    max_fine_tuning_jobs: int = 1  # jobs training at once


@dataclass
class ServerState:
    engine: AsyncEngine
    store: AdapterStore  # where uploaded adapters persist
    files: FileStore  # uploaded files (training data for fine-tuning)
    adapters: AdapterRegistry  # the names requests may use (entries' info: AdapterInfo)
    settings: ServerSettings
    metrics: Metrics
    guides: GrammarCompiler | None  # compiles structured-output specs; None: the model has no tokenizer
    draining: bool = False
    inflight: int = 0  # HTTP requests being served (streams included)
    created: int = field(default_factory=lambda: int(time.time()))
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jobs: JobStore | None = None  # fine-tuning jobs; None: no fine-tuning API (e.g. Ray Serve replicas)

    @classmethod
    def assemble(cls, engine: Engine, store: AdapterStore, settings: ServerSettings,
                 files: FileStore | None = None, jobs: JobStore | None = None) -> "ServerState":
        """The state of a server over `engine`: an empty registry over its
        adapter pool, metrics fed by every step, and the engine's thread.
        `files`: default, a store of up to DEFAULT_MAX_BYTES a file in `files/`
        beside the adapter store's folder."""
        if files is None:
            files = FileStore(store.root.parent / "files", DEFAULT_MAX_BYTES)
        registry = AdapterRegistry(engine.adapters)
        kv_cache = KVCacheInfo(engine.allocator.block_size, engine.allocator.num_blocks, engine.config.dtype)
        metrics = Metrics(engine.config.max_loras_per_batch, registry, kv_cache)
        guides = None
        if engine.tokenizer is not None:
            cfg = engine.model.cfg
            guides = GrammarCompiler.for_tokenizer(engine.tokenizer, cfg.vocab_size, cfg.eos_token_ids,
                                                   timeout_s=settings.grammar_timeout_s)
        return cls(AsyncEngine(engine, on_step=metrics.on_step), store, files, registry, settings, metrics, guides,
                   jobs=jobs)

    def engine_stall(self) -> str | None:
        """Why the engine counts as stalled (its loop silent beyond health_timeout_s), or None."""
        silent = self.engine.silent_s()
        if silent > self.settings.health_timeout_s:
            return f"the engine loop has made no progress for {silent:.0f} s"
        return None

    def close(self) -> None:
        """Stop the engine thread and the grammar workers."""
        self.engine.shutdown()
        if self.guides is not None:
            self.guides.close()


def adapter_info(adapter: LoraAdapter, sha256: str, size: int, created: int, source: str) -> AdapterInfo:
    return AdapterInfo(name=adapter.name, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                       target_modules=list(adapter.target_modules), size_bytes=size, sha256=sha256,
                       created=created, source=source)
