"""LoRA overhead on the default model: one decode step of 32 sequences over
8 adapters (rank 16, all seven modules) against the same batch with no
adapters, and a prefill of 8 x 128 tokens likewise; float32 and bfloat16.
The DoRA row: the same decode step over 8 DoRA adapters (the same A and B
plus magnitude vectors) against the plain LoRA one (target <= 1.05).

    .venv/bin/python -m loramux.bench.lora_overhead [--dtype bfloat16 float32] [--repeats 7] [--decode-only]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from loramux.bench.common import interleaved_medians
from loramux.bench.synthetic import random_adapter
from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype
from loramux.adapters_store.pool import AdapterPool
from loramux.server.llm import DTYPES, load_base
from loramux.server.model.kv_tensors import KVCache
from loramux.server.model.runner import ModelRunner, SeqChunk


def measure(dtype: str, repeats: int, num_seqs=32, num_adapters=8, rank=16, ctx=128, prefill_len=128,
            decode_only=False):
    model, _, _ = load_base("default", dtype, "cpu")
    cfg = model.cfg
    pool = AdapterPool(DeviceLoraPool(cfg, 1024 * 2**20, 32, 64, lora_pool_dtype(model),
                                      base_weights=model.base_weight))  # DoRA adapters need them
    bs = 16
    kv = KVCache(cfg, 1024, bs, DTYPES[dtype])
    runner = ModelRunner.for_pool(model, kv, pool.device)
    plain = [random_adapter(cfg, f"a{i}", rank, seed=i) for i in range(num_adapters)]
    digests = [pool.add(a) for a in plain]
    dora_digests = [pool.add(dora_copy(a, f"d{i}", seed=100 + i)) for i, a in enumerate(plain)]
    slot_of = list(pool.make_resident(digests).values())
    dora_slot_of = list(pool.make_resident(dora_digests).values())
    per_seq = (ctx + bs) // bs

    def decode_chunks(with_lora: bool, slot_list=slot_of):
        # sequences grouped by adapter, as the scheduler orders them
        return [SeqChunk([7], ctx, list(range(i * per_seq, (i + 1) * per_seq)),
                         slot_list[i * num_adapters // num_seqs] if with_lora else -1)
                for i in range(num_seqs)]

    def prefill_chunks(with_lora: bool):
        n = prefill_len // bs
        return [SeqChunk(list(range(3, 3 + prefill_len)), 0, list(range(600 + i * n, 600 + (i + 1) * n)),
                         slot_of[i] if with_lora else -1) for i in range(num_adapters)]

    dec_base, dec_lora = decode_chunks(False), decode_chunks(True)
    dec_dora = decode_chunks(True, dora_slot_of)
    pre_base, pre_lora = prefill_chunks(False), prefill_chunks(True)
    fns = {
        "decode_base": lambda: runner.run(dec_base),
        "decode_lora": lambda: runner.run(dec_lora),
        "decode_dora": lambda: runner.run(dec_dora),
    }
    if not decode_only:
        fns.update(prefill_base=lambda: runner.run(pre_base), prefill_lora=lambda: runner.run(pre_lora))
    t = interleaved_medians(fns, repeats=repeats)
    nan = float("nan")
    return {"prefill_base": nan, "prefill_lora": nan, **t}


def dora_copy(adapter, name: str, seed: int):
    """The adapter with DoRA magnitude vectors (random, around 1)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {k: dataclasses.replace(m, magnitude=0.5 + torch.rand(m.b.shape[0], generator=gen))
               for k, m in adapter.modules.items()}
    digest = f"{adapter.digest}-dora{seed}"
    return dataclasses.replace(adapter, name=name, modules=modules, digest=digest,
                               nbytes=adapter.nbytes + 4 * sum(m.b.shape[0] for m in modules.values()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill rows (slow on small CPUs)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':10} {'decode base ms':>15} {'decode lora ms':>15} {'ratio':>6} "
          f"{'prefill base ms':>16} {'prefill lora ms':>16} {'ratio':>6} {'decode dora ms':>15} "
          f"{'dora/lora':>9}")
    for dtype in args.dtype:
        t = measure(dtype, args.repeats, decode_only=args.decode_only)
        print(f"{dtype:10} {t['decode_base']*1e3:15.1f} {t['decode_lora']*1e3:15.1f} "
              f"{t['decode_lora']/t['decode_base']:6.3f} {t['prefill_base']*1e3:16.1f} "
              f"{t['prefill_lora']*1e3:16.1f} {t['prefill_lora']/t['prefill_base']:6.3f} "
              f"{t['decode_dora']*1e3:15.1f} {t['decode_dora']/t['decode_lora']:9.3f}")


if __name__ == "__main__":
    main()
