"""The HTTP server end to end: a real `loramux serve` process on 127.0.0.1,
driven by the official openai client and httpx, on a tiny random Llama that
speaks through the default model's tokenizer and chat template."""
from __future__ import annotations

import asyncio
import io
import json
import tarfile
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers.live_server import BASE, KEY, UPLOAD_CAP, Server, assert_error, assert_serving, make_api_files, \
    post_endless_multipart, upload, upload_dir, wait_for


# ---------------------------------------------------------------------------
# fixtures: one tiny model, two adapters, one server for most tests
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_api_files(tmp_path_factory.mktemp("api"))
    return root


@pytest.fixture(scope="module")
def server(files):
    s = Server(files / "base", files / "store", "--allowed-adapter-root", str(files / "allowed"),
               "--max-upload-bytes", str(UPLOAD_CAP))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def adapters(server, files):
    for name in ("a1", "a2"):
        r = upload_dir(server.http, name, files / "allowed" / name)
        assert r.status_code == 201, r.text
    return ["a1", "a2"]


@pytest.fixture(scope="module")
def offline(files):
    from loramux.server.llm import LLM

    return LLM(model=str(files / "base"), dtype="float32",
               adapters={n: files / "allowed" / n for n in ("a1", "a2")})


def greedy(max_tokens=8):
    from loramux.server.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


# ---------------------------------------------------------------------------
# completions and chat
# ---------------------------------------------------------------------------

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say something nice."}]


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_greedy_completion_equals_offline_llm(server, adapters, offline, model):
    got = server.openai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    want = offline.generate([PROMPT], greedy(), [None if model == BASE else model])[0]
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert got.model == model


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_greedy_chat_equals_offline_llm(server, adapters, offline, model):
    got = server.openai.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    want = offline.chat([CHAT], greedy(), [None if model == BASE else model])[0]
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(offline.encode_chat(CHAT))


