"""Prompt logprobs (SamplingParams.prompt_logprobs) on a tiny random Llama
equal transformers + PEFT's log_softmax of the full-sequence logits: for base
and adapter rows in one batch, over several prefill chunks, after a preemption
mid-prefill, with the top-k alternatives; and asking for them changes nothing
for any other row."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from loramux.server import LLM
from loramux.server.engine.sampling import SamplingParams
from loramux.server.model.runner import ModelRunner, PromptScoring, SeqChunk
from helpers.tiny import VOCAB, build, make_adapter, make_model, peft_model

# float32 on both sides; the order of the sums differs (chunked attention, the LoRA delta apart)
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_logprobs")
    make_model(root / "base", "llama")
    make_adapter(root / "base", root / "ad", r=8, alpha=16, seed=3)
    return root


@pytest.fixture(scope="module")
def refs(files):
    """adapter name (None: base) -> transformers (+ PEFT) model, float32."""
    return {None: peft_model(files / "base", None), "ad": peft_model(files / "base", files / "ad")}


def make_llm(files, **options) -> LLM:
    options.setdefault("kv_cache_bytes", 4 * 2**20)
    return LLM(model=str(files / "base"), dtype="float32", adapters={"ad": files / "ad"}, block_size=4,
               adapter_pool_bytes=8 * 2**20, **options)


def reference_logprobs(ref, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the reference's logits over the whole prompt: [P, V]; row j scores token j + 1."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_prompt_logprobs_equal_reference(got, ref, prompt: list[int], k: int) -> None:
    assert got is not None and len(got) == len(prompt) and got[0] is None
    lp = reference_logprobs(ref, prompt)
    want = torch.stack([lp[j - 1, prompt[j]] for j in range(1, len(prompt))])
    torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]), want, **TOL)
    ranks = [int((lp[j - 1] >= lp[j - 1, prompt[j]]).sum()) for j in range(1, len(prompt))]
    assert [e.rank for e in got[1:]] == ranks and max(ranks) > 1
    vals, ids = torch.topk(lp[:-1], k, dim=-1)  # [P - 1, k]
    assert all(len(e.top) == k for e in got[1:])
    assert [[t for t, _ in e.top] for e in got[1:]] == ids.tolist()
    if k:
        torch.testing.assert_close(torch.tensor([[v for _, v in e.top] for e in got[1:]]), vals, **TOL)


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_base_and_adapter_rows_in_one_batch_equal_peft(files, refs):
    llm = make_llm(files)
    prompts = [prompt_of(13, 1), prompt_of(9, 2), prompt_of(11, 3)]
    samplings = [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=3),
                 SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=0),
                 SamplingParams(max_tokens=3, ignore_eos=True)]  # a neighbour that does not ask
    outs = llm.generate(prompts, samplings, [None, "ad", "ad"])
    assert_prompt_logprobs_equal_reference(outs[0].prompt_logprobs, refs[None], prompts[0], 3)
    assert_prompt_logprobs_equal_reference(outs[1].prompt_logprobs, refs["ad"], prompts[1], 0)
    assert outs[2].prompt_logprobs is None


def test_delivered_once_on_the_first_output(files):
    llm = make_llm(files)
    engine = llm.engine
    rid = engine.add_request(prompt_of(10, 4), SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1))
    outs = engine.run_to_completion()[rid]
    assert len(outs) == 4 and len(outs[0].prompt_logprobs) == 10
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_a_prompt_over_several_prefill_chunks(files, refs):
    llm = make_llm(files, max_num_batched_tokens=8)
    runner = llm.engine.runner
    real = runner.run_scoring
    scored = []  # (chunk start, scored positions) of every scoring chunk

    def run_scoring(seqs):
        scored.extend((s.start, len(s.scoring.targets)) for s in seqs if s.scoring is not None)
        return real(seqs)

    runner.run_scoring = run_scoring
    prompt = prompt_of(30, 5)
    out = llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2), ["ad"])[0]
    # four chunks of 8, 8, 8, 6 tokens; the last position (29) predicts the first output
    assert scored == [(0, 8), (8, 8), (16, 8), (24, 5)]
    assert_prompt_logprobs_equal_reference(out.prompt_logprobs, refs["ad"], prompt, 2)


def test_a_request_preempted_mid_prefill_reports_each_position_once(files, refs):
    # 20 KV blocks of 4 tokens and 8-token chunks: the older requests' decodes
    # preempt the newer ones, some of them between two chunks of their prompt
    llm = make_llm(files, kv_cache_bytes=40 * 1024, max_num_batched_tokens=8)
    scheduler = llm.engine.scheduler
    real_preempt = scheduler._preempt
    mid_prefill = []

    def preempt(request):
        if not request.output_ids and request.num_computed_tokens > 0:
            mid_prefill.append(request.request_id)
        real_preempt(request)

    scheduler._preempt = preempt
    prompts = [prompt_of(n, 10 + n) for n in (20, 18, 22, 19, 17)]
    samplings = [SamplingParams(max_tokens=30, ignore_eos=True, prompt_logprobs=2) for _ in prompts]
    adapters = [None, "ad", None, "ad", "ad"]
    outs = llm.generate(prompts, samplings, adapters)
    assert llm.engine.num_preemptions > 0 and mid_prefill, "the small KV cache was meant to preempt a prefill"
    for out, prompt, adapter in zip(outs, prompts, adapters):
        assert_prompt_logprobs_equal_reference(out.prompt_logprobs, refs[adapter], prompt, 2)
    alone = [make_llm(files).generate([p], s, [a])[0] for p, s, a in zip(prompts, samplings, adapters)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


def test_a_row_that_asks_changes_nothing_for_its_neighbours(files):
    """The same batch with and without prompt_logprobs on one row: every other
    row's tokens and logprobs are identical, bit for bit."""
    prompts = [prompt_of(25, 20), prompt_of(7, 21), prompt_of(16, 22)]
    adapters = ["ad", None, "ad"]
    neighbours = [SamplingParams(max_tokens=6, temperature=0.8, seed=5, logprobs=3, ignore_eos=True),
                  SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True)]

    def run(asking: bool):
        asker = SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=4 if asking else None)
        return make_llm(files, max_num_batched_tokens=16).generate(prompts, [asker, *neighbours], adapters)

    with_it, without = run(True), run(False)
    assert with_it[0].prompt_logprobs is not None and without[0].prompt_logprobs is None
    for a, b in zip(with_it, without):
        assert a.token_ids == b.token_ids
        assert [(t, lp, top) for t, lp, top in a.logprobs] == [(t, lp, top) for t, lp, top in b.logprobs]


def test_run_scoring_logits_are_runs_bit_for_bit(files):
    _, model, kv = build(files / "base", num_blocks=32)
    runner = ModelRunner(model, kv)
    a, b = prompt_of(12, 30), prompt_of(5, 31)
    plain = [SeqChunk(a, 0, [0, 1, 2]), SeqChunk(b, 0, [3, 4])]
    scoring = [SeqChunk(a, 0, [0, 1, 2], scoring=PromptScoring(2, tuple(a[3:12]) + (7,), 3)), plain[1]]
    want = runner.run(plain)
    logits, scores = runner.run_scoring(scoring)
    assert torch.equal(logits, want) and scores[1] is None and len(scores[0]) == 10
    # the last scored position (11) predicts the token after the chunk, given as 7
    whole = dataclasses.replace(runner.prepare([plain[0]]), logits_index=torch.arange(12))
    full = torch.log_softmax(model.forward(whole, kv), -1)
    torch.testing.assert_close(torch.tensor([s.logprob for s in scores[0]]),
                               full[2:12].gather(1, torch.tensor([*a[3:12], 7])[:, None])[:, 0], **TOL)


def test_prompt_logprobs_are_validated_like_logprobs():
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
