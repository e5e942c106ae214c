"""Adapter weights in three tiers: disk -> host -> device.

    disk    every registered adapter: an `AdapterSource` (name, digest, rank,
            bytes, and a loader that reads the weights); unlimited
    host    a byte-budgeted LRU cache of `LoraAdapter` weights read from disk,
            in pinned memory on CUDA; budget 0 skips it (the default on a
            CPU, where the device tier already is host memory)
    device  `DeviceLoraPool`: a byte budget of rank-row pages, allocated once

The pool knows adapters by content digest only; names live in the registry
(adapters_store/registry.py), which holds a registration on each digest it
names. The step makes its adapters resident on the device; a worker thread
loads adapters of waiting requests ahead of their turn (`AdapterPool.prefetch`).

The tiers live in their own modules: adapters_store/sources.py (disk),
host_cache.py (host) and device_pool.py (device pages); residency.py keeps
which adapters are where, and prefetches. This one holds the adapters and
what holds them.
"""

import logging
import threading
import types

from loramux.adapters_store.device_pool import DeviceLoraPool, lora_pool_dtype, pool_cpu_ops
from loramux.adapters_store.host_cache import HostCache
from loramux.adapters_store.peft_format import WEIGHTS_NAME, LoraAdapter
from loramux.adapters_store.residency import Residency, TierUsage
from loramux.adapters_store.sources import AdapterSource, AdapterUnavailable
from loramux.server.config import EngineConfig
from loramux.server.errors import NotFound, Unprocessable

log = logging.getLogger("loramux.adapter_pool")


class AdapterGone(NotFound):
    """The digest is no longer held: every registration and reference to it went."""

    code = "adapter_not_found"


