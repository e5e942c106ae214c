"""Tiny random checkpoints for tests: Llama-family models made with
transformers, adapters made with PEFT, all float32 and a few MB."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def hf_config(kind: str = "llama"):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
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
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    with torch.no_grad():  # random init is small; scale up so logits differ clearly
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_adapter(base_dir: Path, out_dir: Path, r: int = 8, alpha: float = 16, seed: int = 0,
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 **lora_options):
    """Save a PEFT LoRA adapter for the model in base_dir, with lora_B
    non-zero (PEFT initialises it to zero, which would hide every bug) and,
    with use_dora=True, magnitude vectors scaled by 0.5..1.5 per row (PEFT
    starts them at the row norm, where they would hide bugs too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora_options)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return out_dir


def peft_model(base_dir: Path, adapter_dir: Path | None):
    """transformers (+ PEFT) reference model in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()


def make_chat_model(path: Path, seed: int = 0):
    """A tiny random Llama with the default model's tokenizer and chat template
    (vocab 49152, hidden 64: about 25 MB), for tests that speak text and chat;
    the same checkpoint the baselines' smoke mode uses."""
    from loramux.bench.baselines import make_tiny_model

    return make_tiny_model(path, seed)
