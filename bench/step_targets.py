"""Issue 15's model-step targets in one run, each path against the torch
path it replaced, measured round-robin in the same process (the default
model, 32 sequences at context 128 over 8 rank-16 adapters, all seven
modules; a prefill of 8 x 128 tokens; one sequence alone):

    row                                   target
    decode base, compiled / torch attn    <= 0.60   (and the GEMM share of each step)
    decode LoRA / base                    <= 1.15   (bf16; float32 no worse than the torch path)
    prefill LoRA / base                   <= 1.15
    decode DoRA / LoRA                    <= 1.05
    one sequence alone                    tok/s of the runner's decode step (small-batch GEMMs)

"before" rows swap the model's decode attention, its small-batch GEMMs
and the LoRA backend's op for their torch paths (server/model/attention.py,
base_linear.py, kernels/cpu.py) on the same model, pool and cache, so only
the op differs.

    .venv/bin/python -m loramux.bench.step_targets [--dtype bfloat16 float32] [--repeats 7] [--no-prefill]
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F

from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype
from loramux.adapters_store.pool import AdapterPool
from loramux.bench.common import interleaved_medians
from loramux.bench.lora_overhead import dora_copy
from loramux.bench.synthetic import random_adapter
from loramux.server.llm import DTYPES, load_base
from loramux.server.model.attention import torch_decode_attention
from loramux.server.model.kv_tensors import KVCache
from loramux.server.model.runner import ModelRunner, SeqChunk

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear")


@contextlib.contextmanager
def torch_paths(model, runner):
    """The model's decode attention, small-batch GEMMs and the LoRA backend's op on their torch paths, for a while."""
    attend, linear, ops = model._decode_attention, model._base_linear, getattr(runner.lora, "ops", None)
    model._decode_attention, model._base_linear = torch_decode_attention, F.linear
    if ops is not None:
        runner.lora.ops = None
    try:
        yield
    finally:
        model._decode_attention, model._base_linear = attend, linear
        if ops is not None:
            runner.lora.ops = ops


def gemm_share(fn, steps: int = 3) -> float:
    """Share of one step's CPU time spent in GEMMs (torch profiler, self time)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def measure(dtype: str, repeats: int, prefill: bool, num_seqs=32, num_adapters=8, rank=16, ctx=128,
            prefill_len=128) -> dict[str, float]:
    model, _, _ = load_base("default", dtype, "cpu")
    cfg = model.cfg
    pool = AdapterPool(DeviceLoraPool(cfg, 1024 * 2**20, 32, 64, lora_pool_dtype(model),
                                      base_weights=model.base_weight))
    bs = 16
    kv = KVCache(cfg, 1024, bs, DTYPES[dtype])
    runner = ModelRunner.for_pool(model, kv, pool.device)
    plain = [random_adapter(cfg, f"a{i}", rank, seed=i) for i in range(num_adapters)]
    slot_of = list(pool.make_resident([pool.add(a) for a in plain]).values())
    dora_slot_of = list(pool.make_resident(
        [pool.add(dora_copy(a, f"d{i}", seed=100 + i)) for i, a in enumerate(plain)]).values())
    per_seq = (ctx + bs) // bs

    def decode(slots):  # sequences grouped by adapter, as the scheduler orders them
        return [SeqChunk([7], ctx, list(range(i * per_seq, (i + 1) * per_seq)),
                         slots[i * len(slots) // num_seqs] if slots else -1) for i in range(num_seqs)]

    def prefill_chunks(slots):
        n = prefill_len // bs
        return [SeqChunk(list(range(3, 3 + prefill_len)), 0, list(range(600 + i * n, 600 + (i + 1) * n)),
                         slots[i] if slots else -1) for i in range(num_adapters)]

    batches = {"decode_base": decode([]), "decode_lora": decode(slot_of), "decode_dora": decode(dora_slot_of),
               "single": [SeqChunk([7], ctx, list(range(per_seq)), -1)]}
    if prefill:
        batches.update(prefill_base=prefill_chunks([]), prefill_lora=prefill_chunks(slot_of))

    def on_torch(chunks):
        def run():
            with torch_paths(model, runner):
                runner.run(chunks)
        return run

    fns = {name: (lambda c=c: runner.run(c)) for name, c in batches.items()}
    fns.update({f"{name}_torch": on_torch(c) for name, c in batches.items()})
    t = interleaved_medians(fns, repeats=repeats)
    t["gemm_share_base"] = gemm_share(fns["decode_base"])
    t["gemm_share_base_torch"] = gemm_share(fns["decode_base_torch"])
    t["attention_path"] = model.decode_attention_path
    t["linear_path"] = model.base_linear_path
    t["lora_path"] = "compiled" if getattr(runner.lora, "ops", None) is not None else "torch"
    return t


def rows(t: dict) -> list[tuple[str, str, float, str]]:
    """(row, how it is computed, value, target) of one dtype's measurements."""
    out = [
        ("decode base ms", f"{t['attention_path']} attention", t["decode_base"] * 1e3, ""),
        ("decode base ms, torch attention", "before", t["decode_base_torch"] * 1e3, ""),
        ("decode base after / before", "", t["decode_base"] / t["decode_base_torch"], "<= 0.60"),
        ("GEMM share of the base step", "after", t["gemm_share_base"], ""),
        ("GEMM share of the base step", "before", t["gemm_share_base_torch"], ""),
        ("decode LoRA / base", f"{t['lora_path']} LoRA", t["decode_lora"] / t["decode_base"], "<= 1.15"),
        ("decode LoRA / base, torch paths", "before", t["decode_lora_torch"] / t["decode_base_torch"], ""),
        ("decode LoRA ms after / before", "", t["decode_lora"] / t["decode_lora_torch"], ""),
        ("decode DoRA / LoRA", "", t["decode_dora"] / t["decode_lora"], "<= 1.05"),
        ("one sequence alone, tok/s", f"{t['linear_path']} GEMMs", 1.0 / t["single"], ""),
        ("one sequence alone, tok/s", "before", 1.0 / t["single_torch"], ""),
    ]
    if "prefill_base" in t:
        out[8:8] = [
            ("prefill LoRA / base", "", t["prefill_lora"] / t["prefill_base"], "<= 1.15"),
            ("prefill LoRA / base, torch paths", "before", t["prefill_lora_torch"] / t["prefill_base_torch"], ""),
        ]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill rows (slow on small CPUs)")
    parser.add_argument("--json", default=None, help="also write every measurement here")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report = {}
    for dtype in args.dtype:
        t = measure(dtype, args.repeats, prefill=not args.no_prefill)
        report[dtype] = t
        print(f"\n{dtype}")
        for name, how, value, target in rows(t):
            print(f"  {name:38} {how:20} {value:9.3f}  {target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
