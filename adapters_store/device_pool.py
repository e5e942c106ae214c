"""The device tier: a byte budget of rank-row pages, allocated once.

Making an adapter resident copies its A rows and B columns into free pages
and fills its slot's row of the page table, ranks and scales (layout in
kernels/reference.py); nothing is allocated on the hot path.

    pages   0   1   2   3   4   5   6   7   8 ...
    owner  [s1][s1][s1][s1][s0][s0][  ][  ][s2] ...   s0: rank 2, s1: rank 4
    page_table[s0, :2] = [4, 5]; page_table[s1, :4] = [0, 1, 2, 3]

A page is one rank-row for every layer and module, so an adapter of rank r
needs exactly r pages, whatever its rank pattern: a module of lower rank
leaves the tail of its rows zero and its `ranks` entry stops the kernels
there.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable

import torch

from loramux.adapters_store.peft_format import LoraAdapter
from loramux.server.config import LORA_GROUPS, LORA_MODULES, ModelConfig, group_slice_offsets

class PageAllocator:
    """First-fit allocation of rank-row pages, contiguous runs preferred
    (a contiguous run lets the CPU path use a view instead of a gather)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = [True] * num_pages
        self.num_free = num_pages

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"{n} pages wanted, {self.num_free} free")
        start = self._first_run(n)
        if start is not None:
            pages = list(range(start, start + n))
        else:  # fragmented: take any free pages
            pages = [i for i, free in enumerate(self._free) if free][:n]
        for p in pages:
            self._free[p] = False
        self.num_free -= n
        return pages

    def has_run(self, n: int, also_free: frozenset[int] = frozenset()) -> bool:
        """Whether n free pages lie in one run, counting `also_free` as free."""
        return self._first_run(n, also_free) is not None

    def _first_run(self, n: int, also_free: frozenset[int] = frozenset()) -> int | None:
        """The first page of the first run of n free pages (`also_free` counted free), or None."""
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free or i in also_free else 0
            if run == n:
                return i - n + 1
        return None

    def is_free(self, page: int) -> bool:
        return self._free[page]

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._free[p]:
                raise ValueError(f"page {p} freed twice")
            self._free[p] = True
        self.num_free += len(pages)


def triton_lora_path(device: torch.device | str) -> bool:
    """Whether adapter deltas on `device` run through the Triton kernels: on
    CUDA, or anywhere with LORAMUX_TRITON=1 (on a CPU under TRITON_INTERPRET,
    how the tests check that path end to end); else the torch CPU path. The
    one place this is decided: the pool's layout and dtype and the model's
    LoRA backend (server/model/lora_backend.py) follow it."""
    return torch.device(device).type == "cuda" or os.environ.get("LORAMUX_TRITON") == "1"


def pool_cpu_ops(model):
    """The compiled CPU ops (kernels/cpu_ext.py) for the pool of a model on a
    CPU, where they build; else None."""
    if triton_lora_path(model.device) or model.device.type != "cpu":
        return None
    from loramux.kernels.cpu_ext import cpu_ops
    from loramux.server.model.loader import cache_root

    return cpu_ops(cache_root())


def lora_pool_dtype(model) -> torch.dtype:
    """The model's dtype for the Triton kernels. The CPU path computes
    adapter deltas in float32 (kernels/cpu.py); its compiled op reads bf16
    weights too, so a bf16 model's pool is bf16 where that op builds (half
    the bytes a decode step streams for its adapters), else float32."""
    if triton_lora_path(model.device):
        return model.dtype
    if model.dtype == torch.bfloat16 and pool_cpu_ops(model) is not None:
        return torch.bfloat16
    return torch.float32


def page_bytes(cfg: ModelConfig, dtype: torch.dtype, cpu_path: bool = False) -> int:
    """Bytes of one rank-row page: one row of A for every module of every
    layer, and of B^T (the Triton layout) or of the CPU path's block-diagonal
    B (see below)."""
    per_layer = sum(cfg.module_shape(m)[1] for m in LORA_MODULES)  # A
    for lo, n in LORA_GROUPS.values():
        out_total = sum(cfg.module_shape(m)[0] for m in LORA_MODULES[lo : lo + n])
        per_layer += n * out_total if cpu_path else out_total  # B_block, or B^T
    return per_layer * cfg.num_layers * torch.empty((), dtype=dtype).element_size()


