"""OpenAI's fine-tuning jobs: create, list, cancel, and run them one after another.

A job's life: `validating_files` (its files exist, are training files, and are linked into the job's
folder so deleting them later cannot break it) -> `queued` -> `running` (a worker process,
server/finetune/worker.py) -> `succeeded` (the adapter stored and registered through
AdapterService, the one way every adapter enters) | `failed` | `cancelled` (nothing left behind).
Runners take queued jobs in order, --max-fine-tuning-jobs at a time (default one).

Jobs outlive the process: at start, a job the server was running when it stopped is marked failed
(code `server_stopped`; its checkpoints stay), and jobs still validating or queued are queued again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time
from pathlib import Path

from loramux.adapters_store.file_store import FileStore
from loramux.adapters_store.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loramux.adapters_store.store import NAME_CHARS
from loramux.server.api.adapter_service import AdapterService
from loramux.server.api.protocol import FineTuningJobRequest
from loramux.server.api.routes_files import PURPOSE
from loramux.server.errors import Invalid, LoramuxError, NotFound
from loramux.server.finetune.data import parse_training_jsonl
from loramux.server.finetune.job_store import ACTIVE, FINAL, JobStore
from loramux.server.finetune.recipe import parse_hyperparameters, parse_lora
from loramux.server.finetune.worker import JobProcess, JobSpec

log = logging.getLogger("loramux.fine_tuning")

ORGANIZATION = "loramux"
REPORT_POLL_S = 0.5
# how long POST .../cancel waits for a running job's worker to stop (it stops within one step)
CANCEL_WAIT_S = 60.0
_NOT_NAME = re.compile(f"[^{NAME_CHARS}]")


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's `ft:<base>:<suffix>:<job-id>`; characters an adapter name cannot hold become '-'."""
    return f"ft:{_NOT_NAME.sub('-', base)}:{suffix or ''}:{job_id}"


def _hyperparameters(body: FineTuningJobRequest):
    """The job's Hyperparameters from method.supervised.hyperparameters or the deprecated top level."""
    method = body.method or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") != "supervised":
        kind = method.get("type") if isinstance(method, dict) else method
        raise Invalid(f"method.type must be \"supervised\" (LoRA supervised fine-tuning), got {kind!r}",
                      "method.type")
    unknown = set(method) - {"type", "supervised"}
    if unknown:
        raise Invalid(f"method: unknown field {sorted(unknown)[0]!r}", f"method.{sorted(unknown)[0]}")
    supervised = method.get("supervised") or {}
    if not isinstance(supervised, dict) or set(supervised) - {"hyperparameters"}:
        raise Invalid("method.supervised takes only `hyperparameters`", "method.supervised")
    nested = supervised.get("hyperparameters")
    if nested is not None and body.hyperparameters is not None:
        raise Invalid("give hyperparameters in method.supervised.hyperparameters or at the top level "
                      "(deprecated), not both", "hyperparameters")
    if body.hyperparameters is not None:
        return parse_hyperparameters(body.hyperparameters, "hyperparameters")
    return parse_hyperparameters(nested, "method.supervised.hyperparameters")


