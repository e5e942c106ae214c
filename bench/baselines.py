"""The load test's workload through HF PEFT, three ways, against loramux.

Same requests for every system: bench/load_test.py's `Workload` (same seed =
same prompts, adapters and max_tokens), greedy, EOS ignored (an ordinary
token, as `ignore_eos` in loramux and vLLM), float32 by default.

- peft-single: HF PEFT, one adapter at a time: load it, run its requests in
  batches of --batch-size, swap to the next (load, set active, delete the old);
- peft-mixed:  HF PEFT mixed-adapter batches: every adapter loaded up front,
  requests in arrival order, `generate(..., adapter_names=[...])`;
- merged:      merged weights per adapter: merge it into the base, run its
  requests, unmerge;
- loramux:     the offline engine (loramux.server.llm.LLM, continuous batching over all
  adapters at once) in this same process: no HTTP, so the ratios measure the
  engines, not the transport. (bench/load_test.py measures the HTTP server.)

Timing covers generation; for peft-single it includes loading each adapter
(that is its cost); the other systems load every adapter before the clock.

    .venv/bin/python -P -m loramux.bench.baselines --num-adapters 64 --popularity zipf --num-requests 128
    .venv/bin/python -P -m loramux.bench.baselines --smoke   # tiny random model: outputs must equal loramux's
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loramux.bench.load_test import Length, RequestSpec, Workload
from loramux.bench.popularity import POPULARITIES
from loramux.bench.synthetic import make_peft_adapters, make_tiny_model

SYSTEMS = ("peft-single", "peft-mixed", "merged")


# ---------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    system: str
    seconds: float
    outputs: list[list[int]]  # generated token ids, request order

    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


class HFBaselines:
    """HF transformers + PEFT, greedy, left-padded batches."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], dtype: torch.dtype, batch_size: int):
        from transformers import AutoModelForCausalLM

        self.model_dir, self.adapters, self.dtype, self.batch_size = model_dir, adapters, dtype, batch_size
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        # EOS is an ordinary token (ignore_eos): every system makes max_tokens tokens.
        self.base.generation_config.eos_token_id = None
        self.pad = self.base.config.pad_token_id if self.base.config.pad_token_id is not None else 0
        self.peft = None  # the PeftModel wrapping self.base, once an adapter is loaded

    def _load(self, name: str) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(self.adapters[name]), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(self.adapters[name]), adapter_name=name)

    @torch.inference_mode()
    def _generate(self, model, prompts: list[list[int]], max_tokens: list[int], **kwargs) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_tokens), do_sample=False,
                             pad_token_id=self.pad, **kwargs)
        return [out[i, width:width + n].tolist() for i, n in enumerate(max_tokens)]

    def _batches(self, idxs: list[int]):
        for lo in range(0, len(idxs), self.batch_size):
            yield idxs[lo:lo + self.batch_size]

    def _run_groups(self, specs, prompts, outputs, model_for) -> None:
        """Requests grouped by adapter (first-seen order), each group in batches."""
        groups: dict[str | None, list[int]] = {}
        for s in specs:
            groups.setdefault(s.adapter, []).append(s.index)
        for name, idxs in groups.items():
            with model_for(name) as model:
                for batch in self._batches(idxs):
                    outs = self._generate(model, [prompts[i] for i in batch], [specs[i].max_tokens for i in batch])
                    for i, o in zip(batch, outs):
                        outputs[i] = o

    def peft_single(self, specs: list[RequestSpec], prompts: list[list[int]]) -> Run:
        import contextlib

        outputs: list[list[int]] = [[] for _ in specs]
        loaded: list[str] = []

        @contextlib.contextmanager
        def swap_to(name):
            if name is None:  # the base model: run with the adapter layers off
                with (self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()):
                    yield self.peft or self.base
                return
            self._load(name)
            self.peft.set_adapter(name)
            for old in loaded:
                self.peft.delete_adapter(old)
            loaded[:] = [name]
            yield self.peft

        t = time.perf_counter()
        self._run_groups(specs, prompts, outputs, swap_to)
        seconds = time.perf_counter() - t
        self._reset()
        return Run("peft-single", seconds, outputs)

    def _load_all(self, specs: list[RequestSpec]) -> None:
        for name in dict.fromkeys(s.adapter for s in specs if s.adapter is not None):
            self._load(name)

    def peft_mixed(self, specs: list[RequestSpec], prompts: list[list[int]]) -> Run:
        outputs: list[list[int]] = [[] for _ in specs]
        self._load_all(specs)
        model = self.peft or self.base
        t = time.perf_counter()
        for batch in self._batches([s.index for s in specs]):
            kwargs = {}
            if self.peft is not None:
                kwargs["adapter_names"] = [specs[i].adapter or "__base__" for i in batch]
            outs = self._generate(model, [prompts[i] for i in batch], [specs[i].max_tokens for i in batch],
                                  **kwargs)
            for i, o in zip(batch, outs):
                outputs[i] = o
        seconds = time.perf_counter() - t
        self._reset()
        return Run("peft-mixed", seconds, outputs)

    def merged(self, specs: list[RequestSpec], prompts: list[list[int]]) -> Run:
        import contextlib

        outputs: list[list[int]] = [[] for _ in specs]
        self._load_all(specs)

        @contextlib.contextmanager
        def merged_into_base(name):
            if name is None:
                with (self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()):
                    yield self.peft or self.base
                return
            self.peft.set_adapter(name)
            self.peft.merge_adapter()
            try:
                yield self.peft
            finally:
                self.peft.unmerge_adapter()

        t = time.perf_counter()
        self._run_groups(specs, prompts, outputs, merged_into_base)
        seconds = time.perf_counter() - t
        self._reset()
        return Run("merged", seconds, outputs)

    def _reset(self) -> None:
        """Back to the bare base model for the next system."""
        if self.peft is not None:
            self.base = self.peft.unload()
            self.peft = None

    def run(self, system: str, specs, prompts) -> Run:
        return {"peft-single": self.peft_single, "peft-mixed": self.peft_mixed, "merged": self.merged}[system](
            specs, prompts)


