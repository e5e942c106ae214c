"""bench/load_test.py end to end: `loramux bench` against a real `loramux serve`
on the default model; what it counts must agree with the server's /metrics."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loramux.bench import load_test
from loramux.bench.load_test import Arrivals, Length, Result, Workload, check_local, percentile
from loramux.bench.popularity import adapter_weights
from helpers.live_server import KEY, Server

# ---------------------------------------------------------------------------
# the workload generator (fast)
# ---------------------------------------------------------------------------


def test_lengths_parse_and_stay_positive():
    rng = random.Random(0)
    assert Length.parse("7").sample(rng) == 7
    assert all(3 <= Length.parse("uniform:3:5").sample(rng) <= 5 for _ in range(50))
    assert all(Length.parse("normal:2:10").sample(rng) >= 1 for _ in range(50))
    assert {Length.parse("choice:4,9").sample(rng) for _ in range(50)} == {4, 9}
    assert str(Length.parse("exp:12")) == "exp:12"
    for bad in ("x", "uniform:1", "normal:a:b", "beta:1:2", "choice:4,x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^bad length {re.escape(repr(bad))}"):
            Length.parse(bad)


@pytest.mark.parametrize("popularity", ["uniform", "zipf", "skewed", "identical", "distinct"])
def test_popularity(popularity):
    names = tuple(f"a{i}" for i in range(10))
    specs = Workload(2000, names, popularity, zipf_alpha=1.2, seed=3).requests()
    counts = [sum(s.adapter == n for s in specs) for n in names]
    assert sum(counts) == 2000
    if popularity in ("uniform", "distinct"):
        assert min(counts) > 120
    if popularity == "distinct":
        assert [s.adapter for s in specs[:10]] == list(names)
    if popularity == "identical":
        assert counts[0] == 2000
    if popularity == "zipf":
        assert counts[0] > counts[1] > counts[9]
    if popularity == "skewed":  # 80 % to the hottest 2 of 10
        assert 0.75 < (counts[0] + counts[1]) / 2000 < 0.85
    assert abs(sum(adapter_weights(popularity, 10, 1.2)) - 1) < 1e-9


def test_same_seed_same_requests_and_arrival_rates():
    w = Workload(50, ("a", "b"), "zipf", prompt_len=Length.parse("uniform:4:9"), seed=5)
    assert w.requests() == w.requests()
    assert Workload(0, ()).requests() == []
    spec = Workload(3, (), prompt_len=Length.parse("6"), output_len=Length.parse("2")).requests()[0]
    assert spec.adapter is None and len(spec.prompt.split()) == 6 and spec.max_tokens == 2
    for arrivals in (Arrivals("poisson", rate=4.0), Arrivals("gamma", rate=4.0, cv=3.0)):
        offsets = arrivals.offsets(4000, seed=1)
        assert offsets == sorted(offsets)
        assert 3.6 < len(offsets) / offsets[-1] < 4.4  # about `rate` per second
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 2.5 < cv < 3.5


def test_only_this_machine_is_a_target():
    assert check_local("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_local("http://localhost:1") == "http://localhost:1"
    for url in ("http://10.0.0.1:8000", "https://api.openai.com", "http://127.0.0.1.example.com"):
        with pytest.raises(SystemExit):
            check_local(url)


def test_percentile_matches_numpy_linear():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 90) == 90.0


def _report(label: str, speed: float) -> dict:
    runs = []
    for rate in (1.0, 2.0):
        results = [Result(i, "a", "200", None, "length", 8, 4, start=i / rate, ttft=0.1 / speed, e2e=0.4 / speed,
                          itl=[0.1 / speed] * 3) for i in range(5)]
        results.append(Result(5, "a", "429", "busy"))
        runs.append({"load": f"poisson {rate:g} req/s", "summary": load_test.summarize(results, 10.0, 0.15)})
    return {"label": label, "workload": {"adapters": 1}, "runs": runs}


def test_summary_compare_and_plot(tmp_path):
    a, b = _report("vllm", 1.0), _report("loramux", 2.0)
    s = b["runs"][0]["summary"]
    assert s["completed"] == 5 and s["errors"] == {"429": 1} and s["output_tokens"] == 20
    assert s["slo_attainment"] == 5 / 6  # the failed request misses the SLO
    assert abs(s["tpot_s"]["p50"] - 0.05) < 1e-9  # (e2e - ttft) / (4 - 1)
    text = load_test.format_compare(a, b)
    assert "0.50x" in text and "errors 429" in text  # loramux's TTFT is half of vllm's
    assert "TTFT p99 ms" in load_test.format_table(b["runs"][0])
    pytest.importorskip("matplotlib")  # the optional `bench` extra
    load_test.plot([a, b], str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------
# against a real server on the default model
# ---------------------------------------------------------------------------

def _default_model_adapter(folder: Path) -> Path:
    from transformers import AutoConfig

    from loramux.bench.synthetic import random_adapter
    from loramux.server.config import ModelConfig
    from loramux.server.model.loader import resolve_model_dir
    from loramux.adapters_store.peft_format import save_peft_adapter

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(resolve_model_dir(None)))
    save_peft_adapter(random_adapter(cfg, "bench", rank=8, seed=1), folder)
    return folder


def _settled_metrics(server: Server, want) -> dict:
    """/metrics once `want(metrics)` holds (the engine thread counts tokens
    just after the client may have seen them), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if want(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.slow
def test_load_test_counts_agree_with_server_metrics(tmp_path):
    adapter = _default_model_adapter(tmp_path / "peft")
    server = Server(Path("default"), tmp_path / "store", "--kv-cache-bytes", "16M", "--max-lora-rank", "8",
                    "--adapter-pool-bytes", "128M")
    try:
        before = server.metrics()
        out = tmp_path / "run.json"
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "loramux.server", "bench", "--url", server.url, "--api-key", KEY,
               "--num-adapters", "3", "--upload", str(adapter), "--popularity", "zipf", "--rate", "4",
               "--num-requests", "8", "--prompt-len", "uniform:8:16", "--output-len", "uniform:2:5",
               "--duration", "20", "--drain-timeout", "60", "--slo-ttft", "5", "--quiet", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stdout + proc.stderr + server.output()
        report = json.loads(out.read_text())
        run = report["runs"][0]
        s = run["summary"]
        assert s["requests"] == s["completed"] == 8 and s["errors"] == {}, s
        assert s["finish_reasons"] == {"length": 8}  # ignore_eos: every request runs to max_tokens
        reqs = run["requests"]
        assert {r["adapter"] for r in reqs} <= {"lora-0", "lora-1", "lora-2"}
        assert sum(r["output_tokens"] for r in reqs) == s["output_tokens"]
        assert all(2 <= r["output_tokens"] <= 5 and r["ttft"] <= r["e2e"] for r in reqs)
        assert "request_throughput" in s and s["ttft_s"]["p99"] >= s["ttft_s"]["p50"] > 0
        assert "TTFT p99 ms" in proc.stdout and "SLO attainment" in proc.stdout

        def delta(m, key):
            return m.get(key, 0.0) - before.get(key, 0.0)

        gen = "loramux:generation_tokens_total"
        after = _settled_metrics(server, lambda m: delta(m, gen) >= s["output_tokens"])
        assert delta(after, 'loramux:request_success_total{finished_reason="length"}') == 8
        assert delta(after, 'loramux:request_success_total{finished_reason="stop"}') == 0
        assert delta(after, 'loramux:request_success_total{finished_reason="abort"}') == 0
        assert delta(after, gen) == s["output_tokens"]
        assert delta(after, "loramux:prompt_tokens_total") == s["prompt_tokens"]
        assert delta(after, "loramux:e2e_request_latency_seconds_count") == 8
        assert delta(after, "loramux:time_to_first_token_seconds_count") == 8
        for name in {r["adapter"] for r in reqs}:
            mine = sum(r["output_tokens"] for r in reqs if r["adapter"] == name)
            assert delta(after, f'loramux:adapter_generation_tokens_total{{adapter="{name}"}}') == mine
    finally:
        server.stop()
