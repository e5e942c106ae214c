"""The HTTP server end to end: a real `loramux serve` process on 127.0.0.1,
driven by the official openai client and httpx, on a tiny random Llama that
speaks through the default model's tokenizer and chat template."""
from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers.live_server import BASE, KEY, UPLOAD_CAP, Server, assert_error, assert_serving, make_api_files, upload, upload_dir


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
    many = server.openai.completions.create(model=BASE, prompt=["a b", "c d"], n=3, max_tokens=4,
                                            temperature=1.0, seed=5)
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert many.usage.completion_tokens == 24
    chat = server.openai.chat.completions.create(model=BASE, messages=CHAT, n=2, max_tokens=3, seed=3)
    assert len(chat.choices) == 2


def test_sampling_extensions_and_logprobs(server):
    r = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                         extra_body={"top_k": 5, "min_tokens": 6, "ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 6 and len(lp.tokens) == 6 and len(lp.token_logprobs) == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs) and "".join(lp.tokens) == r.choices[0].text
    c = server.openai.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    stopped = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=30, temperature=0,
                                               extra_body={"ignore_eos": True})
    stop = stopped.choices[0].text[3:6]
    s = server.openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert stop not in s.choices[0].text and s.choices[0].finish_reason == "stop"


def test_models_lists_base_and_adapters(server, adapters):
    models = {m.id: m for m in server.openai.models.list().data}
    assert BASE in models and set(adapters) <= set(models)
    for name in adapters:
        assert models[name].model_extra["parent"] == BASE
    assert models[BASE].model_extra["parent"] is None


# ---------------------------------------------------------------------------
# adapter management
# ---------------------------------------------------------------------------

def test_upload_list_use_delete(server, files):
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
    assert out.choices[0].text
    assert server.http.delete("/v1/adapters/temp-1").status_code == 200
    assert not (files / "store" / "temp-1").exists()
    assert_error(server.http.get("/v1/adapters/temp-1"), 404)
    assert_error(server.http.post("/v1/completions", json={"model": "temp-1", "prompt": "x"}), 404, "model")
    assert_error(server.http.delete("/v1/adapters/temp-1"), 404)
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
    ({"echo": True}, None),
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
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        for chunk in [head] + [bytes(64 * 1024)] * (UPLOAD_CAP // (64 * 1024) + 2):
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            data = sock.recv(65536)
            assert data, reply
            reply += data
    head_text, body_bytes = reply.split(b"\r\n\r\n", 1)
    assert head_text.split()[1] == b"413", reply
    assert json.loads(body_bytes)["error"]["code"] == "upload_too_large"
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


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", "x" * 65, "", "sp ace", "é", ".tmp-x",
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

def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


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
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json={"model": BASE, "prompt": "hi", **LONG}, timeout=0.5)
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
# queue full and draining: a server with one sequence at a time
# ---------------------------------------------------------------------------

def test_queue_full_is_429_and_sigterm_drains(files, tmp_path):
    s = Server(files / "base", tmp_path / "store", "--max-num-seqs", "1", "--max-waiting", "1",
               "--drain-timeout", "30")
    streams = []
    try:
        def open_stream(max_tokens):
            cm = s.http.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "hi", "stream": True, **LONG, "max_tokens": max_tokens})
            r = cm.__enter__()
            streams.append(cm)
            return r

        first = open_stream(480)
        lines = first.iter_lines()
        next(lines)  # running
        threading.Thread(target=open_stream, args=(4,), daemon=True).start()
        assert wait_for(lambda: s.metrics()["loramux:num_requests_waiting"] == 1)
        err = assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2}), 429)
        assert err["code"] == "queue_full"
        for cm in streams:
            cm.__exit__(None, None, None)
        streams.clear()
        assert wait_for(lambda: idle(s) and s.metrics()["loramux:num_requests_waiting"] == 0)
        assert_serving(s)

        # SIGTERM: the stream in flight finishes, new requests get 503, then the process exits
        text = []
        with s.http.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "hi", "stream": True, **LONG, "max_tokens": 200}) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: httpx.get(s.url + "/health").status_code == 503)
            err = assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503)
            assert err["code"] == "draining"
            for line in lines:
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0])
        assert text[-1]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
        s.stop()


# ---------------------------------------------------------------------------
# restart
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_uploaded_adapters_survive_a_restart(files, tmp_path):
    store = tmp_path / "store"
    s = Server(files / "base", store)
    try:
        for name in ("a1", "a2"):
            assert upload_dir(s.http, name, files / "allowed" / name).status_code == 201
        before = {m: s.openai.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
                  for m in ("a1", "a2")}
        infos = s.http.get("/v1/adapters").json()["data"]
    finally:
        assert s.stop() == 0
    # what a crash mid-upload leaves, and a folder that no longer validates
    (store / ".tmp-crashed").mkdir()
    (store / ".tmp-crashed" / "adapter_config.json").write_text("{}")
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{")
    (store / "broken" / "adapter_model.safetensors").write_bytes(b"junk")
    s = Server(files / "base", store)
    try:
        assert s.http.get("/v1/adapters").json()["data"] == infos
        after = {m: s.openai.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
                 for m in ("a1", "a2")}
        assert after == before
        assert not (store / ".tmp-crashed").exists()
        assert_error(s.http.get("/v1/adapters/broken"), 404)
    finally:
        s.stop()
