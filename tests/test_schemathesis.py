"""Schemathesis over the live server's /openapi.json: every operation, with
positive (schema-valid) and negative (schema-violating) inputs, must answer
without a 5xx; afterwards the server still serves an adapter.

A tiny model and two uploaded adapters (a1, a2) back the server, and the
generated inputs are steered (see `steer`) so that the generation routes run
for real, on the base model, on each adapter and on per-request mixes, rather
than stopping at 404 for an unknown model; token budgets are capped so each
request stays cheap.

Schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`)
does not run under pytest 9.2 (it reads `request.node._nodeid`, which pytest
renamed), so this drives Hypothesis directly with each operation's public
`APIOperation.as_strategy()` (both generation modes, per operation) and
asserts on each response's status; the failures of all operations are
collected and reported together, each with a curl command to reproduce it.
"""
from __future__ import annotations

import collections
import json
import re
from collections.abc import Sequence

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode

from helpers.live_server import AUTH, BASE, Server, make_api_files, upload_dir
from loramux.server.api.protocol import MAX_N

ADAPTERS = ("a1", "a2")
TARGETS = (BASE, *ADAPTERS)  # what `model` becomes when steered
MAX_TOKENS = 8  # generation budget per completion
MAX_PROMPTS = 4  # prompts kept of a list of prompts
MAX_EXAMPLES = 25  # per operation and generation mode
GENERATION = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_api_files(tmp_path_factory.mktemp("schemathesis"))
    return root


@pytest.fixture(scope="module")
def server(files):
    s = Server(files / "base", files / "store", "--allowed-adapter-root", str(files / "allowed"))
    try:
        for name in ADAPTERS:
            r = upload_dir(s.http, name, files / "allowed" / name)
            assert r.status_code == 201, r.text
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    # An explicit config, so no schemathesis.toml on disk changes the run; no
    # sanitization, which would mask every field named like "*token*" (max_tokens,
    # stop_token_ids) in the reproduction commands.
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config, headers=AUTH, timeout=30)


# ---------------------------------------------------------------------------
# steering
# ---------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Limits:
    """What the steering needs to know of the server's model."""

    def __init__(self, context_len: int, vocab: int, allowed: str):
        self.context_len, self.vocab, self.allowed = context_len, vocab, allowed


RAW = 9  # `pick` value that sends the request as generated


def steer(case, pick: int, limits: Limits, existing: Sequence[str] = ()) -> None:
    """Point the generated request at things that exist and keep it cheap.

    `pick` is drawn by Hypothesis (0..9). RAW sends names and values as
    generated (unknown models, adapters and paths; fields the server refuses),
    which exercises the validation; anything else names the base model, a1
    or a2 and tidies the request so that the generation routes run. Whatever
    `pick`, the fixture's adapters are never deleted or unloaded, and token
    budgets are capped. Values out of range (max_tokens above the context,
    n above MAX_N, more than 64 prompts, negative numbers, wrong types) are
    never changed: the server must refuse those, cheaply, with a 4xx.
    `existing`: the adapters a delete or unload may remove (not a1, a2)."""
    raw = pick == RAW
    target = TARGETS[pick % len(TARGETS)]
    adapter = ADAPTERS[pick % len(ADAPTERS)]
    path = case.operation.path
    params = case.path_parameters
    if params and isinstance(params.get("name"), str):
        if case.method.upper() == "DELETE":
            if not raw and existing:
                params["name"] = existing[pick % len(existing)]
            if params["name"] in TARGETS:
                params["name"] = "x" + params["name"]
        elif not raw:
            params["name"] = adapter
    body = case.body
    if not isinstance(body, dict):
        return
    if path == "/v1/unload_lora_adapter":
        if not raw and existing and isinstance(body.get("lora_name"), str):
            body["lora_name"] = existing[pick % len(existing)]
        if body.get("lora_name") in TARGETS:
            body["lora_name"] = "x" + body["lora_name"]
    if path in GENERATION:
        cap_cost(body, limits)
    if raw:
        return
    if isinstance(body.get("model"), str):
        body["model"] = target
    if path == "/v1/load_lora_adapter":
        if isinstance(body.get("lora_path"), str):
            body["lora_path"] = f"{limits.allowed}/{adapter}"
        if isinstance(body.get("lora_name"), str):
            body["lora_name"] = new_name(body["lora_name"])
    if path == "/v1/adapters/merge":
        if isinstance(body.get("name"), str):
            body["name"] = new_name(body["name"])
        if isinstance(body.get("sources"), list):
            for i, s in enumerate(body["sources"]):
                if isinstance(s, dict) and isinstance(s.get("adapter"), str):
                    s["adapter"] = ADAPTERS[(pick + i) % len(ADAPTERS)]
        if body.get("method") == "svd" and body.get("rank") is None:
            body["rank"] = 4
    if path in GENERATION:
        tidy(body, pick, limits)


