"""Scale-out on Ray Serve (server/ray_serve/), measured side by side in one run:

1. affinity: zipf popularity over N adapters (32) on 2 replicas that hold K
   each (8): the share of requests, after each adapter's first, that reach the
   replica which served that adapter's previous request (x-loramux-replica);
2. the Ray path's cost: one replica under Ray against plain `loramux serve`,
   the same workload and cores: tokens/s ratio;
3. throughput with 1 and with 2 replicas, each given its share of the cores
   (Ray CPUs and torch threads: cores / replicas).

Every request is a greedy streamed completion of fixed length (ignore_eos),
closed loop with C concurrent clients, its adapter drawn by popularity. The
model is a tiny random Llama with SmolLM2's tokenizer unless --model names one.

    python -P -m loramux.bench.scaleout --requests 256 --concurrency 8 --out bench/results/scaleout.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from loramux.bench.common import serve_argv
from loramux.bench.load_test import WORDS
from loramux.bench.popularity import choose

REPLICA_HEADER = "x-loramux-replica"
SERVED = "base"


def make_files(root: Path, model: str | None, num_adapters: int, rank: int) -> tuple[Path, Path]:
    """(model folder, shared adapter store) with num_adapters PEFT adapters stored."""
    from loramux.adapters_store.store import AdapterStore
    from loramux.bench.synthetic import make_peft_adapters, make_tiny_model

    model_dir = Path(model) if model else make_tiny_model(root / "model")
    folders = make_peft_adapters(model_dir, root / "peft", [f"lora-{i}" for i in range(num_adapters)], [rank])
    store = AdapterStore(root / "store")
    for name, folder in folders.items():
        store.save(name, (folder / "adapter_config.json").read_bytes(),
                   (folder / "adapter_model.safetensors").read_bytes())
    return model_dir, root / "store"


def workload(num_requests: int, num_adapters: int, seed: int) -> list[str]:
    """The adapter of each request: zipf(1.0) over the adapters."""
    rng = random.Random(seed)
    return [f"lora-{i}" for i in choose("zipf", num_adapters, num_requests, rng)]


async def run_load(url: str, models: list[str], concurrency: int, prompt_words: int, max_tokens: int) -> dict:
    """Closed loop: `concurrency` clients send the requests in order; per
    request its adapter, the replica that served it and its tokens."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, m in enumerate(models):
        queue.put_nowait((i, m))
    served: list[tuple[str, str | None]] = [("", None)] * len(models)
    tokens = errors = 0
    prompt = " ".join(WORDS[:prompt_words])

    async def client(http: httpx.AsyncClient):
        nonlocal tokens, errors
        while not queue.empty():
            i, model = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": False}
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            tokens += r.json()["usage"]["completion_tokens"]
            served[i] = (model, r.headers.get(REPLICA_HEADER))

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"served": served, "tokens": tokens, "errors": errors, "wall_s": wall, "tokens_per_s": tokens / wall}


def affinity(served: list[tuple[str, str | None]]) -> dict:
    """Of the requests after an adapter's first, the share served by the
    replica that served its previous request; requests per replica."""
    last: dict[str, str] = {}
    hits = repeats = 0
    for model, replica in served:
        if replica is None:
            continue
        if model in last:
            repeats += 1
            hits += last[model] == replica
        last[model] = replica
    return {"hit_rate": hits / repeats if repeats else None, "repeats": repeats,
            "per_replica": dict(Counter(r for _, r in served if r is not None))}


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_options(model_dir: Path, store: Path, args) -> dict[str, str]:
    """The `loramux serve` options both paths share."""
    return {"model": str(model_dir), "dtype": "float32", "adapter_dir": str(store), "served_model_name": SERVED,
            "max_num_seqs": str(args.concurrency), "max_lora_rank": str(args.rank)}


def run_plain(model_dir: Path, store: Path, args, cores: int, models: list[str]) -> dict:
    """The workload against plain `loramux serve` with `cores` torch threads."""
    port = free_port()
    argv = serve_argv("--port", str(port), "--log-level", "warning")
    for key, value in serve_options(model_dir, store, args).items():
        argv += ["--" + key.replace("_", "-"), value]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return asyncio.run(run_load(url, models, args.concurrency, args.prompt_words, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(60)


def run_ray(model_dir: Path, store: Path, args, replicas: int, cores: int, models: list[str], port: int) -> dict:
    """The workload against `replicas` loramux replicas on Ray Serve, each
    given cores / replicas CPUs and torch threads."""
    from ray import serve

    from loramux.server.ray_serve.app import build_app

    options = {**serve_options(model_dir, store, args), "num_replicas": str(replicas),
               "replica_cpus": str(cores / replicas), "max_models_per_replica": str(args.models_per_replica)}
    serve.run(build_app(options), name="loramux", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return asyncio.run(run_load(url, models, args.concurrency, args.prompt_words, args.max_tokens))
    finally:
        serve.delete("loramux")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an HF folder (default: a tiny random Llama)")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--models-per-replica", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.adapters < 1:
        p.error("--requests, --concurrency and --adapters must be positive")

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = make_files(Path(tmp), args.model, args.adapters, args.rank)
        models = workload(args.requests, args.adapters, args.seed)
        report: dict = {"config": vars(args)}
        report["plain_1"] = run_plain(model_dir, store, args, args.cores, models)
        port = free_port()
        ray.init(num_cpus=args.cores, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            report["ray_1"] = run_ray(model_dir, store, args, 1, args.cores, models, port)
            report["ray_2"] = run_ray(model_dir, store, args, 2, args.cores, models, port)
        finally:
            serve.shutdown()
            ray.shutdown()
    aff = affinity(report["ray_2"]["served"])
    summary = {
        "affinity_hit_rate_2_replicas": aff["hit_rate"],
        "requests_per_replica": aff["per_replica"],
        "ray_over_plain_1_replica": report["ray_1"]["tokens_per_s"] / report["plain_1"]["tokens_per_s"],
        "tokens_per_s": {k: round(report[k]["tokens_per_s"], 1) for k in ("plain_1", "ray_1", "ray_2")},
        "two_over_one_replica": report["ray_2"]["tokens_per_s"] / report["ray_1"]["tokens_per_s"],
        "errors": {k: report[k]["errors"] for k in ("plain_1", "ray_1", "ray_2")},
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for k in ("plain_1", "ray_1", "ray_2"):
            report[k].pop("served")
        Path(args.out).write_text(json.dumps({"summary": summary, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
