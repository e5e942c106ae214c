"""Tiny random checkpoints for tests: Llama-family models made with
transformers, adapters made with PEFT, all float32 and a few MB; and
loramux's model over one of them."""
from __future__ import annotations

from pathlib import Path

import torch

from loramux.bench.synthetic import TINY_SHAPE, make_peft_adapter, make_tiny_model, random_model
from loramux.server.config import LORA_MODULES

VOCAB = 128
# A and B of the test adapters: N(0, 0.3²), large enough that a wrong scale,
# a missing module or a missing row moves the logits far beyond tolerance
WEIGHT_SCALE = 0.3


def hf_config(kind: str = "llama"):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, **TINY_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if kind == "tied":
        return LlamaConfig(**common, tie_word_embeddings=True, head_dim=32, rope_theta=5000.0)
    if kind == "llama3":
        return LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
    raise ValueError(kind)


def make_model(path: Path, kind: str = "llama", seed: int = 0):
    """Save a random HF model to `path`; returns the transformers model (eval, fp32)."""
    model = random_model(hf_config(kind), seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_adapter(base_dir: Path, out_dir: Path, r: int = 8, alpha: float = 16, seed: int = 0,
                 target_modules=LORA_MODULES, **lora_options) -> Path:
    """Save a PEFT LoRA adapter for the model in base_dir (bench/synthetic.py's
    make_peft_adapter: lora_B non-zero, with use_dora=True magnitudes
    perturbed) with the tests' WEIGHT_SCALE."""
    return make_peft_adapter(base_dir, out_dir, r=r, alpha=alpha, seed=seed, target_modules=target_modules,
                             weight_scale=WEIGHT_SCALE, **lora_options)


def make_dora_adapter(base_dir: Path, out_dir: Path, **options) -> Path:
    """make_adapter with use_dora=True."""
    return make_adapter(base_dir, out_dir, use_dora=True, **options)


def make_chat_model(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template
    (about 25 MB), for tests that speak text and chat; the same checkpoint
    the baselines' smoke mode uses."""
    return make_tiny_model(path, seed)


def peft_model(base_dir: Path, adapter_dir: Path | None):
    """transformers (+ PEFT) reference model in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers (+ PEFT) greedy tokens after `prompt`, float32, EOS ignored."""
    ref = peft_model(base_dir, adapter_dir)
    with torch.no_grad():
        ids = torch.tensor([prompt])  # explicit mask: token 0 is also the pad id
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Where a test of the Triton path (LORAMUX_TRITON=1) puts its tensors: the GPU
# when there is one, else the CPU under Triton's interpreter (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(model_dir: Path, dtype=torch.float32, num_blocks: int = 128, block_size: int = 4, device: str = "cpu"):
    """loramux's model over the checkpoint in model_dir, on `device`: (ModelConfig, LlamaModel, KVCache)."""
    from transformers import AutoConfig

    from loramux.server.config import ModelConfig
    from loramux.server.model.llama import LlamaModel
    from loramux.server.model.loader import load_safetensors_weights
    from loramux.server.model.kv_tensors import KVCache

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir))
    model = LlamaModel(cfg, load_safetensors_weights(model_dir), dtype, device)
    return cfg, model, KVCache(cfg, num_blocks, block_size, dtype, device)
