"""bfloat16 end to end: loramux in bf16 against transformers + PEFT in bf16.

`--dtype auto` serves in bfloat16 on CPUs with AVX512-BF16/AMX and on CUDA,
so the reduced-precision paths (kernels/cpu.py `_add_rounded_once`, the bf16
DoRA row scale, the Triton kernels on bf16 tiles) are what users run. Exact
equality is not a property of bf16 arithmetic, so each comparison is judged
against a float64 truth of the same weights, with a bound derived from bf16
rounding (tests/helpers/precision.py).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from loramux.adapters_store import arithmetic
from loramux.adapters_store.arithmetic import Source
from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype
from loramux.adapters_store.pool import AdapterPool
from loramux.adapters_store.peft_format import load_peft_adapter
from loramux.bench.synthetic import make_peft_adapter
from loramux.server.model.runner import ModelRunner, SeqChunk
from helpers.lora_paths import PATHS, assert_runner_path, choose_path, forbid_other_lora_path
from helpers.precision import assert_greedy_agrees, assert_logprobs_close, noise_bound
from helpers.tiny import TRITON_DEVICE, VOCAB, build, make_model

# (name, DoRA?, options): a plain adapter, an rsLoRA one (scale alpha/sqrt(r),
# 8 here, where alpha/r would be 2), a DoRA adapter, and the two sources of
# the per-request mix. weight_scale: each delta about as large as the base
# output. A delta that dominates the residual stream hides a wrong scale:
# the next RMSNorm divides a uniform factor out again.
ADAPTERS = [
    ("lora", False, dict(r=8, alpha=16, weight_scale=0.12)),
    ("rs", False, dict(r=16, alpha=32, use_rslora=True, weight_scale=0.06,
                       target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))),
    ("dora", True, dict(r=8, alpha=16, weight_scale=0.12)),
]
MIX = (("lora", 0.6), ("rs", -0.5))
MIX_NAME = "mix:bf16"


def make_quiet_model(path):
    """tests/helpers/tiny.py's random Llama with its matrices scaled by
    MATRIX_SCALE. At N(0, 0.2²) each layer amplifies rounding so much that bf16
    logits stray 5-10% from the exact ones and a 5% error in a LoRA delta
    hides in that noise; at N(0, 0.1²) the network is far less chaotic."""
    model = make_model(path, "llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(MATRIX_SCALE)
    model.save_pretrained(path, safe_serialization=True)


MATRIX_SCALE = 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    make_quiet_model(root / "base")
    paths = {name: make_peft_adapter(root / "base", root / name, seed=40 + i, use_dora=dora, **opts)
             for i, (name, dora, opts) in enumerate(ADAPTERS)}
    return root / "base", paths


@pytest.fixture(scope="module")
def references(setup):
    """(truth, hf): the float64 truth and transformers + PEFT in bf16, as
    functions (name, prompt) -> [len(prompt), vocab] float64 logits, cached."""
    base_dir, paths = setup
    models = (hf_reference(base_dir, paths, torch.float64, round_base_to_bf16=True),
              hf_reference(base_dir, paths, torch.bfloat16))
    cache = {}

    def cached(model):
        def logits(name, ids):
            key = (id(model), name, tuple(ids))
            if key not in cache:
                cache[key] = model(name, ids)
            return cache[key]
        return logits

    return tuple(cached(m) for m in models)


def hf_reference(base_dir, paths, dtype, round_base_to_bf16=False):
    """transformers + PEFT with every adapter of ADAPTERS loaded and the mix
    as PEFT's own `add_weighted_adapter(..., "cat")`; `logits(name, ids)` with
    name None for the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if round_base_to_bf16:  # the base weights loramux and HF serve in bf16, held exactly in float64
        base = base.to(torch.bfloat16)
    base = base.to(dtype)
    names = [n for n, _, _ in ADAPTERS]
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(paths[n], adapter_name=n)
    model.add_weighted_adapter([n for n, _ in MIX], [w for _, w in MIX], MIX_NAME, combination_type="cat")
    model.eval()

    def logits(name, ids):  # [len(ids), vocab] float64: every position's next-token logits
        with torch.no_grad():
            x = torch.tensor([ids])
            if name is None:
                with model.disable_adapter():
                    return model(x).logits[0].double()
            model.set_adapter(name)
            return model(x).logits[0].double()

    return logits