def test_adapters_change_the_output(server, adapters):
    texts = {m: server.openai.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
             .choices[0].text for m in (BASE, *adapters)}
    assert len(set(texts.values())) == 3


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_streamed_text_equals_non_streamed_for_a_seed(server, adapters, model):
    opts = dict(model=model, max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    whole = server.openai.completions.create(prompt=PROMPT, **opts)
    parts = list(server.openai.completions.create(prompt=PROMPT, stream=True,
                                                  stream_options={"include_usage": True}, **opts))
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole.choices[0].text
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in parts if c.choices][-1] == whole.choices[0].finish_reason

    whole = server.openai.chat.completions.create(messages=CHAT, **opts)
    chunks = list(server.openai.chat.completions.create(messages=CHAT, stream=True,
                                                        stream_options={"include_usage": True}, **opts))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sse_ends_with_done(server):
    with server.http.stream("POST", "/v1/completions", json={
            "model": BASE, "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_prompt_forms_and_n(server, offline):
    ids = [offline.tokenizer.encode(PROMPT), offline.tokenizer.encode("Hello there")]
    want = [c.text for c in offline.generate(ids, greedy(4))]
    for prompt in (ids, ["The quick brown fox", "Hello there"]):
        got = server.openai.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    single = server.openai.completions.create(model=BASE, prompt=ids[0], max_tokens=4, temperature=0)
    assert single.choices[0].text == want[0]
    # choice k of each prompt samples with seed 5 + k: what a single request with that seed makes
    many = server.openai.completions.create(model=BASE, prompt=["a b", "c d"], n=3, max_tokens=4,
                                            temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    texts = {c.index: c.text for c in many.choices}
    assert sorted(texts) == list(range(6)) and many.usage.completion_tokens == 24
    for p, prompt in enumerate(["a b", "c d"]):
        choices = [texts[3 * p + k] for k in range(3)]
        assert len(set(choices)) == 3, choices
        for k in range(3):
            one = server.openai.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=1.0,
                                                   seed=5 + k, extra_body={"ignore_eos": True})
            assert one.choices[0].text == choices[k], (p, k)
    chat = server.openai.chat.completions.create(model=BASE, messages=CHAT, n=2, max_tokens=3, seed=3)
    replies = [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]
    assert len(replies) == 2 and replies[0] != replies[1]
    for k in range(2):
        one = server.openai.chat.completions.create(model=BASE, messages=CHAT, max_tokens=3, seed=3 + k)
        assert one.choices[0].message.content == replies[k]


def test_top_k_samples_only_among_the_k_most_likely(server, offline):
    from loramux.server.engine.sampling import SamplingParams

    # temperature 2 flattens the random model's distribution: without top_k, almost no
    # sampled token would be among the 5 most likely
    r = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=2.0, seed=7,
                                         logprobs=5, extra_body={"top_k": 5, "ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 and all(token in top for token, top in zip(lp.tokens, lp.top_logprobs))
    want = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=2.0, seed=7, top_k=5,
                                                     ignore_eos=True, logprobs=5))[0]
    assert all(token in [t for t, _ in top] for token, _, top in want.logprobs)
    assert r.choices[0].text == want.text


def test_min_tokens_holds_back_the_stop_tokens(server, offline):
    from loramux.server.engine.sampling import SamplingParams

    free = offline.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert free[1] != free[0]
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop_token_ids": [free[1]]}
    early = server.http.post("/v1/completions", json=body).json()
    assert early["choices"][0]["finish_reason"] == "stop" and early["usage"]["completion_tokens"] <= 2
    held = server.http.post("/v1/completions", json={**body, "min_tokens": 6}).json()
    want = offline.generate([PROMPT], SamplingParams(max_tokens=8, stop_token_ids=(free[1],), min_tokens=6))[0]
    assert held["usage"]["completion_tokens"] == len(want.token_ids) >= 6
    assert held["choices"][0]["text"] == want.text and free[1] not in want.token_ids[:6]


def test_logprobs_equal_the_offline_llm(server, offline):
    from loramux.server.engine.sampling import SamplingParams

    def text(token):
        return offline.tokenizer.decode([token])

    r = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    want = offline.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2))[0]
    lp = r.choices[0].logprobs
    assert lp.tokens == [text(t) for t, _, _ in want.logprobs] and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in want.logprobs], abs=1e-5)
    assert lp.top_logprobs == [pytest.approx({text(t): v for t, v in top}, abs=1e-5) for _, _, top in want.logprobs]
    assert all(len(top) == 2 for top in lp.top_logprobs)

    c = server.openai.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3)
    want = offline.chat([CHAT], SamplingParams(max_tokens=4, logprobs=3))[0]
    content = c.choices[0].logprobs.content
    assert len(content) == len(want.logprobs) == 4
    for got, (token, logprob, top) in zip(content, want.logprobs):
        assert got.token == text(token) and got.logprob == pytest.approx(logprob, abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [text(t) for t, _ in top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
        assert got.top_logprobs[0].logprob >= got.logprob  # greedy: the most likely token


def test_stop_string_truncates_the_text_before_it(server):
    full = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=30, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:6]
    s = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert s.choices[0].text == full[:full.index(stop)] and s.choices[0].finish_reason == "stop"


def test_streamed_choices_and_logprobs_reassemble_to_the_non_streamed(server, adapters):
    opts = dict(model="a1", prompt=PROMPT, n=3, max_tokens=6, temperature=0.9, seed=21, logprobs=2,
                extra_body={"ignore_eos": True})
    whole = server.openai.completions.create(**opts)
    text, tokens, logprobs, tops = {}, {}, {}, {}
    for chunk in server.openai.completions.create(stream=True, **opts):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.logprobs is not None:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
                logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
                tops.setdefault(c.index, []).extend(c.logprobs.top_logprobs)
    assert sorted(text) == [0, 1, 2] and len(set(text.values())) == 3
    for c in whole.choices:
        assert text[c.index] == c.text
        assert tokens[c.index] == c.logprobs.tokens and logprobs[c.index] == c.logprobs.token_logprobs
        assert tops[c.index] == c.logprobs.top_logprobs

    chat = dict(model="a2", messages=CHAT, n=2, max_tokens=5, temperature=0.9, seed=4, logprobs=True,
                top_logprobs=2)
    whole = server.openai.chat.completions.create(**chat)
    content, entries = {}, {}
    for chunk in server.openai.chat.completions.create(stream=True, **chat):
        for c in chunk.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            if c.logprobs is not None:
                entries.setdefault(c.index, []).extend(c.logprobs.content)
    assert sorted(content) == [0, 1]
    for c in whole.choices:
        assert content[c.index] == c.message.content
        assert [e.model_dump() for e in entries[c.index]] == [e.model_dump() for e in c.logprobs.content]


def test_models_lists_base_and_adapters(server, adapters):
    models = {m.id: m for m in server.openai.models.list().data}
    assert BASE in models and set(adapters) <= set(models)
    for name in adapters:
        assert models[name].model_extra["parent"] == BASE
    assert models[BASE].model_extra["parent"] is None


# ---------------------------------------------------------------------------
# adapter management
# ---------------------------------------------------------------------------

def test_upload_list_use_delete(server, adapters, files):
    folder = files / "allowed" / "a1"
    r = upload_dir(server.http, "temp-1", folder)
    assert r.status_code == 201
    info = r.json()
    assert info["name"] == "temp-1" and info["rank"] == 8 and info["lora_alpha"] == 16
    assert info["size_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    assert len(info["sha256"]) == 64 and "q_proj" in info["target_modules"]
    assert (files / "store" / "temp-1" / "meta.json").exists()
    assert "temp-1" in [a["name"] for a in server.http.get("/v1/adapters").json()["data"]]
    assert server.http.get("/v1/adapters/temp-1").json()["sha256"] == info["sha256"]
    out = server.openai.completions.create(model="temp-1", prompt=PROMPT, max_tokens=4, temperature=0)
    want = server.openai.completions.create(model="a1", prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].text == want.choices[0].text  # a1's files under another name
    assert server.http.delete("/v1/adapters/temp-1").status_code == 200
    assert not (files / "store" / "temp-1").exists()
    assert_error(server.http.get("/v1/adapters/temp-1"), 404)
    assert_error(server.http.post("/v1/completions", json={"model": "temp-1", "prompt": "x"}), 404, "model")
    assert_error(server.http.delete("/v1/adapters/temp-1"), 404)
    assert_serving(server)


def test_uploaded_dora_adapter_equals_offline_llm(server, files, offline):
    from helpers.tiny import make_dora_adapter

    folder = make_dora_adapter(files / "base", files / "dora-src" / "d1", r=4, alpha=8, seed=3,
                               target_modules=("q_proj", "v_proj", "down_proj"))
    r = upload_dir(server.http, "d1", folder)
    assert r.status_code == 201, r.text
    offline.register_adapter("d1", folder)
    got = server.openai.completions.create(model="d1", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                           extra_body={"ignore_eos": True})
    from loramux.server.engine.sampling import SamplingParams

    want = offline.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1), ["d1"])[0]
    assert got.choices[0].text == want.text
    assert got.choices[0].logprobs.token_logprobs == pytest.approx([v for _, v, _ in want.logprobs], abs=1e-4)
    base = offline.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert want.text != base.text  # the DoRA adapter changes the output
    assert server.http.delete("/v1/adapters/d1").status_code == 200


