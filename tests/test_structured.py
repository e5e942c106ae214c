"""Structured outputs in the engine: each guided row follows its own grammar
(xgrammar bitmask), and every other row of the same mixed batch (base,
LoRA, DoRA) gets exactly the tokens it gets without the guided neighbours,
greedy and seeded. Compilation errors and timeouts are refusals naming the
field; the compile cache shares one compile per spec."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from loramux.server.engine.grammar_compiler import GrammarCompiler
from loramux.server.engine.guided import GuideSpec
from loramux.server.engine.sampling import SamplingParams
from loramux.server.errors import Busy, Invalid
from loramux.server.llm import LLM

from helpers.schemas import PERSON
from helpers.tiny import make_adapter, make_chat_model, make_dora_adapter

CHOICES = ["yes", "no", "maybe later"]
REGEX = r"[a-f]{2,4}-[0-9]{1,3}"
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
PROMPTS = ["The quick brown fox", "Once upon a time", "Answer in JSON:", "Say yes or no:", "Code:", "List:"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    make_chat_model(root / "base")
    make_adapter(root / "base", root / "lora", r=8, seed=1)
    make_dora_adapter(root / "base", root / "dora", r=4, seed=2)
    return LLM(str(root / "base"), dtype="float32", adapters={"lora": root / "lora", "dora": root / "dora"},
               block_size=4, max_num_batched_tokens=64)


def _check(spec: GuideSpec, text: str) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.value))
    elif spec.kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif spec.kind == "choice":
        assert text in json.loads(spec.value)
    elif spec.kind == "regex":
        assert re.fullmatch(spec.value, text), text
    else:
        assert re.fullmatch(r"\((?:[0-9x])(?:,[0-9x])*\)", text), text


GUIDES = [GuideSpec.json_schema(PERSON, "p"), GuideSpec("choice", json.dumps(CHOICES), "p"),
          GuideSpec("regex", REGEX, "p"), GuideSpec("grammar", GRAMMAR, "p"), GuideSpec("json_object", "", "p")]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_rows_follow_their_grammar_and_leave_their_neighbours_unchanged(llm, temperature):
    free = [(PROMPTS[i], a) for i, a in enumerate([None, "lora", "dora", "lora", None, "dora"])]
    guided = [(PROMPTS[i % len(PROMPTS)], a, g) for i, (a, g) in enumerate(
        zip(["lora", None, "dora", "lora", None], GUIDES))]

    def params(i):  # the free rows need a few steps beside the guided ones; the guided rows room to finish
        return SamplingParams(max_tokens=24 if i < len(free) else 96, temperature=temperature, seed=1000 + i,
                              logprobs=2)

    alone = llm.generate([p for p, _ in free], [params(i) for i in range(len(free))], [a for _, a in free])
    prompts = [p for p, _ in free] + [p for p, _, _ in guided]
    mixed = llm.generate(prompts, [params(i) for i in range(len(prompts))],
                         [a for _, a in free] + [a for _, a, _ in guided],
                         [None] * len(free) + [g for _, _, g in guided])
    for a, m in zip(alone, mixed):  # the same tokens; logprobs within a batch size's float32 noise
        assert m.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor([lp for _, lp, _ in m.logprobs]),
                                   torch.tensor([lp for _, lp, _ in a.logprobs]), rtol=1e-5, atol=1e-5)
    for (_, _, spec), out in zip(guided, mixed[len(free):]):
        if spec.kind == "json_object" and out.finish_reason == "length":  # free strings: a random model may ramble
            assert out.text.startswith("{"), out.text
            continue
        assert out.finish_reason == "stop", (spec, out.text)
        _check(spec, out.text)
    # the guided rows were really constrained: unconstrained, the same rows give other text
    free_guided = llm.generate([p for p, _, _ in guided], [params(len(free) + i) for i in range(len(guided))],
                               [a for _, a, _ in guided])
    assert sum(f.text != m.text for f, m in zip(free_guided, mixed[len(free):])) >= 4


def test_guided_rows_with_min_tokens_ignore_eos_stop_and_truncation(llm):
    choice = GuideSpec("choice", json.dumps(CHOICES), "p")
    schema = GuideSpec.json_schema(PERSON, "p")
    outs = llm.generate(
        ["a", "b", "c", "d"],
        [SamplingParams(max_tokens=64, min_tokens=20, temperature=0.0),  # the grammar ends it, not min_tokens
         SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0),  # ... and not ignore_eos
         SamplingParams(max_tokens=4, temperature=0.0),  # cut short: length, a prefix of valid JSON
         SamplingParams(max_tokens=64, stop=('":',), temperature=0.0)],  # a stop string inside the JSON
        [None, "lora", None, "dora"], [choice, choice, schema, schema])
    assert outs[0].text in CHOICES and outs[1].text in CHOICES
    assert outs[0].finish_reason == outs[1].finish_reason == "stop"
    assert outs[2].finish_reason == "length" and len(outs[2].token_ids) == 4 and outs[2].text.startswith('{"')
    assert outs[3].finish_reason == "stop" and outs[3].text == '{"name'


def test_seeded_guided_sampling_is_reproducible_and_differs_by_seed(llm):
    spec = GuideSpec.json_schema(PERSON, "p")
    runs = [llm.generate(["Hello"] * 3, [SamplingParams(max_tokens=96, temperature=1.0, seed=s) for s in (5, 5, 6)],
                         ["lora"] * 3, [spec] * 3) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert runs[0][0].token_ids == runs[0][1].token_ids
    for o in runs[0]:
        _check(spec, o.text)


def test_offline_compile_errors_name_the_kind(llm):
    with pytest.raises(ValueError, match="invalid regex: .*parenthesis"):
        llm.compile_guide(GuideSpec("regex", "(", "p"))


def test_compiler_refuses_bad_and_slow_specs_caches_and_recovers(llm):
    """One worker process: a bad spec is Invalid naming its param; a spec
    slower than the timeout is refused and its worker replaced; the cache
    answers repeats (refusals too) without a compile."""
    cfg = llm.engine.model.cfg
    compiler = GrammarCompiler.for_tokenizer(llm.tokenizer, cfg.vocab_size, cfg.eos_token_ids, timeout_s=0.3)
    slow = {"type": "object", "required": [f"p{i}" for i in range(400)],
            "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}x{2,40}"} for i in range(400)}}

    async def run():
        good = GuideSpec.json_schema(PERSON, "response_format.json_schema.schema")
        first, second = await asyncio.gather(compiler.compile(good), compiler.compile(good))
        assert first.compiled is second.compiled  # one compile for concurrent requests
        bad = []
        for spec in [GuideSpec("regex", "(", "guided_regex"), GuideSpec("grammar", "root ::= ", "guided_grammar"),
                     GuideSpec("json_schema", '{"type": "objec"}', "guided_json"),
                     GuideSpec.json_schema(slow, "structured_outputs.json")]:
            with pytest.raises(Invalid) as err:
                await compiler.compile(spec)
            bad.append(err.value)
        assert [e.param for e in bad] == ["guided_regex", "guided_grammar", "guided_json", "structured_outputs.json"]
        assert [e.code for e in bad] == ["invalid_grammar"] * 3 + ["grammar_too_complex"]
        assert "objec" in bad[2].message and "took longer than 0.3s" in bad[3].message
        workers = list(compiler._workers)
        with pytest.raises(Invalid, match="took longer"):  # the refusal is cached: no second wait
            await asyncio.wait_for(compiler.compile(GuideSpec.json_schema(slow, "x")), 0.2)
        after = await compiler.compile(GuideSpec.json_schema(PERSON, "guided_json"))  # a fresh worker
        assert compiler._workers == workers and after.allowed is not None
        # every worker busy for longer than the timeout: Busy, and nothing cached
        slot = compiler._idle.get_nowait()
        with pytest.raises(Busy):
            await compiler.compile(GuideSpec("regex", REGEX, "guided_regex"))
        compiler._idle.put_nowait(slot)
        regex = await compiler.compile(GuideSpec("regex", REGEX, "guided_regex"))
        return (after, regex), list(compiler._workers)

    try:
        guides, workers = asyncio.run(run())
    finally:
        compiler.close()
    assert workers and not any(w.alive for w in workers)  # close() stops the worker processes
    # the grammars that came back from the worker process drive the engine
    engine = llm.engine
    ids = [engine.add_request(llm.tokenizer.encode("x"), SamplingParams(max_tokens=64), guide=g) for g in guides]
    results = engine.run_to_completion()
    texts = ["".join(o.text for o in results[i]) for i in ids]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    assert re.fullmatch(REGEX, texts[1])



def test_a_grammar_that_fails_fails_only_its_request(llm):
    """A matcher that raises while filling its mask (a grammar engine bug)
    ends its own request with an error; a guided and a free neighbour get
    exactly their tokens of a run without it."""
    engine = llm.engine
    choice = llm.compile_guide(GuideSpec("choice", json.dumps(CHOICES), "p"))
    schema = llm.compile_guide(GuideSpec.json_schema(PERSON, "p"))

    def run(with_broken: bool):
        ids = [engine.add_request(llm.tokenizer.encode(p), SamplingParams(max_tokens=48, temperature=1.0, seed=s),
                                  guide=g) for p, s, g in [("a", 1, None), ("b", 2, schema)]]
        if with_broken:
            bad = engine.add_request(llm.tokenizer.encode("c"), SamplingParams(max_tokens=48), guide=choice)

            def explode(bitmask, row):
                raise RuntimeError("matcher bug")

            engine._gens[bad].matcher.fill = explode
        results = engine.run_to_completion()
        if with_broken:
            assert results[bad][-1].finish_reason == "error" and "grammar" in results[bad][-1].error
        return [[t for o in results[i] for t in o.token_ids] for i in ids]

    assert run(True) == run(False)
    assert engine.allocator.num_free == engine.allocator.num_blocks
