"""vLLM's tokenizer routes: POST /tokenize and POST /detokenize.

Adapters share the base model's tokenizer, so `model` (optional) only has to
name the base model or a registered adapter. Tokenizing runs in a thread,
under the same length precheck as generation (server/api/generation.py).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter

from loramux.server.api.generation import GenerationService
from loramux.server.api.protocol import DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeRequest, \
    TokenizeResponse
from loramux.server.errors import Invalid


def tokenizer_router(service: GenerationService) -> APIRouter:
    router = APIRouter(responses={k: {"model": ErrorResponse} for k in (400, 404)})

    def tokenizer(param: str):
        if service.tokenizer is None:
            raise Invalid("this model has no tokenizer", param)
        return service.tokenizer

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            service.resolve_model(body.model)
        if body.prompt is not None:
            tok = tokenizer("prompt")
            service.check_length(len(body.prompt), "prompt")
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = list(await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=special))
        else:
            ids = await service.encode_chat(body, body.add_generation_prompt, bool(body.add_special_tokens))
        strs = await asyncio.to_thread(tokenizer("prompt").convert_ids_to_tokens, ids) \
            if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=service.context_len, tokens=ids, token_strs=strs)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            service.resolve_model(body.model)
        tok = tokenizer("tokens")
        vocab = service.core.model.cfg.vocab_size

        def decode() -> str:  # in a thread: a body can hold millions of ids
            if any(not 0 <= t < vocab for t in body.tokens):
                raise Invalid(f"token ids must be in [0, {vocab})", "tokens")
            return tok.decode(body.tokens)

        return DetokenizeResponse(prompt=await asyncio.to_thread(decode))

    return router