def test_deleting_an_adapter_mid_stream(server, adapters, files, offline):
    """The stream in flight finishes with the deleted adapter's weights; new requests
    get 404 and its files are gone at once; other adapters still download and serve."""
    from helpers.tiny import make_adapter
    from loramux.server.engine.sampling import SamplingParams

    folder = make_adapter(files / "base", files / "doomed-src" / "doomed", r=8, alpha=16, seed=7)
    assert upload_dir(server.http, "doomed", folder).status_code == 201
    offline.register_adapter("doomed", folder)
    want = offline.generate([PROMPT], SamplingParams(max_tokens=120, ignore_eos=True, logprobs=0), ["doomed"])[0]
    body = {"model": "doomed", "prompt": PROMPT, "stream": True, "max_tokens": 120, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}
    text, logprobs = [], []
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: {"))
        for line in lines:
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            logprobs += choice["logprobs"]["token_logprobs"]
            if len(logprobs) == 1:  # generating: delete it now
                assert server.http.delete("/v1/adapters/doomed").status_code == 200
                assert not (files / "store" / "doomed").exists()
                assert_error(server.http.post("/v1/completions", json={**body, "stream": False}), 404, "model")
                assert_error(server.http.get("/v1/adapters/doomed/download"), 404)
                other = tarfile.open(fileobj=io.BytesIO(server.http.get("/v1/adapters/a2/download").content))
                assert other.extractfile("a2/adapter_model.safetensors").read() == \
                    (files / "allowed" / "a2" / "adapter_model.safetensors").read_bytes()
    assert choice["finish_reason"] == "length" and "".join(text) == want.text
    assert logprobs == pytest.approx([v for _, v, _ in want.logprobs], abs=1e-4)
    assert_serving(server)


def test_vllm_load_and_unload(server, adapters, files):
    r = server.http.post("/v1/load_lora_adapter",
                         json={"lora_name": "by-path", "lora_path": str(files / "allowed" / "a2")})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "path" and r.json()["rank"] == 4
    a = server.openai.completions.create(model="by-path", prompt=PROMPT, max_tokens=4, temperature=0)
    b = server.openai.completions.create(model="a2", prompt=PROMPT, max_tokens=4, temperature=0)
    assert a.choices[0].text == b.choices[0].text  # same weights as the uploaded a2
    assert server.http.post("/v1/unload_lora_adapter", json={"lora_name": "by-path"}).status_code == 200
    assert_error(server.http.post("/v1/unload_lora_adapter", json={"lora_name": "by-path"}), 404)
    # only under the allowed roots, traversal included
    for path in (files / "base", files / "allowed" / ".." / "base", Path("/etc")):
        err = assert_error(server.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)}),
                           403, "lora_path")
        assert err["code"] == "path_not_allowed"
    assert_error(server.http.post("/v1/load_lora_adapter",
                                  json={"lora_name": "x", "lora_path": str(files / "allowed" / "missing")}), 422)
    assert_serving(server)


