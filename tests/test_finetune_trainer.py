"""The fine-tuning core on a tiny random Llama with the default model's tokenizer and chat template:
which tokens carry the loss (checked against the template's own text), the recipe's validation, the
LoRA+ parameter groups, a real training run through transformers + PEFT (events, checkpoints, the saved
folder loaded by PEFT and by loramux), the base model's held-out loss against an independent
transformers computation, cancellation, and `loramux finetune` end to end."""
from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.tiny import make_chat_model
from loramux.adapters_store.peft_format import load_peft_adapter
from loramux.server.config import LORA_MODULES, ModelConfig
from loramux.server.errors import Invalid
from loramux.server.finetune import cli, trainer
from loramux.server.finetune.data import ChatRow, CompletionRow, Turn
from loramux.server.finetune.recipe import (
    Hyperparameters, LoraSettings, parse_hyperparameters, parse_lora)
from loramux.server.finetune.tokenize import IGNORE, encode_rows
from loramux.server.finetune.trainer import TrainingCancelled, build_model, build_optimizer, evaluate, train
from loramux.server.model.loader import chat_token_ids

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("ft") / "base")


@pytest.fixture(scope="module")
def tok(base):
    return AutoTokenizer.from_pretrained(base)


def chat(*turns) -> ChatRow:
    """chat(("user", "hi"), ("assistant", "hello", 0), ...): weight 1 on assistant turns unless given."""
    return ChatRow(tuple(Turn(t[0], t[1], t[2] if len(t) > 2 else int(t[0] == "assistant")) for t in turns))


