"""adapters_store/peft_format.py against real PEFT adapters on a tiny random Llama.

Truth is PEFT itself: the A, B and scaling PEFT puts on each wrapped module
after get_peft_model / PeftModel.from_pretrained.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import struct

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

from loramux.server.config import LORA_MODULES, ModelConfig
from loramux.adapters_store.peft_format import (
    AdapterError,
    LoraAdapter,
    ModuleLora,
    load_peft_adapter,
    parse_peft_adapter,
    read_safetensors,
    save_peft_adapter,
)

ST = "adapter_model.safetensors"
MAX_RANK = 64


def hf_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def model_cfg() -> ModelConfig:
    return ModelConfig.from_hf(hf_config())


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config()).eval()


def make_peft(path, seed: int = 0, dtype: torch.dtype | None = None, **lora):
    """A PEFT adapter with random non-zero lora_B, saved into `path`; returns the PeftModel."""
    model = get_peft_model(base_model(), LoraConfig(**lora))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for ab in (module.lora_A, module.lora_B):
                    ab["default"].weight.normal_(0, 0.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return model


def peft_modules(model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (A, B, scaling) as PEFT holds them."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            m = re.fullmatch(r".*\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", name)
            out[(int(m[1]), m[3])] = (module.lora_A["default"].weight.detach().float(),
                                      module.lora_B["default"].weight.detach().float(),
                                      module.scaling["default"])
    return out


def assert_matches_peft(adapter: LoraAdapter, model, scale_rel: float = 0.0) -> None:
    expected = peft_modules(model)
    assert set(adapter.modules) == set(expected)
    for key, (a, b, scale) in expected.items():
        got = adapter.modules[key]
        assert got.a.dtype == got.b.dtype == torch.float32
        torch.testing.assert_close(got.a, a, rtol=0, atol=0)
        torch.testing.assert_close(got.b, b, rtol=0, atol=0)
        if scale_rel:
            assert got.scale == pytest.approx(scale, rel=scale_rel, abs=0), key
        else:
            assert got.scale == scale, key


# -- loading what PEFT wrote -------------------------------------------------

ALL = list(LORA_MODULES)
CASES = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all_linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "r16_attn": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL,
                     rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 16, "layers.0.mlp.up_proj": 2},
                     alpha_pattern={"v_proj": 32, "layers.0.self_attn.o_proj": 3, r"mlp\.gate_proj": 5.5}),
    "regex_target": dict(r=4, lora_alpha=4, target_modules=r".*\.layers\.1\.(self_attn\.[qv]|mlp\.down)_proj"),
    "suffix_target": dict(r=4, lora_alpha=8, target_modules=["self_attn.o_proj", "mlp.gate_proj"]),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "exclude": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_peft(tmp_path, model_cfg, case):
    model = make_peft(tmp_path / case, **CASES[case])
    adapter = load_peft_adapter(tmp_path / case, model_cfg, MAX_RANK)
    assert_matches_peft(adapter, model)
    assert adapter.name == case
    assert adapter.rank == max(m.a.shape[0] for m in adapter.modules.values())
    present = {m for _, m in adapter.modules}
    assert adapter.target_modules == tuple(m for m in LORA_MODULES if m in present)
    assert adapter.nbytes == 4 * sum(m.a.numel() + m.b.numel() for m in adapter.modules.values())
    assert adapter.lora_alpha == CASES[case]["lora_alpha"]
    assert adapter.config == json.loads((tmp_path / case / "adapter_config.json").read_text())


def test_patterns_case_has_mixed_ranks_and_scales(tmp_path, model_cfg):
    # Guards the test above: the pattern case must really exercise per-module r and alpha.
    make_peft(tmp_path, **CASES["patterns"])
    adapter = load_peft_adapter(tmp_path, model_cfg, MAX_RANK)
    assert {m.a.shape[0] for m in adapter.modules.values()} == {2, 4, 8, 16}
    assert len({m.scale for m in adapter.modules.values()}) >= 5
    assert adapter.modules[(0, "q_proj")].a.shape[0] == 8
    assert adapter.modules[(1, "down_proj")].a.shape[0] == 16
    assert adapter.modules[(0, "down_proj")].a.shape[0] == 4
    assert adapter.modules[(0, "o_proj")].scale == 3 / 4
    assert adapter.modules[(1, "o_proj")].scale == 8 / 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_become_float32(tmp_path, model_cfg, dtype):
    model = make_peft(tmp_path, dtype=dtype, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    assert {t.dtype for t in st_load((tmp_path / ST).read_bytes()).values()} == {dtype}
    assert_matches_peft(load_peft_adapter(tmp_path, model_cfg, MAX_RANK, name="half"), model)


def test_adapter_name_in_keys_is_accepted(tmp_path, model_cfg):
    model = make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    tensors = st_load((tmp_path / ST).read_bytes())
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    config = (tmp_path / "adapter_config.json").read_bytes()
    adapter = parse_peft_adapter(config, st_save(renamed), model_cfg, MAX_RANK, "renamed")
    assert_matches_peft(adapter, model)


def test_digest_covers_weights_and_config(tmp_path, model_cfg):
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config, weights = (tmp_path / "adapter_config.json").read_bytes(), (tmp_path / ST).read_bytes()
    d0 = parse_peft_adapter(config, weights, model_cfg, MAX_RANK, "x").digest
    assert len(d0) == 64 and d0 == parse_peft_adapter(config, weights, model_cfg, MAX_RANK, "y").digest
    cfg = json.loads(config)
    reordered = json.dumps(dict(reversed(list(cfg.items())))).encode()
    assert parse_peft_adapter(reordered, weights, model_cfg, MAX_RANK, "x").digest == d0
    cfg["lora_alpha"] = 9
    assert parse_peft_adapter(json.dumps(cfg).encode(), weights, model_cfg, MAX_RANK, "x").digest != d0
    tensors = st_load(weights)
    tensors[next(iter(tensors))][0, 0] += 1
    assert parse_peft_adapter(config, st_save(tensors), model_cfg, MAX_RANK, "x").digest != d0


# -- writing what PEFT reads -------------------------------------------------

@pytest.mark.parametrize("case", ["patterns", "rslora", "r4_qv"])
def test_round_trip_through_peft(tmp_path, model_cfg, case):
    original = make_peft(tmp_path / "in", **CASES[case])
    adapter = load_peft_adapter(tmp_path / "in", model_cfg, MAX_RANK)
    save_peft_adapter(adapter, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == adapter.config
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "out")
    assert_matches_peft(adapter, reloaded)
    again = load_peft_adapter(tmp_path / "out", model_cfg, MAX_RANK)
    assert_matches_peft(again, original)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits)


def test_round_trip_of_an_adapter_without_a_matching_config(tmp_path, model_cfg):
    # An adapter built in memory (as merging does): per-module ranks and scales
    # that no simple config describes, and an empty config.
    torch.manual_seed(3)
    modules = {}
    for (layer, module), (r, scale) in {(0, "q_proj"): (3, 0.7), (0, "down_proj"): (5, 1 / 3),
                                        (1, "v_proj"): (3, 2.0), (1, "up_proj"): (12, 0.1)}.items():
        out_f, in_f = model_cfg.module_shape(module)
        modules[(layer, module)] = ModuleLora(torch.randn(r, in_f), torch.randn(out_f, r), scale)
    adapter = LoraAdapter(name="merged", rank=12, lora_alpha=1.0, target_modules=("q_proj", "v_proj", "up_proj",
                          "down_proj"), modules=modules, config={}, digest="", nbytes=0)
    save_peft_adapter(adapter, tmp_path)
    # 0.7 = alpha / 3 has no exact float64 alpha: the written alpha is the nearest (1 ulp off).
    assert_matches_peft(adapter, PeftModel.from_pretrained(base_model(), tmp_path), scale_rel=1e-15)
    again = load_peft_adapter(tmp_path, model_cfg, MAX_RANK)
    assert set(again.modules) == set(modules)
    for key, m in modules.items():
        assert torch.equal(again.modules[key].a, m.a) and torch.equal(again.modules[key].b, m.b)
        assert again.modules[key].scale == pytest.approx(m.scale, rel=1e-15, abs=0)
    assert again.modules[(1, "v_proj")].scale == 2.0 and again.modules[(0, "down_proj")].scale == 1 / 3


# -- read_safetensors --------------------------------------------------------

def test_read_safetensors_agrees_with_the_library():
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 2).bfloat16(),
        "f64": torch.randn(1, 3, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    got = read_safetensors(st_save(tensors, metadata={"format": "pt"}))
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    got["f32"].add_(1)  # owns its memory: writable, no warning


def raw_st(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head) if header_len is None else header_len) + head + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_SAFETENSORS = {
    "short": b"\x01\x00\x00",
    "header_len_small": raw_st({}, b"", header_len=1),
    "header_len_huge": struct.pack("<Q", 200 * 2**20) + b"{}",
    "header_past_end": raw_st({}, b"", header_len=50),
    "not_utf8": struct.pack("<Q", 4) + b'{"\xff"',
    "not_json": struct.pack("<Q", 4) + b"{abc",
    "not_object": raw_st([], b""),
    "duplicate_key": struct.pack("<Q", 2 * len(json.dumps({"t": F32_2})) - 1)
    + b'{"t": ' + json.dumps(F32_2).encode() + b', "t": ' + json.dumps(F32_2).encode() + b"}" + bytes(8),
    "metadata_not_strings": raw_st({"__metadata__": {"a": 1}, "t": F32_2}, bytes(8)),
    "info_not_object": raw_st({"t": "x"}, b""),
    "info_extra_field": raw_st({"t": {**F32_2, "extra": 1}}, bytes(8)),
    "info_missing_offsets": raw_st({"t": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "dtype_unknown": raw_st({"t": {**F32_2, "dtype": "F8_E4M3"}}, bytes(8)),
    "shape_negative": raw_st({"t": {**F32_2, "shape": [-2]}}, bytes(8)),
    "shape_not_ints": raw_st({"t": {**F32_2, "shape": [2.0]}}, bytes(8)),
    "offsets_out_of_range": raw_st({"t": {**F32_2, "data_offsets": [0, 16]}}, bytes(8)),
    "offsets_reversed": raw_st({"t": {**F32_2, "data_offsets": [8, 0]}}, bytes(8)),
    "size_mismatch": raw_st({"t": {**F32_2, "shape": [3]}}, bytes(8)),
    "overlap": raw_st({"t": F32_2, "u": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)),
    "gap": raw_st({"t": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)),
    "trailing_bytes": raw_st({"t": F32_2}, bytes(12)),
}


def test_bad_safetensors_fixture_is_well_formed():
    # The duplicate-key case is hand-built; make sure its header length is right so it fails for the right reason.
    data = BAD_SAFETENSORS["duplicate_key"]
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8 + n - 1 : 8 + n] == b"}"
    assert read_safetensors(raw_st({"t": F32_2}, bytes(8)))["t"].shape == (2,)


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_read_safetensors_rejects(case):
    with pytest.raises(AdapterError) as e:
        read_safetensors(BAD_SAFETENSORS[case])
    assert e.value.field == ST and ST in str(e.value)


# -- rejections --------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """A valid r=4 q_proj,v_proj adapter as (config dict, tensors)."""
    path = tmp_path_factory.mktemp("good")
    make_peft(path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return json.loads((path / "adapter_config.json").read_text()), st_load((path / ST).read_bytes())


def key(layer: int, module: str, ab: str = "A") -> str:
    parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"


def rejected(model_cfg, config, tensors, field: str, max_rank: int = MAX_RANK,
             weights: bytes | None = None) -> AdapterError:
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    with pytest.raises(AdapterError) as e:
        parse_peft_adapter(config_bytes, st_save(tensors) if weights is None else weights, model_cfg, max_rank, "x")
    assert e.value.field == field
    assert field in str(e.value)
    assert "Traceback" not in str(e.value)
    return e.value


def test_good_fixture_loads(model_cfg, good):
    config, tensors = good
    adapter = parse_peft_adapter(json.dumps(config).encode(), st_save(tensors), model_cfg, MAX_RANK, "x")
    assert adapter.target_modules == ("q_proj", "v_proj") and len(adapter.modules) == 4


CONFIG_REJECTIONS = {
    "dora_not_bool": ({"use_dora": "yes"}, "use_dora", None),
    "dora_without_magnitudes": ({"use_dora": True}, "base_model.model.model.layers.0.self_attn.q_proj."
                                "lora_magnitude_vector", "magnitude"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save", None),
    "bias_all": ({"bias": "all"}, "bias", None),
    "bias_lora_only": ({"bias": "lora_only"}, "bias", None),
    "lora_bias": ({"lora_bias": True}, "lora_bias", None),
    "peft_type": ({"peft_type": "LOHA"}, "peft_type", None),
    "peft_type_missing": ({"peft_type": None}, "peft_type", None),
    "target_lm_head": ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "target_modules", "lm_head"),
    "target_embed": ({"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, "target_modules", "embed_tokens"),
    "target_foo": ({"target_modules": ["q_proj", "v_proj", "foo"]}, "target_modules", "foo"),
    "target_container": ({"target_modules": ["q_proj", "v_proj", "mlp"]}, "target_modules", "mlp"),
    "target_regex_lm_head": ({"target_modules": r".*(q_proj|v_proj|lm_head)"}, "target_modules", "lm_head"),
    "target_regex_nothing": ({"target_modules": "foo.*"}, "target_modules", None),
    "target_regex_invalid": ({"target_modules": "(q_proj"}, "target_modules", None),
    "target_not_covered": ({"target_modules": ["q_proj", "k_proj", "v_proj"]}, "target_modules", "k_proj"),
    "rank_mismatch_r": ({"r": 8}, "r", None),
    "rank_mismatch_pattern": ({"rank_pattern": {"v_proj": 2}}, "rank_pattern", None),
    "rank_zero": ({"r": 0}, "r", None),
    "rank_negative_pattern": ({"rank_pattern": {"q_proj": -1}}, "rank_pattern", None),
    "rank_not_int": ({"r": 4.5}, "r", None),
    "rank_pattern_bad_regex": ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern", None),
    "alpha_not_number": ({"lora_alpha": "8"}, "lora_alpha", None),
    "alpha_huge": ({"lora_alpha": 1e300}, "lora_alpha", "1024"),
    "alpha_inf": ({"lora_alpha": math.inf}, "adapter_config.json", "Infinity"),  # JSON has no inf
    "alpha_just_above_bound": ({"lora_alpha": 4 * 1024 + 1}, "lora_alpha", None),  # r=4
    "alpha_pattern_huge": ({"alpha_pattern": {"v_proj": -1e300}}, "alpha_pattern", None),
    "rslora_huge": ({"use_rslora": True, "lora_alpha": 2 * 1024 + 1}, "lora_alpha", "sqrt"),  # sqrt(4)=2
    # RE2 cannot express these (Python's re could, with backtracking): refused, naming the field
    "target_backreference": ({"target_modules": r"(q)_proj\1"}, "target_modules", "linear time"),
    "target_lookahead": ({"target_modules": r".*(?=q_proj)q_proj"}, "target_modules", "lookaround"),
    "rank_pattern_lookbehind": ({"rank_pattern": {"(?<=self_attn\\.)q_proj": 4}}, "rank_pattern", None),
    "exclude_backreference": ({"exclude_modules": r"(a)\1"}, "exclude_modules", None),
    "layers_pattern_lookahead": ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0],
                                  "layers_pattern": "(?!x)layers"}, "layers_pattern", None),
    "pattern_too_long": ({"target_modules": "q" * 5000}, "target_modules", "limit"),
    "target_regex_huge_repetition": ({"target_modules": "(a{1000}){1000}"}, "target_modules", None),
    "rslora_not_bool": ({"use_rslora": "yes"}, "use_rslora", None),
}


@pytest.mark.parametrize("case", list(CONFIG_REJECTIONS))
def test_config_rejections(model_cfg, good, case):
    changes, field, text = CONFIG_REJECTIONS[case]
    config, tensors = good
    err = rejected(model_cfg, {**config, **changes}, tensors, field)
    if text is not None:
        assert text in str(err)


def test_rank_above_max_rank(model_cfg, good):
    config, tensors = good
    err = rejected(model_cfg, config, tensors, "r", max_rank=2)
    assert "2" in str(err) and "4" in str(err)
    rejected(model_cfg, {**config, "rank_pattern": {"q_proj": 4}}, tensors, "rank_pattern", max_rank=3)


def test_scale_at_the_bound_is_accepted(model_cfg, good):
    config, tensors = good  # r=4: lora_alpha 4096 is scale 1024, the documented bound
    adapter = parse_peft_adapter(json.dumps({**config, "lora_alpha": 4096}).encode(), st_save(tensors), model_cfg,
                                 MAX_RANK, "x")
    assert {m.scale for m in adapter.modules.values()} == {1024.0}


@pytest.mark.parametrize("pattern", [r"model\.layers\.[0-9]\.(.*)*z", r"(.*)*(.*)*z", r"(a|aa)*(a|aa)*b"])
def test_catastrophic_backtracking_patterns_answer_at_once(model_cfg, good, pattern):
    """Patterns that take Python's re minutes (exponential backtracking) are
    matched by RE2 in linear time: they match nothing here, and say so."""
    import time

    config, tensors = good
    t0 = time.perf_counter()
    err = rejected(model_cfg, {**config, "target_modules": pattern}, tensors, "target_modules")
    assert "matches no module" in str(err)
    for field in ("rank_pattern", "alpha_pattern"):  # no key matches: the adapter loads with the defaults
        adapter = parse_peft_adapter(json.dumps({**config, field: {pattern: 4}}).encode(), st_save(tensors),
                                     model_cfg, MAX_RANK, "x")
        assert adapter.rank == 4
    assert time.perf_counter() - t0 < 30  # generous: Python's re needs far longer for the first alone


def test_deeply_nested_config(model_cfg, good):
    _, tensors = good
    deep = b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = rejected(model_cfg, deep, tensors, "adapter_config.json")
    assert "nested too deeply" in str(err)


def test_config_over_the_size_limit(model_cfg, good):
    config, tensors = good
    big = json.dumps({**config, "notes": "x" * 2**20}).encode()
    rejected(model_cfg, big, tensors, "adapter_config.json")


def test_zero_size_tensor_with_a_huge_dimension(model_cfg, good):
    config, tensors = good
    weights = raw_st({"t": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b"")
    err = rejected(model_cfg, config, tensors, ST, weights=weights)
    assert "invalid shape" in str(err)
    deep_header = struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000
    rejected(model_cfg, config, tensors, ST, weights=deep_header)


def test_malformed_config_json(model_cfg, good):
    _, tensors = good
    rejected(model_cfg, b'{"r": 4,', tensors, "adapter_config.json")
    rejected(model_cfg, b"[1, 2]", tensors, "adapter_config.json")
    rejected(model_cfg, b'{"r": 4, "r": 8}', tensors, "adapter_config.json")
    rejected(model_cfg, b"\xff\xfe", tensors, "adapter_config.json")


def test_weights_for_a_module_not_targeted(model_cfg, good):
    config, tensors = good
    rejected(model_cfg, {**config, "target_modules": ["q_proj"]}, tensors, key(0, "v_proj"))


@pytest.mark.parametrize("ab", ["A", "B"])
def test_missing_half_of_a_pair(model_cfg, good, ab):
    config, tensors = good
    tensors = {k: v for k, v in tensors.items() if k != key(1, "q_proj", ab)}
    err = rejected(model_cfg, config, tensors, key(1, "q_proj", ab))
    assert "missing" in str(err)


def test_layer_index_out_of_range(model_cfg, good):
    config, tensors = good
    moved = {k.replace("layers.1.", "layers.5."): v for k, v in tensors.items()}
    err = rejected(model_cfg, config, moved, key(5, "q_proj"))
    assert "out of range" in str(err)


@pytest.mark.parametrize("which", ["A_in", "B_out", "A_3d", "ranks_differ"])
def test_shapes_that_do_not_fit(model_cfg, good, which):
    config, tensors = good
    tensors = dict(tensors)
    a, b = key(0, "v_proj", "A"), key(0, "v_proj", "B")
    if which == "A_in":
        tensors[a], bad = torch.randn(4, 65), a
    elif which == "B_out":
        tensors[b], bad = torch.randn(33, 4), b
    elif which == "A_3d":
        tensors[a], bad = torch.randn(1, 4, 64), a
    else:
        tensors[b], bad = torch.randn(32, 5), b
    rejected(model_cfg, config, tensors, bad)


def test_rank_in_weights_differs_from_config(model_cfg, good):
    config, tensors = good
    tensors = dict(tensors)
    tensors[key(0, "q_proj", "A")] = torch.randn(6, 64)
    tensors[key(0, "q_proj", "B")] = torch.randn(64, 6)
    err = rejected(model_cfg, config, tensors, "r")
    assert "6" in str(err) and "4" in str(err)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values(model_cfg, good, value, dtype):
    config, tensors = good
    tensors = {k: v.to(dtype, copy=True) for k, v in tensors.items()}  # never the fixture itself
    tensors[key(1, "v_proj", "B")][3, 1] = value
    rejected(model_cfg, config, tensors, key(1, "v_proj", "B"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_unsupported_dtypes(model_cfg, good, dtype):
    config, tensors = good
    tensors = dict(tensors)
    tensors[key(0, "q_proj", "A")] = tensors[key(0, "q_proj", "A")].to(dtype)
    err = rejected(model_cfg, config, tensors, key(0, "q_proj", "A"))
    assert "F32" in str(err)


@pytest.mark.parametrize("bad", [
    "base_model.model.lm_head.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
    "base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
    "model.layers.0.self_attn.q_proj.lora_A.weight",
])
def test_unexpected_tensor_keys(model_cfg, good, bad):
    config, tensors = good
    rejected(model_cfg, config, {**tensors, bad: torch.zeros(4, 64)}, bad)


def test_same_weight_twice_under_two_key_spellings(model_cfg, good):
    config, tensors = good
    dup = key(0, "q_proj", "A").replace(".weight", ".default.weight")
    tensors = {**tensors, dup: tensors[key(0, "q_proj", "A")].clone()}
    with pytest.raises(AdapterError) as e:
        parse_peft_adapter(json.dumps(config).encode(), st_save(tensors), model_cfg, MAX_RANK, "x")
    assert e.value.field in (dup, key(0, "q_proj", "A"))
    assert "twice" in str(e.value) and dup in str(e.value) and key(0, "q_proj", "A") in str(e.value)


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch_zip"])
def test_pickled_weights_are_never_loaded(model_cfg, good, tmp_path, kind):
    config, tensors = good
    marker = tmp_path / "unpickled"
    if kind == "pickle":
        payload = pickle.dumps(_Boom(marker), protocol=2)
    else:
        buf = io.BytesIO()
        torch.save({"x": _Boom(marker)}, buf)
        payload = buf.getvalue()
    err = rejected(model_cfg, config, tensors, ST, weights=payload)
    assert "safetensors" in str(err) and "pickle" in str(err)
    assert not marker.exists()


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(model_cfg, good):
    """A header of 0x..80 bytes makes the file's first byte 0x80, like a pickle's
    (found by bench/soak.py: one of three SmolLM2 adapters was refused)."""
    config, tensors = good
    weights = st_save(tensors, metadata={"pad": ""})
    n = struct.unpack("<Q", weights[:8])[0]
    pad = (0x80 - n % 256) % 256 or 256
    weights = st_save(tensors, metadata={"pad": "x" * pad})
    while weights[0] != 0x80:  # safetensors pads its header to 8 bytes: nudge until the low byte is 0x80
        pad += 1
        weights = st_save(tensors, metadata={"pad": "x" * pad})
    adapter = parse_peft_adapter(json.dumps(config).encode(), weights, model_cfg, MAX_RANK, "x")
    assert len(adapter.modules) == 4


def test_folder_with_only_adapter_model_bin(model_cfg, good, tmp_path):
    config, _ = good
    marker = tmp_path / "unpickled"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(AdapterError) as e:
        load_peft_adapter(tmp_path, model_cfg, MAX_RANK)
    assert e.value.field == ST
    assert "adapter_model.bin" in str(e.value) and "only safetensors" in str(e.value).lower()
    assert not marker.exists()


def test_missing_files(model_cfg, good, tmp_path):
    config, tensors = good
    (tmp_path / ST).write_bytes(st_save(tensors))
    with pytest.raises(AdapterError) as e:
        load_peft_adapter(tmp_path, model_cfg, MAX_RANK)
    assert e.value.field == "adapter_config.json" and "adapter_config.json" in str(e.value)
    (tmp_path / ST).unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        load_peft_adapter(tmp_path, model_cfg, MAX_RANK)
    assert e.value.field == ST and ST in str(e.value)


def test_corrupt_safetensors_in_an_adapter(model_cfg, good):
    config, tensors = good
    data = bytearray(st_save(tensors))
    rejected(model_cfg, config, tensors, ST, weights=bytes(data[:-3]))  # truncated
    data[0:8] = struct.pack("<Q", len(data))
    rejected(model_cfg, config, tensors, ST, weights=bytes(data))  # header length past the end


# -- PEFT's module names agree with ours ---------------------------------------

def test_every_other_module_of_the_model_is_refused_as_a_target(model_cfg, good):
    """target_modules naming any non-LoRA-able module transformers builds is refused, each LoRA linear accepted."""
    config, tensors = good
    names = [n for n, _ in base_model().named_modules()]
    lora_names = [n for n in names if n.rsplit(".", 1)[-1] in LORA_MODULES]
    assert len(lora_names) == 7 * model_cfg.num_layers
    for name in names:
        if name in lora_names:
            continue
        with pytest.raises(AdapterError) as e:
            parse_peft_adapter(json.dumps({**config, "target_modules": f"{re.escape(name)}|.*[qv]_proj"}).encode(),
                               st_save(tensors), model_cfg, MAX_RANK, "x")
        assert e.value.field == "target_modules", name


# -- DoRA (use_dora): accepted with one magnitude vector per targeted module --

def mag_key(layer: int, module: str) -> str:
    return key(layer, module, "A").removesuffix(".lora_A.weight") + ".lora_magnitude_vector"


def test_dora_adapter_is_accepted_and_round_trips_through_peft(tmp_path, model_cfg):
    model = make_peft(tmp_path / "in", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    adapter = load_peft_adapter(tmp_path / "in", model_cfg, MAX_RANK)
    assert adapter.use_dora
    assert_matches_peft(adapter, model)
    for (layer, module), ml in adapter.modules.items():
        want = model.base_model.model.model.layers[layer]
        want = getattr(want.self_attn, module).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(ml.magnitude, want.detach(), atol=0, rtol=0)
    save_peft_adapter(adapter, tmp_path / "out")
    back = load_peft_adapter(tmp_path / "out", model_cfg, MAX_RANK)
    assert back.use_dora and json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"]
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "out").eval()
    for (layer, module), ml in back.modules.items():
        got = getattr(reloaded.base_model.model.model.layers[layer].self_attn, module)
        torch.testing.assert_close(got.lora_magnitude_vector["default"].weight.detach(), ml.magnitude)


def test_magnitude_without_use_dora(model_cfg, good):
    config, tensors = good
    bad = mag_key(0, "q_proj")
    rejected(model_cfg, config, {**tensors, bad: torch.ones(64)}, bad)


@pytest.mark.parametrize("shape", [(32,), (64, 1), (65,)])
def test_magnitude_of_the_wrong_shape(model_cfg, good, shape):
    config, tensors = good
    mags = {mag_key(i, m): torch.ones(model_cfg.module_shape(m)[0]) for i in range(2) for m in ("q_proj", "v_proj")}
    mags[mag_key(1, "q_proj")] = torch.ones(shape)
    rejected(model_cfg, {**config, "use_dora": True}, {**tensors, **mags}, mag_key(1, "q_proj"))


def test_non_finite_magnitude(model_cfg, good):
    config, tensors = good
    mags = {mag_key(i, m): torch.ones(model_cfg.module_shape(m)[0]) for i in range(2) for m in ("q_proj", "v_proj")}
    mags[mag_key(0, "v_proj")][3] = float("nan")
    rejected(model_cfg, {**config, "use_dora": True}, {**tensors, **mags}, mag_key(0, "v_proj"))
