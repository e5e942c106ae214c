"""Engine throughput on the default model, in one run:

  * loramux, requests spread zipf-wise over adapters (rank 16, all seven modules)
  * loramux, the same requests on the base model alone
  * HF PEFT, mixed-adapter batches: generate(adapter_names=...) in static batches

    .venv/bin/python -P -m loramux.bench.engine_throughput            # 64 requests, 16 adapters, 128 in / 128 out
    .venv/bin/python -P -m loramux.bench.engine_throughput --quick    # 16 requests, 8 adapters, 64 in / 32 out

Every system generates exactly max_tokens tokens per request (EOS ignored).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from loramux.bench.popularity import choose
from loramux.bench.synthetic import make_peft_adapters
from loramux.server.llm import LLM
from loramux.server.model.loader import resolve_model_dir
from loramux.server.engine.sampling import SamplingParams


def run_loramux(llm: LLM, prompts, adapters, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    elapsed = time.perf_counter() - t
    return elapsed, sum(len(o.token_ids) for o in outs)


def run_hf_peft(model_dir: Path, paths: dict[str, Path], prompts, adapters, max_tokens: int,
                batch: int, dtype: torch.dtype) -> tuple[float, int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    names = list(paths)
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.eval()
    tokens = 0
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch])  # equal lengths: no padding needed
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=adapters[i : i + batch],
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=0)
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return time.perf_counter() - t, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--hf-dtype", default="bfloat16")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.adapters, args.prompt_len, args.max_tokens = 16, 8, 64, 32
    rng = random.Random(0)
    model_dir = resolve_model_dir(None)
    vocab_hi = 40000
    prompts = [[rng.randrange(100, vocab_hi) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    names = [f"ad{i}" for i in choose("zipf", args.adapters, args.requests, rng)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peft_adapters(model_dir, Path(tmp), [f"ad{i}" for i in range(args.adapters)], [args.rank])
        llm = LLM(model="default", dtype=args.dtype, adapters=paths, kv_cache_bytes=1 << 30,
                  max_num_seqs=max(64, args.requests), max_num_batched_tokens=1024,
                  max_loras_per_batch=args.adapters, adapter_pool_bytes=2 << 30)
        run_loramux(llm, prompts[:2], [None, names[0]], 4)  # warm-up
        results = {}
        results["loramux multi-adapter"] = run_loramux(llm, prompts, names, args.max_tokens)
        results["loramux base only"] = run_loramux(llm, prompts, [None] * args.requests, args.max_tokens)
        if not args.skip_hf:
            results[f"HF PEFT mixed batches of {args.hf_batch}"] = run_hf_peft(
                model_dir, paths, prompts, names, args.max_tokens, args.hf_batch, getattr(torch, args.hf_dtype))
    print(f"\n{args.requests} requests over {args.adapters} adapters (zipf 1.0, rank {args.rank}), "
          f"{args.prompt_len} prompt tokens, {args.max_tokens} output tokens; loramux dtype "
          f"{llm.engine.model.dtype}, {torch.get_num_threads()} threads")
    print(f"{'system':36} {'seconds':>8} {'tokens':>7} {'tok/s':>8}")
    rate = {}
    for name, (secs, toks) in results.items():
        rate[name] = toks / secs
        print(f"{name:36} {secs:8.1f} {toks:7d} {rate[name]:8.1f}")
    mine = rate["loramux multi-adapter"]
    for name, r in rate.items():
        if name != "loramux multi-adapter":
            print(f"ratio loramux multi-adapter / {name}: {mine / r:.2f}")


if __name__ == "__main__":
    main()