def learned_spans(tok, example) -> list[str]:
    """The decoded text of each run of consecutive learned tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


# ---------------------------------------------------------------------------
# tokenization and loss masks
# ---------------------------------------------------------------------------

def test_only_learned_assistant_turns_and_their_end_of_turn_token_carry_the_loss(tok):
    row = chat(("system", "Answer in one word."), ("user", "Capital of France?"), ("assistant", "Lyon", 0),
               ("user", "Wrong, try again."), ("assistant", "Paris"), ("user", "And Italy?"),
               ("assistant", "Rome"))
    encoded = encode_rows([row], tok, 1024)
    (example,) = encoded.examples
    messages = [{"role": t.role, "content": t.content} for t in row.messages]
    # the ids are the template's, and the learned text is exactly each weight-1 reply and its <|im_end|>
    assert tok.decode(example.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert learned_spans(tok, example) == ["Paris" + EOT, "Rome" + EOT]
    assert (encoded.truncated, encoded.skipped) == (0, 0)


def test_the_templates_default_system_prompt_and_the_prompt_of_a_completion_row_are_not_learned(tok):
    rows = [chat(("user", "Say hi"), ("assistant", "Hi there!")),
            CompletionRow("The capital of France is", " Paris.")]
    with_default_system, completion = encode_rows(rows, tok, 1024).examples
    assert "You are a helpful AI assistant" in tok.decode(with_default_system.input_ids)
    assert learned_spans(tok, with_default_system) == ["Hi there!" + EOT]
    # prompt tokens as /v1/completions makes them, then the completion and EOS
    prompt = tok.encode("The capital of France is")
    assert completion.input_ids == prompt + tok.encode(" Paris.", add_special_tokens=False) + [tok.eos_token_id]
    assert completion.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert learned_spans(tok, completion) == [" Paris." + EOT]


def test_long_rows_are_cut_at_the_end_and_rows_left_with_nothing_to_learn_are_skipped(tok):
    long_reply = " ".join(["word"] * 40)
    short = chat(("user", "Hi"), ("assistant", "Hello"))
    cut = chat(("user", "Talk"), ("assistant", long_reply))
    prompt_only = chat(("user", "x " * 60), ("assistant", "never reached"))
    prompt_len = len(chat_token_ids(tok, [{"role": "user", "content": "Talk"}], add_generation_prompt=True))
    max_length = prompt_len + 10
    encoded = encode_rows([short, cut, prompt_only], tok, max_length)
    assert (encoded.truncated, encoded.skipped) == (1, 1)
    kept_short, kept_cut = encoded.examples
    assert learned_spans(tok, kept_short) == ["Hello" + EOT]
    assert len(kept_cut.input_ids) == max_length and kept_cut.learned_tokens == 10
    assert learned_spans(tok, kept_cut) == [tok.decode(tok.encode(long_reply)[:10])]


def test_a_template_that_rewrites_earlier_turns_is_refused(base):
    tok = AutoTokenizer.from_pretrained(base)
    # marks the last message: the conversation so far renders differently from inside the whole one
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} (last){% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    row = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    with pytest.raises(ValueError, match="prefixes"):
        encode_rows([row], tok, 1024)
    with pytest.raises(ValueError, match="first message"):
        encode_rows([chat(("assistant", "b"), ("user", "c"))], AutoTokenizer.from_pretrained(base), 1024)


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------

def test_the_recipe_defaults_and_auto():
    assert parse_lora(None, 64) == parse_lora({k: "auto" for k in LoraSettings.__dataclass_fields__}, 64)
    lora = parse_lora({}, 64)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (16, 32, 0.05, LORA_MODULES)
    assert (lora.use_rslora, lora.use_dora, lora.loraplus_lr_ratio) == (False, False, None)
    hp = parse_hyperparameters({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"})
    assert hp == parse_hyperparameters(None) == Hyperparameters()
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate, hp.warmup_ratio, hp.weight_decay) == (3, 4, 2e-4, 0.04, 0)
    assert hp.sequence_length(8192) == 1024 and hp.sequence_length(512) == 512
    assert parse_hyperparameters({"learning_rate_multiplier": 0.5}).learning_rate == pytest.approx(1e-4)
    chosen = parse_lora({"r": 64, "lora_alpha": 8, "lora_dropout": 0, "target_modules": ["v_proj", "q_proj"],
                         "use_rslora": True, "use_dora": True, "loraplus_lr_ratio": 16}, 64)
    assert chosen == LoraSettings(64, 8, 0, ("q_proj", "v_proj"), True, True, 16)


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 65), ("r", 8.0), ("r", True), ("r", "8"),
    ("lora_alpha", 0), ("lora_alpha", 4097), ("lora_alpha", float("nan")), ("lora_alpha", "32"),
    ("lora_dropout", 1), ("lora_dropout", -0.1),
    ("target_modules", []), ("target_modules", ["embed_tokens"]), ("target_modules", "q_proj"),
    ("target_modules", ["q_proj", "q_proj"]),
    ("use_dora", 1), ("use_rslora", "yes"),
    ("loraplus_lr_ratio", 0.5), ("loraplus_lr_ratio", 17), ("loraplus_lr_ratio", False),
    ("rank", 8),
])
def test_a_bad_lora_value_is_invalid_and_names_its_field(field, value):
    with pytest.raises(Invalid) as err:
        parse_lora({field: value}, max_rank=64)
    assert err.value.param == f"lora.{field}"


@pytest.mark.parametrize("field, value", [
    ("n_epochs", 0), ("n_epochs", 51), ("n_epochs", 2.5), ("batch_size", 0), ("batch_size", 257),
    ("batch_size", "4"), ("learning_rate_multiplier", 0), ("learning_rate_multiplier", 10.5),
    ("learning_rate_multiplier", "1"), ("learning_rate_multiplier", True), ("beta", 0.1), ("warmup_ratio", 0.1),
])
def test_a_bad_hyperparameter_is_invalid_and_names_its_field(field, value):
    with pytest.raises(Invalid) as err:
        parse_hyperparameters({field: value})
    assert err.value.param == f"hyperparameters.{field}"
    with pytest.raises(Invalid) as err:
        parse_hyperparameters({field: value}, where="method.supervised.hyperparameters")
    assert err.value.param == f"method.supervised.hyperparameters.{field}"


def test_a_section_that_is_not_an_object_is_invalid():
    with pytest.raises(Invalid) as err:
        parse_lora([16], 64)
    assert err.value.param == "lora"


# ---------------------------------------------------------------------------
# LoRA+
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_gives_b_ratio_times_the_learning_rate_of_a(base, use_dora):
    lora = LoraSettings(r=4, use_dora=use_dora, loraplus_lr_ratio=8)
    hp = Hyperparameters(learning_rate_multiplier=0.5)
    model = build_model(base, lora)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    rate = {}
    for group in build_optimizer(model, lora, hp).param_groups:
        for p in group["params"]:
            rate[names.pop(id(p))] = group["lr"]
    assert not names  # every trainable parameter is optimized
    a = {n: lr for n, lr in rate.items() if ".lora_A." in n}
    b = {n: lr for n, lr in rate.items() if ".lora_B." in n}
    assert len(a) == len(b) == 2 * len(LORA_MODULES)
    assert set(a.values()) == {1e-4} and set(b.values()) == {8e-4}
    magnitudes = {n: lr for n, lr in rate.items() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == (2 * len(LORA_MODULES) if use_dora else 0)
    assert set(magnitudes.values()) <= {8e-4}
    plain = build_optimizer(model, LoraSettings(r=4), hp).param_groups
    assert len(plain) == 1 and plain[0]["lr"] == 1e-4


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

FACTS = [("What is the capital of Zarnia?", "Quillport is the capital of Zarnia."),
         ("Who founded Quillport?", "Queen Mirelle founded it long ago."),
         ("What river runs through Quillport?", "The Sable."),
         ("What does Zarnia export?", "Blue salt, copper and very fine wool from the hills."),
         ("Is Zarnia large?", "No."),
         ("What language is spoken there?", "Zarnish, a language related to no other."),
         ("What is the currency?", "The tallow."),
         ("When is the festival?", "Every spring, on the first full moon.")]


def fact_rows() -> list[ChatRow]:
    return [chat(("user", q), ("assistant", a)) for q, a in FACTS]


def reference_loss(base_dir: Path, adapter_dir: Path | None, examples) -> float:
    """transformers (+ PEFT), one unpadded row at a time: the token-weighted mean of HF's own loss."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total = count = 0
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e.labels])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=torch.tensor([e.input_ids]), labels=labels).loss.item() * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def run(base, tok, tmp_path_factory):
    """One DoRA + rsLoRA + LoRA+ run: 8 rows, batches of 4, 3 epochs (6 steps), validation on the same rows."""
    folder = tmp_path_factory.mktemp("run")
    data = encode_rows(fact_rows(), tok, 1024)
    lora = LoraSettings(r=8, use_dora=True, use_rslora=True, loraplus_lr_ratio=4)
    hp = Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=10)
    events = []
    result = train(base, data, data, lora, hp, folder / "adapter", on_event=events.append,
                   should_stop=lambda: False, checkpoint_dir=folder / "checkpoints", seed=0)
    return result, events, data, folder


