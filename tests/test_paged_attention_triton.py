"""Triton paged decode attention (kernels/paged_attention.py) against a float64
oracle that never sees pages, and the float32 reference (kernels/reference.py).

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernel runs on
CPU tensors; with CUDA the same tests run compiled on the GPU (the `device`
parameter). Imports stay torch, triton, kernels, pytest, like
tests/test_kernels_triton.py, so a bare GPU box can run this file.

Every problem writes each sequence's keys and values contiguously first (the
oracle's input), then scatters them over a shuffled pool of blocks. Every
other cache row is NaN: the rows of a sequence's last block past its context,
and whole poison blocks, which block_table entries past a sequence's blocks
point at (or at block 0, a live block of some sequence). A kernel that reads
anything outside a sequence's context shows up as NaN.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from loramux.kernels import reference  # noqa: E402
from loramux.kernels.paged_attention import paged_decode_attention  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # cpu: under the interpreter
# (rtol, atol). The kernel computes in float32 and rounds once, at the store:
# within one ulp of the output dtype (2**-7 for bf16, 2**-10 for fp16). One,
# not half: the interpreter's float32 -> bf16 cast truncates; CUDA rounds to
# nearest. Outputs are averages of N(0, 1) values, |out| < 3.
TOL = {torch.float32: (0.0, 1e-5), torch.bfloat16: (2**-7, 1e-4), torch.float16: (2**-10, 1e-4)}


@dataclass
class Problem:
    q: torch.Tensor  # [B, H, D]
    k_cache: torch.Tensor  # [num_slots, KV, D]
    v_cache: torch.Tensor  # [num_slots, KV, D]
    block_table: torch.Tensor  # [B, max_blocks]
    ctx_lens: torch.Tensor  # [B]
    block_size: int
    scale: float
    keys: list[torch.Tensor]  # per sequence [L, KV, D], as written (the oracle's input)
    values: list[torch.Tensor]


def make_problem(ctx_lens, heads, kv_heads, head_dim, block_size, dtype, device,
                 index_dtype=torch.int32, seed=0) -> Problem:
    rng = random.Random(f"{ctx_lens}-{heads}-{kv_heads}-{head_dim}-{block_size}-{dtype}-{seed}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    pages = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(pages) + 3  # three poison blocks
    order = list(range(num_blocks))
    rng.shuffle(order)
    poison = order[sum(pages):]
    max_blocks = max(pages) + 2  # every row has garbage entries past its blocks

    slots = num_blocks * block_size
    k_cache = torch.full((slots, kv_heads, head_dim), float("nan"))
    v_cache = torch.full((slots, kv_heads, head_dim), float("nan"))
    table = torch.zeros(len(ctx_lens), max_blocks, dtype=torch.int64)
    keys, values, next_block = [], [], 0
    for b, n in enumerate(ctx_lens):
        blocks = order[next_block : next_block + pages[b]]
        next_block += pages[b]
        table[b, : pages[b]] = torch.tensor(blocks)
        table[b, pages[b] :] = torch.tensor([rng.choice(poison + [0]) for _ in range(max_blocks - pages[b])])
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        where = table[b, pos // block_size] * block_size + pos % block_size
        k_cache[where], v_cache[where] = k.float(), v.float()
        keys.append(k)
        values.append(v)
    # q * 2: scores spread over several units, so the softmax is far from uniform
    q = (2 * torch.randn(len(ctx_lens), heads, head_dim, generator=gen)).to(dtype)
    return Problem(
        q=q.to(device), k_cache=k_cache.to(device=device, dtype=dtype), v_cache=v_cache.to(device=device, dtype=dtype),
        block_table=table.to(device=device, dtype=index_dtype),
        ctx_lens=torch.tensor(ctx_lens, dtype=index_dtype, device=device),
        block_size=block_size, scale=head_dim**-0.5, keys=keys, values=values,
    )


def oracle(p: Problem) -> torch.Tensor:
    """float64 softmax attention over each sequence's keys as written, before paging: [B, H, D]."""
    group = p.q.shape[1] // p.k_cache.shape[1]
    rows = []
    for b, (k, v) in enumerate(zip(p.keys, p.values)):
        k = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", p.q[b].cpu().double(), k) * p.scale
        rows.append(torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(rows)


def run(p: Problem, out=None) -> torch.Tensor:
    return paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.ctx_lens, p.block_size, p.scale,
                                  out=out)


def check(p: Problem, got: torch.Tensor, fp32_atol: float = TOL[torch.float32][1]) -> None:
    """got matches the float64 oracle within TOL, and the float32 reference of the same inputs."""
    assert got.dtype == p.q.dtype and got.shape == p.q.shape
    want = oracle(p)
    rtol, atol = TOL[p.q.dtype] if p.q.dtype != torch.float32 else (0.0, fp32_atol)
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol)
    ref = reference.paged_decode_attention_ref(p.q, p.k_cache, p.v_cache, p.block_table, p.ctx_lens,
                                               p.block_size, p.scale)
    torch.testing.assert_close(ref.cpu().double(), want, rtol=0, atol=fp32_atol)
    torch.testing.assert_close(got.cpu().float(), ref.cpu(), rtol=rtol, atol=atol)


