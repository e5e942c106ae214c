"""The seed recipe for LoRA fine-tuning, and the one place its knobs are validated.

The defaults are the recipe of the founding document: r=16, alpha=32, dropout 0.05 on all seven
projections, a base learning rate of 2e-4 (times OpenAI's `learning_rate_multiplier`), 4% warmup,
no weight decay, 3 epochs of batches of 4. A client names any subset of the knobs; "auto" (or leaving
a knob out) means the recipe's value. Everything below this module receives these frozen, checked
values and never re-validates them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from loramux.server.config import LORA_MODULES
from loramux.server.errors import Invalid

AUTO = "auto"
BASE_LEARNING_RATE = 2e-4
# Sequences are capped here even when the model's context is longer: the recipe's chat rows are short,
# and activation memory grows with the longest row of a batch.
MAX_SEQ_LENGTH = 1024


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape (PEFT's LoraConfig fields of the same names)."""

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_MODULES
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # learn a per-row magnitude beside the low-rank direction
    # LoRA+: B's learning rate is this times A's; None trains both at one rate (1 is the same thing).
    loraplus_lr_ratio: float | None = None


@dataclass(frozen=True)
class Hyperparameters:
    """OpenAI's three supervised hyperparameters, resolved, plus the recipe's fixed schedule."""

    n_epochs: int = 3
    batch_size: int = 4
    learning_rate_multiplier: float = 1.0
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_seq_length: int = MAX_SEQ_LENGTH

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def sequence_length(self, model_context: int) -> int:
        """The longest training row, in tokens, for a model with this context length."""
        return min(self.max_seq_length, model_context)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fields(obj, where: str, known: tuple[str, ...]) -> dict:
    """obj's explicitly set fields ("auto" and null dropped); unknown keys are refused."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise Invalid(f"{where} must be an object", where)
    for key in obj:
        if key not in known:
            raise Invalid(f"{where}: unknown field {key!r}; known: {', '.join(known)}", f"{where}.{key}")
    return {k: v for k, v in obj.items() if v is not None and v != AUTO}


def _integer(value, param: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{param} must be an integer or \"auto\", got {value!r}", param)
    if not lo <= value <= hi:
        raise Invalid(f"{param} must be in {lo}..{hi}, got {value}", param)
    return value


def _real(value, param: str, ok, bounds: str) -> float:
    if not _is_number(value):
        raise Invalid(f"{param} must be a number or \"auto\", got {value!r}", param)
    if not ok(value):
        raise Invalid(f"{param} must be in {bounds}, got {value}", param)
    return value  # an int stays one, so adapter_config.json says lora_alpha 32, as PEFT users write it


def _flag(value, param: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{param} must be true or false, got {value!r}", param)
    return value


def _modules(value, param: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise Invalid(f"{param} must be a non-empty list of module names, got {value!r}", param)
    unknown = [m for m in value if m not in LORA_MODULES]
    if unknown:
        raise Invalid(f"{param}: {unknown[0]!r} is not a LoRA-able projection; "
                      f"choose from {', '.join(LORA_MODULES)}", param)
    if len(set(value)) != len(value):
        raise Invalid(f"{param} names a module twice", param)
    # Kept in the pool's order, so two requests naming the same set describe the same adapter.
    return tuple(m for m in LORA_MODULES if m in value)


def parse_lora(obj: dict | None, max_rank: int, where: str = "lora") -> LoraSettings:
    """The job's `lora` extension field -> LoraSettings; max_rank is the server's --max-lora-rank, so
    the adapter a job makes can always be served. Invalid (param "lora.<field>") for a bad value."""
    given = _fields(obj, where, tuple(LoraSettings.__dataclass_fields__))
    out: dict = {}
    if "r" in given:
        out["r"] = _integer(given["r"], f"{where}.r", 1, max_rank)
    if "lora_alpha" in given:
        out["lora_alpha"] = _real(given["lora_alpha"], f"{where}.lora_alpha", lambda v: 0 < v <= 4096, "(0, 4096]")
    if "lora_dropout" in given:
        out["lora_dropout"] = _real(given["lora_dropout"], f"{where}.lora_dropout", lambda v: 0 <= v < 1, "[0, 1)")
    if "target_modules" in given:
        out["target_modules"] = _modules(given["target_modules"], f"{where}.target_modules")
    for flag in ("use_rslora", "use_dora"):
        if flag in given:
            out[flag] = _flag(given[flag], f"{where}.{flag}")
    if "loraplus_lr_ratio" in given:
        out["loraplus_lr_ratio"] = _real(given["loraplus_lr_ratio"], f"{where}.loraplus_lr_ratio",
                                         lambda v: 1 <= v <= 16, "[1, 16]")
    return LoraSettings(**out)


# The fields a client may set; the schedule's other fields are the recipe's.
CLIENT_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def parse_hyperparameters(obj: dict | None, where: str = "hyperparameters") -> Hyperparameters:
    """OpenAI's `hyperparameters` (top level or method.supervised's) -> Hyperparameters;
    `where` names the object in errors. Invalid (param "<where>.<field>") for a bad value."""
    given = _fields(obj, where, CLIENT_HYPERPARAMETERS)
    out: dict = {}
    if "n_epochs" in given:
        out["n_epochs"] = _integer(given["n_epochs"], f"{where}.n_epochs", 1, 50)
    if "batch_size" in given:
        out["batch_size"] = _integer(given["batch_size"], f"{where}.batch_size", 1, 256)
    if "learning_rate_multiplier" in given:
        out["learning_rate_multiplier"] = _real(given["learning_rate_multiplier"],
                                                f"{where}.learning_rate_multiplier", lambda v: 0 < v <= 10, "(0, 10]")
    return Hyperparameters(**out)
