"""The engine on a tiny random model: batching, chunking, preemption and
aborts change nothing in any request's output."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from loramux.server import LLM
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.sampling import SamplingParams
from helpers.tiny import VOCAB, make_adapter, make_dora_adapter, make_model

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
    """A consumer that leaves after the first token aborts its request: it
    ends FINISHED_ABORTED long before its 400 tokens, and frees its blocks."""
    from loramux.server.engine.request import RequestStatus

    requests, want = alone
    llm = make_llm(setup)
    seen: dict[str, object] = {}  # the abandoned request, as the engine thread saw it
    streamed: list[int] = []  # its tokens the engine produced, delivered or not

    def on_step(engine, outputs):
        for r in engine.scheduler.running:
            if r.request_id == "abandoned":
                seen["request"] = r
        streamed.extend(len(o.token_ids) for o in outputs if o.request_id == "abandoned")

    engine = AsyncEngine(llm.engine, on_step=on_step)

    def checked(p, s, a):
        return llm.engine.check_request(p, s, a and llm.adapters.lookup(a).digest)

    async def collect(p, s, a):
        return [t for out in [o async for o in engine.generate(checked(p, s, a))] for t in out.token_ids]

    async def abandon(p, a):
        stream = engine.generate(checked(p, SamplingParams(max_tokens=400, ignore_eos=True), a), "abandoned")
        async for _ in stream:
            break  # the consumer goes away after the first token

    async def main():
        got = await asyncio.gather(*(collect(*r) for r in requests[:10]), abandon([5, 6, 7], "ad1"))
        return got[:10]

    try:
        assert asyncio.run(main()) == want[:10]
        # The abort is applied by the engine thread. Without it the request
        # runs to its 400 tokens (0.4 s here), so a broken abort ends either
        # way: FINISHED_LENGTH with 400 tokens, which the asserts below catch.
        for _ in range(600):
            if not llm.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.05))
        request = seen["request"]
        assert request.status is RequestStatus.FINISHED_ABORTED
        assert len(request.output_ids) == sum(streamed) < 400
        assert not llm.engine.has_unfinished()
        assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks
        assert llm.engine.adapters.refs(llm.adapters.lookup("ad1").digest) == 0
    finally:
        engine.shutdown()


def test_a_seeded_request_samples_the_same_tokens_whatever_its_batch(setup):
    """A seed is per request: the same tokens alone, behind unseeded and other
    seeded rows (the base model's rows come first in a batch), and beside a
    twin of itself."""
    llm = make_llm(setup)
    prompt, adapter = [9, 10, 11, 12, 13], "ad2"
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded, [adapter])[0].token_ids
    greedy = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True), [adapter])[0].token_ids
    assert alone != greedy, "the seeded request must actually sample"
    rng = random.Random(3)
    companions = [
        [SamplingParams(max_tokens=rng.randint(3, 15), temperature=1.0, ignore_eos=True) for _ in range(5)],
        [SamplingParams(max_tokens=10, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2, 1234)],
        [SamplingParams(max_tokens=8, ignore_eos=True), seeded],
    ]
    for others in companions:
        prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))] for _ in others] + [prompt]
        adapters = [rng.choice([None, "ad0", "ad5"]) for _ in others] + [adapter]
        outs = llm.generate(prompts, others + [seeded], adapters)
        assert outs[-1].token_ids == alone
        if others[-1] is seeded:  # the twin (a different prompt and adapter)
            twin = llm.generate([prompts[-2]], seeded, [adapters[-2]])[0].token_ids
            assert outs[-2].token_ids == twin


def test_min_tokens_masks_eos_even_when_it_is_the_argmax(setup, tmp_path):
    """The base model with its EOS id set to the token greedy decoding picks
    at step j: without min_tokens the request stops there; with min_tokens it
    never produces EOS before min_tokens tokens and agrees before step j."""
    import json
    import shutil

    base, _ = setup
    prompt = [7, 8, 9, 10]
    free_run = make_llm(setup).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    j = next(i for i in range(2, len(free_run)) if free_run[i] not in free_run[:i])
    eos = free_run[j]
    model = tmp_path / "eos-model"
    shutil.copytree(base, model)
    for name in ("config.json", "generation_config.json"):
        if (model / name).exists():
            cfg = json.loads((model / name).read_text())
            cfg["eos_token_id"] = eos
            (model / name).write_text(json.dumps(cfg))
    llm = LLM(model=str(model), dtype="float32", block_size=4, kv_cache_bytes=4 * 2**20)
    assert llm.engine.model.cfg.eos_token_ids == (eos,)
    stopped = llm.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert stopped.token_ids == free_run[:j + 1] and stopped.finish_reason == "stop"
    for params in (SamplingParams(max_tokens=12, min_tokens=j + 4),
                   SamplingParams(max_tokens=12, min_tokens=j + 4, temperature=1.0, seed=5)):
        out = llm.generate([prompt], params)[0]
        assert len(out.token_ids) >= j + 4
        assert eos not in out.token_ids[:j + 4], out.token_ids
        if params.greedy:
            assert out.token_ids[:j] == free_run[:j]


def test_a_plain_adapter_in_an_evicted_dora_slot_gets_no_dora_scale(setup, tmp_path):
    """Three slots: DoRA adapters d1, d2, d3 fill them; then a batch d2, p, d3
    evicts d1 and writes the plain p into d1's slot, between two DoRA
    segments, so the batch applies its slots' DoRA rows. p's outputs equal p
    served alone on a fresh engine: no d1 scale was left in the slot."""
    base, adapters = setup
    dora = {f"d{i}": make_dora_adapter(base, tmp_path / f"d{i}", r=8, seed=40 + i) for i in (1, 2, 3)}
    names = {**dora, "p": adapters["ad4"]}
    greedy = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=0)
    prompts = {"d1": [3, 4, 5], "d2": [6, 7, 8, 9], "p": [10, 11], "d3": [12, 13, 14]}
    fresh = LLM(model=str(base), dtype="float32", adapters=names, block_size=4, kv_cache_bytes=4 * 2**20)
    want = {n: fresh.generate([prompts[n]], greedy, [n])[0] for n in prompts}
    llm = LLM(model=str(base), dtype="float32", adapters=names, block_size=4, kv_cache_bytes=4 * 2**20,
              max_adapter_slots=3)
    pool = llm.engine.adapters
    first = ["d1", "d2", "d3"]
    llm.generate([prompts[n] for n in first], greedy, first)
    digest = {n: llm.adapters.lookup(n).digest for n in names}
    d1_slot = pool.make_resident([digest["d1"]])[digest["d1"]]
    assert pool.device.is_dora[d1_slot]
    second = ["d2", "p", "d3"]
    got = llm.generate([prompts[n] for n in second], greedy, second)
    assert not pool.is_resident(digest["d1"])
    assert pool.make_resident([digest["p"]])[digest["p"]] == d1_slot and not pool.device.is_dora[d1_slot]
    for n, out in zip(second, got):
        assert out.token_ids == want[n].token_ids, n
        # batched and alone differ by float32 rounding (1e-6); a scale left behind moves them by far more
        torch.testing.assert_close([lp for _, lp, _ in out.logprobs], [lp for _, lp, _ in want[n].logprobs],
                                   rtol=1e-4, atol=1e-4)


def test_adapter_files_that_vanish_or_change_fail_only_their_requests(setup, tmp_path):
    """Two adapters registered from folders whose files then go (deleted;
    overwritten with garbage): their requests end with an error output, the
    other requests' outputs are those of a healthy engine, and every block
    and reference is given back."""
    import shutil

    from loramux.adapters_store.peft_format import WEIGHTS_NAME, load_peft_adapter
    from loramux.adapters_store.registry import RegisteredAdapter
    from loramux.adapters_store.sources import AdapterSource

    base, adapters = setup
    # ad1 and ad2 come only from the folders that break (the pool would share
    # the weights of another registration with the same digest)
    healthy = {n: p for n, p in adapters.items() if n not in ("ad1", "ad2")}
    llm = LLM(model=str(base), dtype="float32", adapters=healthy, block_size=4, kv_cache_bytes=4 * 2**20)
    engine = llm.engine
    for name, src in (("gone", "ad1"), ("garbled", "ad2")):
        folder = shutil.copytree(adapters[src], tmp_path / name)
        parsed = load_peft_adapter(folder, engine.model.cfg, engine.config.max_lora_rank, name=name)
        llm.adapters.register(RegisteredAdapter(name, AdapterSource.from_folder(folder, parsed, engine.model.cfg,
                                                                                engine.config.max_lora_rank)))
    (tmp_path / "gone" / WEIGHTS_NAME).unlink()
    (tmp_path / "garbled" / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 100)
    rng = random.Random(11)
    names = ["gone", None, "ad0", "garbled", "ad3", "gone", "ad4", "garbled", None, "ad5"]
    requests = [([rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))],
                 SamplingParams(max_tokens=rng.randint(2, 8), ignore_eos=True), n) for n in names]
    want = [make_llm(setup).generate([p], s, [n])[0].token_ids if n not in ("gone", "garbled") else None
            for p, s, n in requests]
    ids = [engine.add_request(p, s, llm.adapters.lookup(n).digest if n else None) for p, s, n in requests]
    results = engine.run_to_completion()
    for rid, (_, _, name), w in zip(ids, requests, want):
        outs = results[rid]
        if w is None:
            assert len(outs) == 1 and outs[0].error and outs[0].finish_reason == "error" and not outs[0].token_ids
        else:
            assert all(o.error is None for o in outs) and [t for o in outs for t in o.token_ids] == w, name
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert engine.adapters.total_refs() == 0
    engine.adapters.wait_idle()
    engine.adapters.check_consistent()


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
