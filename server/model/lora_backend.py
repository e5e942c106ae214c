"""The LoRA backend seam: how a step's adapter deltas are added, chosen once.

The model runner picks a backend when it is built and the model calls it
for every LoRA-able linear; nobody asks which device it is on again:

    backend = select_lora_backend(pool, device)   # once (ModelRunner.for_pool)
    batch = backend.prepare(seg)                  # once per step, from the runner's segments
    backend.apply(x, out, layer, group, batch)    # per layer and group (qkv, o, gate_up, down)

`apply`, for every segment (i, j, slot) with an adapter and each slice s of
the group (rows of base tokens, slot -1, are left as the base GEMM wrote them):

    out[i:j, off[s]:off[s+1]] += scale[s, slot] * (x[i:j] @ A_s(slot).T) @ B_s(slot).T
    out[i:j] *= dora_scale[layer][group][slot]      then, for a DoRA slot only

Both backends read one DeviceLoraPool (adapters_store/device_pool.py) and
differ in the views of it they use:

    CpuLoraBackend     kernels/cpu.py: per segment two matmuls over the pool's
                       cpu_views (A^T, block-diagonal scaled B), float32 math
    TritonLoraBackend  kernels/sgmv.py: one shrink and one expand launch per
                       group over a, b and the page table, DoRA in the epilogue
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from loramux.adapters_store.device_pool import DeviceLoraPool, triton_lora_path
from loramux.kernels import NO_ADAPTER, Segments, cpu
from loramux.kernels.cpu_ext import cpu_ops, cpu_ops_error
from loramux.server.config import LORA_GROUPS, group_slice_offsets
from loramux.server.model.loader import cache_root

log = logging.getLogger("loramux.model")


class LoraBatch(Protocol):
    """A backend's metadata for one step, built once by `prepare` and read by
    every layer; the weights stay in the pool."""

    @property
    def dora(self) -> bool:
        """Some token of the step has a DoRA adapter. Its row scale multiplies
        the base output too, so the model adds a linear's bias after `apply`."""
        ...


class LoraBackend(Protocol):
    def prepare(self, seg: Segments) -> LoraBatch:
        """The step's metadata; seg: the step's segments, [T] tokens, some with an adapter slot."""
        ...

    def apply(self, x: torch.Tensor, out: torch.Tensor, layer: int, group: str, batch: LoraBatch) -> None:
        """out += the LoRA delta of one layer and group, DoRA row scales included (module doc), in place.
        x: [T, in]; out: [T, out_total], the group's fused base output."""
        ...


def select_lora_backend(pool: DeviceLoraPool, device: torch.device | str) -> LoraBackend:
    """The backend for activations on `device`, picked once: Triton on CUDA,
    or on any device with LORAMUX_TRITON=1 (with TRITON_INTERPRET=1 the
    kernels then run on a CPU; the tests use it to check the model end to end
    on the Triton path); the CPU path otherwise, through the compiled op
    where it builds (kernels/cpu_ext.py)."""
    if triton_lora_path(device):
        return TritonLoraBackend(pool)
    ops = cpu_ops(cache_root())
    if ops is None:
        log.warning("LoRA deltas: torch path (%s)", cpu_ops_error())
    return CpuLoraBackend(pool, ops)


# (A^T [in, r*n], B_block [r*n, out_total]) of one slot, per layer and group: DeviceLoraPool.cpu_views[slot]
SlotViews = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class CpuLoraBatch:
    work: tuple[tuple[int, int, SlotViews], ...]  # (start, end, views) of each segment with an adapter
    # With DoRA: (lo, hi, rows) - tokens lo..hi-1 span every DoRA segment,
    # rows[t - lo] is the row of pool.dora_scale for token t (its slot, or
    # the all-ones last row for a base token), so one gather and one
    # multiply per layer and group apply every DoRA scale of the step.
    dora_rows: tuple[int, int, torch.Tensor] | None = None
    # the compiled op's arguments per layer and group (None on the torch path)
    compiled: tuple[dict[str, cpu.CompiledWork], ...] | None = None

    @property
    def dora(self) -> bool:
        return self.dora_rows is not None


