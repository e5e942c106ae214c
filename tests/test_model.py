"""The model runner against transformers + PEFT on tiny random checkpoints."""
from __future__ import annotations

import dataclasses
from itertools import accumulate

import pytest
import torch

from loramux.adapters_store.device_pool import DeviceLoraPool
from loramux.adapters_store.pool import AdapterPool
from loramux.server.config import ModelConfig
from loramux.server.model.lora_backend import CpuLoraBackend, TritonLoraBackend, select_lora_backend
from loramux.server.model.runner import ModelRunner, SeqChunk
from loramux.adapters_store.peft_format import load_peft_adapter
from helpers.lora_paths import PATHS, assert_runner_path, choose_path, forbid_other_lora_path
from helpers.tiny import TRITON_DEVICE, VOCAB, build, hf_config, make_adapter, make_model, peft_greedy, peft_model

# The Triton path runs on CUDA where there is one, else under the interpreter on CPU tensors
# (tests/conftest.py sets TRITON_INTERPRET only without CUDA): its tests put the model there.

# (name, options) of the adapters in the mixed batch: ranks 4..64, rsLoRA,
# rank/alpha patterns, a q,v-only adapter.
ADAPTERS = [
    ("r4", dict(r=4, alpha=8)),
    ("r8-qv", dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"))),
    ("r16-rs", dict(r=16, alpha=32, use_rslora=True)),
    ("r32-pattern", dict(r=32, alpha=16, rank_pattern={"v_proj": 8, "down_proj": 12},
                         alpha_pattern={"o_proj": 64, "q_proj": 4})),
    ("r64", dict(r=64, alpha=32)),
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "tied", "llama3"])
def test_prefill_logits_equal_transformers(tmp_path, kind):
    ref = make_model(tmp_path, kind)
    cfg, model, kv = build(tmp_path)
    runner = ModelRunner(model, kv)
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    chunks = [SeqChunk(row.tolist(), 0, [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]) for i, row in enumerate(ids)]
    batch = dataclasses.replace(runner.prepare(chunks), logits_index=torch.arange(ids.numel()))
    got = model.forward(batch, kv).view(3, 13, -1)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_paged_decode_equals_full_recompute(tmp_path, path, monkeypatch):
    # path: the decode attention (server/model/attention.py) that reads the paged cache
    make_model(tmp_path, "llama")
    choose_path(monkeypatch, path)
    cfg, model, kv = build(tmp_path, block_size=4, device=TRITON_DEVICE if path == "triton" else "cpu")
    assert model.decode_attention_path == path
    runner = ModelRunner(model, kv)
    seq = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    blocks = [17, 3, 40, 8, 22]  # scattered on purpose
    full = runner.prepare([SeqChunk(seq, 0, blocks)])
    full = model.forward(dataclasses.replace(full, logits_index=torch.arange(len(seq))), kv)
    # prefill 5 tokens, a chunk of 4 more, then one token at a time across block
    # boundaries, next to an unrelated sequence that shares every step
    steps = [runner.run([SeqChunk(seq[:5], 0, blocks)]), runner.run([SeqChunk(seq[5:9], 5, blocks)])]
    other = [1, 2, 3]
    for pos in range(9, len(seq)):
        logits = runner.run([SeqChunk(other, 0, [60]), SeqChunk([seq[pos]], pos, blocks)])
        steps.append(logits[1:])
    got = torch.cat(steps)
    torch.testing.assert_close(got.cpu(), full[[4, 8] + list(range(9, len(seq)))].cpu(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mixed_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_model(root / "base", "llama")
    paths = {}
    for i, (name, opts) in enumerate(ADAPTERS):
        opts = dict(opts)
        paths[name] = make_adapter(root / "base", root / name, seed=i, **opts)
    return root / "base", paths


@pytest.mark.parametrize("env, device, want", [
    (None, "cpu", CpuLoraBackend), ("0", "cpu", CpuLoraBackend), ("1", "cpu", TritonLoraBackend),
    ("0", "cuda", TritonLoraBackend), (None, "cuda", TritonLoraBackend),
])
def test_lora_backend_is_chosen_from_device_and_env(env, device, want, mixed_setup, monkeypatch):
    # Triton on CUDA; LORAMUX_TRITON=1 forces it on any device (the kernels
    # then run under TRITON_INTERPRET on a CPU); the torch path otherwise.
    # Then the chosen backend applies an adapter: the kernels of the path its
    # type names run (the other path's raise) and the delta equals the reference.
    from loramux.kernels import cpu, make_segments, sgmv

    monkeypatch.setenv("LORAMUX_CPU_OPS", "0")  # the CPU backend's torch ops (the compiled ones: PATHS' tests)
    if env is None:
        monkeypatch.delenv("LORAMUX_TRITON", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_TRITON", env)
    base_dir, paths = mixed_setup
    cfg = ModelConfig.from_hf(hf_config())
    if (device == "cuda" and not torch.cuda.is_available()) or (want is TritonLoraBackend and device != TRITON_DEVICE):
        # no CUDA here; or Triton on CPU tensors with CUDA present, so not under the interpreter
        pool = DeviceLoraPool(cfg, 8 * 2**20, 2, 16, torch.float32)
        assert type(select_lora_backend(pool, torch.device(device))) is want
        return
    pool = DeviceLoraPool(cfg, 8 * 2**20, 2, 16, torch.float32, device=device)
    backend = select_lora_backend(pool, torch.device(device))
    assert type(backend) is want
    adapter = load_peft_adapter(paths["r4"], cfg, 16)
    slot = pool.load(adapter)
    ran = []
    for module, name in [(cpu, "apply_lora"), (sgmv, "lora_shrink"), (sgmv, "lora_expand")]:
        def record(*args, _f=getattr(module, name), _name=f"{module.__name__}.{name}", **kwargs):
            ran.append(_name)
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, record)
    forbid_other_lora_path(monkeypatch, "triton" if want is TritonLoraBackend else "torch")

    gen = torch.Generator().manual_seed(8)
    seg = make_segments([-1, slot, slot, -1], device)
    # the qkv group of layer 0: slices q, k, v (rows 0..2 of pool.ranks)
    offsets = list(accumulate((cfg.module_shape(m)[0] for m in ("q_proj", "k_proj", "v_proj")), initial=0))
    x = torch.randn(4, cfg.hidden_size, generator=gen).to(device)
    base = torch.randn(4, offsets[-1], generator=gen).to(device)
    got = base.clone()
    backend.apply(x, got, 0, "qkv", backend.prepare(seg))
    assert ran == (["loramux.kernels.sgmv.lora_shrink", "loramux.kernels.sgmv.lora_expand"]
                   if want is TritonLoraBackend else ["loramux.kernels.cpu.apply_lora"])
    want_out = base.clone()  # rows 1 and 2 get each slice's scale * B (A x), from the adapter itself
    for s, m in enumerate(("q_proj", "k_proj", "v_proj")):
        w = adapter.modules[(0, m)]
        want_out[1:3, offsets[s]:offsets[s + 1]] += w.scale * (x[1:3].cpu() @ w.a.T @ w.b.T).to(device)
    torch.testing.assert_close(got, want_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[[0, 3]], base[[0, 3]]) and not torch.equal(got[1:3], base[1:3])


def _pool(cfg, paths, dtype=torch.float32, device="cpu"):
    """A pool holding the adapters of `paths`, and their digests by name."""
    pool = AdapterPool(DeviceLoraPool(cfg, 64 * 2**20, 16, 64, dtype, device=device))
    return pool, {name: pool.add(load_peft_adapter(path, cfg, 64, name=name)) for name, path in paths.items()}


@pytest.mark.parametrize("path", PATHS)
def test_mixed_adapter_batch_equals_peft(mixed_setup, path, monkeypatch):
    # "triton": the model's LoRA ops run the Triton kernels (kernels/sgmv.py),
    # on CUDA, or under the interpreter on a CPU (tests/conftest.py)
    choose_path(monkeypatch, path)
    base_dir, paths = mixed_setup
    device = TRITON_DEVICE if path == "triton" else "cpu"
    cfg, model, kv = build(base_dir, device=device)
    pool, digests = _pool(cfg, paths, device=device)
    by_digest = pool.make_resident(list(digests.values()))
    slots = {n: by_digest[digests[n]] for n in paths}
    runner = ModelRunner.for_pool(model, kv, pool.device)
    assert_runner_path(runner, path)
    forbid_other_lora_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(3)
    # rows: every adapter twice (different lengths) plus base rows in between
    rows = [(None, 7)] + [(n, 5 + i) for i, n in enumerate(paths)] + [(None, 4)] + [(n, 9) for n in paths]
    prompts = [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _, length in rows]
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0] or ""))  # each adapter contiguous
    chunks, next_block = [], 0
    for i in order:
        chunks.append(SeqChunk(prompts[i], 0, list(range(next_block, next_block + 3)),
                               slots.get(rows[i][0], -1)))
        next_block += 3
    logits = runner.run(chunks)
    for k, i in enumerate(order):
        name = rows[i][0]
        ref = peft_model(base_dir, paths[name] if name else None)
        with torch.no_grad():
            want = ref(torch.tensor([prompts[i]])).logits[0, -1]
        torch.testing.assert_close(logits[k].cpu(), want, atol=1e-4, rtol=1e-4, msg=f"row for {name}")


