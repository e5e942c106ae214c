"""A tiny random Llama checkpoint and adapters made from nothing: no model hub,
no GGUF, no PEFT. For the checks of a bare GPU machine (bench/gpu_check.sh),
where the default model's package is not installed and nothing can be
fetched; transformers, tokenizers and safetensors are all they need.

The tokenizer is byte-level with no merges (one token per byte, ids 5..260)
plus five special tokens, and a ChatML template, so text and chat requests
work end to end; the model is bench/synthetic.py's random Llama of
TINY_SHAPE with the tokenizer's vocabulary.
"""
from __future__ import annotations

from pathlib import Path

from loramux.bench.synthetic import TINY_SHAPE, random_adapter, random_model
from loramux.server.config import LORA_MODULES, ModelConfig

SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0..4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A transformers fast tokenizer: the specials, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_checkpoint(folder: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    """Save a random float32 Llama of TINY_SHAPE (vocab 261) to `folder`, with the
    byte tokenizer unless `tokenizer` is False (then token ids only)."""
    from transformers import LlamaConfig

    vocab_size = len(SPECIALS) + 256
    config = LlamaConfig(vocab_size=vocab_size, **TINY_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_theta=10000.0)
    random_model(config, seed).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


def make_adapters(model_dir: Path, out: Path, names: list[str], ranks=(4, 8, 16)) -> dict[str, Path]:
    """Random PEFT adapter folders out/<name> for the checkpoint in model_dir
    (bench/synthetic.py's random_adapter, written by loramux's PEFT writer):
    adapter i of rank ranks[i % len(ranks)], every other one on q, v and down only,
    with weights large enough to change greedy tokens."""
    from transformers import AutoConfig

    from loramux.adapters_store.peft_format import save_peft_adapter

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir))
    folders = {}
    for i, name in enumerate(names):
        rank = ranks[i % len(ranks)]
        modules = ("q_proj", "v_proj", "down_proj") if i % 2 else LORA_MODULES
        adapter = random_adapter(cfg, name, rank, seed=i, modules=modules, alpha=2.0 * rank, weight_scale=0.3)
        save_peft_adapter(adapter, out / name)
        folders[name] = out / name
    return folders
