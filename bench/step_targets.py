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

"before" rows swap the model's decode attention, its small-batch GEMMs,
norms and rotary, and the LoRA backend's op for their torch paths
(server/model/attention.py, base_linear.py, layer_ops.py, kernels/cpu.py)
on the same model, pool and cache, so only the ops differ.

    .venv/bin/python -P -m loramux.bench.step_targets [--dtype bfloat16 float32] [--repeats 7] [--no-prefill]
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
from loramux.server.model.layer_ops import TORCH_OPS
from loramux.server.model.lora_backend import CpuLoraBackend, select_lora_backend
from loramux.server.model.runner import ModelRunner, SeqChunk

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear")


@contextlib.contextmanager
def torch_model_ops(model):
    """The model's decode attention, small-batch GEMMs, norms and rotary on their torch paths, for a while."""
    attend, linear, layer_ops = model._decode_attention, model._base_linear, model.layer_ops
    model._decode_attention, model._base_linear, model.layer_ops = torch_decode_attention, F.linear, TORCH_OPS
    try:
        yield
    finally:
        model._decode_attention, model._base_linear, model.layer_ops = attend, linear, layer_ops


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
    bs = 16
    kv = KVCache(cfg, 1024, bs, DTYPES[dtype])
    plain = [random_adapter(cfg, f"a{i}", rank, seed=i) for i in range(num_adapters)]
    dora = [dora_copy(a, f"d{i}", seed=100 + i) for i, a in enumerate(plain)]

    def runner_over(pool_dtype, backend):
        """A runner on the shared model and cache, its own pool holding both adapter sets."""
        pool = AdapterPool(DeviceLoraPool(cfg, 1024 * 2**20, 32, 64, pool_dtype, base_weights=model.base_weight))
        runner = ModelRunner(model, kv, backend(pool.device))
        return (runner, list(pool.make_resident([pool.add(a) for a in plain]).values()),
                list(pool.make_resident([pool.add(a) for a in dora]).values()))

    # as served (the pool in lora_pool_dtype, the backend select_lora_backend picks), and the torch
    # path as it served before the compiled ops: a float32 pool, torch's LoRA ops
    runner, slot_of, dora_slot_of = runner_over(lora_pool_dtype(model), lambda p: select_lora_backend(p, "cpu"))
    torch_runner, torch_slot_of, torch_dora_slot_of = runner_over(torch.float32, lambda p: CpuLoraBackend(p, None))
    per_seq = (ctx + bs) // bs

    def decode(slots):  # sequences grouped by adapter, as the scheduler orders them
        return [SeqChunk([7], ctx, list(range(i * per_seq, (i + 1) * per_seq)),
                         slots[i * len(slots) // num_seqs] if slots else -1) for i in range(num_seqs)]

    def prefill_chunks(slots):
        n = prefill_len // bs
        return [SeqChunk(list(range(3, 3 + prefill_len)), 0, list(range(600 + i * n, 600 + (i + 1) * n)),
                         slots[i] if slots else -1) for i in range(num_adapters)]

    def batches(slots, dora_slots):
        out = {"decode_base": decode([]), "decode_lora": decode(slots), "decode_dora": decode(dora_slots),
               "single": [SeqChunk([7], ctx, list(range(per_seq)), -1)]}
        if prefill:
            out.update(prefill_base=prefill_chunks([]), prefill_lora=prefill_chunks(slots))
        return out

    def on_torch(chunks):
        def run():
            with torch_model_ops(model):
                torch_runner.run(chunks)
        return run

    fns = {name: (lambda c=c: runner.run(c)) for name, c in batches(slot_of, dora_slot_of).items()}
    fns.update({f"{name}_torch": on_torch(c) for name, c in batches(torch_slot_of, torch_dora_slot_of).items()})
    t = interleaved_medians(fns, repeats=repeats)
    t["gemm_share_base"] = gemm_share(fns["decode_base"])
    t["gemm_share_base_torch"] = gemm_share(fns["decode_base_torch"])
    t["attention_path"] = model.decode_attention_path
    t["linear_path"] = model.base_linear_path
    t["lora_path"] = runner.lora.path
    t["pool_dtype"] = str(runner.lora.pool.a_pages[0]["qkv"].dtype).removeprefix("torch.")
    return t


def rows(t: dict) -> list[tuple[str, str, float, str]]:
    """(row, how it is computed, value, target) of one dtype's measurements."""
    out = [
        ("decode base ms", f"{t['attention_path']} attention", t["decode_base"] * 1e3, ""),
        ("decode base ms, torch attention", "before", t["decode_base_torch"] * 1e3, ""),
        ("decode base after / before", "", t["decode_base"] / t["decode_base_torch"], "<= 0.60"),
        ("GEMM share of the base step", "after", t["gemm_share_base"], ""),
        ("GEMM share of the base step", "before", t["gemm_share_base_torch"], ""),
        ("decode LoRA / base", f"{t['lora_path']} LoRA, {t['pool_dtype']} pool", t["decode_lora"] / t["decode_base"],
         "<= 1.15"),
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
