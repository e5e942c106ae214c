"""The engine in its own thread, bridged to asyncio for the HTTP server.

Adds, aborts and calls from the event loop are queued as typed operations and
applied by the engine thread between steps, so the engine itself is only ever
touched by one thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from loramux.server.engine.engine import CheckedRequest, Engine, RequestFailed, RequestOutput

log = logging.getLogger("loramux.engine")


@dataclass(frozen=True)
class _Add:
    checked: CheckedRequest
    request_id: str


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class AsyncEngine:
    """Runs an Engine in its own thread; `generate` is an async iterator.
    `on_step(engine, outputs)` runs in the engine thread after every step
    (e.g. metrics); it must not raise or block."""

    def __init__(self, engine: Engine, on_step: Callable[[Engine, list[RequestOutput]], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._pending: list[_Add | _Abort | _Call] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self.last_progress = time.monotonic()
        self._idle = False
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
        self._thread.start()

    async def generate(self, checked: CheckedRequest, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The outputs of a checked request (Engine.check_request), as they come."""
        request_id = request_id or self.engine.new_request_id()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(_Add(checked, request_id))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away: free the request now
                self._submit(_Abort(request_id))

    async def call(self, fn):
        """Run fn(engine) in the engine thread between steps; its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Call(fn, loop, future))
        return await future

    def num_waiting(self) -> int:
        """Requests waiting in the engine plus adds not applied yet (for admission control)."""
        with self._wake:
            pending = sum(isinstance(op, _Add) for op in self._pending)
        return self.engine.scheduler.num_waiting + pending

    def silent_s(self) -> float:
        """Seconds the loop has been busy without finishing a step or an operation (0 while it
        waits for work): what /health calls a stall past its timeout."""
        return 0.0 if self._idle else time.monotonic() - self.last_progress

    def _submit(self, op: _Add | _Abort | _Call) -> None:
        with self._wake:
            self._pending.append(op)
            self._wake.notify()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """Hand (request id, output or exception) pairs to their consumers: one
        wake-up of each event loop for the lot, not one per output."""
        by_loop: dict = {}
        for request_id, item in items:
            entry = self._queues.get(request_id)
            if entry is not None:
                loop, queue = entry
                by_loop.setdefault(loop, []).append((queue, item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._pending and not self.engine.has_unfinished():
                    self._idle = True  # waiting for work is not a stall, however long the wait
                    self._wake.wait(timeout=1.0)
                self._idle = False
                self.last_progress = time.monotonic()
                if self._stop:
                    return
                ops, self._pending = self._pending, []
            for op in ops:
                self._apply(op)
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or OOM in one step must not kill the server
                log.exception("engine step failed; aborting the requests in flight")
                error = RuntimeError(f"engine step failed: {type(exc).__name__}")
                self._deliver_all((request_id, error) for request_id in self.engine.abort_all())
                continue
            self._deliver_all((o.request_id, RequestFailed(o.error) if o.error else o) for o in outputs)
            if self.on_step is not None:
                try:
                    self.on_step(self.engine, outputs)
                except Exception:
                    log.exception("on_step hook failed")
            self.last_progress = time.monotonic()

    def _apply(self, op: _Add | _Abort | _Call) -> None:
        if isinstance(op, _Add):
            try:
                self.engine.admit(op.checked, op.request_id)
            except Exception as exc:  # e.g. the adapter was deleted between check and add
                self._deliver(op.request_id, exc)
        elif isinstance(op, _Call):
            try:
                result, error = op.fn(self.engine), None
            except Exception as exc:
                result, error = None, exc
            op.loop.call_soon_threadsafe(_resolve, op.future, result, error)
        else:
            self.engine.abort(op.request_id)

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)


def _put_all(pairs) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
