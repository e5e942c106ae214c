"""The disk tier: what the pool knows of a registered adapter without its
weights, and how it reads them back."""
from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from loramux.adapters_store.files import AdapterFilesChanged, PinnedFile
from loramux.adapters_store.peft_format import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, ModuleLora, load_peft_adapter, \
    safetensors_dtype, tensor_key_parts
from loramux.server.config import ModelConfig

# ---------------------------------------------------------------------------
# the disk tier: what the pool knows of an adapter without its weights
# ---------------------------------------------------------------------------

class AdapterUnavailable(RuntimeError):
    """A registered adapter's weights can no longer be read as registered."""


@dataclass(frozen=True)
class AdapterSource:
    """A registered adapter on the disk tier. `load()` returns its weights
    (float32, CPU) with this digest, or raises AdapterUnavailable."""

    name: str
    digest: str
    rank: int
    nbytes: int
    load: Callable[[], LoraAdapter]

    @classmethod
    def in_memory(cls, adapter: LoraAdapter) -> "AdapterSource":
        """Weights held by the source itself (offline use, tests, and adapters
        deleted from disk while requests still hold them)."""
        return cls(adapter.name, adapter.digest, adapter.rank, adapter.nbytes, _Held(adapter))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, adapter: LoraAdapter, model: ModelConfig,
                    max_rank: int, files: dict[str, PinnedFile] | None = None) -> "AdapterSource":
        """`adapter` was parsed and validated from the PEFT `folder` (from
        `files`, when given), a folder that stays its owner's (registered by
        path); only its metadata is kept, the weights are read back when needed."""
        return cls(adapter.name, adapter.digest, adapter.rank, adapter.nbytes,
                   FolderLoader(folder, adapter, model, max_rank, files))

    @classmethod
    def from_store(cls, folder: str | os.PathLike, adapter: LoraAdapter, model: ModelConfig,
                   max_rank: int) -> "AdapterSource":
        """As from_folder, for a folder of the adapter store (or another that
        no one rewrites in place): its weights file is mapped, not read,
        where the folder is on a local filesystem (maps_safely)."""
        return cls(adapter.name, adapter.digest, adapter.rank, adapter.nbytes,
                   FolderLoader(folder, adapter, model, max_rank, mapped=maps_safely(folder)))

    @property
    def held(self) -> bool:
        return isinstance(self.load, _Held)


# filesystems whose mapped pages stay readable while a file is renamed or unlinked
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "ramfs", "overlay"})


def filesystem_type(path: str | os.PathLike, mountinfo: str) -> str | None:
    """The type of the filesystem `path` is on, from /proc/self/mountinfo's text
    (the mount point that is the longest prefix of its real path); None if no
    line names it."""
    real = os.path.realpath(path)
    best, fs_type = -1, None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # mountinfo writes a space as \040
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, fs_type = len(point), line.split(" - ", 1)[1].split()[0]
    return fs_type


