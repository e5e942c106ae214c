"""The compiled CPU ops (kernels/csrc/cpu_ops.cpp) against the float32
references, and the fallback when they cannot be built."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels import cpu, make_segments, reference
from loramux.kernels.cpu_ext import cpu_ops, cpu_ops_error
from loramux.server.model.loader import cache_root
from test_kernels_cpu import pool_and_views, reference_delta


@pytest.fixture(scope="module")
def ops():
    built = cpu_ops(cache_root())
    assert built is not None, f"the compiled CPU ops must build on this machine: {cpu_ops_error()}"
    return built


def paged_case(B, H, KV, D, block_size, lens, dtype, seed=0):
    """A cache whose pages are scattered, every row outside a context NaN
    (an op that reads one shows it), and table entries past a sequence's
    blocks pointing at a NaN block."""
    g = torch.Generator().manual_seed(seed)
    per = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(per) + 2
    order = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0: the poison block
    k = torch.full((num_blocks * block_size, KV, D), float("nan"), dtype=dtype)
    v = k.clone()
    table = torch.zeros(B, max(per), dtype=torch.long)
    used = 0
    for b, n in enumerate(lens):
        blocks = order[used : used + per[b]]
        used += per[b]
        table[b, : per[b]] = blocks
        pos = torch.arange(n)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        k[slots] = torch.randn(n, KV, D, generator=g).to(dtype)
        v[slots] = torch.randn(n, KV, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, k, v, table, torch.tensor(lens, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 8, 64), (32, 8, 128), (4, 1, 40)], ids=str)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("batch", ["few", "many"])
def test_paged_decode_attention_equals_reference(ops, dtype, heads, block_size, batch):
    H, KV, D = heads
    lens = [1, block_size, block_size + 1, 2 * block_size, 37, 129, 5]  # odd batch, block edges
    if batch == "many":  # enough sequences that a work item takes all of one's kv heads (cpu_ops.cpp)
        lens = (lens * (4 * torch.get_num_threads() // len(lens) + 1))[: 4 * torch.get_num_threads() + 1]
    q, k, v, table, ctx = paged_case(len(lens), H, KV, D, block_size, lens, dtype)
    got = ops.paged_decode_attention(q, k, v, table, ctx, block_size, D ** -0.5)
    want = reference.paged_decode_attention_ref(q, k, v, table, ctx, block_size, D ** -0.5)
    assert got.dtype == dtype and not got.isnan().any(), "read a row outside a context"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # float32 math rounded once: within one bf16 ulp of the float32 result
        torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=2**-7)


@pytest.mark.parametrize("sharpness", [8.0, 60.0])
def test_paged_decode_attention_peaked_softmax(ops, sharpness):
    """Scores far apart: the op's own exp (cpu_ops.cpp, exp_lanes) over the whole range a softmax
    shifted by its max sees, down to where exp underflows (about -87)."""
    lens = [3, 17, 64, 129]
    q, k, v, table, ctx = paged_case(len(lens), 8, 2, 64, 16, lens, torch.float32, seed=3)
    got = ops.paged_decode_attention(q * sharpness, k, v, table, ctx, 16, 64 ** -0.5)
    want = reference.paged_decode_attention_ref(q * sharpness, k, v, table, ctx, 16, 64 ** -0.5)
    # a score's float32 rounding, times the sharpness, moves its weight: the bound grows with it
    torch.testing.assert_close(got, want, atol=1e-6 * sharpness, rtol=1e-5)


def test_paged_decode_attention_rejects_bad_input(ops):
    q, k, v, table, ctx = paged_case(2, 4, 2, 16, 4, [3, 5], torch.float32)
    with pytest.raises(RuntimeError, match="outside the block table"):
        ops.paged_decode_attention(q, k, v, table, torch.tensor([3, 99]), 4, 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(q, k, v, table.int(), ctx, 4, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.paged_decode_attention(q.bfloat16(), k, v, table, ctx, 4, 0.25)


def dora_rows(tokens, lo, hi, out_total, gen):
    """A DoRA scale table as the pool keeps it (a row per slot, then the all-ones row for base
    tokens) and the row of each token lo..hi-1."""
    slots = max(tokens) + 1
    table = torch.rand(slots + 1, out_total, generator=gen) + 0.5
    table[slots] = 1.0
    rows = torch.tensor([slot if slot != -1 else slots for slot in tokens[lo:hi]], dtype=torch.long)
    return table, rows


# mixed ranks (4, 2, 8 and a scattered 4), base rows between, short segments and a long one
PAGES = {0: [0, 1, 2, 3], 1: [8, 9], 2: [12, 13, 14, 15, 16, 17, 18, 19], 3: [20, 22, 21, 30]}
TOKENS = [2, 2, -1, 0, 1, 1, 1, -1, -1, 3, 3, 0] + [1] * 70 + [-1]


@pytest.mark.parametrize("inn", [8, 40, 576])  # under, not a multiple of, and many times the op's 16 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_apply_equals_reference(ops, dtype, inn):
    a_pages, b, b_block, page_table, ranks, scales, offs, views = pool_and_views(PAGES, inn=inn, seed=inn)
    seg = make_segments(TOKENS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(TOKENS), inn, generator=gen).to(dtype)
    base = torch.randn(len(TOKENS), b.shape[1], generator=gen).to(dtype)
    work = [(s, s + n, *views[slot]) for s, n, slot in seg.with_adapter()]
    got = base.clone()
    cpu.apply_lora_compiled(ops, x, got, cpu.CompiledWork.of(work, ops), None, 3, offs)
    want = base.float() + reference_delta(x.float(), TOKENS, a_pages, b, page_table, ranks, scales, offs)
    base_rows = [t for t, slot in enumerate(TOKENS) if slot == -1]
    assert torch.equal(got[base_rows], base[base_rows]), "a base row changed"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:  # short segments: float32 sums rounded once; the long one: torch's bf16 GEMMs
        short = [t for t in range(12) if TOKENS[t] != -1]
        torch.testing.assert_close(got[short].float(), want[short], atol=1e-2, rtol=2**-7)
        delta, want_delta = got.float() - base.float(), want - base.float()
        assert ((delta - want_delta).norm() / want_delta.norm()) < 1e-2


# segments of whole tiles, several tiles and a partial last one (4, 9, 63 tokens: all under
# LONG_SEGMENT, so the op takes them), beside lone tokens; slice widths of a block of four 16-lane
# chunks, a chunk and a rest (88), of whole chunks and a rest (24, 20)
TILED_TOKENS = [0] * 4 + [-1] + [1] * 9 + [2] + [3] * 63 + [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_apply_over_tiles_of_tokens_equals_reference(ops, dtype):
    a_pages, b, b_block, page_table, ranks, scales, offs, views = pool_and_views(PAGES, inn=40, widths=(88, 24, 20),
                                                                                 seed=5)
    seg = make_segments(TILED_TOKENS)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(TILED_TOKENS), 40, generator=gen).to(dtype)
    base = torch.randn(len(TILED_TOKENS), b.shape[1], generator=gen).to(dtype)
    work = [(s, s + n, *views[slot]) for s, n, slot in seg.with_adapter()]
    cw = cpu.CompiledWork.of(work)
    assert not cw.long
    got = base.clone()
    cpu.apply_lora_compiled(ops, x, got, cw, None, 3, offs)
    want = base.float() + reference_delta(x.float(), TILED_TOKENS, a_pages, b, page_table, ranks, scales, offs)
    assert torch.equal(got[4], base[4]), "the base row changed"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:  # float32 sums rounded once
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_apply_reads_a_bf16_pool(ops, dtype, dora):
    """A bf16 pool (what a bf16 model gets where the compiled op serves): the
    op's result equals the torch path's float32 math over the same bf16
    values, mixed ranks, a scattered slot, base rows and a long segment included."""
    a_pages, b, b_block, page_table, ranks, scales, offs, _ = pool_and_views(PAGES, inn=40, seed=3)
    a16, b16 = a_pages.bfloat16(), b_block.bfloat16()
    views16 = {slot: (a16[pg].reshape(len(pg) * 3, 40).T, b16[pg].reshape(len(pg) * 3, -1)) for slot, pg in PAGES.items()}
    tokens = TOKENS[:12] if dora else TOKENS  # DoRA with a long segment takes the torch path whole
    seg = make_segments(tokens)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(len(tokens), 40, generator=gen).to(dtype)
    base = torch.randn(len(tokens), b.shape[1], generator=gen).to(dtype)
    work = [(s, s + n, *views16[slot]) for s, n, slot in seg.with_adapter()]
    scaled, gathered = None, ()
    if dora:
        table, rows = dora_rows(tokens, 3, 11, b.shape[1], gen)
        scaled, gathered = (3, 11, table, rows), [(3, 11, table[rows])]
    got, want = base.clone(), base.clone()
    cpu.apply_lora_compiled(ops, x, got, cpu.CompiledWork.of(work, ops), scaled, 3, offs)
    cpu.apply_lora(x, want, [(s, e, a.float(), bb.float()) for s, e, a, bb in work], gathered)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got, want, **tol)
    base_rows = [t for t, slot in enumerate(tokens) if slot == -1]
    assert torch.equal(got[base_rows], base[base_rows])


# long segments only (lora_apply_long's): a partial last block of tokens (70), several blocks
# (100), one whole (64); ranks 3 (odd: a padded pair), 2, 8 and a scattered 4; slices wider than
# a block of columns with a rest (200, 72) and narrower (24)
LONG_PAGES = {0: [0, 1, 2], 1: [8, 9], 2: [12, 13, 14, 15, 16, 17, 18, 19], 3: [20, 22, 21, 30]}
LONG_TOKENS = [0] * 70 + [-1] * 3 + [1] * 100 + [3] * 64 + [2] * 80


# rank 16: h converted to bf16 16 lanes at a time, A^T transposed in whole 16 x 16 blocks of words
RANK16_PAGES = {0: list(range(16)), 1: list(range(40, 56))}
RANK16_TOKENS = [0] * 70 + [1] * 65  # long without ops too (LONG_SEGMENT)


def bf16_long_case(seed, pages=LONG_PAGES, tokens=LONG_TOKENS):
    a_pages, b, b_block, page_table, ranks, scales, offs, _ = pool_and_views(pages, inn=40, widths=(200, 72, 24),
                                                                             seed=seed)
    a16, b16 = a_pages.bfloat16(), b_block.bfloat16()
    views = {slot: (a16[pg].reshape(len(pg) * 3, 40).T, b16[pg].reshape(len(pg) * 3, -1))
             for slot, pg in pages.items()}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(tokens), 40, generator=gen).bfloat16()
    base = torch.randn(len(tokens), b.shape[1], generator=gen).bfloat16()
    work = [(s, s + n, *views[slot]) for s, n, slot in make_segments(tokens).with_adapter()]
    return x, base, work, offs


def bf16_h_reference(x, base, work):
    """base + (bf16(x @ A^T) @ B) in float32, per segment."""
    want = base.float()
    for start, end, a_t, b_block in work:
        h = (x[start:end].float() @ a_t.float()).bfloat16().float()
        want[start:end] += h @ b_block.float()
    return want


@pytest.mark.skipif(not cpu.brgemm_serves(cpu_ops(cache_root()), torch.bfloat16), reason="this CPU has no bf16 brgemm (AMX)")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_apply_long_equals_float32_math_over_bf16_h(ops, dora):
    """Each output is base + (bf16(x @ A^T) @ B) in float32, times its DoRA
    row's scales where it has one, rounded once: the shrink's sums rounded to
    bf16 as torch's bf16 shrink leaves them, the rest exact; base rows untouched."""
    x, base, work, offs = bf16_long_case(seed=6)
    cw = cpu.CompiledWork.of(work)
    assert len(cw.long) == len(work)
    lo, hi = 40, 250  # from inside the first segment to inside the last: base rows and unscaled tokens on both sides
    table, rows = dora_rows(LONG_TOKENS, lo, hi, base.shape[1], torch.Generator().manual_seed(9)) if dora \
        else (None, None)
    got = base.clone()
    ops.lora_apply_long(x, got, *cw.long_args, 3, offs, table, rows, lo)
    want = bf16_h_reference(x, base, work)
    if dora:
        want[lo:hi] *= table[rows]
    torch.testing.assert_close(got.float(), want.bfloat16().float(), atol=1e-3, rtol=2**-7)
    assert torch.equal(got[70:73], base[70:73])


