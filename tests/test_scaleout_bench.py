"""bench/scaleout.py's bookkeeping (the Ray runs themselves are the bench's;
tests/test_ray_serve.py covers the application): the affinity figure and the
workload it is measured on."""
from __future__ import annotations

from collections import Counter

from loramux.bench.scaleout import affinity, workload


def test_affinity_counts_repeats_served_where_the_previous_one_was():
    served = [("a", "r1"), ("b", "r2"), ("a", "r1"), ("a", "r2"), ("b", "r2"), ("c", None), ("a", "r2")]
    out = affinity(served)
    # repeats: a (r1 -> r1 hit), a (r1 -> r2 miss), b (r2 -> r2 hit), a (r2 -> r2 hit); the failed c is skipped
    assert out["repeats"] == 4 and out["hit_rate"] == 3 / 4
    assert out["per_replica"] == {"r1": 2, "r2": 4}
    assert affinity([("a", "r1")])["hit_rate"] is None


def test_workload_is_zipf_over_the_adapters_and_reproducible():
    models = workload(2000, 32, seed=1)
    assert models == workload(2000, 32, seed=1) and models != workload(2000, 32, seed=2)
    counts = Counter(models)
    assert set(counts) <= {f"lora-{i}" for i in range(32)}
    assert counts["lora-0"] > counts["lora-1"] > counts["lora-7"] > counts.get("lora-31", 0)  # zipf: rank order
