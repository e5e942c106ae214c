"""How close a bfloat16 forward must come to the exact one, and greedy
tokens compared under that bound (tests/test_bf16.py).

Both loramux and transformers (+ PEFT) round every activation to bf16
(relative error up to 2^-9 per rounding) at about the same points: each
linear's output, the residual adds, the attention output, the norms; both
compute a LoRA delta in float32 accumulators and round it once into the bf16
output. Their errors against a float64 truth of the same weights are sums of
the same number of roundings of the same magnitudes, carried through the same
network with different, effectively random, signs: two draws of one
distribution. So loramux is held to K times transformers' own error on the
same input, plus a floor EPS for a row where that error happens to be small.

K = 3: taken over all positions and the whole vocabulary of a row, the norm
averages the per-token chaos (a long prompt amplifies rounding more), and the
two draws stay within a small factor: measured on test_bf16's rows at most
1.15 on the CPU path and 1.66 on the Triton path, which also rounds A, B and
the shrink output h to bf16. EPS: two bf16 roundings of the logits, 2 * 2^-9
of their norm. A wrong LoRA scale (x1.05 gives a ratio of 7.8 on the rsLoRA
row; alpha/r for rsLoRA 137), a missing module (27), a dropped DoRA row scale
(78) or mix source (94) moves a row far beyond that.
"""
from __future__ import annotations

import torch

K = 3.0
EPS = 2 * 2.0**-9


def noise_bound(hf_err, truth: torch.Tensor):
    """The largest |loramux_bf16 - truth| accepted where |hf_bf16 - truth| is
    hf_err (the same norm); truth: the float64 logits."""
    return K * hf_err + EPS * truth.norm()


def assert_greedy_agrees(got: list[int], hf_logits: torch.Tensor, truth_logits: torch.Tensor, what: str = ""):
    """loramux's greedy tokens `got` against transformers' bf16 logits on the
    same prefixes (teacher-forced on `got`, so every step is compared, not
    only those before a first split). hf_logits, truth_logits: [len(got),
    vocab], step t's next-token logits after prompt + got[:t].

    At each step loramux must pick transformers' top token i, unless it is a
    near-tie: with n = |hf - truth|_inf and loramux's error at most K·n per
    logit (the bound above), loramux's logits of i and of its pick j differ
    by at least (hf_i - hf_j) - 2n - 2Kn, so it can prefer j only if
    hf_i - hf_j <= 2(K+1)·n (+ the EPS floor)."""
    assert len(got) == len(hf_logits) == len(truth_logits)
    for t, j in enumerate(got):
        hf, truth = hf_logits[t].double(), truth_logits[t].double()
        i = int(hf.argmax())
        if i == j:
            continue
        gap = float(hf[i] - hf[j])
        n = float((hf - truth).abs().max())
        bound = 2 * (K + 1) * n + EPS * float(truth.abs().max())
        assert gap <= bound, (f"{what} step {t}: loramux picked {j}, transformers {i}, {gap:.3f} apart in HF's "
                              f"logits, beyond the bf16 noise bound {bound:.3f}; tokens {got}")


def assert_logprobs_close(logprobs, hf_logits, truth_logits, what: str = "") -> None:
    """The engine's reported log-probabilities (Completion.logprobs: per
    step (token, logprob, top), `top` the engine's top alternatives) against
    the truth on the same prefixes, within noise_bound of transformers' own
    error over the same entries. hf_logits, truth_logits:
    [steps, vocab], one row per entry of `logprobs`; all steps of a sequence
    are judged together (one norm), which averages the per-step chaos as the
    all-positions norm of the model-level test does."""
    got, hf, truth = [], [], []
    for (_, _, top), h, w in zip(logprobs, hf_logits, truth_logits):
        idx = torch.tensor([tok for tok, _ in top])
        got.append(torch.tensor([lp for _, lp in top], dtype=torch.float64))
        hf.append(torch.log_softmax(h.double(), -1)[idx])
        truth.append(torch.log_softmax(w.double(), -1)[idx])
    got, hf, truth = torch.cat(got), torch.cat(hf), torch.cat(truth)
    err, hf_err = (got - truth).norm(), (hf - truth).norm()
    bound = noise_bound(hf_err, truth)
    assert err <= bound, (f"{what}: |loramux - truth| {err:.3f} over {len(logprobs)} steps' top log-probs > bound "
                          f"{bound:.3f} (|transformers bf16 - truth| {hf_err:.3f})")
