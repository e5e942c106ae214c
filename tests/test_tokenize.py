"""vLLM's POST /tokenize and /detokenize against a real `loramux serve`: the
ids are the tokenizer's own (transformers, same folder), the counts are the
ones generation uses, and bad input gets the documented 4xx."""
from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoTokenizer

from helpers.live_server import BASE, assert_error, assert_serving, make_api_files, serve_with_adapters

PROMPT = "The quick brown fox jumps"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_api_files(tmp_path_factory.mktemp("tokenize"))


@pytest.fixture(scope="module")
def server(files):
    s = serve_with_adapters(files / "base", files / "store", {"a1": files / "allowed" / "a1"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(files):
    return AutoTokenizer.from_pretrained(files / "base")


def tokenize(server, **body):
    r = server.http.post("/tokenize", json={"model": BASE, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_ids_are_the_tokenizers_and_the_count_generation_uses(server, tok, files):
    out = tokenize(server, prompt=PROMPT, return_token_strs=True)
    assert out["tokens"] == tok.encode(PROMPT) and out["count"] == len(out["tokens"])
    assert out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    assert out["max_model_len"] == AutoConfig.from_pretrained(files / "base").max_position_embeddings
    # SmolLM2's tokenizer adds no BOS, so add_special_tokens changes nothing here; the ids
    # must still be the tokenizer's own for either value
    plain = tokenize(server, prompt=PROMPT, add_special_tokens=False)
    assert plain["tokens"] == tok.encode(PROMPT, add_special_tokens=False) and plain["token_strs"] is None
    used = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    assert used == len(tok.encode(PROMPT))  # what /tokenize says the completion costs


def test_messages_go_through_the_chat_template(server, tok):
    out = tokenize(server, messages=MESSAGES)
    want = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert out["tokens"] == want
    bare = tokenize(server, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert bare != want and want[:len(bare)] == bare  # the generation prompt is a suffix
    used = server.openai.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert used == out["count"]
    special = tokenize(server, messages=MESSAGES, add_special_tokens=True)["tokens"]
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert special == tok.encode(text, add_special_tokens=True)


def test_detokenize_inverts_tokenize_and_adapters_share_the_tokenizer(server, tok):
    ids = tokenize(server, prompt=PROMPT, add_special_tokens=False)["tokens"]
    r = server.http.post("/detokenize", json={"model": "a1", "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tok.decode(ids)} and tok.decode(ids) == PROMPT
    assert tokenize(server, model="a1", prompt=PROMPT)["tokens"] == tok.encode(PROMPT)
    assert server.http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_bad_input_is_refused_and_the_server_goes_on(server, path, body, status, param):
    assert_error(server.http.post(path, json=body), status, param)
    assert_serving(server)


def test_the_api_key_is_required(server):
    import httpx

    r = httpx.post(server.url + "/tokenize", json={"prompt": "x"})
    assert r.status_code == 401
