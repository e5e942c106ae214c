"""The engine: one step = schedule -> make adapters resident -> run -> postprocess.

`Engine` is synchronous and single-threaded (the offline `LLM` drives it
directly). `AsyncEngine` (async_engine.py) runs it in its own thread and hands
each request's outputs to an asyncio queue, for the HTTP server.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loramux.adapters_store.pool import AdapterGone, AdapterPool
from loramux.server.config import EngineConfig
from loramux.server.errors import Failed, Invalid
from loramux.server.engine.detokenizer import IncrementalDetokenizer
from loramux.server.engine.guided import Guide, GuideMasks, GuideMatcher
from loramux.server.engine.kv_cache import BlockAllocator
from loramux.server.model.kv_tensors import KVCache
from loramux.server.model.runner import ModelRunner, PromptLogprob, PromptScoring, SeqChunk
from loramux.server.engine.request import Request, RequestStatus
from loramux.server.engine.sampling import Sampled, SampleFailed, SampleState, SamplingParams, sample
from loramux.server.engine.scheduler import ScheduledChunk, Scheduler

log = logging.getLogger("loramux.engine")


class RequestError(Invalid):
    """A request that cannot be served as asked."""

    code = "invalid_request"


class RequestFailed(Failed):
    """The engine could not go on with this request (and with this request
    only: see Engine.step); the message is safe to show its client."""


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    adapter_label: str | None  # the caller's label of the request's adapter (CheckedRequest)
    text: str  # new text since the last output
    token_ids: list[int]  # new tokens since the last output
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]  # (token, logprob, top)
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # set, with finish_reason "error", when the engine failed this request
    # On a request's first output when its sampling asks for prompt_logprobs: one
    # entry per prompt token, entry i scoring prompt token i given the ones
    # before it; entry 0 is None (nothing precedes the first token).
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed Engine.check_request, the one validation: only
    that method makes these, and admit() takes nothing else."""

    prompt_ids: list[int]
    sampling: SamplingParams
    adapter_digest: str | None  # the weights it runs with; None: the base model
    # What the caller calls those weights, echoed in outputs for its metrics
    # (the API: the adapter's name, or "mix"); the engine never reads it.
    adapter_label: str | None = None
    guide: Guide | None = None  # the grammar its output must match (structured outputs)


