"""From `loramux serve` options to a ServerState: the one assembly that
`loramux serve` and each Ray Serve replica (server/ray_serve/replica.py) run.

    options -> EngineConfig + base model + adapter store + file store + ServerSettings
            -> ServerState.assemble (engine thread, registry, metrics)
            -> every stored adapter registered again (restore_stored)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields the options set (the others keep their defaults)."""
    return {k: v for k, v in dict(
        kv_cache_bytes=args.kv_cache_bytes, adapter_pool_bytes=args.adapter_pool_bytes,
        adapter_host_bytes=args.adapter_host_bytes,
        max_loras_per_batch=args.max_loras_per_batch, max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting, mix_pool_bytes=args.mix_pool_bytes,
    ).items() if v is not None}


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else LORAMUX_API_KEY; ValueError for an empty one, which would silently open the server."""
    key = args.api_key if args.api_key is not None else os.environ.get("LORAMUX_API_KEY")
    if key is not None and not key.strip():
        raise ValueError("the API key is empty (--api-key or LORAMUX_API_KEY); give a key, or neither to serve "
                         "without authentication")
    return key


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return DEFAULT_SERVED_NAME if args.model in (None, "default") else Path(args.model).name.removesuffix(".gguf")


def assemble_state(args: argparse.Namespace, fine_tuning: bool = True):
    """The ServerState of these options, with every stored adapter registered;
    (FileNotFoundError, ValueError) for a model or option that cannot be served.
    fine_tuning: whether this server runs fine-tuning jobs (its data folder's fine_tuning/).

    Built in a thread that ends before serving starts: loading runs torch's
    parallel ops, and a thread that did keeps an OpenMP team beside the
    engine thread's (server/compute_threads.py says what that costs).
    Everything start-up made is frozen out of the garbage collector's walks then
    (server/heap.py)."""
    from loramux.server.compute_threads import run_in_passing_thread
    from loramux.server.heap import freeze_startup_objects

    state = run_in_passing_thread(lambda: _assemble_state(args, fine_tuning), "loramux-assemble")
    freeze_startup_objects()
    return state


def _assemble_state(args: argparse.Namespace, fine_tuning: bool):
    from loramux.adapters_store.file_store import FileStore
    from loramux.adapters_store.store import AdapterStore
    from loramux.server.api.adapter_service import restore_stored
    from loramux.server.api.state import ServerSettings, ServerState
    from loramux.server.config import EngineConfig
    from loramux.server.engine.engine import Engine
    from loramux.server.finetune.job_store import JobStore
    from loramux.server.llm import load_base, resolve_dtype

    key = api_key(args)
    dtype = resolve_dtype(args.dtype, args.device)
    config = EngineConfig(dtype=dtype, device=args.device, **engine_options(args))
    net, tokenizer, folder = load_base(args.model, dtype, args.device)
    store = AdapterStore(args.adapter_dir or Path(args.data_dir) / "adapters")
    settings = ServerSettings(
        served_model_name=served_name(args), model_root=str(folder), api_key=key,
        allowed_adapter_roots=tuple(Path(r) for r in args.allowed_adapter_root),
        max_upload_bytes=args.max_upload_bytes, max_request_bytes=args.max_request_bytes,
        grammar_timeout_s=args.grammar_compile_timeout,
        fine_tuning_threads=args.fine_tuning_threads, max_fine_tuning_jobs=args.max_fine_tuning_jobs,
    )
    files = FileStore(Path(args.data_dir) / "files", args.max_file_bytes)
    jobs = JobStore(Path(args.data_dir) / "fine_tuning") if fine_tuning else None
    state = ServerState.assemble(Engine(net, tokenizer, config), store, settings, files, jobs)
    restore_stored(state.adapters, store, net.cfg, config.max_lora_rank)
    return state
