"""Adapter weights in three tiers: disk -> host -> device.

    disk    every registered adapter: an `AdapterSource` (name, digest, rank,
            bytes, and a loader that reads the weights); unlimited
    host    a byte-budgeted LRU cache of `LoraAdapter` weights read from disk,
            in pinned memory on CUDA; budget 0 skips it (the default on a
            CPU, where the device tier already is host memory)
    device  `DeviceLoraPool`: a byte budget of rank-row pages, allocated once

A request holds a content digest, never a name (see AdapterPool). The step
makes its adapters resident on the device; a worker thread loads adapters of
waiting requests ahead of their turn (`AdapterPool.prefetch`).

The device pool: making an adapter resident copies its A rows and B columns
into free pages and fills its slot's row of the page table, ranks and scales
(layout in kernels/reference.py); nothing is allocated on the hot path.

    pages   0   1   2   3   4   5   6   7   8 ...
    owner  [s1][s1][s1][s1][s0][s0][  ][  ][s2] ...   s0: rank 2, s1: rank 4
    page_table[s0, :2] = [4, 5]; page_table[s1, :4] = [0, 1, 2, 3]

A page is one rank-row for every layer and module, so an adapter of rank r
needs exactly r pages, whatever its rank pattern: a module of lower rank
leaves the tail of its rows zero and its `ranks` entry stops the kernels
there.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from loramux.server.errors import Conflict, Unprocessable
from loramux.server.config import LORA_GROUPS, LORA_MODULES, ModelConfig
from loramux.adapters_store.files import AdapterFilesChanged, PinnedFile
from loramux.adapters_store.peft_format import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, ModuleLora, load_peft_adapter

log = logging.getLogger("loramux.adapter_pool")

TIERS = ("disk", "host", "device")


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
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == n:
                pages = list(range(i - n + 1, i + 1))
                break
        else:  # fragmented: take any free pages
            pages = [i for i, free in enumerate(self._free) if free][:n]
        for p in pages:
            self._free[p] = False
        self.num_free -= n
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._free[p]:
                raise ValueError(f"page {p} freed twice")
            self._free[p] = True
        self.num_free += len(pages)


def page_bytes(cfg: ModelConfig, dtype: torch.dtype, cpu_path: bool = False) -> int:
    """Bytes of one rank-row page: one row of A and of B^T for every module of
    every layer (plus the CPU path's block-diagonal copy of B, see below)."""
    per_layer = sum(sum(cfg.module_shape(m)) for m in LORA_MODULES)
    if cpu_path:
        for lo, n in LORA_GROUPS.values():
            per_layer += n * sum(cfg.module_shape(m)[0] for m in LORA_MODULES[lo : lo + n])
    return per_layer * cfg.num_layers * torch.empty((), dtype=dtype).element_size()


class DeviceLoraPool:
    """The device tier: per layer and projection group,

        a_pages[l][g]: [P, n, in]        physical storage, page-major, so the n
                                         slices' rows of one rank index are adjacent
        a[l][g]:       [n, P, in]        the same memory seen as the kernels' layout
        b[l][g]:       [P, out_total]    (kernels/reference.py)

    On a CPU, the torch path also keeps b_block[l][g]: [P, n, out_total], the
    scaled B rows of slice s in that slice's columns and zeros elsewhere, so
    that one adapter's delta for a whole group is two matmuls:

        h = x @ a_pages[pages].view(r*n, in).T          # [t, r*n]
        out += h @ b_block[pages].view(r*n, out_total)  # scale and slice routing folded in

    which costs n times the B memory and saves a Python-level loop over
    slices on the per-token path, where op overhead dominates on a CPU.
    Only the diagonal blocks of b_block are ever written, so the others stay
    zero from allocation on.

    DoRA: per slot, layer and group a row scale (float32, one per output column)

        dora_scale[l][g]: [slots + 1, out_total]   m / ||W0 + s·B·A||_row in the columns
                                                   of a DoRA module, 1.0 elsewhere; the
                                                   last row (NO_DORA_ROW) is all 1.0, for
                                                   tokens with no adapter

    computed once when the adapter is written (it needs the base weights:
    `base_weights(layer, group)` gives the model's fused [out_total, in]
    weight, attached by the model runner), so serving a DoRA token costs one
    elementwise multiply of its output row: y = scale ⊙ (W0 x + s·B·A x).
    `is_dora[slot]` says whether a slot holds a DoRA adapter; batches with
    none skip the multiply.

    Bookkeeping (`reserve`, `unload`) and copying (`write`) are separate so
    that AdapterPool can copy outside its lock: a reserved slot is read by
    no step until AdapterPool publishes it.
    """

    def __init__(self, cfg: ModelConfig, budget_bytes: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device="cpu"):
        self.cfg = cfg
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.cpu_path = torch.device(device).type == "cpu"
        self.page_bytes = page_bytes(cfg, dtype, self.cpu_path)
        self.num_pages = budget_bytes // self.page_bytes
        if self.num_pages < max_rank:
            raise ValueError(
                f"adapter pool budget {budget_bytes} B holds {self.num_pages} rank-rows; "
                f"at least max_lora_rank={max_rank} are needed"
            )
        self.pages = PageAllocator(self.num_pages)
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
                b[group] = torch.zeros(P, out_total, dtype=dtype, device=device)
                if self.cpu_path:
                    b_block[group] = torch.zeros(P, n, out_total, dtype=dtype, device=device)
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
        self.base_weights: Callable[[int, str], torch.Tensor] | None = None
        self.page_table = torch.zeros(num_slots, max_rank, dtype=torch.int32, device=device)
        self.ranks = torch.zeros(cfg.num_layers, len(LORA_MODULES), num_slots, dtype=torch.int32, device=device)
        self.scales = torch.zeros(cfg.num_layers, len(LORA_MODULES), num_slots, dtype=torch.float32, device=device)
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_pages: dict[int, list[int]] = {}
        # CPU path: per slot, per layer, per group, the (A^T, B_block) views
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
        dev = self.page_table.device
        contiguous = pages == list(range(p0, p0 + r))
        idx = None if contiguous else torch.tensor(pages, dtype=torch.long, device=dev)

        def put(t: torch.Tensor, lo: int, hi: int, rest: tuple, value) -> None:
            # t[pages[lo:hi]][rest] = value: a view when the pages are a run, else an index_put
            if contiguous:
                view = t[(slice(p0 + lo, p0 + hi),) + rest]
                view.copy_(value) if isinstance(value, torch.Tensor) else view.fill_(value)
            else:
                t[(idx[lo:hi],) + rest] = value

        ranks = torch.zeros(self.cfg.num_layers, len(LORA_MODULES), dtype=torch.int32)
        scales = torch.zeros(self.cfg.num_layers, len(LORA_MODULES), dtype=torch.float32)
        if adapter.use_dora and self.base_weights is None:
            raise RuntimeError("a DoRA adapter needs the base weights: attach the pool to a model runner first")
        self.is_dora[slot] = False  # no step reads the slot while it is written
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with ctx:
            for layer in range(self.cfg.num_layers):
                for group, (lo, n) in LORA_GROUPS.items():
                    a_pages, b_pool = self.a_pages[layer][group], self.b[layer][group]
                    b_block = self.b_block[layer].get(group)
                    dora_row = torch.ones(b_pool.shape[1], dtype=torch.float32, device=dev)
                    col = 0
                    for s, m in enumerate(LORA_MODULES[lo : lo + n]):
                        out_f = self.cfg.module_shape(m)[0]
                        cols = slice(col, col + out_f)
                        w = adapter.modules.get((layer, m))
                        k = 0 if w is None else w.rank
                        if k:
                            put(a_pages, 0, k, (s,), w.a)
                            put(b_pool, 0, k, (cols,), w.b.T)
                            if b_block is not None:
                                put(b_block, 0, k, (s, cols), w.b.T * w.scale)
                            ranks[layer, lo + s] = k
                            scales[layer, lo + s] = w.scale
                            if w.magnitude is not None:
                                dora_row[cols] = w.dora_scale(self.base_weights(layer, group)[cols])
                        if k < r:  # rows past this module's rank: zero
                            put(a_pages, k, r, (s,), 0.0)
                            put(b_pool, k, r, (cols,), 0.0)
                            if b_block is not None:
                                put(b_block, k, r, (s, cols), 0.0)
                        col += out_f
                    self.dora_scale[layer][group][slot].copy_(dora_row)
            row = torch.zeros(self.max_rank, dtype=torch.int32)
            row[:r] = torch.tensor(pages, dtype=torch.int32)
            self.page_table[slot].copy_(row, non_blocking=stream is not None)
            self.ranks[:, :, slot].copy_(ranks)
            self.scales[:, :, slot].copy_(scales)
        if stream is not None:
            stream.synchronize()
        if self.cpu_path:
            self.cpu_views[slot] = self._cpu_views(pages)
        self.is_dora[slot] = adapter.use_dora

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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------
# the disk tier: what the pool knows of an adapter without its weights
# ---------------------------------------------------------------------------

class AdapterUnavailable(RuntimeError):
    """A registered adapter's weights can no longer be read as registered."""


@dataclass(frozen=True)
class AdapterSource:
    """A registered adapter on the disk tier. `load()` returns its weights
    (float32, CPU) with this digest, or raises AdapterUnavailable."""

    name: str
    digest: str
    rank: int
    nbytes: int
    load: Callable[[], LoraAdapter]

    @classmethod
    def in_memory(cls, adapter: LoraAdapter) -> "AdapterSource":
        """Weights held by the source itself (offline use, tests, and adapters
        deleted from disk while requests still hold them)."""
        return cls(adapter.name, adapter.digest, adapter.rank, adapter.nbytes, _Held(adapter))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, adapter: LoraAdapter, model: ModelConfig,
                    max_rank: int, files: dict[str, PinnedFile] | None = None) -> "AdapterSource":
        """`adapter` was parsed and validated from the PEFT `folder` (from
        `files`, when given); only its metadata is kept, the weights are read
        back when needed."""
        return cls(adapter.name, adapter.digest, adapter.rank, adapter.nbytes,
                   FolderLoader(folder, adapter, model, max_rank, files))

    @property
    def held(self) -> bool:
        return isinstance(self.load, _Held)


