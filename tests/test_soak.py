"""bench/soak.py against a real `loramux serve` on a tiny random model: 40 s of
mixed, hostile and churning traffic must give no 5xx, only the documented
statuses, and leave no KV blocks or adapter references behind."""
from __future__ import annotations

import pytest

from loramux.bench.soak import HOSTILE, format_report, run_soak
from helpers.live_server import BASE, KEY, Server, assert_serving
from helpers.tiny import make_adapter, make_chat_model


@pytest.mark.slow
def test_soak_leaves_the_server_clean(tmp_path):
    base, adapters = tmp_path / "base", tmp_path / "adapters"
    make_chat_model(base)
    make_adapter(base, adapters / "small", r=4, alpha=8, seed=1, target_modules=("q_proj", "v_proj"))
    make_adapter(base, adapters / "full", r=8, alpha=16, seed=2)
    make_adapter(base, adapters / "dora", r=4, alpha=8, seed=3, use_dora=True)
    server = Server(base, tmp_path / "store")
    try:
        report = run_soak(server.url, KEY, BASE, adapters, seconds=40, concurrency=4, seed=0)
        summary = format_report(report)
        print(summary)
        context = f"{summary}\n--- server log ---\n{server.output()}"
        assert report["num_5xx"] == 0, context
        assert report["unexpected"] == [], context
        assert report["kv_usage_end"] == 0, context
        assert report["adapter_refs_end"] == 0, context
        assert report["served"] > 30, context
        for kind, want in HOSTILE.items():  # each hostile kind ran, with its documented status only
            statuses = report["statuses"].get(kind, {})
            assert statuses and all(s.isdigit() and int(s) in want for s in statuses), (kind, statuses, context)
        for kind in ("upload", "delete", "after_delete", "inflight_stream", "merge", "disconnect"):
            assert report["requests"].get(kind, 0) > 0, (kind, context)
        assert report["ok"], context
        assert_serving(server)
    finally:
        server.stop()
