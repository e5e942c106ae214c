"""One request the engine fails on fails alone.

Victims (a base row, a LoRA row, a DoRA row and a per-request mix row) run
in the same steps as an attacker whose request breaks the engine in one of
the ways validation could miss: non-finite logits, a forward pass that
raises, an adapter whose files vanish, a row whose sampling raises. The
attacker ends with an error output; every victim's tokens equal its solo run,
and every KV block and adapter reference is free at the end.

Then a property test: requests with extreme values are either refused by the
edge's validation (the 4xx path) or served, the engine never raises, and the
victim's tokens never change.
"""
from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from loramux.adapters_store import arithmetic
from loramux.server import LLM
from loramux.server.api.generation import build_sampling
from loramux.server.errors import LoramuxError
from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora, load_peft_adapter
from loramux.adapters_store.registry import RegisteredAdapter
from loramux.adapters_store.sources import AdapterSource
from loramux.server.api.protocol import CompletionRequest
from loramux.server.engine.sampling import SamplingParams
from helpers.tiny import VOCAB, make_adapter, make_model

VICTIM_PROMPTS = [[5, 9, 14, 3, 22, 7], [30, 31, 32], [100, 4, 4, 90, 17, 60, 2 + 1], [11, 12, 13, 14, 15]]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    make_model(root / "base", "llama")
    make_adapter(root / "base", root / "a1", r=8, alpha=16, seed=1)
    make_adapter(root / "base", root / "a2", r=4, alpha=8, seed=2, target_modules=("q_proj", "v_proj"))
    make_adapter(root / "base", root / "d1", r=4, alpha=8, seed=3, use_dora=True)
    return root


def make_llm(files) -> LLM:
    llm = LLM(model=str(files / "base"), dtype="float32", block_size=4, kv_cache_bytes=4 * 2**20,
              adapters={n: files / n for n in ("a1", "a2", "d1")})
    cfg, max_rank = llm.engine.model.cfg, llm.engine.config.max_lora_rank
    sources = [arithmetic.Source(load_peft_adapter(files / n, cfg, max_rank, n), w)
               for n, w in (("a1", 0.7), ("a2", -0.4))]
    mix = arithmetic.concat(arithmetic.MIX_NAME_PREFIX + "victim", sources)
    llm.engine.adapters.add_mix(mix)  # held (one reference) for the module's life
    llm.victim_mix_digest = mix.digest
    return llm


VICTIM_ADAPTERS = [None, "a1", "d1", "mix"]


def digest_of(llm, adapter: str | None) -> str | None:
    """The digest requests for `adapter` run with: a registered name, "mix" (the module's held mix) or None."""
    if adapter is None:
        return None
    return llm.victim_mix_digest if adapter == "mix" else llm.adapters.lookup(adapter).digest


def run_rows(llm, rows: list[tuple[list[int], SamplingParams, str | None]], prefix: str = "row") -> list[list[int]]:
    """Each (prompt, sampling, adapter) row's tokens, all in one engine run."""
    engine = llm.engine
    ids = [engine.add_request(p, s, digest_of(llm, a), f"{prefix}-{i}") for i, (p, s, a) in enumerate(rows)]
    results = engine.run_to_completion()
    return [[t for o in results[rid] for t in o.token_ids] for rid in ids]


def victims(llm):
    return list(zip(VICTIM_PROMPTS, [GREEDY] * len(VICTIM_PROMPTS), VICTIM_ADAPTERS))


@pytest.fixture(scope="module")
def llm(files):
    return make_llm(files)


@pytest.fixture(scope="module")
def solo(llm):
    """Each victim's tokens when it runs by itself."""
    return [run_rows(llm, [row])[0] for row in victims(llm)]


def run_with_attacker(llm, attacker: tuple[list[int], SamplingParams, str | None]):
    """(victims' token lists, the attacker's outputs), all in one engine run."""
    engine = llm.engine
    ids = [engine.add_request(p, s, digest_of(llm, a), f"victim-{i}") for i, (p, s, a) in enumerate(victims(llm))]
    prompt, sampling, adapter = attacker
    engine.add_request(prompt, sampling, digest_of(llm, adapter), "attacker")
    results = engine.run_to_completion()
    for rid in ids:
        assert all(o.error is None for o in results[rid]), results[rid][-1]
    assert engine.allocator.num_free == engine.allocator.num_blocks  # every block is back
    assert engine.adapters.total_refs() == 1  # only the module's held mix
    return [[t for o in results[rid] for t in o.token_ids] for rid in ids], results["attacker"]


def assert_failed_alone(llm, solo, attacker):
    got, attacker_outputs = run_with_attacker(llm, attacker)
    assert got == solo
    last = attacker_outputs[-1]
    assert last.finished and last.finish_reason == "error" and last.error
    return last


def test_non_finite_logits_fail_only_that_row(llm, solo):
    """An adapter with an infinite scale (validation refuses one, so it is
    registered here behind its back) makes its rows' logits NaN."""
    a1 = load_peft_adapter(llm.model_dir.parent / "a1", llm.engine.model.cfg, 64, "inf-scale")
    modules = {k: ModuleLora(m.a, m.b, float("inf")) for k, m in a1.modules.items()}
    broken = LoraAdapter("inf-scale", a1.rank, a1.lora_alpha, a1.target_modules, modules, a1.config,
                         "f" * 64, a1.nbytes)
    llm.adapters.register(RegisteredAdapter("inf-scale", AdapterSource.in_memory(broken)))
    try:
        last = assert_failed_alone(llm, solo, ([40, 41, 42, 43], GREEDY, "inf-scale"))
        assert "non-finite" in last.error
    finally:
        llm.adapters.unregister("inf-scale")


