"""Which held adapters are on the device and in host memory: device slots in
LRU order with pins, the host cache, and the prefetch worker.

`Residency` is the AdapterPool's (adapters_store/pool.py) and shares its lock;
it reads the pool's sources through a read-only view and decides nothing
about which adapters exist.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from loramux.adapters_store.device_pool import DeviceLoraPool
from loramux.adapters_store.host_cache import HostCache, host_copy
from loramux.adapters_store.peft_format import LoraAdapter
from loramux.adapters_store.sources import AdapterSource, AdapterUnavailable
from loramux.kernels.cpu_ext import one_torch_thread

log = logging.getLogger("loramux.adapter_pool")

TIERS = ("disk", "host", "device")


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


class Residency:
    """Device slots, LRU order and pins, the host cache and the prefetch worker.

    Each step the engine calls make_resident(step digests,
    in_use) and prefetch(waiting digests, in_use), `in_use` being the
    digests of running requests: those are *pinned*, never evicted from
    the device until a later step's call leaves them out. Other adapters
    stay resident until their pages are needed, then leave in least
    recently used order. `fits` answers the scheduler's admission question
    with the same rule, so a step's make_resident never fails.

    Threads. The engine thread calls in here; one worker thread (started on
    demand, gone when idle) prefetches. One lock (a Condition, the pool's)
    guards all bookkeeping: the pool's sources and references, the host
    cache, the page allocator and slots. Disk reads and copies into device pages run
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

    def __init__(self, device_pool: DeviceLoraPool, host: HostCache, lock: threading.Condition,
                 sources: Mapping[str, AdapterSource], prefetch: bool = True):
        """`sources`: the pool's digests and their sources, read under `lock`."""
        self.device = device_pool
        self.host = host
        self._lock = lock
        self._sources = sources
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

    def forget(self, digest: str) -> None:
        """The pool dropped `digest` (under the lock): out of every tier."""
        self.host.pop(digest)
        self._prefetched.discard(digest)
        if digest in self._resident:  # a load in progress drops itself at publish
            self._evict(digest, count=False)

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

    # -- residency ----------------------------------------------------------


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
        if self.device.cpu_path:  # a load's parallel ops (DoRA norms) must not start a second OpenMP team
            one_torch_thread()
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
        if self.host.budget and adapter.nbytes <= self.host.budget:
            adapter = host_copy(adapter, pinned=self._cuda)
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
        not enough. Where those evictions would leave no run of `rank` free
        pages, the adapters of the cheapest window of `rank` pages go
        instead, if one can be freed: a slot on scattered pages gets its
        compute views as gathered copies, which cost a load 30-70 ms
        instead of about 10 (rank 32, default model)."""
        victims, pages, slots = [], self.device.pages.num_free, self.device.num_free_slots
        for d in self._resident:
            if pages >= rank and slots >= 1:
                break
            if d != digest and evictable(d):
                victims.append(d)
                pages, slots = pages + self._pages(d), slots + 1
        if pages < rank or slots < 1:
            return None
        if self.device.cpu_path and not self.device.pages.has_run(
                rank, frozenset(p for d in victims for p in self.device.pages_of(self._slots[d]))):
            window = self._window_victims(digest, rank, evictable)
            if window:  # never empty: its pages would be a free run
                victims = window
        for d in victims:
            self._evict(d)
        slot = self.device.reserve(rank)
        self._slots[digest] = slot
        return slot

    def _window_victims(self, digest: str, rank: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """The evictable adapters whose eviction frees the window of `rank`
        pages that costs the fewest pages of resident adapters (of equal
        costs, the one whose most recently used victim is the oldest, then the
        lowest); None if no window can be freed. A pure scan under the lock,
        O(pages x rank) at worst: about 16k steps for a 512-page pool at rank 32."""
        allocator = self.device.pages
        age = {d: i for i, d in enumerate(self._resident)}  # 0: least recently used
        owner = {p: d for d in self._resident if d != digest and evictable(d)
                 for p in self.device.pages_of(self._slots[d])}
        best, best_cost = None, None
        start = 0
        while start + rank <= self.device.num_pages:
            window: set[str] = set()
            for p in range(start, start + rank):
                if not allocator.is_free(p):
                    d = owner.get(p)
                    if d is None:  # pinned, busy or being copied: no window through it
                        break
                    window.add(d)
            else:
                cost = (sum(self._pages(d) for d in window), max((age[d] for d in window), default=-1))
                if best_cost is None or cost < best_cost:
                    best, best_cost = window, cost
                start += 1
                continue
            start = p + 1  # every window over page p is blocked
        return None if best is None else sorted(best, key=age.__getitem__)

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
