"""The engine on a device, under chunked prefill and preemption, against each
request run alone (bench/gpu_check.sh runs it on CUDA).

A tiny random Llama (bench/offline_checkpoint.py: no hub, no PEFT) and
random adapters of ranks 4..16 serve a mix of base and adapter requests,
greedy and seeded-sampled, three ways:

    alone      each request by itself, everything fits (the reference)
    chunked    max_num_batched_tokens below the longest prompt: prompts are
               prefilled in chunks, decode rows beside them
    preempted  a KV cache of a few sequences: the newest are preempted and
               recomputed

Every request's tokens must equal its alone tokens, every KV block must be
free at the end, and the preempted run must really preempt. Exits 1 on any
difference, printing the requests that differ.

    python3 bench/cuda_engine_check.py [--device cuda] [--dtype float32] [--requests 24]
    python3 bench/cuda_engine_check.py --device cpu --requests 8     # the CPU smoke form
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from loramux.bench.offline_checkpoint import make_adapters, make_checkpoint
from loramux.server import LLM
from loramux.server.engine.sampling import SamplingParams

NUM_ADAPTERS = 4
BLOCK_SIZE = 4
CHUNKED = dict(max_num_batched_tokens=16, max_num_seqs=6, max_loras_per_batch=2)


def requests(n: int, vocab: int, seed: int = 7):
    """(prompt ids, sampling, adapter name or None): prompts of 1..40 tokens, 1..12
    new tokens, EOS ignored; every fourth request sampled with its own seed."""
    rng = random.Random(seed)
    names = [None] + [f"ad{i}" for i in range(NUM_ADAPTERS)]
    out = []
    for i in range(n):
        length = 40 if i == 0 else rng.randint(1, 40)  # one prompt surely longer than a chunk
        sampling = (SamplingParams(max_tokens=rng.randint(1, 12), temperature=1.0, top_k=40, seed=1000 + i,
                                   ignore_eos=True) if i % 4 == 3 else
                    SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True))
        out.append(([rng.randrange(5, vocab) for _ in range(length)], sampling, names[i % len(names)]))
    return out


def kv_bytes_for(llm: LLM, tokens: int) -> int:
    """KV cache bytes of `tokens` tokens of this model."""
    cfg = llm.engine.model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens * llm.engine.model.dtype.itemsize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", help="float32: greedy ties are rare enough to ask for equality")
    ap.add_argument("--requests", type=int, default=24)
    args = ap.parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_checkpoint(root / "base", tokenizer=False)
        paths = make_adapters(model_dir, root, [f"ad{i}" for i in range(NUM_ADAPTERS)])

        def make_llm(**options) -> LLM:
            options.setdefault("kv_cache_bytes", 4 * 2**20)
            return LLM(model=str(model_dir), dtype=args.dtype, device=args.device, adapters=paths,
                       block_size=BLOCK_SIZE, adapter_pool_bytes=32 * 2**20, **options)

        ref = make_llm()
        engine = ref.engine
        print(f"device {engine.model.device}, {args.dtype}, LoRA backend {type(engine.runner.lora).__name__}, "
              f"decode attention {getattr(engine.model, 'decode_attention_path', '?')}")
        reqs = requests(args.requests, engine.model.cfg.vocab_size)
        want = [ref.generate([p], s, [a])[0].token_ids for p, s, a in reqs]
        # room for about three of the longest sequences (40 + 12 tokens) at once
        small_kv = kv_bytes_for(ref, 3 * 52)
        runs = {"chunked": CHUNKED, "preempted": dict(kv_cache_bytes=small_kv, max_num_batched_tokens=32)}
        failures = []
        for label, options in runs.items():
            llm = make_llm(**options)
            outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs])
            got = [o.token_ids for o in outs]
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
            e = llm.engine
            print(f"{label}: {len(reqs) - len(bad)}/{len(reqs)} requests equal alone, "
                  f"{e.num_preemptions} preemptions, options {options}")
            for i in bad:
                print(f"  request {i} (adapter {reqs[i][2]}, {len(reqs[i][0])} prompt tokens): "
                      f"got {got[i]}, alone {want[i]}")
                failures.append(f"{label} request {i}")
            if e.allocator.num_free != e.allocator.num_blocks:
                failures.append(f"{label}: {e.allocator.num_blocks - e.allocator.num_free} KV blocks not freed")
            if label == "preempted" and e.num_preemptions == 0:
                failures.append("preempted: the small KV cache forced no preemption")
        longest = max(len(r[0]) for r in reqs)
        assert longest > CHUNKED["max_num_batched_tokens"], "no prompt needed chunking"
    verdict = "ok" if not failures else "FAILED: " + ", ".join(failures)
    print(f"engine check on {args.device}: {verdict} ({len(reqs)} requests, prompts up to {longest} tokens, "
          f"{time.perf_counter() - began:.1f} s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
