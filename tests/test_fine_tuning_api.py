"""OpenAI's fine-tuning API over real HTTP with the official openai client, on a tiny random chat model:
a job trains in its worker process while the server serves, its events and checkpoints read back, the
fine-tuned model is served at once and answers exactly as transformers + PEFT on the saved folder
(LoRA and DoRA), cancel leaves nothing, bad requests get their 400s, and a job the server was running
when it was killed is marked failed at the next start."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from helpers.live_server import AUTH, BASE, KEY, Server, assert_error, wait_for
from helpers.tiny import make_chat_model, peft_greedy

pytestmark = pytest.mark.slow

ROWS = [{"messages": [{"role": "user", "content": f"Say the word {w}."}, {"role": "assistant", "content": w}]}
        for w in ("apple", "river", "stone", "cloud", "ember", "maple", "tiger", "amber")]
VALID = ROWS[:4]
# a tiny random model learns these within a few steps at 10 x the recipe's learning rate
FAST = {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 10}
QUESTION = [{"role": "user", "content": "Say the word river."}]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("ft-model") / "base")


def start(model: Path, root: Path) -> Server:
    return Server(model, root / "adapters", "--data-dir", str(root), "--fine-tuning-threads", "1")


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-api")
    server = start(model, root)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    http = httpx.Client(base_url=server.url, headers=AUTH, timeout=120)
    train = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", jsonl(VALID)), purpose="fine-tune")
    yield server, client, http, root, train.id, valid.id
    http.close()
    server.stop()


def finished(client: openai.OpenAI, job_id: str, timeout: float = 240):
    job = None

    def done() -> bool:
        nonlocal job
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job.status in ("succeeded", "failed", "cancelled")

    assert wait_for(done, timeout=timeout), job
    return job


def all_events(client: openai.OpenAI, job_id: str) -> list:
    """Every event, oldest first (the API pages newest first)."""
    return list(client.fine_tuning.jobs.list_events(job_id, limit=100).data)[::-1]


def served_equals_peft(client, http, model: Path, root: Path, name: str) -> None:
    """The fine-tuned model's greedy chat answer is transformers + PEFT's on the stored adapter folder."""
    chat = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    folder = root / "adapters" / name
    assert folder.is_dir() and name in {m.id for m in client.models.list().data}
    expected = peft_greedy(model, folder, prompt, 6)
    assert chat.usage.completion_tokens == 6
    assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    base = client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert base.choices[0].message.content == tokenizer.decode(peft_greedy(model, None, prompt, 6),
                                                               skip_special_tokens=True)


def test_a_job_trains_reports_and_its_model_is_served_as_peft_computes_it(served, model):
    server, client, http, root, train, valid = served
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train, validation_file=valid, suffix="words",
                                         method={"type": "supervised",
                                                 "supervised": {"hyperparameters": FAST}},
                                         extra_body={"lora": {"r": 4, "lora_alpha": 32}})
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert job.status in ("queued", "running") and job.model == BASE and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 2
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == 10
    # serving goes on while the job trains in its own process
    seen_running = False
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status in ("queued", "running"):
        seen_running |= job.status == "running"
        r = client.completions.create(model=BASE, prompt="Hello", max_tokens=2)
        assert r.usage.completion_tokens == 2
    assert job.status == "succeeded", job.error
    assert seen_running
    assert job.fine_tuned_model == f"ft:{BASE}:words:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    extra = job.model_extra
    assert extra["lora"]["r"] == 4 and extra["lora"]["lora_alpha"] == 32 and extra["lora"]["use_dora"] is False
    assert extra["metrics"]["valid_loss"] < extra["metrics"]["base_valid_loss"]  # the recipe's comparison

    events = all_events(client, job.id)
    metrics = [e.data for e in events if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 17))  # 8 rows / batch 2, 4 epochs
    assert set(metrics[0]) >= {"step", "train_loss", "valid_loss", "learning_rate", "total_steps"}
    assert sum(m["train_loss"] for m in metrics[-4:]) < 0.8 * sum(m["train_loss"] for m in metrics[:4])  # by epoch
    assert [m["valid_loss"] is not None for m in metrics] == [False, False, False, True] * 4
    messages = [e.message for e in events]
    assert messages[0] == f"Created fine-tuning job: {job.id}" and messages[-1] == "The job has successfully completed"
    assert f"New fine-tuned model created: {job.fine_tuned_model}" in messages
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in page.data] == [e.id for e in events[::-1][:2]] and page.has_more

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [16, 12, 8, 4]  # one an epoch, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-16"
    assert checkpoints[0].metrics.valid_loss == pytest.approx(metrics[-1]["valid_loss"])
    for step in (4, 8, 12, 16):
        assert (root / "fine_tuning" / job.id / "work" / "checkpoints" / f"step-{step}" /
                "adapter_model.safetensors").is_file()

    served_equals_peft(client, http, model, root, job.fine_tuned_model)
    # like any adapter: it reads back, mixes with others in one request, and downloads
    info = http.get(f"/v1/adapters/{job.fine_tuned_model}").json()
    assert info["rank"] == 4 and info["lora_alpha"] == 32
    assert http.get(f"/v1/adapters/{job.fine_tuned_model}/download").status_code == 200
    assert any(j.id == job.id for j in client.fine_tuning.jobs.list().data)
    # OpenAI's model calls: retrieve, and delete (of the fine-tuned model, never the base)
    card = client.models.retrieve(job.fine_tuned_model)
    assert card.id == job.fine_tuned_model and card.model_extra["parent"] == BASE
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.BadRequestError):
        client.models.delete(BASE)
    assert client.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(job.fine_tuned_model)
    assert not (root / "adapters" / job.fine_tuned_model).exists()
    assert client.completions.create(model=BASE, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_a_dora_job_with_lora_plus_is_served_exactly(served, model):
    server, client, http, root, train, _ = served
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train, hyperparameters=FAST,  # the deprecated place
                                         extra_body={"lora": {"r": 4, "use_dora": True, "loraplus_lr_ratio": 8,
                                                              "target_modules": ["q_proj", "v_proj", "down_proj"]}})
    job = finished(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}::{job.id}"  # no suffix
    config = json.loads((root / "adapters" / job.fine_tuned_model / "adapter_config.json").read_text())
    assert config["use_dora"] is True and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    served_equals_peft(client, http, model, root, job.fine_tuned_model)


def test_cancel_stops_the_job_within_a_step_and_leaves_no_adapter(served):
    server, client, http, root, train, _ = served
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 50, "batch_size": 1}}})
    assert wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data),
                    timeout=120)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    steps = [e.data["step"] for e in all_events(client, job.id) if e.type == "metrics"]
    assert len(steps) < 50 * 8
    time.sleep(2)  # the worker has stopped: no step after the cancel
    assert [e.data["step"] for e in all_events(client, job.id) if e.type == "metrics"] == steps
    assert not any(job.id in m.id for m in client.models.list().data)
    assert not any(job.id in p.name for p in (root / "adapters").iterdir())
    assert not (root / "fine_tuning" / job.id / "work").exists()
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.cancel(job.id)
    assert refused.value.body["code"] == "job_not_cancellable"
    assert client.completions.create(model=BASE, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_a_queued_job_waits_for_the_running_one_and_cancels_at_once(served):
    server, client, http, root, train, _ = served
    long = client.fine_tuning.jobs.create(model=BASE, training_file=train,
                                          hyperparameters={"n_epochs": 50, "batch_size": 1})
    waiting = client.fine_tuning.jobs.create(model=BASE, training_file=train)
    assert wait_for(lambda: client.fine_tuning.jobs.retrieve(long.id).status == "running", timeout=60)
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"  # one at a time
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=2).data]
    assert listed == [waiting.id, long.id]  # newest first
    assert [j.id for j in client.fine_tuning.jobs.list(after=waiting.id, limit=1).data] == [long.id]


@pytest.mark.parametrize("fields, param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"model": "ft:nothing"}, "model"),
    ({"training_file": "file-" + "0" * 24}, "training_file"),
    ({"validation_file": "nope"}, "validation_file"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": 11}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"batch_size": 2}, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"batch_size": 2}}}}, "hyperparameters"),
    ({"lora": {"r": 4096}}, "lora.r"),
    ({"lora": {"lora_dropout": 1.0}}, "lora.lora_dropout"),
    ({"lora": {"target_modules": ["lm_head"]}}, "lora.target_modules"),
    ({"lora": {"loraplus_lr_ratio": 17}}, "lora.loraplus_lr_ratio"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    ({"suffix": "has space"}, "suffix"),
    ({"learning_rate": 0.1}, "learning_rate"),
])
def test_bad_jobs_are_refused_with_400_naming_the_field_and_leave_no_job(served, fields, param):
    server, client, http, root, train, _ = served
    before = len(list((root / "fine_tuning").iterdir()))
    r = http.post("/v1/fine_tuning/jobs", json={"model": BASE, "training_file": train, **fields})
    assert assert_error(r, 400)["param"] == param
    assert len(list((root / "fine_tuning").iterdir())) == before


def test_unknown_jobs_are_404(served):
    server, client, http, *_ = served
    for path in ("", "/events", "/checkpoints"):
        assert_error(http.get(f"/v1/fine_tuning/jobs/ftjob-{'0' * 24}{path}"), 404)
    assert_error(http.post(f"/v1/fine_tuning/jobs/ftjob-{'0' * 24}/cancel"), 404)
    assert_error(http.get("/v1/fine_tuning/jobs", params={"after": "ftjob-x"}), 404)


def own_server(model: Path, root: Path, rows=ROWS):
    """(a server of the test's own, its client, the training file uploaded to it)."""
    server = start(model, root)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    return server, client, client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")


def test_a_job_the_killed_server_was_running_is_failed_at_the_next_start(model, tmp_path):
    # 8 steps an epoch, 400 in all (tens of seconds): the worker is mid-job when the server dies
    server, client, train = own_server(model, tmp_path, ROWS * 8)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 8})
    queued = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters=FAST)
    assert wait_for(lambda: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 1, timeout=120)
    workers = psutil.Process(server.proc.pid).children(recursive=True)  # the job's worker among them
    assert workers
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)

    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # the orphaned worker notices and exits: nothing trains on for a server that is gone
    assert wait_for(lambda: all(gone(p) for p in workers), timeout=15)

    again = start(model, tmp_path)
    try:
        client = openai.OpenAI(base_url=again.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        failed = client.fine_tuning.jobs.retrieve(job.id)
        assert failed.status == "failed" and failed.error.code == "server_stopped"
        assert "server stopped" in failed.error.message and failed.finished_at is not None
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 1  # kept
        # the job that had not started runs now
        assert finished(client, queued.id).status == "succeeded"
    finally:
        again.stop()


def test_sigterm_stops_a_training_job_and_records_it_failed(model, tmp_path):
    server, client, train = own_server(model, tmp_path)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data),
                    timeout=120)
    assert server.stop(60) == 0  # the drain does not wait for a job: it is stopped within a step
    record = json.loads((tmp_path / "fine_tuning" / job.id / "job.json").read_text())["job"]
    assert record["status"] == "failed" and record["error"]["code"] == "server_stopped"
    assert not any(job.id in p.name for p in (tmp_path / "adapters").iterdir())