def lens_for(batch: int, block_size: int) -> list[int]:
    """1 token, exactly one and two blocks, one past a block, and a context of several token tiles."""
    lens = [1, block_size, 2 * block_size + 1, 2 * block_size, 150, block_size - 1, 37]
    return lens[:batch] if batch > 1 else [3 * block_size + 5]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,batch", [
    (9, 3, 64, 16, 7),  # SmolLM2-135M: G = 3, padded to 4 heads in the tile
    (9, 3, 64, 8, 3),
    (8, 8, 64, 32, 7),  # MHA: G = 1
    (8, 8, 128, 16, 1),
    (32, 8, 128, 16, 3),  # Llama-3-8B: G = 4
    (32, 8, 128, 32, 1),
    (4, 1, 64, 8, 7),  # MQA
], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(device, heads, kv_heads, head_dim, block_size, batch, dtype):
    p = make_problem(lens_for(batch, block_size), heads, kv_heads, head_dim, block_size, dtype, device)
    check(p, run(p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_context_with_large_scores(device, dtype):
    """Scores up to ~150 (exp overflows float32 past ~88) over many tiles,
    the largest one late in the context: the running max must rescale."""
    p = make_problem([700, 1, 333], 8, 2, 64, 16, dtype, device)
    p.q.mul_(20)
    p.k_cache[p.block_table[0, 40].long() * 16 + 3] *= 3  # token 643 of sequence 0 dominates some heads
    p.keys[0][643] *= 3
    # a float32 score near 150 is off by up to ~150 * 2**-23 = 2e-5 (in the
    # reference too), and so is every probability taken from it, relatively
    check(p, run(p), fp32_atol=5e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_int64_tables_and_head_dim_not_a_power_of_two(device):
    p = make_problem([1, 17, 40], 6, 2, 80, 16, torch.float16, device, index_dtype=torch.int64)
    check(p, run(p))


@pytest.mark.parametrize("device", DEVICES)
def test_garbage_past_the_blocks_does_not_change_the_result(device):
    """Entries of block_table past a sequence's blocks, and cache rows past its
    context, rewritten to other valid values: the output is bit-identical."""
    p = make_problem([5, 16, 33], 9, 3, 64, 16, torch.float32, device)
    first = run(p)
    pages = (p.ctx_lens + p.block_size - 1) // p.block_size
    past = torch.arange(p.block_table.shape[1], device=device)[None, :] >= pages[:, None]
    p.block_table[past] = (p.block_table[past] + 1) % (p.k_cache.shape[0] // p.block_size)
    p.k_cache[p.k_cache.isnan()] = 1e4  # finite now: a read would no longer be NaN but huge
    p.v_cache[p.v_cache.isnan()] = -1e4
    assert torch.equal(run(p), first)
    check(p, first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_argument_and_strided_views(device, dtype):
    """q a view into a fused qkv row, k/v caches the halves of one kv tensor,
    out a strided view that is written in place and returned."""
    p = make_problem([16, 1, 29], 9, 3, 64, 16, dtype, device)
    batch, heads, dim = p.q.shape
    qkv = torch.zeros(batch, heads * dim + 2 * 3 * dim, dtype=dtype, device=device)
    qkv[:, : heads * dim] = p.q.reshape(batch, -1)
    kv = torch.stack([p.k_cache, p.v_cache], dim=1)  # [slots, 2, KV, D]
    q_view, k_view, v_view = qkv[:, : heads * dim].view(batch, heads, dim), kv[:, 0], kv[:, 1]
    assert not (q_view.is_contiguous() or k_view.is_contiguous())
    big = torch.full((batch, heads, 2 * dim), 7.0, dtype=dtype, device=device)
    out = big[:, :, dim:]
    got = paged_decode_attention(q_view, k_view, v_view, p.block_table, p.ctx_lens, p.block_size, p.scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.all(big[:, :, :dim] == 7.0)  # the rest of the buffer untouched
    check(p, out)


@pytest.mark.parametrize("bad,message", [
    ({"q": torch.zeros(3, 9 * 64)}, "disagree"),
    ({"q": torch.zeros(2, 9, 64)}, "block_table must be"),  # batch 2 vs block_table's 3
    ({"k_cache": torch.zeros(48, 3, 32), "v_cache": torch.zeros(48, 3, 32)}, "caches must be"),
    ({"q": torch.zeros(3, 8, 64)}, "multiple of KV"),
    ({"v_cache": torch.zeros(48, 3, 64, dtype=torch.bfloat16)}, "dtypes differ"),
    ({"block_table": torch.zeros(3, 4)}, "block_table must be"),
    ({"ctx_lens": torch.ones(3, dtype=torch.int16)}, "ctx_lens"),
    ({"out": torch.zeros(3, 9, 64, dtype=torch.bfloat16)}, "out must be"),
], ids=["q_rank", "batch", "head_dim", "gqa", "dtype", "table", "lens", "out"])
def test_bad_inputs_are_refused(bad, message):
    args = {"q": torch.zeros(3, 9, 64), "k_cache": torch.zeros(48, 3, 64), "v_cache": torch.zeros(48, 3, 64),
            "block_table": torch.zeros(3, 4, dtype=torch.int32), "ctx_lens": torch.ones(3, dtype=torch.int32)}
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**{**args, **bad}, block_size=16, scale=0.125)