class _Held:
    def __init__(self, adapter: LoraAdapter):
        self.adapter = adapter

    def __call__(self) -> LoraAdapter:
        return self.adapter


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class FolderLoader:
    """Reads an adapter back from its PEFT folder, fast.

    At registration the folder was parsed and validated in full, giving the
    digest; we keep the weights file's identity (inode, size, mtime) and each
    module's scale. While the file is that same file (the adapter store
    never rewrites one in place: uploads and deletes are renames), reading it
    back is one read and a safetensors header parse, with no hashing. A file
    replaced since is parsed in full again and must give the same digest.
    """

    def __init__(self, folder: str | os.PathLike, adapter: LoraAdapter, model: ModelConfig, max_rank: int,
                 files: dict[str, PinnedFile] | None = None):
        """`files`: the pinned config and weights files that were validated
        (adapters_store/files.py); pinned now when not given."""
        self.folder = Path(folder)
        self.files = files if files is not None else {
            n: PinnedFile.stat(self.folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME)}
        self.meta = dict(name=adapter.name, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                         target_modules=adapter.target_modules, config=adapter.config,
                         digest=adapter.digest, nbytes=adapter.nbytes)
        self.ranks = {k: m.rank for k, m in adapter.modules.items()}
        self.scales = {k: m.scale for k, m in adapter.modules.items()}
        self.model, self.max_rank = model, max_rank

    def __call__(self) -> LoraAdapter:
        name, digest = self.meta["name"], self.meta["digest"]
        weights = self.files[WEIGHTS_NAME]
        try:
            try:
                with weights.open() as f:
                    data = bytearray(weights.identity[2])
                    if f.readinto(data) == len(data):
                        return self._parse(data)
            except AdapterFilesChanged:
                pass
            adapter = load_peft_adapter(self.folder, self.model, self.max_rank, name)
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterUnavailable(f"adapter {name!r}: {self.folder} cannot be read: {exc}") from None
        if adapter.digest != digest:
            raise AdapterUnavailable(f"adapter {name!r}: {self.folder} changed on disk since it was registered")
        return adapter

    def open_files(self) -> list[tuple[str, BinaryIO]]:
        """The config and weights files as validated, open; AdapterFilesChanged if either changed."""
        opened: list[tuple[str, BinaryIO]] = []
        try:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                opened.append((name, self.files[name].open()))
        except AdapterFilesChanged:
            for _, f in opened:
                f.close()
            raise
        return opened

    def _parse(self, data: bytearray) -> LoraAdapter:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        base = 8 + n
        found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            parts = key.split(".")
            layer, module = int(parts[4]), parts[6]
            ab = "M" if parts[7] == "lora_magnitude_vector" else parts[7][-1]
            lo, hi = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            start = base + lo
            buf = data if start % dtype.itemsize == 0 else bytearray(data[start : base + hi])
            t = torch.frombuffer(buf, dtype=dtype, count=(hi - lo) // dtype.itemsize,
                                 offset=start if buf is data else 0)
            found.setdefault((layer, module), {})[ab] = t.view(info["shape"]).float()
        modules = {}
        for k, scale in self.scales.items():
            a, b = found[k]["A"], found[k]["B"]
            if a.shape[0] != self.ranks[k] or b.shape[1] != self.ranks[k]:
                raise AdapterUnavailable(f"adapter {self.meta['name']!r}: {k} has a different rank on disk")
            modules[k] = ModuleLora(a=a, b=b, scale=scale, magnitude=found[k].get("M"))
        return LoraAdapter(modules=modules, **self.meta)


