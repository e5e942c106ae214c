"""Fine-tuning jobs on disk: their records, events and checkpoints, surviving restarts.

    <root>/<job-id>/job.json           {"job": <OpenAI's fine_tuning.job>, "created_ns"}
                    events.jsonl       one OpenAI fine_tuning.job.event a line, oldest first
                    checkpoints.jsonl  one OpenAI fine_tuning.job.checkpoint a line
                    work/              the worker's: training data, checkpoints/step-N, the adapter

job.json is rewritten whole through a temp file and a rename, so a crash leaves the old record or the
new one. Event and checkpoint lines are appended and fsynced; a torn last line (a crash mid-write) is
skipped when read. One lock serialises writes: the engine's event loop and the thread that relays a
worker's progress both write here.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from loramux.adapters_store.durable import replace_synced
from loramux.server.errors import NotFound

log = logging.getLogger("loramux.fine_tuning")

JOB_ID_RE = re.compile(r"ftjob-[0-9a-f]{24}")
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
JOB_NAME = "job.json"
EVENTS_NAME = "events.jsonl"
CHECKPOINTS_NAME = "checkpoints.jsonl"
WORK_NAME = "work"


def _append(path: Path, obj: dict) -> None:
    with open(path, "ab") as f:
        f.write(json.dumps(obj).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # the torn tail of a write a crash interrupted
            log.warning("%s: skipping an unreadable line", path)
    return out


def _page(items: list[dict], after: str | None, limit: int, what: str) -> tuple[list[dict], bool]:
    """(up to limit of items, newest first, starting after the one whose id is `after`; whether more follow)."""
    newest_first = items[::-1]
    if after is not None:
        ids = [item["id"] for item in newest_first]
        if after not in ids:
            raise NotFound(f"no {what} `{after}` to list after", "after", f"{what.replace(' ', '_')}_not_found")
        newest_first = newest_first[ids.index(after) + 1:]
    return newest_first[:limit], len(newest_first) > limit


class JobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}  # job id -> job.json's content, oldest first
        loaded = []
        for folder in self.root.iterdir():
            if not JOB_ID_RE.fullmatch(folder.name):
                continue
            try:
                loaded.append(json.loads((folder / JOB_NAME).read_bytes()))
            except (OSError, ValueError) as exc:
                log.error("skipping unreadable fine-tuning job %s: %s", folder.name, exc)
        for record in sorted(loaded, key=lambda r: (r["created_ns"], r["job"]["id"])):
            self._records[record["job"]["id"]] = record

    def _folder(self, job_id: str) -> Path:
        if job_id not in self._records:
            raise NotFound(f"no fine-tuning job `{job_id}`", "fine_tuning_job_id", "fine_tuning_job_not_found")
        return self.root / job_id

    def work_dir(self, job_id: str) -> Path:
        return self._folder(job_id) / WORK_NAME

    # -- jobs ---------------------------------------------------------------

    def create(self, job: dict) -> dict:
        """Store a new job (OpenAI's object without id and created_at, which are set here); the job."""
        created_ns = time.time_ns()
        job = {**job, "id": "ftjob-" + secrets.token_hex(12), "created_at": created_ns // 10**9}
        record = {"job": job, "created_ns": created_ns}
        with self._lock:
            folder = self.root / job["id"]
            (folder / WORK_NAME).mkdir(parents=True)
            self._records[job["id"]] = record = self._write(folder, record)
        return record["job"]

    @staticmethod
    def _write(folder: Path, record: dict) -> dict:
        """Write job.json; the record as it reads back (JSON's types), which is what is kept in memory."""
        data = json.dumps(record).encode()
        replace_synced(folder / JOB_NAME, data)
        return json.loads(data)

    def get(self, job_id: str) -> dict:
        self._folder(job_id)
        return self._records[job_id]["job"]

    def update(self, job_id: str, **fields) -> dict:
        """Set fields of the job's object; the job as it now is."""
        with self._lock:
            folder = self._folder(job_id)
            record = self._records[job_id]
            self._records[job_id] = record = self._write(folder, {**record, "job": {**record["job"], **fields}})
            return record["job"]

    def jobs(self) -> list[dict]:
        """Every job, oldest first."""
        with self._lock:
            return [r["job"] for r in self._records.values()]

    def list(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return _page(self.jobs(), after, limit, "fine-tuning job")

    # -- events and checkpoints ---------------------------------------------

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> dict:
        event = {"object": "fine_tuning.job.event", "id": "ftevent-" + secrets.token_hex(12),
                 "created_at": int(time.time()), "level": level, "message": message, "data": data or {},
                 "type": type}
        with self._lock:
            _append(self._folder(job_id) / EVENTS_NAME, event)
        return event

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return _page(_read_lines(self._folder(job_id) / EVENTS_NAME), after, limit, "event")

    def add_checkpoint(self, job_id: str, step: int, model_name: str, metrics: dict) -> dict:
        checkpoint = {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-" + secrets.token_hex(12),
                      "created_at": int(time.time()), "fine_tuned_model_checkpoint": model_name,
                      "fine_tuning_job_id": job_id, "metrics": metrics, "step_number": step}
        with self._lock:
            _append(self._folder(job_id) / CHECKPOINTS_NAME, checkpoint)
        return checkpoint

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return _page(_read_lines(self._folder(job_id) / CHECKPOINTS_NAME), after, limit, "checkpoint")

    def discard_work(self, job_id: str, keep_checkpoints: bool) -> None:
        """Remove what the worker wrote: all of it, or all but its checkpoints."""
        work = self.work_dir(job_id)
        if not keep_checkpoints:
            (self._folder(job_id) / CHECKPOINTS_NAME).unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            return
        for child in work.iterdir() if work.exists() else ():
            if child.name != "checkpoints":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
