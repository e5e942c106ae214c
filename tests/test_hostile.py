"""Hostile neighbours, over HTTP against a real `loramux serve`.

Each attack is sent while victims stream beside it: a base row, a LoRA row,
a DoRA row and a per-request mix row. The attacker gets the documented 4xx
(or a safe 200 where the value is served, like a tiny temperature); every
victim's text equals its solo run; and the server answers /health quickly
throughout.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time

import httpx
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers.live_server import BASE, KEY, ROOT, Server, assert_error, assert_serving, make_api_files, upload, upload_dir
from helpers.tiny import make_adapter

VICTIM_TOKENS = 48
VICTIMS = [  # (model, extra body)
    (BASE, {}),
    ("a1", {}),
    ("d1", {}),
    (BASE, {"adapters": [{"name": "a1", "weight": 0.6}, {"name": "a2", "weight": -0.5}]}),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_api_files(tmp_path_factory.mktemp("hostile"))
    make_adapter(root / "base", root / "allowed" / "d1", r=4, alpha=8, seed=3, use_dora=True)
    make_adapter(root / "base", root / "allowed" / "p1", r=4, alpha=8, seed=4)
    return root


@pytest.fixture(scope="module")
def server(files):
    s = Server(files / "base", files / "store", "--allowed-adapter-root", str(files / "allowed"))
    for name in ("a1", "a2", "d1"):
        assert upload_dir(s.http, name, files / "allowed" / name).status_code == 201
    yield s
    s.stop()


def victim_body(model: str, extra: dict) -> dict:
    return {"model": model, "prompt": "Tell me a story about", "max_tokens": VICTIM_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, **extra}


def stream_text(http: httpx.Client, body: dict, started: threading.Event | None = None) -> str:
    text = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if started is not None:
                started.set()
            text += [c["text"] for c in event["choices"]]
    return "".join(text)


@pytest.fixture(scope="module")
def solo(server):
    return [stream_text(server.http, victim_body(m, x)) for m, x in VICTIMS]


class HealthProbe:
    """Times /health every 50 ms in a thread; `worst` is the slowest answer."""

    def __init__(self, url: str):
        self.url, self.worst, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = c.get(self.url + "/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.worst = max(self.worst, time.perf_counter() - t0)
                if status != 200:
                    self.failures.append(status)
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def beside_victims(server, solo, attack):
    """Run attack() while every victim is streaming; victims must equal solo."""
    results: list = [None] * len(VICTIMS)
    started = [threading.Event() for _ in VICTIMS]

    def victim(i):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            results[i] = stream_text(c, victim_body(*VICTIMS[i]), started[i])

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(len(VICTIMS))]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    with HealthProbe(server.url) as probe:
        outcome = attack()
    for t in threads:
        t.join(120)
    assert results == solo
    assert not probe.failures and probe.worst < 1.0, (probe.worst, probe.failures)
    return outcome


def completion(server, **body):
    return server.http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 6, **body})


def greedy_text(server, model="a1"):
    r = server.http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 6,
                                                   "temperature": 0})
    return r.json()["choices"][0]["text"]


def config_of(files, name="p1") -> dict:
    return json.loads((files / "allowed" / name / "adapter_config.json").read_text())


def weights_of(files, name="p1") -> bytes:
    return (files / "allowed" / name / "adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------------------
# the attacks found against the old main, each beside the victims
# ---------------------------------------------------------------------------

def test_tiny_temperature_is_greedy(server, solo):
    r = beside_victims(server, solo, lambda: completion(server, model="a1", temperature=1e-300))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text(server)


def test_tiny_top_p_keeps_the_most_likely_token(server, solo):
    r = beside_victims(server, solo, lambda: completion(server, model="a1", temperature=1.0, top_p=1e-300, seed=3))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text(server)


def test_stop_token_ids_out_of_the_vocabulary(server, solo):
    r = beside_victims(server, solo, lambda: completion(server, min_tokens=1, stop_token_ids=[100000000]))
    assert_error(r, 400, "stop_token_ids")


def test_min_tokens_is_served(server, solo):
    """min_tokens masks EOS for its own row only (it once failed every request in the step)."""
    for route, body in (("/v1/completions", {"prompt": "Hello"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        r = beside_victims(server, solo, lambda: server.http.post(route, json={
            "model": "a1", "min_tokens": 3, "max_tokens": 6, **body}))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 3


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seed_beyond_int64(server, solo, seed):
    assert_error(beside_victims(server, solo, lambda: completion(server, temperature=1, seed=seed)), 400, "seed")


def test_seed_at_the_int64_edges_is_served(server):
    for seed in (2**63 - 1, -(2**63)):
        r = completion(server, temperature=1, seed=seed, n=3)
        assert r.status_code == 200, r.text


def test_uploaded_adapter_with_a_huge_alpha(server, solo, files):
    config = json.dumps({**config_of(files), "lora_alpha": 1e300}).encode()
    err = assert_error(beside_victims(server, solo, lambda: upload(server.http, "huge", config, weights_of(files))),
                       422, "lora_alpha")
    assert "1024" in err["message"]
    assert server.http.get("/v1/adapters/huge").status_code == 404


def test_mix_weight_1e300(server, solo):
    r = beside_victims(server, solo, lambda: completion(server, adapters=[{"name": "a1", "weight": 1e300}]))
    assert_error(r, 400, "adapters.0.weight")


def test_merge_weight_1e300(server, solo):
    body = {"name": "m-huge", "sources": [{"adapter": "a1", "weight": 1e300}]}
    assert_error(beside_victims(server, solo, lambda: server.http.post("/v1/adapters/merge", json=body)), 400,
                 "sources.0.weight")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_floats_in_json(server, solo, literal):
    body = f'{{"model": "{BASE}", "prompt": "Hi", "max_tokens": 4, "temperature": {literal}}}'
    r = beside_victims(server, solo, lambda: server.http.post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"}))
    assert_error(r, 400, "temperature")


@pytest.mark.parametrize("pattern", [r"model\.layers\.[0-9]\.(.*)*z", r"(.*)*(.*)*z"])
def test_backtracking_target_modules_upload(server, solo, files, pattern):
    config = json.dumps({**config_of(files), "target_modules": pattern}).encode()
    r = beside_victims(server, solo, lambda: upload(server.http, "regex", config, weights_of(files)))
    assert_error(r, 422, "target_modules")


def test_backreference_target_modules_upload(server, files):
    config = json.dumps({**config_of(files), "target_modules": r"(q)_proj\1"}).encode()
    err = assert_error(upload(server.http, "backref", config, weights_of(files)), 422, "target_modules")
    assert "backreferences" in err["message"]


def test_40mb_prompt_is_refused_before_it_is_read(server, solo):
    prompt = "word " * (8 * 2**20)
    r = beside_victims(server, solo, lambda: completion(server, prompt=prompt))
    err = assert_error(r, 413)
    assert err["code"] == "request_too_large"


def test_a_chunked_body_without_length_is_cut_at_the_cap(server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"x" * 2**20
        yield b'"}'

    r = server.http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    assert_serving(server)


def test_a_prompt_under_the_cap_but_beyond_any_context_is_refused_without_tokenizing(server, solo):
    r = beside_victims(server, solo, lambda: completion(server, prompt="word " * (2 * 2**20)))  # 10 MB
    err = assert_error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    r = server.http.post("/v1/chat/completions", json={"model": BASE, "messages": [
        {"role": "user", "content": "word " * (2 * 2**20)}]})
    assert_error(r, 400, "messages")


def test_nul_byte_in_lora_path(server, solo, files):
    body = {"lora_name": "nul", "lora_path": str(files / "allowed" / "p1") + "\0x"}
    assert_error(beside_victims(server, solo, lambda: server.http.post("/v1/load_lora_adapter", json=body)), 400,
                 "lora_path")


def test_deeply_nested_adapter_config(server, solo, files):
    config = b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = beside_victims(server, solo, lambda: upload(server.http, "deep", config, weights_of(files)))
    assert_error(r, 422, "adapter_config.json")


def test_zero_size_tensor_with_a_2_63_dimension(server, solo, files):
    head = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}).encode()
    weights = struct.pack("<Q", len(head)) + head
    r = beside_victims(server, solo, lambda: upload(server.http, "zero", json.dumps(config_of(files)).encode(),
                                                    weights))
    assert_error(r, 422, "adapter_model.safetensors")


# ---------------------------------------------------------------------------
# downloads serve what was validated
# ---------------------------------------------------------------------------

def test_download_of_a_path_adapter_whose_files_changed_is_409(server, files, tmp_path):
    import shutil
    import tarfile
    import io

    allowed = files / "allowed"
    folder = allowed / "mutable"
    shutil.copytree(allowed / "p1", folder)
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "mutable", "lora_path": str(folder)})
    assert r.status_code == 200, r.text
    r = server.http.get("/v1/adapters/mutable/download")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        got = tar.extractfile("mutable/adapter_model.safetensors").read()
    assert got == weights_of(files)

    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(secret)  # swapped for a link to another file
    err = assert_error(server.http.get("/v1/adapters/mutable/download"), 409, "name")
    assert "changed" in err["message"] or "symlink" in err["message"]
    weights.unlink()
    tensors = st_load(weights_of(files))
    weights.write_bytes(st_save({k: v * 2 for k, v in tensors.items()}))  # rewritten in place
    assert_error(server.http.get("/v1/adapters/mutable/download"), 409, "name")
    assert server.http.delete("/v1/adapters/mutable").status_code == 200


def test_load_lora_adapter_refuses_files_that_lead_outside_the_roots(server, files, tmp_path):
    outside = tmp_path / "outside"
    make_adapter(files / "base", outside, r=4, alpha=8, seed=11)
    folder = files / "allowed" / "linked"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).symlink_to(outside / name)
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(folder)})
    assert_error(r, 403, "lora_path")


def test_uploaded_adapters_download_as_uploaded(server, files):
    import io
    import tarfile

    r = server.http.get("/v1/adapters/a1/download")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert tar.extractfile("a1/adapter_model.safetensors").read() == weights_of(files, "a1")
        assert tar.extractfile("a1/adapter_config.json").read() == \
            (files / "allowed" / "a1" / "adapter_config.json").read_bytes()


# ---------------------------------------------------------------------------
# bounded transient state
# ---------------------------------------------------------------------------

def adapter_labels(server) -> set[str]:
    return {key.split('adapter="')[1].split('"')[0] for key in server.metrics() if 'adapter="' in key}


def test_metrics_series_exist_for_registered_adapters_only(server, files):
    for w in (0.1, 0.2, 0.3):  # three distinct mixes
        r = completion(server, adapters=[{"name": "a1", "weight": w}, {"name": "a2", "weight": 1 - w}])
        assert r.status_code == 200, r.text
    assert upload_dir(server.http, "short-lived", files / "allowed" / "p1").status_code == 201
    assert completion(server, model="short-lived").status_code == 200
    labels = adapter_labels(server)
    assert "mix" in labels and "short-lived" in labels
    assert not any(label.startswith("mix:") for label in labels)
    assert server.http.delete("/v1/adapters/short-lived").status_code == 200
    completion(server)  # a step after the delete
    labels = adapter_labels(server)
    assert "short-lived" not in labels and labels <= {"", "mix", "a1", "a2", "d1"}, labels
    metrics = server.metrics()
    assert metrics["loramux:adapter_refs"] == 0 and metrics["process_resident_memory_bytes"] > 0


@pytest.fixture(scope="module")
def small_mix_server(files):
    # a mix of a1 (r=8, all seven modules) and a2 fits; a second distinct one does not
    s = Server(files / "base", files / "store-mix", "--mix-pool-bytes", "100K")
    for name in ("a1", "a2"):
        assert upload_dir(s.http, name, files / "allowed" / name).status_code == 201
    yield s
    s.stop()


def test_mix_budget_is_checked_before_anything_is_built(small_mix_server):
    s = small_mix_server
    mix_a = [{"name": "a1", "weight": 0.5}, {"name": "a2", "weight": 0.5}]
    mix_b = [{"name": "a1", "weight": 0.25}, {"name": "a2", "weight": 0.75}]
    started, done = threading.Event(), []

    def hold_mix_a():
        done.append(stream_text(s.http, {"model": BASE, "prompt": "Once", "max_tokens": 120, "ignore_eos": True,
                                         "temperature": 0, "stream": True, "adapters": mix_a}, started))

    t = threading.Thread(target=hold_mix_a)
    t.start()
    assert started.wait(60)
    err = assert_error(completion(s, adapters=mix_b), 429, "adapters")
    assert err["code"] == "mix_budget_full"
    same = completion(s, adapters=mix_a)  # the held mix is shared by content: no new bytes
    assert same.status_code == 200, same.text
    t.join(120)
    assert done
    assert completion(s, adapters=mix_b).status_code == 200  # room again once mix a is released
    assert s.metrics()["loramux:adapter_mix_bytes"] == 0


# ---------------------------------------------------------------------------
# start-up refuses unsafe settings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused_at_start(files, how):
    args = [sys.executable, "-m", "loramux.server", "serve", "--model", str(files / "base"), "--dtype", "float32",
            "--adapter-dir", str(files / "store-empty-key"), "--port", "1"]
    env = dict(os.environ)
    if how == "flag":
        args += ["--api-key", ""]
    else:
        env["LORAMUX_API_KEY"] = ""
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "API key is empty" in proc.stderr


def test_a_stored_adapter_above_a_new_max_rank_is_skipped_at_start(server, files):
    """a1 (r=8) and a2 (r=4) are stored; restarted with --max-lora-rank 4 the
    server starts, skips a1 with a log line and serves a2."""
    s = Server(files / "base", files / "store", "--max-lora-rank", "4")
    try:
        names = {m["id"] for m in s.http.get("/v1/models").json()["data"]}
        assert "a2" in names and "a1" not in names
        assert s.http.post("/v1/completions", json={"model": "a2", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert "skipping stored adapter 'a1'" in s.output()
        # the startup log names the kernels that serve (the compiled CPU ops build here)
        # (a float32 model: its long segments are torch's float32 GEMMs, whatever the CPU)
        assert ("kernels: decode attention: compiled, LoRA deltas: compiled (long segments: torch GEMMs), "
                "small-batch GEMMs: compiled, "
                "norms and rotary: compiled") in s.output()
    finally:
        s.stop()