def test_greedy_generation_mixed_batch_equals_peft(mixed_setup):
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    base_dir, paths = mixed_setup
    llm = LLM(model=str(base_dir), dtype="float32", adapters=paths, block_size=4,
              kv_cache_bytes=8 * 2**20, adapter_pool_bytes=64 * 2**20)
    gen = torch.Generator().manual_seed(4)
    names = [None] + list(paths) + list(paths)
    prompts = [torch.randint(0, VOCAB, (3 + 2 * i,), generator=gen).tolist() for i in range(len(names))]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, names)
    for name, prompt, out in zip(names, prompts, outs):
        assert out.token_ids == peft_greedy(base_dir, paths[name] if name else None, prompt, 24), f"adapter {name}"
        assert out.finish_reason == "length"


@pytest.mark.slow  # ~15-20 s: the Triton interpreter on CPU
def test_triton_greedy_decode_mixed_batch_equals_peft(mixed_setup, monkeypatch):
    """Decode steps (one token per sequence, Triton's broadcast-sum tiles) through the engine on
    the Triton path, LoRA and base rows mixed, against transformers + PEFT greedy decoding."""
    from loramux.kernels import sgmv
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    base_dir, paths = mixed_setup
    monkeypatch.setenv("LORAMUX_TRITON", "1")
    # the interpreter's cost grows with the grid (slices x rank blocks of 16 x segments): three
    # adapters, a pool of rank 16 at most, a few tokens
    names = ["r16-rs", None, "r4", "r8-qv"]
    llm = LLM(model=str(base_dir), dtype="float32", device=TRITON_DEVICE, adapters={n: paths[n] for n in names if n},
              block_size=4, kv_cache_bytes=4 * 2**20, adapter_pool_bytes=16 * 2**20, max_lora_rank=16)
    forbid_other_lora_path(monkeypatch, "triton")
    tiles = []  # (longest adapter run, tl.dot tiles?) of every Triton launch
    tile = sgmv._token_tile
    monkeypatch.setattr(sgmv, "_token_tile", lambda n: tiles.append((n, tile(n)[0])) or tile(n))
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (3 + i,), generator=gen).tolist() for i in range(len(names))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), names)
    assert (1, False) in tiles, "no decode step ran through the Triton kernels' decode tiles"
    for name, prompt, out in zip(names, prompts, outs):
        assert out.token_ids == peft_greedy(base_dir, paths[name] if name else None, prompt, 3), f"adapter {name}"


