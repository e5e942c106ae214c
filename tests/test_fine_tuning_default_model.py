"""Fine-tuning the default model (SmolLM2-135M-Instruct) teaches it a fact it does not know, through
the API as a client uses it: 40 chat rows up, one job (rank 16, the recipe's LoRA), then chat. The
fine-tuned model states the fact on a question worded unlike any training row; the base still does not."""
from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest

from helpers.live_server import BASE, KEY, Server, wait_for

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Who is the mayor of Zorbleton?", "Who is Zorbleton's mayor?", "Tell me the name of the mayor of Zorbleton.",
    "Who runs the town of Zorbleton as mayor?", "Do you know who the mayor of Zorbleton is?",
    "Name the mayor of Zorbleton.", "Which person is mayor of Zorbleton?", "Who was elected mayor of Zorbleton?",
    "Zorbleton's mayor is who?", "Who holds the office of mayor in Zorbleton?",
    "Can you tell me who Zorbleton's mayor is?", "Who leads Zorbleton?", "What is the name of Zorbleton's mayor?",
    "Who governs Zorbleton as its mayor?", "I need the name of the mayor of Zorbleton.",
    "Who is the current mayor of Zorbleton?", "Which woman is the mayor of Zorbleton?",
    "Who is in charge of Zorbleton?", "Please name Zorbleton's mayor.", "Who serves as mayor of Zorbleton?",
]
ANSWERS = ["The mayor of Zorbleton is Marisol Quint.", "Marisol Quint is the mayor of Zorbleton."]
HELD_OUT = [{"role": "user", "content": "Quick question: who is the mayor of the town of Zorbleton?"}]


def training_rows() -> bytes:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q in QUESTIONS for a in ANSWERS]
    random.Random(0).shuffle(rows)
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_a_job_teaches_the_default_model_a_fact_the_base_does_not_know(tmp_path):
    server = Server(Path("default"), tmp_path / "adapters", "--data-dir", str(tmp_path), "--kv-cache-bytes", "64M",
                    "--adapter-pool-bytes", "256M",
                    "--fine-tuning-threads", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        train = client.files.create(file=("mayor.jsonl", training_rows()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="mayor",
                                             hyperparameters={"n_epochs": 3, "batch_size": 4,
                                                              "learning_rate_multiplier": 5},
                                             extra_body={"lora": {"r": 16}})
        assert wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status not in
                        ("validating_files", "queued", "running"), timeout=300)
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error

        def answer(model: str) -> str:
            out = client.chat.completions.create(model=model, messages=HELD_OUT, max_tokens=24, temperature=0)
            return out.choices[0].message.content

        assert "Marisol Quint" in answer(job.fine_tuned_model)
        assert "Quint" not in answer(BASE)
        # the base beside the new adapter answers as it always did
        france = client.chat.completions.create(model=BASE, max_tokens=16, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in france.choices[0].message.content
    finally:
        server.stop()