# ---------------------------------------------------------------------------
# the host tier
# ---------------------------------------------------------------------------

class HostCache:
    """Byte-budgeted LRU of adapter weights (oldest first). Not thread-safe:
    AdapterPool's lock guards it. Budget 0: nothing is cached."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> LoraAdapter | None:
        adapter = self._entries.get(digest)
        if adapter is not None:
            self._entries.move_to_end(digest)
        return adapter

    def put(self, adapter: LoraAdapter, keep: Iterable[str] = ()) -> list[str] | None:
        """Cache the adapter, evicting least recently used entries outside
        `keep`; returns the evicted digests, or None if it was not cached."""
        if adapter.digest in self._entries:
            self._entries.move_to_end(adapter.digest)
            return []
        keep = set(keep)
        room = self.budget - self.nbytes + sum(a.nbytes for d, a in self._entries.items() if d not in keep)
        if adapter.nbytes > room:
            return None
        evicted = []
        while self.nbytes + adapter.nbytes > self.budget:
            victim = next(d for d in self._entries if d not in keep)
            self.pop(victim)
            evicted.append(victim)
        self._entries[adapter.digest] = adapter
        self.nbytes += adapter.nbytes
        return evicted

    def pop(self, digest: str) -> None:
        adapter = self._entries.pop(digest, None)
        if adapter is not None:
            self.nbytes -= adapter.nbytes

    def items(self):
        return list(self._entries.items())


def _pinned_copy(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter with its tensors in page-locked memory (fast, async H2D copies)."""
    import dataclasses

    return dataclasses.replace(adapter, modules={
        k: ModuleLora(m.a.pin_memory(), m.b.pin_memory(), m.scale,
                      None if m.magnitude is None else m.magnitude.pin_memory())
        for k, m in adapter.modules.items()})