@dataclass
class _Generation:
    """Engine-side state of a request beyond what the scheduler tracks."""

    request: Request
    adapter_label: str | None
    detok: IncrementalDetokenizer | None
    sampler: SampleState
    stop_ids: frozenset[int]
    matcher: GuideMatcher | None = None  # where a guided request stands in its grammar
    arrival_time: float = field(default_factory=time.monotonic)
    # The prompt logprobs so far (entry 0 None, entry j+1 from position j), while
    # the request asks for them and they are not delivered yet; else None.
    prompt_logprobs: list[PromptLogprob | None] | None = field(init=False)

    def __post_init__(self):
        self.prompt_logprobs = [None] if self.request.sampling.prompt_logprobs is not None else None


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig, adapters: AdapterPool | None = None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.context_len = cfg.max_position_embeddings
        num_blocks = KVCache.blocks_for_budget(cfg, config.kv_cache_bytes, config.block_size, model.dtype)
        self.kv = KVCache(cfg, num_blocks, config.block_size, model.dtype, model.device)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.adapters = adapters = adapters if adapters is not None else AdapterPool.for_model(model, config)
        self.scheduler = Scheduler(
            config, self.allocator,
            adapter_ready=adapters.is_resident,
            adapters_fit=lambda names: adapters.fits(names, self._adapters_in_use()),
        )
        self.runner = ModelRunner.for_pool(model, self.kv, adapters.device)
        self._gens: dict[str, _Generation] = {}
        self._ids = itertools.count()
        # For metrics (read in the engine thread by AsyncEngine.on_step).
        self.num_preemptions = 0  # total so far

    def _adapters_in_use(self) -> frozenset[str]:
        """Digests of the adapters that running requests need."""
        return frozenset(r.adapter_digest for r in self.scheduler.running if r.adapter_digest is not None)

    # -- requests -------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], sampling: SamplingParams, adapter_digest: str | None = None,
                      adapter_label: str | None = None, guide: Guide | None = None) -> CheckedRequest:
        """The request, checked; RequestError (or AdapterGone) for one that can never be served.
        Reads only fixed sizes and the (thread-safe) pool, so the API calls it
        on the event loop, before anything reaches the engine thread."""
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.context_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} "
                f"exceeds the model's context length of {self.context_len}",
                "max_tokens",
            )
        if self.allocator.blocks_needed(total) > self.allocator.num_blocks:
            raise RequestError(
                f"prompt + max_tokens = {total} tokens do not fit in the KV cache "
                f"({self.allocator.num_blocks * self.allocator.block_size} tokens)",
                "max_tokens",
            )
        if any(not 0 <= t < vocab for t in sampling.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if adapter_digest is not None and adapter_digest not in self.adapters:
            raise AdapterGone("the adapter does not exist", "model", "model_not_found")
        return CheckedRequest(list(prompt_ids), sampling, adapter_digest, adapter_label, guide)

    def add_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter_digest: str | None = None,
        request_id: str | None = None,
        adapter_label: str | None = None,
        guide: Guide | None = None,
    ) -> str:
        """Check and admit a request (the offline API's edge); its id."""
        return self.admit(self.check_request(prompt_ids, sampling, adapter_digest, adapter_label, guide), request_id)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def admit(self, checked: CheckedRequest, request_id: str | None = None) -> str:
        """Queue a checked request, holding a reference on its adapter's digest
        until it finishes: a name deleted and uploaded again meanwhile does not
        change the weights it is served with. AdapterGone if nothing holds
        the digest any more (deleted since the check)."""
        request_id = request_id or self.new_request_id()
        digest, sampling = checked.adapter_digest, checked.sampling
        request = Request(request_id, list(checked.prompt_ids), sampling, digest)
        if digest is not None:
            self.adapters.acquire(digest)
        try:
            self.scheduler.add(request)
        except BaseException:
            if digest is not None:
                self.adapters.release(digest)
            raise
        stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(self.model.cfg.eos_token_ids)
        )
        detok = (
            IncrementalDetokenizer(self.tokenizer, request.prompt_ids, sampling.stop)
            if self.tokenizer is not None else None
        )
        matcher = checked.guide.matcher() if checked.guide is not None else None
        self._gens[request_id] = _Generation(request, checked.adapter_label, detok,
                                             SampleState.for_params(sampling, self.model.device), stop_ids, matcher)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state; its KV blocks are free on return."""
        self._gens.pop(request_id, None)
        request = self.scheduler.abort(request_id)
        if request is not None and request.adapter_digest is not None:
            self.adapters.release(request.adapter_digest)
        return request is not None

    def abort_all(self) -> list[str]:
        """Abort every unfinished request (the last resort of a step that failed
        outside the per-request isolation); their ids."""
        ids = list(self._gens)
        for request_id in ids:
            self.abort(request_id)
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def request_info(self, request_id: str) -> tuple[str | None, float] | None:
        """(adapter label, arrival time) of an unfinished request (for metrics)."""
        g = self._gens.get(request_id)
        return None if g is None else (g.adapter_label, g.arrival_time)

    # -- the step -------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> make adapters resident -> run -> postprocess.

        A failure caused by one request fails that request only: an adapter
        that cannot be loaded fails the requests that use it, a forward pass
        that raises is re-run in halves until the chunks that raise alone are
        found, and a row that cannot be sampled or detokenized ends its own
        request. Each failed request ends with an output whose `error` is set;
        every other request goes on as if the failed one had never been there.
        """
        out = self.scheduler.schedule()
        in_use = self._adapters_in_use()  # pinned in the pool until the next step
        if out.is_empty:
            self.adapters.prefetch(self.scheduler.waiting_adapters(), in_use)
            return []
        self.num_preemptions += len(out.preempted)
        slots, failed = self._make_resident(sorted(out.adapter_digests), in_use)
        # waiting requests' adapters load in the pool's worker while this step runs
        self.adapters.prefetch(self.scheduler.waiting_adapters(), in_use)
        chunks = [c for c in out.chunks if c.request.status is RequestStatus.RUNNING]
        logits, sampled_chunks = self._forward(chunks, slots, failed)
        self.scheduler.update_after_step(out)  # skips the requests failed above
        prompt_logprobs = self._take_prompt_logprobs(sampled_chunks)
        outputs = failed + self._postprocess(sampled_chunks, logits)
        for o in outputs:
            o.prompt_logprobs = prompt_logprobs.get(o.request_id)
        return outputs

    def _make_resident(self, digests: list[str], in_use: frozenset[str]) -> tuple[dict[str, int], list[RequestOutput]]:
        """Slots of the step's adapters. An adapter that cannot be made
        resident (its files vanished or changed) fails the requests that use
        it; the others keep their slots."""
        try:
            return self.adapters.make_resident(digests, in_use), []
        except Exception:
            log.exception("making the step's adapters resident failed; trying them one by one")
        slots, failed = {}, []
        for digest in digests:
            try:
                slots.update(self.adapters.make_resident([digest], in_use))
            except Exception as exc:
                reason = "the adapter could not be loaded" if not isinstance(exc, MemoryError) else \
                    "the adapter does not fit in the device pool"
                for request in [r for r in self.scheduler.running if r.adapter_digest == digest]:
                    failed.append(self._fail(request, reason))
        return slots, failed

    def _forward(self, chunks: list[ScheduledChunk], slots: dict[str, int],
                 failed: list[RequestOutput]) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """(logits [N, V], the N chunks that sample, in order). If the batch
        raises, each half is run alone, recursively: the chunks that raise on
        their own are failed (appended to `failed`), the others keep the
        logits of the part they ran in."""
        seqs = [SeqChunk(c.token_ids, c.start, c.request.block_ids, slots.get(c.adapter_digest, -1), c.samples,
                         self._prompt_scoring(c))
                for c in chunks]
        sampled = [c for c in chunks if c.samples]
        if not seqs:
            return torch.empty(0), []
        try:
            logits, scores = self._run(seqs)
        except Exception:
            log.exception("a forward pass of %d chunks failed; isolating the culprit", len(seqs))
        else:
            self._collect_prompt_logprobs(dict(enumerate(scores)), chunks)
            return logits, sampled
        rows: dict[int, torch.Tensor] = {}
        culprits: list[int] = []
        got: dict[int, list[PromptLogprob]] = {}
        self._bisect(list(range(len(seqs))), seqs, rows, culprits, got, whole_failed=True)
        self._collect_prompt_logprobs(got, chunks)
        for i in culprits:
            failed.append(self._fail(chunks[i].request, "the forward pass failed on this request"))
        keep = [i for i, c in enumerate(chunks) if c.samples and i in rows]
        if not keep:
            return torch.empty(0), []
        return torch.stack([rows[i] for i in keep]), [chunks[i] for i in keep]

    def _bisect(self, idx: list[int], seqs: list[SeqChunk], rows: dict[int, torch.Tensor],
                culprits: list[int], scores: dict[int, list[PromptLogprob]], whole_failed: bool = False) -> None:
        if not whole_failed:
            try:
                logits, got = self._run([seqs[i] for i in idx])
            except Exception:
                pass
            else:
                rows.update(zip([i for i in idx if seqs[i].wants_logits], logits))
                scores.update((i, s) for i, s in zip(idx, got) if s is not None)
                return
        if len(idx) == 1:
            culprits.append(idx[0])
            return
        half = len(idx) // 2
        self._bisect(idx[:half], seqs, rows, culprits, scores)
        self._bisect(idx[half:], seqs, rows, culprits, scores)

    def _run(self, seqs: list[SeqChunk]) -> tuple[torch.Tensor, list[list[PromptLogprob] | None]]:
        """(logits [N, V], each chunk's prompt logprobs or None). A batch in
        which no chunk scores its prompt runs as it always has (runner.run);
        one that does runs run_scoring, whose logits are the same bit for bit."""
        if any(s.scoring is not None for s in seqs):
            return self.runner.run_scoring(seqs)
        return self.runner.run(seqs), [None] * len(seqs)

    # -- prompt logprobs --------------------------------------------------------
    #
    # Position p of a sequence predicts token p + 1, so a prompt of P tokens has
    # P - 1 scored positions, 0 .. P - 2, gathered over the prefill's chunks:
    #
    #   prompt   p0 p1 p2 p3 p4 p5 | o0        P = 6
    #   chunks   [  c1  ][  c2  ]              c1 scores 0..2 (targets p1..p3),
    #   entries  None e1 e2 e3 e4 e5           c2 scores 3..4 (p4, p5); 5 predicts o0
    #
    # The next position to score is len(entries) - 1. A preempted request
    # recomputes from position 0; positions it scored already are not scored
    # again. The entries go out once, on the request's first output.

    def _prompt_scoring(self, c: ScheduledChunk) -> PromptScoring | None:
        entries = self._gens[c.request.request_id].prompt_logprobs
        if entries is None:
            return None
        prompt = c.request.prompt_ids
        lo = max(c.start, len(entries) - 1)
        hi = min(c.start + c.num_tokens, len(prompt) - 1)
        if lo >= hi:
            return None
        return PromptScoring(lo - c.start, tuple(prompt[lo + 1:hi + 1]), c.request.sampling.prompt_logprobs)

    def _collect_prompt_logprobs(self, scores: dict[int, list[PromptLogprob] | None],
                                 chunks: list[ScheduledChunk]) -> None:
        # scores: chunk index -> the PromptLogprobs of its scoring
        for i, got in scores.items():
            g = self._gens.get(chunks[i].request.request_id)
            if got is not None and g is not None and g.prompt_logprobs is not None:
                g.prompt_logprobs.extend(got)

    def _take_prompt_logprobs(self, sampled: list[ScheduledChunk]) -> dict[str, list[PromptLogprob | None]]:
        """request id -> its prompt logprobs, for the requests about to produce
        their first output (complete: a chunk samples only after the whole
        prompt ran); they are not gathered again, even after a preemption."""
        taken = {}
        for c in sampled:
            g = self._gens.get(c.request.request_id)
            entries = g.prompt_logprobs if g is not None else None
            if entries is not None and len(entries) == c.request.num_prompt_tokens:
                taken[c.request.request_id], g.prompt_logprobs = entries, None
        return taken

    def _fail(self, request: Request, reason: str) -> RequestOutput:
        """End `request` now (blocks and adapter reference freed) with an error output."""
        log.error("request %s failed: %s", request.request_id, reason)
        g = self._gens.pop(request.request_id)
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        if request.adapter_digest is not None:
            self.adapters.release(request.adapter_digest)
        return RequestOutput(
            request_id=request.request_id, adapter_label=g.adapter_label, text="", token_ids=[], logprobs=[],
            finished=True, finish_reason="error", num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_ids), error=reason,
        )

    def _postprocess(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[RequestOutput]:
        # chunks: the N chunks that sample; logits: [N, V]
        gens = [self._gens[c.request.request_id] for c in chunks]
        if not gens:
            return []
        # EOS may not end a request before min_tokens; a guided request's
        # grammar alone decides where its output may end
        suppress = [
            tuple(g.stop_ids) if len(g.request.output_ids) < g.request.sampling.min_tokens and g.matcher is None
            else () for g in gens
        ]
        masks, broken = self._guide_masks(gens, logits.shape[-1])
        try:
            sampled = sample(logits, [g.request.sampling for g in gens], [g.sampler for g in gens], suppress, masks)
        except Exception:  # a bug in the batched part: sample row by row, so only a failing row fails
            log.exception("sampling a batch of %d rows failed; sampling them one by one", len(gens))
            sampled = [self._sample_one(logits[i:i + 1], g, suppress[i]) for i, g in enumerate(gens)]
        for i in broken:
            sampled[i] = SampleFailed("the request's grammar could not be applied")
        outputs = []
        for g, s in zip(gens, sampled):
            if isinstance(s, SampleFailed):
                outputs.append(self._fail(g.request, s.reason))
                continue
            try:
                outputs.append(self._advance(g, s.token, s.logprob, s.top))
            except Exception:
                log.exception("postprocessing request %s failed", g.request.request_id)
                outputs.append(self._fail(g.request, "the output could not be processed"))
        return outputs

    @staticmethod
    def _guide_masks(gens: list[_Generation], vocab: int) -> tuple[GuideMasks | None, list[int]]:
        """The step's grammar bitmasks, and the rows whose matcher failed to
        fill one (sampled unmasked, then failed alone): every other row is
        sampled as it would have been without them."""
        matchers = [g.matcher for g in gens]
        if all(m is None for m in matchers):
            return None, []
        try:
            return GuideMasks(matchers, vocab), []
        except Exception:
            log.exception("filling the grammar masks of a step failed; trying them one by one")
        broken = []
        for i, m in enumerate(matchers):
            if m is not None:
                try:
                    GuideMasks([m], vocab)
                except Exception:
                    broken.append(i)
                    matchers[i] = None
        return (GuideMasks(matchers, vocab) if any(m is not None for m in matchers) else None), broken

    @staticmethod
    def _sample_one(row: torch.Tensor, g: _Generation, suppress: tuple[int, ...]) -> Sampled | SampleFailed:
        # row: [1, V]
        try:
            masks = GuideMasks([g.matcher], row.shape[-1]) if g.matcher is not None else None
            return sample(row, [g.request.sampling], [g.sampler], [suppress], masks)[0]
        except Exception as exc:
            return SampleFailed(f"sampling failed: {type(exc).__name__}")

    def _advance(self, g: _Generation, token: int, logprob: float, top) -> RequestOutput:
        """Append the sampled token; decide whether the request stops."""
        req = g.request
        if g.matcher is not None and not g.matcher.accept(token):
            raise RuntimeError(f"token {token} is outside the request's grammar")  # the mask let it through
        text, stopped = g.detok.add(token) if g.detok is not None else ("", False)
        req.output_ids.append(token)
        status = None
        if token in g.stop_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif g.matcher is not None and g.matcher.is_terminated:  # the grammar's end (its stop token)
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif stopped:
            status = RequestStatus.FINISHED_STOPPED
        elif len(req.output_ids) >= req.sampling.max_tokens or req.num_tokens >= self.context_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if g.detok is not None and not stopped:
                text += g.detok.flush()
            self.scheduler.finish(req, status)
            del self._gens[req.request_id]
            if req.adapter_digest is not None:
                self.adapters.release(req.adapter_digest)
        return RequestOutput(
            request_id=req.request_id,
            adapter_label=g.adapter_label,
            text=text,
            token_ids=[token],
            logprobs=[(token, logprob, top)] if req.sampling.logprobs is not None else [],
            finished=status is not None,
            finish_reason=status.finish_reason if status is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_ids),
        )

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until every request finishes; outputs grouped by request."""
        results: dict[str, list[RequestOutput]] = {}
        while self.has_unfinished():
            for o in self.step():
                results.setdefault(o.request_id, []).append(o)
        return results