class CpuLoraBackend:
    """The CPU path over the per-slot views the pool builds once at load (its
    b_block layout): the compiled op (kernels/cpu.apply_lora_compiled) when
    `ops` is given, else torch's matmuls (kernels/cpu.apply_lora)."""

    def __init__(self, pool: DeviceLoraPool, ops=None):
        if not pool.cpu_path:
            raise ValueError(f"the torch LoRA path needs a pool in CPU memory, not on {pool.page_table.device}")
        self.pool = pool
        self.ops = ops
        # CompiledWork of recent batch compositions: a decode batch keeps its composition for many
        # steps, and rebuilding 4 x layers argument lists per step costs about a millisecond
        self._compiled: OrderedDict[tuple, tuple] = OrderedDict()

    @property
    def path(self) -> str:
        return "torch" if self.ops is None else "compiled"

    @property
    def long_segments(self) -> str:
        """What multiplies long segments (prefill), for the startup log: brgemm
        for a bf16 pool on a CPU that runs it, else torch's GEMMs."""
        return "brgemm" if cpu.brgemm_serves(self.ops, self.pool.a_pages[0]["qkv"].dtype) else "torch GEMMs"

    def prepare(self, seg: Segments) -> CpuLoraBatch:
        pool = self.pool
        active = seg.with_adapter()
        work = tuple((start, start + length, pool.cpu_views[slot]) for start, length, slot in active)
        dora_segs = [(s, n) for s, n, slot in active if pool.is_dora[slot]]
        dora_rows = None
        if dora_segs:
            lo, hi = dora_segs[0][0], sum(dora_segs[-1])
            none = pool.num_slots  # the all-ones row
            runs = zip(seg.starts_host, seg.lens_host, seg.slots_host)
            rows = [slot if slot != NO_ADAPTER else none for s, n, slot in runs for _ in range(n)][lo:hi]
            dora_rows = (lo, hi, torch.tensor(rows, dtype=torch.long, device=pool.page_table.device))
        return CpuLoraBatch(work, dora_rows, None if self.ops is None else self._compiled_work(work))

    def _compiled_work(self, work) -> tuple[dict[str, cpu.CompiledWork], ...]:
        # keyed by the views' identity: a slot loaded again gets new views (the entry holds the
        # old ones, so their ids cannot be reused while it is cached)
        key = tuple((start, end, id(views)) for start, end, views in work)
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit[1]
        per_layer = tuple(
            {group: cpu.CompiledWork.of([(start, end, *views[layer][group]) for start, end, views in work],
                                        self.ops)
             for group in LORA_GROUPS}
            for layer in range(self.pool.cfg.num_layers))
        self._compiled[key] = (work, per_layer)
        if len(self._compiled) > 16:
            self._compiled.popitem(last=False)
        return per_layer

    def apply(self, x, out, layer: int, group: str, batch: CpuLoraBatch) -> None:
        # x: [T, in], out: [T, out_total] updated in place
        dora = None
        if batch.dora_rows is not None:
            lo, hi, rows = batch.dora_rows
            dora = (lo, hi, self.pool.dora_scale[layer][group], rows)
        if batch.compiled is None:
            work = [(start, end, *views[layer][group]) for start, end, views in batch.work]
            cpu.apply_lora(x, out, work, () if dora is None else [(lo, hi, dora[2].index_select(0, rows))])
        else:  # the op reads the scale rows in place
            cpu.apply_lora_compiled(self.ops, x, out, batch.compiled[layer][group], dora,
                                    LORA_GROUPS[group][1], self.pool.slice_offsets[group])


@dataclass(frozen=True)
class TritonLoraBatch:
    seg: Segments
    dora: bool = False  # some active slot holds a DoRA adapter: the expand applies pool.dora_scale


class TritonLoraBackend:
    """The Triton path: kernels/sgmv.py's shrink then expand over the pool's
    page-table layout (a, b, page_table, ranks, scales)."""

    path = "triton"

    def __init__(self, pool: DeviceLoraPool):
        from loramux.kernels import sgmv  # imports triton: only once this backend is chosen

        self._sgmv = sgmv
        self.pool = pool
        self.slice_offsets = group_slice_offsets(pool.cfg)

    def prepare(self, seg: Segments) -> TritonLoraBatch:
        return TritonLoraBatch(seg, any(self.pool.is_dora[slot] for _, _, slot in seg.with_adapter()))

    def apply(self, x, out, layer: int, group: str, batch: TritonLoraBatch) -> None:
        # x: [T, in] -> h: [n, T, R] -> out: [T, out_total] updated in place
        pool, sgmv = self.pool, self._sgmv
        lo, n = LORA_GROUPS[group]
        ranks = pool.ranks[layer, lo : lo + n]
        h = sgmv.lora_shrink(x, pool.a[layer][group], pool.page_table, ranks, batch.seg)
        sgmv.lora_expand(
            h, pool.b[layer][group], pool.page_table, ranks,
            pool.scales[layer, lo : lo + n], batch.seg, out, self.slice_offsets[group],
            pool.dora_scale[layer][group] if batch.dora else None,
        )