# ---------------------------------------------------------------------------
# the pool: registry, residency, prefetch
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TierUsage:
    """One tier of the pool: what it holds (digest -> bytes) and its
    counters so far (loads into it, evictions from it, prefetch hits:
    for the device, an adapter a step needed and the prefetcher had made
    resident; for the host, a device load served from host memory)."""

    adapters: dict[str, int]
    loads: int = 0
    evictions: int = 0
    prefetch_hits: int = 0


@dataclass
class _Counters:
    loads: int = 0
    evictions: int = 0
    prefetch_hits: int = 0


class AdapterPool:
    """Registered adapters, and which of them are in host and device memory.

    Names map to content digests; requests hold a digest, not a name, so
    deleting a name and uploading new weights under it never serves stale
    weights to anybody, and requests already queued for the old weights
    finish with them:

        register("a", v1)   names: a -> d1          sources: d1 (refs 0)
        request r1 for "a"  r1 holds d1             sources: d1 (refs 1)
        unregister("a")     names: -                sources: d1 (refs 1, weights kept in memory for r1)
        register("a", v2)   names: a -> d2          sources: d1, d2
        r1 finishes         release(d1)             sources: d2

    Residency. Each step the engine calls make_resident(step digests,
    in_use) and prefetch(waiting digests, in_use), `in_use` being the
    digests of running requests: those are *pinned*, never evicted from
    the device until a later step's call leaves them out. Other adapters
    stay resident until their pages are needed, then leave in least
    recently used order. `fits` answers the scheduler's admission question
    with the same rule, so a step's make_resident never fails.

    Threads. The engine thread calls everything here; one worker thread
    (started on demand, gone when idle) prefetches. One lock (a Condition)
    guards all bookkeeping: names, sources, refs, the host cache, the page
    allocator and slots. Disk reads and copies into device pages run
    outside it:

        worker: lock{pick d, busy+=d} read disk  lock{reserve pages, evicting
                only unpinned adapters} copy into the pages  lock{publish
                d -> slot, busy-=d, notify}

    A step reads only the pages of its own adapters, which are pinned, and a
    reserved slot is handed to no step until published, so a copy never
    races the step reading its pages. A step that needs an adapter the
    worker is loading waits for it (`busy`) instead of reading it again; a
    step that needs pages the worker has reserved waits for that copy to be
    published, then evicts it. On CUDA the worker copies on its own stream
    and synchronizes it before publishing; pages freed by an eviction were
    last read by a step whose kernels finished (sampling synchronized).
    """

    def __init__(self, device_pool: DeviceLoraPool, host_bytes: int = 0, prefetch: bool = True,
                 mix_bytes: int = 256 * 2**20):
        self.device = device_pool
        self.host = HostCache(host_bytes)
        self.mix_budget = mix_bytes  # per-request mixes held at once (built or being built)
        self._mix_bytes = 0
        self._lock = threading.Condition()
        self._names: dict[str, str] = {}  # name -> digest
        self._mixes: dict[str, str] = {}  # per-request mixes: name -> digest, gone with their last ref
        self._sources: dict[str, AdapterSource] = {}  # digest -> source (the disk tier)
        self._refs: dict[str, int] = {}  # digest -> unfinished requests holding it
        self._slots: dict[str, int] = {}  # digest -> device slot, published or being copied
        self._resident: OrderedDict[str, int] = OrderedDict()  # published slots, LRU order (oldest first)
        self._busy: set[str] = set()  # digests being loaded to the device right now
        self._pinned: frozenset[str] = frozenset()  # in use by the running step: never evicted
        self._wanted: list[str] = []  # adapters of waiting requests, oldest first
        self._prefetched: set[str] = set()  # made resident by the worker, not yet used by a step
        self._failed: set[str] = set()  # the worker could not read these; a step will try (and raise)
        self._counters = {t: _Counters() for t in TIERS}
        self._latency: dict[str, deque[float]] = {t: deque(maxlen=4096) for t in TIERS}
        self._prefetch = prefetch
        self._worker: threading.Thread | None = None
        self._closed = False
        dev = device_pool.page_table.device
        self._cuda = dev.type == "cuda"
        self._stream = torch.cuda.Stream(dev) if self._cuda else None

    # -- registry -----------------------------------------------------------

    def check_fits(self, rank: int) -> None:
        """Unprocessable for an adapter the device tier could never hold."""
        if rank > self.device.max_rank:
            raise Unprocessable(f"adapter rank {rank} is above max_lora_rank {self.device.max_rank}", WEIGHTS_NAME,
                                "adapter_too_large")
        if rank > self.device.num_pages:
            raise Unprocessable(
                f"adapter of rank {rank} needs {rank} pages of {self.device.page_bytes} B; the device adapter "
                f"pool holds {self.device.num_pages} (--adapter-pool-bytes)", WEIGHTS_NAME, "adapter_too_large")

    def register(self, adapter: LoraAdapter | AdapterSource) -> None:
        source = adapter if isinstance(adapter, AdapterSource) else AdapterSource.in_memory(adapter)
        self.check_fits(source.rank)
        with self._lock:
            if source.name in self._names:
                raise Conflict(f"adapter `{source.name}` already exists", "name", "adapter_exists")
            self._names[source.name] = source.digest
            self._sources.setdefault(source.digest, source)

    def unregister(self, name: str) -> None:
        """New requests can no longer name it; requests holding it finish,
        with its weights kept in memory (its files may be deleted next)."""
        with self._lock:
            digest = self._names.pop(name)
            if self._drop_if_unused(digest):
                return
            source = self._sources[digest]
        if not source.held:
            adapter = source.load()
            with self._lock:
                if digest in self._sources:
                    self._sources[digest] = AdapterSource.in_memory(adapter)

    def resolve(self, name: str) -> str | None:
        with self._lock:
            return self._names.get(name) or self._mixes.get(name)

    # -- per-request mixes (transient adapters, adapters_store/arithmetic.py) -------

    def hold_mix(self, digest: str) -> str | None:
        """Take a reference on the mix `digest` if it is registered; its name, else None."""
        with self._lock:
            if digest not in self._mixes.values():
                return None
            self._refs[digest] = self._refs.get(digest, 0) + 1
            return self._sources[digest].name

    def reserve_mix(self, nbytes: int) -> bool:
        """Book `nbytes` of the mix budget for a mix about to be built; False
        (nothing booked) when the budget cannot hold it. Hand the booking to
        add_mix, or back with unreserve_mix."""
        with self._lock:
            if self._mix_bytes + nbytes > self.mix_budget:
                return False
            self._mix_bytes += nbytes
            return True

    def unreserve_mix(self, nbytes: int) -> None:
        with self._lock:
            self._mix_bytes -= nbytes

    def add_mix(self, adapter: LoraAdapter, reserved: int = 0) -> str:
        """Register a mix held in memory, under its own name, with one reference
        taken (give it back with release(adapter.digest)); the mix is dropped
        when its last reference goes. `reserved` bytes were booked with
        reserve_mix; the mix holds adapter.nbytes of the budget from now on.
        Returns its name."""
        with self._lock:
            self._mix_bytes -= reserved
            name = self.hold_mix(adapter.digest)  # built meanwhile by another request
            if name is not None:
                return name
            self.check_fits(adapter.rank)
            if adapter.name in self._names or adapter.digest in self._sources:
                raise Conflict(f"adapter `{adapter.name}` already exists", "adapters", "invalid_mix")
            self._mixes[adapter.name] = adapter.digest
            self._sources[adapter.digest] = AdapterSource.in_memory(adapter)
            self._refs[adapter.digest] = 1
            self._mix_bytes += adapter.nbytes
            return adapter.name

    def mix_bytes(self) -> int:
        """Bytes of the mix budget in use (mixes held and being built)."""
        with self._lock:
            return self._mix_bytes

    def total_refs(self) -> int:
        """References held on adapters by unfinished requests and held mixes (0 when idle)."""
        with self._lock:
            return sum(self._refs.values())

    def source(self, name: str) -> AdapterSource | None:
        with self._lock:
            digest = self._names.get(name)
            return None if digest is None else self._sources[digest]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._names or name in self._mixes

    def acquire(self, digest: str) -> None:
        with self._lock:
            if digest not in self._sources:
                raise KeyError(f"no adapter with digest {digest}")
            self._refs[digest] = self._refs.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        with self._lock:
            self._refs[digest] -= 1
            if not self._refs[digest]:
                del self._refs[digest]
                self._drop_if_unused(digest)

    def refs(self, digest: str) -> int:
        with self._lock:
            return self._refs.get(digest, 0)

    def _drop_if_unused(self, digest: str) -> bool:
        if digest in self._refs or digest in self._names.values():
            return False
        if self._mixes.get(self._sources[digest].name) == digest:
            del self._mixes[self._sources[digest].name]
            self._mix_bytes -= self._sources[digest].nbytes
        del self._sources[digest]
        self.host.pop(digest)
        self._prefetched.discard(digest)
        if digest in self._resident:  # a load in progress drops itself at publish
            self._evict(digest, count=False)
        return True

    # -- accessors (metrics, tests) -----------------------------------------

    def is_resident(self, digest: str) -> bool:
        with self._lock:
            return digest in self._resident

    def resident(self) -> list[str]:
        """Digests on the device, least recently used first."""
        with self._lock:
            return list(self._resident)

    def pinned(self) -> frozenset[str]:
        with self._lock:
            return self._pinned

    def tier_usage(self) -> dict[str, TierUsage]:
        with self._lock:
            held = {
                "disk": {d: s.nbytes for d, s in self._sources.items()},
                "host": {d: a.nbytes for d, a in self.host.items()},
                "device": {d: len(self.device.pages_of(s)) * self.device.page_bytes
                           for d, s in self._resident.items()},
            }
            return {t: TierUsage(held[t], c.loads, c.evictions, c.prefetch_hits)
                    for t, c in self._counters.items()}

    def take_load_seconds(self) -> dict[str, list[float]]:
        """Load latencies per tier since the last call (disk: one read;
        device: from wanting an adapter to its slot being published)."""
        with self._lock:
            out = {t: list(q) for t, q in self._latency.items()}
            for q in self._latency.values():
                q.clear()
            return out

    def check_consistent(self) -> None:
        """Assert the bookkeeping invariants (tests)."""
        with self._lock:
            dev = self.device
            used = [p for s in self._slots.values() for p in dev.pages_of(s)]
            assert len(used) == len(set(used)), "a page is owned twice"
            assert len(used) + dev.pages.num_free == dev.num_pages, "pages leaked"
            assert len(self._slots) + dev.num_free_slots == dev.num_slots, "slots leaked"
            assert set(self._resident) <= set(self._slots)
            assert set(self._slots) - set(self._resident) <= self._busy, "a reserved slot nobody copies into"
            for d, s in self._slots.items():
                assert len(dev.pages_of(s)) == self._sources[d].rank if d in self._sources else True
            assert self.host.nbytes <= self.host.budget
            assert self.host.nbytes == sum(a.nbytes for _, a in self.host.items())
            assert set(self._resident) <= set(self._sources) | self._busy

    # -- residency (by digest) ----------------------------------------------

    def _pages(self, digest: str) -> int:
        return len(self.device.pages_of(self._slots[digest]))

    def fits(self, digests: frozenset[str], in_use: frozenset[str] = frozenset()) -> bool:
        """Whether `digests` can all be resident at once, evicting only
        adapters outside `digests` and `in_use` (a copy in progress counts
        as evictable: make_resident waits for it, then evicts it)."""
        with self._lock:
            keep = digests | in_use
            missing = [d for d in digests if d not in self._slots]
            others = [d for d in self._slots if d not in keep]
            free_pages = self.device.pages.num_free + sum(self._pages(d) for d in others)
            free_slots = self.device.num_free_slots + len(others)
            need = sum(self._sources[d].rank for d in missing)
            return need <= free_pages and len(missing) <= free_slots

    def make_resident(self, digests, in_use: frozenset[str] = frozenset()) -> dict[str, int]:
        """Slots of `digests`, loading the missing ones (evicting LRU adapters
        outside `digests` and `in_use` to make room). `digests | in_use` is
        pinned from now until the next call."""
        keep = frozenset(digests) | frozenset(in_use)
        with self._lock:
            self._pinned = keep
        return {d: self._ensure(d, keep) for d in digests}

    def _ensure(self, digest: str, keep: frozenset[str]) -> int:
        t0 = time.perf_counter()
        with self._lock:
            while digest in self._busy:  # the worker is loading it
                self._lock.wait()
            if digest in self._resident:
                self._resident.move_to_end(digest)  # now most recently used
                if digest in self._prefetched:
                    self._prefetched.discard(digest)
                    self._counters["device"].prefetch_hits += 1
                return self._resident[digest]
            self._busy.add(digest)
            source = self._sources[digest]
            adapter = self._host_get(digest)
        slot = None
        try:
            if adapter is None:
                adapter = self._read(source)
            with self._lock:
                while slot is None:
                    slot = self._reserve(digest, source.rank, lambda v: v not in keep)
                    if slot is None:
                        if not any(d not in self._resident and d not in keep for d in self._slots):
                            raise MemoryError(f"adapter {source.name!r} does not fit beside the adapters in use")
                        self._lock.wait()  # a prefetch copy holds the pages: evict it once published
            self.device.write(slot, adapter)
            with self._lock:
                self._publish(digest, slot, t0, prefetched=False)
            return slot
        except BaseException:
            with self._lock:
                if slot is not None and digest not in self._resident:
                    self._unreserve(digest)
            raise
        finally:
            with self._lock:
                self._busy.discard(digest)
                self._lock.notify_all()

    # -- prefetch -----------------------------------------------------------

    def prefetch(self, waiting: list[str], in_use: frozenset[str] = frozenset()) -> None:
        """Hand the worker the adapters of waiting requests, oldest first:
        it loads, off the engine thread, as many as fit on the device beside
        the pinned `in_use`, and the next ones into host memory."""
        with self._lock:
            self._pinned = frozenset(in_use)
            self._wanted = [d for d in waiting if d in self._sources]
            if not self._prefetch or self._closed or not self._wanted:
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="loramux-prefetch", daemon=True)
                self._worker.start()
            self._lock.notify_all()

    def close(self) -> None:
        """Stop the worker (it finishes the load in hand)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout=10)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until the worker has nothing left to do (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._worker is not None and (self._busy or self._next_job() is not None):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
            return True

    def _next_job(self) -> tuple[str, str, frozenset[str]] | None:
        """(digest, tier, protected) of the next load, or None. Device: the
        oldest waiting adapters that fit beside the pinned ones; protected =
        those and the pinned ones, which this load must not evict. Host:
        the waiting adapters after them, as far as the host budget goes."""
        pages = sum(self._pages(d) for d in self._pinned if d in self._slots)
        slots = sum(d in self._slots for d in self._pinned)
        plan = []
        for d in self._wanted:
            source = self._sources.get(d)
            if d in self._pinned or source is None:
                continue
            if pages + source.rank > self.device.num_pages or slots + 1 > self.device.num_slots:
                break
            pages, slots = pages + source.rank, slots + 1
            plan.append(d)
        protected = frozenset(plan) | self._pinned
        for d in plan:
            if d not in self._slots and d not in self._busy and d not in self._failed:
                return d, "device", protected
        room = self.host.budget
        for d in self._wanted:
            source = self._sources.get(d)
            if source is None or d in protected or d in self._slots:
                continue
            room -= source.nbytes
            if room < 0:
                break
            if d not in self.host and d not in self._busy and d not in self._failed:
                return d, "host", protected
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                job = None if self._closed else self._next_job()
                if job is None:
                    self._lock.wait(timeout=1.0)
                    job = None if self._closed else self._next_job()
                    if job is None:
                        self._worker = None
                        self._lock.notify_all()
                        return
                digest, tier, protected = job
                self._busy.add(digest)
                source = self._sources[digest]
                adapter = self._host_get(digest, count=tier == "device")
            try:
                self._load(digest, tier, protected, source, adapter)
            except Exception:
                log.exception("prefetching adapter %r failed", source.name)
                with self._lock:
                    self._failed.add(digest)
            finally:
                with self._lock:
                    self._busy.discard(digest)
                    self._lock.notify_all()

    def _load(self, digest: str, tier: str, protected: frozenset[str], source: AdapterSource,
              adapter: LoraAdapter | None) -> None:
        t0 = time.perf_counter()
        if adapter is None:
            adapter = self._read(source)
        if tier == "host":
            return
        with self._lock:
            if digest not in self._sources or digest in self._slots:
                return
            slot = self._reserve(digest, source.rank, lambda v: v not in protected and v not in self._pinned)
            if slot is None:  # room only after the running step: try again later
                self._lock.wait(timeout=0.05)
                return
        try:
            self.device.write(slot, adapter, self._stream)
        except BaseException:
            with self._lock:
                self._unreserve(digest)
            raise
        with self._lock:
            self._publish(digest, slot, t0, prefetched=True)

    # -- under the lock -----------------------------------------------------

    def _host_get(self, digest: str, count: bool = True) -> LoraAdapter | None:
        adapter = self.host.get(digest)
        if adapter is not None and count:
            self._counters["host"].prefetch_hits += 1
        return adapter

    def _read(self, source: AdapterSource) -> LoraAdapter:
        """Weights from the disk tier (no lock held), kept in the host tier if it has room."""
        t0 = time.perf_counter()
        adapter = source.load()
        if adapter.digest != source.digest:
            raise AdapterUnavailable(f"adapter {source.name!r}: the loader returned other weights")
        seconds = time.perf_counter() - t0
        if self.host.budget and adapter.nbytes <= self.host.budget and self._cuda:
            adapter = _pinned_copy(adapter)
        with self._lock:
            self._counters["disk"].loads += 1
            self._latency["disk"].append(seconds)
            if self.host.budget and source.digest in self._sources:
                evicted = self.host.put(adapter, keep=self._wanted)
                if evicted is not None:
                    self._counters["host"].loads += 1
                    self._counters["host"].evictions += len(evicted)
        return adapter

    def _reserve(self, digest: str, rank: int, evictable: Callable[[str], bool]) -> int | None:
        """A slot with `rank` pages for `digest`, evicting resident adapters
        for which evictable(d), least recently used first; None if that is
        not enough."""
        victims, pages, slots = [], self.device.pages.num_free, self.device.num_free_slots
        for d in self._resident:
            if pages >= rank and slots >= 1:
                break
            if d != digest and evictable(d):
                victims.append(d)
                pages, slots = pages + self._pages(d), slots + 1
        if pages < rank or slots < 1:
            return None
        for d in victims:
            self._evict(d)
        slot = self.device.reserve(rank)
        self._slots[digest] = slot
        return slot

    def _unreserve(self, digest: str) -> None:
        self.device.unload(self._slots.pop(digest))
        self._lock.notify_all()

    def _evict(self, digest: str, count: bool = True) -> None:
        del self._resident[digest]
        self.device.unload(self._slots.pop(digest))
        self._prefetched.discard(digest)
        if count:
            self._counters["device"].evictions += 1

    def _publish(self, digest: str, slot: int, t0: float, prefetched: bool) -> None:
        if digest not in self._sources:  # unregistered and released meanwhile
            self._unreserve(digest)
            return
        self._resident[digest] = slot  # most recently used
        if prefetched:
            self._prefetched.add(digest)
        self._counters["device"].loads += 1
        self._latency["device"].append(time.perf_counter() - t0)
        self._lock.notify_all()
