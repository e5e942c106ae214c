"""The adapter pool: disk -> host -> device tiers, LRU with pins, prefetch.

Bookkeeping runs on a tiny ModelConfig with synthetic adapters (no model);
the end-to-end test serves 200 adapters from disk through a device budget
of about 8 on a tiny random Llama and compares with everything resident.
"""
from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from loramux.adapters_store.device_pool import DeviceLoraPool
from loramux.adapters_store.host_cache import HostCache
from loramux.adapters_store.pool import AdapterGone, AdapterPool
from loramux.adapters_store.registry import AdapterRegistry, RegisteredAdapter
from loramux.adapters_store.sources import AdapterSource, AdapterUnavailable
from loramux.server.config import LORA_GROUPS, LORA_MODULES, EngineConfig, ModelConfig
from loramux.adapters_store.peft_format import WEIGHTS_NAME, LoraAdapter, save_peft_adapter
from loramux.bench.popularity import choose
from loramux.bench.synthetic import random_adapter
from loramux.server.errors import Conflict, NotFound, Unprocessable

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=16, intermediate_size=24, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=256, tie_word_embeddings=False, qkv_bias=False)


def synth(cfg: ModelConfig, name: str, rank: int, seed: int = 0, modules=LORA_MODULES) -> LoraAdapter:
    """An in-memory adapter, weights N(0, 0.3²), scale 2."""
    return random_adapter(cfg, name, rank, seed, modules, alpha=2.0 * rank, weight_scale=0.3)


def device(pages: int, slots: int = 16) -> DeviceLoraPool:
    max_rank = min(pages, 64)
    probe = DeviceLoraPool(CFG, 10**9, 1, max_rank, torch.float32)
    return DeviceLoraPool(CFG, pages * probe.page_bytes, slots, max_rank, torch.float32)


class Counting:
    """A disk source that counts its reads."""

    def __init__(self, adapter: LoraAdapter):
        self.adapter, self.reads = adapter, 0

    def __call__(self) -> LoraAdapter:
        self.reads += 1
        return self.adapter


def disk_source(adapter: LoraAdapter) -> AdapterSource:
    return AdapterSource(adapter.name, adapter.digest, adapter.rank, adapter.nbytes, Counting(adapter))


def assert_holds(pool: AdapterPool, slot: int, adapter: LoraAdapter) -> None:
    """The slot's pages, ranks and scales hold exactly this adapter."""
    dev = pool.device
    r = adapter.rank
    pages = dev.page_table[slot, :r].long()
    for (layer, m), w in adapter.modules.items():
        group = next(g for g, (lo, n) in LORA_GROUPS.items() if LORA_MODULES.index(m) in range(lo, lo + n))
        lo, _ = LORA_GROUPS[group]
        s = LORA_MODULES.index(m) - lo
        torch.testing.assert_close(dev.a_pages[layer][group][pages[: w.rank], s], w.a, rtol=0, atol=0)
        torch.testing.assert_close(dev.a_pages[layer][group][pages[w.rank :], s],
                                   torch.zeros(r - w.rank, w.a.shape[1]), rtol=0, atol=0)
        assert int(dev.ranks[layer, LORA_MODULES.index(m), slot]) == w.rank


# ---------------------------------------------------------------------------
# bookkeeping
# ---------------------------------------------------------------------------

def test_lru_order_and_pinned_never_evicted():
    pool = AdapterPool(device(48), prefetch=False)
    ads = [synth(CFG, f"a{i}", 16, i) for i in range(5)]
    for a in ads:
        pool.add(disk_source(a))
    d = [a.digest for a in ads]
    pool.make_resident([d[0]])
    pool.make_resident([d[1]])
    pool.make_resident([d[2]])
    pool.make_resident([d[0]])  # d0 is now the most recently used: LRU order d1, d2, d0
    assert pool.resident() == [d[1], d[2], d[0]]
    pool.make_resident([d[3]], in_use=frozenset({d[1]}))  # d1 pinned: d2 leaves
    assert pool.resident() == [d[1], d[0], d[3]]
    assert not pool.fits(frozenset({d[4]}), frozenset({d[1], d[0], d[3]}))
    with pytest.raises(MemoryError):
        pool.make_resident([d[4]], in_use=frozenset({d[1], d[0], d[3]}))
    pool.check_consistent()
    assert pool.fits(frozenset({d[4]}), frozenset({d[1], d[3]}))
    slots = pool.make_resident([d[4]], in_use=frozenset({d[1], d[3]}))
    assert pool.resident() == [d[1], d[3], d[4]]
    assert_holds(pool, slots[d[4]], ads[4])
    usage = pool.tier_usage()
    assert usage["device"].evictions == 2 and usage["device"].loads == 5  # d0 loaded once, reused
    assert sum(usage["device"].adapters.values()) == 48 * pool.device.page_bytes
    pool.check_consistent()