def new_name(name: str) -> str:
    """A valid name for a new adapter, made of the generated one: often the
    same few ("n" of ""), so the server also sees names that exist already."""
    return ("n" + re.sub(r"[^A-Za-z0-9._-]", "", name))[:64]


def cap_cost(body: dict, limits: Limits) -> None:
    """A request's cost is prompts x n x max_tokens decode steps."""
    keys = ("max_tokens", "max_completion_tokens")
    for key in keys:
        if _is_int(body.get(key)) and MAX_TOKENS < body[key] <= limits.context_len:
            body[key] = MAX_TOKENS
    if all(body.get(key) is None for key in keys):  # the default is the whole context
        body["max_tokens"] = MAX_TOKENS
    if _is_int(body.get("n")) and 2 < body["n"] <= MAX_N:
        body["n"] = 2
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) <= 64 and all(isinstance(p, (str, list)) for p in prompt):
        body["prompt"] = prompt[:MAX_PROMPTS]


def tidy(body: dict, pick: int, limits: Limits) -> None:
    """Drop what the server refuses though the schema allows it (OpenAI fields
    it does not implement, empty prompts and stops, token ids outside the
    vocabulary), values of the schema's types only: a negative case stays
    negative. A per-request mix (`adapters`) gets a1/a2 and the base model."""
    refused = {
        "presence_penalty": lambda v: isinstance(v, (int, float)) and v != 0,
        "frequency_penalty": lambda v: isinstance(v, (int, float)) and v != 0,
        "logit_bias": lambda v: isinstance(v, dict) and v,
        "best_of": lambda v: _is_int(v),
        "suffix": lambda v: isinstance(v, str) and v,
        # tools and output constraints have their own tests (test_tool_calls.py,
        # test_structured*.py); random schemas, regexes and grammars mostly fail to compile
        "tools": lambda v: v is not None,
        "tool_choice": lambda v: v is not None,
        "response_format": lambda v: isinstance(v, dict) and v.get("type") not in (None, "text"),
        "structured_outputs": lambda v: v is not None,
        "guided_json": lambda v: v is not None,
        "guided_regex": lambda v: v is not None,
        "guided_choice": lambda v: v is not None,
        "guided_grammar": lambda v: v is not None,
        "prompt_logprobs": lambda v: _is_int(v) and v > 0 and body.get("stream") is True,
        "stream_options": lambda v: isinstance(v, dict) and body.get("stream") is not True,
        "top_logprobs": lambda v: _is_int(v) and v and body.get("logprobs") is not True,
    }
    for key, refuses in refused.items():
        if key in body and refuses(body[key]):
            del body[key]
    budget = [body[k] for k in ("max_completion_tokens", "max_tokens") if _is_int(body.get(k)) and body[k] > 0]
    if budget and _is_int(body.get("min_tokens")) and budget[0] < body["min_tokens"] <= limits.context_len:
        body["min_tokens"] = budget[0]
    stop = body.get("stop")
    if stop == "" or (isinstance(stop, list) and "" in stop):
        del body["stop"]

    def ids(v):
        return [t % limits.vocab for t in v] if all(_is_int(t) for t in v) else v

    for key in ("stop_token_ids", "prompt"):
        if isinstance(body.get(key), list):
            body[key] = ids(body[key])
    prompt = body.get("prompt")
    if prompt == "" or prompt == []:
        body["prompt"] = "Hello"
    elif isinstance(prompt, list):
        body["prompt"] = [("Hello" if p == "" else ids(p) or [1]) if isinstance(p, (str, list)) else p
                          for p in prompt]
    mix = body.get("adapters")
    if isinstance(mix, list) and mix:
        if isinstance(body.get("model"), str):
            body["model"] = BASE
        for i, a in enumerate(mix):
            if isinstance(a, dict) and isinstance(a.get("name"), str):
                a["name"] = ADAPTERS[(pick + i) % len(ADAPTERS)]


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # each example is an HTTP request, some of them generate tokens
    derandomize=True,  # the same examples on every run (and no example database)
    database=None,
)
# Negative mode draws values and filters out those the schema accepts; for an
# operation whose only input is a string in the path every value is accepted,
# so all are filtered out (Unsatisfiable, below): no problem of the test.
NEGATIVE_SETTINGS = hypothesis.settings(SETTINGS, suppress_health_check=[HealthCheck.filter_too_much])


