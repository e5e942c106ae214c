"""Prometheus metrics, named like vLLM's where the meaning is the same, prefixed `loramux:`;
and the router protocol's `vllm:` names.

One `Metrics` per app, on its own CollectorRegistry. Two feeds:
- `on_step(engine, outputs)` runs in the engine thread after every step
  (AsyncEngine.on_step): a `SchedulerReading` (queue gauges, KV usage, the
  adapters of running and waiting requests), queue time, preemptions,
  token counters and the adapter pool;
- `RequestTimer` runs in the event loop, one per HTTP request: TTFT,
  inter-token latency, end-to-end latency and the finish reason.
prometheus_client's metrics are thread-safe, so the two never lock each other.

The Kubernetes Gateway API inference extension's endpoint picker reads the
"model server protocol" (docs/proposals/003-model-server-protocol in
kubernetes-sigs/gateway-api-inference-extension) under vLLM's names, which
`RouterCollector` serves from the last reading at each scrape:
`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc` (each also under its `loramux:` name, from the same
reading), `vllm:cache_config_info{block_size, num_gpu_blocks, ...} 1` and
`vllm:lora_requests_info{max_lora, running_lora_adapters,
waiting_lora_adapters} <unix time>`. The picker takes the LoRA series with the
newest value; this one has exactly one series, built at the scrape. Its
running list is every adapter resident in the device pool (a request for it
starts without a load) plus those of running requests; waiting: the adapters
of waiting requests that are not resident. Adapters by registry name,
comma-separated and sorted; a digest no name holds (a per-request mix, a
deleted name) is left out.

Per-adapter series exist only for adapters in the registry (requests carry
their adapter's name as their label, CheckedRequest.adapter_label):
`forget_adapter` (in the engine thread) removes a deleted adapter's series,
every per-request mix counts under the one label "mix", and a client can
never add a label value by sending requests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily

from loramux.adapters_store.residency import TierUsage
from loramux.adapters_store.registry import AdapterRegistry

P = "loramux:"
V = "vllm:"  # the router protocol's names (RouterCollector)
MIX_LABEL = "mix"
_FINISH_REASONS = ("stop", "length", "abort", "error")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class KVCacheInfo:
    """The KV cache's fixed shape, shown as vllm:cache_config_info's labels."""

    block_size: int  # tokens per block
    num_blocks: int  # blocks in the cache (vLLM's num_gpu_blocks, on any device)
    dtype: str  # e.g. "float32", "bfloat16"


@dataclass(frozen=True)
class SchedulerReading:
    """The scheduler after one step (taken in the engine thread, read at scrapes)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    running_digests: frozenset[str] = frozenset()  # adapters of running requests
    waiting_digests: frozenset[str] = frozenset()  # adapters of waiting requests


def pool_tiers(pool) -> dict[str, TierUsage]:
    """Per tier of the adapter pool (disk, host, device): the adapters it
    holds with their bytes, and its load / eviction / prefetch-hit counters.
    Every pool metric follows from this function."""
    return pool.tier_usage()


