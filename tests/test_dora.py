"""DoRA adapters served in mixed batches, against transformers + PEFT."""
from __future__ import annotations

import pytest
import torch

from loramux.adapters_store.device_pool import DeviceLoraPool
from loramux.adapters_store.pool import AdapterPool
from loramux.server.model.runner import ModelRunner, SeqChunk
from loramux.adapters_store.peft_format import load_peft_adapter
from helpers.lora_paths import forbid_other_lora_path
from helpers.tiny import VOCAB, build, make_adapter, make_dora_adapter, make_model, peft_model

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
@pytest.mark.parametrize("dora_setup, path", [("llama", "torch"), ("llama", "triton"), ("qwen2", "torch")],
                         indirect=["dora_setup"])
def test_mixed_dora_lora_base_batch_equals_peft(dora_setup, path, monkeypatch):
    kind, base_dir, paths = dora_setup
    monkeypatch.setenv("LORAMUX_TRITON", "1" if path == "triton" else "0")
    cfg, model, kv = build(base_dir)
    # DoRA's row scales are computed from the base weights when an adapter is written
    pool = AdapterPool(DeviceLoraPool(cfg, 32 * 2**20, 8, 64, torch.float32, base_weights=model.base_weight))
    runner = ModelRunner.for_pool(model, kv, pool.device)
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
        torch.testing.assert_close(logits[k], want, atol=1e-3, rtol=1e-3,
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
        ref = peft_model(base_dir, paths[name] if name else None)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert out.token_ids == want.tolist(), name


def test_dora_needs_base_weights(dora_setup):
    _, base_dir, paths = dora_setup
    cfg, _, _ = build(base_dir)
    pool = DeviceLoraPool(cfg, 8 * 2**20, 4, 64, torch.float32)
    with pytest.raises(RuntimeError, match="base weights"):
        pool.load(load_peft_adapter(paths["dora-qv"], cfg, 64))
    assert pool.num_free_slots == 4


def test_folder_loader_reads_magnitudes_back(dora_setup):
    from loramux.adapters_store.sources import AdapterSource

    _, base_dir, paths = dora_setup
    cfg, _, _ = build(base_dir)
    adapter = load_peft_adapter(paths["dora-rs16"], cfg, 64)
    back = AdapterSource.from_folder(paths["dora-rs16"], adapter, cfg, 64).load()
    assert back.digest == adapter.digest and back.nbytes == adapter.nbytes
    for k, ml in adapter.modules.items():
        torch.testing.assert_close(back.modules[k].magnitude, ml.magnitude, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_expand_with_dora_scale_equals_reference(impl):
    """The expand epilogue: adapter rows (and only written columns) times dora_scale[slot]."""
    from loramux.kernels import cpu, make_segments, reference

    gen = torch.Generator().manual_seed(7)
    n, P, R, slots, offs = 3, 70, 16, 4, (0, 24, 32, 48)
    token_slots = [2, 2, -1, 0, 0, 0, 3, -1, 1]
    seg = make_segments(token_slots)
    T = len(token_slots)
    b_pool = torch.randn(P, offs[-1], generator=gen)
    page_table = torch.randperm(P, generator=gen)[: slots * R].view(slots, R).int()
    ranks = torch.tensor([[4, 8, 16, 2], [4, 0, 16, 2], [4, 8, 0, 2]], dtype=torch.int32)
    scales = torch.rand(n, slots, generator=gen) + 0.5
    dora = torch.ones(slots, offs[-1])
    dora[0] = torch.rand(offs[-1], generator=gen) + 0.5
    dora[2, : offs[2]] = torch.rand(offs[2], generator=gen) + 0.5  # slot 2's v slice has rank 0: scale 1
    h = torch.randn(n, T, R, generator=gen)
    base = torch.randn(T, offs[-1], generator=gen)
    want = base.clone()
    reference.lora_expand(h, b_pool, page_table, ranks, scales, seg, want, offs, dora)
    got = base.clone()
    if impl == "cpu":
        cpu.lora_expand(h, b_pool, page_table, ranks, scales, seg, got, offs, dora)
    else:
        from loramux.kernels import sgmv

        sgmv.lora_expand(h, b_pool, page_table, ranks, scales, seg, got, offs, dora)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[[2, 7]], base[[2, 7]])  # base rows untouched