# ---------------------------------------------------------------------------
# errors, each followed by a request that works
# ---------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -2}, "top_k"),
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, None),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, None),
    ({"prompt": "x " * 300, "max_tokens": 300}, "max_tokens"),
    ({"max_tokens": 600}, "max_tokens"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"prompt": [1, 2, 49152]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": 12}, None),
    ({"presence_penalty": 0.5}, None),
    ({"guided_json": "{"}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),  # refused by the grammar compiler, not the schema
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objec"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, None),
    ({"guided_choice": []}, "guided_choice"),
    ({"stream_options": {"include_usage": True}}, None),
]


@pytest.mark.parametrize("change,param", BAD_COMPLETIONS, ids=[json.dumps(c)[:40] for c, _ in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(server, change, param):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 4, **change}
    err = assert_error(server.http.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param), err
    assert_serving(server)


def test_bad_chat_and_bodies_are_400(server):
    cases = [
        {"model": BASE, "messages": []},
        {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": BASE, "messages": CHAT, "top_logprobs": 3},
        {"model": BASE, "messages": CHAT, "max_completion_tokens": 0},
        {"messages": CHAT},
    ]
    for body in cases:
        assert_error(server.http.post("/v1/chat/completions", json=body), 400)
    assert_error(server.http.post("/v1/completions", content=b"{not json",
                                  headers={"content-type": "application/json"}), 400)
    with pytest.raises(openai.BadRequestError) as e:
        server.openai.chat.completions.create(model=BASE, messages=CHAT, temperature=9)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert_serving(server)


def test_api_key_is_required_except_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/adapters"),
                             ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/a1")):
            err = assert_error(httpx.request(method, server.url + path, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert_serving(server)


def test_unknown_model_is_404(server):
    err = assert_error(server.http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.openai.chat.completions.create(model="nope", messages=CHAT)
    assert_error(server.http.get("/v1/adapters/nope"), 404)
    assert_error(server.http.get("/v1/no-such-route"), 404)
    assert_serving(server)


def test_duplicate_adapter_is_409(server, adapters, files):
    err = assert_error(upload_dir(server.http, "a1", files / "allowed" / "a2"), 409, "name")
    assert err["code"] == "adapter_exists"
    assert_error(upload_dir(server.http, BASE, files / "allowed" / "a2"), 409)
    assert_error(server.http.post("/v1/load_lora_adapter",
                                  json={"lora_name": "a2", "lora_path": str(files / "allowed" / "a2")}), 409)
    assert server.http.get("/v1/adapters/a1").json()["rank"] == 8  # unchanged
    assert_serving(server)


def test_oversized_upload_is_413_while_streaming(server, files):
    config = (files / "allowed" / "a1" / "adapter_config.json").read_bytes()
    big = bytes(UPLOAD_CAP + 1)
    err = assert_error(upload(server.http, "big", config, big), 413)
    assert err["code"] == "upload_too_large"
    # No Content-Length, and the body never ends: the server can only answer
    # if it counts the bytes as they arrive.
    boundary = "xYz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
    status, body = post_endless_multipart(server.port, "/v1/adapters", boundary, head,
                                          [bytes(64 * 1024)] * (UPLOAD_CAP // (64 * 1024) + 2), timeout=10)
    assert status == 413 and body["error"]["code"] == "upload_too_large"
    assert not any(p.name.startswith(".tmp") or p.name == "big" for p in (files / "store").iterdir())
    assert_serving(server)


def _adapter_bytes(files, name="a2"):
    folder = files / "allowed" / name
    return json.loads((folder / "adapter_config.json").read_text()), (folder / "adapter_model.safetensors").read_bytes()


def _raw_st(header_text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def bad_adapters(files) -> dict[str, tuple[bytes, bytes]]:
    config, weights = _adapter_bytes(files)
    tensors = st_load(weights)
    cfg = json.dumps(config).encode()
    first = sorted(tensors)[0]
    f32 = json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}).encode()
    return {
        "rank_in_config_differs": (json.dumps({**config, "r": 8}).encode(), weights),
        "target_not_in_weights": (json.dumps({**config, "target_modules": ["q_proj", "v_proj", "o_proj"]}).encode(),
                                  weights),
        "unsupported_dora": (json.dumps({**config, "use_dora": True}).encode(), weights),
        "config_not_json": (b"{r: 4", weights),
        "config_duplicate_key": (b'{"r": 4, "r": 8}', weights),
        "missing_half_of_pair": (cfg, st_save({k: v for k, v in tensors.items() if k != first})),
        "extra_key": (cfg, st_save({**tensors, "base_model.model.lm_head.weight": tensors[first].clone()})),
        "wrong_shape": (cfg, st_save({**tensors, first: tensors[first][:, :32].contiguous()})),
        "non_finite": (cfg, st_save({**tensors, first: tensors[first] * float("inf")})),
        "header_length_huge": (cfg, struct.pack("<Q", 2**40) + b"{}"),
        "header_not_json": (cfg, _raw_st(b"{abc")),
        "header_duplicate_keys": (cfg, _raw_st(b'{"t": ' + f32 + b', "t": ' + f32 + b"}", bytes(8))),
        "pickle": (cfg, b"\x80\x04\x95" + bytes(64)),
        "zip": (cfg, b"PK\x03\x04" + bytes(64)),
        "empty_weights": (cfg, b""),
    }


def test_bad_adapters_are_422(server, files):
    for case, (config, weights) in bad_adapters(files).items():
        err = assert_error(upload(server.http, f"bad-{case}", config, weights), 422)
        assert err["code"] == "invalid_adapter", (case, err)
        assert_error(server.http.get(f"/v1/adapters/bad-{case}"), 404)
    leftovers = [p.name for p in (files / "store").iterdir() if p.name.startswith("bad-") or p.name.startswith(".tmp")]
    assert leftovers == []
    assert_serving(server)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", "x" * 201, "", "sp ace", "é", ".tmp-x",
                                  "__pycache__", "_x", ".hidden", "-rf"])
def test_bad_adapter_names_are_422(server, files, name):
    config, weights = _adapter_bytes(files)
    err = assert_error(upload(server.http, name, json.dumps(config).encode(), weights), 422, "name")
    assert err["code"] == "invalid_adapter_name"
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(files / "allowed" / "a2")})
    assert_error(r, 422, "name")
    assert sorted(p.name for p in (files / "store").iterdir() if not p.name.startswith("a")) == []
    assert_serving(server)


def test_upload_missing_parts_is_400(server, files):
    config, weights = _adapter_bytes(files)
    r = server.http.post("/v1/adapters", data={"name": "half"},
                         files={"adapter_config.json": ("adapter_config.json", json.dumps(config).encode())})
    assert_error(r, 400, "adapter_model.safetensors")
    r = server.http.post("/v1/adapters", files={"adapter_model.safetensors": ("adapter_model.safetensors", weights),
                                                "adapter_config.json": ("adapter_config.json", b"{}")})
    assert_error(r, 400, "name")
    r = server.http.post("/v1/adapters", data={"name": "p"},
                         files={"adapter_config.json": ("adapter_config.json", json.dumps(config).encode()),
                                "adapter_model.bin": ("adapter_model.bin", b"\x80\x04")})
    assert_error(r, 422)
    assert_error(server.http.post("/v1/adapters", json={"name": "x"}), 400)
    assert_serving(server)


# ---------------------------------------------------------------------------
# disconnects, metrics
# ---------------------------------------------------------------------------

def idle(server) -> bool:
    m = server.metrics()
    return m["loramux:num_requests_running"] == 0 and m["loramux:kv_cache_usage_perc"] == 0


LONG = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}


def test_closing_the_stream_frees_the_kv_blocks(server):
    assert wait_for(lambda: idle(server))
    aborts = server.metrics()['loramux:request_success_total{finished_reason="abort"}']
    with server.http.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "hi", "stream": True,
                                                              **LONG}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        m = server.metrics()
        assert m["loramux:num_requests_running"] == 1 and m["loramux:kv_cache_usage_perc"] > 0
    t0 = time.monotonic()
    assert wait_for(lambda: idle(server))
    m = server.metrics()
    assert m['loramux:request_success_total{finished_reason="abort"}'] == aborts + 1
    assert m["loramux:generation_tokens_total"] >= 3
    assert time.monotonic() - t0 < 5
    assert_serving(server)


