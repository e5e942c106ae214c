"""Triton SGMV kernels (kernels/sgmv.py), and the CPU path (kernels/cpu.py) on
the same inputs, against the float32 reference (kernels/reference.py).

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on
CPU tensors; with CUDA they run on the GPU. Imports stay torch, triton,
kernels, bench/popularity.py (the standard library only), pytest so that
bench/gpu_check.sh can run this file on a bare GPU box.

Every problem mixes ranks 4..64 (some slices rank 0) in one launch, base-only
tokens (slot -1) whose rows of `out` must stay bit-identical, length-0 runs,
one adapter split over two runs, q/k/v slices of unequal width, and adapter
pages at shuffled pool locations. Pages past a slot's rank point at a poison
page of NaNs, and h is NaN wherever it is unspecified, so a kernel that reads
either shows up as NaN in `out`.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch

from loramux.bench.popularity import choose
from loramux.kernels import cpu, reference, sgmv
from loramux.kernels.segments import NO_ADAPTER, Segments, segments_from_runs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN = 96  # more than one K tile of the prefill shrink, and not a multiple of it
QKV = (40, 24, 24)  # GQA-like: q wider than k and v; tiles straddle slices
RANKS = (4, 8, 16, 24, 32, 64)
MAX_RANK = 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Problem:
    x: torch.Tensor  # [T, IN]
    a_pool: torch.Tensor  # [n, P, IN]
    b_pool: torch.Tensor  # [P, out_total]
    page_table: torch.Tensor  # [slots, R] int32
    ranks: torch.Tensor  # [n, slots] int32
    scales: torch.Tensor  # [n, slots] float32
    seg: Segments
    out: torch.Tensor  # [T, out_total], every third column -0.0
    offsets: list[int]
    token_slots: list[int]  # [T]


# how many slots each popularity spreads tokens over; skewed: slot 0 hot (80 %), a tail of 6 cold ones
SLOTS_OF = {"uniform": 8, "zipf": 12, "skewed": 7}


def token_slots(popularity: str, num_tokens: int, rng: random.Random) -> list[int]:
    """Per-token adapter slot (-1 for about 1 token in 7), drawn by popularity
    (bench/popularity.py; zipf alpha 1.2); distinct: a slot per token."""
    if popularity == "identical":
        slots = [0] * num_tokens
    else:
        n = num_tokens if popularity == "distinct" else SLOTS_OF[popularity]
        slots = choose(popularity, n, num_tokens, rng, zipf_alpha=1.2)
    return [NO_ADAPTER if num_tokens > 1 and rng.random() < 0.15 else s for s in slots]


def runs_of(slots: list[int], rng: random.Random) -> tuple[list[int], list[int], list[int], list[int]]:
    """Order tokens adapter by adapter as the model runner does, split the first
    group in two runs, and insert length-0 runs:

        token slots (ordered)  2 2 2 | -1 | 0 0 | 2 ...
        runs                   [2 2] [] [2] [-1] [0 0] ...
    """
    groups: dict[int, int] = {}
    for s in slots:
        groups[s] = groups.get(s, 0) + 1
    order = list(groups)
    rng.shuffle(order)
    ordered, starts, lens, run_slots = [], [], [], []
    t = 0

    def run(slot, length):
        nonlocal t
        starts.append(t)
        lens.append(length)
        run_slots.append(slot)
        ordered.extend([slot] * length)
        t += length

    for i, slot in enumerate(order):
        count = groups[slot]
        if i == 0 and count >= 2:
            run(slot, count // 2)
            run(slot, 0)
            run(slot, count - count // 2)
        else:
            run(slot, count)
        if i == 1:
            run(NO_ADAPTER, 0)
    run(order[0], 0)
    return ordered, starts, lens, run_slots


def make_problem(popularity: str, num_tokens: int, dtype: torch.dtype, widths=QKV, seed: int = 0,
                 table_width: int = MAX_RANK) -> Problem:
    """table_width: R, the page table's columns (the pool's max rank); ranks are RANKS up to R, and R."""
    width_key = "" if table_width == MAX_RANK else f"-R{table_width}"
    rng = random.Random(f"{popularity}-{num_tokens}-{dtype}-{len(widths)}-{seed}{width_key}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    ordered, starts, lens, run_slots = runs_of(token_slots(popularity, num_tokens, rng), rng)
    n, num_slots = len(widths), max(max(ordered) + 1, 1) + 2  # two slots no token uses

    # Ranks 4..64 in one launch; about 1 (slice, slot) in 6 is not targeted (rank 0).
    choices = sorted({r for r in RANKS if r <= table_width} | {table_width})
    ranks = torch.tensor(
        [[choices[(slot + 2 * s) % len(choices)] if rng.random() > 0.17 else 0 for slot in range(num_slots)]
         for s in range(n)], dtype=torch.int32,
    )
    ranks[0, 0] = table_width  # at least one full-rank adapter
    # Each slot owns max-rank-over-slices pages, scattered over a shuffled pool;
    # the table entries past that point at the poison page.
    needed = ranks.max(dim=0).values.tolist()
    num_pages = sum(needed) + 5
    free = list(range(num_pages))
    rng.shuffle(free)
    poison = free.pop()
    page_table = torch.full((num_slots, table_width), poison, dtype=torch.int32)
    for slot, r in enumerate(needed):
        page_table[slot, :r] = torch.tensor([free.pop() for _ in range(r)], dtype=torch.int32)

    out_total = sum(widths)
    a_pool = torch.randn(n, num_pages, IN, generator=gen) / IN**0.5
    b_pool = torch.randn(num_pages, out_total, generator=gen) / 4
    a_pool[:, poison] = float("nan")
    b_pool[poison] = float("nan")
    # x is a column slice of a wider tensor: rows are not contiguous.
    x = torch.randn(num_tokens, IN + 8, generator=gen)[:, 3 : 3 + IN]
    out = torch.randn(num_tokens, out_total, generator=gen)
    out[:, ::3] = -0.0  # adding 0 to these flips them to +0.0: untouched ones must not change

    def dev(t, dt=None):
        return t.to(device=DEVICE, dtype=dt or t.dtype)

    return Problem(
        x=dev(x, dtype), a_pool=dev(a_pool, dtype), b_pool=dev(b_pool, dtype),
        page_table=dev(page_table), ranks=dev(ranks),
        scales=dev(torch.rand(n, num_slots, generator=gen) + 0.5),
        seg=segments_from_runs(starts, lens, run_slots, num_tokens, device=DEVICE),
        out=dev(out, dtype), offsets=[0, *torch.tensor(widths).cumsum(0).tolist()],
        token_slots=ordered,
    )


def valid_h_mask(p: Problem) -> torch.Tensor:
    """[n, T, R]: the entries of h the ops define (token has an adapter, column < rank)."""
    slots = torch.tensor(p.token_slots, dtype=torch.long)
    ranks = p.ranks.cpu().long()
    tok_ranks = torch.where(slots >= 0, ranks[:, slots.clamp(min=0)], 0)  # [n, T]
    return torch.arange(p.page_table.shape[1])[None, None, :] < tok_ranks[:, :, None]


def untouched_out_mask(p: Problem) -> torch.Tensor:
    """[T, out]: elements expand must leave bit-identical (base rows, rank-0 slices)."""
    mask = torch.ones(len(p.token_slots), p.offsets[-1], dtype=torch.bool)
    ranks = p.ranks.cpu()
    for t, slot in enumerate(p.token_slots):
        if slot != NO_ADAPTER:
            for s in range(len(p.offsets) - 1):
                if ranks[s, slot] > 0:
                    mask[t, p.offsets[s] : p.offsets[s + 1]] = False
    return mask


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise error below TOL relative to the largest reference value."""
    got, want = got.float().cpu(), want.float().cpu()
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-6))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def check_shrink(p: Problem, shrink, dtype) -> None:
    want = reference.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)
    got = shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)
    assert got.shape == want.shape and got.dtype == p.x.dtype
    valid = valid_h_mask(p)
    assert_rel_close(got.cpu()[valid], want.cpu()[valid], dtype)


