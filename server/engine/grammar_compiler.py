"""Compiling structured-output specs into Guides, off the engine thread.

A grammar compiles in a worker process (xgrammar, against this model's
vocabulary). A compile that takes longer than the timeout is refused and its
worker killed, so a pathological schema costs its own request a 400 and
nobody else a core. Results are cached by content (LRU), refusals included,
so a client that repeats a slow schema does not occupy the workers again;
concurrent requests for one spec share one compile.

    request -> cache hit? -> Guide
            -> in flight? -> await that compile
            -> idle worker (await one) -> compile in the worker process
               -> serialized CompiledGrammar -> deserialize here -> cache

Waiting for a worker or a compile is an await on the event loop: the engine
and the batch never wait for a grammar.
"""
from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import re
import time
import threading
from collections import OrderedDict
from typing import Callable

from loramux.server.engine.guided import JSON_KINDS, Guide, GuideSpec, choice_grammar, control_free_tokens
from loramux.server.errors import Busy, Failed, Invalid

log = logging.getLogger("loramux.guided")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CACHE_SIZE = 256
DEFAULT_WORKERS = 1
WORKER_START_TIMEOUT_S = 120.0  # a cold start imports torch and xgrammar
TIMEOUT_REFUSAL_TTL_S = 300.0  # how long a spec refused for time stays refused without another try
# xgrammar's messages start with a time stamp and a C++ source location
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def _compile(compiler, kind: str, value: str):
    """The xgrammar CompiledGrammar of one spec (in the worker)."""
    if kind == "json_schema":
        # compact JSON: a small model given free whitespace can loop on it
        return compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
    if kind == "json_object":  # OpenAI's json_object: a JSON object (the builtin JSON grammar takes any value)
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "choice":
        import json

        return compiler.compile_grammar(choice_grammar(json.loads(value)))
    if kind == "grammar":
        return compiler.compile_grammar(value)
    raise ValueError(f"unknown guide kind {kind!r}")


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids):
    """xgrammar's view of a transformers tokenizer: `vocab_size` is the
    model's (its logits' width), `stop_token_ids` the tokens that end a
    guided output."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))


def compile_here(tokenizer_info, spec: GuideSpec) -> Guide:
    """Compile in this process, without timeout or cache (the offline engine,
    tests); ValueError for a spec that does not compile."""
    import xgrammar as xgr

    try:
        compiled = _compile(xgr.GrammarCompiler(tokenizer_info, max_threads=1), spec.kind, spec.value)
    except RuntimeError as exc:
        raise ValueError(f"invalid {spec.kind}: {_message(exc)}") from None
    return Guide(spec, compiled, control_free_tokens(tokenizer_info) if spec.kind in JSON_KINDS else None)


def _message(exc: Exception) -> str:
    """xgrammar's error, without its time stamp and C++ source location."""
    text = str(exc).strip()
    return _XGR_PREFIX.sub("", text.splitlines()[0]) if text else type(exc).__name__