def test_pages_reused_across_ranks_4_to_64_without_fragmentation():
    pool = AdapterPool(device(100, slots=8), prefetch=False)
    rng = random.Random(0)
    ads = [synth(CFG, f"r{i}", rng.choice([4, 8, 12, 16, 24, 32, 48, 64]), i) for i in range(40)]
    for a in ads:
        pool.add(disk_source(a))
    for step in range(300):
        a = rng.choice(ads)
        # room is total free pages, never a contiguous run: any rank fits once enough is evicted
        slot = pool.make_resident([a.digest])[a.digest]
        assert_holds(pool, slot, a)
        pool.check_consistent()
        used = sum(len(pool.device.pages_of(pool.make_resident([d])[d])) for d in [a.digest])
        assert used == a.rank
    # every resident adapter still holds its own weights after all that churn
    by_digest = {a.digest: a for a in ads}
    for d in pool.resident():
        assert_holds(pool, pool.make_resident([d])[d], by_digest[d])


def test_an_eviction_frees_a_run_of_pages_where_lru_would_scatter():
    """Pages 0-7 held by four rank-2 adapters, a1 and a3 used last: LRU alone would evict a0 and
    a2 and put a rank-4 adapter on pages 0, 1, 4, 5. The pool evicts the adapters of one window
    instead (a0 and a1: the first of the windows of equal cost), so the new adapter's pages run
    contiguously. With a1 pinned, no window may go through its pages: a2 and a3 go."""
    small = [synth(CFG, f"a{i}", 2, i) for i in range(4)]
    big = synth(CFG, "b", 4, 10)
    for pinned in (frozenset(), frozenset({small[1].digest})):
        pool = AdapterPool(device(8, slots=8), prefetch=False)
        for a in small + [big]:
            pool.add(disk_source(a))
        d = [a.digest for a in small]
        assert [pool.device.pages_of(pool.make_resident([x])[x]) for x in d] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        for digest in [d[1], d[3]]:
            pool.make_resident([digest])
        slot = pool.make_resident([big.digest], pinned)[big.digest]
        if not pinned:
            assert pool.device.pages_of(slot) == [0, 1, 2, 3]
            assert set(pool.resident()) == {d[2], d[3], big.digest}
        else:  # the cheapest windows through a1's pages are out
            assert pool.device.pages_of(slot) == [4, 5, 6, 7]
            assert set(pool.resident()) == {d[0], d[1], big.digest}
        assert_holds(pool, slot, big)
        pool.check_consistent()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_compiled_write_equals_the_torch_write(dtype):
    """A CPU pool given the compiled ops writes adapters with one op per layer and group: what lands in
    the pages is what torch's copies put there, bit for bit (mixed ranks, modules left out, DoRA,
    pages scattered by churn, a slot reused by a smaller adapter)."""
    from loramux.bench.lora_overhead import dora_copy
    from loramux.kernels.cpu_ext import cpu_ops
    from loramux.server.model.loader import cache_root

    ops = cpu_ops(cache_root())
    assert ops is not None, "the compiled CPU ops must build here"
    g = torch.Generator().manual_seed(0)
    base = {(layer, group): torch.randn(sum(CFG.module_shape(m)[0] for m in LORA_MODULES[lo : lo + n]),
                                        CFG.module_shape(LORA_MODULES[lo])[1], generator=g)
            for layer in range(CFG.num_layers) for group, (lo, n) in LORA_GROUPS.items()}
    probe = DeviceLoraPool(CFG, 10**9, 1, 32, dtype)
    pools = [DeviceLoraPool(CFG, 80 * probe.page_bytes, 8, 32, dtype, base_weights=lambda l, gr: base[l, gr],
                            ops=which) for which in (None, ops)]
    assert pools[0].ops is None and pools[1].ops is ops
    rng = random.Random(1)
    ads = [synth(CFG, f"m{i}", rng.choice([1, 4, 8, 16, 32]), i,
                 modules=rng.sample(LORA_MODULES, rng.randint(1, len(LORA_MODULES)))) for i in range(12)]
    ads += [dora_copy(synth(CFG, "d", 8, 99), "d", seed=5)]
    held: list[int] = []
    for step in range(40):
        a = ads[step % len(ads)]
        while not all(p.fits(a.rank) for p in pools) or len(held) > 4:
            slot = held.pop(rng.randrange(len(held)))
            for p in pools:
                p.unload(slot)
        slots = {p.load(a) for p in pools}
        assert len(slots) == 1
        held.append(slots.pop())
    torch_pool, compiled_pool = pools
    runs = [torch_pool.pages_of(s) for s in held]
    assert any(p != list(range(p[0], p[0] + len(p))) for p in runs), "no slot's pages were scattered"
    for layer in range(CFG.num_layers):
        for group in LORA_GROUPS:
            for name in ("a_pages", "b_block", "dora_scale"):
                assert torch.equal(getattr(torch_pool, name)[layer][group], getattr(compiled_pool, name)[layer][group])
    for name in ("page_table", "ranks", "scales"):
        assert torch.equal(getattr(torch_pool, name), getattr(compiled_pool, name))