def maps_safely(folder: str | os.PathLike) -> bool:
    """Whether the store folder's files may be mapped: on a local filesystem
    only. On a network one (the shared volume of a cluster of replicas: NFS,
    CIFS, a FUSE mount) another node deleting the file can leave a mapped page
    unreadable (ESTALE), and touching it ends the process (SIGBUS)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return filesystem_type(folder, f.read()) in LOCAL_FILESYSTEMS
    except OSError:
        return False


class _Held:
    def __init__(self, adapter: LoraAdapter):
        self.adapter = adapter

    def __call__(self) -> LoraAdapter:
        return self.adapter


class FolderLoader:
    """Reads an adapter back from its PEFT folder, fast.

    At registration the folder was parsed and validated in full, giving the
    digest; we keep the weights file's identity (inode, size, mtime) and each
    module's scale. While the file is that same file (the adapter store
    never rewrites one in place: uploads and deletes are renames), reading it
    back is one read and a safetensors header parse, with no hashing. A file
    replaced since is parsed in full again and must give the same digest.

    `mapped`: the weights file is mapped instead of read, where nothing
    rewrites it in place (the adapter store's folders: its writes and
    deletes are renames, which leave a mapping valid on a local filesystem). Reading it copies
    every byte into freshly faulted memory first, which costs more than
    the copy into the pool that follows (a rank-16 adapter: about 8 ms of
    a 15 ms load, against about 1 ms mapped). A user's folder is read: a
    file truncated while mapped would end the process on the next access
    (SIGBUS).
    """

    def __init__(self, folder: str | os.PathLike, adapter: LoraAdapter, model: ModelConfig, max_rank: int,
                 files: dict[str, PinnedFile] | None = None, mapped: bool = False):
        """`files`: the pinned config and weights files that were validated
        (adapters_store/files.py); pinned now when not given."""
        self.folder = Path(folder)
        self.files = files if files is not None else {
            n: PinnedFile.stat(self.folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME)}
        self.meta = dict(name=adapter.name, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                         target_modules=adapter.target_modules, config=adapter.config,
                         digest=adapter.digest, nbytes=adapter.nbytes)
        self.ranks = {k: m.rank for k, m in adapter.modules.items()}
        self.scales = {k: m.scale for k, m in adapter.modules.items()}
        self.model, self.max_rank, self.mapped = model, max_rank, mapped
        self._layout = None  # the weights file's tensor layout, once read (_tensor_layout)

    def __call__(self) -> LoraAdapter:
        name, digest = self.meta["name"], self.meta["digest"]
        weights = self.files[WEIGHTS_NAME]
        try:
            try:
                with weights.open() as f:
                    size = weights.identity[2]
                    if self.mapped:  # private and writable: torch.frombuffer wants a writable buffer
                        return self._parse(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))
                    data = bytearray(size)
                    if f.readinto(data) == len(data):
                        return self._parse(data)
            except AdapterFilesChanged:
                pass
            adapter = load_peft_adapter(self.folder, self.model, self.max_rank, name)
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterUnavailable(f"adapter {name!r}: {self.folder} cannot be read: {exc}") from None
        if adapter.digest != digest:
            raise AdapterUnavailable(f"adapter {name!r}: {self.folder} changed on disk since it was registered")
        return adapter

    def open_files(self) -> list[tuple[str, BinaryIO]]:
        """The config and weights files as validated, open; AdapterFilesChanged if either changed."""
        opened: list[tuple[str, BinaryIO]] = []
        try:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                opened.append((name, self.files[name].open()))
        except AdapterFilesChanged:
            for _, f in opened:
                f.close()
            raise
        return opened

    def _tensor_layout(self, data: bytearray | mmap.mmap) -> list[tuple[tuple[int, str], str, int, int, torch.dtype, list]]:
        """Where each tensor lies in the weights file: ((layer, module), A|B|M,
        byte offset, element count, dtype, shape). Parsed from the first read
        and kept: the file is pinned to the one validated, so its header is too."""
        if self._layout is None:
            n = int.from_bytes(data[:8], "little")
            layout = []
            for key, info in json.loads(data[8 : 8 + n]).items():
                if key == "__metadata__":
                    continue
                layer, _, module, ab = tensor_key_parts(key)  # validated at registration: never None
                lo, hi = info["data_offsets"]
                dtype = safetensors_dtype(info["dtype"])
                layout.append(((layer, module), ab, 8 + n + lo, (hi - lo) // dtype.itemsize, dtype, info["shape"]))
            self._layout = layout
        return self._layout

    def _parse(self, data: bytearray | mmap.mmap) -> LoraAdapter:
        found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for k, ab, start, count, dtype, shape in self._tensor_layout(data):
            buf = data if start % dtype.itemsize == 0 else bytearray(data[start : start + count * dtype.itemsize])
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=start if buf is data else 0)
            found.setdefault(k, {})[ab] = t.view(shape).float()
        modules = {}
        for k, scale in self.scales.items():
            a, b = found[k]["A"], found[k]["B"]
            if a.shape[0] != self.ranks[k] or b.shape[1] != self.ranks[k]:
                raise AdapterUnavailable(f"adapter {self.meta['name']!r}: {k} has a different rank on disk")
            modules[k] = ModuleLora(a=a, b=b, scale=scale, magnitude=found[k].get("M"))
        return LoraAdapter(modules=modules, **self.meta)
