"""bench/finetune.py compares like with like: its direct transformers + PEFT loop, given the same rows,
seed and settings, trains the same adapter as loramux's trainer (dropout off and one batch an epoch, so
that neither dropout draws nor batch order differ), and both report the tokens they processed. And the
bench end to end on a tiny random model (--smoke): both trainers, then a real `loramux serve` idle and
while a job trains; every figure it reports is there and positive."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loramux.bench.finetune import encoded_rows, train_direct, train_loramux
from loramux.bench.synthetic import make_tiny_model
from loramux.server.finetune.recipe import parse_hyperparameters, parse_lora


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bench-ft") / "model")


def test_the_direct_loop_trains_the_adapter_loramux_trains(model, tmp_path):
    lora = parse_lora({"r": 4, "lora_alpha": 8, "lora_dropout": 0}, 64)
    data = encoded_rows(model, parse_hyperparameters(None))
    hp = parse_hyperparameters({"n_epochs": 2, "batch_size": len(data.examples), "learning_rate_multiplier": 10})
    ours = train_loramux(model, data, lora, hp, tmp_path / "loramux")
    theirs = train_direct(model, data, lora, hp, tmp_path / "direct")
    assert ours == theirs == 2 * data.tokens
    a = load_file(tmp_path / "loramux" / "adapter_model.safetensors")
    b = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    # the second step moved B away from its zero start: the comparison is of trained weights
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)


@pytest.mark.slow
def test_the_smoke_run_reports_every_figure(tmp_path):
    out = tmp_path / "finetune.json"
    cmd = [sys.executable, "-m", "loramux.bench.finetune", "--smoke", "--repeats", "1", "--requests", "8",
           "--concurrency", "4", "--max-tokens", "8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    t, s = results["training"], results["serving"]
    assert t["rows"] == 64 and t["tokens_per_epoch"] > 0 and t["threads"] == 1
    for key in ("loramux_tokens_per_s", "direct_tokens_per_s", "ratio"):
        assert t[key] > 0, (key, t)
    assert len(t["runs"]["loramux"]) == len(t["runs"]["direct"]) == 1
    for key in ("idle_tokens_per_s", "during_job_tokens_per_s", "ratio"):
        assert s[key] > 0, (key, s)
    assert s["errors"] == 0 and s["job_still_running"], s
    assert s["job_training_tokens_per_s"] is None or s["job_training_tokens_per_s"] > 0
    assert results["elapsed_s"] > 0
    assert "ratio" in proc.stdout and "tok/s" in proc.stdout
