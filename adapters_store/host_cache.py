"""The host tier: a byte-budgeted LRU cache of adapter weights read from disk
(pinned memory on CUDA)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import torch

from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora

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


def host_copy(adapter: LoraAdapter, pinned: bool) -> LoraAdapter:
    """The adapter with tensors of its own, for the host tier to keep: in
    page-locked memory when `pinned` (fast, async H2D copies), else plain
    copies. A store folder's weights are mapped (adapters_store/sources.py),
    and a cached adapter would keep its file mapped and a descriptor open."""
    import dataclasses

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if pinned else t.clone()

    return dataclasses.replace(adapter, modules={
        k: ModuleLora(own(m.a), own(m.b), m.scale, None if m.magnitude is None else own(m.magnitude))
        for k, m in adapter.modules.items()})