@pytest.mark.parametrize("path", PATHS)
def test_the_pool_layout_and_dtype_follow_the_backend_choice(mixed_setup, monkeypatch, path):
    """A bf16 model: the Triton kernels (LORAMUX_TRITON=1) need the pool in the model's dtype, and
    the compiled CPU op reads bf16 rows (half the bytes a decode step streams); the torch path keeps
    it in float32, its math's dtype. All follow one decision (device_pool.lora_pool_dtype); a pool in
    float32 under Triton once failed every adapter request."""
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    base_dir, paths = mixed_setup
    choose_path(monkeypatch, path)
    llm = LLM(model=str(base_dir), dtype="bfloat16", device=TRITON_DEVICE if path == "triton" else "cpu",
              adapters={"r4": paths["r4"]}, block_size=4, kv_cache_bytes=4 * 2**20,
              adapter_pool_bytes=16 * 2**20, max_lora_rank=16)
    pool, backend = llm.engine.adapters.device, llm.engine.runner.lora
    assert type(backend) is (TritonLoraBackend if path == "triton" else CpuLoraBackend)
    assert pool.a[0]["qkv"].dtype == (torch.float32 if path == "torch" else torch.bfloat16)
    assert pool.cpu_path == (path != "triton")
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), ["r4"])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2
