"""Supervised LoRA training (LoRA+, rsLoRA and DoRA included) with transformers + PEFT.

`train` is the whole job once the data is tokenized: the base folder in float32, PEFT's LoRA model over
it, AdamW (PEFT's LoRA+ optimizer when a ratio is set), linear warmup then linear decay, one optimizer
step per batch of hp.batch_size rows, per-epoch validation and checkpoints, and the adapter written with
PEFT's save_pretrained. It runs on the torch threads its caller set (the job worker gives it its own
budget, so serving keeps its cores).

The loss of a batch is the mean over the batch's learned tokens (token-weighted: a row with many
assistant tokens counts for more than a short one, as in one long sequence), never a mean of row means.
A batch too large for one forward pass is run as several micro-batches whose summed losses are divided
by the whole batch's learned-token count, so the gradient is that same mean.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from loramux.server.finetune.recipe import Hyperparameters, LoraSettings
from loramux.server.finetune.tokenize import IGNORE, EncodedSet, Example

# Rows x padded length of one forward pass: batch_size 4 of 1024-token rows is one pass; a batch of 256
# long rows is many, so its float32 logits (tokens x vocab) stay near 1 GB for SmolLM2's 49k vocab.
MICRO_BATCH_TOKENS = 4096
MAX_GRAD_NORM = 1.0


class TrainingCancelled(Exception):
    """should_stop() said so before an optimizer step; nothing more was written."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    epochs: int
    train_loss: float  # the last epoch's token-weighted mean (training mode: dropout on)
    valid_loss: float | None  # after the last epoch
    base_valid_loss: float | None  # the base model (adapters off) on the same validation examples
    trained_tokens: int  # input tokens processed, every epoch counted
    elapsed_s: float
    checkpoints: tuple[Path, ...]


def build_model(base_dir: Path, lora: LoraSettings):
    """PEFT's LoRA model over the float32 base in base_dir (LoRA A drawn from torch's global RNG)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=list(lora.target_modules), use_rslora=lora.use_rslora,
                        use_dora=lora.use_dora, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def build_optimizer(model, lora: LoraSettings, hp: Hyperparameters) -> torch.optim.Optimizer:
    """AdamW over the trainable (adapter) parameters; with LoRA+, PEFT's groups, where lora_B (and
    DoRA's magnitudes) get loraplus_lr_ratio times the learning rate of lora_A."""
    if lora.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # PEFT sets each group's decay from loraplus_weight_decay (a plain weight_decay would be overridden)
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=hp.learning_rate,
                                         loraplus_lr_ratio=lora.loraplus_lr_ratio,
                                         loraplus_weight_decay=hp.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)


def warmup_steps(hp: Hyperparameters, total_steps: int) -> int:
    return max(1, math.ceil(hp.warmup_ratio * total_steps))


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, targets), each [B, L]. targets[b, i] is the label of
    token i + 1, the one position i predicts (IGNORE on padding and past the end). The pad id is 0:
    under a causal mask, padding after a row's last token never reaches that row's real positions."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        targets[b, : n - 1] = torch.tensor(e.labels[1:])
    return ids, mask, targets


def micro_batches(examples: Sequence[Example], budget: int = MICRO_BATCH_TOKENS) -> list[list[Example]]:
    """Consecutive runs of examples whose rows x longest row stay within budget (one row at least)."""
    out: list[list[Example]] = []
    longest = 0
    for e in examples:
        n = len(e.input_ids)
        if out and (len(out[-1]) + 1) * max(longest, n) <= budget:
            out[-1].append(e)
            longest = max(longest, n)
        else:
            out.append([e])
            longest = n
    return out


def summed_loss(model, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the learned tokens of examples, how many there are)."""
    ids, mask, targets = collate(examples)
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def evaluate(model, examples: Sequence[Example]) -> float:
    """The token-weighted mean loss on examples, in eval mode (no dropout), without gradients."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in micro_batches(examples):
            loss, n = summed_loss(model, chunk)
            total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / count


def _message(text: str) -> dict:
    return {"type": "message", "level": "info", "message": text}


