"""The files of a registered PEFT folder, pinned to the bytes that were validated.

A folder registered by path (`/v1/load_lora_adapter`) stays the user's: its
files can be rewritten, or swapped for symlinks to anything the server can
read, after loramux validated them. So at registration each file's real path
(symlinks resolved once, then) and identity (device, inode, size, mtime) are
recorded, read through a descriptor opened with O_NOFOLLOW. Later reads open
the same real path with O_NOFOLLOW and refuse (`AdapterFilesChanged`) a file
whose identity differs, so what is served is always what was validated: a
download answers 409 instead of sending what is there now.
"""
from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_CHUNK = 1 << 20


class AdapterFilesChanged(Exception):
    """A registered adapter's file is no longer the one that was validated."""


@dataclass(frozen=True)
class PinnedFile:
    path: Path  # the real path at registration
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple["PinnedFile", bytes]:
        """Pin `path` and return its bytes, read through the pinned descriptor."""
        with cls._open_new(path) as (pinned, f):
            data = f.read()
        if len(data) != pinned.identity[2]:
            raise OSError(f"{path}: changed while it was read")
        return pinned, data

    @classmethod
    def stat(cls, path: str | os.PathLike) -> "PinnedFile":
        with cls._open_new(path) as (pinned, _):
            return pinned

    @classmethod
    def _open_new(cls, path):
        real = Path(os.path.realpath(path))
        f = _open_nofollow(real)
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise OSError(f"{path}: not a regular file")
        return _Opened(cls(real, _identity(st)), f)

    def open(self) -> BinaryIO:
        """The pinned file, opened; AdapterFilesChanged if it is not the same file any more."""
        try:
            f = _open_nofollow(self.path)
        except OSError:
            raise AdapterFilesChanged(f"{self.path.name} is gone or is now a symlink") from None
        if _identity(os.fstat(f.fileno())) != self.identity:
            f.close()
            raise AdapterFilesChanged(f"{self.path.name} changed since the adapter was registered")
        return f


class _Opened:
    def __init__(self, pinned: PinnedFile, f: BinaryIO):
        self.pinned, self.f = pinned, f

    def __enter__(self):
        return self.pinned, self.f

    def __exit__(self, *exc):
        self.f.close()
        return False


def _open_nofollow(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    return os.fdopen(fd, "rb")


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def tar_stream(folder_name: str, files: list[tuple[str, BinaryIO | bytes]]) -> Iterator[bytes]:
    """A tar of `files` ((name, open file or bytes)) under `folder_name/`, in
    chunks of at most 1 MiB; every open file is closed when the stream ends."""
    try:
        for name, source in files:
            f = io.BytesIO(source) if isinstance(source, bytes) else source
            size = os.fstat(f.fileno()).st_size if not isinstance(source, bytes) else len(source)
            entry = tarfile.TarInfo(f"{folder_name}/{name}")
            entry.size, entry.mtime, entry.mode = size, int(time.time()), 0o644
            yield entry.tobuf(format=tarfile.PAX_FORMAT)
            sent = 0
            while sent < size:
                chunk = f.read(min(_CHUNK, size - sent))
                if not chunk:
                    raise AdapterFilesChanged(f"{name} became shorter while it was sent")
                sent += len(chunk)
                yield chunk
            if size % tarfile.BLOCKSIZE:
                yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
        yield bytes(2 * tarfile.BLOCKSIZE)  # end of archive
    finally:
        for _, source in files:
            if not isinstance(source, bytes):
                source.close()
