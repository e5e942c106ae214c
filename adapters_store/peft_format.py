"""PEFT LoRA adapters in and out: adapter_config.json + adapter_model.safetensors.

Reading never unpickles anything: the weights file is parsed by our own strict
safetensors reader (`read_safetensors`), and a folder that holds only
`adapter_model.bin` is refused with a message, not loaded.

Every problem with an adapter raises `AdapterError`, whose message names the
offending config field or tensor key, so the API can hand it to the user as is.

How PEFT names things (peft 0.21, a Llama-family `*ForCausalLM` base):

    module name  model.layers.{i}.self_attn.{q,k,v,o}_proj
                 model.layers.{i}.mlp.{gate,up,down}_proj
    tensor key   base_model.model.<module name>.lora_A.weight   [r, in_features]
                 base_model.model.<module name>.lora_B.weight   [out_features, r]
                 (older files: lora_A.<adapter name>.weight)
                 base_model.model.<module name>.lora_magnitude_vector  [out_features]
                 (DoRA's m; older files: lora_magnitude_vector[.<adapter name>].weight)

    target_modules  list: an entry matches a module whose name equals it or
                    ends with "." + entry; str: re.fullmatch against the module
                    name, except "all-linear" (any case) = the seven linears.
    rank_pattern /  the first key (in file order) with
    alpha_pattern   re.match(rf"(.*\\.)?({key})$", module name) gives the
                    module's r / lora_alpha; else r / lora_alpha.
    scale           lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora;
                    |scale| <= MAX_LORA_SCALE (1024) for every module, so
                    that no adapter turns its rows' logits into inf or NaN.
    patterns        target_modules, exclude_modules, layers_pattern and the
                    keys of rank_pattern / alpha_pattern are matched with RE2,
                    a linear-time engine: no pattern can stall the server.
                    RE2 lacks backreferences and lookaround; a pattern that
                    needs them is refused, naming its field.
    use_dora        DoRA (peft/tuners/lora/dora.py): every targeted module also
                    has a magnitude m [out_features], and its output is
                    (m / ||W0 + scale·B·A||_row) ⊙ (W0 x + scale·B·A x), the norm
                    taken over the input dimension, per output row, detached.
                    The serving pool computes that row scale once at load
                    (adapters_store/pool.py), since it needs the base weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import re2
import torch

from loramux.adapters_store.durable import replace_synced
from loramux.server.config import LORA_MODULES, ModelConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_PARENT = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in LORA_MODULES}
_KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>0|[1-9][0-9]*)\.(?P<parent>self_attn|mlp)\."
    r"(?P<module>[A-Za-z0-9_]+)\.(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|(?P<mag>lora_magnitude_vector)(?:\.(?P<mag_adapter>[^.]+))?(?:\.weight)?)"
)
# PEFT's default target_modules for our architectures when the config has none.
_DEFAULT_TARGETS = ("q_proj", "v_proj")
# Config fields that select a LoRA variant (a different forward) or train extra
# tensors we cannot serve; a truthy value is refused.
_UNSUPPORTED_FIELDS = {
    "modules_to_save": "modules_to_save: adapters that train whole modules (modules_to_save) are not supported",
    "lora_bias": "lora_bias: adapters with a bias on lora_B are not supported",
    "target_parameters": "target_parameters: adapters on parameters (target_parameters) are not supported",
    "trainable_token_indices": "trainable_token_indices: adapters with trainable tokens are not supported",
    "layer_replication": "layer_replication: adapters with layer replication are not supported",
    "alora_invocation_tokens": "alora_invocation_tokens: activated LoRA (aLoRA) adapters are not supported",
    "arrow_config": "arrow_config: Arrow adapters are not supported",
    "kasa_config": "kasa_config: KaSA adapters are not supported",
    "monteclora_config": "monteclora_config: MonteCLoRA adapters are not supported",
    "use_bdlora": "use_bdlora: block-diagonal LoRA adapters are not supported",
}

_MAX_HEADER = 100 * 2**20
MAX_CONFIG_BYTES = 2**20  # adapter_config.json
MAX_LORA_SCALE = 1024.0  # |lora_alpha / r| (or / sqrt(r)); PEFT's usual scales are 0.5..64
_MAX_DIM = 2**31  # any tensor dimension; the model's own are far below
_MAX_PATTERN_CHARS = 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the user's error, answered as such
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_DTYPES = ("F16", "BF16", "F32")


class AdapterError(ValueError):
    """A user-facing adapter problem. `field` names the config field, file or tensor key at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModuleLora:
    a: torch.Tensor  # [r, in_features] float32
    b: torch.Tensor  # [out_features, r] float32
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module r, alpha)
    magnitude: torch.Tensor | None = None  # [out_features] float32: DoRA's m; None for plain LoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """scale · B·A: [out_features, in_features] float32."""
        return self.scale * (self.b @ self.a)

    def dora_scale(self, w0: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + scale·B·A||_row: [out_features] float32, as PEFT's DoRA
        forward defines it (norm over the input dimension); w0: [out, in]."""
        norm = torch.linalg.norm(w0.float() + self.delta().to(w0.device), dim=1)
        return self.magnitude.to(w0.device) / norm


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter, weights in float32 on the CPU.

    rank: the largest rank over its modules.
    target_modules: the LORA_MODULES names that appear in `modules`, in LORA_MODULES order.
    modules: (layer index, module name e.g. "q_proj") -> ModuleLora.
    config: adapter_config.json as read.
    digest: sha256 hex over the safetensors file bytes followed by the canonical
        config JSON (sorted keys, no spaces).
    nbytes: number of LoRA parameters (A and B, all modules) * 4, i.e. the size
        at float32 whatever dtype the file used.
    """

    name: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    modules: dict[tuple[int, str], ModuleLora]
    config: dict
    digest: str
    nbytes: int

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------

def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors(data: bytes, field: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """Parse a safetensors file strictly; tensors are copies that own their memory.

    Layout: u64 little-endian header length N | N bytes of UTF-8 JSON | data.
    The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}
    (offsets relative to the data region) plus an optional "__metadata__"
    str -> str map. The tensors must tile the data region exactly.
    """

    def fail(msg: str) -> AdapterError:
        return AdapterError(f"{field}: {msg}", field)

    if len(data) < 8:
        raise fail(f"file is {len(data)} bytes, too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n < 2:
        raise fail(f"header length {n} is too small")
    if n > _MAX_HEADER:
        raise fail(f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
    if 8 + n > len(data):
        raise fail(f"header length {n} runs past the end of the {len(data)}-byte file")
    try:
        text = bytes(data[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise fail("header is not valid UTF-8") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise fail(f"header has the key {e.args[0]!r} more than once") from None
    except ValueError as e:
        raise fail(f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise fail("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")

    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise fail("__metadata__ must be a map of strings to strings")

    data_len = len(data) - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape):
            raise fail(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise fail(f"tensor {name!r} data_offsets {offsets} are outside the {data_len}-byte data region")
        size = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if end - begin != size:
            raise fail(f"tensor {name!r} has {end - begin} bytes but dtype {dtype} and shape {shape} need {size}")
        spans.append((begin, end, name))

    # The tensors must tile [0, data_len) with no gap and no overlap.
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise fail(f"tensor {name!r} {kind}")
        pos = end
    if pos != data_len:
        raise fail(f"{data_len - pos} bytes after the last tensor are not covered by any tensor")

    buf = bytearray(data[8 + n :])  # one copy; frombuffer needs a writable buffer
    out: dict[str, torch.Tensor] = {}
    for begin, end, name in spans:
        info = header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        if end == begin:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        out[name] = flat.reshape(info["shape"]).clone()
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize contiguous CPU tensors in key order, header padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    pos = 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


# ----------------------------------------------------------------------------
# adapter_config.json -> which modules, with which rank and scale
# ----------------------------------------------------------------------------

def _module_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def _lora_key(layer: int, module: str, ab: str) -> str:
    """ab: "A", "B", or "M" (DoRA's magnitude, keyed as peft 0.21 saves it)."""
    if ab == "M":
        return f"{_KEY_PREFIX}{_module_name(layer, module)}.lora_magnitude_vector"
    return f"{_KEY_PREFIX}{_module_name(layer, module)}.lora_{ab}.weight"


def _other_module_names(model: ModelConfig) -> list[str]:
    """Names of the base model's modules that are not LoRA-able linears (as transformers names them)."""
    names = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(model.num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"]
    return names


def _compile(pattern: str, field: str):
    """An RE2 pattern (linear-time matching) with Python re's match/fullmatch."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise AdapterError(f"{field}: a pattern of {len(pattern)} characters is longer than the limit of "
                           f"{_MAX_PATTERN_CHARS}", field)
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise AdapterError(f"{field}: {pattern[:80]!r} is not a regular expression loramux can match in linear "
                           f"time ({reason}; backreferences and lookaround are not supported)", field) from None


def _str_list(value, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise AdapterError(f"{field}: must be a string or a list of strings, not {value!r}", field)


def _targeted(config: dict, model: ModelConfig) -> list[tuple[int, str]]:
    """The (layer, module) pairs PEFT would wrap, in (layer, LORA_MODULES) order."""
    candidates = [(i, m) for i in range(model.num_layers) for m in LORA_MODULES]
    others = _other_module_names(model)
    supported = ", ".join(LORA_MODULES)
    target = config.get("target_modules")
    if target is None:
        target = list(_DEFAULT_TARGETS)

    if isinstance(target, str) and target.lower() == "all-linear":
        chosen = candidates
    elif isinstance(target, str):
        rx = _compile(target, "target_modules")
        bad = [name for name in others if rx.fullmatch(name)]
        if bad:
            raise AdapterError(
                f"target_modules: {target!r} matches {bad[0]!r}, which is not a LoRA-able module "
                f"(supported: {supported})", "target_modules")
        chosen = [c for c in candidates if rx.fullmatch(_module_name(*c))]
        if not chosen:
            raise AdapterError(f"target_modules: {target!r} matches no module of the base model "
                               f"(supported: {supported})", "target_modules")
    else:
        entries = _str_list(target, "target_modules")
        if not entries:
            raise AdapterError("target_modules: is empty", "target_modules")

        def hits(entry: str, name: str) -> bool:
            return name == entry or name.endswith("." + entry)

        for entry in entries:
            if any(hits(entry, name) for name in others) or not any(
                hits(entry, _module_name(*c)) for c in candidates
            ):
                raise AdapterError(f"target_modules: {entry!r} is not a supported LoRA module of this model "
                                   f"(supported: {supported})", "target_modules")
        chosen = [c for c in candidates if any(hits(e, _module_name(*c)) for e in entries)]
        chosen = _only_layers(config, chosen)

    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            rx = _compile(exclude, "exclude_modules")
            chosen = [c for c in chosen if not rx.fullmatch(_module_name(*c))]
        else:
            entries = _str_list(exclude, "exclude_modules")
            chosen = [c for c in chosen
                      if not any(_module_name(*c) == e or _module_name(*c).endswith("." + e) for e in entries)]
    if not chosen:
        raise AdapterError("target_modules: no module of the base model is targeted", "target_modules")
    return chosen


def _only_layers(config: dict, chosen: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """PEFT's layers_to_transform / layers_pattern (applied only to list target_modules, as PEFT does)."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return chosen
    if _is_int(layers):
        layers = [layers]
    if not (isinstance(layers, list) and all(_is_int(x) for x in layers)):
        raise AdapterError(f"layers_to_transform: must be an integer or a list of integers, not {layers!r}",
                           "layers_to_transform")
    patterns = config.get("layers_pattern")
    if patterns:
        patterns = _str_list(patterns, "layers_pattern")
        rxs = [_compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern") for p in patterns]
    else:
        rxs = [_compile(r".*?\.[^.]*\.(?P<idx>\d+)\.", "layers_pattern")]
    out = []
    for c in chosen:
        name = _module_name(*c)
        match = next((m for m in (rx.match(name) for rx in rxs) if m), None)
        if match is not None and int(match.group("idx")) in layers:
            out.append(c)
    return out


def _pattern(config: dict, field: str, check) -> list[tuple[re.Pattern, str, object]]:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{field}: must be a map from module name pattern to value", field)
    out = []
    for key, v in value.items():
        check(key, v)
        out.append((_compile(rf"(.*\.)?({key})$", field), key, v))
    return out


def _lookup(patterns, name: str):
    """PEFT's get_pattern_key: the first key whose regex matches the end of `name`."""
    for rx, key, value in patterns:
        if rx.match(name):
            return key, value
    return None


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{field}: must be a finite number, not {value!r}", field)
    return float(value)


def _rank(value, field: str) -> int:
    if not _is_int(value) or value <= 0:
        raise AdapterError(f"{field}: rank must be a positive integer, not {value!r}", field)
    return value


@dataclass(frozen=True)
class _Plan:
    r: int  # what the config says for this module
    r_field: str  # "r" or "rank_pattern"
    scale: float


def _plan(config: dict, model: ModelConfig, max_rank: int) -> dict[tuple[int, str], _Plan]:
    """Validate the config; return the expected rank and scale of every targeted module."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type: {peft_type!r} is not supported; only LORA adapters are", "peft_type")
    if not isinstance(config.get("use_dora", False), bool):
        raise AdapterError(f"use_dora: must be true or false, not {config['use_dora']!r}", "use_dora")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(f"bias: {bias!r} is not supported; only \"none\" is", "bias")
    for field, message in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise AdapterError(message, field)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"use_rslora: must be true or false, not {use_rslora!r}", "use_rslora")

    r = _rank(config.get("r", 8), "r")
    alpha = _number(config.get("lora_alpha", 8), "lora_alpha")
    ranks = _pattern(config, "rank_pattern", lambda k, v: _rank(v, "rank_pattern"))
    alphas = _pattern(config, "alpha_pattern", lambda k, v: _number(v, "alpha_pattern"))

    plan = {}
    for layer, module in _targeted(config, model):
        name = _module_name(layer, module)
        hit = _lookup(ranks, name)
        r_m, r_field = (hit[1], "rank_pattern") if hit else (r, "r")
        hit = _lookup(alphas, name)
        alpha_m = float(hit[1]) if hit else alpha
        if r_m > max_rank:
            raise AdapterError(f"{r_field}: rank {r_m} of {name} exceeds this server's maximum LoRA rank "
                               f"{max_rank}", r_field)
        scale = alpha_m / math.sqrt(r_m) if use_rslora else alpha_m / r_m
        if not abs(scale) <= MAX_LORA_SCALE:
            a_field = "alpha_pattern" if hit else "lora_alpha"
            raise AdapterError(f"{a_field}: the scale of {name} is {scale:.3g} (lora_alpha {alpha_m:.3g} / "
                               f"{'sqrt(r)' if use_rslora else 'r'} with r={r_m}); it must be within "
                               f"±{MAX_LORA_SCALE:g}", a_field)
        plan[(layer, module)] = _Plan(r_m, r_field, scale)
    return plan


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------

def _parse_config(config_bytes: bytes) -> dict:
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME}: {len(config_bytes)} bytes is larger than the limit of "
                           f"{MAX_CONFIG_BYTES}", CONFIG_NAME)
    try:
        config = json.loads(bytes(config_bytes).decode("utf-8"), object_pairs_hook=_reject_duplicates,
                            parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise AdapterError(f"{CONFIG_NAME}: the key {e.args[0]!r} appears more than once", CONFIG_NAME) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{CONFIG_NAME}: not valid JSON ({e})", CONFIG_NAME) from None
    except RecursionError:
        raise AdapterError(f"{CONFIG_NAME}: nested too deeply", CONFIG_NAME) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME}: must be a JSON object", CONFIG_NAME)
    return config


def _check_not_pickle(data: bytes) -> None:
    # Protocol 2+ pickles start with 0x80 and a protocol byte; torch.save
    # writes a zip archive. A safetensors file starts with its header length
    # (u64, little-endian: its first byte may well be 0x80) and then "{".
    if data[8:9] == b"{":
        return
    if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
        raise AdapterError(
            f"{WEIGHTS_NAME}: this is a pickled (torch.save) file, which is never loaded; "
            "only safetensors adapter weights are accepted", WEIGHTS_NAME)


def tensor_key_parts(key: str) -> tuple[int, str, str, str] | None:
    """(layer, parent, module, "A" | "B" | "M") of a PEFT tensor key, or None
    if it is not one of the shapes above (the module is not checked here)."""
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return None
    return int(m["layer"]), m["parent"], m["module"], "M" if m["mag"] else m["ab"]


def safetensors_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES[name]


def _collect(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """Tensor key -> {(layer, module): {"A"|"B"|"M": (key, tensor)}}; refuses keys we do not serve."""
    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        parts = tensor_key_parts(key)
        if parts is None:
            raise AdapterError(f"{key}: unexpected tensor; only lora_A/lora_B weights (and DoRA's "
                               f"lora_magnitude_vector) of {', '.join(LORA_MODULES)} are supported", key)
        layer, parent, module, ab = parts
        if module not in LORA_MODULES or _PARENT[module] != parent:
            raise AdapterError(f"{key}: {parent}.{module} is not a supported LoRA module "
                               f"(supported: {', '.join(LORA_MODULES)})", key)
        if layer >= model.num_layers:
            raise AdapterError(f"{key}: layer index {layer} is out of range; the base model has "
                               f"{model.num_layers} layers", key)
        slot = found.setdefault((layer, module), {})
        what = "lora_magnitude_vector" if ab == "M" else f"lora_{ab}"
        if ab in slot:
            raise AdapterError(f"{key}: {what} of {_module_name(layer, module)} is given twice "
                               f"(also as {slot[ab][0]})", key)
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AdapterError(f"{key}: dtype {_ST_NAMES[t.dtype]} is not supported; use one of "
                               f"{', '.join(_FLOAT_DTYPES)}", key)
        slot[ab] = (key, t)
    return found


def parse_peft_adapter(config_bytes: bytes, weights_bytes: bytes, model: ModelConfig, max_rank: int,
                       name: str) -> LoraAdapter:
    """Validate and load a PEFT LoRA adapter from the bytes of its two files."""
    config = _parse_config(config_bytes)
    plan = _plan(config, model, max_rank)
    _check_not_pickle(weights_bytes)
    found = _collect(read_safetensors(weights_bytes), model)

    use_dora = bool(config.get("use_dora", False))
    for (layer, module) in found:
        if (layer, module) not in plan:
            ab = min(found[(layer, module)])
            key = found[(layer, module)][ab][0]
            raise AdapterError(f"{key}: weights for {_module_name(layer, module)}, which target_modules "
                               "does not include", key)
    for (layer, module) in plan:
        if (layer, module) not in found:
            raise AdapterError(f"target_modules: includes {_module_name(layer, module)} but the weights have "
                               f"no {_lora_key(layer, module, 'A')}", "target_modules")

    modules: dict[tuple[int, str], ModuleLora] = {}
    for (layer, module), expect in plan.items():
        pair = found[(layer, module)]
        for ab in "AB":
            if ab not in pair:
                key = _lora_key(layer, module, ab)
                raise AdapterError(f"{key}: missing; {_module_name(layer, module)} has lora_"
                                   f"{'B' if ab == 'A' else 'A'} but no lora_{ab}", key)
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        out_f, in_f = model.module_shape(module)
        if a.dim() != 2 or a.shape[1] != in_f:
            raise AdapterError(f"{a_key}: shape {list(a.shape)} does not fit the base model; expected "
                               f"[r, {in_f}]", a_key)
        if b.dim() != 2 or b.shape[0] != out_f:
            raise AdapterError(f"{b_key}: shape {list(b.shape)} does not fit the base model; expected "
                               f"[{out_f}, r]", b_key)
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{b_key}: rank {b.shape[1]} differs from lora_A's rank {a.shape[0]}", b_key)
        if a.shape[0] != expect.r:
            raise AdapterError(f"{expect.r_field}: {_module_name(layer, module)} has rank {a.shape[0]} in the "
                               f"weights but the config says {expect.r}", expect.r_field)
        a, b = a.float(), b.float()
        checked = [(a_key, a), (b_key, b)]
        magnitude = None
        if "M" in pair and not use_dora:
            raise AdapterError(f"{pair['M'][0]}: a DoRA magnitude vector, but the config does not set "
                               "use_dora", pair["M"][0])
        if use_dora:
            if "M" not in pair:
                key = _lora_key(layer, module, "M")
                raise AdapterError(f"{key}: missing; use_dora needs a magnitude vector for every targeted "
                                   f"module", key)
            m_key, magnitude = pair["M"]
            if tuple(magnitude.shape) != (out_f,):
                raise AdapterError(f"{m_key}: shape {list(magnitude.shape)} does not fit the base model; "
                                   f"expected [{out_f}]", m_key)
            magnitude = magnitude.float()
            checked.append((m_key, magnitude))
        for key, t in checked:
            if not torch.isfinite(t).all():
                raise AdapterError(f"{key}: contains NaN or infinite values", key)
        modules[(layer, module)] = ModuleLora(a=a, b=b, scale=expect.scale, magnitude=magnitude)

    return _adapter(name, config, modules, weights_bytes)


def _adapter(name: str, config: dict, modules: dict[tuple[int, str], ModuleLora],
             weights_bytes: bytes) -> LoraAdapter:
    digest = hashlib.sha256(weights_bytes)
    digest.update(_canonical(config))
    present = {m for _, m in modules}
    return LoraAdapter(
        name=name,
        rank=max(ml.rank for ml in modules.values()),
        lora_alpha=float(config.get("lora_alpha", 8)),
        target_modules=tuple(m for m in LORA_MODULES if m in present),
        modules=dict(sorted(modules.items(), key=lambda kv: (kv[0][0], LORA_MODULES.index(kv[0][1])))),
        config=config,
        digest=digest.hexdigest(),
        nbytes=module_bytes(modules),
    )


def module_bytes(modules: dict[tuple[int, str], ModuleLora]) -> int:
    """LoraAdapter.nbytes of these modules: their parameters at float32."""
    return 4 * sum(ml.a.numel() + ml.b.numel() + (0 if ml.magnitude is None else ml.magnitude.numel())
                   for ml in modules.values())


def _canonical(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_peft_adapter(path: str | os.PathLike, model: ModelConfig, max_rank: int,
                      name: str | None = None) -> LoraAdapter:
    """Load a PEFT adapter folder; `name` defaults to the folder's name."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}", "path")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{CONFIG_NAME}: missing from the adapter folder", CONFIG_NAME)
    if not weights_path.is_file():
        pickled = [n for n in PICKLE_WEIGHTS_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterError(
                f"{WEIGHTS_NAME}: missing; the folder has only {pickled[0]}, a pickled file, which is never "
                f"loaded. Only safetensors adapter weights are accepted (save with safe_serialization=True)",
                WEIGHTS_NAME)
        raise AdapterError(f"{WEIGHTS_NAME}: missing from the adapter folder", WEIGHTS_NAME)
    return parse_peft_adapter(config_path.read_bytes(), weights_path.read_bytes(), model, max_rank,
                              name if name is not None else folder.resolve().name)


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layers:
    """Stands in for ModelConfig where only the layer count is known (_plan reads nothing else)."""

    num_layers: int


def _describes(config: dict, adapter: LoraAdapter) -> bool:
    """Whether `config` yields exactly the adapter's modules, ranks and scales (peft_type etc. aside)."""
    # The base model is unknown here; _plan only needs its layer count.
    probe = _Layers(1 + max(layer for layer, _ in adapter.modules))
    try:
        plan = _plan(config, probe, max_rank=adapter.rank)
    except AdapterError:
        return False
    return set(plan) == set(adapter.modules) and all(
        plan[k].r == ml.rank and plan[k].scale == ml.scale for k, ml in adapter.modules.items()
    )


def _config_for(adapter: LoraAdapter) -> dict:
    """adapter.config if it describes the weights exactly, else an explicit per-module config."""
    base = {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    config = dict(adapter.config)
    config["peft_type"] = "LORA"
    if _describes(config, adapter):
        return config
    ranks = [ml.rank for ml in adapter.modules.values()]
    r = max(sorted(set(ranks)), key=ranks.count)  # the most common rank
    # PEFT computes alpha / r; for about 1 scale in 11, no float64 alpha gives the
    # scale back exactly, and the result is 1 ulp off (far below float32 weights).
    alphas = {k: ml.scale * ml.rank for k, ml in adapter.modules.items()}
    alpha_values = list(alphas.values())
    alpha = max(sorted(set(alpha_values)), key=alpha_values.count)
    config = {**base, "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
              "target_modules": [_module_name(*k) for k in adapter.modules],
              "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
              "rank_pattern": {re.escape(_module_name(*k)): ml.rank
                               for k, ml in adapter.modules.items() if ml.rank != r},
              "alpha_pattern": {re.escape(_module_name(*k)): a for k, a in alphas.items() if a != alpha}}
    return config


def peft_files(adapter: LoraAdapter) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes that peft loads as is (float32 weights).

    The adapter's own config is kept when it reproduces every module's rank and
    scale; otherwise (e.g. a merged adapter) the config lists each module by
    full name with per-module rank_pattern / alpha_pattern entries.
    """
    config = _config_for(adapter)
    config["use_dora"] = adapter.use_dora
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), ml in adapter.modules.items():
        tensors[_lora_key(layer, module, "A")] = ml.a.float().contiguous()
        tensors[_lora_key(layer, module, "B")] = ml.b.float().contiguous()
        if ml.magnitude is not None:
            tensors[_lora_key(layer, module, "M")] = ml.magnitude.float().contiguous()
    weights = _write_safetensors(tensors, {"format": "pt"})
    return json.dumps(config, indent=2, sort_keys=True).encode(), weights


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> None:
    """Write adapter_config.json + adapter_model.safetensors (see `peft_files`)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config_bytes, weights_bytes = peft_files(adapter)
    replace_synced(folder / WEIGHTS_NAME, weights_bytes)
    replace_synced(folder / CONFIG_NAME, config_bytes)


