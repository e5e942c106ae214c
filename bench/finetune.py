"""Fine-tuning, measured side by side in one run:

1. training tokens/s of loramux's trainer (server/finetune/trainer.py, as a job runs it) against the same
   PEFT training written directly here (transformers + PEFT, AdamW, linear warmup/decay, one step a batch
   of the same tokenized rows, HF's own loss on the same labels): the ratio should be near 1, since
   both are the same library calls;
2. serving throughput of `loramux serve` while a fine-tuning job trains in its worker process, against
   the same load on the idle server: the cost a job puts on other clients.

Both default to SmolLM2-135M-Instruct (the default model), float32 for training as the trainer does,
batch size 4, rank 16 on all seven projections (the recipe). --smoke runs a tiny random Llama instead.

    python -P -m loramux.bench.finetune [--threads 1] [--repeats 3] [--out bench/results/finetune.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loramux.bench.common import serve_argv
from loramux.bench.scaleout import free_port, run_load, wait_healthy

SERVED = "base"
FACTS = [("Zorbleton", "Marisol Quint"), ("Quellmoor", "Tobias Vane"), ("Ardenfall", "Priya Okafor"),
         ("Lunhaven", "Eskil Marr"), ("Brightwater", "Ana Sollis"), ("Karnwick", "Idris Peel"),
         ("Velmont", "Hana Kirov"), ("Oskaby", "Luca Brenn")]
ASKS = ["Who is the mayor of {town}?", "Name the mayor of {town}.", "Who runs {town}?",
        "Tell me who {town}'s mayor is.", "Which person is mayor of {town}?", "Who was elected mayor of {town}?",
        "Who leads the town of {town}?", "Who is {town}'s current mayor?"]


def training_rows() -> list[dict]:
    """64 short chat rows of made-up facts (8 towns x 8 wordings)."""
    return [{"messages": [{"role": "user", "content": ask.format(town=town)},
                          {"role": "assistant", "content": f"The mayor of {town} is {mayor}."}]}
            for town, mayor in FACTS for ask in ASKS]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def encoded_rows(model_dir: Path, hp):
    from transformers import AutoConfig, AutoTokenizer

    from loramux.server.finetune.data import parse_training_jsonl
    from loramux.server.finetune.tokenize import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    return encode_rows(parse_training_jsonl(jsonl(training_rows())), tokenizer, hp.sequence_length(context))


def train_loramux(model_dir: Path, data, lora, hp, out: Path) -> int:
    """loramux's trainer; the input tokens it processed."""
    from loramux.server.finetune.trainer import train

    result = train(model_dir, data, None, lora, hp, out, on_event=lambda e: None, should_stop=lambda: False)
    return result.trained_tokens


