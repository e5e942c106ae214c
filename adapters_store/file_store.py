"""Uploaded files (the Files API, for fine-tuning data): written atomically,
listed from the folder itself.

    <root>/file-<24 hex>/content     the bytes as uploaded
                         meta.json   {"filename", "purpose", "bytes", "created_ns"}
    <root>/.tmp-<random>/            a save or delete in progress

A file is written into a temp folder beside its final place, both files and
the folder fsynced, then renamed into place (and the root fsynced): a crash
leaves the whole file or none of it, and temp folders a crash left are
removed when the store opens. Deleting renames the folder to a temp name
first. The folder is the only state, so every process over the same root
(a restarted server, each Ray Serve replica) sees the same files. Ids are
checked against FILE_ID_RE before they touch a path; the client's filename
is metadata, never a path.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loramux.adapters_store.durable import fsync_dir, write_synced
from loramux.server.errors import NotFound, TooLarge

log = logging.getLogger("loramux.file_store")

DEFAULT_MAX_BYTES = 512 * 2**20
FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")
MAX_FILENAME_CHARS = 255
CONTENT_NAME = "content"
META_NAME = "meta.json"
_TMP_PREFIX = ".tmp-"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class FileObject:
    id: str
    bytes: int
    created_at: int  # unix time, seconds
    filename: str
    purpose: str

    def to_openai(self) -> dict:
        """OpenAI's `file` object. Stored files are processed (validated) before
        they exist, and never expire."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


def is_file_id(text: object) -> bool:
    return isinstance(text, str) and FILE_ID_RE.fullmatch(text) is not None


def clean_filename(filename: str) -> str:
    """The client's filename as metadata: its last path part (either slash),
    without control characters, at most MAX_FILENAME_CHARS; "file" if nothing is left."""
    base = _CONTROL.sub("", filename.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return base[:MAX_FILENAME_CHARS] or "file"


class FileStore:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{_TMP_PREFIX}*"):
            log.warning("removing %s left by an interrupted upload or delete", stale.name)
            shutil.rmtree(stale, ignore_errors=True)

    def _folder(self, file_id: str) -> Path:
        """The file's folder; NotFound for a malformed id, which never becomes a path."""
        if not is_file_id(file_id):
            raise NotFound(f"no file `{file_id}`", "file_id", "file_not_found")
        return self.root / file_id

    def _read(self, file_id: str) -> tuple[int, FileObject]:
        """(created_ns, the file) of a stored file; OSError or ValueError if it is not (readable) there."""
        meta = json.loads((self.root / file_id / META_NAME).read_bytes())
        created_ns = int(meta["created_ns"])
        return created_ns, FileObject(file_id, int(meta["bytes"]), created_ns // 10**9, str(meta["filename"]),
                                      str(meta["purpose"]))

    def save(self, filename: str, purpose: str, data: bytes) -> FileObject:
        """Store `data` (already validated by the caller) under a new id."""
        if len(data) > self.max_bytes:
            raise TooLarge(f"the file is larger than the limit of {self.max_bytes} bytes", "file", "file_too_large")
        created_ns = time.time_ns()
        stored = FileObject("file-" + secrets.token_hex(12), len(data), created_ns // 10**9,
                            clean_filename(filename), purpose)
        meta = {"filename": stored.filename, "purpose": purpose, "bytes": stored.bytes, "created_ns": created_ns}
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=_TMP_PREFIX))
        try:
            write_synced(tmp / CONTENT_NAME, data)
            write_synced(tmp / META_NAME, json.dumps(meta).encode())
            fsync_dir(tmp)
            os.replace(tmp, self.root / stored.id)  # atomic; a (2^-96) taken id fails: non-empty folder
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return stored

    def get(self, file_id: str) -> FileObject:
        self._folder(file_id)
        try:
            return self._read(file_id)[1]
        except (OSError, ValueError, KeyError, TypeError):
            raise NotFound(f"no file `{file_id}`", "file_id", "file_not_found") from None

    def list(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
             order: Literal["asc", "desc"] = "desc") -> tuple[list[FileObject], bool]:
        """(up to `limit` files in creation order, whether more follow); `after`:
        the id of the file the page starts after (NotFound if it is not stored)."""
        entries: list[tuple[tuple[int, str], FileObject]] = []  # ((created_ns, id), file)
        for folder in self.root.iterdir():
            if not is_file_id(folder.name):
                continue
            try:
                created_ns, stored = self._read(folder.name)
                entries.append(((created_ns, stored.id), stored))
            except FileNotFoundError:  # deleted while listed
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable stored file %s: %s", folder.name, exc)
        # creation order, to the nanosecond; the id breaks ties, so pages never overlap
        entries.sort(key=lambda e: e[0], reverse=order == "desc")
        if after is not None:
            cursor = (self._cursor(after), after)
            entries = [e for e in entries if (e[0] > cursor if order == "asc" else e[0] < cursor)]
        matching = [f for _, f in entries if purpose is None or f.purpose == purpose]
        return matching[:limit], len(matching) > limit

    def _cursor(self, after: str) -> int:
        """created_ns of the file a page starts after."""
        try:
            self._folder(after)
            return self._read(after)[0]
        except (NotFound, OSError, ValueError, KeyError, TypeError):  # malformed, unknown or unreadable
            raise NotFound(f"no file `{after}` to list after", "after", "file_not_found") from None

    def content_path(self, file_id: str) -> Path:
        """The stored bytes' path (NotFound for a file that is not stored)."""
        path = self._folder(file_id) / CONTENT_NAME
        if not path.is_file():
            raise NotFound(f"no file `{file_id}`", "file_id", "file_not_found")
        return path

    def delete(self, file_id: str) -> bool:
        """Whether the file was there (and now is not)."""
        if not is_file_id(file_id):
            return False
        target = self.root / file_id
        if not target.is_dir():
            return False
        trash = Path(tempfile.mkdtemp(dir=self.root, prefix=_TMP_PREFIX))
        try:
            os.rename(target, trash / file_id)
        except FileNotFoundError:  # deleted at the same time by another request
            return False
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.root)
        return True
