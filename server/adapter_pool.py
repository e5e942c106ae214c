"""Adapter weights in the device pool: rank-row pages shared by all ranks.

The pool is allocated once from a byte budget. Making an adapter resident
copies its A rows and B columns into free pages and fills its slot's row of
the page table, ranks and scales (layout in kernels/reference.py); nothing
is allocated on the hot path.

    pages   0   1   2   3   4   5   6   7   8 ...
    owner  [s1][s1][s1][s1][s0][s0][  ][  ][s2] ...   s0: rank 2, s1: rank 4
    page_table[s0, :2] = [4, 5]; page_table[s1, :4] = [0, 1, 2, 3]

A page is one rank-row for every layer and module, so an adapter of rank r
needs exactly r pages, whatever its rank pattern: a module of lower rank
leaves the tail of its rows zero and its `ranks` entry stops the kernels
there.
"""
from __future__ import annotations

import torch

from server.config import LORA_GROUPS, LORA_MODULES, ModelConfig
from server.peft_format import LoraAdapter


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
    """

    def __init__(self, cfg: ModelConfig, budget_bytes: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device="cpu"):
        self.cfg = cfg
        self.max_rank = max_rank
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

    def load(self, adapter: LoraAdapter) -> int:
        """Copy an adapter into free pages; returns its slot."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} is above max_lora_rank {self.max_rank}")
        if not self._free_slots:
            raise MemoryError("no free adapter slot")
        pages = self.pages.allocate(adapter.rank)
        slot = self._free_slots.pop()
        self._slot_pages[slot] = pages
        idx = torch.tensor(pages, dtype=torch.long, device=self.page_table.device)
        self.page_table[slot].zero_()
        self.page_table[slot, : len(pages)] = idx.to(torch.int32)
        self.ranks[:, :, slot] = 0
        self.scales[:, :, slot] = 0.0
        for group, (lo, n) in LORA_GROUPS.items():
            mods = LORA_MODULES[lo : lo + n]
            for layer in range(self.cfg.num_layers):
                a_pages, b_pool = self.a_pages[layer][group], self.b[layer][group]
                a_pages[idx] = 0
                b_pool[idx] = 0
                b_block = self.b_block[layer].get(group)
                if b_block is not None:
                    b_block[idx] = 0
                col = 0
                for s, m in enumerate(mods):
                    out_f = self.cfg.module_shape(m)[0]
                    w = adapter.modules.get((layer, m))
                    if w is not None:
                        r = w.rank
                        a_pages[idx[:r], s] = w.a.to(a_pages.dtype)
                        b_pool[idx[:r], col : col + out_f] = w.b.T.to(b_pool.dtype)
                        if b_block is not None:
                            b_block[idx[:r], s, col : col + out_f] = (w.b.T * w.scale).to(b_block.dtype)
                        self.ranks[layer, lo + s, slot] = r
                        self.scales[layer, lo + s, slot] = w.scale
                    col += out_f
        if self.cpu_path:
            self.cpu_views[slot] = self._cpu_views(pages, idx)
        return slot

    def _cpu_views(self, pages: list[int], idx: torch.Tensor):
        r = len(pages)
        contiguous = pages == list(range(pages[0], pages[0] + r))
        at = slice(pages[0], pages[0] + r) if contiguous else idx  # a gather copies; rare
        views = []
        for layer in range(self.cfg.num_layers):
            per_group = {}
            for group, (lo, n) in LORA_GROUPS.items():
                a = self.a_pages[layer][group][at]  # [r, n, in]
                b = self.b_block[layer][group][at]  # [r, n, out_total]
                per_group[group] = (a.reshape(r * n, -1).T, b.reshape(r * n, -1))
            views.append(per_group)
        return views

    def unload(self, slot: int) -> None:
        self.pages.free(self._slot_pages.pop(slot))
        self.cpu_views.pop(slot, None)
        self.ranks[:, :, slot] = 0
        self.scales[:, :, slot] = 0.0
        self._free_slots.append(slot)


