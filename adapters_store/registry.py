"""The one registry of adapter names: name -> digest, source and info.

It is the only place a name means something. The API resolves a request's
name here once and hands the engine the digest; the engine, scheduler and
pool never see a name. Each name holds one registration on its digest in the
pool (AdapterPool.add / detach), so the pool keeps the weights of a named
adapter and forgets them when the last name and the last request go.

Thread-safe: the event loop registers and resolves while the engine thread
and the metrics read. The registry's lock is taken before the pool's, never
after.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from loramux.adapters_store.pool import AdapterPool
from loramux.adapters_store.sources import AdapterSource
from loramux.server.errors import Conflict, NotFound


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    source: AdapterSource  # its digest and how its weights are read
    info: Any = None  # what the front end shows of it (server/api's AdapterInfo); never read here

    @property
    def digest(self) -> str:
        return self.source.digest


class AdapterRegistry:
    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self._lock = threading.Lock()
        self._entries: dict[str, RegisteredAdapter] = {}

    def register(self, entry: RegisteredAdapter) -> None:
        """Conflict if the name is taken; the pool's rules (the adapter must fit) apply."""
        with self._lock:
            if entry.name in self._entries:
                raise Conflict(f"adapter `{entry.name}` already exists", "name", "adapter_exists")
            self.pool.add(entry.source)
            self._entries[entry.name] = entry

    def unregister(self, name: str) -> RegisteredAdapter:
        """Remove the name now (new requests get NotFound); requests already
        holding its digest finish with its weights, which the pool reads into
        memory first if they are still in use. Reads from disk: call it off
        the event loop."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise NotFound(f"adapter `{name}` does not exist", "name", "adapter_not_found")
        self.pool.detach(entry.digest)
        return entry

    def get(self, name: str) -> RegisteredAdapter | None:
        with self._lock:
            return self._entries.get(name)

    def lookup(self, name: str, param: str = "name", code: str = "adapter_not_found") -> RegisteredAdapter:
        """The entry named `name`; NotFound naming `param` when there is none."""
        entry = self.get(name)
        if entry is None:
            raise NotFound(f"adapter `{name}` does not exist", param, code)
        return entry

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[RegisteredAdapter]:
        """Every registered adapter, by name."""
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]
