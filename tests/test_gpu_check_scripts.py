"""The scripts bench/gpu_check.sh runs on a lent GPU, in their CPU smoke forms,
so that they still run when a GPU is lent (about 20 s in all)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(ROOT / "bench" / "gpu_check.sh"), str(ROOT / "bench" / "gpu_wheels.sh")],
                       check=True)


def test_engine_check_passes_on_cpu(capsys):
    from loramux.bench import cuda_engine_check

    assert cuda_engine_check.main(["--device", "cpu", "--requests", "8"]) == 0
    out = capsys.readouterr().out
    assert "preempted: 8/8 requests equal alone" in out and "engine check on cpu: ok" in out


def test_serve_check_passes_on_cpu(capsys):
    from loramux.bench import cuda_serve_check

    assert cuda_serve_check.main(["--device", "cpu"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for check in ("greedy completion", "chat completion", "adapter completion", "seeded sampling"):
        assert f"ok   {check}" in out


def test_lora_overhead_tiny_shape_writes_summary_rows(tmp_path, capsys):
    from loramux.bench import lora_overhead

    summary = tmp_path / "rows.txt"
    lora_overhead.main(["--shape", "tiny", "--dtype", "float32", "--repeats", "1", "--summary", str(summary)])
    rows = summary.read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["decode LoRA/base (32 seqs", "prefill LoRA/base (8 x 128 tokens)",
                                               "decode DoRA/LoRA"]
    assert all("x  (target <= " in r for r in rows)


def test_llama3_8b_shape_is_llama3_8b():
    # built on the meta device: shapes only, no memory
    from loramux.bench.lora_overhead import synthetic_model

    model = synthetic_model("llama3-8b", torch.bfloat16, "meta")
    params = model.embed.numel() + model.lm_head.numel() + model.norm.numel() + sum(
        t.numel() for layer in model.layers for t in layer.values() if t is not None)
    assert params == pytest.approx(8.03e9, rel=1e-3)
    assert model.layers[0]["qkv"].shape == (4096 + 2 * 1024, 4096)
    assert model.layers[0]["gate_up"].shape == (2 * 14336, 4096)