class Metrics:
    def __init__(self, max_loras: int, adapters: AdapterRegistry, kv_cache: KVCacheInfo):
        """`max_loras`: adapters per batch (vllm:lora_requests_info's max_lora);
        `adapters`: the registry (names, and the pool that says which are resident)."""
        self.registry = r = CollectorRegistry()
        self.max_loras = max_loras
        self.adapters = adapters  # which labels are adapters that exist
        self.reading = SchedulerReading()  # replaced whole by each step (one assignment: thread-safe)
        # running / waiting / KV usage (loramux: and vllm:), cache config, LoRA info
        r.register(RouterCollector(self, kv_cache))
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of requests admitted", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", registry=r)
        self.success = Counter(P + "request_success", "Requests finished, by finish reason",
                               ["finished_reason"], registry=r)
        self.preemptions = Counter(P + "num_preemptions", "Requests preempted (KV recomputed)", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between tokens of one request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Time waiting before first scheduled",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        # per adapter ("" = the base model)
        self.adapter_running = Gauge(P + "adapter_requests_running", "Running requests per adapter",
                                     ["adapter"], registry=r)
        self.adapter_waiting = Gauge(P + "adapter_requests_waiting", "Waiting requests per adapter",
                                     ["adapter"], registry=r)
        self.adapter_tokens = Counter(P + "adapter_generation_tokens", "Tokens generated per adapter",
                                      ["adapter"], registry=r)
        self.adapter_success = Counter(P + "adapter_request_success", "Requests finished per adapter",
                                       ["adapter", "finished_reason"], registry=r)
        # adapter pool, per tier
        self.pool_adapters = Gauge(P + "adapter_pool_resident_adapters", "Adapters held by a pool tier",
                                   ["tier"], registry=r)
        self.pool_bytes = Gauge(P + "adapter_pool_resident_bytes", "Bytes of adapters held by a pool tier",
                                ["tier"], registry=r)
        self.pool_loads = Counter(P + "adapter_pool_loads", "Adapters loaded into a pool tier",
                                  ["tier"], registry=r)
        self.pool_evictions = Counter(P + "adapter_pool_evictions", "Adapters evicted from a pool tier",
                                      ["tier"], registry=r)
        self.pool_load_latency = Histogram(P + "adapter_load_seconds",
                                           "Time to load an adapter into a pool tier (device: from the "
                                           "moment it is wanted, disk read included)",
                                           ["tier"], buckets=_LOAD_BUCKETS, registry=r)
        self.pool_prefetch_hits = Counter(P + "adapter_pool_prefetch_hits",
                                          "Adapters a load found already in a tier thanks to prefetch "
                                          "(device: resident when its step came; host: copied from host memory)",
                                          ["tier"], registry=r)
        self.adapter_refs = Gauge(P + "adapter_refs", "References held on adapters by unfinished requests "
                                  "and per-request mixes (0 when idle)", registry=r)
        self.mix_bytes = Gauge(P + "adapter_mix_bytes", "Bytes of per-request mixes held or being built",
                               registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        self._preemptions_seen = 0
        self._seen_running: set[str] = set()  # request ids already scheduled once
        self._adapters_seen: set[str] = set()
        self._tier_seen: dict[str, TierUsage] = {}
        for reason in _FINISH_REASONS:
            self.success.labels(reason)

    # -- engine thread ------------------------------------------------------

    def forget_adapter(self, name: str) -> None:
        """`name` is deleted: its per-adapter series are removed."""
        self._adapters_seen.discard(name)
        for metric in (self.adapter_running, self.adapter_waiting, self.adapter_tokens):
            _remove(metric, name)
        for reason in _FINISH_REASONS:
            _remove(self.adapter_success, name, reason)

    def _label(self, label: str | None) -> str | None:
        """The series label of a request's adapter label ("" for the base
        model); None: not counted per adapter (its name was deleted)."""
        if label is None:
            return ""
        return label if label == MIX_LABEL or label in self.adapters else None

    def on_step(self, engine, outputs) -> None:
        sched, now = engine.scheduler, time.monotonic()
        alloc = engine.allocator
        self.preemptions.inc(engine.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = engine.num_preemptions

        running, waiting = {}, {}
        running_digests, waiting_digests = set(), set()  # one pass over each queue per step, for everything
        for req in sched.running:
            running_digests.add(req.adapter_digest)
            info = engine.request_info(req.request_id)
            name = self._label(info[0]) if info is not None else None
            if name is not None:
                running[name] = running.get(name, 0) + 1
            if req.request_id not in self._seen_running:
                self._seen_running.add(req.request_id)
                if info is not None:
                    self.queue_time.observe(now - info[1])
        for req in sched.waiting:
            waiting_digests.add(req.adapter_digest)
            info = engine.request_info(req.request_id)
            name = self._label(info[0]) if info is not None else None
            if name is not None:
                waiting[name] = waiting.get(name, 0) + 1
        self._seen_running.intersection_update(r.request_id for r in (*sched.running, *sched.waiting))
        self.reading = SchedulerReading(
            sched.num_running, sched.num_waiting, 1.0 - alloc.num_free / alloc.num_blocks,
            frozenset(running_digests - {None}), frozenset(waiting_digests - {None}))
        for name in self._adapters_seen | running.keys() | waiting.keys():
            self.adapter_running.labels(name).set(running.get(name, 0))
            self.adapter_waiting.labels(name).set(waiting.get(name, 0))
        self._adapters_seen |= running.keys() | waiting.keys()

        for out in outputs:
            n = len(out.token_ids)
            if out.num_output_tokens == n:  # the request's first output
                self.prompt_tokens.inc(out.num_prompt_tokens)
            self.generation_tokens.inc(n)
            label = self._label(out.adapter_label)
            if label is None:
                continue
            self.adapter_tokens.labels(label).inc(n)
            if out.finished:
                self.adapter_success.labels(label, out.finish_reason).inc()
        self.adapter_refs.set(engine.adapters.total_refs())
        self.mix_bytes.set(engine.adapters.mix_bytes())
        self._observe_pool(engine)

    def _observe_pool(self, engine) -> None:
        pool = engine.adapters
        latencies = pool.take_load_seconds()
        for tier, usage in pool_tiers(pool).items():
            if tier not in self._tier_seen:  # the series exists before the first load, for rate()
                self.pool_load_latency.labels(tier)
            seen = self._tier_seen.get(tier, TierUsage({}))
            self.pool_loads.labels(tier).inc(usage.loads - seen.loads)
            self.pool_evictions.labels(tier).inc(usage.evictions - seen.evictions)
            self.pool_prefetch_hits.labels(tier).inc(usage.prefetch_hits - seen.prefetch_hits)
            for seconds in latencies.get(tier, ()):
                self.pool_load_latency.labels(tier).observe(seconds)
            self.pool_adapters.labels(tier).set(len(usage.adapters))
            self.pool_bytes.labels(tier).set(sum(usage.adapters.values()))
            self._tier_seen[tier] = usage

    # -- event loop ---------------------------------------------------------

    def lora_adapters(self) -> tuple[list[str], list[str]]:
        """(running, waiting) adapter names of vllm:lora_requests_info, sorted:
        running = resident in the device pool or with a running request;
        waiting = with a waiting request and not resident. Names come from the
        registry; a digest without one (a per-request mix) is left out."""
        reading = self.reading
        ready = set(self.adapters.pool.resident()) | reading.running_digests
        names: dict[str, list[str]] = {}
        for entry in self.adapters.entries():  # one digest may have several names
            names.setdefault(entry.digest, []).append(entry.name)

        def named(digests) -> list[str]:
            return sorted(n for d in digests for n in names.get(d, ()))

        return named(ready), named(reading.waiting_digests - ready)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouterCollector:
    """The gauges a router reads, built at each scrape from `metrics.reading`:
    one reading feeds the loramux: and the vllm: name of each, so the two
    never disagree; the LoRA info series is built fresh, so there is only
    ever one."""

    def __init__(self, metrics: Metrics, kv_cache: KVCacheInfo):
        self.metrics = metrics
        self.cache_labels = {  # vLLM's CacheConfig.metrics_info() labels that apply here, and its engine
            "block_size": str(kv_cache.block_size), "num_gpu_blocks": str(kv_cache.num_blocks),
            "cache_dtype": kv_cache.dtype, "enable_prefix_caching": "False", "engine": "0"}

    def describe(self):  # the names, for the registry's duplicate check (no engine state read)
        return self._families(SchedulerReading(), [], [], 0.0)

    def collect(self):
        running, waiting = self.metrics.lora_adapters()
        return self._families(self.metrics.reading, running, waiting, time.time())

    def _families(self, reading: SchedulerReading, running: list[str], waiting: list[str], now: float):
        out = []
        for prefix in (P, V):
            out.append(GaugeMetricFamily(prefix + "num_requests_running", "Requests in the running batch",
                                         value=reading.num_running))
            out.append(GaugeMetricFamily(prefix + "num_requests_waiting", "Requests waiting to be scheduled",
                                         value=reading.num_waiting))
            out.append(GaugeMetricFamily(prefix + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)",
                                         value=reading.kv_usage))
            info = GaugeMetricFamily(
                prefix + "lora_requests_info",
                "Adapters resident or running, and waiting (names, comma-separated); value: unix time",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            info.add_metric([str(self.metrics.max_loras), ",".join(running), ",".join(waiting)], now)
            out.append(info)
        cache = GaugeMetricFamily(V + "cache_config_info", "Information of the KV cache configuration",
                                  labels=list(self.cache_labels))
        cache.add_metric(list(self.cache_labels.values()), 1.0)
        out.append(cache)
        return out


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never had that series
        pass


class RequestTimer:
    """Latency of one generation as the HTTP client sees it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None

    def token(self) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def finish(self, reason: str | None) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.start)
        self.metrics.success.labels(reason or "abort").inc()
