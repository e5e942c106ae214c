"""OpenAI's routes: /v1/completions, /v1/chat/completions (JSON or SSE) and
/v1/models. Both generation routes run through GenerationService and differ
only in how they format its outputs."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from loramux.server.api.generation import Generation, GenerationService, last_outputs, sse
from loramux.server.api.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, ErrorResponse, ModelCard, ModelList, PromptLogprobs, RankedLogprob,
    TokenLogprob, TopLogprob,
)
from loramux.server.api.state import ServerState
from loramux.server.api.structured import guide_for
from loramux.server.api.tool_calls import ToolPlan, parse_reply
from loramux.server.engine.engine import RequestOutput
from loramux.server.errors import Invalid
from loramux.server.model.runner import PromptLogprob

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


# JSON has no -inf: a token the model rules out reports this (vLLM, OpenAI)
MIN_LOGPROB = -9999.0


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(gen: GenerationService, outs: list[RequestOutput], offset: int, num_top: int,
                        prompt: tuple[list[int], list[PromptLogprob | None]] | None = None) -> CompletionLogprobs:
    """The legacy `logprobs` of the tokens of `outs`, preceded (echo) by the
    prompt's: (its ids, the engine's prompt logprobs), whose first token has
    none (null). Each top_logprobs holds the token itself first, then the most
    likely ones, num_top + 1 at most (OpenAI's and vLLM's convention); offsets
    count the token strings from `offset`."""
    lp = CompletionLogprobs()

    def add(token: int, logprob: float | None, top: tuple[tuple[int, float], ...]) -> None:
        nonlocal offset
        text = gen.token_text(token)
        lp.tokens.append(text)
        lp.text_offset.append(offset)
        offset += len(text)
        if logprob is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            return
        ranked = {token: logprob}  # by id, the token first (a top entry equal to it merges in place)
        ranked.update(top)
        lp.token_logprobs.append(_clamp(logprob))
        lp.top_logprobs.append({gen.token_text(t): _clamp(v) for t, v in list(ranked.items())[:num_top + 1]})

    if prompt is not None:
        for token, entry in zip(*prompt):
            add(token, None, ()) if entry is None else add(token, entry.logprob, entry.top)
    for o in outs:
        for token, logprob, top in o.logprobs:
            add(token, logprob, top)
    return lp


def prompt_logprobs_json(gen: GenerationService, prompt_ids: list[int],
                         entries: list[PromptLogprob | None] | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or
    {str(id): {logprob, rank, decoded_token}}, the prompt token first, then
    the top k ranked 1..k."""
    if entries is None:
        return None
    out: PromptLogprobs = []
    for token, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = {str(token): RankedLogprob(logprob=_clamp(entry.logprob), rank=entry.rank,
                                            decoded_token=gen.token_text(token))}
        for rank, (t, v) in enumerate(entry.top, 1):
            ranked[str(t)] = RankedLogprob(logprob=_clamp(v), rank=rank, decoded_token=gen.token_text(t))
        out.append(ranked)
    return out


def echo_texts(gen: GenerationService, prompts: list[str | list[int]], ids: list[list[int]]) -> list[str]:
    """What echo prepends: a text prompt as sent, token ids decoded (vLLM);
    called in a thread."""
    if gen.tokenizer is None:
        raise Invalid("this model has no tokenizer to echo the prompt with", "echo")
    return [p if isinstance(p, str) else gen.tokenizer.decode(i) for p, i in zip(prompts, ids)]


def chat_logprobs(gen: GenerationService, outs: list[RequestOutput]) -> ChoiceLogprobs:
    content = []
    for o in outs:
        for token, logprob, top in o.logprobs:
            text = gen.token_text(token)
            content.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=[
                TopLogprob(token=gen.token_text(t), logprob=v, bytes=list(gen.token_text(t).encode()))
                for t, v in top]))
    return ChoiceLogprobs(content=content)


async def _respond(service: GenerationService, request: Request, body, gen: Generation, stream, collect):
    """Hand the generation to `stream` (which then owns its release), or
    collect it and format with `collect`: in a thread when that formats
    prompt logprobs (thousands of token strings to decode, not on the loop)."""
    if body.stream:
        return service.stream(gen, stream(gen))
    results = await service.collect(request, gen)
    if body.prompt_logprobs_wanted() is not None:
        return await asyncio.to_thread(collect, gen, results)
    return collect(gen, results)


