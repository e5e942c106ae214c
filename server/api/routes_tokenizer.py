"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Adapters share the base model's tokenizer, so `model` (optional) only has to
name the base model or a registered adapter. Tokenizing runs in a thread,
under the same length precheck as generation (server/api/generation.py).
The three are what lm-eval's remote tokenizer (`tokenizer_backend=remote`,
chosen by itself when /tokenizer_info answers) calls.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter

from loramux.server.api.generation import GenerationService
from loramux.server.api.protocol import DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeRequest, \
    TokenizeResponse, TokenizerInfoResponse
from loramux.server.errors import Invalid


def _json_value(value):
    # AddedToken -> its text; dicts (added_tokens_decoder's int keys) and lists recursively
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def tokenizer_info(tokenizer) -> dict:
    """vLLM's /tokenizer_info body: the tokenizer's init kwargs made JSON
    (file paths left out: they are the server's), its class, and the chat
    template the server applies."""
    config = {k: _json_value(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if not k.endswith("_file") and k != "name_or_path"}
    config["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return config


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

    info = tokenizer_info(service.tokenizer) if service.tokenizer is not None else None  # fixed: built once

    @router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def get_tokenizer_info():
        if info is None:
            raise Invalid("this model has no tokenizer")
        return info

    return router