def test_a_bf16_triton_pool_takes_float32_adapters_on_scattered_pages(monkeypatch):
    """The Triton layout (a CUDA pool in the model's dtype) writes scattered pages with an index_put,
    which once refused float32 weights into bf16 pages."""
    monkeypatch.setenv("LORAMUX_TRITON", "1")
    probe = DeviceLoraPool(CFG, 10**9, 1, 16, torch.bfloat16)
    pool = DeviceLoraPool(CFG, 24 * probe.page_bytes, 4, 16, torch.bfloat16)
    assert not pool.cpu_path
    first = pool.load(synth(CFG, "a", 8, 0))
    pool.load(synth(CFG, "b", 8, 1))
    pool.unload(first)
    pool.load(synth(CFG, "c", 4, 2))  # takes 4 of the first's pages
    a = synth(CFG, "d", 12, 3)
    slot = pool.load(a)  # 4 pages left in the first's run, 8 after the second's
    pages = pool.pages_of(slot)
    assert pages != list(range(pages[0], pages[0] + len(pages)))
    w = a.modules[(0, "q_proj")]
    torch.testing.assert_close(pool.a_pages[0]["qkv"][pages, 0], w.a.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(pool.b[0]["qkv"][pages, : w.b.shape[0]], w.b.T.bfloat16(), rtol=0, atol=0)


def test_host_tier_budget_lru_and_disk_reads():
    ads = [synth(CFG, f"h{i}", 8, i) for i in range(4)]
    pool = AdapterPool(device(8, slots=1), host_bytes=2 * ads[0].nbytes, prefetch=False)
    sources = [disk_source(a) for a in ads]
    for s in sources:
        pool.add(s)
    for a in ads[:3]:
        pool.make_resident([a.digest])
    host = pool.tier_usage()["host"]
    assert set(host.adapters) == {ads[1].digest, ads[2].digest}  # a0 left the host tier (LRU)
    assert host.evictions == 1 and sum(host.adapters.values()) <= 2 * ads[0].nbytes
    pool.make_resident([ads[1].digest])  # from host memory, not disk
    assert [s.load.reads for s in sources] == [1, 1, 1, 0]
    assert pool.tier_usage()["host"].prefetch_hits == 1
    pool.make_resident([ads[0].digest])  # from disk again
    assert sources[0].load.reads == 2
    pool.check_consistent()


def test_store_files_are_mapped_on_local_filesystems_only():
    """A network filesystem can fail a mapped page once another node deletes the file."""
    from loramux.adapters_store.sources import LOCAL_FILESYSTEMS, filesystem_type

    mountinfo = "\n".join([
        "27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        "40 27 0:50 / /mnt/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2",
        "41 27 0:51 / /mnt/my\\040store rw - xfs /dev/vdb rw",
        "42 40 0:52 / /mnt/shared/local rw - tmpfs tmpfs rw",
    ])
    assert filesystem_type("/srv/adapters/a", mountinfo) == "ext4"
    assert filesystem_type("/mnt/shared/adapters/a", mountinfo) == "nfs4"
    assert filesystem_type("/mnt/shared", mountinfo) == "nfs4"
    assert filesystem_type("/mnt/sharedx/a", mountinfo) == "ext4"  # a prefix of the name is not the mount
    assert filesystem_type("/mnt/my store/a", mountinfo) == "xfs"
    assert filesystem_type("/mnt/shared/local/a", mountinfo) == "tmpfs"
    assert "nfs4" not in LOCAL_FILESYSTEMS and "ext4" in LOCAL_FILESYSTEMS


def test_the_host_tier_keeps_copies_not_mapped_store_files(tmp_path):
    """A store folder's weights are mapped when read; a CPU pool's host tier keeps the adapter
    in memory of its own, so a cached adapter holds no file (a mapping keeps a descriptor open:
    a large host tier of mapped adapters would run the process out of them)."""
    import os

    from loramux.adapters_store.peft_format import load_peft_adapter

    ads = [synth(CFG, f"m{i}", 4, i) for i in range(6)]
    sources = []
    for a in ads:
        save_peft_adapter(a, tmp_path / a.name)
        sources.append(AdapterSource.from_store(tmp_path / a.name, load_peft_adapter(tmp_path / a.name, CFG, 64, a.name),
                                                CFG, 64))
    pool = AdapterPool(device(8, slots=1), host_bytes=10 * ads[0].nbytes, prefetch=False)
    digests = [pool.add(source) for source in sources]
    fds = len(os.listdir("/proc/self/fd"))
    for d in digests:
        pool.make_resident([d])
    assert len(pool.tier_usage()["host"].adapters) == len(ads)
    assert len(os.listdir("/proc/self/fd")) == fds
    slot = pool.make_resident([digests[0]])[digests[0]]  # from the host tier
    assert [s.load.mapped for s in sources] == [True] * len(ads) and pool.tier_usage()["host"].prefetch_hits == 1
    assert_holds(pool, slot, ads[0])


def test_host_cache_keeps_protected_entries():
    ads = [synth(CFG, f"c{i}", 4, i) for i in range(3)]
    cache = HostCache(2 * ads[0].nbytes)
    assert cache.put(ads[0]) == [] and cache.put(ads[1]) == []
    assert cache.put(ads[2], keep={ads[0].digest, ads[1].digest}) is None
    assert cache.put(ads[2], keep={ads[0].digest}) == [ads[1].digest]
    assert cache.nbytes == 2 * ads[0].nbytes


def test_an_adapter_above_the_pools_rank_is_refused_and_nothing_is_held():
    pool = AdapterPool(DeviceLoraPool(CFG, 2**24, 16, 8, torch.float32), prefetch=False)  # max rank 8
    big = synth(CFG, "big", 16, 1)
    for add in (lambda: pool.add(big), lambda: pool.add_mix(big)):
        with pytest.raises(Unprocessable) as e:
            add()
        assert e.value.code == "adapter_too_large" and "16" in str(e.value)
        assert big.digest not in pool and pool.total_refs() == 0 and pool.mix_bytes() == 0
    assert pool.add(synth(CFG, "fits", 8, 2)) in pool
    pool.check_consistent()


def test_refs_released_and_names_are_digests():
    pool = AdapterPool(device(64), prefetch=False)
    registry = AdapterRegistry(pool)
    v1, v2 = synth(CFG, "a", 8, 1), synth(CFG, "a", 8, 2)
    s1 = disk_source(v1)
    registry.register(RegisteredAdapter("a", s1))
    d1 = registry.lookup("a").digest
    pool.acquire(d1)  # request r1
    pool.make_resident([d1], frozenset({d1}))
    registry.unregister("a")  # r1 still holds d1: its weights are read into memory now
    assert s1.load.reads == 2 and "a" not in registry and pool.source(d1).held
    with pytest.raises(NotFound):
        registry.unregister("a")
    registry.register(RegisteredAdapter("a", AdapterSource.in_memory(v2)))
    d2 = registry.lookup("a").digest
    assert d2 != d1 and pool.is_resident(d1)
    with pytest.raises(Conflict):
        registry.register(RegisteredAdapter("a", AdapterSource.in_memory(v1)))
    pool.release(d1)
    assert pool.refs(d1) == 0 and not pool.is_resident(d1) and d1 not in pool
    assert set(pool.tier_usage()["disk"].adapters) == {d2}
    with pytest.raises(AdapterGone):  # a request checked before the delete, admitted after
        pool.acquire(d1)
    pool.check_consistent()


def test_same_weights_under_two_names_are_held_once_until_both_go():
    pool = AdapterPool(device(64), prefetch=False)
    registry = AdapterRegistry(pool)
    v = synth(CFG, "x", 8, 3)
    s1, s2 = disk_source(v), disk_source(v)
    registry.register(RegisteredAdapter("x", s1))
    registry.register(RegisteredAdapter("y", s2))
    assert registry.lookup("x").digest == registry.lookup("y").digest == v.digest
    assert set(pool.tier_usage()["disk"].adapters) == {v.digest}
    registry.unregister("x")  # "y" still names the weights: nothing is read or dropped
    assert v.digest in pool and [s1.load.reads, s2.load.reads] == [1, 0]
    registry.unregister("y")
    assert v.digest not in pool and len(registry) == 0
    pool.check_consistent()


@pytest.mark.parametrize("owner", ["user", "store"])
def test_folder_source_reads_back_and_checks_identity(tmp_path, owner):
    """A user's folder is read, a store's mapped: the same weights either way,
    and a file replaced since registration is refused either way."""
    a = synth(CFG, "f", 8, 3, modules=("q_proj", "v_proj", "down_proj"))
    save_peft_adapter(a, tmp_path / "f")
    from loramux.adapters_store.peft_format import load_peft_adapter

    parsed = load_peft_adapter(tmp_path / "f", CFG, 64, "f")
    make = AdapterSource.from_folder if owner == "user" else AdapterSource.from_store
    source = make(tmp_path / "f", parsed, CFG, 64)
    assert source.load.mapped == (owner == "store")
    back = source.load()
    assert back.digest == parsed.digest and back.modules.keys() == parsed.modules.keys()
    for k, w in parsed.modules.items():
        assert torch.equal(back.modules[k].a, w.a) and torch.equal(back.modules[k].b, w.b)
        assert back.modules[k].scale == w.scale
    # the file replaced by other weights: parsed in full, digest differs, refused
    save_peft_adapter(synth(CFG, "f", 8, 4, modules=("q_proj", "v_proj", "down_proj")), tmp_path / "f")
    with pytest.raises(AdapterUnavailable):
        source.load()
    (tmp_path / "f" / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterUnavailable):
        source.load()


def test_prefetch_loads_waiting_adapters_and_counts_hits():
    pool = AdapterPool(device(32), prefetch=True)
    ads = [synth(CFG, f"p{i}", 8, i) for i in range(6)]
    for a in ads:
        pool.add(disk_source(a))
    d = [a.digest for a in ads]
    pool.make_resident([d[0]], frozenset({d[0]}))
    pool.prefetch(d[1:], frozenset({d[0]}))  # room for 3 beside the pinned d0
    assert pool.wait_idle()
    assert set(pool.resident()) == {d[0], d[1], d[2], d[3]}
    slots = pool.make_resident([d[1], d[2]], frozenset({d[1], d[2]}))
    assert pool.tier_usage()["device"].prefetch_hits == 2
    assert_holds(pool, slots[d[1]], ads[1])
    pool.close()
    pool.check_consistent()


def test_prefetch_never_evicts_a_pinned_adapter_the_step_did_not_touch():
    """a0 is in use by a running request that this step does not compute, so
    it is the least recently used; the worker makes room for two waiting
    adapters by evicting a1 and a2, never a0, whose slot keeps its weights."""
    pool = AdapterPool(device(32, slots=4), prefetch=True)
    ads = [synth(CFG, f"q{i}", 8, i) for i in range(6)]
    for a in ads:
        pool.add(disk_source(a))
    d = [a.digest for a in ads]
    slots = {k: pool.make_resident([k])[k] for k in d[:4]}  # full: 32 pages, 4 slots; LRU a0 .. a3
    in_use = frozenset({d[0], d[3]})
    pool.make_resident([d[3]], in_use)
    pool.prefetch([d[4], d[5]], in_use)
    assert pool.wait_idle()
    assert set(pool.resident()) == {d[0], d[3], d[4], d[5]}
    assert_holds(pool, slots[d[0]], ads[0])
    assert_holds(pool, slots[d[3]], ads[3])
    pool.close()
    pool.check_consistent()


def test_step_and_worker_race_keeps_pages_intact():
    """The engine thread serves random batches while the worker prefetches
    others: every slot a step gets holds its adapter's weights."""
    pool = AdapterPool(device(64, slots=8), prefetch=True)
    rng = random.Random(1)
    ads = [synth(CFG, f"t{i}", rng.choice([4, 8, 16]), i) for i in range(24)]
    for a in ads:
        pool.add(disk_source(a))
    by_digest = {a.digest: a for a in ads}
    digests = list(by_digest)
    for _ in range(150):
        batch = rng.sample(digests, 3)
        if not pool.fits(frozenset(batch)):
            continue
        slots = pool.make_resident(batch, frozenset(batch))
        pool.prefetch(rng.sample(digests, 6), frozenset(batch))
        for dg, slot in slots.items():  # the "step" reads its pages while the worker copies
            assert_holds(pool, slot, by_digest[dg])
    pool.wait_idle()
    pool.close()
    pool.check_consistent()


class PoolMachine(RuleBasedStateMachine):
    """Random register / acquire / release / step / prefetch / unregister,
    with the prefetch worker running concurrently."""

    def __init__(self):
        super().__init__()
        self.pool = AdapterPool(device(40, slots=6), host_bytes=0, prefetch=True)
        self.adapters: dict[str, LoraAdapter] = {}  # digest -> weights, every one ever registered
        self.names: dict[str, str] = {}  # registrations: name -> digest
        self.held: list[str] = []  # digests held by "requests"
        self.n = 0

    @rule(rank=st.sampled_from([4, 8, 16, 32]))
    def register(self, rank):
        a = synth(CFG, f"m{self.n}", rank, self.n)
        self.n += 1
        self.pool.add(disk_source(a) if self.n % 2 else a)
        self.adapters[a.digest], self.names[a.name] = a, a.digest

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def acquire(self, data):
        d = self.names[data.draw(st.sampled_from(sorted(self.names)))]
        self.pool.acquire(d)
        self.held.append(d)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        d = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.release(d)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def unregister(self, data):
        name = data.draw(st.sampled_from(sorted(self.names)))
        self.pool.detach(self.names.pop(name))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), settle=st.booleans())
    def step(self, data, settle):
        # running: adapters of running requests (pinned); batch: those this step computes
        running = frozenset(data.draw(st.lists(st.sampled_from(self.held), max_size=3)))
        batch = frozenset(data.draw(st.lists(st.sampled_from(sorted(running)), max_size=3))) if running else frozenset()
        if not self.pool.fits(batch | running):
            return
        slots = self.pool.make_resident(sorted(batch), running)
        for d, slot in slots.items():
            assert_holds(self.pool, slot, self.adapters[d])
        pinned = {d for d in running if self.pool.is_resident(d)}
        assert set(slots) <= pinned
        waiting = [d for d in self.held if d not in running]
        self.pool.prefetch(waiting, running)
        self.check_pinned(pinned, slots)  # while the worker loads the waiting ones
        if settle:
            assert self.pool.wait_idle()
            self.check_pinned(pinned, slots)  # and once it is done

    def check_pinned(self, pinned: set[str], slots: dict[str, int]) -> None:
        """Adapters in use stay resident, and the step's slots hold their weights."""
        for d in pinned:
            assert self.pool.is_resident(d), "the prefetch worker evicted an adapter in use"
        for d, slot in slots.items():
            assert_holds(self.pool, slot, self.adapters[d])

    @invariant()
    def consistent(self):
        self.pool.check_consistent()
        dev = self.pool.device
        assert dev.pages.num_free >= 0 and sum(self.pool.tier_usage()["device"].adapters.values()) \
            <= dev.num_pages * dev.page_bytes

    def teardown(self):
        self.pool.wait_idle()
        self.pool.close()
        self.pool.check_consistent()
        for d in list(self.held):
            self.pool.release(d)
        for name in list(self.names):
            self.pool.detach(self.names.pop(name))
        assert not self.pool.resident() and not self.pool.tier_usage()["disk"].adapters


PoolMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
test_pool_state_machine = PoolMachine.TestCase


# ---------------------------------------------------------------------------
# a tiny model: 200 adapters on disk, a device budget of about 8
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many(tmp_path_factory):
    from transformers import AutoConfig

    from helpers.tiny import make_model

    root = tmp_path_factory.mktemp("many")
    make_model(root / "base", "llama")
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(root / "base"))
    rng = random.Random(5)
    adapters = []
    for i in range(200):
        a = synth(cfg, f"ad{i}", rng.choice([4, 8, 16]), 100 + i)
        save_peft_adapter(a, root / a.name)
        adapters.append(a)
    return root, cfg, adapters


def _engine(root, cfg, adapters, pool_bytes, from_disk, **options):
    from loramux.server.engine.engine import Engine
    from loramux.server.llm import DTYPES
    from loramux.server.model.loader import load_safetensors_weights
    from loramux.server.model.llama import LlamaModel

    model = LlamaModel(cfg, load_safetensors_weights(root / "base"), DTYPES["float32"])
    options = {"max_num_seqs": 32, "kv_cache_bytes": 4 * 2**20, **options}
    config = EngineConfig(block_size=4, max_lora_rank=16, adapter_pool_bytes=pool_bytes, **options)
    engine = Engine(model, None, config)
    for a in adapters:
        engine.adapters.add(AdapterSource.from_folder(root / a.name, a, cfg, 16) if from_disk else a)
    return engine


