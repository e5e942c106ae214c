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


def make_problem(popularity: str, num_tokens: int, dtype: torch.dtype, widths=QKV, seed: int = 0) -> Problem:
    rng = random.Random(f"{popularity}-{num_tokens}-{dtype}-{len(widths)}-{seed}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    ordered, starts, lens, run_slots = runs_of(token_slots(popularity, num_tokens, rng), rng)
    n, num_slots = len(widths), max(max(ordered) + 1, 1) + 2  # two slots no token uses

    # Ranks 4..64 in one launch; about 1 (slice, slot) in 6 is not targeted (rank 0).
    ranks = torch.tensor(
        [[RANKS[(slot + 2 * s) % len(RANKS)] if rng.random() > 0.17 else 0 for slot in range(num_slots)]
         for s in range(n)], dtype=torch.int32,
    )
    ranks[0, 0] = RANKS[-1]  # at least one full-rank adapter
    # Each slot owns max-rank-over-slices pages, scattered over a shuffled pool;
    # the table entries past that point at the poison page.
    needed = ranks.max(dim=0).values.tolist()
    num_pages = sum(needed) + 5
    free = list(range(num_pages))
    rng.shuffle(free)
    poison = free.pop()
    page_table = torch.full((num_slots, MAX_RANK), poison, dtype=torch.int32)
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
    return torch.arange(MAX_RANK)[None, None, :] < tok_ranks[:, :, None]


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


@pytest.mark.parametrize("widths", [(56, 56), (72,)], ids=["gate_up", "single"])
@pytest.mark.parametrize("popularity,num_tokens", [("uniform", 7), ("skewed", 133)])
def test_slice_counts(widths, popularity, num_tokens):
    p = make_problem(popularity, num_tokens, torch.float32, widths=widths)
    check_shrink(p, sgmv.lora_shrink, torch.float32)
    check_expand(p, sgmv.lora_expand, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("popularity,num_tokens", [("zipf", 7), ("skewed", 133)])
def test_cpu_path_same_inputs(popularity, num_tokens, dtype):
    p = make_problem(popularity, num_tokens, dtype)
    check_shrink(p, cpu.lora_shrink, dtype)
    check_expand(p, cpu.lora_expand, dtype)


def test_all_base_and_empty_batches():
    p = make_problem("uniform", 7, torch.float32)
    for seg in (
        segments_from_runs([0, 3, 3], [3, 0, 4], [NO_ADAPTER, 1, NO_ADAPTER], 7, device=DEVICE),
        segments_from_runs([0], [0], [0], 0, device=DEVICE),
    ):
        x, out = p.x[: seg.num_tokens], p.out[: seg.num_tokens]
        h = sgmv.lora_shrink(x, p.a_pool, p.page_table, p.ranks, seg)
        assert h.shape == (3, seg.num_tokens, MAX_RANK)
        got = out.clone()
        sgmv.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, seg, got, p.offsets)
        assert torch.equal(bits(got), bits(out))


def test_bad_shapes_are_rejected():
    p = make_problem("uniform", 3, torch.float32)
    with pytest.raises(ValueError):
        sgmv.lora_shrink(p.x[:, :-1], p.a_pool, p.page_table, p.ranks, p.seg)
    with pytest.raises(ValueError):
        sgmv.lora_expand(p.x.new_zeros(3, 3, MAX_RANK), p.b_pool, p.page_table, p.ranks, p.scales, p.seg,
                         p.out, p.offsets[:-1])