class AdapterPool:
    """Adapters by content digest, and which of them are in host and device memory.

    A digest stays while something holds it: a registration (the registry's
    name for it) or a reference (an unfinished request, a per-request mix).
    Requests hold a digest, not a name, so deleting a name and uploading new
    weights under it never serves stale weights to anybody, and requests
    already queued for the old weights finish with them:

        registry: a -> d1   add(s1)             sources: d1 (registered 1, refs 0)
        request r1 for d1   acquire(d1)         sources: d1 (registered 1, refs 1)
        registry: delete a  detach(d1)          sources: d1 (registered 0, refs 1, weights kept in memory for r1)
        registry: a -> d2   add(s2)             sources: d1, d2
        r1 finishes         release(d1)         sources: d2

    Where each held adapter is (device slots, LRU, pins, the host cache, the
    prefetch worker) is `residency` (adapters_store/residency.py), which
    shares this pool's lock.
    """

    def __init__(self, device_pool: DeviceLoraPool, host_bytes: int = 0, prefetch: bool = True,
                 mix_bytes: int = 256 * 2**20):
        self.device = device_pool
        self.mix_budget = mix_bytes  # per-request mixes held at once (built or being built)
        self._mix_bytes = 0
        self._lock = threading.Condition()
        self._sources: dict[str, AdapterSource] = {}  # digest -> source (the disk tier)
        self._registered: dict[str, int] = {}  # digest -> registry names for it
        self._refs: dict[str, int] = {}  # digest -> unfinished requests and mixes holding it
        self._mixes: set[str] = set()  # digests held in the mix budget, gone with their last ref
        self.residency = Residency(device_pool, HostCache(host_bytes), self._lock,
                                   types.MappingProxyType(self._sources), prefetch)

    @classmethod
    def for_model(cls, model, config: EngineConfig) -> "AdapterPool":
        """The pool a served model gets: the device tier in lora_pool_dtype; the
        host tier 0 on a CPU, whose device tier is host memory already, else
        4 GiB, unless the config says."""
        cpu = model.device.type == "cpu"
        host_bytes = config.adapter_host_bytes
        if host_bytes is None:
            host_bytes = 0 if cpu else 4 * 2**30
        device = DeviceLoraPool(model.cfg, config.adapter_pool_bytes, config.max_adapter_slots, config.max_lora_rank,
                                lora_pool_dtype(model), model.device, base_weights=model.base_weight,
                                ops=pool_cpu_ops(model))
        return cls(device, host_bytes, prefetch=config.adapter_prefetch, mix_bytes=config.mix_pool_bytes)

    # -- registry -----------------------------------------------------------

    def check_fits(self, rank: int) -> None:
        """Unprocessable for an adapter the device tier could never hold. Its
        pages always fit then: DeviceLoraPool holds at least max_rank of them.
        (The API's parser refuses such a rank first; this guards every other
        way in: mixes, merges, pools built directly.)"""
        if rank > self.device.max_rank:
            raise Unprocessable(f"adapter rank {rank} is above max_lora_rank {self.device.max_rank}", WEIGHTS_NAME,
                                "adapter_too_large")

    def add(self, adapter: LoraAdapter | AdapterSource) -> str:
        """Hold `adapter` for one registration (the registry calls this); its
        digest. The same weights registered twice are held once, twice."""
        source = adapter if isinstance(adapter, AdapterSource) else AdapterSource.in_memory(adapter)
        self.check_fits(source.rank)
        with self._lock:
            self._sources.setdefault(source.digest, source)
            self._registered[source.digest] = self._registered.get(source.digest, 0) + 1
            return source.digest

    def detach(self, digest: str) -> None:
        """Give back one registration. Requests holding the digest finish, with
        its weights read into memory first (its files may be deleted next):
        this reads from disk, so call it off the event loop."""
        with self._lock:
            self._registered[digest] -= 1
            if not self._registered[digest]:
                del self._registered[digest]
            if self._drop_if_unused(digest):
                return
            source = self._sources[digest]
        if not source.held:
            try:
                adapter = source.load()
            except AdapterUnavailable as exc:  # its requests fail alone when they need it (Engine.step)
                log.error("adapter %s could not be read into memory on delete: %s", digest[:12], exc)
                return
            with self._lock:
                if digest in self._sources:
                    self._sources[digest] = AdapterSource.in_memory(adapter)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._sources

    def source(self, digest: str) -> AdapterSource | None:
        with self._lock:
            return self._sources.get(digest)

    # -- per-request mixes (transient adapters, adapters_store/arithmetic.py) -------

    def hold_mix(self, digest: str) -> bool:
        """Take a reference on `digest` if the pool holds it (a mix built before,
        by this or another request); whether it did."""
        with self._lock:
            if digest not in self._sources:
                return False
            self._refs[digest] = self._refs.get(digest, 0) + 1
            return True

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

    def add_mix(self, adapter: LoraAdapter, reserved: int = 0) -> None:
        """Hold a mix in memory with one reference taken (give it back with
        release(adapter.digest)); the mix is dropped when its last reference
        goes. `reserved` bytes were booked with reserve_mix; the mix holds
        adapter.nbytes of the budget from now on, unless the pool held these
        weights already (built meanwhile by another request)."""
        with self._lock:
            self._mix_bytes -= reserved
            if self.hold_mix(adapter.digest):
                return
            self.check_fits(adapter.rank)
            self._mixes.add(adapter.digest)
            self._sources[adapter.digest] = AdapterSource.in_memory(adapter)
            self._refs[adapter.digest] = 1
            self._mix_bytes += adapter.nbytes

    def mix_bytes(self) -> int:
        """Bytes of the mix budget in use (mixes held and being built)."""
        with self._lock:
            return self._mix_bytes

    def total_refs(self) -> int:
        """References held on adapters by unfinished requests and held mixes (0 when idle)."""
        with self._lock:
            return sum(self._refs.values())

    # -- references -----------------------------------------------------------

    def acquire(self, digest: str) -> None:
        """A reference on `digest` for an unfinished request; AdapterGone if
        nothing holds it any more (its name was deleted meanwhile)."""
        with self._lock:
            if digest not in self._sources:
                raise AdapterGone("the adapter was deleted", "model", "model_not_found")
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
        if digest in self._refs or digest in self._registered:
            return False
        if digest in self._mixes:
            self._mixes.discard(digest)
            self._mix_bytes -= self._sources[digest].nbytes
        del self._sources[digest]
        self.residency.forget(digest)
        return True

    # -- where they are (adapters_store/residency.py) -------------------------

    @property
    def host(self) -> HostCache:
        return self.residency.host

    def fits(self, digests: frozenset[str], in_use: frozenset[str] = frozenset()) -> bool:
        return self.residency.fits(digests, in_use)

    def make_resident(self, digests, in_use: frozenset[str] = frozenset()) -> dict[str, int]:
        return self.residency.make_resident(digests, in_use)

    def prefetch(self, waiting: list[str], in_use: frozenset[str] = frozenset()) -> None:
        self.residency.prefetch(waiting, in_use)

    def is_resident(self, digest: str) -> bool:
        return self.residency.is_resident(digest)

    def resident(self) -> list[str]:
        return self.residency.resident()

    def pinned(self) -> frozenset[str]:
        return self.residency.pinned()

    def tier_usage(self) -> dict[str, TierUsage]:
        return self.residency.tier_usage()

    def take_load_seconds(self) -> dict[str, list[float]]:
        return self.residency.take_load_seconds()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        return self.residency.wait_idle(timeout)

    def close(self) -> None:
        self.residency.close()

    def check_consistent(self) -> None:
        """Assert the bookkeeping invariants (tests)."""
        with self._lock:
            assert set(self._registered) | set(self._refs) == set(self._sources), "a source nothing holds"
            assert self._mixes <= set(self._sources)
            assert all(n > 0 for n in (*self._registered.values(), *self._refs.values()))
            assert self._mix_bytes >= sum(self._sources[d].nbytes for d in self._mixes)
        self.residency.check_consistent()