@pytest.mark.skipif(not cpu.brgemm_serves(cpu_ops(cache_root()), torch.bfloat16), reason="this CPU has no bf16 brgemm (AMX)")
def test_lora_apply_long_at_rank_16_equals_float32_math_over_bf16_h(ops):
    x, base, work, offs = bf16_long_case(seed=11, pages=RANK16_PAGES, tokens=RANK16_TOKENS)
    cw = cpu.CompiledWork.of(work)
    assert len(cw.long) == 2 and all(a_t.shape[1] == 48 for _, _, a_t, _ in work)
    got = base.clone()
    ops.lora_apply_long(x, got, *cw.long_args, 3, offs, None, None, 0)
    torch.testing.assert_close(got.float(), bf16_h_reference(x, base, work).bfloat16().float(), atol=1e-3, rtol=2**-7)


@pytest.mark.skipif(not cpu.brgemm_serves(cpu_ops(cache_root()), torch.bfloat16), reason="this CPU has no bf16 brgemm (AMX)")
def test_long_bf16_segments_take_lora_apply_long_and_agree_with_the_torch_path(ops):
    x, base, work, offs = bf16_long_case(seed=7)
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    got, want = base.clone(), base.clone()
    cpu.apply_lora_compiled(Spy(), x, got, cpu.CompiledWork.of(work, ops), None, 3, offs)
    assert "lora_apply_long" in calls and "lora_apply" not in calls
    # with DoRA rows too (the torch path takes long segments with DoRA whole where brgemm does not serve)
    table, rows = dora_rows(LONG_TOKENS, 0, len(LONG_TOKENS), base.shape[1], torch.Generator().manual_seed(3))
    calls.clear()
    cpu.apply_lora_compiled(Spy(), x, base.clone(), cpu.CompiledWork.of(work, ops), (0, len(LONG_TOKENS), table, rows), 3,
                            offs)
    assert "lora_apply_long" in calls
    cpu.apply_lora(x, want, work)  # torch's bf16 GEMMs
    delta, want_delta = got.float() - base.float(), want.float() - base.float()
    assert ((delta - want_delta).norm() / want_delta.norm()) < 1e-2