def run_loramux(model_dir: Path, adapters: dict[str, Path], specs: list[RequestSpec], prompts: list[list[int]],
                dtype: str, engine_options: dict, warmup: bool) -> Run:
    from loramux.server.llm import LLM
    from loramux.server.engine.sampling import SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, adapters={n: str(p) for n, p in adapters.items()},
              **engine_options)
    sampling = [SamplingParams(max_tokens=s.max_tokens, ignore_eos=True) for s in specs]
    names = [s.adapter for s in specs]
    if warmup:
        llm.generate(prompts[:4], [SamplingParams(max_tokens=2, ignore_eos=True)] * len(prompts[:4]), names[:4])
    t = time.perf_counter()
    outs = llm.generate(prompts, sampling, names)
    return Run("loramux", time.perf_counter() - t, [o.token_ids for o in outs])


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def prepare(model_dir: Path, workload: Workload) -> tuple[list[RequestSpec], list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specs = workload.requests()
    return specs, [list(tokenizer.encode(s.prompt)) for s in specs]


def compare(model_dir: Path, adapters: dict[str, Path], specs, prompts, systems, *, dtype: str = "float32",
            batch_size: int = 16, engine_options: dict | None = None, warmup: bool = True) -> dict[str, Run]:
    runs = {"loramux": run_loramux(model_dir, adapters, specs, prompts, dtype, engine_options or {}, warmup)}
    hf = HFBaselines(model_dir, adapters, getattr(torch, dtype), batch_size)
    for system in systems:
        if warmup:
            hf.run(system, specs[:2], prompts[:2])
        runs[system] = hf.run(system, specs, prompts)
    return runs


def report(runs: dict[str, Run], num_requests: int) -> str:
    ours = runs["loramux"]
    lines = [f"{'system':12} {'seconds':>9} {'req/s':>8} {'tok/s':>9} {'loramux/this':>13}"]
    for name, run in runs.items():
        ratio = (run.seconds / ours.seconds) if name != "loramux" else 1.0
        lines.append(f"{name:12} {run.seconds:9.2f} {num_requests / run.seconds:8.2f} "
                     f"{run.tokens() / run.seconds:9.1f} {ratio:12.2f}x")
    return "\n".join(lines)


def smoke(workdir: Path, systems=SYSTEMS) -> dict[str, list[list[int]]]:
    """Tiny random model, three adapters of mixed ranks and some base-model
    requests of varied lengths: every system's greedy tokens."""
    model_dir = make_tiny_model(workdir / "tiny")
    names = ["s0", "s1", "s2"]
    adapters = make_peft_adapters(model_dir, workdir / "adapters", names, ranks=[8, 4], alpha_scale=200.0)
    workload = Workload(12, tuple(names), "uniform", prompt_len=Length.parse("uniform:3:12"),
                        output_len=Length.parse("uniform:4:8"), seed=1)
    specs, prompts = prepare(model_dir, workload)
    specs = [dataclasses.replace(s, adapter=None) if s.index % 4 == 3 else s for s in specs]
    runs = compare(model_dir, adapters, specs, prompts, systems, batch_size=4,
                   engine_options=dict(kv_cache_bytes=8 * 2**20, adapter_pool_bytes=4 * 2**20, max_lora_rank=8),
                   warmup=False)
    return {name: run.outputs for name, run in runs.items()} | {"_adapters": [s.adapter for s in specs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random model: check every system's outputs equal "
                                                        "loramux's, then exit")
    p.add_argument("--model", default=None, help="HF folder (default: the default model's converted folder)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR",
                   help="use these adapters (default: --num-adapters random ones of --rank)")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--popularity", choices=POPULARITIES, default="uniform")
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=Length.parse, default=Length.parse("64"))
    p.add_argument("--output-len", type=Length.parse, default=Length.parse("32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--batch-size", type=int, default=16, help="HF batch size")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--adapter-pool-mb", type=int, default=1024)
    p.add_argument("--out", type=Path, default=None, help="write seconds and throughput as JSON")
    args = p.parse_args(argv)

    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            outs = smoke(Path(tmp), args.systems)
        adapters = outs.pop("_adapters")
        bad = {name: [i for i, (a, b) in enumerate(zip(o, outs["loramux"])) if a != b]
               for name, o in outs.items() if name != "loramux"}
        for name, idxs in bad.items():
            print(f"{name:12} {'OK' if not idxs else f'MISMATCH in requests {idxs}'}")
        if any(bad.values()):
            for i in sorted({i for idxs in bad.values() for i in idxs}):
                print(f"  request {i} ({adapters[i] or 'base'}): " +
                      "  ".join(f"{n}={o[i]}" for n, o in outs.items()))
            return 1
        print(f"smoke: {len(adapters)} requests, every baseline's greedy tokens equal loramux's")
        return 0

    from loramux.server.model.loader import resolve_model_dir

    model_dir = Path(args.model) if args.model else resolve_model_dir(None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter:
            adapters = {n: Path(d) for n, _, d in (a.partition("=") for a in args.adapter)}
        else:
            adapters = make_peft_adapters(model_dir, Path(tmp), [f"lora-{i}" for i in range(args.num_adapters)],
                                          [args.rank], alpha_scale=2.0, seed=args.seed)
        workload = Workload(args.num_requests, tuple(adapters), args.popularity, args.zipf_alpha, args.prompt_len,
                            args.output_len, args.seed)
        specs, prompts = prepare(model_dir, workload)
        max_rank = max(json.loads((d / "adapter_config.json").read_text())["r"] for d in adapters.values())
        engine_options = dict(kv_cache_bytes=args.kv_cache_mb * 2**20, adapter_pool_bytes=args.adapter_pool_mb * 2**20,
                              max_lora_rank=max(8, max_rank))
        print(f"{model_dir.name}: {len(adapters)} adapters, {args.popularity}, {args.num_requests} requests, "
              f"prompt {args.prompt_len} / output {args.output_len} tokens, {args.dtype}, "
              f"{torch.get_num_threads()} threads", flush=True)
        runs = compare(model_dir, adapters, specs, prompts, args.systems, dtype=args.dtype,
                       batch_size=args.batch_size, engine_options=engine_options)
    print(report(runs, len(specs)))
    mismatched = [n for n, r in runs.items() if r.outputs != runs["loramux"].outputs]
    if mismatched and args.dtype == "float32":
        print(f"note: greedy outputs differ from loramux's for {', '.join(mismatched)} "
              "(float rounding on near-ties; --smoke checks exact agreement)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({n: {"seconds": r.seconds, "tokens": r.tokens(),
                                            "tok_per_s": r.tokens() / r.seconds} for n, r in runs.items()},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