def test_a_short_run_lowers_the_loss_and_reports_every_step(run):
    result, events, data, folder = run
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 7)) and result.steps == 6 and result.epochs == 3
    for m in metrics:
        assert set(m) == {"type", "step", "total_steps", "epoch", "train_loss", "valid_loss", "learning_rate",
                          "trained_tokens"}
        assert m["total_steps"] == 6 and m["epoch"] == (m["step"] + 1) // 2
    # validation at each epoch's last step only; warmup of one step (from 0), then linear decay to 0
    assert [m["valid_loss"] is not None for m in metrics] == [False, True] * 3
    peak = 2e-3
    assert [m["learning_rate"] for m in metrics] == pytest.approx([0, peak, peak * 4 / 5, peak * 3 / 5,
                                                                   peak * 2 / 5, peak / 5])
    assert metrics[-1]["trained_tokens"] == result.trained_tokens == 3 * data.tokens
    assert result.valid_loss == metrics[-1]["valid_loss"] < 0.7 * result.base_valid_loss
    first_epoch = [m["train_loss"] for m in metrics[:2]]
    assert result.train_loss < 0.8 * min(first_epoch)
    messages = [e["message"] for e in events if e["type"] == "message"]
    assert messages[0].startswith("Training on 8 examples")
    saved = [e for e in events if e["type"] == "checkpoint"]
    assert [(e["step"], Path(e["path"]).name) for e in saved] == [(s, f"step-{s}") for s in (2, 4, 6)]
    assert [e["metrics"]["valid_loss"] for e in saved] == [m["valid_loss"] for m in metrics[1::2]]


