"""Every replica's metrics in one Prometheus exposition, labelled by replica.

Prometheus scrapes the application's GET /metrics (the ingress, on every
node's Serve proxy); a replica has no port of its own to scrape. So each
replica pushes its own rendering, the bytes `loramux serve` shows at
/metrics, to this board every PUSH_INTERVAL_S, and the ingress serves the
union:

    replica r1: loramux_requests_total{adapter="a1",...} 3
    replica r2: loramux_requests_total{adapter="a1",...} 5
    /metrics:   loramux_requests_total{adapter="a1",...,replica="r1"} 3
                loramux_requests_total{adapter="a1",...,replica="r2"} 5

Families are merged by name, so each has one HELP and TYPE line, as the
exposition format requires. A replica that stops pushing (killed, or
replaced by Ray) drops out after STALE_AFTER_S; one that shuts down cleanly
leaves at once.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve

PUSH_INTERVAL_S = 2.0
STALE_AFTER_S = 3 * PUSH_INTERVAL_S + 5  # a few missed pushes (a busy replica) before a replica is dropped
REPLICA_LABEL = "replica"


class _Families:
    """A collector that yields families already built (for generate_latest)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def merged_exposition(readings: dict[str, str]) -> bytes:
    """The expositions of `readings` (replica id -> its /metrics text) as one,
    each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(readings.items()):
        for family in text_string_to_metric_families(text):
            into = families.get(family.name)
            if into is None:
                into = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                into.samples.append(Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp,
                                           s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


@serve.deployment(name="LoramuxMetricsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsBoard:
    def __init__(self):
        self.readings: dict[str, tuple[str, float]] = {}  # replica id -> (exposition text, when pushed)

    def put(self, replica: str, text: str) -> None:
        self.readings[replica] = (text, time.monotonic())

    def forget(self, replica: str) -> None:
        self.readings.pop(replica, None)

    def exposition(self) -> bytes:
        now = time.monotonic()
        self.readings = {r: (text, at) for r, (text, at) in self.readings.items() if now - at <= STALE_AFTER_S}
        return merged_exposition({r: text for r, (text, _) in self.readings.items()})
