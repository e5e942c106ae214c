"""LoRA overhead on the default model: one decode step of 32 sequences over
8 adapters (rank 16, all seven modules) against the same batch with no
adapters, and a prefill of 8 x 128 tokens likewise; float32 and bfloat16.
The DoRA row: the same decode step over 8 DoRA adapters (the same A and B
plus magnitude vectors) against the plain LoRA one (target <= 1.05).

    .venv/bin/python -P -m loramux.bench.lora_overhead [--dtype bfloat16 float32] [--repeats 7] [--decode-only]

--shape llama3-8b --device cuda: the same rows on a Llama-3-8B-shaped model
(hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab
128256) of random bf16 weights made directly on the device, no checkpoint
(bench/gpu_check.sh; targets: LoRA/base <= 1.10 for decode and prefill).
--shape tiny: that model at a few MB, so the CPU can smoke-test the path.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from loramux.bench.common import interleaved_medians
from loramux.bench.synthetic import random_adapter
from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype
from loramux.adapters_store.pool import AdapterPool
from loramux.adapters_store.device_pool import page_bytes, triton_lora_path
from loramux.server.config import ModelConfig
from loramux.server.llm import DTYPES, load_base
from loramux.server.model.kv_tensors import KVCache
from loramux.server.model.llama import LlamaModel
from loramux.server.model.runner import ModelRunner, SeqChunk

# Synthetic shapes (random weights, no checkpoint); "default" is the default model's checkpoint.
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512),
}


def synthetic_model(shape: str, dtype: torch.dtype, device: str) -> LlamaModel:
    """A Llama of SHAPES[shape] with random weights (matrices N(0, 0.02²),
    norms 1) drawn directly on `device` in `dtype`."""
    cfg = ModelConfig(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False,
                      eos_token_ids=(2,), bos_token_id=1, **SHAPES[shape])
    torch.manual_seed(0)  # the CPU's and every GPU's generator

    def matrix(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02

    h = cfg.hidden_size
    weights = {"model.embed_tokens.weight": matrix(cfg.vocab_size, h), "lm_head.weight": matrix(cfg.vocab_size, h),
               "model.norm.weight": torch.ones(h, device=device, dtype=dtype)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[p + f"self_attn.{m}.weight"] = matrix(*cfg.module_shape(m))
        for m in ("gate_proj", "up_proj", "down_proj"):
            weights[p + f"mlp.{m}.weight"] = matrix(*cfg.module_shape(m))
    return LlamaModel(cfg, weights, dtype, device)


def measure(dtype: str, repeats: int, num_seqs=32, num_adapters=8, rank=16, ctx=128, prefill_len=128,
            decode_only=False, shape="default", device="cpu"):
    if shape == "default":
        model, _, _ = load_base("default", dtype, device)
    else:
        model = synthetic_model(shape, DTYPES[dtype], device)
    cfg = model.cfg
    pool_dtype = lora_pool_dtype(model)
    # room for the plain and the DoRA copies of every adapter (a Llama-3-8B rank-row page is 5 MB in bf16)
    cpu_path = not triton_lora_path(model.device)
    pool_bytes = max(1024 * 2**20, (2 * num_adapters * rank + 64) * page_bytes(cfg, pool_dtype, cpu_path))
    pool = AdapterPool(DeviceLoraPool(cfg, pool_bytes, 32, 64, pool_dtype,
                                      base_weights=model.base_weight, device=device))  # DoRA adapters need them
    bs = 16
    kv = KVCache(cfg, 1024, bs, DTYPES[dtype], device)
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
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def step(chunks):  # one forward, finished on the device before the clock stops
        def run():
            runner.run(chunks)
            sync()
        return run

    fns = {"decode_base": step(dec_base), "decode_lora": step(dec_lora), "decode_dora": step(dec_dora)}
    if not decode_only:
        fns.update(prefill_base=step(pre_base), prefill_lora=step(pre_lora))
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
    parser.add_argument("--shape", choices=["default", *SHAPES], default="default",
                        help="default: the default model's checkpoint; else random weights of that shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--summary", help="also write the LoRA/base ratios as summary rows to this file "
                                          "(bench/gpu_check.sh)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {args.shape}, device {args.device}")
    print(f"{'dtype':10} {'decode base ms':>15} {'decode lora ms':>15} {'ratio':>6} "
          f"{'prefill base ms':>16} {'prefill lora ms':>16} {'ratio':>6} {'decode dora ms':>15} "
          f"{'dora/lora':>9}")
    rows = []
    for dtype in args.dtype:
        t = measure(dtype, args.repeats, decode_only=args.decode_only, shape=args.shape, device=args.device)
        print(f"{dtype:10} {t['decode_base']*1e3:15.1f} {t['decode_lora']*1e3:15.1f} "
              f"{t['decode_lora']/t['decode_base']:6.3f} {t['prefill_base']*1e3:16.1f} "
              f"{t['prefill_lora']*1e3:16.1f} {t['prefill_lora']/t['prefill_base']:6.3f} "
              f"{t['decode_dora']*1e3:15.1f} {t['decode_dora']/t['decode_lora']:9.3f}")
        rows += summary_rows(f"{args.shape} {dtype}", t)
    if args.summary:
        with open(args.summary, "w") as f:
            f.writelines(f"{label:<58}  {value}\n" for label, value in rows)


def summary_rows(what: str, t: dict) -> list[tuple[str, str]]:
    """(label, value) rows: decode and prefill LoRA/base against the 1.10 target, DoRA/LoRA against 1.05."""
    def row(label, num, den, target):
        ratio = t[num] / t[den]
        verdict = "-" if ratio != ratio else ("meets" if ratio <= target else "MISSES")
        return (f"{label}, {what}",
                f"{ratio:.3f}x  (target <= {target:.2f}: {verdict}; {t[num]*1e3:.2f} / {t[den]*1e3:.2f} ms)")

    return [row("decode LoRA/base (32 seqs, 8 x r16)", "decode_lora", "decode_base", 1.10),
            row("prefill LoRA/base (8 x 128 tokens)", "prefill_lora", "prefill_base", 1.10),
            row("decode DoRA/LoRA", "decode_dora", "decode_lora", 1.05)]


if __name__ == "__main__":
    main()