def test_client_timeout_aborts_a_non_streaming_request(server):
    assert wait_for(lambda: idle(server))
    gen0 = server.metrics()["loramux:generation_tokens_total"]
    # LONG takes the tiny model about half a second here (1 ms a token): the client gives up well before
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json={"model": BASE, "prompt": "hi", **LONG}, timeout=0.1)
    assert wait_for(lambda: idle(server))
    assert server.metrics()["loramux:generation_tokens_total"] - gen0 < 470
    assert_serving(server)


def test_metrics_parse_and_counters_move(server, adapters):
    before = server.metrics()
    r = server.openai.completions.create(model="a1", prompt=PROMPT, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert wait_for(lambda: server.metrics()["loramux:generation_tokens_total"]
                    >= before["loramux:generation_tokens_total"] + 5)
    after = server.metrics()
    length = 'loramux:request_success_total{finished_reason="length"}'
    assert after[length] == before[length] + 1
    assert after["loramux:prompt_tokens_total"] == before["loramux:prompt_tokens_total"] + r.usage.prompt_tokens
    adapter_tokens = 'loramux:adapter_generation_tokens_total{adapter="a1"}'
    assert after[adapter_tokens] == before.get(adapter_tokens, 0) + 5
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "inter_token_latency_seconds"):
        assert after[f"loramux:{name}_count"] > before.get(f"loramux:{name}_count", 0), name
    assert after['loramux:adapter_pool_resident_adapters{tier="device"}'] >= 1
    assert after['loramux:adapter_pool_loads_total{tier="device"}'] >= 1
    assert after['loramux:adapter_pool_resident_bytes{tier="device"}'] > 0
    for name in ("num_requests_waiting", "num_preemptions_total"):
        assert f"loramux:{name}" in after


