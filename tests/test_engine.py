"""The engine on a tiny random model: batching, chunking, preemption and
aborts change nothing in any request's output."""
from __future__ import annotations

import asyncio
import random

import pytest

from loramux.server import LLM
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.sampling import SamplingParams
from helpers.tiny import VOCAB, make_adapter, make_model

NUM_ADAPTERS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_model(root / "base", "llama")
    adapters = {
        f"ad{i}": make_adapter(root / "base", root / f"ad{i}", r=(4, 8, 16)[i % 3], alpha=16, seed=i,
                               target_modules=("q_proj", "v_proj", "down_proj") if i % 2 else
                               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        for i in range(NUM_ADAPTERS)
    }
    return root / "base", adapters


def make_llm(setup, **options):
    base, adapters = setup
    options.setdefault("kv_cache_bytes", 4 * 2**20)
    return LLM(model=str(base), dtype="float32", adapters=adapters, block_size=4,
               adapter_pool_bytes=32 * 2**20, **options)


def random_requests(n: int, seed: int):
    rng = random.Random(seed)
    names = [None] + [f"ad{i}" for i in range(NUM_ADAPTERS)]
    return [
        ([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))],
         SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True),
         rng.choice(names))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def alone(setup):
    """Each request's tokens when it runs by itself."""
    llm = make_llm(setup)
    requests = random_requests(50, seed=7)
    return requests, [llm.generate([p], s, [a])[0].token_ids for p, s, a in requests]


@pytest.mark.parametrize("options", [
    dict(),  # everything fits: one big batch
    dict(max_num_batched_tokens=16, max_num_seqs=7, max_loras_per_batch=3),  # chunked prefill, few adapters a step
    dict(kv_cache_bytes=40 * 1024, max_num_batched_tokens=32),  # a KV cache too small: preemptions
])
def test_batched_outputs_equal_each_request_alone(setup, alone, options):
    requests, want = alone
    llm = make_llm(setup, **options)
    outs = llm.generate([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests])
    assert [o.token_ids for o in outs] == want
    engine = llm.engine
    assert engine.allocator.num_free == engine.allocator.num_blocks
    if "kv_cache_bytes" in options:
        assert engine.num_preemptions > 0, "the small KV budget was meant to force preemptions"


def test_aborting_half_leaves_the_rest_correct_and_frees_every_block(setup, alone):
    requests, want = alone
    llm = make_llm(setup, max_num_batched_tokens=24)
    engine = llm.engine
    ids = [engine.add_request(p, s, a and llm.adapters.lookup(a).digest) for p, s, a in requests[:40]]
    results: dict[str, list[int]] = {}
    for step in range(6):  # some waiting, some prefilling, some decoding
        for o in engine.step():
            results.setdefault(o.request_id, []).extend(o.token_ids)
    aborted = set(ids[::2])
    for rid in aborted:
        engine.abort(rid)
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in aborted
            results.setdefault(o.request_id, []).extend(o.token_ids)
    for i, rid in enumerate(ids):
        if rid not in aborted:
            assert results[rid] == want[i]
    assert engine.allocator.num_free == engine.allocator.num_blocks
    # every finished or aborted request released its adapter
    assert all(engine.adapters.refs(llm.adapters.lookup(f"ad{i}").digest) == 0 for i in range(NUM_ADAPTERS))


def test_async_engine_streams_and_aborts_on_consumer_exit(setup, alone):
    requests, want = alone
    llm = make_llm(setup)
    engine = AsyncEngine(llm.engine)

    def checked(p, s, a):
        return llm.engine.check_request(p, s, a and llm.adapters.lookup(a).digest)

    async def collect(p, s, a):
        return [t for out in [o async for o in engine.generate(checked(p, s, a))] for t in out.token_ids]

    async def abandon(p, a):
        async for _ in engine.generate(checked(p, SamplingParams(max_tokens=400, ignore_eos=True), a)):
            break  # the consumer goes away after the first token

    async def main():
        got = await asyncio.gather(*(collect(*r) for r in requests[:10]), abandon([5, 6, 7], "ad1"))
        return got[:10]

    try:
        assert asyncio.run(main()) == want[:10]
        for _ in range(100):  # the abort is applied by the engine thread
            if not llm.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not llm.engine.has_unfinished()
        assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks
    finally:
        engine.shutdown()


def test_request_over_context_is_rejected_before_queueing(setup):
    from loramux.server.engine.engine import RequestError

    llm = make_llm(setup)
    with pytest.raises(RequestError, match="context length"):
        llm.engine.add_request([5] * 500, SamplingParams(max_tokens=20))
    assert not llm.engine.has_unfinished()


def test_detokenizer_never_splits_a_multibyte_character():
    from transformers import AutoTokenizer

    from loramux.server.engine.detokenizer import IncrementalDetokenizer
    from loramux.server.model.loader import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    text = "Grüße aus Köln 🎉 und 東京!"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [1], stop=("東京",))
    pieces = []
    for t in ids:
        delta, stopped = detok.add(t)
        assert "\ufffd" not in delta
        pieces.append(delta)
        if stopped:
            break
    assert "".join(pieces) == "Grüße aus Köln 🎉 und "