def check_expand(p: Problem, expand, dtype) -> None:
    h = reference.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)
    h = h.masked_fill(~valid_h_mask(p).to(h.device), float("nan"))  # expand never reads these
    want = p.out.clone()
    reference.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, want, p.offsets)
    got = p.out.clone()
    expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, got, p.offsets)
    assert not got.isnan().any(), "read a page past a rank, or h past a rank"
    assert_rel_close(got, want, dtype)
    same = untouched_out_mask(p)
    assert torch.equal(bits(got)[same], bits(p.out)[same]), "rows without adapter / rank-0 slices changed"


POPULARITY = ["distinct", "uniform", "zipf", "identical", "skewed"]


@pytest.mark.parametrize("num_tokens", [1, 3, 7, 133])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_fp32_popularity_and_batch(popularity, num_tokens):
    p = make_problem(popularity, num_tokens, torch.float32)
    check_shrink(p, sgmv.lora_shrink, torch.float32)
    check_expand(p, sgmv.lora_expand, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("popularity,num_tokens", [("distinct", 7), ("zipf", 133), ("identical", 133)])
def test_half_dtypes(popularity, num_tokens, dtype):
    p = make_problem(popularity, num_tokens, dtype)
    check_shrink(p, sgmv.lora_shrink, dtype)
    check_expand(p, sgmv.lora_expand, dtype)


@pytest.mark.parametrize("widths", [(56, 56), (72,), (32, 16, 16, 24)], ids=["gate_up", "single", "four"])
@pytest.mark.parametrize("popularity,num_tokens", [("uniform", 7), ("skewed", 133)])
def test_slice_counts(widths, popularity, num_tokens):
    # "four": MAX_SLICES slices, the last one's columns come from the kernel's fourth offset pair
    p = make_problem(popularity, num_tokens, torch.float32, widths=widths)
    check_shrink(p, sgmv.lora_shrink, torch.float32)
    check_expand(p, sgmv.lora_expand, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("popularity,num_tokens,table_width",
                         [("uniform", 7, 24), ("uniform", 7, 80), ("skewed", 133, 80)])
def test_page_table_widths(popularity, num_tokens, table_width, impl):
    """R other than 64: a full-width adapter (rank R) beside smaller ranks; 80 is not a multiple
    of the kernels' 16-row rank blocks, 24 is narrower than one 64-row K tile of the expand."""
    p = make_problem(popularity, num_tokens, torch.float32, table_width=table_width)
    assert p.page_table.shape[1] == table_width and int(p.ranks.max()) == table_width
    shrink, expand = (sgmv.lora_shrink, sgmv.lora_expand) if impl == "triton" else (cpu.lora_shrink, cpu.lora_expand)
    check_shrink(p, shrink, torch.float32)
    check_expand(p, expand, torch.float32)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with every stride reversed (a transposed copy, transposed back): no
    dimension has unit stride but the first."""
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("popularity,num_tokens", [("zipf", 7), ("skewed", 133)])
def test_non_contiguous_inputs(popularity, num_tokens, impl):
    """Every operand column-major (x, the pools, page_table, ranks, scales, h, out): the kernels
    must address them through their strides; `out` is updated in place through its view."""
    p = make_problem(popularity, num_tokens, torch.float32)
    shrink, expand = (sgmv.lora_shrink, sgmv.lora_expand) if impl == "triton" else (cpu.lora_shrink, cpu.lora_expand)
    q = dataclasses.replace(p, **{k: column_major(getattr(p, k))
                                  for k in ("x", "a_pool", "b_pool", "page_table", "ranks", "scales")})
    assert q.x.stride(1) != 1 and q.b_pool.stride(1) != 1 and q.page_table.stride(1) != 1
    check_shrink(q, shrink, torch.float32)

    valid = valid_h_mask(p).to(p.x.device)
    h = reference.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg).masked_fill(~valid, float("nan"))
    want = p.out.clone()
    reference.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, want, p.offsets)
    wide = torch.full((p.out.shape[1] + 5, p.out.shape[0]), 7.0, dtype=p.out.dtype, device=p.out.device)
    got = wide[2 : 2 + p.out.shape[1]].T  # [T, out] view: strides (1, T), not dense
    got.copy_(p.out)
    expand(column_major(h), q.b_pool, q.page_table, q.ranks, q.scales, p.seg, got, p.offsets)
    assert_rel_close(got, want, torch.float32)
    same = untouched_out_mask(p)
    assert torch.equal(bits(got)[same], bits(p.out)[same])
    assert (wide[:2] == 7).all() and (wide[2 + p.out.shape[1] :] == 7).all(), "wrote outside the out view"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_fp32", "out_bf16"])
@pytest.mark.parametrize("popularity,num_tokens", [("distinct", 7), ("zipf", 133)])
def test_float32_h_with_bf16_pool(popularity, num_tokens, out_dtype):
    """expand of a float32 h over a bf16 b_pool: h must not be rounded to the pool's dtype, and
    the product must be IEEE float32 (not tf32, which drops h's low bits). bf16 pool values are
    exact in float32, so with a float32 out the kernel and the reference differ only in summation
    order (1e-5); a bf16 out adds one bf16 rounding of the result (TOL[bf16])."""
    p = make_problem(popularity, num_tokens, torch.bfloat16)
    h = reference.lora_shrink(p.x.float(), p.a_pool.float(), p.page_table, p.ranks, p.seg)
    assert h.dtype == torch.float32 and p.b_pool.dtype == torch.bfloat16
    h = h.masked_fill(~valid_h_mask(p).to(h.device), float("nan"))
    base = p.out.to(out_dtype)
    want = base.clone()
    reference.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, want, p.offsets)
    got = base.clone()
    sgmv.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, got, p.offsets)
    assert got.dtype == out_dtype
    assert_rel_close(got, want, out_dtype)
    same = untouched_out_mask(p)
    assert torch.equal(bits(got)[same], bits(base)[same])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("popularity,num_tokens", [("zipf", 7), ("skewed", 133)])
def test_cpu_path_same_inputs(popularity, num_tokens, dtype):
    p = make_problem(popularity, num_tokens, dtype)
    check_shrink(p, cpu.lora_shrink, dtype)
    check_expand(p, cpu.lora_expand, dtype)


# Runs of a 24-token batch: base runs beside adapter runs (one of length 0). "decode": adapter
# runs of 2 tokens, a base run of 17 (longer than any adapter run: its tiles are outside the
# grid's token tiles only if the kernel sizes the grid from adapter runs); "prefill": an
# adapter run of 17 (tl.dot tiles) and base runs in the same launch.
MIXED_RUNS = {
    "decode": ([0, 3, 3, 5, 22], [3, 0, 2, 17, 2], [NO_ADAPTER, 1, 0, NO_ADAPTER, 1]),
    "prefill": ([0, 3, 3, 20, 22], [3, 0, 17, 2, 2], [NO_ADAPTER, 1, 0, NO_ADAPTER, 1]),
}


@pytest.mark.parametrize("runs", list(MIXED_RUNS))
@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_base_rows_untouched_beside_adapter_rows(runs, impl):
    """Base rows stay bit-identical (h is NaN there, so reading it shows) while adapter rows get
    the reference delta; then the same tokens with every run base (an adapter run of length 0
    among them), and an empty batch: out must come back bit for bit."""
    shrink, expand = (sgmv.lora_shrink, sgmv.lora_expand) if impl == "triton" else (cpu.lora_shrink, cpu.lora_expand)
    p = make_problem("uniform", 24, torch.float32)
    starts, lens, slots = MIXED_RUNS[runs]
    token_slots = [slot for n, slot in zip(lens, slots) for _ in range(n)]
    q = dataclasses.replace(p, seg=segments_from_runs(starts, lens, slots, 24, device=DEVICE), token_slots=token_slots)
    check_shrink(q, shrink, torch.float32)
    check_expand(q, expand, torch.float32)  # base rows bit-identical, adapter rows equal the reference
    h = reference.lora_shrink(q.x, q.a_pool, q.page_table, q.ranks, q.seg)
    got = q.out.clone()
    expand(h, q.b_pool, q.page_table, q.ranks, q.scales, q.seg, got, q.offsets)
    adapter_rows = torch.tensor([s != NO_ADAPTER for s in token_slots])
    assert (got.cpu() != q.out.cpu())[adapter_rows].any(dim=1).all(), "an adapter row was left unchanged"

    for seg in (
        segments_from_runs([0, 3, 3], [3, 0, 21], [NO_ADAPTER, 1, NO_ADAPTER], 24, device=DEVICE),
        segments_from_runs([0], [0], [0], 0, device=DEVICE),
    ):
        x, out = p.x[: seg.num_tokens], p.out[: seg.num_tokens]
        h = shrink(x, p.a_pool, p.page_table, p.ranks, seg)
        assert h.shape == (3, seg.num_tokens, MAX_RANK)
        got = out.clone()
        expand(h.fill_(float("nan")), p.b_pool, p.page_table, p.ranks, p.scales, seg, got, p.offsets)
        assert torch.equal(bits(got), bits(out))


def _bad_calls(p: Problem) -> dict[str, tuple[str, object]]:
    """Each ValueError branch of sgmv.lora_shrink / lora_expand (and _check_tables through
    both): name -> (the message it must raise, a call that breaks exactly that condition)."""
    h = reference.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)  # [3, 3, R], valid
    meta = torch.device("meta")  # a device other than the activations'

    def shrink(**change):
        args = dict(x=p.x, a_pool=p.a_pool, page_table=p.page_table, ranks=p.ranks, seg=p.seg) | change
        return lambda: sgmv.lora_shrink(**args)

    def expand(**change):
        args = dict(h=h, b_pool=p.b_pool, page_table=p.page_table, ranks=p.ranks, scales=p.scales, seg=p.seg,
                    out=p.out.clone(), slice_offsets=p.offsets, dora_scale=None) | change
        return lambda: sgmv.lora_expand(**args)

    slots, out_total = p.page_table.shape[0], p.offsets[-1]
    dora = torch.ones(slots, out_total, device=p.out.device)
    disagree, offsets, tables = r"x \[T, in\] and a_pool", "slice_offsets", "page_table must be int32"
    return {
        "shrink-x-1d": (disagree, shrink(x=p.x[0])),
        "shrink-a-2d": (disagree, shrink(a_pool=p.a_pool[0])),
        "shrink-in-features": (disagree, shrink(x=p.x[:, :-1])),
        "shrink-a-dtype": ("must match x", shrink(a_pool=p.a_pool.double())),
        "shrink-a-device": ("must match x", shrink(a_pool=p.a_pool.to(meta))),
        "shrink-tokens": ("segments cover 3 tokens, x has 2", shrink(x=p.x[:2])),
        "shrink-table-dtype": (tables, shrink(page_table=p.page_table.long())),
        "shrink-table-1d": (tables, shrink(page_table=p.page_table[0])),
        "shrink-ranks-shape": ("ranks must be", shrink(ranks=p.ranks[:2])),
        "shrink-table-device": ("on the device of the activations", shrink(page_table=p.page_table.to(meta))),
        "shrink-ranks-device": ("on the device of the activations", shrink(ranks=p.ranks.to(meta))),
        "expand-h-2d": ("disagree", expand(h=h[0])),
        "expand-b-1d": ("disagree", expand(b_pool=p.b_pool[0])),
        "expand-out-1d": ("disagree", expand(out=p.out[0].clone())),
        "expand-h-tokens": ("disagree", expand(h=h[:, :2])),
        "expand-offsets-count": (offsets, expand(slice_offsets=p.offsets[:-1])),
        "expand-too-many-slices": (offsets, expand(h=h[[0, 1, 2, 0, 1]], slice_offsets=[0, 8, 16, 24, 32, 40])),
        "expand-offsets-descending": (offsets, expand(slice_offsets=[0, 40, 30, out_total])),
        "expand-offsets-negative": (offsets, expand(slice_offsets=[-1, 40, 64, out_total])),
        "expand-offsets-past-out": (offsets, expand(out=p.out[:, :-1].clone())),
        "expand-offsets-past-b": (offsets, expand(b_pool=p.b_pool[:, :-1])),
        "expand-h-rank-columns": ("rank columns", expand(h=h[:, :, :32])),
        "expand-tokens": ("segments cover 3 tokens, out has 2", expand(h=h[:, :2], out=p.out[:2].clone())),
        "expand-scales-shape": ("scales must be shaped", expand(scales=p.scales[:2])),
        "expand-scales-device": ("scales must be shaped", expand(scales=p.scales.to(meta))),
        "expand-b-device": ("scales must be shaped", expand(b_pool=p.b_pool.to(meta))),
        "expand-table-dtype": (tables, expand(page_table=p.page_table.long())),
        "expand-table-1d": (tables, expand(page_table=p.page_table[0])),
        "expand-ranks-shape": ("ranks must be", expand(ranks=p.ranks[:2], scales=p.scales[:2])),
        "expand-table-device": ("on the device of the activations", expand(page_table=p.page_table.to(meta))),
        "expand-dora-1d": ("dora_scale must be", expand(dora_scale=dora[0])),
        "expand-dora-slots": ("dora_scale must be", expand(dora_scale=dora[:-1])),
        "expand-dora-columns": ("dora_scale must be", expand(dora_scale=dora[:, :-1])),
        "expand-dora-device": ("dora_scale must be", expand(dora_scale=dora.to(meta))),
    }


BAD_CASES = [  # the keys of _bad_calls
    "shrink-x-1d", "shrink-a-2d", "shrink-in-features", "shrink-a-dtype", "shrink-a-device", "shrink-tokens",
    "shrink-table-dtype", "shrink-table-1d", "shrink-ranks-shape", "shrink-table-device", "shrink-ranks-device",
    "expand-h-2d", "expand-b-1d", "expand-out-1d", "expand-h-tokens", "expand-offsets-count",
    "expand-too-many-slices", "expand-offsets-descending", "expand-offsets-negative", "expand-offsets-past-out",
    "expand-offsets-past-b", "expand-h-rank-columns", "expand-tokens", "expand-scales-shape",
    "expand-scales-device", "expand-b-device", "expand-table-dtype", "expand-table-1d", "expand-ranks-shape",
    "expand-table-device", "expand-dora-1d", "expand-dora-slots", "expand-dora-columns", "expand-dora-device",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_are_rejected(case):
    p = make_problem("uniform", 3, torch.float32)
    calls = _bad_calls(p)
    assert sorted(calls) == sorted(BAD_CASES)
    message, call = calls[case]
    with pytest.raises(ValueError, match=message):
        call()