def removes(operation) -> bool:
    return operation.method.upper() == "DELETE" or operation.path == "/v1/unload_lora_adapter"


def run_operation(operation, mode, session, server, limits, statuses) -> None:
    removes_ = removes(operation)

    @(SETTINGS if mode is GenerationMode.POSITIVE else NEGATIVE_SETTINGS)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), pick=st.integers(0, 9))
    def check(case, pick):
        existing = []
        if removes_:  # what merge and load_lora_adapter made (they run first)
            existing = sorted(a["name"] for a in server.http.get("/v1/adapters").json()["data"])
            existing = [name for name in existing if name not in TARGETS]
        steer(case, pick, limits, existing)
        response = case.call(base_url=server.url, session=session, headers=AUTH, timeout=60)
        statuses[(operation.label, response.status_code)] += 1
        if (operation.path in GENERATION and response.status_code == 200 and isinstance(case.body, dict)
                and case.body.get("model") in ADAPTERS):
            statuses[(operation.label, "200 on an adapter")] += 1
        if (operation.path in GENERATION and response.status_code == 200 and isinstance(case.body, dict)
                and case.body.get("adapters")):
            statuses[(operation.label, "200 on a mix")] += 1
        assert response.status_code < 500, (
            f"{operation.label} answered {response.status_code}: {response.content[:1000]!r}\n"
            f"Reproduce with:\n    {case.as_curl_command(headers=AUTH)}")

    check()


@pytest.mark.slow
def test_no_server_errors(server, api_schema, files):
    limits = Limits(context_len=server.http.get("/v1/models").json()["data"][0]["max_model_len"],
                    vocab=json.loads((files / "base" / "config.json").read_text())["vocab_size"],
                    allowed=str(files / "allowed"))
    statuses: collections.Counter = collections.Counter()
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 10
    operations.sort(key=removes)  # last, when merge and load_lora_adapter have made some adapters
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    run_operation(operation, mode, session, server, limits, statuses)
                except hypothesis.errors.Unsatisfiable:
                    # no negative case exists: no parameters, or just a string in the path
                    assert mode is GenerationMode.NEGATIVE
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    notes = "\n".join(getattr(exc, "__notes__", []))
                    failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {exc}\n{notes}")
    summary = "\n".join(f"  {label} -> {status}: {n}" for (label, status), n in sorted(
        statuses.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))
    print(f"\nresponses by operation and status:\n{summary}")

    assert server.proc.poll() is None, f"the server exited:\n{server.output()}"
    assert not failures, (f"{len(failures)} operation(s) failed (a 5xx, or no answer):\n\n" + "\n\n".join(failures)
                          + f"\n\nthe server's log ends:\n{server.output()}")
    # the steering works: generation ran, also on adapters
    for path in GENERATION:
        assert statuses[(f"POST {path}", "200 on an adapter")] > 0, summary
    # and the fixture's adapter is still there and serves
    r = server.http.post("/v1/completions", json={"model": "a1", "prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