def test_a_forward_pass_that_raises_fails_only_the_culprit(llm, solo, monkeypatch):
    """The batch is re-run in halves until the chunk that raises alone is found."""
    poison = [3, 77, 5, 6]  # the attacker's prompt (a victim may well generate 77 itself)
    runner = llm.engine.runner
    real_run = runner.run
    calls = []

    def run(seqs):
        calls.append(len(seqs))
        if any(s.token_ids == poison for s in seqs):
            raise RuntimeError("injected fault")
        return real_run(seqs)

    monkeypatch.setattr(runner, "run", run)
    last = assert_failed_alone(llm, solo, (poison, GREEDY, None))
    assert "forward" in last.error
    assert max(calls) == 5 and 1 in calls  # the whole batch, then down to the culprit alone


def test_an_adapter_whose_files_vanish_fails_only_its_requests(llm, solo, files, tmp_path):
    folder = make_adapter(files / "base", tmp_path / "vanishing", r=4, alpha=8, seed=9)  # weights no one else has
    adapter = load_peft_adapter(folder, llm.engine.model.cfg, 64, "vanishing")
    source = AdapterSource.from_folder(folder, adapter, llm.engine.model.cfg, 64)
    llm.adapters.register(RegisteredAdapter("vanishing", source))
    shutil.rmtree(folder)
    try:
        last = assert_failed_alone(llm, solo, ([8, 9, 10], GREEDY, "vanishing"))
        assert "could not be loaded" in last.error
    finally:
        llm.adapters.unregister("vanishing")


def test_a_row_whose_sampling_raises_fails_alone(llm, solo, monkeypatch):
    import loramux.server.engine.sampling as sampling

    real_filter = sampling._filter

    def filter_(logits, top_k, top_p):
        if top_k == 7777:
            raise RuntimeError("injected sampling fault")
        return real_filter(logits, top_k, top_p)

    monkeypatch.setattr(sampling, "_filter", filter_)
    last = assert_failed_alone(llm, solo, ([50, 51], SamplingParams(max_tokens=5, temperature=0.9, top_k=7777,
                                                                    seed=3), "a1"))
    assert "sampling" in last.error


def test_tiny_temperature_and_top_p_are_served(llm, solo):
    greedy = llm.generate([[60, 61, 62]], GREEDY, ["a1"])[0].token_ids
    for params in (SamplingParams(max_tokens=10, ignore_eos=True, temperature=1e-300),
                   SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, top_p=1e-300, seed=1)):
        got, attacker = run_with_attacker(llm, ([60, 61, 62], params, "a1"))
        assert got == solo
        assert [t for o in attacker for t in o.token_ids] == greedy


# ---------------------------------------------------------------------------
# property: anything a client sends is refused at the edge or served
# ---------------------------------------------------------------------------

EXTREME_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-6, 1e-5, 0.5, 1.0, 2.0, 2.0000001, 1e300, -1e-300]),
)
EXTREME_INTS = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30, VOCAB, VOCAB - 1]),
    st.integers(),
)
TEXT = st.text(max_size=12)
FIELDS = {
    "temperature": EXTREME_FLOATS,
    "top_p": EXTREME_FLOATS,
    "top_k": EXTREME_INTS,
    "seed": EXTREME_INTS,
    "max_tokens": st.one_of(st.integers(1, 8), EXTREME_INTS),
    "min_tokens": st.one_of(st.integers(0, 3), EXTREME_INTS),
    "n": st.one_of(st.integers(1, 2), EXTREME_INTS),
    "logprobs": st.one_of(st.none(), st.integers(0, 3), EXTREME_INTS),
    "stop": st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=20)),
    "stop_token_ids": st.one_of(st.none(), st.lists(EXTREME_INTS, max_size=4)),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.one_of(st.none(), EXTREME_FLOATS),
}
PROMPTS = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
    st.lists(EXTREME_INTS, min_size=0, max_size=4),
)


def admitted(engine, body: dict) -> tuple[list[int], SamplingParams] | None:
    """What the HTTP edge does with a completions body of token ids: None when
    it answers 4xx, else what it hands the engine (choice 0)."""
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError:
        return None
    try:
        sampling = build_sampling(request, request.max_tokens, request.logprobs, 0)
    except LoramuxError:  # answered 400 by the edge
        return None
    prompt = request.prompts()[0]
    try:
        engine.check_request(prompt, sampling, None)
    except LoramuxError:  # 400 or 404
        return None
    return prompt, sampling


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # each example runs the engine
@given(body=st.fixed_dictionaries({"prompt": PROMPTS}, optional=FIELDS))
def test_every_request_is_refused_at_the_edge_or_served(llm, solo, body):
    body = {"model": "tiny", **body}
    request = admitted(llm.engine, body)
    event("refused at the edge" if request is None else "served")
    if request is None:
        return
    prompt, sampling = request
    got, attacker = run_with_attacker(llm, (prompt, sampling, "a1"))
    assert got == solo
    assert attacker[-1].error is None and attacker[-1].finish_reason in ("stop", "length")
    assert sum(len(o.token_ids) for o in attacker) <= sampling.max_tokens


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(llm):
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = llm.generate([[70, 71, 72]], params, ["d1"])[0].token_ids
    batch = run_rows(llm, [([70, 71, 72], params, "d1")] + victims(llm))
    assert batch[0] == alone
    assert len(set(map(tuple, [llm.generate([[70, 71, 72]], SamplingParams(
        max_tokens=8, temperature=0.9, seed=s, ignore_eos=True), ["d1"])[0].token_ids for s in range(4)]))) > 1
