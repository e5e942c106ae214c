"""A fine-tuning job in a process of its own.

The server's engine keeps its cores and its event loop: training runs in a spawned process (a fresh
interpreter: no copy of the engine's threads or memory) on `threads` torch threads. The process reads
the job's files, tokenizes with the base's chat template, trains (trainer.py) and reports through a
queue, one dict a message:

    {"type": "message", "level", "message"}     progress in words
    {"type": "metrics", "step", ...}            after every optimizer step
    {"type": "checkpoint", "step", "path", "metrics"}
    {"type": "succeeded", "adapter_dir", "trained_tokens", "train_loss", "valid_loss", "base_valid_loss", ...}
    {"type": "cancelled"} | {"type": "failed", "message"}   the last one

Cancelling sets an Event the trainer checks before every optimizer step.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loramux.server.finetune.recipe import Hyperparameters, LoraSettings

# how long a cancelled or stopping worker gets to finish its step before it is killed
STOP_GRACE_S = 30.0
PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class JobSpec:
    base_dir: Path  # the served base, as an HF folder
    training_path: Path
    validation_path: Path | None
    lora: LoraSettings
    hyperparameters: Hyperparameters
    work_dir: Path  # adapter/ and checkpoints/ go here
    seed: int
    threads: int


def _encode(path: Path, tokenizer, max_length: int, name: str, report):
    from loramux.server.finetune.data import parse_training_jsonl
    from loramux.server.finetune.tokenize import encode_rows

    encoded = encode_rows(parse_training_jsonl(path.read_bytes()), tokenizer, max_length)
    note = f"{name}: {len(encoded.examples)} rows, {encoded.tokens} tokens"
    if encoded.truncated:
        note += f"; {encoded.truncated} rows cut to {max_length} tokens"
    if encoded.skipped:
        note += f"; {encoded.skipped} rows skipped (nothing to learn left after cutting)"
    report({"type": "message", "level": "warn" if encoded.truncated or encoded.skipped else "info",
            "message": note})
    return encoded


def _exit_with_parent() -> None:
    """End this process when the server's is gone (killed, crashed): the job is the server's, and a
    restarted server marks it failed rather than racing an orphan for its folder."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_job(spec: JobSpec, events, cancel) -> None:
    """The worker process's body (multiprocessing target)."""
    _exit_with_parent()
    import torch

    torch.set_num_threads(spec.threads)
    from transformers import AutoConfig, AutoTokenizer

    from loramux.server.errors import LoramuxError
    from loramux.server.finetune.trainer import TrainingCancelled, train

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.base_dir)
        context = AutoConfig.from_pretrained(spec.base_dir).max_position_embeddings
        max_length = spec.hyperparameters.sequence_length(context)
        train_set = _encode(spec.training_path, tokenizer, max_length, "training file", events.put)
        valid_set = (_encode(spec.validation_path, tokenizer, max_length, "validation file", events.put)
                     if spec.validation_path is not None else None)
        adapter_dir = spec.work_dir / "adapter"
        result = train(spec.base_dir, train_set, valid_set, spec.lora, spec.hyperparameters, adapter_dir,
                       on_event=events.put, should_stop=cancel.is_set, checkpoint_dir=spec.work_dir / "checkpoints",
                       seed=spec.seed)
        events.put({"type": "succeeded", "adapter_dir": str(adapter_dir), "steps": result.steps,
                    "trained_tokens": result.trained_tokens, "train_loss": result.train_loss,
                    "valid_loss": result.valid_loss, "base_valid_loss": result.base_valid_loss,
                    "elapsed_s": result.elapsed_s})
    except TrainingCancelled:
        events.put({"type": "cancelled"})
    except LoramuxError as exc:
        events.put({"type": "failed", "message": exc.message})
    except Exception as exc:  # the job fails; the server, in another process, does not
        events.put({"type": "failed", "message": f"{type(exc).__name__}: {exc}"})


class JobProcess:
    """The server's handle on one worker: start, read its reports, cancel, stop."""

    def __init__(self, spec: JobSpec):
        context = multiprocessing.get_context("spawn")
        self._events = context.Queue()
        self._cancel = context.Event()
        self._process = context.Process(target=run_job, args=(spec, self._events, self._cancel),
                                        name="loramux-finetune", daemon=True)
        self._process.start()

    def next_report(self, timeout_s: float) -> dict | None:
        """The next report (blocking up to timeout_s; call it in a thread); None if none came.
        A worker that died without its last report yields a `failed` one."""
        try:
            return self._events.get(timeout=timeout_s)
        except queue.Empty:
            if self._process.is_alive():
                return None
        try:  # it may have exited just after its last put
            return self._events.get(timeout=1.0)
        except queue.Empty:
            return {"type": "failed", "message": f"the training process exited with code {self._process.exitcode}"}

    def cancel(self) -> None:
        self._cancel.set()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Cancel, wait up to grace_s for the step in progress, then kill."""
        self._cancel.set()
        self._process.join(grace_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def join(self) -> None:
        self._process.join()