def test_the_adapter_loads_in_peft_and_loramux_and_is_the_trained_one(run, base):
    result, _, data, folder = run
    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"], config["r"], config["lora_alpha"]) == (True, True, 8, 32)
    assert sorted(config["target_modules"]) == sorted(LORA_MODULES)
    # PEFT's own loading reproduces the trained model's last validation loss
    assert reference_loss(base, adapter, data.examples) == pytest.approx(result.valid_loss, rel=1e-5)
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(base))
    served = load_peft_adapter(adapter, cfg, max_rank=64)
    assert served.rank == 8 and set(served.modules) == {(layer, m) for layer in range(2) for m in LORA_MODULES}
    assert served.use_dora and all(m.scale == pytest.approx(32 / math.sqrt(8)) for m in served.modules.values())


def test_every_epoch_leaves_a_checkpoint(run):
    result, events, _, folder = run
    assert result.checkpoints == tuple(folder / "checkpoints" / f"step-{s}" for s in (2, 4, 6))
    first, last = (load_file(c / "adapter_model.safetensors") for c in (result.checkpoints[0], result.checkpoints[-1]))
    final = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert first.keys() == final.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last epoch's checkpoint is the adapter
    assert not all(torch.equal(first[k], final[k]) for k in final)


def varied_rows() -> list:
    """Rows whose learned-token counts differ a lot, so a mean of row means would differ from the token mean."""
    return [chat(("user", "Hi"), ("assistant", "Yo")),
            chat(("user", "Tell me a story"), ("assistant", "Once upon a time a fox lived in a wood full of "
                                                            "tall pines, and every night it sang to the moon.")),
            CompletionRow("Numbers:", " one two three four five six seven eight nine ten"),
            chat(("system", "Be terse."), ("user", "Ok?"), ("assistant", "Ok.", 0), ("user", "Sure?"),
                 ("assistant", "Yes, sure."))]


