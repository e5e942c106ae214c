"""HTTP routes: OpenAI completions and chat, models, adapters, health, metrics.

Routes only: requests become token ids and SamplingParams here and go to the
AsyncEngine; everything that touches the engine or its adapter pool runs in
the engine thread (`AsyncEngine.generate`, `AsyncEngine.call`).

Errors leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
with these statuses: 400 invalid parameters, 401 API key, 403 adapter path
outside the allowed roots, 404 unknown model/adapter, 409 duplicate adapter,
413 request body over --max-request-bytes (uploads: --max-upload-bytes),
422 adapter fails validation, 429 waiting queue or mix budget full,
503 draining or unhealthy, 500 the engine failed this request (that request
only) or anything unexpected (details only in the log).

Nothing a request carries is processed on the event loop beyond parsing a
body under the cap: tokenizing, chat templates, adapter validation and file
I/O run in threads, so /health answers whatever clients send.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from server import adapter_math
from server.adapter_files import AdapterFilesChanged, PinnedFile, tar_stream
from server.adapter_pool import AdapterSource, FolderLoader
from server.adapter_store import AdapterStore, check_name
from server.engine import AsyncEngine, RequestError, RequestFailed, RequestOutput
from server.metrics import Metrics, RequestTimer
from server.peft_format import CONFIG_NAME, MAX_CONFIG_BYTES, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME, AdapterError, \
    LoraAdapter, load_peft_adapter, parse_peft_adapter, peft_files
from server.protocol import (
    AdapterInfo, AdapterList, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
    ChatCompletionRequest, ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, LoadLoraAdapterRequest,
    MergeRequest, MergeResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, UnloadLoraAdapterRequest, Usage,
)
from server.sampling import SamplingParams
from server.scheduler import QueueFull

log = logging.getLogger("loramux.api")

OPEN_PATHS = ("/health", "/metrics")  # no API key, served while draining
MAX_PROMPTS = 64  # prompts in one completions request

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "internal_server_error", 503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    model_root: str  # the base model's folder, shown as `root` in /v1/models
    api_key: str | None = None
    allowed_adapter_roots: tuple[Path, ...] = ()
    max_upload_bytes: int = 512 * 2**20
    max_request_bytes: int = 16 * 2**20  # any other request body
    health_timeout_s: float = 60.0  # /health fails when the engine loop is silent this long


@dataclass
class ServerState:
    engine: AsyncEngine
    store: AdapterStore
    settings: ServerSettings
    metrics: Metrics
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)  # names requests may use
    draining: bool = False
    inflight: int = 0  # HTTP requests being served (streams included)
    created: int = field(default_factory=lambda: int(time.time()))
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def adapter_info(adapter: LoraAdapter, sha256: str, size: int, created: int, source: str) -> AdapterInfo:
    return AdapterInfo(name=adapter.name, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                       target_modules=list(adapter.target_modules), size_bytes=size, sha256=sha256,
                       created=created, source=source)


class Gate:
    """ASGI middleware: 503 while draining, 401 without the API key, 413 for a
    body over the cap (before anything parses it), and the in-flight count
    the drain waits for (streaming bodies included)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await error_response(503, "the server is shutting down", code="draining")(scope, receive, send)
        key = self.state.settings.api_key
        if key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                            code="invalid_api_key")(scope, receive, send)
        settings = self.state.settings
        upload = scope["path"] == "/v1/adapters"
        cap = settings.max_upload_bytes if upload else settings.max_request_bytes
        too_large = ApiError(413, f"the upload is larger than the limit of {cap} bytes", code="upload_too_large") \
            if upload else ApiError(413, f"the request body is larger than the limit of {cap} bytes "
                                         "(--max-request-bytes)", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > cap:
            return await error_response(413, too_large.message, code=too_large.code)(scope, receive, send)
        if upload:  # the upload route streams its body (to temporary files): stop it at the cap
            receive = _capped_receive(receive, cap, too_large)
        else:  # bodies parsed whole: read under the cap here, so no parser ever sees more
            body = await _read_body(receive, cap)
            if body is None:
                return await error_response(413, too_large.message, code=too_large.code)(scope, receive, send)
            receive = _replay(body, receive)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


async def _read_body(receive, cap: int) -> dict | None:
    """The request's body as one http.request message, or None past `cap` bytes."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return message
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def _replay(first: dict, receive):
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _capped_receive(receive, cap: int, too_large: ApiError):
    """`receive` that stops a streamed body at `cap` bytes with a 413."""
    total = 0

    async def capped():
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > cap:  # stop reading: the body is never held whole
                raise too_large
        return message

    return capped


# ---------------------------------------------------------------------------
# generation helpers
# ---------------------------------------------------------------------------

@dataclass
class _Job:
    index: int  # choice index
    prompt_index: int
    prompt_ids: list[int]
    sampling: SamplingParams


class _Fanout:
    """Runs the jobs of one HTTP request concurrently; yields (job index,
    output). Cancelling it (or a task it runs) closes the engine generators,
    whose `finally` aborts the requests in the engine."""

    def __init__(self, state: ServerState, jobs: list[_Job], adapter: str | None):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timers = [RequestTimer(state.metrics) for _ in jobs]
        self.open = set(range(len(jobs)))
        self.tasks = [asyncio.create_task(self._run(state.engine, i, j, adapter)) for i, j in enumerate(jobs)]

    async def _run(self, engine: AsyncEngine, i: int, job: _Job, adapter: str | None) -> None:
        try:
            async for out in engine.generate(job.prompt_ids, job.sampling, adapter):
                self.queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.queue.put_nowait((i, exc))

    async def __aiter__(self):
        while self.open:
            i, item = await self.queue.get()
            if isinstance(item, Exception):
                self.open.discard(i)
                self.timers[i].finish("abort")
                raise _engine_error(item)
            if item.token_ids:
                self.timers[i].token()
            if item.finished:
                self.open.discard(i)
                self.timers[i].finish(item.finish_reason)
            yield i, item

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        for i in self.open:
            self.timers[i].finish("abort")
        self.open.clear()


class _ReleasingStream(StreamingResponse):
    """An SSE response that runs `release` when it ends, however it ends."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


def _engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, QueueFull):
        return ApiError(429, "the server is busy: too many requests waiting", code="queue_full")
    if isinstance(exc, RequestError):
        return _request_error(exc)
    if isinstance(exc, RequestFailed):  # this request alone; the others go on
        return ApiError(500, f"generation failed for this request: {exc}", code="request_failed")
    log.error("generation failed: %s", exc)
    return ApiError(500, "generation failed in the engine", code="engine_error")


def _request_error(exc: RequestError) -> ApiError:
    status = 404 if exc.code == "model_not_found" else 400
    return ApiError(status, str(exc), exc.param, exc.code)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, fan: _Fanout) -> dict[int, list[RequestOutput]]:
    """All outputs of a non-streaming request; aborts the engine requests if the client leaves."""
    results: dict[int, list[RequestOutput]] = {}

    async def collect():
        async for i, out in fan:
            results.setdefault(i, []).append(out)

    work = asyncio.create_task(collect())
    gone = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            raise ApiError(499, "client closed the request")
        work.result()
        return results
    finally:
        gone.cancel()
        work.cancel()
        fan.cancel()


def _adapter_files(source: AdapterSource) -> list[tuple[str, object]]:
    """The adapter's PEFT files as validated: open files of its folder, or
    bytes for one held in memory (its files were deleted while requests used
    it). AdapterFilesChanged if a folder's file is not the one registered."""
    if isinstance(source.load, FolderLoader):
        return source.load.open_files()
    config_bytes, weights_bytes = peft_files(source.load())
    return [(CONFIG_NAME, config_bytes), (WEIGHTS_NAME, weights_bytes)]


def last_outputs(results: dict[int, list[RequestOutput]]) -> dict[int, RequestOutput]:
    """The final output (token counts, finish reason) of each choice."""
    return {i: outs[-1] for i, outs in results.items()}


def _sse(obj) -> str:
    payload = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


def build_sampling(body, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
    """The SamplingParams of choice `seed_offset` of a validated completions or
    chat body; ApiError 400 for values that pass the schema but not the sampler."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=None if body.seed is None else body.seed + seed_offset,
            stop=body.stop_strings(),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


# ---------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------

def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="loramux", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.loramux = state
    app.add_middleware(Gate, state=state)
    engine = state.engine
    core = engine.engine  # read-only use here: model config, tokenizer, sizes
    tokenizer = core.tokenizer
    model_cfg = core.model.cfg
    max_rank = core.config.max_lora_rank
    kv_tokens = core.allocator.num_blocks * core.allocator.block_size
    state.engine.on_step = state.metrics.on_step

    # -- errors ---------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {msg}" if param else msg, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")

    # -- helpers --------------------------------------------------------------

    def resolve_model(name: str) -> str | None:
        if name == state.settings.served_model_name:
            return None
        if name in state.adapters:
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    # A token covers at most this many characters, so a text longer than
    # context_len * max_chars can never fit: refuse it without tokenizing.
    # (x2: room for a normalizer that shortens text.)
    max_chars = 2 * core.context_len * max((len(t) for t in tokenizer.get_vocab()), default=1) \
        if tokenizer is not None else 0

    def check_length(chars: int, param: str) -> None:
        if chars > max_chars:
            raise ApiError(400, f"the {param} is far longer than the model's context of {core.context_len} "
                                "tokens", param, "context_length_exceeded")

    async def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
        check_length(len(prompt), "prompt")
        return list(await asyncio.to_thread(tokenizer.encode, prompt))

    def sampling_params(body, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                        seed_offset: int) -> SamplingParams:
        if max_tokens is None:
            max_tokens = max(1, min(core.context_len, kv_tokens) - prompt_len)
        return build_sampling(body, max_tokens, logprobs, seed_offset)

    def plan(body, prompts: list[list[int]], max_tokens, logprobs, adapter) -> list[_Job]:
        """The engine requests of one HTTP request, each checked; 429 before
        anything is built when the waiting queue cannot take them."""
        jobs = []
        for p, ids in enumerate(prompts):
            for k in range(body.n):
                sampling = sampling_params(body, max_tokens, len(ids), logprobs, k)
                try:
                    core.check_request(ids, sampling, adapter)
                except RequestError as exc:
                    raise _request_error(exc) from None
                jobs.append(_Job(len(jobs), p, ids, sampling))
        if engine.num_waiting() + len(jobs) > core.config.max_waiting:
            raise ApiError(429, "the server is busy: too many requests waiting", code="queue_full")
        return jobs

    # -- adapter arithmetic: per-request mixes ---------------------------------

    async def load_sources(names: list[str], param: str) -> list[LoraAdapter]:
        """The weights of registered adapters (read off the engine thread)."""
        for i, n in enumerate(names):
            if n not in state.adapters:
                raise ApiError(404, f"adapter `{n}` does not exist", f"{param}.{i}", "adapter_not_found")
        sources = await engine.call(lambda e: [e.adapters.source(n) for n in names])
        for i, (n, s) in enumerate(zip(names, sources)):
            if s is None:  # deleted meanwhile
                raise ApiError(404, f"adapter `{n}` does not exist", f"{param}.{i}", "adapter_not_found")
        return [await asyncio.to_thread(s.load) for s in sources]

    def check_mix_request(body, adapter: str | None) -> None:
        if body.adapters and adapter is not None:
            raise ApiError(400, "with `adapters`, `model` must name the base model", "adapters")

    async def hold_mix(body) -> tuple[str, str] | None:
        """(name, digest) of the request's mix of adapters (`adapters`), registered
        in the pool and referenced until release_mix; None without `adapters`.
        Mixes are shared by content; a new one is built only after its bytes
        are booked in the mix budget (429 when it is full)."""
        if not body.adapters:
            return None
        names = [a.name for a in body.adapters]
        weights = [a.weight for a in body.adapters]
        for i, n in enumerate(names):
            if n not in state.adapters:
                raise ApiError(404, f"adapter `{n}` does not exist", f"adapters.{i}.name", "model_not_found")
        digests = await engine.call(lambda e: [e.adapters.resolve(n) for n in names])
        if all(d is not None for d in digests):
            key = adapter_math.mix_digest(list(zip(digests, weights)))
            name = await engine.call(lambda e: e.adapters.hold_mix(key))
            if name is not None:
                return name, key
        sources_meta = await engine.call(lambda e: [e.adapters.source(n) for n in names])
        if any(m is None for m in sources_meta):
            i = next(i for i, m in enumerate(sources_meta) if m is None)
            raise ApiError(404, f"adapter `{names[i]}` does not exist", f"adapters.{i}.name", "model_not_found")
        booked = sum(m.nbytes for m in sources_meta)  # a concat holds every source's A and B once
        if not await engine.call(lambda e: e.adapters.reserve_mix(booked)):
            raise ApiError(429, "the server holds as many per-request adapter mixes as it can; retry later",
                           "adapters", "mix_budget_full")
        try:
            loaded = await load_sources(names, "adapters")
            sources = [adapter_math.Source(a, w) for a, w in zip(loaded, weights)]
            key = adapter_math.mix_digest([(a.digest, w) for a, w in zip(loaded, weights)])
            try:
                mixed = await asyncio.to_thread(adapter_math.concat, adapter_math.MIX_NAME_PREFIX + key[:16],
                                                sources, key)
            except adapter_math.MergeError as exc:
                raise ApiError(exc.status, str(exc), exc.param and exc.param.replace("sources", "adapters"),
                               "invalid_mix") from None
            if mixed.rank > max_rank:
                raise ApiError(400, f"the mix has rank {mixed.rank} (the sum of its adapters' ranks), above "
                                    f"this server's max_lora_rank {max_rank}", "adapters", "invalid_mix")
        except BaseException:
            await engine.call(lambda e: e.adapters.unreserve_mix(booked))
            raise
        try:
            name = await engine.call(lambda e: e.adapters.add_mix(mixed, booked))
        except (KeyError, ValueError) as exc:
            raise ApiError(400, str(exc).strip("'\""), "adapters", "invalid_mix") from None
        return name, key

    def sse_response(events, fan: _Fanout, mix) -> StreamingResponse:
        """The SSE envelope of completions and chat: the events, an error event if
        the engine fails mid-stream, then [DONE]. The fan-out and any per-request
        mix are released however the response ends, once: also when the client
        leaves before the first byte, when the event generator never starts."""
        released = False

        async def release():
            nonlocal released
            if not released:
                released = True
                fan.cancel()
                await release_mix(mix)

        async def stream():
            try:
                async for event in events:
                    yield event
            except ApiError as exc:
                yield _sse(ErrorResponse(error=ErrorInfo(message=exc.message, type=_ERROR_TYPES.get(
                    exc.status, "error"), param=exc.param, code=exc.code)))
            finally:
                await release()
            yield "data: [DONE]\n\n"

        return _ReleasingStream(stream(), release)

    async def release_mix(mix: tuple[str, str] | None) -> None:
        if mix is not None:
            await engine.call(lambda e: e.adapters.release(mix[1]))

    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    def usage(jobs: list[_Job], finals: dict[int, RequestOutput]) -> Usage:
        prompt = sum(len(ids) for ids in {j.prompt_index: j.prompt_ids for j in jobs}.values())
        completion = sum(o.num_output_tokens for o in finals.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -- completions ----------------------------------------------------------

    def completion_logprobs(outs: list[RequestOutput], offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for o in outs:
            for token, logprob, top in o.logprobs:
                text = token_text(token)
                lp.tokens.append(text)
                lp.token_logprobs.append(logprob)
                lp.top_logprobs.append({token_text(t): v for t, v in top})
                lp.text_offset.append(offset)
                offset += len(text)
        return lp

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def completions(body: CompletionRequest, request: Request):
        adapter = resolve_model(body.model)
        check_mix_request(body, adapter)
        prompts = body.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
        ids = [await encode(p) for p in prompts]
        jobs = plan(body, ids, body.max_tokens, body.logprobs, adapter)
        mix = await hold_mix(body)
        streaming = False
        try:
            if mix is not None:
                adapter = mix[0]
            rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            fan = _Fanout(state, jobs, adapter)
            streaming = body.stream
            return await completion_response(body, request, jobs, rid, created, fan, mix)
        finally:
            if not streaming:
                await release_mix(mix)

    async def completion_response(body, request, jobs, rid, created, fan, mix):
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                finals: dict[int, RequestOutput] = {}
                offsets = [0] * len(jobs)
                async for i, out in fan:
                    if not out.text and not out.finished and body.logprobs is None:
                        continue
                    lp = completion_logprobs([out], offsets[i]) if body.logprobs is not None else None
                    offsets[i] += len(out.text)
                    if out.finished:
                        finals[i] = out
                    yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[
                        CompletionChoice(index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason)]))
                if include_usage:
                    yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[],
                                                  usage=usage(jobs, finals)))

            return sse_response(events(), fan, mix)

        results = await _collect(request, fan)  # choice index -> its outputs
        choices = [CompletionChoice(
            index=i, text="".join(o.text for o in outs), finish_reason=outs[-1].finish_reason,
            logprobs=completion_logprobs(outs, 0) if body.logprobs is not None else None)
            for i, outs in sorted(results.items())]
        return CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                  usage=usage(jobs, last_outputs(results)))

    # -- chat -----------------------------------------------------------------

    async def encode_chat(body: ChatCompletionRequest) -> list[int]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                          tokenize=True)
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise ApiError(400, f"the chat template rejected the messages: {type(exc).__name__}",
                           "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def chat_logprobs(outs: list[RequestOutput]) -> ChoiceLogprobs:
        content = []
        for o in outs:
            for token, logprob, top in o.logprobs:
                text = token_text(token)
                content.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=[
                    TopLogprob(token=token_text(t), logprob=v, bytes=list(token_text(t).encode()))
                    for t, v in top]))
        return ChoiceLogprobs(content=content)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = resolve_model(body.model)
        check_mix_request(body, adapter)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = await encode_chat(body)
        jobs = plan(body, [ids], body.token_limit(), logprobs, adapter)
        mix = await hold_mix(body)
        streaming = False
        try:
            if mix is not None:
                adapter = mix[0]
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            fan = _Fanout(state, jobs, adapter)
            streaming = body.stream
            return await chat_response(body, request, jobs, rid, created, fan, mix, logprobs)
        finally:
            if not streaming:
                await release_mix(mix)

    async def chat_response(body, request, jobs, rid, created, fan, mix, logprobs):
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices, usage_=None):
                return _sse(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices,
                                                usage=usage_))

            async def events():
                finals: dict[int, RequestOutput] = {}
                for job in jobs:
                    yield chunk([ChatChunkChoice(index=job.index, delta=DeltaMessage(role="assistant", content=""))])
                async for i, out in fan:
                    if not out.text and not out.finished and logprobs is None:
                        continue
                    if out.finished:
                        finals[i] = out
                    yield chunk([ChatChunkChoice(
                        index=i, delta=DeltaMessage(content=out.text or None),
                        logprobs=chat_logprobs([out]) if logprobs is not None else None,
                        finish_reason=out.finish_reason)])
                if include_usage:
                    yield chunk([], usage(jobs, finals))

            return sse_response(events(), fan, mix)

        results = await _collect(request, fan)  # choice index -> its outputs
        choices = [ChatChoice(
            index=i, message=AssistantMessage(content="".join(o.text for o in outs)),
            finish_reason=outs[-1].finish_reason,
            logprobs=chat_logprobs(outs) if logprobs is not None else None)
            for i, outs in sorted(results.items())]
        return ChatCompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                      usage=usage(jobs, last_outputs(results)))

    # -- models ---------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        base = state.settings.served_model_name
        cards = [ModelCard(id=base, created=state.created, root=state.settings.model_root,
                           max_model_len=core.context_len)]
        cards += [ModelCard(id=name, created=info.created, root=name, parent=base, max_model_len=core.context_len)
                  for name, info in sorted(state.adapters.items())]
        return ModelList(data=cards)

    # -- adapters -------------------------------------------------------------

    def check_fits(adapter: LoraAdapter) -> None:
        """422 now for an adapter the device pool could never hold, not at serve time."""
        try:
            core.adapters.check_fits(adapter.rank)  # reads only the pool's fixed sizes
        except ValueError as exc:
            raise ApiError(422, str(exc), "adapter_model.safetensors", "adapter_too_large") from None

    async def register(adapter: AdapterSource, info: AdapterInfo) -> None:
        """Register the adapter's metadata; its weights stay on disk until a request needs them."""

        def add(e):
            e.adapters.register(adapter)
            state.metrics.track_adapter(adapter.name)

        try:
            await engine.call(add)
        except KeyError:
            raise ApiError(409, f"adapter `{adapter.name}` already exists", "name", "adapter_exists") from None
        except ValueError as exc:  # rank above the pool's limits
            raise ApiError(422, str(exc), "adapter_model.safetensors", "invalid_adapter") from None
        state.adapters[adapter.name] = info

    async def unregister(name: str) -> AdapterInfo:
        info = state.adapters.pop(name, None)  # new requests get 404 from here on
        if info is None:
            raise ApiError(404, f"adapter `{name}` does not exist", "name", "adapter_not_found")
        # in-flight requests keep their weights: the pool reads them into memory before the files go

        def remove(e):
            e.adapters.unregister(name)
            state.metrics.forget_adapter(name)

        await engine.call(remove)
        if info.source == "upload":
            await asyncio.to_thread(state.store.delete, name)
        return info

    def check_new_name(name: str) -> None:
        try:
            check_name(name)
        except AdapterError as exc:
            raise ApiError(422, str(exc), "name", "invalid_adapter_name") from None
        if name in state.adapters or name == state.settings.served_model_name or state.store.exists(name):
            raise ApiError(409, f"adapter `{name}` already exists", "name", "adapter_exists")

    @contextlib.asynccontextmanager
    async def read_upload(request: Request):
        """(name, config file, weights file) of a multipart upload. The Gate caps
        the body at --max-upload-bytes; files spool to temporary files (held
        in memory only up to 1 MiB each) and are gone when the block ends."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "send multipart/form-data with `name`, adapter_config.json and "
                                "adapter_model.safetensors")
        try:
            form = await MultiPartParser(request.headers, request.stream(), max_files=4, max_fields=4,
                                         max_part_size=4096).parse()
        except MultiPartException as exc:
            raise ApiError(400, f"malformed multipart body: {exc}") from None
        try:
            name = form.get("name")
            parts: dict[str, UploadFile] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    parts[key] = value
                    parts.setdefault(value.filename or "", value)
            if not isinstance(name, str):
                raise ApiError(400, "the form field `name` is missing", "name")
            if WEIGHTS_NAME not in parts and any(p in parts for p in PICKLE_WEIGHTS_NAMES):
                raise ApiError(422, f"{WEIGHTS_NAME}: pickled weights are never loaded; upload safetensors",
                               WEIGHTS_NAME, "invalid_adapter")
            for needed in (CONFIG_NAME, WEIGHTS_NAME):
                if needed not in parts:
                    raise ApiError(400, f"the file `{needed}` is missing", needed)
            yield name, parts[CONFIG_NAME], parts[WEIGHTS_NAME]
        finally:
            await form.close()

    async def read_part(part: UploadFile, limit: int | None = None) -> bytes:
        await part.seek(0)
        data = await part.read(-1 if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise ApiError(422, f"{part.filename}: larger than the limit of {limit} bytes", CONFIG_NAME,
                           "invalid_adapter")
        return data

    @app.post("/v1/adapters", status_code=201, response_model=AdapterInfo,
              responses={k: {"model": ErrorResponse} for k in (400, 409, 413, 422)})
    async def upload_adapter(request: Request):
        async with read_upload(request) as (name, config_part, weights_part), state.adapter_lock:
            # under the lock, so that one upload's bytes at a time are in memory
            check_new_name(name)
            config_bytes = await read_part(config_part, MAX_CONFIG_BYTES)
            weights_bytes = await read_part(weights_part)
            try:
                adapter = await asyncio.to_thread(parse_peft_adapter, config_bytes, weights_bytes, model_cfg,
                                                  max_rank, name)
            except AdapterError as exc:
                raise ApiError(422, str(exc), exc.field, "invalid_adapter") from None
            check_fits(adapter)
            meta = await asyncio.to_thread(state.store.save, name, config_bytes, weights_bytes)
            info = adapter_info(adapter, meta.sha256, meta.size, meta.created, "upload")
            try:
                source = AdapterSource.from_folder(state.store.path(name), adapter, model_cfg, max_rank)
                await register(source, info)
            except ApiError:
                await asyncio.to_thread(state.store.delete, name)
                raise
        return JSONResponse(info.model_dump(), status_code=201)

    @app.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters():
        return AdapterList(data=[state.adapters[n] for n in sorted(state.adapters)])

    @app.get("/v1/adapters/{name}", response_model=AdapterInfo)
    async def get_adapter(name: str):
        info = state.adapters.get(name)
        if info is None:
            raise ApiError(404, f"adapter `{name}` does not exist", "name", "adapter_not_found")
        return info

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        async with state.adapter_lock:
            await unregister(name)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/adapters/merge", status_code=201, response_model=MergeResponse,
              responses={k: {"model": ErrorResponse} for k in (400, 404, 409, 422)})
    async def merge_adapters(body: MergeRequest):
        """Store Σ weight_i · ΔW_i of registered adapters as a new adapter (server/adapter_math.py)."""
        if body.rank is not None and body.rank > max_rank:
            raise ApiError(400, f"rank {body.rank} is above this server's max_lora_rank {max_rank}", "rank",
                           "invalid_value")
        async with state.adapter_lock:
            check_new_name(body.name)
            loaded = await load_sources([s.adapter for s in body.sources], "sources")
            sources = [adapter_math.Source(a, s.weight) for a, s in zip(loaded, body.sources)]
            errors = None
            try:
                if body.method == "concat":
                    merged = await asyncio.to_thread(adapter_math.concat, body.name, sources)
                else:
                    merged, errors = await asyncio.to_thread(adapter_math.svd, body.name, sources, body.rank)
            except adapter_math.MergeError as exc:
                raise ApiError(exc.status, str(exc), exc.param, "invalid_merge") from None
            if merged.rank > max_rank:
                raise ApiError(400, f"the merged adapter has rank {merged.rank} (concat: the sum of the sources' "
                                    f"ranks), above this server's max_lora_rank {max_rank}; use method svd",
                               "rank", "invalid_value")
            adapter, config_bytes, weights_bytes = await asyncio.to_thread(
                adapter_math.as_peft, merged, model_cfg, max_rank)
            check_fits(adapter)
            meta = await asyncio.to_thread(state.store.save, body.name, config_bytes, weights_bytes)
            info = adapter_info(adapter, meta.sha256, meta.size, meta.created, "upload")
            try:
                source = AdapterSource.from_folder(state.store.path(body.name), adapter, model_cfg, max_rank)
                await register(source, info)
            except ApiError:
                await asyncio.to_thread(state.store.delete, body.name)
                raise
        response = MergeResponse(**info.model_dump(), method=body.method, sources=body.sources, errors=errors)
        return JSONResponse(response.model_dump(), status_code=201)

    @app.get("/v1/adapters/{name}/download")
    async def download_adapter(name: str):
        """The adapter's PEFT files (adapter_config.json, adapter_model.safetensors) as a
        tar, streamed from the files that were validated; 409 if they changed since."""
        if name not in state.adapters:
            raise ApiError(404, f"adapter `{name}` does not exist", "name", "adapter_not_found")
        source = await engine.call(lambda e: e.adapters.source(name))
        if source is None:
            raise ApiError(404, f"adapter `{name}` does not exist", "name", "adapter_not_found")
        try:
            files = await asyncio.to_thread(_adapter_files, source)
        except AdapterFilesChanged as exc:
            raise ApiError(409, f"adapter `{name}`: its files changed on disk since it was registered ({exc}); "
                                "unload and load it again", "name", "adapter_changed") from None
        return StreamingResponse(tar_stream(name, files), media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        if "\0" in body.lora_path:
            raise ApiError(400, "lora_path must not contain a NUL byte", "lora_path", "invalid_value")
        async with state.adapter_lock:
            check_new_name(body.lora_name)
            path = Path(body.lora_path).resolve()
            roots = [r.resolve() for r in state.settings.allowed_adapter_roots]
            if not any(path.is_relative_to(r) for r in roots):
                raise ApiError(403, "lora_path is not under an allowed adapter root (--allowed-adapter-root)",
                               "lora_path", "path_not_allowed")
            try:  # symlinks are resolved once, here; the real files must stay under the roots too
                (pinned_config, config_bytes), (pinned_weights, weights) = await asyncio.to_thread(
                    lambda: (PinnedFile.read(path / CONFIG_NAME), PinnedFile.read(path / WEIGHTS_NAME)))
            except OSError:
                try:  # the reason, named as for any folder (e.g. only a pickled adapter_model.bin)
                    await asyncio.to_thread(load_peft_adapter, path, model_cfg, max_rank, body.lora_name)
                except AdapterError as exc:
                    raise ApiError(422, str(exc), exc.field, "invalid_adapter") from None
                raise ApiError(422, f"lora_path: {CONFIG_NAME} and {WEIGHTS_NAME} could not be read as regular "
                                    "files", "lora_path", "invalid_adapter") from None
            if not all(any(f.path.is_relative_to(r) for r in roots) for f in (pinned_config, pinned_weights)):
                raise ApiError(403, "lora_path's files lead outside the allowed adapter roots", "lora_path",
                               "path_not_allowed")
            try:
                adapter = await asyncio.to_thread(parse_peft_adapter, config_bytes, weights, model_cfg, max_rank,
                                                  body.lora_name)
            except AdapterError as exc:
                raise ApiError(422, str(exc), exc.field, "invalid_adapter") from None
            check_fits(adapter)
            info = adapter_info(adapter, hashlib.sha256(weights).hexdigest(), len(weights), int(time.time()),
                                "path")
            source = AdapterSource.from_folder(path, adapter, model_cfg, max_rank,
                                               {CONFIG_NAME: pinned_config, WEIGHTS_NAME: pinned_weights})
            await register(source, info)
        return info

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        async with state.adapter_lock:
            await unregister(body.lora_name)
        return {"id": body.lora_name, "object": "adapter", "deleted": True}

    # -- operations -----------------------------------------------------------

    @app.get("/health")
    async def health():
        if state.draining:
            return error_response(503, "the server is shutting down", code="draining")
        silent = time.monotonic() - engine.last_progress
        if silent > state.settings.health_timeout_s:
            return error_response(503, f"the engine loop has made no progress for {silent:.0f} s",
                                  code="engine_stalled")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