def openai_router(state: ServerState, service: GenerationService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        adapter = service.resolve_model(body.model)
        prompts = body.prompts()
        ids = await service.encode(prompts)
        echoes = await asyncio.to_thread(echo_texts, service, prompts, ids) if body.echo else None
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        want_lp = body.logprobs is not None
        only_prompt = body.echo and body.max_tokens == 0  # the one token the engine generates is not shown

        def choice(gen: Generation, i: int, outs: list[RequestOutput], offset: int, head: bool,
                   finish_reason: str | None) -> CompletionChoice:
            """Choice i of the outputs `outs`; `head`: its first (echo, prompt logprobs)."""
            job, first = gen.jobs[i], outs[0]
            shown = [] if only_prompt else outs
            text = "".join(o.text for o in shown)
            echo = (job.prompt_ids, first.prompt_logprobs) if head and body.echo else None
            return CompletionChoice(
                index=i, text=(echoes[job.prompt_index] if echo else "") + text, finish_reason=finish_reason,
                logprobs=completion_logprobs(service, shown, offset, body.logprobs, echo) if want_lp else None,
                prompt_logprobs=prompt_logprobs_json(service, job.prompt_ids, first.prompt_logprobs)
                if head and not body.stream else None)

        async def stream(gen: Generation):
            finals: dict[int, RequestOutput] = {}
            offsets = [0] * len(gen.jobs)
            started = [False] * len(gen.jobs)
            async for i, out in gen.fan:
                head = not started[i]
                started[i] = True
                if not (head and body.echo) and not out.text and not out.finished and not want_lp:
                    continue
                if out.finished:
                    finals[i] = out
                args = (gen, i, [out], offsets[i], head, out.finish_reason)
                c = await asyncio.to_thread(choice, *args) if head and body.echo else choice(*args)
                if c.logprobs is not None and c.logprobs.tokens:  # by the tokens reported (text may lag them)
                    offsets[i] = c.logprobs.text_offset[-1] + len(c.logprobs.tokens[-1])
                yield sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[c]))
            if body.stream_options and body.stream_options.include_usage:
                yield sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[],
                                             usage=gen.usage(finals)))

        def collect(gen: Generation, results: dict[int, list[RequestOutput]]) -> CompletionResponse:
            choices = [choice(gen, i, outs, 0, True, outs[-1].finish_reason) for i, outs in sorted(results.items())]
            return CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                      usage=gen.usage(last_outputs(results)))

        gen = await service.start(body, ids, body.engine_max_tokens(), body.logprobs, adapter, guide_for(body))
        return await _respond(service, request, body, gen, stream, collect)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = service.resolve_model(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tools = ToolPlan.of(body)
        ids = await service.encode_chat(body, tools=tools.template_tools())
        guide = tools.guide() or guide_for(body)  # a forced tool call overrides response_format (vLLM)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage=None):
            return sse(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices, usage=usage))

        async def stream(gen: Generation):
            finals: dict[int, RequestOutput] = {}
            parsers = {job.index: tools.parser() for job in gen.jobs}  # each choice has its own state
            for job in gen.jobs:
                yield chunk([ChatChunkChoice(index=job.index, delta=DeltaMessage(role="assistant", content=""))])
            async for i, out in gen.fan:
                deltas = parsers[i].feed(out.text)
                if out.finished:
                    finals[i] = out
                    deltas += parsers[i].finish()
                if not deltas and not out.finished and logprobs is None:
                    continue
                # the step's logprobs and finish reason ride on its last delta
                deltas = deltas or [DeltaMessage()]
                last = ChatChunkChoice(
                    index=i, delta=deltas[-1], logprobs=chat_logprobs(service, [out]) if logprobs is not None else None,
                    finish_reason=tools.finish_reason(out.finish_reason, parsers[i].called))
                for d in deltas[:-1]:
                    yield chunk([ChatChunkChoice(index=i, delta=d)])
                yield chunk([last])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], gen.usage(finals))

        def choice(i: int, outs: list[RequestOutput]) -> ChatChoice:
            content, calls = parse_reply(tools, "".join(o.text for o in outs))
            return ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                              finish_reason=tools.finish_reason(outs[-1].finish_reason, bool(calls)),
                              logprobs=chat_logprobs(service, outs) if logprobs is not None else None)

        def collect(gen: Generation, results):
            return ChatCompletionResponse(id=rid, created=created, model=body.model,
                                          choices=[choice(i, outs) for i, outs in sorted(results.items())],
                                          usage=gen.usage(last_outputs(results)),
                                          prompt_logprobs=prompt_logprobs_json(  # vLLM: the prompt's, once
                                              service, gen.jobs[0].prompt_ids, results[0][0].prompt_logprobs))

        gen = await service.start(body, [ids], body.token_limit(), logprobs, adapter, guide=guide)
        return await _respond(service, request, body, gen, stream, collect)

    def base_card() -> ModelCard:
        return ModelCard(id=state.settings.served_model_name, created=state.created, root=state.settings.model_root,
                         max_model_len=service.context_len)

    def adapter_card(name: str, created: int) -> ModelCard:
        return ModelCard(id=name, created=created, root=name, parent=state.settings.served_model_name,
                         max_model_len=service.context_len)

    @router.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[base_card()] + [adapter_card(e.name, e.info.created) for e in state.adapters.entries()])

    @router.get("/v1/models/{model}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def retrieve_model(model: str):
        if model == state.settings.served_model_name:
            return base_card()
        entry = state.adapters.lookup(model, "model", "model_not_found")  # 404
        return adapter_card(model, entry.info.created)

    return router