def loramux_rows(base_dir, paths, rows, device="cpu"):
    """(runner, chunks): loramux in bf16 on `device` over a pool in the dtype
    the server gives it (lora_pool_dtype) with every adapter and the mix (held as the server holds a per-request mix),
    and the (adapter name or None, prompt) rows as ONE batch's chunks, in
    order (adjacent rows of one adapter form one segment)."""
    cfg, model, kv = build(base_dir, dtype=torch.bfloat16, num_blocks=64, block_size=16, device=device)
    pool = AdapterPool(DeviceLoraPool(cfg, 64 * 2**20, 8, 64, lora_pool_dtype(model), base_weights=model.base_weight,
                                      device=device))
    runner = ModelRunner.for_pool(model, kv, pool.device)
    loaded = {n: load_peft_adapter(p, cfg, 64, name=n) for n, p in paths.items()}
    digest = {n: pool.add(a) for n, a in loaded.items()}
    mix = arithmetic.concat(MIX_NAME, [Source(loaded[n], w) for n, w in MIX])
    pool.add_mix(mix)
    digest[MIX_NAME] = mix.digest
    slots = pool.make_resident(sorted({digest[n] for n, _ in rows if n is not None}))
    chunks, next_block = [], 0
    for n, p in rows:
        blocks = -(-len(p) // 16)
        chunks.append(SeqChunk(p, 0, list(range(next_block, next_block + blocks)), slots[digest[n]] if n else -1))
        next_block += blocks
    return runner, chunks


BATCHES = {
    # no DoRA row: the bf16 CPU path adds the deltas with _add_rounded_once,
    # the 70-token segment of the two adjacent "lora" rows in bf16 matmuls
    # (LONG_SEGMENT), the rest in float32, rounded once
    "lora-mix": [(None, 9), ("lora", 64), ("lora", 6), ("rs", 11), (MIX_NAME, 8), (None, 5)],
    # a DoRA row: every row of the group summed in float32, row-scaled, rounded once
    "dora-lora-mix": [(None, 9), ("dora", 12), ("dora", 5), ("lora", 10), ("rs", 7), (MIX_NAME, 8)],
    # prefill-long segments with DoRA rows: where brgemm serves (AMX), lora_apply_long adds and
    # scales them (24 tokens and more), lora_apply the short one; elsewhere the torch path, whole
    "dora-long": [("dora", 40), (None, 5), ("lora", 30), ("rs", 6), ("dora", 26)],
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_mixed_batch_in_bf16_matches_peft(setup, references, batch, path, monkeypatch):
    """Every position's logits of base, LoRA, rsLoRA, DoRA and mix rows in one
    bf16 batch, on the CPU paths (the compiled op over a bf16 pool, torch's
    ops over a float32 one, as AdapterPool.for_model gives them) and the
    Triton path (bf16 pool, as on a GPU), within noise_bound of the float64
    truth, row by row."""
    base_dir, paths = setup
    choose_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(8)
    rows = [(n, torch.randint(0, VOCAB, (length,), generator=gen).tolist()) for n, length in BATCHES[batch]]
    # the Triton path on CUDA where there is one, else under the interpreter (tests/conftest.py)
    device = TRITON_DEVICE if path == "triton" else "cpu"
    runner, chunks = loramux_rows(base_dir, paths, rows, device)
    assert_runner_path(runner, path)
    assert runner.lora.pool.a_pages[0]["qkv"].dtype == (torch.float32 if path == "torch" else torch.bfloat16)
    forbid_other_lora_path(monkeypatch, path)
    step = runner.prepare(chunks)
    step = dataclasses.replace(step, logits_index=torch.arange(step.input_ids.shape[0], device=device))
    got = runner.model.forward(step, runner.kv, runner.lora).double().cpu().split([len(p) for _, p in rows])
    truth, hf = references
    for k, (name, p) in enumerate(rows):
        want = truth(name, p)
        err, hf_err = (got[k] - want).norm(), (hf(name, p) - want).norm()
        assert err <= noise_bound(hf_err, want), (
            f"row {k} ({name}, {batch}, {path}): |loramux - truth| {err:.3f} > bound "
            f"{noise_bound(hf_err, want):.3f} (|PEFT bf16 - truth| {hf_err:.3f}, |truth| {want.norm():.1f})")


def test_engine_greedy_in_bf16_matches_peft(setup, references):
    """The offline engine in bf16 (prefill, then decode steps with base, LoRA,
    rsLoRA and DoRA rows; the DoRA row stops early, so the later steps add
    the deltas with _add_rounded_once) against transformers + PEFT greedy in
    bf16, both run on loramux's tokens so every step is compared: each token
    is transformers' greedy choice or a near-tie (a random model has many,
    so the tokens alone say little), and
    the top-20 log-probs of all steps lie within the bf16 noise bound of the
    float64 truth."""
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    base_dir, paths = setup
    truth, hf = references
    llm = LLM(model=str(base_dir), dtype="bfloat16", adapters=paths, block_size=4,
              kv_cache_bytes=4 * 2**20, adapter_pool_bytes=32 * 2**20)
    names = [None, "lora", "rs", "dora", "lora"]
    lengths = [12, 12, 12, 5, 12]
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (4 + 2 * i,), generator=gen).tolist() for i in range(len(names))]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=20) for n in lengths]
    outs = llm.generate(prompts, params, names)
    for name, prompt, n, out in zip(names, prompts, lengths, outs):
        assert len(out.token_ids) == n
        seq = prompt + out.token_ids[:-1]  # teacher-forced: each step on loramux's own prefix
        hf_logits, truth_logits = hf(name, seq)[len(prompt) - 1:], truth(name, seq)[len(prompt) - 1:]
        assert_greedy_agrees(out.token_ids, hf_logits, truth_logits, f"adapter {name}")
        assert_logprobs_close(out.logprobs, hf_logits, truth_logits, f"adapter {name}")


