"""OpenAI's routes: /v1/completions, /v1/chat/completions (JSON or SSE) and
/v1/models. Both generation routes run through GenerationService and differ
only in how they format its outputs."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from loramux.server.api.generation import Generation, GenerationService, last_outputs, sse
from loramux.server.api.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob,
)
from loramux.server.api.state import ServerState
from loramux.server.engine.engine import RequestOutput

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def completion_logprobs(gen: GenerationService, outs: list[RequestOutput], offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for o in outs:
        for token, logprob, top in o.logprobs:
            text = gen.token_text(token)
            lp.tokens.append(text)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append({gen.token_text(t): v for t, v in top})
            lp.text_offset.append(offset)
            offset += len(text)
    return lp


def chat_logprobs(gen: GenerationService, outs: list[RequestOutput]) -> ChoiceLogprobs:
    content = []
    for o in outs:
        for token, logprob, top in o.logprobs:
            text = gen.token_text(token)
            content.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=[
                TopLogprob(token=gen.token_text(t), logprob=v, bytes=list(gen.token_text(t).encode()))
                for t, v in top]))
    return ChoiceLogprobs(content=content)


async def _respond(service: GenerationService, request: Request, body, start, stream, collect):
    """Start the generation; hand it to `stream` (which then owns its release)
    or collect it and format with `collect`."""
    gen: Generation = await start
    if body.stream:
        return service.stream(gen, stream(gen))
    return collect(gen, await service.collect(request, gen))


def openai_router(state: ServerState, service: GenerationService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        adapter = service.resolve_model(body.model)
        ids = await service.encode(body.prompts())
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        want_lp = body.logprobs is not None

        async def stream(gen: Generation):
            finals: dict[int, RequestOutput] = {}
            offsets = [0] * len(gen.jobs)
            async for i, out in gen.fan:
                if not out.text and not out.finished and not want_lp:
                    continue
                lp = completion_logprobs(service, [out], offsets[i]) if want_lp else None
                offsets[i] += len(out.text)
                if out.finished:
                    finals[i] = out
                yield sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[
                    CompletionChoice(index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason)]))
            if body.stream_options and body.stream_options.include_usage:
                yield sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[],
                                             usage=gen.usage(finals)))

        def collect(gen: Generation, results):
            choices = [CompletionChoice(
                index=i, text="".join(o.text for o in outs), finish_reason=outs[-1].finish_reason,
                logprobs=completion_logprobs(service, outs, 0) if want_lp else None)
                for i, outs in sorted(results.items())]
            return CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                      usage=gen.usage(last_outputs(results)))

        start = service.start(body, ids, body.max_tokens, body.logprobs, adapter)
        return await _respond(service, request, body, start, stream, collect)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = service.resolve_model(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = await service.encode_chat(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage=None):
            return sse(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices, usage=usage))

        async def stream(gen: Generation):
            finals: dict[int, RequestOutput] = {}
            for job in gen.jobs:
                yield chunk([ChatChunkChoice(index=job.index, delta=DeltaMessage(role="assistant", content=""))])
            async for i, out in gen.fan:
                if not out.text and not out.finished and logprobs is None:
                    continue
                if out.finished:
                    finals[i] = out
                yield chunk([ChatChunkChoice(
                    index=i, delta=DeltaMessage(content=out.text or None),
                    logprobs=chat_logprobs(service, [out]) if logprobs is not None else None,
                    finish_reason=out.finish_reason)])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], gen.usage(finals))

        def collect(gen: Generation, results):
            choices = [ChatChoice(
                index=i, message=AssistantMessage(content="".join(o.text for o in outs)),
                finish_reason=outs[-1].finish_reason,
                logprobs=chat_logprobs(service, outs) if logprobs is not None else None)
                for i, outs in sorted(results.items())]
            return ChatCompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                          usage=gen.usage(last_outputs(results)))

        start = service.start(body, [ids], body.token_limit(), logprobs, adapter)
        return await _respond(service, request, body, start, stream, collect)

    @router.get("/v1/models", response_model=ModelList)
    async def models():
        base = state.settings.served_model_name
        cards = [ModelCard(id=base, created=state.created, root=state.settings.model_root,
                           max_model_len=service.context_len)]
        cards += [ModelCard(id=e.name, created=e.info.created, root=e.name, parent=base,
                            max_model_len=service.context_len)
                  for e in state.adapters.entries()]
        return ModelList(data=cards)

    return router
