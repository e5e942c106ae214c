"""Offline Python API: `LLM(model=...).generate(prompts, adapters=[...])`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from loramux.server.config import EngineConfig, ModelConfig
from loramux.server.engine.engine import Engine
from loramux.server.engine.grammar_compiler import compile_here, tokenizer_info
from loramux.server.engine.guided import Guide, GuideSpec
from loramux.server.model.loader import chat_token_ids, load_safetensors_weights, resolve_model_dir
from loramux.server.model.llama import LlamaModel
from loramux.server.model.runner import PromptLogprob
from loramux.adapters_store.peft_format import load_peft_adapter
from loramux.adapters_store.registry import AdapterRegistry, RegisteredAdapter
from loramux.adapters_store.sources import AdapterSource
from loramux.server.engine.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run about twice as fast as fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> the fastest dtype the device does well (bench/lora_overhead.py measures it)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]
    # With SamplingParams.prompt_logprobs: one entry per prompt token, entry 0 None
    prompt_logprobs: list[PromptLogprob | None] | None = None


def load_base(model: str | None, dtype: str, device: str):
    """(LlamaModel, tokenizer or None, model folder) for `model`."""
    folder = resolve_model_dir(model)
    hf_config = AutoConfig.from_pretrained(folder)
    cfg = ModelConfig.from_hf(hf_config)
    weights = load_safetensors_weights(folder)
    net = LlamaModel(cfg, weights, DTYPES[dtype], device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):  # a bare checkpoint: token ids only
        tokenizer = None
    return net, tokenizer, folder


class LLM:
    def __init__(self, model: str | None = "default", dtype: str = "auto", device: str = "cpu",
                 adapters: dict[str, str | Path] | None = None, **engine_options):
        dtype = resolve_dtype(dtype, device)
        config = EngineConfig(dtype=dtype, device=device, **engine_options)
        net, self.tokenizer, self.model_dir = load_base(model, dtype, device)
        self.engine = Engine(net, self.tokenizer, config)
        self.adapters = AdapterRegistry(self.engine.adapters)
        self._tokenizer_info = None  # xgrammar's, made with the first guide
        for name, path in (adapters or {}).items():
            self.register_adapter(name, path)

    def register_adapter(self, name: str, path: str | Path) -> None:
        adapter = load_peft_adapter(path, self.engine.model.cfg, self.engine.config.max_lora_rank, name=name)
        self.adapters.register(RegisteredAdapter(name, AdapterSource.in_memory(adapter)))

    def compile_guide(self, spec: GuideSpec) -> Guide:
        """The spec compiled for this model, in this process (ValueError if it does not compile)."""
        if self._tokenizer_info is None:
            cfg = self.engine.model.cfg
            self._tokenizer_info = tokenizer_info(self.tokenizer, cfg.vocab_size, cfg.eos_token_ids)
        return compile_here(self._tokenizer_info, spec)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def generate(
        self,
        prompts: list[str | list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[str | None] | None = None,
        guides: list[GuideSpec | None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt; all prompts run together in one batch
        stream, each with its own adapter (None = the base model) and output
        constraint (`guides`, structured outputs; None = free text)."""
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        adapters = adapters or [None] * n
        guides = guides or [None] * n
        if not len(samplings) == len(adapters) == len(guides) == n:
            raise ValueError("prompts, sampling, adapters and guides must have the same length")
        compiled = [None if g is None else self.compile_guide(g) for g in guides]
        digests = [None if a is None else self.adapters.lookup(a, "adapters").digest for a in adapters]
        ids = []
        for i, (prompt, params, adapter, digest, guide) in enumerate(
                zip(prompts, samplings, adapters, digests, compiled)):
            prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            ids.append(self.engine.add_request(prompt_ids, params, digest, f"offline-{i}", adapter, guide))
        results = self.engine.run_to_completion()
        completions = []
        for rid in ids:
            outs = results[rid]
            completions.append(Completion(
                text="".join(o.text for o in outs),
                token_ids=[t for o in outs for t in o.token_ids],
                finish_reason=outs[-1].finish_reason,
                logprobs=[lp for o in outs for lp in o.logprobs],
                prompt_logprobs=outs[0].prompt_logprobs,
            ))
        return completions

    def chat(self, conversations: list[list[dict]], sampling=None, adapters=None) -> list[Completion]:
        return self.generate([self.encode_chat(c) for c in conversations], sampling, adapters)
