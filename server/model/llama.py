"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) over a flattened batch.

A batch is the tokens of many sequences laid end to end, no padding:

    flat tokens   [ a0 a1 a2 a3 | b7 | c0 c1 | d12 ]
                    prefill a     dec  prefill  dec
                                  b    chunk c  d

Each token carries its position and the KV-cache slot it writes to; the
sequences' earlier tokens are read back from the paged KV cache through
their block tables. Every LoRA-able linear is a fused base GEMM (q|k|v and
gate|up share their input) plus the per-token adapter delta over segments,
which the runner's LoRA backend adds (server/model/lora_backend.py), so
requests for different adapters share one forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramux.server.config import ModelConfig
from loramux.server.model.attention import DecodeGroup, select_decode_attention
from loramux.server.model.base_linear import select_base_linear
from loramux.server.model.layer_ops import select_layer_ops
from loramux.server.model.loader import cache_root
from loramux.server.model.lora_backend import LoraBackend, LoraBatch


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence with several new tokens (a prompt or a chunk of one)."""

    start: int  # first query token in the flat batch
    num_new: int
    kv_slots: torch.Tensor | None = None  # [ctx] long; None when the chunk is the whole context
    # [n, ctx] bool with kv_slots: query i sits at position ctx - n + i and
    # sees keys 0..that position (built once per step, used by every layer)
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long, KV slot each new token writes
    decode: DecodeGroup | None
    prefills: tuple[PrefillSeq, ...]


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    attn: AttentionMetadata
    logits_index: torch.Tensor  # [N] long, tokens whose next-token logits are wanted
    lora: LoraBatch | None = None  # the LoRA backend's metadata; None: no token has an adapter
    # [R] long, tokens whose final hidden states forward_scoring also returns
    # (prompt logprobs); None: none, and the batch runs exactly as without it
    prompt_index: torch.Tensor | None = None


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_llama3 is None:
        return inv
    factor, low, high, old_ctx = cfg.rope_llama3
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept,
    # the band between them interpolated smoothly.
    wavelen = 2 * torch.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


class LlamaModel:
    """Weights and forward of one base model; LoRA weights live in a pool,
    which the runner's LoRA backend reads."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype, device="cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)

        def take(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else take("lm_head.weight")
        self.norm = take("model.norm.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "input_norm": take(p + "input_layernorm.weight"),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([take(p + f"self_attn.{m}.weight") for m in ("q_proj", "k_proj", "v_proj")]),
                "o": take(p + "self_attn.o_proj.weight"),
                "gate_up": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                "down": take(p + "mlp.down_proj.weight"),
                "qkv_bias": None,
            }
            if cfg.qkv_bias:
                layer["qkv_bias"] = torch.cat(
                    [take(p + f"self_attn.{m}.bias") for m in ("q_proj", "k_proj", "v_proj")]
                )
            self.layers.append(layer)
        inv_freq = rope_inv_freq(cfg)
        self.inv_freq = inv_freq.to(self.device)
        self.decode_attention_path, self._decode_attention = select_decode_attention(self.device, cache_root())
        self.base_linear_path, self._base_linear = select_base_linear(self.device, cache_root())
        self.layer_ops = select_layer_ops(self.device, cache_root())

    # -- pieces -------------------------------------------------------------

    def _rope_tables(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)  # [T, D] each

    def base_weight(self, layer_idx: int, group: str) -> torch.Tensor:
        """The fused base weight [out_total, in] of a LoRA group, its modules'
        rows in LORA_GROUPS order (q|k|v, gate|up)."""
        return self.layers[layer_idx][group]

    def _linear(self, x, layer_idx: int, group: str, lora: LoraBackend | None, step: LoraBatch | None,
                bias=None):
        # x: [T, in] -> [T, out_total]: base GEMM, then the backend adds each token's adapter delta
        # (and DoRA's row scale, which scales W0 x too but not the bias: y = b + d ⊙ (W0 x + ΔW x)).
        late_bias = step is not None and step.dora and bias is not None
        out = self._base_linear(x, self.layers[layer_idx][group], None if late_bias else bias)
        if step is None:
            return out
        lora.apply(x, out, layer_idx, group, step)
        if late_bias:
            out += bias
        return out

    def _attention(self, q, k, v, layer_idx: int, kv_cache, attn: AttentionMetadata):
        # q: [T, H, D]; k, v: [T, KV, D]; writes k, v to the cache, returns [T, H*D]
        k_cache, v_cache = kv_cache.layer(layer_idx)  # [slots, KV, D] each
        k_cache.index_copy_(0, attn.slot_mapping, k)
        v_cache.index_copy_(0, attn.slot_mapping, v)
        # every token decodes (runner.prepare keeps them in order): no gather, no scatter
        if not attn.prefills and attn.decode is not None:
            return self._decode_attention(q, k_cache, v_cache, attn.decode).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        for p in attn.prefills:
            qs = q[p.start : p.start + p.num_new].transpose(0, 1)[None]  # [1, H, n, D]
            if p.kv_slots is None:
                ks = k[p.start : p.start + p.num_new]
                vs = v[p.start : p.start + p.num_new]
                mask, causal = None, True
            else:
                ks, vs = k_cache.index_select(0, p.kv_slots), v_cache.index_select(0, p.kv_slots)  # [ctx, KV, D]
                mask, causal = p.mask, False
            o = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                attn_mask=mask, is_causal=causal, enable_gqa=True,
            )
            out[p.start : p.start + p.num_new] = o[0].transpose(0, 1)
        if attn.decode is not None:
            d = attn.decode
            out[d.token_index] = self._decode_attention(q[d.token_index], k_cache, v_cache, d)
        return out.reshape(q.shape[0], -1)

    # -- forward ------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache, lora: LoraBackend | None = None) -> torch.Tensor:
        """Next-token logits [N, vocab] (float32) for batch.logits_index; `lora`:
        the backend whose `prepare` made batch.lora (needed when that is set)."""
        return self._logits(self._hidden(batch, kv_cache, lora)[batch.logits_index])

    @torch.inference_mode()
    def forward_scoring(self, batch: ForwardBatch, kv_cache, lora: LoraBackend | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the logits `forward` gives, bit for bit: [N, vocab] float32; the final
        normed hidden states [R, hidden] at batch.prompt_index, for
        next_token_logprobs). One pass over the layers."""
        x = self._hidden(batch, kv_cache, lora)
        logits = self._logits(x[batch.logits_index])  # the very ops forward runs on the very rows
        return logits, self.layer_ops.rms_norm(x[batch.prompt_index], self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def next_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, top_k: int,
                            rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of `targets` after the normed hidden states `hidden`
        (forward_scoring's), with each target's rank and the top_k alternatives:

            lp = log_softmax(hidden @ lm_head.T)  # [R, V], never built whole
            (lp[r, targets[r]], (lp[r] >= lp[r, targets[r]]).sum(), topk(lp[r], top_k))

        The [R, V] float32 log-probabilities exist only `rows` rows at a time (a
        long prompt would otherwise hold R x V floats). Rank 1 is the most
        likely token (vLLM's rank: the tokens at least as likely).
        hidden: [R, hidden]; targets: [R] long -> logprob [R] float32, rank [R]
        long, top values [R, top_k] float32, top ids [R, top_k] long."""
        n = hidden.shape[0]
        dev = hidden.device
        logprob = torch.empty(n, dtype=torch.float32, device=dev)
        rank = torch.empty(n, dtype=torch.long, device=dev)
        top_vals = torch.empty(n, top_k, dtype=torch.float32, device=dev)
        top_ids = torch.empty(n, top_k, dtype=torch.long, device=dev)
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            lp = torch.log_softmax(F.linear(hidden[lo:hi], self.lm_head).float(), dim=-1)  # [r, V]
            target = lp.gather(1, targets[lo:hi, None])  # [r, 1]
            logprob[lo:hi] = target[:, 0]
            rank[lo:hi] = (lp >= target).sum(dim=-1)
            if top_k:
                top_vals[lo:hi], top_ids[lo:hi] = torch.topk(lp, top_k, dim=-1)
        return logprob, rank, top_vals, top_ids

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] final-layer hidden states -> [N, vocab] float32
        norm = self.layer_ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return self._base_linear(norm, self.lm_head, None).float()

    def _hidden(self, batch: ForwardBatch, kv_cache, lora: LoraBackend | None) -> torch.Tensor:
        """The last layer's output [T, hidden] (before the final norm) of every token."""
        if batch.lora is not None and lora is None:
            raise ValueError("a batch with adapter tokens needs the LoRA backend that prepared it")
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self._rope_tables(batch.positions)
        norm, rope = self.layer_ops.rms_norm, self.layer_ops.rope
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        for i, layer in enumerate(self.layers):
            h = norm(x, layer["input_norm"], cfg.rms_norm_eps)
            qkv = self._linear(h, i, "qkv", lora, batch.lora, layer["qkv_bias"])
            # q and k heads side by side in qkv: one rotation for both
            qk = rope(qkv[:, : (H + KV) * D].unflatten(1, (H + KV, D)), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KV) * D :].unflatten(1, (KV, D))
            a = self._attention(q, k, v, i, kv_cache, batch.attn)
            x = x + self._linear(a, i, "o", lora, batch.lora)
            h = norm(x, layer["post_norm"], cfg.rms_norm_eps)
            gate, up = self._linear(h, i, "gate_up", lora, batch.lora).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, i, "down", lora, batch.lora)
        return x
