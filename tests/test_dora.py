"""DoRA adapters served in mixed batches, against transformers + PEFT."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from loramux.adapters_store.device_pool import DeviceLoraPool
from loramux.adapters_store.pool import AdapterPool
from loramux.server.model.runner import ModelRunner, SeqChunk
from loramux.adapters_store.peft_format import load_peft_adapter
from helpers.lora_paths import assert_runner_path, choose_path, forbid_other_lora_path
from helpers.tiny import TRITON_DEVICE, VOCAB, build, make_adapter, make_dora_adapter, make_model, peft_greedy, \
    peft_model

# The Triton path runs on CUDA where there is one, else under the interpreter on CPU tensors
# (tests/conftest.py sets TRITON_INTERPRET only without CUDA): its tests put the model there.

# (name, DoRA?, options): DoRA on every module, DoRA on q,v with a rank
# pattern, rsLoRA DoRA, and plain LoRA adapters beside them
ADAPTERS = [
    ("dora-r8", True, dict(r=8, alpha=16)),
    ("dora-qv", True, dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 2})),
    ("dora-rs16", True, dict(r=16, alpha=32, use_rslora=True, target_modules=("k_proj", "o_proj", "up_proj"))),
    ("lora-r8", False, dict(r=8, alpha=16)),
    ("lora-r4-qv", False, dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"))),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def dora_setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dora-{request.param}")
    make_model(root / "base", request.param)
    paths = {}
    for i, (name, dora, opts) in enumerate(ADAPTERS):
        make = make_dora_adapter if dora else make_adapter
        paths[name] = make(root / "base", root / name, seed=10 + i, **opts)
    return request.param, root / "base", paths


def test_dora_adapter_loads_with_magnitudes(dora_setup):
    _, base_dir, paths = dora_setup
    cfg, _, _ = build(base_dir)
    dora = load_peft_adapter(paths["dora-qv"], cfg, 64)
    plain = load_peft_adapter(paths["lora-r8"], cfg, 64)
    assert dora.use_dora and not plain.use_dora
    assert dora.modules[(0, "v_proj")].magnitude.shape == (cfg.module_shape("v_proj")[0],)
    assert dora.modules[(0, "v_proj")].rank == 2


# qwen2 (qkv bias) on the torch path only: the bias is added by the same code
# on both paths, and the interpreter is slow
@pytest.mark.parametrize("dora_setup, path", [("llama", "torch"), ("llama", "compiled"), ("llama", "triton"), ("qwen2", "compiled")],
                         indirect=["dora_setup"])
def test_mixed_dora_lora_base_batch_equals_peft(dora_setup, path, monkeypatch):
    kind, base_dir, paths = dora_setup
    choose_path(monkeypatch, path)
    device = TRITON_DEVICE if path == "triton" else "cpu"
    cfg, model, kv = build(base_dir, device=device)
    # DoRA's row scales are computed from the base weights when an adapter is written
    pool = AdapterPool(DeviceLoraPool(cfg, 32 * 2**20, 8, 64, torch.float32, base_weights=model.base_weight,
                                      device=device))
    runner = ModelRunner.for_pool(model, kv, pool.device)
    assert_runner_path(runner, path)
    forbid_other_lora_path(monkeypatch, path)
    digests = {name: pool.add(load_peft_adapter(p, cfg, 64, name=name)) for name, p in paths.items()}
    by_digest = pool.make_resident(list(digests.values()))
    slots = {n: by_digest[digests[n]] for n in paths}
    assert sorted(s for s in slots.values() if pool.device.is_dora[s]) == sorted(
        slots[n] for n, dora, _ in ADAPTERS if dora)

    gen = torch.Generator().manual_seed(5)
    # base rows between adapter runs; prefill rows of several lengths per adapter
    rows = [(None, 6)] + [(n, 4 + i) for i, n in enumerate(paths)] + [(None, 3)] + [(n, 7) for n in paths]
    prompts = [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _, length in rows]
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0] or ""))
    chunks = [SeqChunk(prompts[i], 0, [3 * k, 3 * k + 1, 3 * k + 2], slots.get(rows[i][0], -1))
              for k, i in enumerate(order)]
    logits = runner.run(chunks)
    refs = {}
    for k, i in enumerate(order):
        name = rows[i][0]
        if name not in refs:
            refs[name] = peft_model(base_dir, paths[name] if name else None)
        with torch.no_grad():
            want = refs[name](torch.tensor([prompts[i]])).logits[0, -1]
        # float32, summed in another order than PEFT's (fused qkv, the LoRA
        # delta added per group): up to 2.3e-4 apart on an AMD EPYC for the
        # qwen2 rows (1e-4 sufficed on Xeon); a wrong scale, row scale or a
        # missing row moves these logits by far more than 1e-3
        torch.testing.assert_close(logits[k].cpu(), want, atol=1e-3, rtol=1e-3,
                                   msg=lambda m, name=name: f"row for {name} ({kind}, {path}): {m}")


@pytest.mark.parametrize("dora_setup", ["llama"], indirect=True)  # one architecture is enough here
def test_dora_greedy_decode_equals_peft(dora_setup):
    """Decode steps (one token per sequence) with DoRA and plain rows mixed, through the engine."""
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    kind, base_dir, paths = dora_setup
    names = ["dora-r8", None, "lora-r8", "dora-qv"]
    llm = LLM(model=str(base_dir), dtype="float32", adapters={n: paths[n] for n in names if n}, block_size=4,
              kv_cache_bytes=4 * 2**20, adapter_pool_bytes=16 * 2**20)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (4 + i,), generator=gen).tolist() for i in range(len(names))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), names)
    for name, prompt, out in zip(names, prompts, outs):
        assert out.token_ids == peft_greedy(base_dir, paths[name] if name else None, prompt, 8), name


@pytest.mark.parametrize("dora_setup", ["llama"], indirect=True)
def test_dora_on_triton_prefill_tiles_equals_peft(dora_setup, monkeypatch):
    """DoRA's epilogue on the expand's tl.dot tiles: a DoRA run of 18 tokens makes every launch
    of the step use prefill tiles (kernels/sgmv.py _token_tile: an adapter run >= 16 tokens),
    with a short DoRA run, a plain LoRA run and a base run in masked tiles beside it."""
    from loramux.kernels import sgmv

    kind, base_dir, paths = dora_setup
    monkeypatch.setenv("LORAMUX_TRITON", "1")
    cfg, model, kv = build(base_dir, device=TRITON_DEVICE)
    pool = AdapterPool(DeviceLoraPool(cfg, 16 * 2**20, 4, 16, torch.float32, base_weights=model.base_weight,
                                      device=TRITON_DEVICE))
    runner = ModelRunner.for_pool(model, kv, pool.device)
    forbid_other_lora_path(monkeypatch, "triton")
    launches = []  # (tl.dot tiles?, DoRA epilogue on) of every expand
    expand = sgmv.lora_expand

    def recording_expand(h, b_pool, page_table, ranks, scales, seg, out, offsets, dora_scale=None):
        launches.append((sgmv._token_tile(sgmv._longest_adapter_run(seg))[0], dora_scale is not None))
        return expand(h, b_pool, page_table, ranks, scales, seg, out, offsets, dora_scale)

    monkeypatch.setattr(sgmv, "lora_expand", recording_expand)
    names = ["dora-r8", "dora-qv", "lora-r8"]
    digests = {n: pool.add(load_peft_adapter(paths[n], cfg, 16, name=n)) for n in names}
    by_digest = pool.make_resident(list(digests.values()))
    rows = [("dora-r8", 18), ("dora-qv", 5), ("lora-r8", 6), (None, 4)]  # each adapter contiguous
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _, length in rows]
    chunks, block = [], 0
    for (name, length), prompt in zip(rows, prompts):
        blocks = -(-length // 4)
        chunks.append(SeqChunk(prompt, 0, list(range(block, block + blocks)),
                               by_digest[digests[name]] if name else -1))
        block += blocks
    logits = runner.run(chunks)
    assert launches and all(dot and dora for dot, dora in launches)
    for k, ((name, _), prompt) in enumerate(zip(rows, prompts)):
        with torch.no_grad():
            want = peft_model(base_dir, paths[name] if name else None)(torch.tensor([prompt])).logits[0, -1]
        # float32, as in test_mixed_dora_lora_base_batch_equals_peft
        torch.testing.assert_close(logits[k].cpu(), want, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_dora_needs_base_weights(dora_setup):
    _, base_dir, paths = dora_setup
    cfg, _, _ = build(base_dir)
    pool = DeviceLoraPool(cfg, 8 * 2**20, 4, 64, torch.float32)
    with pytest.raises(RuntimeError, match="base weights"):
        pool.load(load_peft_adapter(paths["dora-qv"], cfg, 64))
    assert pool.num_free_slots == 4


def test_a_plain_adapter_after_a_dora_adapter_in_its_slot_has_unit_scale_rows(dora_setup):
    # a plain adapter's write refills the scale rows only where a DoRA adapter was written
    _, base_dir, paths = dora_setup
    cfg, model, _ = build(base_dir)
    pool = DeviceLoraPool(cfg, 8 * 2**20, 2, 64, torch.float32, base_weights=model.base_weight)
    dora, plain = (load_peft_adapter(paths[n], cfg, 64) for n in ("dora-r8", "lora-r8"))

    def rows(slot):
        return [pool.dora_scale[layer][group][slot] for layer in range(cfg.num_layers) for group in pool.dora_scale[0]]

    slot = pool.load(dora)
    assert any((r != 1).any() for r in rows(slot))
    pool.unload(slot)
    assert pool.load(plain) == slot
    assert all((r == 1).all() for r in rows(slot))
    pool.unload(slot)

    # a DoRA write that fails halfway leaves scaled rows behind: the next write still refills them
    last = (cfg.num_layers - 1, "down_proj")
    bad = dataclasses.replace(dora.modules[last], a=dora.modules[last].a[:, :-1])  # A one column short
    broken_dora = dataclasses.replace(dora, modules={**dora.modules, last: bad})
    with pytest.raises(RuntimeError):
        pool.load(broken_dora)
    assert any((r != 1).any() for r in rows(slot))
    assert pool.load(plain) == slot
    assert all((r == 1).all() for r in rows(slot))


def test_folder_loader_reads_magnitudes_back(dora_setup):
    from loramux.adapters_store.sources import AdapterSource

    _, base_dir, paths = dora_setup
    cfg, _, _ = build(base_dir)
    adapter = load_peft_adapter(paths["dora-rs16"], cfg, 64)
    back = AdapterSource.from_folder(paths["dora-rs16"], adapter, cfg, 64).load()
    assert back.digest == adapter.digest and back.nbytes == adapter.nbytes
    for k, ml in adapter.modules.items():
        torch.testing.assert_close(back.modules[k].magnitude, ml.magnitude, atol=0, rtol=0)


# decode: every segment under 16 tokens (Triton's broadcast-sum tiles); prefill: one of 17 (its tl.dot tiles)
EXPAND_TOKENS = {
    "decode": [2, 2, -1, 0, 0, 0, 3, -1, 1],
    "prefill": [2] * 17 + [-1, -1, 0, 0, 0, 3, -1, 1, 1],
}


@pytest.mark.parametrize("dora_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens", list(EXPAND_TOKENS))
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_expand_with_dora_scale_equals_reference(impl, tokens, dora_dtype):
    """The expand epilogue: adapter rows, in the columns of their slices of rank > 0 only, times
    dora_scale[slot]. dora_scale is random in every column, rank-0 ones included, so an
    implementation that scales a column its adapter does not adapt moves it; pages no slot owns
    and h past a rank are NaN, so one that reads them shows NaN."""
    from loramux.kernels import cpu, make_segments, reference

    gen = torch.Generator().manual_seed(7)
    n, P, R, slots, offs = 3, 70, 16, 4, (0, 24, 32, 48)
    token_slots = EXPAND_TOKENS[tokens]
    seg = make_segments(token_slots)
    T = len(token_slots)
    ranks = torch.tensor([[4, 8, 16, 2], [4, 0, 16, 2], [4, 8, 0, 2]], dtype=torch.int32)
    # each slot owns max-rank-over-slices pages at shuffled places; table entries past them -> poison page
    pages = torch.randperm(P, generator=gen).tolist()
    poison = pages.pop()
    page_table = torch.full((slots, R), poison, dtype=torch.int32)
    for slot, r in enumerate(ranks.max(dim=0).values.tolist()):
        page_table[slot, :r] = torch.tensor([pages.pop() for _ in range(r)], dtype=torch.int32)
    b_pool = torch.full((P, offs[-1]), float("nan"))
    owned = page_table[page_table != poison].long()
    b_pool[owned] = torch.randn(len(owned), offs[-1], generator=gen)
    scales = torch.rand(n, slots, generator=gen) + 0.5
    # bf16/fp16 scales are exact in float32, the dtype every path multiplies in
    dora = (torch.rand(slots, offs[-1], generator=gen) + 0.5).to(dora_dtype)
    h = torch.randn(n, T, R, generator=gen)
    for t, slot in enumerate(token_slots):  # expand must read h only below each slice's rank
        for s in range(n):
            h[s, t, (int(ranks[s, slot]) if slot >= 0 else 0):] = float("nan")
    base = torch.randn(T, offs[-1], generator=gen)
    want = base.clone()
    reference.lora_expand(h, b_pool, page_table, ranks, scales, seg, want, offs, dora)
    got = base.clone()
    if impl == "cpu":
        cpu.lora_expand(h, b_pool, page_table, ranks, scales, seg, got, offs, dora)
    else:
        from loramux.kernels import sgmv

        dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
        on = [t.to(dev) for t in (h, b_pool, page_table, ranks, scales, got, dora)]
        sgmv.lora_expand(*on[:5], make_segments(token_slots, dev), on[5], offs, on[6])
        got = on[5].cpu()
    assert not got.isnan().any(), "read a page no slot owns, or h past a rank"
    # float32 out: every path adds and scales in float32, differing only in summation order
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(T, offs[-1], dtype=torch.bool)  # base rows, and columns of rank-0 slices
    for t, slot in enumerate(token_slots):
        for s in range(n):
            if slot >= 0 and ranks[s, slot] > 0:
                untouched[t, offs[s] : offs[s + 1]] = False
    assert untouched[token_slots.index(1), offs[1] : offs[2]].all()  # slot 1's k and slot 2's v
    assert untouched[token_slots.index(2), offs[2] : offs[3]].all()
    assert torch.equal(got.view(torch.int32)[untouched], base.view(torch.int32)[untouched])
    assert not torch.equal(got[~untouched], base[~untouched])
