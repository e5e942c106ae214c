"""The sampler row by row: filters against a plain reference, extreme values,
failed rows that fail alone, and seeded generators on the device of the
logits. Imports only torch and loramux.server.engine.sampling, so bench/gpu_check.sh runs
it on a lent CUDA machine (where a CPU generator with CUDA logits raises)."""
from __future__ import annotations

import numpy as np
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


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The distribution a row samples from, in float64 numpy: softmax of
    logits / temperature over the top_k tokens, then the smallest set of the
    most likely tokens whose mass reaches top_p (the first always kept),
    renormalized. token -> probability, only the tokens that can come."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if 0 < top_k < len(z):
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    before = np.concatenate([[0.0], np.cumsum(p)[:-1]])  # mass of the more likely tokens
    n = int((before < top_p).sum()) if top_p < 1.0 else len(order)
    kept = p[:max(n, 1)] / p[:max(n, 1)].sum()
    return {int(t): float(q) for t, q in zip(order, kept)}


FILTERS = [(1.0, 5, 1.0), (1.0, 0, 0.5), (0.7, 7, 0.3), (1.3, 40, 0.99), (1.0, 100, 1.0), (0.5, 1, 1.0),
           (1.0, 3, 0.9), (2.0, 0, 0.8), (1.0, 49, 0.999)]


@pytest.mark.parametrize("temperature,top_k,top_p", FILTERS)
def test_top_k_top_p_distribution_matches_a_numpy_reference(temperature, top_k, top_p):
    """The filtered distribution: which tokens keep a nonzero probability, and
    their renormalized probabilities; then the sampler's draws, which are
    torch.multinomial of that distribution with the request's seed."""
    vocab = 50
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(top_k * 31 + int(top_p * 100)))
    want = reference_probs(row.numpy(), temperature, top_k, top_p)
    got = _filter(row / temperature, top_k, top_p).softmax(-1)
    assert set(torch.nonzero(got).flatten().tolist()) == set(want)
    torch.testing.assert_close(got[list(want)].double(), torch.tensor(list(want.values()), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    dense = torch.zeros(vocab)
    dense[list(want)] = torch.tensor(list(want.values()), dtype=torch.float32)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) for seed in range(64)]
    drawn = [s.token for s in sample(row.repeat(64, 1), params, states(params, "cpu"))]
    expected = [int(torch.multinomial(dense, 1, generator=torch.Generator().manual_seed(seed))) for seed in range(64)]
    assert drawn == expected
    assert set(drawn) <= set(want)


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