def test_200_adapters_through_8_resident_equal_all_resident(many):
    from loramux.server.engine.sampling import SamplingParams

    root, cfg, adapters = many
    page = DeviceLoraPool(cfg, 10**9, 1, 16, torch.float32).page_bytes
    rng = random.Random(7)
    picks = choose("zipf", len(adapters), 300, rng)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randint(2, 6))] for _ in picks]
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def serve(engine):
        ids = [engine.add_request(p, params, adapters[k].digest) for p, k in zip(prompts, picks)]
        out = engine.run_to_completion()
        return [[t for o in out[i] for t in o.token_ids] for i in ids]

    full = _engine(root, cfg, adapters, page * sum(a.rank for a in adapters), False, max_adapter_slots=256)
    want = serve(full)
    small = _engine(root, cfg, adapters, page * 8 * 8, True)  # ranks 4/8/16: about 8 adapters
    got = serve(small)
    assert got == want
    pool = small.adapters
    usage = pool.tier_usage()
    assert usage["device"].evictions > 0 and usage["disk"].loads >= len(set(picks))
    assert sum(usage["device"].adapters.values()) <= small.config.adapter_pool_bytes
    assert usage["host"].adapters == {}  # CPU: the host tier is skipped
    assert all(pool.refs(a.digest) == 0 for a in adapters)
    pool.wait_idle()
    pool.check_consistent()


