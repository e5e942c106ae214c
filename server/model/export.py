"""`loramux export-merged`: an HF checkpoint with one PEFT adapter (DoRA
included) merged into the base weights, as PEFT's merge_and_unload does.
The math is adapters_store/arithmetic.merge_into_base; this module adds the
model loader and the atomic folder write."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoConfig

from loramux.adapters_store.arithmetic import merge_into_base
from loramux.adapters_store.peft_format import load_peft_adapter
from loramux.server.config import ModelConfig
from loramux.server.model.loader import load_safetensors_weights, resolve_model_dir


def export_merged(model: str | None, adapter_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a full HF checkpoint (config, tokenizer, model.safetensors) of the
    base model `model` with the PEFT adapter at `adapter_path` merged in; the
    folder appears whole or not at all."""
    folder = resolve_model_dir(model)
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(folder))
    ranks_cap = 1 << 16  # an export is not bound by a serving pool's rank limit
    adapter = load_peft_adapter(adapter_path, cfg, ranks_cap)
    weights = merge_into_base(load_safetensors_weights(folder), adapter)

    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        for f in folder.iterdir():  # config, generation config, tokenizer files
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
