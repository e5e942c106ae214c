"""`loramux finetune`: train an adapter offline, on the same recipe, tokenization and trainer as a job.

    loramux finetune --data train.jsonl --out DIR [--validation valid.jsonl] [--model M] [LoRA options]

DIR receives a PEFT adapter folder that `loramux serve` can load, upload or merge like any other.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _auto_or(kind):
    """An argparse type: "auto" as itself, else kind(text) (recipe.py checks the range)."""
    def parse(text: str):
        return text if text == "auto" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `finetune` subcommand on the `loramux` command line."""
    from loramux.server.config import LORA_MODULES

    p = subparsers.add_parser("finetune", help="train a LoRA adapter offline (transformers + PEFT) into a PEFT folder")
    p.add_argument("--data", required=True, type=Path, metavar="JSONL", help="training rows (chat or prompt/completion)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the adapter folder to write (new or empty)")
    p.add_argument("--validation", type=Path, default=None, metavar="JSONL",
                   help="held-out rows: validation loss per epoch, and the base model's for comparison")
    p.add_argument("--model", default="default", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="save the adapter after every epoch as DIR/step-N")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the largest --r allowed (default: the server's default, so the adapter can be served)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    hp = p.add_argument_group("hyperparameters (OpenAI's; \"auto\" = the recipe's)")
    hp.add_argument("--n-epochs", type=_auto_or(int), default="auto", help="1..50 (auto: 3)")
    hp.add_argument("--batch-size", type=_auto_or(int), default="auto", help="1..256 (auto: 4)")
    hp.add_argument("--learning-rate-multiplier", type=_auto_or(float), default="auto",
                    help="(0, 10]; the learning rate is 2e-4 times this (auto: 1)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--r", type=_auto_or(int), default="auto", help="rank (auto: 16)")
    lora.add_argument("--lora-alpha", type=_auto_or(float), default="auto",
                      help="scale alpha / r, or alpha / sqrt(r) with --use-rslora (auto: 32)")
    lora.add_argument("--lora-dropout", type=_auto_or(float), default="auto", help="[0, 1) (auto: 0.05)")
    lora.add_argument("--target-modules", nargs="+", default="auto", metavar="MODULE",
                      help=f"projections to adapt (auto: all of {' '.join(LORA_MODULES)})")
    lora.add_argument("--use-rslora", action="store_true", help="rank-stabilized scaling alpha / sqrt(r)")
    lora.add_argument("--use-dora", action="store_true", help="DoRA: a learned magnitude per output row")
    lora.add_argument("--loraplus-lr-ratio", type=float, default=None,
                      help="LoRA+: B's learning rate is this times A's, in [1, 16] (2..16 helps; default off)")
    p.set_defaults(func=run)
    return p


def _whole(value):
    """2.0 -> 2 (argparse's float for an alpha the user wrote as a whole number)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def run(args) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from loramux.server.config import EngineConfig
    from loramux.server.errors import Invalid
    from loramux.server.finetune.data import parse_training_jsonl
    from loramux.server.finetune.recipe import parse_hyperparameters, parse_lora
    from loramux.server.finetune.tokenize import encode_rows
    from loramux.server.finetune.trainer import train
    from loramux.server.model.loader import resolve_model_dir

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: --out {args.out}: exists and is not an empty folder", file=sys.stderr)
        return 1
    max_rank = args.max_lora_rank or EngineConfig().max_lora_rank
    try:
        lora = parse_lora({"r": args.r, "lora_alpha": _whole(args.lora_alpha), "lora_dropout": args.lora_dropout,
                           "target_modules": args.target_modules, "use_rslora": args.use_rslora,
                           "use_dora": args.use_dora, "loraplus_lr_ratio": args.loraplus_lr_ratio}, max_rank)
        hp = parse_hyperparameters({"n_epochs": args.n_epochs, "batch_size": args.batch_size,
                                    "learning_rate_multiplier": args.learning_rate_multiplier})
        model_dir = resolve_model_dir(args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        max_length = hp.sequence_length(AutoConfig.from_pretrained(model_dir).max_position_embeddings)
        sets = {}
        for name, path in (("--data", args.data), ("--validation", args.validation)):
            if path is not None:
                try:
                    rows = parse_training_jsonl(path.read_bytes())
                except Invalid as exc:
                    raise Invalid(f"{name} {path}: {exc.message}", name) from None
                sets[name] = encoded = encode_rows(rows, tokenizer, max_length)
                print(f"{name} {path}: {len(encoded.examples)} rows, {encoded.tokens} tokens "
                      f"({encoded.truncated} truncated to {max_length} tokens, {encoded.skipped} skipped)")
    except (Invalid, OSError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1

    def show(event: dict) -> None:
        if event["type"] == "message":
            print(event["message"])
            return
        if event["type"] == "checkpoint":
            print(f"checkpoint at step {event['step']}: {event['path']}")
            return
        valid = f" valid_loss {event['valid_loss']:.4f}" if event["valid_loss"] is not None else ""
        print(f"step {event['step']}/{event['total_steps']} epoch {event['epoch']} "
              f"train_loss {event['train_loss']:.4f}{valid} lr {event['learning_rate']:.3g} "
              f"tokens {event['trained_tokens']}", flush=True)

    try:
        result = train(model_dir, sets["--data"], sets.get("--validation"), lora, hp, args.out, on_event=show,
                       should_stop=lambda: False, checkpoint_dir=args.checkpoint_dir, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {result.steps} steps, {result.epochs} epochs, train loss {result.train_loss:.4f}, "
          f"{result.trained_tokens} tokens in {result.elapsed_s:.1f} s")
    if result.valid_loss is not None:
        print(f"validation loss {result.valid_loss:.4f} (base model {result.base_valid_loss:.4f})")
    return 0