def _page_bytes(cfg) -> int:
    return DeviceLoraPool(cfg, 10**9, 1, 16, torch.float32).page_bytes


def _serve(engine, requests, on_step=None) -> dict[str, list[int]]:
    """Step `requests` (prompt, params, digest) to completion; tokens by request id."""
    ids = [engine.add_request(p, params, d) for p, params, d in requests]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            tokens[o.request_id].extend(o.token_ids)
        if on_step is not None:
            on_step(engine)
    return [tokens[i] for i in ids]


def test_kv_preemption_and_adapter_eviction_together(many):
    """A KV cache of 80 tokens and a device pool of about 8 adapters: requests
    are preempted, their adapters evicted while they wait, and reloaded when
    they come back; every output equals an unconstrained engine's."""
    from loramux.server.engine.sampling import SamplingParams

    root, cfg, adapters = many
    adapters = adapters[:30]
    rng = random.Random(3)
    requests = [([rng.randrange(3, 128) for _ in range(rng.randint(4, 20))],
                 SamplingParams(max_tokens=rng.randint(4, 10), ignore_eos=True), rng.choice(adapters).digest)
                for _ in range(40)]
    page = _page_bytes(cfg)
    full = _engine(root, cfg, adapters, page * sum(a.rank for a in adapters), False, max_adapter_slots=64)
    want = _serve(full, requests)
    assert full.num_preemptions == 0 and full.adapters.tier_usage()["device"].evictions == 0
    # no prefetch worker: which adapters are resident after each step is deterministic
    small = _engine(root, cfg, adapters, page * 8 * 8, True, kv_cache_bytes=40 * 1024, max_num_batched_tokens=32,
                    adapter_prefetch=False)
    assert small.allocator.num_blocks * small.allocator.block_size == 80
    evicted_while_preempted = set()

    def watch(engine):
        for r in engine.scheduler.waiting:
            if r.num_preemptions and not engine.adapters.is_resident(r.adapter_digest):
                evicted_while_preempted.add(r.request_id)

    assert _serve(small, requests, watch) == want
    assert small.num_preemptions > 0 and small.adapters.tier_usage()["device"].evictions > 0
    assert evicted_while_preempted, "no preempted request lost its adapter while it waited"
    assert small.allocator.num_free == small.allocator.num_blocks and small.adapters.total_refs() == 0
    small.adapters.wait_idle()
    small.adapters.check_consistent()


