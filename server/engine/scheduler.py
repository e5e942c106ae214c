"""Continuous batching with chunked prefill, adapter-aware admission and
preemption by recompute. Plain Python: no device code, no model."""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from loramux.server.config import EngineConfig
from loramux.server.errors import Busy
from loramux.server.engine.kv_cache import BlockAllocator
from loramux.server.engine.request import Request, RequestStatus


class QueueFull(Busy):
    """The waiting queue holds config.max_waiting requests already."""

    code = "queue_full"


@dataclass
class ScheduledChunk:
    """Compute `request.all_ids[start:start + num_tokens]` this step.

    `start` is the request's num_computed_tokens when scheduled. A decode is a
    chunk of one token; a prefill chunk may cover part of the prompt. `samples`
    is True when the chunk completes all of the request's tokens: the engine
    samples the next token for exactly those chunks."""

    request: Request
    start: int
    num_tokens: int
    samples: bool = field(init=False)

    def __post_init__(self):
        self.samples = self.start + self.num_tokens == self.request.num_tokens

    @property
    def adapter_digest(self) -> str | None:
        return self.request.adapter_digest

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_slice(self.start, self.start + self.num_tokens)


@dataclass
class SchedulerOutput:
    # Ordered so that each adapter's chunks are contiguous: the base model's
    # (adapter None) first, then each adapter in order of first scheduling.
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    num_batched_tokens: int
    adapter_digests: frozenset[str]  # distinct non-None adapter digests of the chunks

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Picks, each step, which tokens of which requests to compute.

    Queues. `waiting` is kept in arrival order (`arrival` is a counter set by
    add()); `running` holds admitted requests, also in arrival order, each with
    KV blocks for its computed tokens. At most `max_num_seqs` run at once.
    add() refuses (QueueFull) beyond `max_waiting` waiting requests, and
    (ValueError) an empty prompt or one whose prompt + max_tokens exceeds the
    whole KV cache, since such a request could never finish.

    One step, `schedule()`, under a budget of `max_num_batched_tokens` tokens:

    1. Running requests first, decodes (one uncomputed token) before those still
       prefilling, oldest arrival first within each. A prefilling request gets a
       chunk of min(uncomputed, budget left) tokens (chunked prefill), so a long
       prompt is spread over steps and never stalls the decodes.
    2. KV: a chunk needs blocks for tokens [0, start + num_tokens). If too few are
       free, the NEWEST running request (by arrival) is preempted, repeatedly,
       but only requests newer than the one asking: its blocks are freed, its
       chunk this step (if any) is dropped, num_computed_tokens goes back to 0,
       num_preemptions += 1, and it returns to `waiting` at its arrival position,
       to be recomputed (prompt + outputs so far; outputs are kept). When the
       asking request is itself the newest, it never preempts itself nor an older
       request: it takes the chunk its own blocks plus the free ones can hold,
       or waits this step, keeping its blocks.
    3. Admission, only if step 2 neither preempted nor left a request short of
       blocks (so a newly admitted request is not the next victim), while the
       budget and `max_num_seqs` allow. A waiting request is admitted with a
       first chunk of min(uncomputed, budget left) tokens if the blocks for that
       chunk are free and its adapter fits: the distinct non-None adapters of all
       running requests plus its own number at most `max_loras_per_batch` and
       pass `adapters_fit(set)`. Running requests' adapters always fit in this
       way, so each step's adapter set fits too (adapters_fit is assumed
       monotone: a subset of a fitting set fits; it must accept any single
       adapter the engine serves). A request that does not fit is skipped
       (fewer adapters are admitted, the step never fails).
    4. Admission order. A waiting request is "starved" once it has been passed
       over `max_wait_steps` times: a step passes it over when it stays waiting
       while a request that arrived after it is admitted (counted in
       `waited_steps`). Candidates are tried in this order:
         a. starved requests, oldest first (FCFS among the starved);
         b. preempted requests, oldest first (they were already being served);
         c. requests whose adapter is None, used by a running request, or
            `adapter_ready(adapter)` (resident), oldest first;
         d. all others, oldest first.
       If a starved request cannot be admitted, no request that arrived after it
       is admitted this step. So no request is ever passed over more than
       `max_wait_steps` times in its life (bounded unfairness), and, because
       running requests finish, a starved request is admitted eventually.
    5. The step's chunks are grouped by adapter (base model first), keeping the
       order above within each group, because the LoRA kernels need each
       adapter's tokens contiguous.

    The engine then runs the chunks, calls `update_after_step(output)`, appends
    a sampled token to each request whose chunk `samples`, decides stops and
    calls `finish(request, status)`. `abort(request_id)` removes a request in
    any state and frees its blocks at once.
    """

    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        adapter_ready: Callable[[str], bool] = lambda a: True,
        adapters_fit: Callable[[frozenset[str]], bool] = lambda s: True,
    ):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_loras_per_batch = config.max_loras_per_batch
        self.max_wait_steps = config.max_wait_steps
        self.max_waiting = config.max_waiting
        self.allocator = allocator
        self.adapter_ready = adapter_ready
        self.adapters_fit = adapters_fit
        self._waiting: list[Request] = []  # sorted by arrival
        self._running: list[Request] = []  # sorted by arrival
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._running_adapters: Counter[str] = Counter()  # non-None adapters of running
        self._next_arrival = 0

    # ---- queues -----------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests are waiting already")
        capacity = self.allocator.num_blocks * self.allocator.block_size
        longest = len(request.prompt_ids) + request.sampling.max_tokens
        if longest > capacity:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                f"({request.sampling.max_tokens}) exceeds the KV cache ({capacity} tokens)"
            )
        request.arrival = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self._waiting.append(request)  # the newest arrival: still sorted
        self._requests[request.request_id] = request

    def abort(self, request_id: str) -> Request | None:
        """Abort a request in any state; None if it is unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Free the request's blocks and drop it from the queues. A request that
        is already finished is left as it is."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        if request.is_finished or self._requests.get(request.request_id) is not request:
            return
        if request.status is RequestStatus.RUNNING:
            self._remove_running(request)
        else:
            self._waiting.remove(request)
        self._free_blocks(request)
        request.status = status
        del self._requests[request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    def adapter_in_use(self, adapter: str) -> bool:
        """True while a running request uses the adapter (the pool must keep it)."""
        return self._running_adapters[adapter] > 0

    def waiting_adapters(self) -> list[str]:
        """Distinct adapters of waiting requests, oldest first (for prefetch)."""
        return list(dict.fromkeys(r.adapter_digest for r in self._waiting if r.adapter_digest is not None))

    # ---- one step ---------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: dict[str, ScheduledChunk] = {}  # request_id -> chunk, in scheduling order
        step_adapters: set[str] = set()
        preempted: list[Request] = []
        short_of_blocks = False

        # 1-2. Running requests: decodes, then prefill chunks; oldest first.
        order = sorted(self._running, key=lambda r: (r.num_uncomputed > 1, r.arrival))
        for request in order:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_uncomputed, budget)
            if n == 0:
                continue
            if not self._step_adapter_fits(step_adapters, request.adapter_digest):
                continue
            while self._blocks_short(request, n) > 0:
                victim = self._running[-1]
                if victim.arrival <= request.arrival:
                    break  # the asking request is the newest: it waits
                dropped = chunks.pop(victim.request_id, None)
                if dropped is not None:
                    budget += dropped.num_tokens
                self._preempt(victim)
                preempted.append(victim)
            if self._blocks_short(request, n) > 0:
                short_of_blocks = True
                room = (len(request.block_ids) + self.allocator.num_free) * self.allocator.block_size
                n = min(n, room - request.num_computed_tokens)
                if n <= 0:
                    continue
            self._grow(request, n)
            chunks[request.request_id] = ScheduledChunk(request, request.num_computed_tokens, n)
            if request.adapter_digest is not None:
                step_adapters.add(request.adapter_digest)
            budget -= n
        # Adapters of the chunks that survived preemption.
        step_adapters = {c.adapter_digest for c in chunks.values() if c.adapter_digest is not None}

        # 3-4. Admission.
        admitted: list[Request] = []
        if not preempted and not short_of_blocks:
            admitted = self._admit(budget, chunks, step_adapters)
        if admitted:
            newest = max(r.arrival for r in admitted)
            for request in self._waiting:
                if request.arrival >= newest:
                    break
                request.waited_steps += 1

        # 5. Group by adapter, base model first.
        groups: dict[str | None, list[ScheduledChunk]] = {None: []}
        for chunk in chunks.values():
            groups.setdefault(chunk.adapter_digest, []).append(chunk)
        ordered = [c for group in groups.values() for c in group]
        return SchedulerOutput(
            chunks=ordered,
            preempted=preempted,
            num_batched_tokens=sum(c.num_tokens for c in ordered),
            adapter_digests=frozenset(a for a in groups if a is not None),
        )

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Mark the scheduled tokens as computed (their KV is in the cache)."""
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished since schedule()
            if request.num_computed_tokens != chunk.start:
                raise RuntimeError(
                    f"request {request.request_id!r}: chunk starts at {chunk.start}, "
                    f"but {request.num_computed_tokens} tokens are computed"
                )
            request.num_computed_tokens += chunk.num_tokens

    # ---- helpers ----------------------------------------------------------

    def _admit(self, budget: int, chunks: dict[str, ScheduledChunk], step_adapters: set[str]) -> list[Request]:
        admitted: list[Request] = []
        tried: set[int] = set()  # arrivals that did not fit this step
        barrier = None  # no arrival after this one is admitted (a starved request waits)
        while budget > 0 and len(self._running) < self.max_num_seqs:
            request = self._next_candidate(tried, barrier)
            if request is None:
                break
            n = min(request.num_uncomputed, budget)
            fits = (
                self.allocator.can_allocate(self.allocator.blocks_needed(n))
                and self._running_adapter_fits(request.adapter_digest)
                and self._step_adapter_fits(step_adapters, request.adapter_digest)
            )
            if not fits:
                tried.add(request.arrival)
                if request.waited_steps >= self.max_wait_steps:
                    barrier = request.arrival
                continue
            self._waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self._add_running(request)
            self._grow(request, n)
            chunks[request.request_id] = ScheduledChunk(request, request.num_computed_tokens, n)
            if request.adapter_digest is not None:
                step_adapters.add(request.adapter_digest)
            budget -= n
            admitted.append(request)
        return admitted

    def _next_candidate(self, tried: set[int], barrier: int | None) -> Request | None:
        best, best_rank = None, 4
        for request in self._waiting:  # oldest first: the first of each rank wins
            if barrier is not None and request.arrival > barrier:
                break
            if request.arrival in tried:
                continue
            if request.waited_steps >= self.max_wait_steps:
                return request  # rank 0: the oldest starved request
            if request.num_preemptions > 0:
                rank = 1
            elif best_rank <= 2:
                continue  # only a starved or preempted request can still win
            elif (request.adapter_digest is None or self._running_adapters[request.adapter_digest] > 0
                  or self.adapter_ready(request.adapter_digest)):
                rank = 2
            else:
                rank = 3
            if rank < best_rank:
                best, best_rank = request, rank
        return best

    def _running_adapter_fits(self, adapter: str | None) -> bool:
        if adapter is None or self._running_adapters[adapter] > 0:
            return True
        adapters = frozenset(self._running_adapters) | {adapter}
        return len(adapters) <= self.max_loras_per_batch and self.adapters_fit(adapters)

    def _step_adapter_fits(self, step_adapters: set[str], adapter: str | None) -> bool:
        if adapter is None or adapter in step_adapters:
            return True
        adapters = frozenset(step_adapters) | {adapter}
        return len(adapters) <= self.max_loras_per_batch and self.adapters_fit(adapters)

    def _blocks_short(self, request: Request, n: int) -> int:
        """Blocks missing for computing n more tokens of the request."""
        need = self.allocator.blocks_needed(request.num_computed_tokens + n) - len(request.block_ids)
        return max(0, need - self.allocator.num_free)

    def _grow(self, request: Request, n: int) -> None:
        need = self.allocator.blocks_needed(request.num_computed_tokens + n) - len(request.block_ids)
        if need > 0:
            request.block_ids.extend(self.allocator.allocate(need))

    def _preempt(self, request: Request) -> None:
        self._remove_running(request)
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        bisect.insort(self._waiting, request, key=lambda r: r.arrival)

    def _add_running(self, request: Request) -> None:
        bisect.insort(self._running, request, key=lambda r: r.arrival)
        if request.adapter_digest is not None:
            self._running_adapters[request.adapter_digest] += 1

    def _remove_running(self, request: Request) -> None:
        self._running.remove(request)
        if request.adapter_digest is not None:
            self._running_adapters[request.adapter_digest] -= 1
            if self._running_adapters[request.adapter_digest] == 0:
                del self._running_adapters[request.adapter_digest]

    def _free_blocks(self, request: Request) -> None:
        if request.block_ids:
            self.allocator.free(request.block_ids)
            request.block_ids = []
