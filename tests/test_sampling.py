"""The sampler row by row: filters against a plain reference, extreme values,
failed rows that fail alone, and seeded generators on the device of the
logits. Imports only torch and loramux.server.engine.sampling, so bench/gpu_check.sh runs
it on a lent CUDA machine (where a CPU generator with CUDA logits raises)."""
from __future__ import annotations

import pytest
import torch

from loramux.server.engine.sampling import Sampled, SampleFailed, SampleState, SamplingParams, _filter, sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def logits_on(device: str, n: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)).to(device)


def states(params, device):
    return [SampleState.for_params(p, torch.device(device)) for p in params]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_repeat_and_are_independent_of_their_neighbours(device):
    logits = logits_on(device)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    others = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    first = sample(logits.clone(), [seeded] + others, states([seeded] + others, device))
    alone = sample(logits[:1].clone(), [seeded], states([seeded], device))
    again = sample(logits.clone(), [seeded] + others, states([seeded] + others, device))
    assert all(isinstance(s, Sampled) for s in first)
    assert first[0].token == alone[0].token
    assert [s.token for s in first] == [s.token for s in again]


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_row_fails_alone(device):
    logits = logits_on(device)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams(logprobs=2)]
    out = sample(logits.clone(), params, states(params, device))
    assert isinstance(out[1], SampleFailed) and isinstance(out[2], SampleFailed)
    assert out[0].token == int(logits[0].argmax()) and out[3].token == int(logits[3].argmax())
    assert len(out[3].top) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_top_token(device):
    logits = logits_on(device)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=5e-324, seed=1),
                   SamplingParams(temperature=1.0, top_p=1e-300, seed=2)):
        out = sample(logits.clone(), [params] * 4, states([params] * 4, device))
        assert [s.token for s in out] == greedy


def test_filter_matches_a_plain_reference():
    row = torch.randn(40, generator=torch.Generator().manual_seed(3))
    for top_k, top_p in ((5, 1.0), (0, 0.5), (7, 0.3), (40, 0.99), (100, 1.0)):
        got = torch.isfinite(_filter(row, top_k, top_p))
        order = row.argsort(descending=True).tolist()
        keep = set(order[:top_k] if 0 < top_k < 40 else order)
        probs = torch.softmax(torch.tensor([row[i] if i in keep else -float("inf") for i in range(40)]), -1)
        mass, nucleus = 0.0, set()
        for i in order:
            if i in keep and (mass < top_p or not nucleus):
                nucleus.add(i)
                mass += float(probs[i])
        assert set(torch.nonzero(got).flatten().tolist()) == nucleus, (top_k, top_p)


def test_min_tokens_suppression_masks_only_its_row():
    logits = logits_on("cpu", n=2)
    eos = int(logits[0].argmax())
    out = sample(logits.clone(), [SamplingParams()] * 2, states([SamplingParams()] * 2, "cpu"), [(eos,), ()])
    assert out[0].token != eos and out[1].token == int(logits[1].argmax())


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seeds_beyond_64_bits_are_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed)


def test_suppression_never_writes_into_the_models_output():
    """The model's logits are an inference tensor; writing into one outside
    inference mode raises (found by Schemathesis: min_tokens failed every
    request in the step)."""
    with torch.inference_mode():
        logits = logits_on("cpu", n=2)
    eos = int(logits[0].argmax())
    out = sample(logits, [SamplingParams()] * 2, states([SamplingParams()] * 2, "cpu"), [(eos,), ()])
    assert out[0].token != eos and int(logits[0].argmax()) == eos
