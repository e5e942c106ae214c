"""A request: the unit of work the scheduler moves between its queues."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new, or preempted and to be recomputed)
    RUNNING = "running"  # admitted: holds KV blocks, scheduled every step it fits
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "abort"  # client went away or the server cancelled it

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop", "length", "abort"), None while unfinished."""
        return self.value if self.is_finished else None


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(eq=False)
class Request:
    """Tokens, adapter, state and block table of one generation.

    The unit of computation is `all_ids` = prompt + generated outputs. The KV of
    `all_ids[:num_computed_tokens]` is in the cache (in `block_ids`); the rest is
    still to be computed:

        all_ids:  p0 p1 p2 p3 p4 | o0 o1 o2
                  |<---- computed ---->|<-->| num_uncomputed = 2
                                       num_computed_tokens = 6

    A decoding request has exactly one uncomputed token: the last sampled one.
    Preemption frees the blocks and sets num_computed_tokens back to 0; the
    outputs stay, and are recomputed with the prompt as one longer "prompt".
    """

    request_id: str
    prompt_ids: list[int]
    sampling: Any  # anything with `max_tokens: int` (loramux.server.engine.sampling.SamplingParams)
    adapter_digest: str | None = None  # the adapter's content digest; None: the base model
    arrival: int = -1  # set by Scheduler.add: a monotonically increasing counter
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Steps this request was passed over while waiting: it stayed waiting and a
    # later arrival was admitted (see Scheduler).
    waited_steps: int = 0
    # What the engine matched when it finished the request FINISHED_STOPPED
    # (a stop token id or stop string), else None.
    stop_reason: int | str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step asks
        for one token of a list that grows every step)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while the request fills the cache with tokens it already has:
        more than one token of `all_ids` is uncomputed, or nothing has been
        sampled yet. False when decoding (only the last sampled token is
        uncomputed). After a preemption this is True again until the prompt
        and the earlier outputs are recomputed."""
        return self.num_uncomputed > 1 or not self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens
