"""The generation service that completions and chat share.

One HTTP request becomes `Generation`: its choices as engine requests (each
checked once, here, before anything reaches the engine), the lease on a
per-request mix if it asks for one, and a fan-out that runs the choices
concurrently. The routes differ only in how they format what comes out
(server/api/routes_openai.py).

Tokenizing and chat templates run in threads: nothing a request carries is
processed on the event loop beyond parsing its (capped) body.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from loramux.adapters_store import arithmetic
from loramux.adapters_store.peft_format import LoraAdapter
from loramux.adapters_store.registry import RegisteredAdapter
from loramux.server.api import tool_calls
from loramux.server.api.errors import event_for
from loramux.server.api.protocol import Usage
from loramux.server.api.state import ServerState
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.engine import CheckedRequest, RequestOutput
from loramux.server.engine.guided import Guide, GuideSpec
from loramux.server.engine.sampling import SamplingParams
from loramux.server.errors import Busy, ClientGone, Failed, Invalid, LoramuxError, NotFound
from loramux.server.metrics import MIX_LABEL, RequestTimer

log = logging.getLogger("loramux.api")

MAX_PROMPTS = 64  # prompts in one completions request


def build_sampling(body, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
    """The SamplingParams of choice `seed_offset` of a validated completions or
    chat body; Invalid for values that pass the schema but not the sampler."""
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
            prompt_logprobs=body.prompt_logprobs_wanted(),
        )
    except ValueError as exc:
        raise Invalid(str(exc)) from None


@dataclass
class Job:
    index: int  # choice index
    prompt_index: int
    checked: CheckedRequest

    @property
    def prompt_ids(self) -> list[int]:
        return self.checked.prompt_ids


class MixLease:
    """A reference on a per-request mix in the adapter pool; release() gives it
    back, once, however often it is called."""

    def __init__(self, engine: AsyncEngine, digest: str):
        self.engine, self.digest = engine, digest
        self._released = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True  # the engine applies a submitted release even if this await is cancelled
        await self.engine.call(lambda e: e.adapters.release(self.digest))


class Fanout:
    """Runs the jobs of one HTTP request concurrently; yields (job index,
    output). Cancelling it (or a task it runs) closes the engine generators,
    whose `finally` aborts the requests in the engine."""

    def __init__(self, state: ServerState, jobs: list[Job]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timers = [RequestTimer(state.metrics) for _ in jobs]
        self.open = set(range(len(jobs)))
        self.tasks = [asyncio.create_task(self._run(state.engine, i, j)) for i, j in enumerate(jobs)]

    async def _run(self, engine: AsyncEngine, i: int, job: Job) -> None:
        try:
            async for out in engine.generate(job.checked):
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
                raise _as_domain_error(item)
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


def _as_domain_error(exc: Exception) -> LoramuxError:
    if isinstance(exc, LoramuxError):  # queue full, a request the engine refused or failed alone
        return exc
    log.error("generation failed: %s", exc)
    return Failed("generation failed in the engine", code="engine_error")


@dataclass
class Generation:
    """The engine side of one HTTP request."""

    jobs: list[Job]
    fan: Fanout
    lease: MixLease | None

    async def release(self) -> None:
        self.fan.cancel()
        if self.lease is not None:
            await self.lease.release()

    def usage(self, finals: dict[int, RequestOutput]) -> Usage:
        prompt = sum(len(ids) for ids in {j.prompt_index: j.prompt_ids for j in self.jobs}.values())
        completion = sum(o.num_output_tokens for o in finals.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _ReleasingStream(StreamingResponse):
    """An SSE response that runs `release` when it ends, however it ends
    (also when the client left before the first byte and the body never ran)."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


def sse(obj) -> str:
    payload = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


def last_outputs(results: dict[int, list[RequestOutput]]) -> dict[int, RequestOutput]:
    """The final output (token counts, finish reason) of each choice."""
    return {i: outs[-1] for i, outs in results.items()}


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class GenerationService:
    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        core = state.engine.engine  # read-only use here: sizes, tokenizer, request checks
        self.core = core
        self.tokenizer = core.tokenizer
        self.context_len = core.context_len
        self.max_rank = core.config.max_lora_rank
        self.kv_tokens = core.allocator.num_blocks * core.allocator.block_size
        # A token covers at most this many characters, so a text longer than
        # context_len * max_chars can never fit: refuse it without tokenizing.
        # (x2: room for a normalizer that shortens text.)
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) if self.tokenizer is not None else 0
        self.max_chars = 2 * core.context_len * longest

    # -- the request, checked once ----------------------------------------------

    def resolve_model(self, name: str) -> RegisteredAdapter | None:
        """The adapter a request's `model` names, resolved once, here; None for the base model."""
        if name == self.state.settings.served_model_name:
            return None
        entry = self.state.adapters.get(name)
        if entry is None:
            raise NotFound(f"The model `{name}` does not exist.", "model", "model_not_found")
        return entry

    def check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise Invalid(f"the {param} is far longer than the model's context of {self.context_len} tokens",
                          param, "context_length_exceeded")

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        if len(prompts) > MAX_PROMPTS:
            raise Invalid(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        out = []
        for prompt in prompts:
            if isinstance(prompt, list):
                out.append(prompt)
                continue
            if self.tokenizer is None:
                raise Invalid("this model has no tokenizer: send token ids", "prompt")
            self.check_length(len(prompt), "prompt")
            out.append(list(await asyncio.to_thread(self.tokenizer.encode, prompt)))
        return out

    async def encode_chat(self, body, add_generation_prompt: bool = True, add_special_tokens: bool = False,
                          tools: list[dict] | None = None) -> list[int]:
        """The prompt of `body.messages` through the chat template, showing
        `tools` (OpenAI function tools) to the model when given (tool_calls.py)."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise Invalid("this model has no chat template; use /v1/completions", "messages")
        self.check_length(tool_calls.conversation_chars(body.messages, tools), "messages")
        try:
            return await asyncio.to_thread(tool_calls.render_chat_ids, tokenizer, body.messages, tools,
                                           add_generation_prompt, add_special_tokens)
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise Invalid(f"the chat template rejected the messages: {type(exc).__name__}", "messages") from None

    def plan(self, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
             adapter: RegisteredAdapter | None, guide: Guide | None = None) -> list[Job]:
        """The engine requests of one HTTP request, each checked; Busy before
        anything is built when the waiting queue cannot take them."""
        if body.adapters and adapter is not None:
            raise Invalid("with `adapters`, `model` must name the base model", "adapters")
        digest, label = (adapter.digest, adapter.name) if adapter is not None else (None, None)
        jobs = []
        for p, ids in enumerate(prompts):
            for k in range(body.n):
                limit = max_tokens if max_tokens is not None else \
                    max(1, min(self.context_len, self.kv_tokens) - len(ids))
                sampling = build_sampling(body, limit, logprobs, k)
                jobs.append(Job(len(jobs), p, self.core.check_request(ids, sampling, digest, label, guide)))
        if self.engine.num_waiting() + len(jobs) > self.core.config.max_waiting:
            raise Busy("the server is busy: too many requests waiting", code="queue_full")
        return jobs

    async def start(self, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                    adapter: RegisteredAdapter | None, guide: GuideSpec | None = None) -> Generation:
        """Compile the output constraint `guide` if there is one (awaited off
        the engine: the batch goes on meanwhile), plan, take the mix lease if
        the body asks for a mix (after the queue check, so a refused request
        builds nothing), and start every choice."""
        compiled = await self.compile_guide(guide) if guide is not None else None
        jobs = self.plan(body, prompts, max_tokens, logprobs, adapter, compiled)
        lease = await self.hold_mix(body)
        if lease is not None:  # the choices were checked on the base model; they run on the mix
            jobs = [replace(j, checked=replace(j.checked, adapter_digest=lease.digest, adapter_label=MIX_LABEL))
                    for j in jobs]
        return Generation(jobs, Fanout(self.state, jobs), lease)

    async def compile_guide(self, spec: GuideSpec) -> Guide:
        if self.state.guides is None:
            raise Invalid("structured outputs need the model's tokenizer; this model has none", spec.param)
        return await self.state.guides.compile(spec)

    # -- outputs ------------------------------------------------------------------

    async def collect(self, request: Request, gen: Generation) -> dict[int, list[RequestOutput]]:
        """All outputs of a non-streaming request (choice index -> its outputs);
        the engine requests are aborted if the client leaves. Releases `gen`."""
        results: dict[int, list[RequestOutput]] = {}

        async def collect():
            async for i, out in gen.fan:
                results.setdefault(i, []).append(out)

        work = asyncio.create_task(collect())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                raise ClientGone("client closed the request")
            work.result()
            return results
        finally:
            gone.cancel()
            work.cancel()
            await gen.release()

    def stream(self, gen: Generation, events) -> StreamingResponse:
        """The SSE envelope of completions and chat: the events, an error event if
        the engine fails mid-stream, then [DONE]. `gen` is released when the
        response ends, however it ends (_ReleasingStream)."""

        async def body():
            try:
                async for event in events:
                    yield event
            except LoramuxError as exc:
                yield sse(event_for(exc))
            yield "data: [DONE]\n\n"

        return _ReleasingStream(body(), gen.release)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    # -- per-request mixes ------------------------------------------------------

    def lookup_all(self, names: list[str], param: str, code: str = "adapter_not_found") -> list[RegisteredAdapter]:
        """The registry entries of `names`; NotFound for the first missing one,
        naming param.format(its index)."""
        return [self.state.adapters.lookup(n, param.format(i), code) for i, n in enumerate(names)]

    async def load_sources(self, entries: list[RegisteredAdapter]) -> list[LoraAdapter]:
        """The weights of registered adapters (read in a thread)."""
        return [await asyncio.to_thread(e.source.load) for e in entries]

    async def hold_mix(self, body) -> MixLease | None:
        """A lease on the request's mix of adapters (`adapters`), registered in
        the pool; None without `adapters`. Mixes are shared by content; a new
        one is built only after its bytes are booked in the mix budget (Busy
        when it is full)."""
        if not body.adapters:
            return None
        engine = self.engine
        weights = [a.weight for a in body.adapters]
        entries = self.lookup_all([a.name for a in body.adapters], "adapters.{}.name", "model_not_found")
        key = arithmetic.mix_digest([(e.digest, w) for e, w in zip(entries, weights)])
        if await engine.call(lambda e: e.adapters.hold_mix(key)):
            return MixLease(engine, key)
        booked = sum(e.source.nbytes for e in entries)  # a concat holds every source's A and B once
        if not await engine.call(lambda e: e.adapters.reserve_mix(booked)):
            raise Busy("the server holds as many per-request adapter mixes as it can; retry later", "adapters",
                       "mix_budget_full")
        try:
            loaded = await self.load_sources(entries)
            sources = [arithmetic.Source(a, w) for a, w in zip(loaded, weights)]
            try:
                mixed = await asyncio.to_thread(arithmetic.concat, arithmetic.MIX_NAME_PREFIX + key[:16], sources,
                                                key)
            except LoramuxError as exc:  # a source it cannot mix (DoRA), named as `adapters`
                exc.param = exc.param and exc.param.replace("sources", "adapters")
                exc.code = "invalid_mix"
                raise
            if mixed.rank > self.max_rank:
                raise Invalid(f"the mix has rank {mixed.rank} (the sum of its adapters' ranks), above this "
                              f"server's max_lora_rank {self.max_rank}", "adapters", "invalid_mix")
        except BaseException:
            await engine.call(lambda e: e.adapters.unreserve_mix(booked))
            raise
        await engine.call(lambda e: e.adapters.add_mix(mixed, booked))
        return MixLease(engine, key)
