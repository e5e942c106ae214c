"""Structured outputs through a real `loramux serve` and the `openai`
client: response_format (json_schema, json_object) on chat and completions,
vLLM's structured_outputs and guided_* fields, with n, stream, stop,
logprobs, seeds and max_tokens; constrained and unconstrained requests mixed
over adapters and a per-request mix leave the unconstrained tokens unchanged;
bad and slow schemas are 400s naming the field, and the server goes on."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from helpers.live_server import BASE, assert_error, assert_serving, make_api_files, serve_with_adapters
from helpers.schemas import PERSON

MESSAGES = [{"role": "user", "content": "Describe a customer as JSON."}]
# far slower to compile than the server's timeout below (minutes, in xgrammar)
SLOW = {"type": "object", "required": [f"p{i}" for i in range(400)],
        "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}x{2,40}"} for i in range(400)}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = make_api_files(tmp_path_factory.mktemp("structured_api"))
    s = serve_with_adapters(files / "base", files / "store", {n: files / "allowed" / n for n in ("a1", "a2")},
                            "--grammar-compile-timeout", "3")
    yield s
    s.stop()


def holds(check, text: str) -> bool:
    try:
        return bool(check(text))
    except (ValueError, jsonschema.ValidationError):
        return False


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_chat_json_schema_and_json_object_on_base_and_adapters(server):
    for model in (BASE, "a1", "a2"):
        r = server.openai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=80, temperature=0,
                                                  response_format=json_schema_format(PERSON))
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    r = server.openai.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=80, temperature=0,
                                              response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_completions_structured_outputs_and_guided_fields(server):
    cases = [
        ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_regex": r"(yes|no)!"}, lambda t: t in ("yes!", "no!")),
        ({"structured_outputs": {"grammar": 'root ::= "<" [a-c] [a-c]? [a-c]? ">"'}},
         lambda t: re.fullmatch(r"<[a-c]{1,3}>", t)),
        ({"guided_grammar": 'root ::= "x" | "y" "z"'}, lambda t: t in ("x", "yz")),
        ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"guided_json": json.dumps(PERSON)}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"response_format": json_schema_format(PERSON)},
         lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ]
    for extra, ok in cases:
        r = server.openai.completions.create(model="a2", prompt="Output:", max_tokens=60, temperature=0,
                                             extra_body=extra)
        text = r.choices[0].text
        assert r.choices[0].finish_reason == "stop" and ok(text), (extra, text)
        free = server.openai.completions.create(model="a2", prompt="Output:", max_tokens=8, temperature=0)
        assert not holds(ok, free.choices[0].text)  # the constraint did the work


def test_n_seeds_stream_logprobs_stop_and_length(server):
    kw = dict(model="a1", messages=MESSAGES, max_tokens=80, temperature=1.0, seed=7, n=3, logprobs=True,
              top_logprobs=2, response_format=json_schema_format(PERSON))
    whole = server.openai.chat.completions.create(**kw)
    again = server.openai.chat.completions.create(**kw)
    texts = [c.message.content for c in whole.choices]
    assert texts == [c.message.content for c in again.choices]  # seeds: choice i uses seed + i
    for c in whole.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
        # the logprobs cover the content's tokens and the grammar's end (EOS, shown by its name)
        assert "".join(t.token for t in c.logprobs.content) == c.message.content + "<|im_end|>"
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    streamed = {i: "" for i in range(3)}
    for chunk in server.openai.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts
    # max_tokens cuts the JSON short: finish_reason length, a prefix of what it would have been
    short = server.openai.chat.completions.create(**{**kw, "n": 1, "max_tokens": 5})
    assert short.choices[0].finish_reason == "length" and texts[0].startswith(short.choices[0].message.content)
    # a stop string inside the JSON ends it there
    stopped = server.openai.chat.completions.create(**{**kw, "n": 1, "stop": ['"member"']})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == texts[0][:texts[0].index('"member"')]


def test_mixed_batch_leaves_unconstrained_requests_unchanged(server):
    """Unconstrained requests over the base, two adapters and a mix, alone and
    then concurrently with constrained ones on the same adapters: the same
    tokens (greedy, and seeded sampling)."""
    free = [dict(model=m, prompt=p, max_tokens=24, temperature=t, seed=11, extra_body=e)
            for m, p, t, e in [(BASE, "Once upon", 0, None), ("a1", "Once upon", 0, None),
                               ("a2", "The sea", 1.0, None),
                               (BASE, "The sea", 0, {"adapters": [{"name": "a1", "weight": 0.5},
                                                                  {"name": "a2", "weight": 1.0}]})]]
    guided = [dict(model=m, prompt="JSON:", max_tokens=60, temperature=t, seed=3, extra_body=e)
              for m, t, e in [("a1", 0, {"guided_json": PERSON}), ("a2", 1.0, {"guided_choice": ["a", "b"]}),
                              (BASE, 0, {"guided_regex": "[0-9]{4}"}),
                              (BASE, 0, {"guided_json": PERSON,
                                         "adapters": [{"name": "a1", "weight": 0.5}, {"name": "a2", "weight": 1.0}]})]]

    def run(kw):
        return server.openai.completions.create(**kw).choices[0].text

    alone = [run(kw) for kw in free]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, guided + free + guided))
    assert together[len(guided):len(guided) + len(free)] == alone
    jsonschema.validate(json.loads(together[0]), PERSON)
    assert together[1] in ("a", "b") and re.fullmatch("[0-9]{4}", together[2])
    jsonschema.validate(json.loads(together[3]), PERSON)


def test_bad_and_slow_specs_are_400_and_the_server_goes_on(server):
    url = "/v1/chat/completions"
    base = {"model": "a1", "messages": MESSAGES, "max_tokens": 8}
    cases = [
        ({"response_format": json_schema_format({"type": "objec"})}, "response_format.json_schema.schema"),
        ({"response_format": json_schema_format({"type": "string", "pattern": "(["})},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
        ({"guided_json": [1, 2]}, "guided_json"),
        ({"guided_json": "{}", "response_format": {"type": "json_object"}}, None),
    ]
    for extra, param in cases:
        err = assert_error(server.http.post(url, json={**base, **extra}), 400, param)
        assert err["type"] == "invalid_request_error"
    # a schema far slower to compile than --grammar-compile-timeout: 400, and
    # the same schema again is refused from the cache without another wait
    for _ in range(2):
        err = assert_error(server.http.post(url, json={**base, "response_format": json_schema_format(SLOW)}), 400,
                           "response_format.json_schema.schema")
        assert err["code"] == "grammar_too_complex" and "took longer than 3s" in err["message"]
    assert server.http.get("/health").status_code == 200
    assert_serving(server)
    r = server.openai.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=80, temperature=0,
                                              response_format=json_schema_format(PERSON))
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_openai_parse_with_a_pydantic_model(server):
    """The client's own structured-output helper: it sends the model's strict
    schema and parses the reply into the class."""
    from pydantic import BaseModel, Field

    class Tier(BaseModel):
        level: int = Field(ge=1, le=3)
        active: bool

    r = server.openai.chat.completions.parse(model="a2", messages=MESSAGES, max_tokens=40, temperature=0,
                                             response_format=Tier)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Tier) and r.choices[0].finish_reason == "stop"
    assert parsed == Tier.model_validate_json(r.choices[0].message.content)
