"""The CPU path (kernels/cpu.py) against the float32 reference."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels import make_segments, reference
from loramux.kernels.cpu import apply_lora


def pool_and_views(pages: dict[int, list[int]], n=3, P=64, inn=8, widths=(8, 4, 4), seed=0):
    """A page-major pool ([P, n, in] A, block-diagonal scaled B), its
    reference layout, and the per-slot views the CPU path multiplies by."""
    g = torch.Generator().manual_seed(seed)
    out_total = sum(widths)
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + w)
    a_pages = torch.randn(P, n, inn, generator=g)
    b = torch.randn(P, out_total, generator=g)
    num_slots = max(pages) + 1
    scales = torch.rand(n, num_slots, generator=g) + 0.5
    b_block = torch.zeros(P, n, out_total)
    for slot, pg in pages.items():
        for s in range(n):
            b_block[pg, s, offs[s]:offs[s + 1]] = b[pg, offs[s]:offs[s + 1]] * scales[s, slot]
    page_table = torch.zeros(num_slots, max(8, *map(len, pages.values())), dtype=torch.int32)
    ranks = torch.zeros(n, num_slots, dtype=torch.int32)
    for slot, pg in pages.items():
        page_table[slot, : len(pg)] = torch.tensor(pg)
        ranks[:, slot] = len(pg)
    views = {slot: (a_pages[pg].reshape(len(pg) * n, inn).T, b_block[pg].reshape(len(pg) * n, out_total))
             for slot, pg in pages.items()}
    return a_pages, b, b_block, page_table, ranks, scales, offs, views


def reference_delta(x, token_slots, a_pages, b, page_table, ranks, scales, offs):
    seg = make_segments(token_slots)
    out = torch.zeros(x.shape[0], b.shape[1])
    h = reference.lora_shrink(x, a_pages.permute(1, 0, 2), page_table, ranks, seg)
    reference.lora_expand(h, b, page_table, ranks, scales, seg, out, offs)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_equals_reference(dtype):
    # contiguous and scattered pages
    pages = {0: [0, 1, 2, 3], 1: [8, 9, 10, 11], 2: [12, 13, 14, 15], 3: [16, 17, 18, 19], 4: [20, 22, 21, 30]}
    a_pages, b, b_block, page_table, ranks, scales, offs, views = pool_and_views(pages)
    token_slots = [2, 2, -1, 0, 1, 1, 1, -1, -1, 4, 4, 3] + [0] * 70  # the last one a long segment
    seg = make_segments(token_slots)
    x = torch.randn(len(token_slots), 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    active = seg.with_adapter()
    base = torch.randn(len(token_slots), b.shape[1]).to(dtype)
    out = base.clone()
    apply_lora(x, out, [(s, s + n, *views[slot]) for s, n, slot in active])
    want = base.float() + reference_delta(x.float(), token_slots, a_pages, b, page_table, ranks, scales, offs)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    else:  # bf16 carries ~3 significant digits: compare the whole delta by its norm
        delta, want_delta = out.float() - base.float(), want - base.float()
        assert ((delta - want_delta).norm() / want_delta.norm()) < 1e-2
    # rows with no adapter are left exactly as they were
    assert torch.equal(out[[2, 7, 8]], base[[2, 7, 8]])
