"""bench/baselines.py --smoke: HF PEFT one adapter at a time, PEFT mixed
batches and merged weights make exactly loramux's greedy tokens for the same
requests (tiny random model, mixed ranks, base-model requests, varied prompt
lengths), so the throughput ratios compare the same work."""
from __future__ import annotations

import pytest

from loramux.bench import baselines


@pytest.mark.slow
def test_smoke_baselines_generate_what_loramux_generates(tmp_path):
    outs = baselines.smoke(tmp_path)
    adapters = outs.pop("_adapters")
    assert set(outs) == {"loramux", *baselines.SYSTEMS}
    assert None in adapters and len({a for a in adapters if a}) == 3  # base requests and three adapters
    ours = outs["loramux"]
    assert all(4 <= len(o) <= 8 for o in ours)  # max_tokens honoured, EOS ignored
    for system in baselines.SYSTEMS:
        mismatched = [i for i, (a, b) in enumerate(zip(outs[system], ours)) if a != b]
        assert not mismatched, (system, [(adapters[i], outs[system][i], ours[i]) for i in mismatched])


def test_report_prints_ratios():
    runs = {"loramux": baselines.Run("loramux", 1.0, [[1, 2]] * 4),
            "peft-mixed": baselines.Run("peft-mixed", 3.0, [[1, 2]] * 4)}
    text = baselines.report(runs, 4)
    header, *rows = text.splitlines()
    assert header.split() == ["system", "seconds", "req/s", "tok/s", "loramux/this"]
    # name, seconds, requests/s, tokens/s, and how many times loramux's time the system took
    assert [row.split() for row in rows] == [["loramux", "1.00", "4.00", "8.0", "1.00x"],
                                             ["peft-mixed", "3.00", "1.33", "2.7", "3.00x"]]