@pytest.mark.slow
def test_default_model_in_bf16_agrees_with_transformers():
    """The configuration users run: the default model (SmolLM2-135M-Instruct)
    in bf16, chat prompts, greedy; loramux against transformers in bf16 by
    the same rule as above (each token transformers' choice or a near-tie,
    top-20 log-probs within the bf16 noise bound), and the answer is right."""
    from transformers import AutoModelForCausalLM

    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams
    from loramux.server.model.loader import resolve_model_dir

    folder = resolve_model_dir(None)
    llm = LLM(model=None, dtype="bfloat16", kv_cache_bytes=32 * 2**20, adapter_pool_bytes=256 * 2**20)
    questions = [("What is the capital of France?", "Paris"), ("What is 2 + 3? Answer with a number.", "5")]
    n = 10
    chats = [[{"role": "user", "content": q}] for q, _ in questions]
    outs = llm.chat(chats, SamplingParams(max_tokens=n, ignore_eos=True, logprobs=20))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    # the truth of the weights both serve, the checkpoint rounded to bf16, in
    # float32 here (2^-24 per rounding: nothing beside bf16's 2^-9, and half
    # the time of float64 on the 135M model)
    truth = copy.deepcopy(hf).float()
    for (question, answer), chat, out in zip(questions, chats, outs):
        seq = llm.encode_chat(chat) + out.token_ids[:-1]  # teacher-forced on loramux's tokens
        start = len(seq) - n
        with torch.no_grad():
            hf_logits = hf(torch.tensor([seq])).logits[0, start:]
            truth_logits = truth(torch.tensor([seq])).logits[0, start:]
        assert_greedy_agrees(out.token_ids, hf_logits, truth_logits, question)
        assert_logprobs_close(out.logprobs, hf_logits, truth_logits, question)
        assert answer in out.text, (question, out.text)