def _worker_main(conn, tokenizer_info_json: str) -> None:
    """The compile worker: (kind, value) in, ("ok", serialized) or ("invalid", message) out."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(tokenizer_info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", ""))  # the compile timeout starts after this, not during the imports
    while True:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", _compile(compiler, kind, value).serialize_json()))
        except Exception as exc:  # xgrammar's RuntimeError for a bad schema, regex or grammar
            conn.send(("invalid", _message(exc)))


class _Worker:
    """One compile process and its pipe; used by one compile at a time. The
    process starts at construction; wait_ready() waits for its imports."""

    def __init__(self, tokenizer_info_json: str):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs the engine thread
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, tokenizer_info_json),
                                   name="loramux-grammar", daemon=True)
        self.process.start()
        child.close()
        self._ready = False

    def wait_ready(self) -> None:
        if self._ready:
            return
        try:
            self._ready = self.conn.poll(WORKER_START_TIMEOUT_S) and self.conn.recv() == ("ready", "")
        except (EOFError, OSError):
            self._ready = False
        if not self._ready:
            self.close()
            raise RuntimeError("the grammar compile worker did not start")

    def roundtrip(self, kind: str, value: str, timeout_s: float) -> tuple[str, str] | None:
        """(status, payload), or None when the worker took longer than
        timeout_s (the worker is then killed) or died."""
        try:
            self.conn.send((kind, value))
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.close()
        return None

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class GrammarCompiler:
    """Guides for GuideSpecs, compiled once each, with a timeout.

    `tokenizer_info` makes the xgrammar.TokenizerInfo of the model's
    vocabulary (see for_tokenizer). It, xgrammar and the worker processes
    are set up on the first compile, so a server that never sees a grammar
    never pays for them; that first guided request waits a few seconds."""

    def __init__(self, tokenizer_info: Callable[[], object], timeout_s: float = DEFAULT_TIMEOUT_S,
                 cache_size: int = DEFAULT_CACHE_SIZE, workers: int = DEFAULT_WORKERS):
        if timeout_s <= 0 or cache_size < 1 or workers < 1:
            raise ValueError("the grammar timeout, cache size and worker count must be positive")
        self._make_info = tokenizer_info
        self.info = None  # the TokenizerInfo, once made
        self._info_json = ""
        self._json_tokens = None  # control_free_tokens(info), for JSON guides
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        # key -> (result, monotonic time it expires): refusals for time expire
        self._cache: OrderedDict[tuple[str, str], tuple[Guide | Invalid, float]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._num_workers = workers
        self._idle: asyncio.Queue | None = None  # made on first use, in the event loop
        self._workers: list[_Worker] = []
        self._setup_lock = threading.Lock()  # the tokenizer info, once; the worker list
        self._closed = False

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids, **options) -> "GrammarCompiler":
        """Over a transformers tokenizer; `vocab_size` is the model's (its
        logits' width), `stop_token_ids` the tokens that end a guided output."""
        return cls(lambda: tokenizer_info(tokenizer, vocab_size, stop_token_ids), **options)

    async def compile(self, spec: GuideSpec) -> Guide:
        """The spec's Guide; Invalid (naming spec.param) for a spec that does
        not compile or takes longer than the timeout, Busy when no worker
        frees up within the timeout."""
        key = spec.key
        cached = self._cached(key)
        if cached is None:
            pending = self._inflight.get(key)
            if pending is None:
                pending = self._inflight[key] = asyncio.ensure_future(self._compile_once(spec))
                pending.add_done_callback(lambda f: self._settled(key, f))
            cached = await asyncio.shield(pending)  # a client that leaves does not cancel the others' compile
        if isinstance(cached, Invalid):
            raise Invalid(cached.message, spec.param, cached.code)
        return Guide(spec, cached.compiled, cached.allowed)

    def _cached(self, key: tuple[str, str]) -> Guide | Invalid | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        result, expires = entry
        if time.monotonic() > expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return result

    def _settled(self, key: tuple[str, str], future: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" warning when every waiter left

    async def _compile_once(self, spec: GuideSpec) -> Guide | Invalid:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._num_workers):
                self._idle.put_nowait(None)  # None: a worker slot whose process starts on first use
        try:  # the wait for a worker is bounded too: slow specs ahead must not hold everyone
            worker = await asyncio.wait_for(self._idle.get(), self.timeout_s)
        except asyncio.TimeoutError:
            raise Busy("the grammar compiler is busy with other requests; retry later", spec.param,
                       "grammar_compiler_busy") from None
        try:
            worker, result = await asyncio.to_thread(self._run, worker, spec)
        except Exception:
            log.exception("compiling a %s failed", spec.kind)
            raise Failed("the grammar compiler failed", spec.param, "grammar_compiler_failed") from None
        finally:
            self._idle.put_nowait(worker)
        timed_out = isinstance(result, Invalid) and result.code == "grammar_too_complex"
        # a refusal for time may be the machine's load: the spec is tried again after a while
        self._cache[spec.key] = result, time.monotonic() + TIMEOUT_REFUSAL_TTL_S if timed_out else math.inf
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def _run(self, worker: _Worker | None, spec: GuideSpec) -> tuple[_Worker | None, Guide | Invalid]:
        """In a thread: compile `spec` in `worker` (started if need be); the
        worker to reuse next and the result."""
        if self.info is None:  # the first compile
            with self._setup_lock:
                if self.info is None:
                    info = self._make_info()
                    self._info_json = info.serialize_json()
                    self._json_tokens = control_free_tokens(info)
                    self.info = info
        if worker is None or not worker.alive:
            worker = self._start_worker()
        try:
            worker.wait_ready()
        except RuntimeError:
            self._forget(worker)
            raise
        answer = worker.roundtrip(spec.kind, spec.value, self.timeout_s)
        if answer is None:
            self._forget(worker)
            log.warning("a %s took longer than %.1fs to compile; refused", spec.kind, self.timeout_s)
            refusal = Invalid(f"the {spec.kind} took longer than {self.timeout_s:g}s to compile; simplify it",
                              spec.param, "grammar_too_complex")
            return self._start_worker(), refusal  # the successor imports while nobody waits for it
        status, payload = answer
        if status != "ok":
            return worker, Invalid(f"invalid {spec.kind}: {payload}", spec.param, "invalid_grammar")
        import xgrammar as xgr

        return worker, Guide(spec, xgr.CompiledGrammar.deserialize_json(payload, self.info),
                             self._json_tokens if spec.kind in JSON_KINDS else None)

    def _start_worker(self) -> _Worker:
        with self._setup_lock:
            if self._closed:
                raise RuntimeError("the grammar compiler is closed")
            worker = _Worker(self._info_json)
            self._workers.append(worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        worker.close()
        with self._setup_lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def close(self) -> None:
        """Stop the worker processes (at shutdown); none starts after this."""
        with self._setup_lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()