def test_lora_apply_long_rejects_bad_input(ops):
    if not cpu.brgemm_serves(ops, torch.bfloat16):
        with pytest.raises(RuntimeError, match="no bf16 brgemm"):
            ops.lora_apply_long(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16),
                                [], [], [], [], 1, [0, 4], None, None, 0)
        return
    x, base, work, offs = bf16_long_case(seed=8)
    args = cpu.CompiledWork.of(work).long_args
    with pytest.raises(RuntimeError, match="bf16"):
        ops.lora_apply_long(x.float(), base.float(), *args, 3, offs, None, None, 0)
    with pytest.raises(RuntimeError, match="outside the batch"):
        ops.lora_apply_long(x[:100], base[:100], *args, 3, offs, None, None, 0)
    with pytest.raises(RuntimeError, match="slice offsets"):
        ops.lora_apply_long(x, base, *args, 3, offs[:-1] + [offs[-1] - 1], None, None, 0)
    table, rows = dora_rows(LONG_TOKENS, 0, 10, base.shape[1], torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="scaled tokens outside the batch"):
        ops.lora_apply_long(x, base, *args, 3, offs, table, rows, len(LONG_TOKENS) - 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_apply_with_dora_rows_equals_the_torch_path(ops, dtype):
    """DoRA: (base + delta) * row scale, over tokens lo..hi-1; tokens outside stay unscaled."""
    a_pages, b, b_block, page_table, ranks, scales, offs, views = pool_and_views(PAGES, inn=40)
    tokens = TOKENS[:12]  # decode-like: every segment short
    seg = make_segments(tokens)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(tokens), 40, generator=gen).to(dtype)
    base = torch.randn(len(tokens), b.shape[1], generator=gen).to(dtype)
    work = [(s, s + n, *views[slot]) for s, n, slot in seg.with_adapter()]
    lo, hi = 3, 11  # token 11 has an adapter but no row scale
    table, rows = dora_rows(tokens, lo, hi, b.shape[1], gen)
    got, want = base.clone(), base.clone()
    cpu.apply_lora_compiled(ops, x, got, cpu.CompiledWork.of(work), (lo, hi, table, rows), 3, offs)
    cpu.apply_lora(x, want, work, [(lo, hi, table[rows])])  # the torch path: float32 sums and scales, rounded once
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got, want, **tol)