def _optimizer_step(model, batch: Sequence[Example], optimizer, schedule, trainable) -> tuple[float, int, float]:
    """One step on batch: (summed loss, learned tokens, the learning rate the step used)."""
    learned = sum(e.learned_tokens for e in batch)
    loss_sum = 0.0
    for chunk in micro_batches(batch):
        loss, _ = summed_loss(model, chunk)
        (loss / learned).backward()  # the chunks' gradients add up to the batch mean's
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    learning_rate = schedule.get_last_lr()[0]  # group 0: lora_A's rate under LoRA+
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, learned, learning_rate


def train(base_dir: Path, train: EncodedSet, valid: EncodedSet | None, lora: LoraSettings, hp: Hyperparameters,
          out_dir: Path, *, on_event: Callable[[dict], None], should_stop: Callable[[], bool],
          checkpoint_dir: Path | None = None, seed: int = 0) -> TrainResult:
    """Train an adapter on train.examples and save it to out_dir (see the module docstring). Raises
    TrainingCancelled, with no final adapter written, when should_stop() is true before a step."""
    started = time.monotonic()
    rows = train.examples
    if not rows:
        raise ValueError("no training examples (every row was skipped)")
    valid_rows = valid.examples if valid is not None and valid.examples else None
    batches_per_epoch = math.ceil(len(rows) / hp.batch_size)
    total_steps = batches_per_epoch * hp.n_epochs

    def check_stop():
        if should_stop():
            raise TrainingCancelled("cancelled")

    # The seed fixes LoRA A's initialization, dropout and the batch order; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(Path(base_dir), lora)
        optimizer = build_optimizer(model, lora, hp)
        schedule = get_linear_schedule_with_warmup(optimizer, warmup_steps(hp, total_steps), total_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        order = torch.Generator().manual_seed(seed)
        on_event(_message(f"Training on {len(rows)} examples ({train.tokens} tokens) for {hp.n_epochs} epochs: "
                          f"{total_steps} steps of batch size {hp.batch_size}, learning rate {hp.learning_rate:g}"))

        base_valid_loss = valid_loss = None
        if valid_rows:
            with model.disable_adapter():
                base_valid_loss = evaluate(model, valid_rows)
            on_event(_message(f"Base model validation loss: {base_valid_loss:.4f}"))

        model.train()
        step, trained_tokens, checkpoints = 0, 0, []
        for epoch in range(1, hp.n_epochs + 1):
            shuffled = [rows[i] for i in torch.randperm(len(rows), generator=order).tolist()]
            epoch_loss, epoch_learned = 0.0, 0
            for index in range(batches_per_epoch):
                check_stop()
                batch = shuffled[index * hp.batch_size : (index + 1) * hp.batch_size]
                loss_sum, learned, learning_rate = _optimizer_step(model, batch, optimizer, schedule, trainable)
                step += 1
                trained_tokens += sum(len(e.input_ids) for e in batch)
                epoch_loss, epoch_learned = epoch_loss + loss_sum, epoch_learned + learned
                epoch_end = index == batches_per_epoch - 1
                if epoch_end and valid_rows:
                    valid_loss = evaluate(model, valid_rows)
                on_event({"type": "metrics", "step": step, "total_steps": total_steps, "epoch": epoch,
                          "train_loss": loss_sum / learned, "valid_loss": valid_loss if epoch_end else None,
                          "learning_rate": learning_rate, "trained_tokens": trained_tokens})
            train_loss = epoch_loss / epoch_learned
            on_event(_message(f"Epoch {epoch}/{hp.n_epochs} done: train loss {train_loss:.4f}"
                              + (f", validation loss {valid_loss:.4f}" if valid_loss is not None else "")))
            if checkpoint_dir is not None:
                check_stop()
                folder = Path(checkpoint_dir) / f"step-{step}"
                model.save_pretrained(folder)
                checkpoints.append(folder)
                on_event({"type": "checkpoint", "step": step, "path": str(folder),
                          "metrics": {"step": step, "train_loss": train_loss, "valid_loss": valid_loss}})

        check_stop()
        model.save_pretrained(Path(out_dir))
    on_event(_message(f"Adapter saved after {step} steps"))
    return TrainResult(steps=step, epochs=hp.n_epochs, train_loss=train_loss, valid_loss=valid_loss,
                       base_valid_loss=base_valid_loss, trained_tokens=trained_tokens,
                       elapsed_s=time.monotonic() - started, checkpoints=tuple(checkpoints))
