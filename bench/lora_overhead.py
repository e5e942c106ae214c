"""LoRA overhead on the default model: one decode step of 32 sequences over
8 adapters (rank 16, all seven modules) against the same batch with no
adapters, and a prefill of 8 x 128 tokens likewise; float32 and bfloat16.

    .venv/bin/python -m bench.lora_overhead [--dtype bfloat16 float32] [--repeats 7]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import interleaved_medians, random_adapter
from server.adapter_pool import AdapterPool, DeviceLoraPool
from server.engine import lora_pool_dtype
from server.llm import DTYPES, load_base
from server.model_runner import KVCache, ModelRunner, SeqChunk


def measure(dtype: str, repeats: int, num_seqs=32, num_adapters=8, rank=16, ctx=128, prefill_len=128):
    model, _, _ = load_base("default", dtype, "cpu")
    cfg = model.cfg
    pool = AdapterPool(DeviceLoraPool(cfg, 512 * 2**20, 32, 64, lora_pool_dtype(model)))
    for i in range(num_adapters):
        pool.register(random_adapter(cfg, f"a{i}", rank, seed=i))
    slots = pool.make_resident([pool.resolve(f"a{i}") for i in range(num_adapters)])
    slot_of = list(slots.values())
    bs = 16
    kv = KVCache(cfg, 1024, bs, DTYPES[dtype])
    runner = ModelRunner(model, kv, pool.device)
    per_seq = (ctx + bs) // bs

    def decode_chunks(with_lora: bool):
        # sequences grouped by adapter, as the scheduler orders them
        return [SeqChunk([7], ctx, list(range(i * per_seq, (i + 1) * per_seq)),
                         slot_of[i * num_adapters // num_seqs] if with_lora else -1)
                for i in range(num_seqs)]

    def prefill_chunks(with_lora: bool):
        n = prefill_len // bs
        return [SeqChunk(list(range(3, 3 + prefill_len)), 0, list(range(600 + i * n, 600 + (i + 1) * n)),
                         slot_of[i] if with_lora else -1) for i in range(num_adapters)]

    dec_base, dec_lora = decode_chunks(False), decode_chunks(True)
    pre_base, pre_lora = prefill_chunks(False), prefill_chunks(True)
    t = interleaved_medians({
        "decode_base": lambda: runner.run(dec_base),
        "decode_lora": lambda: runner.run(dec_lora),
        "prefill_base": lambda: runner.run(pre_base),
        "prefill_lora": lambda: runner.run(pre_lora),
    }, repeats=repeats)
    return t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':10} {'decode base ms':>15} {'decode lora ms':>15} {'ratio':>6} "
          f"{'prefill base ms':>16} {'prefill lora ms':>16} {'ratio':>6}")
    for dtype in args.dtype:
        t = measure(dtype, args.repeats)
        print(f"{dtype:10} {t['decode_base']*1e3:15.1f} {t['decode_lora']*1e3:15.1f} "
              f"{t['decode_lora']/t['decode_base']:6.3f} {t['prefill_base']*1e3:16.1f} "
              f"{t['prefill_lora']*1e3:16.1f} {t['prefill_lora']/t['prefill_base']:6.3f}")


if __name__ == "__main__":
    main()
