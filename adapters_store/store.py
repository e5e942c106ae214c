"""Adapters on disk: validate, write atomically, list, delete.

    <root>/<name>/adapter_config.json
                  adapter_model.safetensors
                  meta.json            {"sha256", "created", "size"}
    <root>/.tmp-<random>/              an upload or delete in progress

A new adapter is written into a temp folder beside its final place, every
file and the folder fsynced, then renamed into place (and the root fsynced):
a crash at any point leaves either the whole adapter or none of it. Temp
folders left by a crash are removed when the store opens. Deleting renames
the folder to a temp name first, so a half-deleted adapter is never loaded.
Files are only ever read as JSON and safetensors (never unpickled).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loramux.adapters_store.durable import fsync_dir, write_synced
from loramux.server.config import ModelConfig
from loramux.adapters_store.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, LoraAdapter, parse_peft_adapter

log = logging.getLogger("loramux.adapter_store")

META_NAME = "meta.json"
_TMP_PREFIX = ".tmp-"
# ':' for fine-tuned models, named as OpenAI names them: ft:<base>:<suffix>:<job-id>
NAME_CHARS = "A-Za-z0-9._:-"
MAX_NAME_CHARS = 200  # a folder name (255 bytes at most) with room to spare
# A letter or digit first: no '.', '..', hidden or temporary folder (.tmp-*),
# no '__pycache__'-like folder and nothing that reads as a command-line flag.
NAME_RE = re.compile(f"[A-Za-z0-9][{NAME_CHARS}]{{0,{MAX_NAME_CHARS - 1}}}")


def check_name(name: str) -> None:
    """Raise AdapterError unless `name` is a safe adapter (and folder) name."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdapterError(f"the adapter name must be 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ : -, "
                           "starting with a letter or a digit", "name")


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    sha256: str  # of adapter_model.safetensors
    created: int  # unix time
    size: int  # bytes of adapter_model.safetensors


class AdapterStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{_TMP_PREFIX}*"):
            log.warning("removing %s left by an interrupted upload or delete", stale.name)
            shutil.rmtree(stale, ignore_errors=True)

    def _folder(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    def path(self, name: str) -> Path:
        """The adapter's folder (a PEFT folder: adapter_config.json + adapter_model.safetensors)."""
        return self._folder(name)

    def exists(self, name: str) -> bool:
        return self._folder(name).is_dir()

    def save(self, name: str, config_bytes: bytes, weights_bytes: bytes) -> StoredAdapter:
        """Write an adapter (already validated by the caller); FileExistsError if the name is taken."""
        target = self._folder(name)
        if target.exists():
            raise FileExistsError(name)
        meta = StoredAdapter(name, hashlib.sha256(weights_bytes).hexdigest(), int(time.time()), len(weights_bytes))
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=_TMP_PREFIX))
        try:
            write_synced(tmp / CONFIG_NAME, config_bytes)
            write_synced(tmp / WEIGHTS_NAME, weights_bytes)
            write_synced(tmp / META_NAME, json.dumps(
                {"sha256": meta.sha256, "created": meta.created, "size": meta.size}).encode())
            fsync_dir(tmp)
            if target.exists():
                raise FileExistsError(name)
            os.rename(tmp, target)  # atomic; fails if target appeared as a non-empty folder
            fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.exists():
                raise FileExistsError(name) from None
            raise exc
        return meta

    def delete(self, name: str) -> bool:
        target = self._folder(name)
        if not target.is_dir():
            return False
        trash = Path(tempfile.mkdtemp(dir=self.root, prefix=_TMP_PREFIX))
        os.rename(target, trash / name)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name))

    def read(self, name: str) -> tuple[bytes, bytes, StoredAdapter]:
        """(config bytes, weights bytes, meta) of a stored adapter."""
        folder = self._folder(name)
        config = (folder / CONFIG_NAME).read_bytes()
        weights = (folder / WEIGHTS_NAME).read_bytes()
        sha = hashlib.sha256(weights).hexdigest()
        if not (folder / META_NAME).exists():  # a PEFT folder copied in by hand
            return config, weights, StoredAdapter(name, sha, int(folder.stat().st_mtime), len(weights))
        try:
            meta = json.loads((folder / META_NAME).read_text())
            recorded, created = meta["sha256"], int(meta["created"])
        except (OSError, ValueError, KeyError, TypeError):
            raise AdapterError(f"{META_NAME}: missing or unreadable", META_NAME) from None
        if recorded != sha:
            raise AdapterError(f"{WEIGHTS_NAME}: sha256 differs from {META_NAME}; the file changed on disk",
                               WEIGHTS_NAME)
        return config, weights, StoredAdapter(name, sha, created, len(weights))

    def load_all(self, model: ModelConfig, max_rank: int) -> list[tuple[LoraAdapter, StoredAdapter]]:
        """Every stored adapter that still validates; invalid ones are logged and skipped."""
        return list(self.iter_all(model, max_rank))

    def iter_all(self, model: ModelConfig, max_rank: int) -> Iterator[tuple[LoraAdapter, StoredAdapter]]:
        """load_all one adapter at a time, so that a caller that keeps only
        metadata never holds every adapter's weights at once."""
        for name in self.names():
            try:
                config, weights, meta = self.read(name)
                adapter = parse_peft_adapter(config, weights, model, max_rank, name)
            except Exception as exc:  # a bad folder must never stop the server
                log.error("skipping stored adapter %r: %s", name, exc)
                continue
            yield adapter, meta
