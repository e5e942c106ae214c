"""Many adapters on disk through a small device pool, on the default model.

N adapters (ranks 8/16/32 mixed, synthetic weights) are written in PEFT
format to a temp dir (deleted afterwards) and registered by metadata only;
the device pool holds 32 adapters of rank 16, and a batch as many. Requests go through the
Engine (offline, not HTTP) with zipf (alpha 1.0) and uniform adapter
popularity; output tokens/s is reported relative to the same workload over
8 adapters all resident, measured side by side in this one run. Also:
disk -> device load latency for rank 16 (p50/p99), and the resident set
size with N adapters registered against the configured budgets.

    .venv/bin/python -P -m loramux.bench.many_adapters --quick     # 100 adapters, ~2 min
    .venv/bin/python -P -m loramux.bench.many_adapters             # 1000 adapters (~20 GB on disk)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.bench.popularity import choose
from loramux.bench.synthetic import random_adapter
from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype, pool_cpu_ops
from loramux.adapters_store.pool import AdapterPool
from loramux.adapters_store.sources import AdapterSource
from loramux.server.config import EngineConfig
from loramux.server.engine.engine import Engine
from loramux.server.heap import freeze_startup_objects
from loramux.server.llm import load_base
from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora, save_peft_adapter
from loramux.server.engine.sampling import SamplingParams

MAX_RANK = 32


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def variant(base: LoraAdapter, name: str, i: int) -> LoraAdapter:
    """A distinct adapter cheaply: the base weights with B scaled by a per-adapter factor."""
    f = 1.0 + 0.01 * (i % 50)
    mods = {k: ModuleLora(m.a, m.b * f, m.scale) for k, m in base.modules.items()}
    return dataclasses.replace(base, name=name, modules=mods,
                               digest=hashlib.sha256(f"{base.digest}/{name}".encode()).hexdigest())


def write_adapters(cfg, root: Path, n: int) -> list[AdapterSource]:
    bases = {r: random_adapter(cfg, f"base{r}", r, seed=r) for r in (8, 16, 32)}
    sources = []
    for i in range(n):
        a = variant(bases[(8, 16, 32)[i % 3]], f"ad{i}", i)
        save_peft_adapter(a, root / a.name)
        sources.append(AdapterSource.from_store(root / a.name, a, cfg, MAX_RANK))
    return sources


def run(engine: Engine, digests: list[str], prompts, params) -> float:
    """Output tokens/s of the whole batch of requests (request i on adapter digests[i])."""
    for p, digest in zip(prompts, digests):
        engine.add_request(p, params, digest)
    t0 = time.perf_counter()
    out = engine.run_to_completion()
    seconds = time.perf_counter() - t0
    return sum(len(o.token_ids) for outs in out.values() for o in outs) / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 adapters, 96 requests")
    parser.add_argument("--adapters", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    n = args.adapters or (100 if args.quick else 1000)
    num_requests = args.requests or (96 if args.quick else 256)

    model, _, _ = load_base("default", args.dtype, "cpu")
    freeze_startup_objects()  # as a server does once started
    cfg = model.cfg
    page = DeviceLoraPool(cfg, 2**30, 1, MAX_RANK, lora_pool_dtype(model)).page_bytes
    device_bytes = 32 * 16 * page  # 32 adapters of rank 16
    # a batch may hold as many adapters as the pool (the default cap, 16, would hold back requests
    # whose adapters are resident: a 32-adapter pool serving 16 at a time is not one)
    config = EngineConfig(dtype=args.dtype, kv_cache_bytes=192 * 2**20, max_num_seqs=32, max_lora_rank=MAX_RANK,
                          adapter_pool_bytes=device_bytes, max_adapter_slots=64, max_loras_per_batch=32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} adapters, {num_requests} requests "
          f"x {args.max_tokens} tokens; device pool {device_bytes / 2**20:.0f} MiB ({device_bytes // page} pages)")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(16)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)

    root = Path(tempfile.mkdtemp(prefix="loramux-many-"))
    try:
        t0 = time.perf_counter()
        sources = write_adapters(cfg, root, n)
        disk_bytes = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        print(f"wrote {n} adapters, {disk_bytes / 2**30:.2f} GiB, in {time.perf_counter() - t0:.0f} s")

        # baseline: 8 adapters of rank 16, all resident (in memory, pool big enough)
        base_engine = Engine(model, None, dataclasses.replace(config, adapter_pool_bytes=8 * 16 * page))
        resident = [base_engine.adapters.add(random_adapter(cfg, f"r{i}", 16, seed=100 + i)) for i in range(8)]
        base_engine.adapters.make_resident(resident)
        run(base_engine, resident, prompts[:8], params)  # warm-up
        rss0 = rss_bytes()
        engine = Engine(model, None, config)
        digests = [engine.adapters.add(s) for s in sources]  # adapter ad{i}
        del sources
        rss1 = rss_bytes()

        zipf = [digests[k] for k in choose("zipf", n, num_requests, rng)]
        uniform = [digests[k] for k in choose("uniform", n, num_requests, rng)]
        results = {}
        for label, eng, picks in (("8 resident", base_engine, [resident[i % 8] for i in range(num_requests)]),
                                  ("zipf", engine, zipf),
                                  ("uniform", engine, uniform)):
            results[label] = run(eng, picks, prompts, params)
            eng.adapters.wait_idle()
        usage = engine.adapters.tier_usage()
        rss2 = rss_bytes()

        print(f"\n{'popularity':12} {'tokens/s':>9} {'vs 8 resident':>14}")
        for label, tps in results.items():
            print(f"{label:12} {tps:9.1f} {tps / results['8 resident']:14.2f}")
        dev = usage["device"]
        print(f"device tier: {dev.loads} loads, {dev.evictions} evictions, {dev.prefetch_hits} prefetch hits; "
              f"disk reads {usage['disk'].loads}")

        # disk -> device latency, rank 16, one at a time (no prefetch): read, parse, copy into pages
        pool = AdapterPool(DeviceLoraPool(cfg, device_bytes, 64, MAX_RANK, lora_pool_dtype(model), ops=pool_cpu_ops(model)),
                           prefetch=False)  # the pool a served model gets: AdapterPool.for_model
        rank16 = [digests[i] for i in range(1, n, 3)][:40]  # ranks cycle 8, 16, 32
        for d in rank16:
            pool.add(engine.adapters.source(d))
        lat = []
        for d in rank16:
            t = time.perf_counter()
            pool.make_resident([d])
            lat.append(time.perf_counter() - t)
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"disk -> device load, rank 16 ({len(lat)} adapters, files in the page cache): "
              f"p50 {statistics.median(lat) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
        served = engine.adapters.take_load_seconds()["device"]
        if served:
            served.sort()
            print(f"device loads while serving (incl. waits): p50 {statistics.median(served) * 1e3:.1f} ms, "
                  f"p99 {served[min(len(served) - 1, int(0.99 * len(served)))] * 1e3:.1f} ms")

        budgets = config.adapter_pool_bytes + config.kv_cache_bytes + (config.adapter_host_bytes or 0)
        print(f"\nRSS: {rss0 / 2**20:.0f} MiB before registering (model, 8-adapter engine), "
              f"{rss1 / 2**20:.0f} MiB with {n} registered (+{(rss1 - rss0) / 2**20:.1f} MiB), "
              f"{rss2 / 2**20:.0f} MiB after serving (+{(rss2 - rss0) / 2**20:.0f} MiB)")
        print(f"budgets of the many-adapter engine: device pool {config.adapter_pool_bytes / 2**20:.0f} MiB + "
              f"KV {config.kv_cache_bytes / 2**20:.0f} MiB + host {(config.adapter_host_bytes or 0) / 2**20:.0f} MiB "
              f"= {budgets / 2**20:.0f} MiB; all {n} adapters' weights would be "
              f"{usage['disk'].adapters and sum(usage['disk'].adapters.values()) / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