def test_lora_apply_long_segments_with_dora_take_the_torch_path():
    a_pages, b, b_block, page_table, ranks, scales, offs, views = pool_and_views(PAGES, inn=8)
    seg = make_segments(TOKENS)
    x = torch.randn(len(TOKENS), 8)
    work = [(s, s + n, *views[slot]) for s, n, slot in seg.with_adapter()]
    table, rows = dora_rows(TOKENS, 0, len(TOKENS), b.shape[1], torch.Generator().manual_seed(5))
    called = []

    class Recording:
        def lora_apply(self, *args):
            called.append(args)

    got, want = torch.zeros(len(TOKENS), b.shape[1]), torch.zeros(len(TOKENS), b.shape[1])
    cpu.apply_lora_compiled(Recording(), x, got, cpu.CompiledWork.of(work), (0, len(TOKENS), table, rows), 3, offs)
    cpu.apply_lora(x, want, work, [(0, len(TOKENS), table[rows])])
    assert not called and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [8, 40, 64, 576, 1536 + 24], ids=str)  # under, between and over its lane blocks
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_small_linear_equals_float64(ops, dtype, k, rows):
    g = torch.Generator().manual_seed(k + rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(67, k, generator=g).to(dtype)  # 67 output rows: not a multiple of its chunks
    bias = torch.randn(67, generator=g).to(dtype)
    for b in (None, bias):
        got = ops.small_linear(x, w, b)
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        assert got.dtype == dtype and got.shape == (rows, 67)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
        else:  # float32 math rounded once: within a bf16 ulp of the exact result
            torch.testing.assert_close(got.double(), want, atol=1e-3 * k**0.5, rtol=2**-7)
    # a non-contiguous x (a column slice, as the model's split activations are) reads the right values
    wide = torch.randn(rows, 2 * k, generator=g).to(dtype)
    torch.testing.assert_close(ops.small_linear(wide[:, k:], w, None), ops.small_linear(wide[:, k:].contiguous(), w, None),
                               atol=0, rtol=0)


def test_small_linear_rejects_bad_input(ops):
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        ops.small_linear(torch.randn(5, 16), w, None)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.small_linear(torch.randn(1, 16).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="x \\[M,K\\]"):
        ops.small_linear(torch.randn(1, 15), w, None)


def test_model_gemms_take_small_linear_for_few_rows_only(ops, monkeypatch):
    from loramux.server.model.base_linear import SMALL_LINEAR_ROWS, compiled_linear

    calls = []

    class Recording:
        def small_linear(self, x, w, b):
            calls.append(x.shape[0])
            return ops.small_linear(x, w, b)

    linear = compiled_linear(Recording())
    w = torch.randn(32, 16)
    for m in (1, SMALL_LINEAR_ROWS, SMALL_LINEAR_ROWS + 1, 33):
        x = torch.randn(m, 16)
        torch.testing.assert_close(linear(x, w, None), torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    assert calls == [1, SMALL_LINEAR_ROWS]


LAYER_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _same_as_torch(got, want):
    """bf16 and fp16: bit for bit (the op rounds where torch's ops round); float32: within an ulp
    or two (summation order, fused multiply-adds)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=3e-7)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=str)
@pytest.mark.parametrize("n", [576, 40, 7])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_rms_norm_equals_the_torch_path(ops, dtype, n, rows):
    from loramux.server.model.layer_ops import rms_norm

    g = torch.Generator().manual_seed(n + rows)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    _same_as_torch(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 40, 8])
@pytest.mark.parametrize("tokens", [1, 17])
def test_rope_equals_the_torch_path_in_place(ops, dtype, d, tokens):
    """On the q and k heads of a fused qkv row (rows (H + 2 KV) * D apart, as the model calls it);
    the v heads after them are left as they were."""
    from loramux.server.model.layer_ops import rope

    H, KV = 6, 2
    g = torch.Generator().manual_seed(d + tokens)
    qkv = torch.randn(tokens, (H + 2 * KV) * d, generator=g).to(dtype)
    freqs = torch.arange(tokens).float()[:, None] * 1e4 ** (-torch.arange(0, d, 2).float() / d)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qk = qkv[:, : (H + KV) * d].unflatten(1, (H + KV, d))
    want, v = rope(qk, cos, sin), qkv[:, (H + KV) * d :].clone()
    ops.rope_(qk, cos, sin)
    _same_as_torch(qk, want)
    assert torch.equal(qkv[:, (H + KV) * d :], v)


def test_layer_ops_fall_back_to_torch_where_the_op_does_not_apply(ops):
    """The compiled norm and rotation take their fast path where the op's layout holds, else torch's."""
    from loramux.server.model.layer_ops import compiled_layer_ops, rms_norm, rope

    layer = compiled_layer_ops(ops)
    x = torch.randn(4, 2, 16)[:, 0]  # rows not contiguous
    torch.testing.assert_close(layer.rms_norm(x, torch.ones(16), 1e-5), rms_norm(x, torch.ones(16), 1e-5))
    heads = torch.randn(3, 16, 4).transpose(1, 2)  # heads not D apart
    cos, sin = torch.randn(3, 16), torch.randn(3, 16)
    want = rope(heads, cos, sin)
    torch.testing.assert_close(layer.rope(heads, cos, sin), want)
    with pytest.raises(RuntimeError, match="heads D apart"):
        ops.rope_(heads, cos, sin)


def test_without_a_compiler_the_torch_path_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu_ops(tmp_path) is None
    assert "no C++ compiler" in cpu_ops_error()
    monkeypatch.setenv("LORAMUX_CPU_OPS", "0")
    assert cpu_ops(cache_root()) is None and cpu_ops_error() == "LORAMUX_CPU_OPS=0"