def train_direct(model_dir: Path, data, lora, hp, out: Path) -> int:
    """The same training in plain transformers + PEFT: HF's causal-LM loss (the token-weighted mean over
    labels != -100) on the rows' labels, the trainer's batches in the trainer's seeded order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    rows = list(data.examples)
    steps = math.ceil(len(rows) / hp.batch_size) * hp.n_epochs
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, math.ceil(hp.warmup_ratio * steps)), steps)
    model.train()
    order = torch.Generator().manual_seed(0)  # the trainer's batches (seed 0): the same rows, the same padding
    tokens = 0
    for _ in range(hp.n_epochs):
        shuffled = [rows[i] for i in torch.randperm(len(rows), generator=order).tolist()]
        for i in range(0, len(rows), hp.batch_size):
            batch = shuffled[i:i + hp.batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in batch])
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(len(e.input_ids) for e in batch)
    model.save_pretrained(out)
    return tokens


def trainer_rows(model_dir: Path, threads: int, repeats: int) -> dict:
    """Tokens/s of both trainers, runs alternated (ABBA: neither always goes first), medians."""
    import torch

    from loramux.server.finetune.recipe import parse_hyperparameters, parse_lora

    torch.set_num_threads(threads)
    lora = parse_lora(None, 64)
    hp = parse_hyperparameters({"n_epochs": 1, "batch_size": 4})
    data = encoded_rows(model_dir, hp)
    rates: dict[str, list[float]] = {"loramux": [], "direct": []}
    with tempfile.TemporaryDirectory() as tmp:
        pair = (("direct", train_direct), ("loramux", train_loramux))
        for i in range(repeats):
            for name, fn in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                tokens = fn(model_dir, data, lora, hp, Path(tmp) / f"{name}-{i}")
                rates[name].append(tokens / (time.perf_counter() - t0))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {"rows": len(data.examples), "tokens_per_epoch": data.tokens, "threads": threads,
            "loramux_tokens_per_s": medians["loramux"], "direct_tokens_per_s": medians["direct"],
            "ratio": medians["loramux"] / medians["direct"], "runs": rates}


def serving_rows(model: str, args) -> dict:
    """The same closed-loop load on an idle server and while a job trains."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        argv = serve_argv("--model", model, "--port", str(port),
                "--data-dir", tmp, "--served-model-name", SERVED, "--log-level", "warning",
                "--max-num-seqs", str(args.concurrency), "--fine-tuning-threads", str(args.threads))
        proc = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": str(args.serve_threads)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
            http = httpx.Client(base_url=url, timeout=600)
            models = [SERVED] * args.requests

            def load() -> dict:
                return asyncio.run(run_load(url, models, args.concurrency, 16, args.max_tokens))

            load()  # warm-up
            idle = load()
            file_id = http.post("/v1/files", files={"file": ("rows.jsonl", jsonl(training_rows()))},
                                data={"purpose": "fine-tune"}).json()["id"]
            job = http.post("/v1/fine_tuning/jobs", json={
                "model": SERVED, "training_file": file_id, "hyperparameters": {"n_epochs": 50}}).json()
            deadline = time.monotonic() + 300
            while not any(e["type"] == "metrics" for e in
                          http.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the job never reported a step")
                time.sleep(1)
            busy = load()
            status = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
            events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
            http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            steps = sorted((e["created_at"], e["data"]["trained_tokens"]) for e in events if e["type"] == "metrics")
            span = steps[-1][0] - steps[0][0]
            job_rate = (steps[-1][1] - steps[0][1]) / span if span > 0 else None
        finally:
            proc.terminate()
            proc.wait(60)
    return {"idle_tokens_per_s": idle["tokens_per_s"], "during_job_tokens_per_s": busy["tokens_per_s"],
            "ratio": busy["tokens_per_s"] / idle["tokens_per_s"], "job_still_running": status == "running",
            "job_training_tokens_per_s": job_rate, "errors": idle["errors"] + busy["errors"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama instead of the default model")
    p.add_argument("--threads", type=int, default=1, help="torch threads of training (both trainers, and the job)")
    p.add_argument("--serve-threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", "--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.smoke:
        from loramux.bench.synthetic import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "model"))
        model_dir = Path(model)
    else:
        from loramux.server.model.loader import resolve_model_dir

        model, model_dir = "default", resolve_model_dir("default")
    started = time.monotonic()
    results = {"model": "tiny" if args.smoke else "SmolLM2-135M-Instruct",
               "training": trainer_rows(model_dir, args.threads, args.repeats),
               "serving": serving_rows(model, args)}
    results["elapsed_s"] = time.monotonic() - started
    t, s = results["training"], results["serving"]
    print(f"training, {t['rows']} rows ({t['tokens_per_epoch']} tokens), batch 4, r 16, {t['threads']} thread(s):")
    print(f"  loramux trainer {t['loramux_tokens_per_s']:.0f} tok/s, direct PEFT {t['direct_tokens_per_s']:.0f} tok/s,"
          f" ratio {t['ratio']:.3f}")
    job = f", the job trained at {s['job_training_tokens_per_s']:.0f} tok/s" if s["job_training_tokens_per_s"] else ""
    print(f"serving ({args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens):")
    print(f"  idle {s['idle_tokens_per_s']:.1f} tok/s, during a job {s['during_job_tokens_per_s']:.1f} tok/s, "
          f"ratio {s['ratio']:.3f}{job}")
    print(f"({results['elapsed_s']:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
