"""Scheduled chunks -> one flat ForwardBatch -> logits.

The runner turns each sequence's chunk of new tokens into the tensors the
model needs: positions, the KV slot of every new token, the context slots
attention reads back, and the LoRA segments, which its LoRA backend (chosen
once, server/model/lora_backend.py) turns into that backend's per-step
metadata. It knows nothing of requests or scheduling; the engine hands it
`SeqChunk`s already grouped by adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from loramux.kernels import NO_ADAPTER, segments_from_runs
from loramux.server.model.kv_tensors import KVCache
from loramux.server.model.attention import DecodeGroup
from loramux.server.model.llama import AttentionMetadata, ForwardBatch, PrefillSeq
from loramux.server.model.lora_backend import LoraBackend, select_lora_backend


@dataclass(frozen=True)
class PromptScoring:
    """Score some of a chunk's tokens' successors (prompt logprobs):

        token_ids  [ t0 t1 t2 t3 t4 ]      first = 1, targets = (t2, t3, t4, u0)
                        ^  ^  ^  ^         position i predicts targets[i - first];
                                           the last target may be the next chunk's
                                           first token (u0), which is known already
    """

    first: int  # index in token_ids of the first scored position
    targets: tuple[int, ...]  # the token each scored position is scored against
    top_k: int = 0  # alternatives to report per position


class PromptLogprob(NamedTuple):
    """A scored token: its log-probability given the tokens before it."""

    logprob: float
    rank: int  # among the vocabulary, 1 = the most likely (vLLM's rank)
    top: tuple[tuple[int, float], ...]  # the top_k (token, logprob), most likely first


@dataclass(frozen=True)
class SeqChunk:
    token_ids: list[int]  # the new tokens of this step
    start: int  # position of token_ids[0] in the sequence
    block_ids: list[int]  # the sequence's block table (covers start + len(token_ids))
    slot: int = NO_ADAPTER  # adapter slot in the pool
    wants_logits: bool = True  # sample after this chunk
    scoring: PromptScoring | None = None  # prompt logprobs of some positions (run_scoring)


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, lora: LoraBackend | None = None):
        self.model = model
        self.kv = kv_cache
        self.lora = lora  # None: the base model only
        self.device = model.device

    @classmethod
    def for_pool(cls, model, kv_cache: KVCache, lora_pool) -> "ModelRunner":
        """The runner over an adapter pool (a DeviceLoraPool), its LoRA
        backend picked once for the model's device."""
        return cls(model, kv_cache, select_lora_backend(lora_pool, model.device))

    def kernel_paths(self) -> str:
        """Which implementations serve this runner, for the startup log."""
        lora = getattr(self.lora, "path", "none")
        if hasattr(self.lora, "long_segments"):
            lora += f" (long segments: {self.lora.long_segments})"
        return (f"decode attention: {self.model.decode_attention_path}, LoRA deltas: {lora}, "
                f"small-batch GEMMs: {self.model.base_linear_path}, norms and rotary: {self.model.layer_ops.path}")

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        # flat KV slots of positions start..end-1 (plain Python: a step builds
        # its index tensors once, not a few tiny tensors per sequence)
        bs = self.kv.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, chunks: list[SeqChunk]) -> ForwardBatch:
        ids, positions, slot_mapping, prefills = [], [], [], []
        decode_idx, decode_ctx, decode_tables = [], [], []
        logits_index, runs = [], []  # runs: [start, len, slot]
        prompt_index = []
        dev = self.device
        t = 0
        for c in chunks:
            n = len(c.token_ids)
            end = c.start + n
            ids.extend(c.token_ids)
            positions.extend(range(c.start, end))
            slot_mapping.extend(self._slots(c.block_ids, c.start, end))
            if n == 1:
                decode_idx.append(t)
                decode_ctx.append(end)
                decode_tables.append(c.block_ids)
            else:
                if c.start:
                    slots = torch.tensor(self._slots(c.block_ids, 0, end), dtype=torch.long, device=dev)
                    mask = torch.arange(end, device=dev)[None, :] <= torch.arange(c.start, end, device=dev)[:, None]
                    prefills.append(PrefillSeq(t, n, slots, mask))
                else:
                    prefills.append(PrefillSeq(t, n))
            if c.wants_logits:
                logits_index.append(t + n - 1)
            if c.scoring is not None:
                first = t + c.scoring.first
                prompt_index.extend(range(first, first + len(c.scoring.targets)))
            if runs and runs[-1][2] == c.slot:
                runs[-1][1] += n
            else:
                runs.append([t, n, c.slot])
            t += n
        decode = None
        if decode_idx:
            bs = self.kv.block_size
            width = max(decode_ctx)
            max_blocks = (width + bs - 1) // bs
            table = torch.tensor([(b + [0] * max_blocks)[:max_blocks] for b in decode_tables], dtype=torch.long)
            ctx = torch.tensor(decode_ctx)
            pos = torch.arange(width)
            kv_slots = table[:, pos // bs] * bs + pos % bs  # [B, C]
            mask = (pos[None, :] < ctx[:, None])[:, None, None, :]
            decode = DecodeGroup(
                token_index=torch.tensor(decode_idx, device=dev),
                block_table=table.to(dev),
                ctx_lens=ctx.to(dev),
                block_size=bs,
                kv_slots=kv_slots.to(dev),
                mask=mask.to(dev),
            )
        lora = None
        if self.lora is not None and any(r[2] != NO_ADAPTER for r in runs):
            seg = segments_from_runs(
                [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs], t, self.device
            )
            lora = self.lora.prepare(seg)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=AttentionMetadata(
                slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
                decode=decode,
                prefills=tuple(prefills),
            ),
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=dev),
            lora=lora,
            prompt_index=torch.tensor(prompt_index, dtype=torch.long, device=dev) if prompt_index else None,
        )

    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Logits [N, vocab] float32 for the chunks that want them, in order.
        Any `scoring` is ignored: run_scoring computes it."""
        return self.model.forward(self.prepare(chunks), self.kv, self.lora)

    def run_scoring(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, list[list[PromptLogprob] | None]]:
        """run()'s logits, bit for bit, and each chunk's PromptLogprobs (one
        per target of its `scoring`; None for a chunk without one), from the
        same forward pass."""
        batch = self.prepare(chunks)
        if batch.prompt_index is None:
            return self.model.forward(batch, self.kv, self.lora), [None] * len(chunks)
        logits, hidden = self.model.forward_scoring(batch, self.kv, self.lora)
        scored = [c.scoring for c in chunks if c.scoring is not None]
        targets = torch.tensor([t for s in scored for t in s.targets], dtype=torch.long, device=self.device)
        top_k = max(s.top_k for s in scored)
        logprob, rank, top_vals, top_ids = self.model.next_token_logprobs(hidden, targets, top_k)
        # one device -> host copy each
        logprob, rank, top_vals, top_ids = logprob.tolist(), rank.tolist(), top_vals.tolist(), top_ids.tolist()
        out: list[list[PromptLogprob] | None] = []
        r = 0
        for c in chunks:
            if c.scoring is None:
                out.append(None)
                continue
            k = c.scoring.top_k
            out.append([PromptLogprob(logprob[i], rank[i], tuple(zip(top_ids[i][:k], top_vals[i][:k])))
                        for i in range(r, r + len(c.scoring.targets))])
            r += len(c.scoring.targets)
        return logits, out
