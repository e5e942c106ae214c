"""Float32 torch definitions of the LoRA ops; every other implementation is
tested against these.

Weight layout (shared with adapters_store/pool.py and kernels/sgmv.py)
--------------------------------------------------------------------
Adapter weights live in one pool of *pages*; a page holds ONE rank-row of a
LoRA matrix, so adapters of rank 4 and rank 64 share a pool with no padding
to a maximum rank (S-LoRA's unified paging). For a projection group with
`n` slices (q,k,v -> n=3; gate,up -> n=2; o or down -> n=1):

    a_pool:     [n, P, in]       page p of slice s holds row p of that slice's A
    b_pool:     [P, out_total]   page p holds row p of B^T for every slice,
                                 slice s in columns off[s]:off[s+1]
    page_table: [num_slots, R]   int32, the pages of each adapter slot, in rank order
    ranks:      [n, num_slots]   int32, rank of slot's adapter in slice s (0: not targeted)
    scales:     [n, num_slots]   float32, alpha/r (or alpha/sqrt(r) for rsLoRA)

Worked example: slot 0 holds a rank-2 adapter in pages [5, 1]; slot 1 a
rank-4 adapter in pages [0, 2, 3, 4]. Then page_table[0, :2] = [5, 1],
page_table[1, :4] = [0, 2, 3, 4]; A_q of slot 0 is a_pool[0, [5, 1]] ([2, in])
and B_q of slot 0 is b_pool[[5, 1], off[0]:off[1]].T ([out_q, 2]). Pages need
not be contiguous or ordered; ranks may differ per slice (PEFT rank_pattern),
a slice beyond its rank simply stops early.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .segments import Segments


def lora_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    seg: Segments,
) -> torch.Tensor:
    """h[s, t, :r] = x[t] @ a_pool[s, page_table[slot(t), :r]].T, r = ranks[s, slot(t)].

    x: [T, in], a_pool: [n, P, in] -> h: [n, T, R] in x.dtype. Entries past a
    token's rank, and rows of tokens with no adapter, are zero here; other
    implementations may leave them unspecified (expand never reads them).
    """
    n = a_pool.shape[0]
    h = torch.zeros(n, x.shape[0], page_table.shape[1], dtype=torch.float32, device=x.device)
    for start, length, slot in seg.with_adapter():
        xs = x[start : start + length].float()
        for s in range(n):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            a = a_pool[s, page_table[slot, :r].long()].float()  # [r, in]
            h[s, start : start + length, :r] = xs @ a.T
    return h.to(x.dtype)


def lora_expand(
    h: torch.Tensor,
    b_pool: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg: Segments,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    dora_scale: torch.Tensor | None = None,
) -> None:
    """out[t, off[s]:off[s+1]] += scales[s, slot] * h[s, t, :r] @ b_pool[pages[:r], off[s]:off[s+1]].

    h: [n, T, R], b_pool: [P, out_total], out: [T, out_total] updated in place;
    rows of tokens with no adapter are not touched. With dora_scale
    ([slots, out_total] float32, DoRA's m / ||W0 + s·B·A||_row, 1.0 for plain
    modules) each adapter token's row then becomes out[t] * dora_scale[slot(t)],
    the columns of slices of rank 0 excepted:
    out[t, cols(s)] = dora_scale[slot, cols(s)] * (out[t, cols(s)] + delta) for r_s > 0.
    """
    n = h.shape[0]
    for start, length, slot in seg.with_adapter():
        for s in range(n):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            b = b_pool[page_table[slot, :r].long(), lo:hi].float()  # [r, out_s]
            delta = h[s, start : start + length, :r].float() @ b * float(scales[s, slot])
            rows = out[start : start + length, lo:hi]
            new = rows.float() + delta
            if dora_scale is not None:
                new = new * dora_scale[slot, lo:hi].float()
            rows.copy_(new.to(out.dtype))


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """out[b, h] = softmax(q[b, h] @ K[b, h // G].T * scale) @ V[b, h // G], G = H // KV.

    The paged-KV layout is kernels/paged_attention.py's: token t of sequence b
    is in slot block_table[b, t // block_size] * block_size + t % block_size.
    q: [B, H, D], k_cache/v_cache: [num_slots, KV, D] -> out: [B, H, D] float32,
    by gathering each sequence's slots and one plain float32 softmax.
    """
    batch, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(batch):
        pos = torch.arange(int(ctx_lens[b]), device=q.device)
        slots = block_table[b, pos // block_size].long() * block_size + pos % block_size  # [L]
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[b].float(), k) * scale, dim=-1)  # [H, L]
        out[b] = torch.einsum("hl,lhd->hd", probs, v)
    return out
