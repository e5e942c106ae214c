r"""Per-token adapter slots -> segments, the unit every LoRA kernel works on.

The model runner orders a batch so that the tokens of one adapter are
contiguous; a segment is a maximal run of consecutive tokens with the same
adapter slot. Slot -1 means "no adapter" (the base model alone):

    token index   0  1  2  3  4  5  6  7
    token slot    3  3  3 -1 -1  0  0  3
                  \_____/ \___/ \___/  |
    segment         0       1     2    3
    starts        [ 0,      3,    5,   7 ]
    lens          [ 3,      2,    2,   1 ]
    slots         [ 3,     -1,    0,   3 ]

Every kernel skips a segment whose slot is -1, so its output rows are left
exactly as the base GEMM wrote them. The same slot may appear in two segments
(slot 3 above); that is correct, only slower than one longer run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NO_ADAPTER = -1


@dataclass(frozen=True)
class Segments:
    starts: torch.Tensor  # [S] int32, token index where each segment begins
    lens: torch.Tensor  # [S] int32, tokens in each segment
    slots: torch.Tensor  # [S] int32, adapter slot in the pool, or -1
    # Host copies: the CPU path loops over them and the Triton launch sizes
    # its grid from them, so neither has to read the device tensors back.
    starts_host: tuple[int, ...]
    lens_host: tuple[int, ...]
    slots_host: tuple[int, ...]
    num_tokens: int
    max_len: int

    @property
    def num_segments(self) -> int:
        return len(self.starts_host)

    def with_adapter(self):
        """(start, length, slot) of every segment that has an adapter."""
        return [
            (s, n, a)
            for s, n, a in zip(self.starts_host, self.lens_host, self.slots_host)
            if a != NO_ADAPTER
        ]


def make_segments(
    token_slots: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
) -> Segments:
    """Split per-token adapter slots into runs of equal slot (see module doc)."""
    if isinstance(token_slots, torch.Tensor):
        token_slots = token_slots.tolist()
    starts: list[int] = []
    lens: list[int] = []
    slots: list[int] = []
    for i, slot in enumerate(token_slots):
        if slot < NO_ADAPTER:
            raise ValueError(f"adapter slot {slot} at token {i} is below -1")
        if slots and slots[-1] == slot:
            lens[-1] += 1
        else:
            starts.append(i)
            lens.append(1)
            slots.append(int(slot))
    return segments_from_runs(starts, lens, slots, len(token_slots), device)


def segments_from_runs(
    starts: Sequence[int],
    lens: Sequence[int],
    slots: Sequence[int],
    num_tokens: int,
    device: torch.device | str = "cpu",
) -> Segments:
    """Segments from runs the caller already knows (the model runner does)."""
    def as_tensor(values):
        return torch.tensor(list(values), dtype=torch.int32, device=device)

    return Segments(
        starts=as_tensor(starts),
        lens=as_tensor(lens),
        slots=as_tensor(slots),
        starts_host=tuple(int(v) for v in starts),
        lens_host=tuple(int(v) for v in lens),
        slots_host=tuple(int(v) for v in slots),
        num_tokens=int(num_tokens),
        max_len=max(lens, default=0),
    )
