"""deploy/: a real Prometheus (Debian's `prometheus` binary, started here on
127.0.0.1) scrapes a real loramux with deploy/prometheus.yml, and every PromQL
expression of the Grafana dashboard returns data through the query API."""
from __future__ import annotations

import json
import math
import time

import pytest

from loramux.bench import load_test
from helpers.live_server import BASE, KEY, ROOT, Server
from helpers.prometheus import Prometheus, find_prometheus
from helpers.tiny import make_adapter, make_chat_model

DASHBOARD = ROOT / "deploy" / "grafana" / "loramux-dashboard.json"
# Grafana's variables, as the dashboard would expand them
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((sub["title"], target["expr"]))
    return out


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    queries = dashboard_queries()
    exprs = " ".join(e for _, e in queries)
    for metric in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "num_requests_waiting", "kv_cache_usage_perc",
                   "adapter_generation_tokens_total", "adapter_pool_resident_adapters",
                   "adapter_pool_loads_total", "adapter_pool_evictions_total", "adapter_load_seconds_bucket",
                   'finished_reason="abort"'):
        assert metric in exprs, metric
    for _, expr in queries:
        leftover = expr
        for var in VARIABLES:
            leftover = leftover.replace(var, "")
        assert "$" not in leftover, expr  # only variables this test knows how to expand
    provisioned = (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in provisioned  # the uid every panel names


def prometheus_config(port: int) -> str:
    """deploy/prometheus.yml pointed at the test server, scraping every second."""
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    for old, new in (('"loramux:8000"', f'"127.0.0.1:{port}"'), ("scrape_interval: 5s", "scrape_interval: 1s")):
        assert old in text, f"deploy/prometheus.yml no longer contains {old}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def prometheus_binary():
    return find_prometheus()


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path, prometheus_binary):
    import torch
    from transformers import AutoConfig

    from loramux.adapters_store.device_pool import page_bytes
    from loramux.server.config import ModelConfig

    make_chat_model(tmp_path / "base")
    adapters = [make_adapter(tmp_path / "base", tmp_path / f"a{i}", r=8, alpha=16, seed=i) for i in range(3)]
    # room for one rank-8 adapter at a time: three adapters take turns, so the pool loads and evicts
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(tmp_path / "base"))
    pool = 12 * page_bytes(cfg, torch.float32, cpu_path=True)
    server = Server(tmp_path / "base", tmp_path / "store", "--max-lora-rank", "8", "--adapter-pool-bytes", str(pool))
    prom = None
    try:
        prom = Prometheus(prometheus_binary, prometheus_config(server.port), tmp_path / "prom")
        prom.wait_for(lambda: [s["value"][1] for s in prom.query('up{job="loramux"}')] == ["1"], 60, "scraping")
        names = ",".join(f"lora-{i}" for i in range(3))
        argv = ["--url", server.url, "--api-key", KEY, "--model", BASE, "--adapter-names", names,
                "--popularity", "uniform", "--arrivals", "closed", "--concurrency", "4",
                "--prompt-len", "uniform:4:12", "--output-len", "6", "--duration", "30", "--quiet"]
        uploads = [arg for a in adapters for arg in ("--upload", str(a))]
        # Two bursts a few scrapes apart: labelled series (per adapter, per tier) appear with
        # their first observation, and rate() needs them scraped before they grow.
        assert load_test.main(argv + uploads + ["--num-requests", "6"]) == 0
        time.sleep(2.5)
        assert load_test.main(argv + ["--num-requests", "30", "--seed", "1"]) == 0
        prom.wait_for(lambda: prom.query("sum(loramux:generation_tokens_total)")[0]["value"][1] == "216", 30,
                      "seeing the traffic")
        time.sleep(3)  # a few more scrapes inside the rate window
        empty, nan = [], []
        for title, expr in dashboard_queries():
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            result = prom.query(expr)
            if not result:
                empty.append(f"{title}: {expr}")
            elif "histogram_quantile" in expr and all(math.isnan(float(s["value"][1])) for s in result):
                nan.append(f"{title}: {expr}")
        assert not empty, "queries with no data:\n" + "\n".join(empty)
        assert not nan, "quantiles with no observations:\n" + "\n".join(nan)
        evictions = prom.query('sum(loramux:adapter_pool_evictions_total{tier="device"})')
        assert float(evictions[0]["value"][1]) > 0
    finally:
        if prom is not None:
            prom.stop()
        server.stop()