# ---------------------------------------------------------------------------
# in process (httpx.ASGITransport): a stalled engine loop, a pool too small
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def in_process(files):
    from loramux.adapters_store.store import AdapterStore
    from loramux.server.api.app import create_app
    from loramux.server.api.state import ServerSettings, ServerState
    from loramux.server.config import EngineConfig
    from loramux.server.engine.engine import Engine
    from loramux.server.llm import load_base

    net, tokenizer, folder = load_base(str(files / "base"), "float32", "cpu")
    state = ServerState.assemble(
        Engine(net, tokenizer, EngineConfig(kv_cache_bytes=8 * 2**20, adapter_pool_bytes=4 * 2**20)),
        AdapterStore(files / "in-process-store"), ServerSettings(BASE, str(folder), health_timeout_s=0.5))
    yield create_app(state), state
    state.engine.shutdown()


def run_async(app, scenario):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await scenario(client)

    return asyncio.run(main())


async def poll(client, path, status, timeout=10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(path)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.05)


def test_health_is_503_while_the_engine_loop_stalls(in_process):
    app, state = in_process
    release = threading.Event()

    async def scenario(client):
        assert (await client.get("/health")).status_code == 200
        # a call that holds the engine thread: no step, no progress, until released
        stall = asyncio.ensure_future(state.engine.call(lambda e: release.wait(30)))
        try:
            stalled = await poll(client, "/health", 503)
        finally:
            release.set()
        assert await stall is True
        return stalled, await poll(client, "/health", 200)

    stalled, recovered = run_async(app, scenario)
    assert assert_error(stalled, 503)["code"] == "engine_stalled"
    assert recovered.status_code == 200
