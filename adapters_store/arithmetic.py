"""Adapter arithmetic: weighted merges, per-request mixes, merged-model export.

Task arithmetic on LoRA: for sources (adapter_i, weight w_i) the merged update
of one module is

    ΔW = Σ w_i s_i B_i A_i                       [out, in]

`concat` writes it exactly as ONE adapter of rank Σ r_i (per module, the
ranks of the sources that target it), scale 1:

    A = [A_1; A_2; ...]                          [Σ r_i, in]   rows stacked
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]          [out, Σ r_i]  columns stacked
    B A = Σ w_i s_i B_i A_i

A negative weight subtracts a task. `svd` compresses ΔW to a requested rank
k per module by truncated SVD (ΔW = U S Vh, B = U_k √S_k, A = √S_k Vh_k) and
reports ||B A - ΔW||_F / ||ΔW||_F. A per-request mix is a concat kept in
memory for the life of its requests (AdapterPool.hold_mix).

DoRA sources cannot be merged: their row scale m / ||W0 + s·B·A|| is not
linear in B·A. `merge_into_base` folds one adapter, DoRA included, into the
base weights (what PEFT's merge_and_unload gives): W = W0 + s·B·A, or for
DoRA W = (m / ||W0 + s·B·A||_row) ⊙ (W0 + s·B·A).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from loramux.server.config import LORA_MODULES
from loramux.server.errors import Invalid, Unprocessable
from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora, _module_name, module_bytes, peft_files, \
    parse_peft_adapter

METHODS = ("concat", "svd")
# A per-request mix is held by digest and never named in the registry; its
# LoraAdapter.name (MIX_NAME_PREFIX + digest) only tells it apart in logs,
# and no registered name can look like it (adapter names have no ':').
MIX_NAME_PREFIX = "mix:"
# |weight| of a source in a merge or a per-request mix: far beyond any
# sensible task arithmetic, small enough that no weight overflows the delta.
MAX_ADAPTER_WEIGHT = 100.0


@dataclass(frozen=True)
class Source:
    adapter: LoraAdapter
    weight: float


def check_sources(sources: list[Source]) -> None:
    if not sources:
        raise Invalid("sources: at least one source adapter is needed", "sources", "invalid_merge")
    for i, s in enumerate(sources):
        if not abs(s.weight) <= MAX_ADAPTER_WEIGHT:  # NaN fails this too
            raise Invalid(f"sources[{i}].weight: must be a finite number within ±{MAX_ADAPTER_WEIGHT:g}",
                             f"sources.{i}.weight", "invalid_merge")
        if s.adapter.use_dora:
            raise Unprocessable(f"adapter `{s.adapter.name}` is a DoRA adapter; DoRA adapters cannot be merged "
                             "(their row scale is not linear in the LoRA weights)", f"sources.{i}.adapter", "invalid_merge")


def _ordered_keys(sources: list[Source]) -> list[tuple[int, str]]:
    keys = {k for s in sources for k in s.adapter.modules}
    return sorted(keys, key=lambda k: (k[0], LORA_MODULES.index(k[1])))


def _exact_delta(sources: list[Source], key: tuple[int, str]) -> torch.Tensor:
    """Σ w_i s_i B_i A_i of one module, float64: [out, in]."""
    total = None
    for s in sources:
        ml = s.adapter.modules.get(key)
        if ml is not None:
            d = (s.weight * ml.scale) * (ml.b.double() @ ml.a.double())
            total = d if total is None else total + d
    return total


def _adapter(name: str, modules: dict[tuple[int, str], ModuleLora], digest: str, config: dict) -> LoraAdapter:
    return LoraAdapter(
        name=name, rank=max(m.rank for m in modules.values()), lora_alpha=1.0,
        target_modules=tuple(m for m in LORA_MODULES if any(k[1] == m for k in modules)),
        modules=modules, config=config, digest=digest, nbytes=module_bytes(modules))


def _merged_config(sources: list[Source]) -> dict:
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "use_dora": False,
              "lora_dropout": 0.0}
    base = sources[0].adapter.config.get("base_model_name_or_path")
    if isinstance(base, str):
        config["base_model_name_or_path"] = base
    return config


def mix_digest(parts: list[tuple[str, float]]) -> str:
    """The digest of a mix: its sources' digests and weights, in order."""
    return hashlib.sha256(json.dumps(["mix", parts]).encode()).hexdigest()


def concat(name: str, sources: list[Source], digest: str | None = None) -> LoraAdapter:
    """Σ w_i s_i B_i A_i exactly, as one adapter of rank Σ r_i per module (scale 1)."""
    check_sources(sources)
    modules = {}
    for key in _ordered_keys(sources):
        parts = [(s.adapter.modules[key], s.weight) for s in sources if key in s.adapter.modules]
        a = torch.cat([ml.a for ml, _ in parts], dim=0)  # [Σr, in]
        b = torch.cat([(w * ml.scale) * ml.b for ml, w in parts], dim=1)  # [out, Σr]
        modules[key] = ModuleLora(a=a.contiguous(), b=b.contiguous(), scale=1.0)
    if digest is None:
        digest = mix_digest([(s.adapter.digest, s.weight) for s in sources])
    return _adapter(name, modules, digest, _merged_config(sources))


def svd(name: str, sources: list[Source], rank: int) -> tuple[LoraAdapter, dict[str, float]]:
    """Σ w_i s_i B_i A_i truncated to `rank` per module (at most the module's
    own full rank); returns the adapter and, per module name, the relative
    Frobenius error ||B A - ΔW|| / ||ΔW|| of the float32 weights it holds."""
    check_sources(sources)
    if rank <= 0:
        raise Invalid("rank: must be a positive integer", "rank", "invalid_merge")
    modules, errors = {}, {}
    for key in _ordered_keys(sources):
        delta = _exact_delta(sources, key)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = max(1, min(rank, int((s > 0).sum()) or 1))
        root = s[:k].sqrt()
        b = (u[:, :k] * root).float().contiguous()  # [out, k]
        a = (root[:, None] * vh[:k]).float().contiguous()  # [k, in]
        modules[key] = ModuleLora(a=a, b=b, scale=1.0)
        norm = torch.linalg.norm(delta)
        err = torch.linalg.norm(b.double() @ a.double() - delta)
        errors[_module_name(*key)] = float(err / norm) if norm > 0 else 0.0
    digest = mix_digest([(s.adapter.digest, s.weight) for s in sources] + [("svd", rank)])
    return _adapter(name, modules, digest, _merged_config(sources)), errors


def as_peft(adapter: LoraAdapter, model, max_rank: int) -> tuple[LoraAdapter, bytes, bytes]:
    """The adapter as PEFT files, parsed back (validated, with the files' digest)."""
    config_bytes, weights_bytes = peft_files(adapter)
    return parse_peft_adapter(config_bytes, weights_bytes, model, max_rank, adapter.name), config_bytes, \
        weights_bytes


# ---------------------------------------------------------------------------
# export: an adapter merged into the base weights
# ---------------------------------------------------------------------------

def merge_into_base(weights: dict[str, torch.Tensor], adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """HF weight name -> tensor with every adapted linear replaced by its merged weight (same dtype)."""
    out = dict(weights)
    for key, ml in adapter.modules.items():
        wname = _module_name(*key) + ".weight"
        w0 = weights[wname].float()
        merged = w0 + ml.delta()
        if ml.magnitude is not None:
            merged = ml.dora_scale(w0)[:, None] * merged
        out[wname] = merged.to(weights[wname].dtype).contiguous()
    return out
