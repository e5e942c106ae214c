"""bench/finetune.py compares like with like: its direct transformers + PEFT loop, given the same rows,
seed and settings, trains the same adapter as loramux's trainer (dropout off and one batch an epoch, so
that neither dropout draws nor batch order differ), and both report the tokens they processed."""
from __future__ import annotations

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
