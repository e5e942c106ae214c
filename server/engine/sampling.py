"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loramux.server.engine.guided import GuideMasks

MAX_STOP_STRINGS = 16
# Below this a temperature is greedy (as vLLM does): dividing logits by a
# tinier one overflows them to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives to report
    # Also score the prompt (vLLM's prompt_logprobs): None = off, k = each prompt
    # token's logprob and rank plus the top k alternatives
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0 or self.temperature != self.temperature:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails this too
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError("prompt_logprobs must be between 0 and 20")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError("seed must be a 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class SampleState:
    """Per-request sampler state: its private random stream."""

    generator: torch.Generator | None = None

    @classmethod
    def for_params(cls, params: SamplingParams, device: torch.device | str = "cpu") -> "SampleState":
        """`device` is where the logits live: torch.multinomial wants a
        generator on the device of its input."""
        if params.greedy:
            return cls()
        g = torch.Generator(device=device)
        if params.seed is not None:
            g.manual_seed(params.seed)
        else:
            g.seed()
        return cls(generator=g)


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: float  # NaN unless the request asked for logprobs
    top: tuple[tuple[int, float], ...] = field(default=())


@dataclass(frozen=True)
class SampleFailed:
    """A row that could not be sampled; it ends that request only."""

    reason: str


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [V] float32 -> the same with excluded tokens at -inf
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the most
        # likely token always stays (a tiny top_p would otherwise drop all)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    states: list[SampleState],
    suppress: list[tuple[int, ...]] | None = None,
    masks: GuideMasks | None = None,
) -> list[Sampled | SampleFailed]:
    """One token per row of logits [N, V] (float32); `suppress` lists token
    ids a row may not produce yet (EOS before min_tokens); `masks` hold the
    grammar bitmasks of the guided rows (structured outputs). Reported
    logprobs are those of the logits before the grammar mask (as vLLM's
    default raw logprobs); the token is sampled after it.

    Rows are independent: a row whose logits are not finite (a broken
    adapter), or whose sampling raises, gives SampleFailed and every other
    row is sampled exactly as it would have been without it."""
    finite_rows = torch.isfinite(logits).all(dim=-1)  # before suppression writes -inf
    if suppress is not None and any(suppress):
        logits = logits.clone()  # the model's output may be an inference tensor: never written in place
        for i, ids in enumerate(suppress):
            if ids:
                logits[i, list(ids)] = float("-inf")
    reported = logits
    if masks is not None:
        logits = logits.clone()  # `reported` keeps the unmasked rows
        masks.apply(logits)
    # one device -> host transfer for both (a sync on CUDA)
    greedy_tokens, finite = torch.stack([logits.argmax(dim=-1), finite_rows.long()]).tolist()
    # log-softmax over the vocabulary only for the rows that report logprobs
    wants = [i for i, p in enumerate(params) if p.logprobs is not None and finite[i]]
    logprobs = dict(zip(wants, torch.log_softmax(reported[wants], dim=-1))) if wants else {}
    out: list[Sampled | SampleFailed] = []
    for i, (p, st) in enumerate(zip(params, states)):
        if not finite[i]:
            out.append(SampleFailed("the model produced non-finite logits for this request"))
            continue
        try:
            out.append(_sample_row(logits[i], greedy_tokens[i], p, st, logprobs.get(i)))
        except (RuntimeError, ValueError) as exc:  # torch's errors for a row it cannot sample
            out.append(SampleFailed(f"sampling failed: {type(exc).__name__}"))
    return out


def _sample_row(row: torch.Tensor, greedy_token: int, p: SamplingParams, st: SampleState,
                logprobs: torch.Tensor | None) -> Sampled:
    # row: [V] float32; logprobs: [V] or None
    if p.greedy:
        token = greedy_token
    else:
        probs = _filter(row / p.temperature, p.top_k, p.top_p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=st.generator))
    top, logprob = (), float("nan")
    if logprobs is not None:
        logprob = float(logprobs[token])
        if p.logprobs:
            vals, idx = torch.topk(logprobs, p.logprobs)
            top = tuple(zip(idx.tolist(), vals.tolist()))
    return Sampled(token, logprob, top)