class AdapterPool:
    """Registered adapters, and which of them are resident on the device.

    Names map to content digests; requests hold a digest, not a name, so
    deleting a name and uploading new weights under it never serves stale
    weights to anybody, and requests already queued for the old weights
    finish with them:

        register("a", v1)   names: a -> d1          adapters: d1 (refs 0)
        request r1 for "a"  r1 holds d1             adapters: d1 (refs 1)
        unregister("a")     names: -                adapters: d1 (refs 1, kept for r1)
        register("a", v2)   names: a -> d2          adapters: d1, d2
        r1 finishes         release(d1)             adapters: d2

    An adapter is *in use* while a running request needs it; in-use adapters
    are never evicted from the device. Others stay resident until their
    pages are needed, then leave in least-recently-used order.
    """

    def __init__(self, device_pool: DeviceLoraPool):
        self.device = device_pool
        self._names: dict[str, str] = {}  # name -> digest
        self._adapters: dict[str, LoraAdapter] = {}  # digest -> weights
        self._refs: dict[str, int] = {}  # digest -> unfinished requests holding it
        self._resident: dict[str, int] = {}  # digest -> slot, LRU order (oldest first)
        self._rank: dict[str, int] = {}  # digest -> pages it holds on the device

    # -- registry -----------------------------------------------------------

    def register(self, adapter: LoraAdapter) -> None:
        if adapter.name in self._names:
            raise KeyError(f"adapter {adapter.name!r} is already registered")
        if adapter.rank > self.device.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} is above max_lora_rank {self.device.max_rank}")
        if adapter.rank > self.device.num_pages:
            raise ValueError("adapter does not fit in the device adapter pool")
        self._names[adapter.name] = adapter.digest
        self._adapters.setdefault(adapter.digest, adapter)

    def unregister(self, name: str) -> None:
        """New requests can no longer name it; requests holding it finish."""
        digest = self._names.pop(name)
        self._drop_if_unused(digest)

    def resolve(self, name: str) -> str | None:
        return self._names.get(name)

    def get(self, name: str) -> LoraAdapter | None:
        digest = self._names.get(name)
        return None if digest is None else self._adapters[digest]

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def acquire(self, digest: str) -> None:
        self._refs[digest] = self._refs.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        self._refs[digest] -= 1
        if not self._refs[digest]:
            del self._refs[digest]
            self._drop_if_unused(digest)

    def _drop_if_unused(self, digest: str) -> None:
        if digest in self._refs or digest in self._names.values():
            return
        self._adapters.pop(digest, None)
        if digest in self._resident:
            self.device.unload(self._resident.pop(digest))
            del self._rank[digest]

    # -- residency (by digest) ----------------------------------------------

    def is_resident(self, digest: str) -> bool:
        return digest in self._resident

    def fits(self, digests: frozenset[str], in_use: frozenset[str] = frozenset()) -> bool:
        """Whether `digests` can all be resident at once, evicting only
        adapters outside `digests` and `in_use`."""
        keep = digests | in_use
        missing = [self._adapters[d] for d in digests if d not in self._resident]
        evictable = [d for d in self._resident if d not in keep]
        free_pages = self.device.pages.num_free + sum(self._rank[d] for d in evictable)
        free_slots = self.device.num_free_slots + len(evictable)
        return sum(a.rank for a in missing) <= free_pages and len(missing) <= free_slots

    def make_resident(self, digests, in_use: frozenset[str] = frozenset()) -> dict[str, int]:
        """Slots of `digests`, loading the missing ones (evicting LRU adapters
        outside `digests` and `in_use` to make room)."""
        keep = set(digests) | in_use
        slots = {}
        for d in digests:
            if d in self._resident:
                self._resident[d] = self._resident.pop(d)  # now most recently used
            else:
                adapter = self._adapters[d]
                while not self.device.fits(adapter.rank):
                    victim = next((v for v in self._resident if v not in keep), None)
                    if victim is None:
                        raise MemoryError(f"adapter {adapter.name!r} does not fit beside the adapters in use")
                    self.device.unload(self._resident.pop(victim))
                    del self._rank[victim]
                self._resident[d] = self.device.load(adapter)
                self._rank[d] = adapter.rank
            slots[d] = self._resident[d]
        return slots
