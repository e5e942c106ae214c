"""Synthetic checkpoints for the benchmarks and the tests: random models and
random LoRA adapters.

Adapters come two ways:

- `make_peft_adapter` (and `make_peft_adapters`, several at once): a PEFT
  folder written by PEFT itself (`get_peft_model` + `save_pretrained`), so
  any LoraConfig option (DoRA, rsLoRA, rank and alpha patterns) and the file
  layout are PEFT's own, an independent reference for loramux's loader; it
  loads the base model once per adapter;
- `random_adapter`: a `LoraAdapter` in memory, no model and no PEFT, in
  milliseconds (what thousands of adapters need); `save_peft_adapter` writes
  it as a PEFT folder.

Both draw A then B of each module, layer by layer, from
`torch.Generator().manual_seed(seed)`, times `weight_scale`: for one rank and
modules in LORA_MODULES order (PEFT's order on Llama and Qwen2), the same
seed and scale give the same A and B either way.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora
from loramux.server.config import LORA_MODULES, ModelConfig

# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

# The tiny Llama's shape (a few MB in float32; the tests' models have it too)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def random_model(config, seed: int = 0):
    """A transformers causal LM of `config` (float32, eval) with weights
    large enough that logits differ clearly and greedy choices are clear-cut
    (matrices N(0, 0.2²), vectors such as norms uniform in 0.8..1.2)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model.eval()


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template
    (vocab 49152, hidden 64: about 25 MB), saved to `folder`."""
    from transformers import AutoTokenizer, LlamaConfig

    from loramux.server.model.loader import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    config = LlamaConfig(
        vocab_size=len(tokenizer), **TINY_SHAPE, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    random_model(config, seed).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------


def random_adapter(cfg: ModelConfig, name: str, rank: int = 16, seed: int = 0,
                   modules: tuple[str, ...] = LORA_MODULES, alpha: float = 32.0,
                   weight_scale: float = 0.02) -> LoraAdapter:
    """An adapter of random weights in memory (the right shapes; A and B
    N(0, weight_scale²)), every layer, `modules`, scale alpha / rank."""
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            out_f, in_f = cfg.module_shape(m)
            mods[(layer, m)] = ModuleLora(
                a=torch.randn(rank, in_f, generator=gen) * weight_scale,
                b=torch.randn(out_f, rank, generator=gen) * weight_scale,
                scale=alpha / rank,
            )
    digest = hashlib.sha256(f"{name}:{rank}:{seed}:{alpha}:{weight_scale}:{','.join(modules)}".encode()).hexdigest()
    nbytes = sum((m.a.numel() + m.b.numel()) * 4 for m in mods.values())
    return LoraAdapter(name, rank, alpha, tuple(modules), mods, {"r": rank}, digest, nbytes)


def make_peft_adapter(base_dir: Path, out_dir: Path, r: int = 16, alpha: float = 32.0, seed: int = 0,
                      target_modules: tuple[str, ...] = LORA_MODULES, weight_scale: float = 0.02,
                      **lora_options) -> Path:
    """Save a random PEFT LoRA adapter for the HF model in base_dir to out_dir.

    lora_A and lora_B are N(0, weight_scale²), drawn in PEFT's parameter order
    from a generator seeded with `seed` (PEFT initialises lora_B to zero: the
    adapter would be the base model and hide every bug); with use_dora=True
    the magnitude vectors are scaled by 0.5..1.5 per row from the same
    generator (PEFT starts them at the row norms, where they would hide bugs
    too). `lora_options`: any other LoraConfig field (use_dora, use_rslora,
    rank_pattern, alpha_pattern, ...; lora_dropout, bias and task_type
    default to 0.0, "none" and "CAUSAL_LM")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    options = {"lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", **lora_options}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), **options)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return out_dir


def make_peft_adapters(model_dir: Path, out: Path, names: list[str], ranks: list[int], alpha_scale: float = 2.0,
                       seed: int = 0, **options) -> dict[str, Path]:
    """`make_peft_adapter` for each name, into out/name: adapter i of rank
    ranks[i % len(ranks)], lora_alpha = alpha_scale * rank, seed seed + i
    (`options`: the rest of make_peft_adapter's)."""
    folders = {}
    for i, name in enumerate(names):
        rank = ranks[i % len(ranks)]
        folders[name] = make_peft_adapter(model_dir, out / name, r=rank, alpha=alpha_scale * rank, seed=seed + i,
                                          **options)
    return folders