class FineTuningService:
    def __init__(self, jobs: JobStore, files: FileStore, adapters: AdapterService, base_name: str, base_dir: Path,
                 threads: int, max_running: int):
        self.jobs = jobs
        self.files = files
        self.adapters = adapters  # stores and registers what a job trains
        self.base_name = base_name
        self.base_dir = base_dir  # the served base as an HF folder: what the worker trains on
        self.threads = threads
        self.max_running = max_running
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, JobProcess] = {}
        self._runners: list[asyncio.Task] = []
        self._finished: dict[str, asyncio.Event] = {}  # set when a job a cancel waits on ends
        # a cancel and a runner's queued -> running take this, so neither acts on a status the other changed
        self._transition = asyncio.Lock()
        self._cancelling: set[str] = set()  # running jobs asked to stop (their worker may still be starting)

    # -- the API ------------------------------------------------------------

    async def create(self, body: FineTuningJobRequest) -> dict:
        if body.model != self.base_name:
            raise Invalid(f"model must be the served base model `{self.base_name}` (adapters are trained on the "
                          f"base they are served on), got `{body.model}`", "model", "model_not_available")
        hp = _hyperparameters(body)
        lora = parse_lora(body.lora, self.adapters.max_rank)
        if body.integrations:
            raise Invalid("integrations (e.g. wandb) are not supported here; events and metrics are in "
                          "/v1/fine_tuning/jobs/{id}/events", "integrations")
        for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if file_id is not None:
                await self._check_file(file_id, param)
        hyperparameters = {"n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                           "learning_rate_multiplier": hp.learning_rate_multiplier}
        job = {"object": "fine_tuning.job", "model": body.model, "fine_tuned_model": None, "finished_at": None,
               "organization_id": ORGANIZATION, "result_files": [], "status": "validating_files",
               "training_file": body.training_file, "validation_file": body.validation_file,
               "hyperparameters": hyperparameters,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
               "trained_tokens": None, "error": None, "user_provided_suffix": body.suffix,
               "seed": body.seed if body.seed is not None else 0, "estimated_finish": None, "integrations": [],
               "metadata": body.metadata,
               "lora": dataclasses.asdict(lora), "metrics": None}  # extensions: the adapter's shape, the losses
        job = await asyncio.to_thread(self.jobs.create, job)
        await asyncio.to_thread(self.jobs.add_event, job["id"], f"Created fine-tuning job: {job['id']}")
        job = await self._validate(job["id"])
        return job

    async def get(self, job_id: str) -> dict:
        return self.jobs.get(job_id)  # held in memory: no disk read

    async def list(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self.jobs.list(after, limit)

    async def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return await asyncio.to_thread(self.jobs.events, job_id, after, limit)

    async def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return await asyncio.to_thread(self.jobs.checkpoints, job_id, after, limit)

    async def cancel(self, job_id: str) -> dict:
        async with self._transition:
            job = await self.get(job_id)
            if job["status"] in FINAL:
                raise Invalid(f"job `{job_id}` has already {'been ' if job['status'] == 'cancelled' else ''}"
                              f"{job['status']}", "fine_tuning_job_id", "job_not_cancellable")
            if job["status"] != "running":  # not started: the runner skips it
                return await self._end(job_id, "cancelled")
            self._cancelling.add(job_id)
            process = self._running.get(job_id)
            if process is not None:  # else the runner cancels it as soon as it has started it
                process.cancel()
        done = self._finished.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(done.wait(), CANCEL_WAIT_S)
        except asyncio.TimeoutError:
            pass  # still stopping; it ends `cancelled` within a step
        return await self.get(job_id)

    # -- life ---------------------------------------------------------------

    async def start(self) -> None:
        """Recover jobs a previous run left, then start the runners."""
        for job in self.jobs.jobs():
            if job["status"] == "running":
                await self._end(job["id"], "failed", error={
                    "code": "server_stopped", "param": None,
                    "message": "the server stopped while this job was running; its checkpoints are kept "
                               "(GET .../checkpoints); create the job again to train the adapter"})
            elif job["status"] in ACTIVE:
                await self._validate(job["id"])
        self._runners = [asyncio.create_task(self._run_queue()) for _ in range(self.max_running)]

    async def close(self) -> None:
        """Stop the runners; a job in training is stopped and marked failed (code server_stopped)."""
        running = list(self._running.items())  # before the runners go: theirs drop out of _running as they end
        for task in self._runners:
            task.cancel()
        for task in self._runners:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for job_id, process in running:
            await asyncio.to_thread(process.stop)
            await self._end(job_id, "failed", error={
                "code": "server_stopped", "param": None,
                "message": "the server stopped while this job was running; create the job again"})
        self._running.clear()

    # -- steps --------------------------------------------------------------

    async def _check_file(self, file_id: str, param: str) -> None:
        try:
            stored = await asyncio.to_thread(self.files.get, file_id)
        except NotFound:
            raise Invalid(f"invalid {param}: no file `{file_id}`", param, "invalid_file") from None
        if stored.purpose != PURPOSE:
            raise Invalid(f"invalid {param}: `{file_id}` has purpose {stored.purpose!r}, not {PURPOSE!r}", param,
                          "invalid_file")

    async def _validate(self, job_id: str) -> dict:
        """validating_files -> queued: link the files into the job's folder and parse them again."""
        job = await self.get(job_id)
        work = self.jobs.work_dir(job_id)
        try:
            for param, name in (("training_file", "training.jsonl"), ("validation_file", "validation.jsonl")):
                if job[param] is None:
                    continue
                target = work / name
                if not target.exists():
                    await self._check_file(job[param], param)
                    await asyncio.to_thread(os.link, self.files.content_path(job[param]), target)
                data = await asyncio.to_thread(target.read_bytes)
                try:
                    await asyncio.to_thread(parse_training_jsonl, data)
                except LoramuxError as exc:
                    raise Invalid(f"{param} `{job[param]}`: {exc.message}", param, "invalid_file") from None
        except (LoramuxError, OSError) as exc:
            return await self._end(job_id, "failed", error={
                "code": getattr(exc, "code", "invalid_file"), "param": getattr(exc, "param", None),
                "message": getattr(exc, "message", str(exc))})
        await asyncio.to_thread(self.jobs.add_event, job_id, "Files validated; the job is queued")
        job = await asyncio.to_thread(self.jobs.update, job_id, status="queued")
        self._queue.put_nowait(job_id)
        return job

    async def _run_queue(self) -> None:
        while True:
            job_id = await self._queue.get()
            async with self._transition:
                if (await self.get(job_id))["status"] != "queued":  # cancelled while it waited
                    continue
                await asyncio.to_thread(self.jobs.update, job_id, status="running")
            try:
                await self._run(job_id)
            except Exception as exc:  # one job's failure must never stop the queue
                log.exception("fine-tuning job %s failed", job_id)
                await self._end(job_id, "failed", error={"code": "internal_error", "param": None,
                                                         "message": f"{type(exc).__name__}: {exc}"})

    async def _run(self, job_id: str) -> None:
        job = await self.get(job_id)
        name = fine_tuned_name(self.base_name, job["user_provided_suffix"], job_id)
        work = self.jobs.work_dir(job_id)
        spec = JobSpec(base_dir=self.base_dir, training_path=work / "training.jsonl",
                       validation_path=work / "validation.jsonl" if job["validation_file"] else None,
                       # the job's stored, already checked settings, read back through the one parser
                       lora=parse_lora(job["lora"], self.adapters.max_rank),
                       hyperparameters=parse_hyperparameters(job["hyperparameters"]), work_dir=work,
                       seed=job["seed"], threads=self.threads)
        await asyncio.to_thread(self.jobs.add_event, job_id, "Fine-tuning job started")
        process = self._running[job_id] = await asyncio.to_thread(JobProcess, spec)
        if job_id in self._cancelling:  # cancelled while the worker started
            process.cancel()
        try:
            while True:
                report = await asyncio.to_thread(process.next_report, REPORT_POLL_S)
                if report is None:
                    continue
                kind = report["type"]
                if kind == "message":
                    await asyncio.to_thread(self.jobs.add_event, job_id, report["message"],
                                            level=report.get("level", "info"))
                elif kind == "metrics":
                    data = {k: v for k, v in report.items() if k != "type"}
                    await asyncio.to_thread(self.jobs.add_event, job_id, _metrics_message(data), type="metrics",
                                            data=data)
                elif kind == "checkpoint":
                    await asyncio.to_thread(self.jobs.add_checkpoint, job_id, report["step"],
                                            f"{name}:ckpt-step-{report['step']}", report["metrics"])
                    await asyncio.to_thread(self.jobs.add_event, job_id,
                                            f"Checkpoint created at step {report['step']}")
                else:
                    await asyncio.to_thread(process.join)
                    await self._finish(job_id, name, report)
                    return
        finally:
            self._running.pop(job_id, None)

    async def _finish(self, job_id: str, name: str, report: dict) -> None:
        if report["type"] == "cancelled":
            await self._end(job_id, "cancelled")
            return
        if report["type"] == "failed":
            await self._end(job_id, "failed", error={"code": "training_failed", "param": None,
                                                     "message": report["message"]})
            return
        folder = Path(report["adapter_dir"])
        config_bytes, weights_bytes = await asyncio.to_thread(
            lambda: ((folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()))
        try:
            async with self.adapters.lock:  # the same rules and atomic store as an upload
                self.adapters.check_new_name(name)
                adapter = await self.adapters.parse(config_bytes, weights_bytes, name)
                await self.adapters.save_and_register(adapter, config_bytes, weights_bytes)
        except LoramuxError as exc:
            await self._end(job_id, "failed", error={"code": exc.code, "param": None,
                                                     "message": f"the trained adapter was refused: {exc.message}"})
            return
        await asyncio.to_thread(self.jobs.add_event, job_id, f"New fine-tuned model created: {name}")
        metrics = {k: report[k] for k in ("steps", "train_loss", "valid_loss", "base_valid_loss", "elapsed_s")}
        await self._end(job_id, "succeeded", fine_tuned_model=name, trained_tokens=report["trained_tokens"],
                        metrics=metrics)

    async def _end(self, job_id: str, status: str, error: dict | None = None, **fields) -> dict:
        """Put a job in a final state, with its closing event; a cancelled job keeps no files."""
        job = await asyncio.to_thread(self.jobs.update, job_id, status=status, error=error,
                                      finished_at=int(time.time()), **fields)
        message = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
                   "failed": f"The job failed: {error['message'] if error else ''}"}[status]
        await asyncio.to_thread(self.jobs.add_event, job_id, message, level="error" if status == "failed" else "info")
        await asyncio.to_thread(self.jobs.discard_work, job_id, keep_checkpoints=status != "cancelled")
        self._cancelling.discard(job_id)
        done = self._finished.pop(job_id, None)
        if done is not None:
            done.set()
        return job


def _metrics_message(data: dict) -> str:
    valid = f", validation loss={data['valid_loss']:.4f}" if data.get("valid_loss") is not None else ""
    return f"Step {data['step']}/{data['total_steps']}: training loss={data['train_loss']:.4f}{valid}"