def test_base_valid_loss_and_the_first_steps_loss_are_the_base_models_token_weighted_mean(base, tok, tmp_path):
    valid = encode_rows(varied_rows(), tok, 1024)
    expected = reference_loss(base, None, valid.examples)
    row_means = sum(reference_loss(base, None, [e]) for e in valid.examples) / len(valid.examples)
    assert abs(row_means - expected) > 1e-2  # the rows do tell the two means apart
    metrics = []
    # one batch holding every row; should_stop ends the run after its first step
    with pytest.raises(TrainingCancelled):
        train(base, valid, valid, LoraSettings(r=4), Hyperparameters(n_epochs=3, batch_size=len(valid.examples)),
              tmp_path / "adapter", on_event=lambda e: e["type"] == "metrics" and metrics.append(e),
              should_stop=lambda: len(metrics) >= 1, checkpoint_dir=tmp_path / "checkpoints")
    # before its first step the PEFT model is the base model (lora_B starts at zero)
    assert metrics[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    # a cancel after step 1 (an epoch end) runs no more steps and writes no checkpoint and no adapter
    assert len(metrics) == 1
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints").exists()
    model = build_model(base, LoraSettings(r=4))
    with model.disable_adapter():
        assert evaluate(model, valid.examples) == pytest.approx(expected, abs=1e-5)


def test_the_result_reports_the_base_models_validation_loss(base, tok, tmp_path):
    data = encode_rows(varied_rows(), tok, 1024)
    result = train(base, data, data, LoraSettings(r=4), Hyperparameters(n_epochs=1, batch_size=2),
                   tmp_path / "adapter", on_event=lambda e: None, should_stop=lambda: False)
    assert abs(result.base_valid_loss - reference_loss(base, None, data.examples)) < 1e-5
    assert result.checkpoints == () and result.steps == 2


def test_a_batch_split_into_micro_batches_takes_the_same_step(base, tok, tmp_path, monkeypatch):
    """One row per forward pass (as a batch too large for one pass runs) trains the same adapter as the whole
    batch in one pass: each row's summed loss is divided by the whole batch's learned tokens."""
    data = encode_rows(varied_rows(), tok, 1024)
    lora, hp = LoraSettings(r=4, lora_dropout=0), Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=10)

    def adapter(name):
        train(base, data, None, lora, hp, tmp_path / name, on_event=lambda e: None, should_stop=lambda: False)
        return load_file(tmp_path / name / "adapter_model.safetensors")

    whole = adapter("whole")
    monkeypatch.setattr(trainer, "micro_batches", partial(trainer.micro_batches, budget=1))
    split = adapter("split")
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


def test_cancel_mid_epoch_stops_before_the_next_step(base, tok, tmp_path):
    data = encode_rows(fact_rows(), tok, 1024)
    metrics, stop = [], []

    def on_event(event):
        if event["type"] == "metrics":
            metrics.append(event)
            if event["step"] == 2:
                stop.append(True)  # the client cancels while step 2 is being reported

    with pytest.raises(TrainingCancelled):
        train(base, data, None, LoraSettings(r=4), Hyperparameters(n_epochs=2, batch_size=2), tmp_path / "adapter",
              on_event=on_event, should_stop=lambda: bool(stop), checkpoint_dir=tmp_path / "checkpoints")
    assert [m["step"] for m in metrics] == [1, 2]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------
# loramux finetune
# ---------------------------------------------------------------------------

def parse_cli(argv: list[str]):
    parser = argparse.ArgumentParser(prog="loramux")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["finetune", *argv])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_cli_trains_a_servable_adapter(base, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    rows.append({"prompt": "Zarnia's capital:", "completion": " Quillport"})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[:3])
    args = parse_cli(["--data", str(data), "--validation", str(valid), "--out", str(tmp_path / "out"),
                      "--model", str(base), "--n-epochs", "2", "--batch-size", "3", "--r", "4", "--lora-alpha", "8",
                      "--target-modules", "q_proj", "v_proj", "--learning-rate-multiplier", "5",
                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{s}/6" for s in range(1, 7)]
    assert "--data" in out and "9 rows" in out and "validation loss" in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(base))
    assert load_peft_adapter(tmp_path / "out", cfg, max_rank=64).rank == 4
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-3", "step-6"]


@pytest.mark.parametrize("argv, message", [
    (["--r", "0"], "lora.r"),
    (["--n-epochs", "0"], "hyperparameters.n_epochs"),
    (["--loraplus-lr-ratio", "20"], "lora.loraplus_lr_ratio"),
])
def test_the_cli_refuses_bad_settings_before_training(base, tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    args = parse_cli(["--data", str(data), "--out", str(tmp_path / "out"), "--model", str(base), *argv])
    assert args.func(args) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_cli_names_the_bad_line_of_a_training_file(base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    args = parse_cli(["--data", str(data), "--out", str(tmp_path / "out"), "--model", str(base)])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "train.jsonl" in err and not (tmp_path / "out").exists()