def test_host_tier_in_the_engine_serves_device_loads_from_memory(many):
    """adapter_host_bytes on a CPU: adapters read from disk stay in the host
    tier and the device loads after eviction come from there (counted as
    host prefetch hits, fewer disk reads); outputs unchanged."""
    from loramux.server.engine.sampling import SamplingParams

    root, cfg, adapters = many
    adapters = adapters[:24]
    rng = random.Random(4)
    picks = choose("zipf", len(adapters), 120, rng)
    requests = [([rng.randrange(3, 128) for _ in range(rng.randint(2, 6))],
                 SamplingParams(max_tokens=3, ignore_eos=True), adapters[k].digest) for k in picks]
    page = _page_bytes(cfg)
    full = _engine(root, cfg, adapters, page * sum(a.rank for a in adapters), False, max_adapter_slots=64)
    want = _serve(full, requests)
    host_bytes = sum(a.nbytes for a in adapters)
    small = _engine(root, cfg, adapters, page * 8 * 8, True, adapter_host_bytes=host_bytes)
    assert small.adapters.host.budget == host_bytes
    assert _serve(small, requests) == want
    usage = small.adapters.tier_usage()
    assert usage["device"].evictions > 0
    assert usage["host"].loads == usage["disk"].loads > 0  # every disk read kept in memory
    assert usage["host"].prefetch_hits > 0
    assert usage["disk"].loads <= len(set(picks)) < usage["device"].loads
    assert set(usage["host"].adapters) == {adapters[k].digest for k in set(picks)}
    small.adapters.wait_idle()
    small.adapters.check_consistent()