class DeviceLoraPool:
    """The device tier: per layer and projection group,

        a_pages[l][g]: [P, n, in]        physical storage, page-major, so the n
                                         slices' rows of one rank index are adjacent
        a[l][g]:       [n, P, in]        the same memory seen as the kernels' layout
        b[l][g]:       [P, out_total]    B^T, for the Triton kernels (kernels/reference.py)

    On a CPU, the pool keeps instead b_block[l][g]: [P, n, out_total], the
    scaled B rows of slice s in that slice's columns and zeros elsewhere, and
    per slot the views cpu_views[slot][l][g] = (A^T, B_block) built once at
    load, so that the torch path (CpuLoraBackend, server/model/lora_backend.py)
    computes one adapter's delta for a whole group in two matmuls:

        h = x @ a_pages[pages].view(r*n, in).T          # [t, r*n]
        out += h @ b_block[pages].view(r*n, out_total)  # scale and slice routing folded in

    which costs n times the B memory and saves a Python-level loop over
    slices on the per-token path, where op overhead dominates on a CPU.
    Only the diagonal blocks of b_block are ever written, so the others stay
    zero from allocation on.

    DoRA: per slot, layer and group a row scale (float32, one per output column)

        dora_scale[l][g]: [slots + 1, out_total]   m / ||W0 + s·B·A||_row in the columns
                                                   of a DoRA module, 1.0 elsewhere; the
                                                   last row (num_slots) is all 1.0, for
                                                   tokens with no adapter

    computed once when the adapter is written. That needs the base weights:
    the constructor's `base_weights(layer, group)` gives the model's fused
    [out_total, in] weight (AdapterPool.for_model passes model.base_weight);
    a pool built without it refuses DoRA adapters. Serving a DoRA token then
    costs one elementwise multiply of its output row: y = scale ⊙ (W0 x + s·B·A x).
    `is_dora[slot]` says whether a slot holds a DoRA adapter; batches with
    none skip the multiply.

    Bookkeeping (`reserve`, `unload`) and copying (`write`) are separate so
    that AdapterPool can copy outside its lock: a reserved slot is read by
    no step until AdapterPool publishes it.
    """

    def __init__(self, cfg: ModelConfig, budget_bytes: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device="cpu",
                 base_weights: Callable[[int, str], torch.Tensor] | None = None, ops=None):
        """ops: the compiled CPU ops (kernels/cpu_ext.py); a CPU pool given them
        writes an adapter with one op per layer and group (pool_write_group),
        else with torch's copies (the Triton layout always does)."""
        self.cfg = cfg
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.cpu_path = not triton_lora_path(device)
        self.page_bytes = page_bytes(cfg, dtype, self.cpu_path)
        self.num_pages = budget_bytes // self.page_bytes
        if self.num_pages < max_rank:
            raise ValueError(
                f"adapter pool budget {budget_bytes} B holds {self.num_pages} rank-rows; "
                f"at least max_lora_rank={max_rank} are needed"
            )
        self.pages = PageAllocator(self.num_pages)
        self.ops = ops if self.cpu_path else None
        # each group's slice boundaries in its fused output (what the compiled ops take)
        self.slice_offsets = {g: list(offs) for g, offs in group_slice_offsets(cfg).items()}
        # the compiled write's stand-in for a module an adapter leaves out: A and B with no rows
        self._no_rows = {shape: torch.empty(shape) for m in LORA_MODULES
                         for out_f, in_f in [cfg.module_shape(m)] for shape in ((0, in_f), (out_f, 0))}
        P = self.num_pages
        self.a_pages: list[dict[str, torch.Tensor]] = []
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.b_block: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            a_pages, a, b, b_block = {}, {}, {}, {}
            for group, (lo, n) in LORA_GROUPS.items():
                mods = LORA_MODULES[lo : lo + n]
                in_f = cfg.module_shape(mods[0])[1]
                out_total = sum(cfg.module_shape(m)[0] for m in mods)
                a_pages[group] = torch.zeros(P, n, in_f, dtype=dtype, device=device)
                a[group] = a_pages[group].permute(1, 0, 2)
                if self.cpu_path:
                    b_block[group] = torch.zeros(P, n, out_total, dtype=dtype, device=device)
                else:
                    b[group] = torch.zeros(P, out_total, dtype=dtype, device=device)
            self.a_pages.append(a_pages)
            self.a.append(a)
            self.b.append(b)
            self.b_block.append(b_block)
        self.dora_scale: list[dict[str, torch.Tensor]] = [
            {g: torch.ones(num_slots + 1, sum(cfg.module_shape(m)[0] for m in LORA_MODULES[lo : lo + n]),
                           dtype=torch.float32, device=device)
             for g, (lo, n) in LORA_GROUPS.items()}
            for _ in range(cfg.num_layers)]
        self.is_dora = [False] * num_slots
        # slots whose dora_scale rows may hold other values than 1.0 (a DoRA adapter was written there)
        self._scaled_rows: set[int] = set()
        self.base_weights = base_weights
        self.page_table = torch.zeros(num_slots, max_rank, dtype=torch.int32, device=device)
        self.ranks = torch.zeros(cfg.num_layers, len(LORA_MODULES), num_slots, dtype=torch.int32, device=device)
        self.scales = torch.zeros(cfg.num_layers, len(LORA_MODULES), num_slots, dtype=torch.float32, device=device)
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_pages: dict[int, list[int]] = {}
        # On a CPU: per slot, per layer, per group, the (A^T, B_block) views
        # the torch path multiplies by; built once at load, read every step.
        self.cpu_views: dict[int, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def fits(self, rank: int) -> bool:
        return bool(self._free_slots) and rank <= self.pages.num_free

    def pages_of(self, slot: int) -> list[int]:
        return self._slot_pages[slot]

    def reserve(self, rank: int) -> int:
        """A free slot with `rank` free pages; bookkeeping only."""
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} is above max_lora_rank {self.max_rank}")
        if not self._free_slots:
            raise MemoryError("no free adapter slot")
        pages = self.pages.allocate(rank)
        slot = self._free_slots.pop()
        self._slot_pages[slot] = pages
        return slot

    def unload(self, slot: int) -> None:
        """Give the slot and its pages back; bookkeeping only (the next
        `write` to them overwrites what is left)."""
        self.pages.free(self._slot_pages.pop(slot))
        self.cpu_views.pop(slot, None)
        self.is_dora[slot] = False
        self._free_slots.append(slot)

    def load(self, adapter: LoraAdapter) -> int:
        """Copy an adapter into free pages; returns its slot."""
        slot = self.reserve(adapter.rank)
        try:
            self.write(slot, adapter)
        except BaseException:
            self.unload(slot)
            raise
        return slot

    def write(self, slot: int, adapter: LoraAdapter, stream=None) -> None:
        """Copy the adapter into the slot's pages, its page-table row, ranks
        and scales. Touches nothing but that slot's memory (and, on a CUDA
        `stream`, waits for the copies before returning)."""
        pages = self._slot_pages[slot]
        r, p0 = len(pages), pages[0]
        # the pages' index where they are not one run (an index_put then; a run is written in place)
        idx = None if pages == list(range(p0, p0 + r)) else torch.tensor(pages, device=self.page_table.device)
        # [layer][module] as lists, one tensor each at the end (an item assignment per module costs more)
        ranks = [[0] * len(LORA_MODULES) for _ in range(self.cfg.num_layers)]
        scales = [[0.0] * len(LORA_MODULES) for _ in range(self.cfg.num_layers)]
        if adapter.use_dora and self.base_weights is None:
            raise RuntimeError("a DoRA adapter needs the base weights: build the pool with "
                               "base_weights=model.base_weight")
        self.is_dora[slot] = False  # no step reads the slot while it is written
        # the slot's scale rows are 1.0 unless a DoRA adapter was written there (120 fills
        # saved on a plain adapter's load); marked before writing, so that a failed write stays marked
        refill = slot in self._scaled_rows or adapter.use_dora
        if adapter.use_dora:
            self._scaled_rows.add(slot)
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for layer in range(self.cfg.num_layers):
                for group, (lo, n) in LORA_GROUPS.items():
                    # per slice: (its module's weights or None, its columns in the group's output)
                    slices = []
                    dora_row = None
                    if refill:
                        dora_row = self.dora_scale[layer][group][slot]
                        dora_row.fill_(1.0)
                    for s, (col, end) in enumerate(itertools.pairwise(self.slice_offsets[group])):
                        w = adapter.modules.get((layer, LORA_MODULES[lo + s]))
                        w = w if w is not None and w.rank else None
                        slices.append((w, slice(col, end)))
                        if w is not None:
                            ranks[layer][lo + s] = w.rank
                            scales[layer][lo + s] = w.scale
                            if w.magnitude is not None:  # a DoRA adapter: refill is set
                                dora_row[col:end] = w.dora_scale(self.base_weights(layer, group)[col:end])
                    if self.ops is not None:
                        self._write_compiled(layer, group, pages, slices)
                    else:
                        self._write_torch(layer, group, pages, idx, slices)
            row = torch.zeros(self.max_rank, dtype=torch.int32)
            row[:r] = torch.tensor(pages, dtype=torch.int32)
            self.page_table[slot].copy_(row, non_blocking=stream is not None)
            self.ranks[:, :, slot].copy_(torch.tensor(ranks, dtype=torch.int32))
            self.scales[:, :, slot].copy_(torch.tensor(scales, dtype=torch.float32))
        if stream is not None:
            stream.synchronize()
        if self.cpu_path:
            self.cpu_views[slot] = self._cpu_views(pages)
        self.is_dora[slot] = adapter.use_dora
        if not adapter.use_dora:
            self._scaled_rows.discard(slot)  # every row refilled with 1.0 above

    def _write_compiled(self, layer: int, group: str, pages: list[int], slices) -> None:
        """One layer and group of `write` through the compiled op (a CPU pool)."""
        a_src, b_src, scale_of = [], [], []
        in_f = self.a_pages[layer][group].shape[2]
        for w, cols in slices:
            if w is None:  # a module the adapter leaves out: A and B with no rows
                a_src.append(self._no_rows[0, in_f])
                b_src.append(self._no_rows[cols.stop - cols.start, 0])
                scale_of.append(0.0)
            else:
                a_src.append(w.a)
                b_src.append(w.b)
                scale_of.append(w.scale)
        self.ops.pool_write_group(self.a_pages[layer][group], self.b_block[layer][group], pages, a_src, b_src,
                                  scale_of, self.slice_offsets[group])

    def _write_torch(self, layer: int, group: str, pages: list[int], idx, slices) -> None:
        """One layer and group of `write` in torch's copies (the Triton layout, or no compiled ops)."""
        r, p0 = len(pages), pages[0]

        def put(t: torch.Tensor, lo: int, hi: int, rest: tuple, value, scale: float = 1.0) -> None:
            # t[pages[lo:hi]][rest] = value * scale: written in place when the pages are a run
            # (one op, no temporary), else an index_put
            if idx is not None:
                t[(idx[lo:hi],) + rest] = (value * scale if scale != 1.0 else value).to(t.dtype) \
                    if isinstance(value, torch.Tensor) else value
                return
            view = t[(slice(p0 + lo, p0 + hi),) + rest]
            if not isinstance(value, torch.Tensor):
                view.fill_(value)
            elif scale != 1.0:
                torch.mul(value, scale, out=view)
            else:
                view.copy_(value)

        a_pages, b_pool = self.a_pages[layer][group], self.b[layer].get(group)
        b_block = self.b_block[layer].get(group)
        for s, (w, cols) in enumerate(slices):
            k = 0 if w is None else w.rank
            if k:
                put(a_pages, 0, k, (s,), w.a)
                if b_pool is not None:
                    put(b_pool, 0, k, (cols,), w.b.T)
                else:
                    put(b_block, 0, k, (s, cols), w.b.T, w.scale)
            if k < r:  # rows past this module's rank: zero
                put(a_pages, k, r, (s,), 0.0)
                if b_pool is not None:
                    put(b_pool, k, r, (cols,), 0.0)
                else:
                    put(b_block, k, r, (s, cols), 0.0)

    def _cpu_views(self, pages: list[int]):
        r = len(pages)
        contiguous = pages == list(range(pages[0], pages[0] + r))
        at = slice(pages[0], pages[0] + r) if contiguous else torch.tensor(pages)  # a gather copies; rare
        views = []
        for layer in range(self.cfg.num_layers):
            per_group = {}
            for group, (lo, n) in LORA_GROUPS.items():
                a = self.a_pages[layer][group][at]  # [r, n, in]
                b = self.b_block[layer][group][at]  # [r, n, out_total]
                per_group[group] = (a.reshape(r * n, -1).T, b.reshape(r * n, -1))
            views.append(per_group)
        return views