def test_abort_and_finish_release_their_adapters(many, tmp_path):
    """Aborted requests (one running, one waiting) produce nothing after the
    abort; a request whose adapter's registration goes (and its folder with
    it) finishes with the weights it was admitted with: every other output
    equals a fresh engine's; every reference and pin is given back."""
    import shutil

    from loramux.server.engine.sampling import SamplingParams

    root, cfg, adapters = many
    adapters = adapters[:20]
    page = _page_bytes(cfg)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    requests = [([5, 6, 7 + i], params, adapters[i].digest) for i in range(12)]
    want = _serve(_engine(root, cfg, adapters, page * 64, False), requests)
    # adapter 11 from a copy of its folder, deleted right after its registration
    # goes; no prefetch, so it is on no tier but the disk until then
    k = 11
    engine = _engine(root, cfg, adapters[:k] + adapters[k + 1:], page * 64, True, max_num_seqs=4,
                     adapter_prefetch=False)
    folder = shutil.copytree(root / adapters[k].name, tmp_path / "copy")
    engine.adapters.add(AdapterSource.from_folder(folder, adapters[k], cfg, 16))
    ids = [engine.add_request(p, s, d) for p, s, d in requests]
    results: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(2):
        for o in engine.step():
            results[o.request_id].extend(o.token_ids)
    running = [r.request_id for r in engine.scheduler.running]
    waiting = [r.request_id for r in engine.scheduler.waiting]
    assert running and waiting and ids[k] in waiting[1:]
    assert not engine.adapters.is_resident(adapters[k].digest)
    aborted = {running[0], waiting[0]}
    for rid in aborted:
        assert engine.abort(rid)
    engine.adapters.detach(adapters[k].digest)  # held by request k: its weights are read into memory now
    shutil.rmtree(folder)
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in aborted, "an aborted request produced output"
            assert o.error is None, o.error
            results[o.request_id].extend(o.token_ids)
    for i, rid in enumerate(ids):
        if rid in aborted:
            assert len(results[rid]) < params.max_tokens
        else:
            assert results[rid] == want[i], i
    pool = engine.adapters
    assert all(pool.refs(a.digest) == 0 for a in adapters)
    assert not engine.abort(ids[0]) and engine.allocator.num_free == engine.allocator.num_blocks
    engine.step()  # nothing left: the pins of the last step go
    assert pool.pinned() == frozenset()
    assert adapters[k].digest not in pool and adapters[k].digest not in pool.tier_usage()["disk"].adapters
    pool.wait_idle()
    pool.check_consistent()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 or more torch threads to tell")
def test_the_prefetch_worker_runs_torch_on_one_thread():
    """The worker's loads (DoRA norms, conversions) must not start a second OpenMP team beside the
    engine thread's (server/compute_threads.py)."""
    seen = []
    a = synth(CFG, "t", 8, 0)

    def load():
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return a

    pool = AdapterPool(device(32), prefetch=True)
    pool.add(AdapterSource(a.name, a.digest, a.rank, a.nbytes, load))
    pool.prefetch([a.digest])
    assert pool.wait_idle()
    assert seen == [("loramux-prefetch", 1)] and torch.get_num_threads() >= 2
    pool.close()
