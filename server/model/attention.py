"""Decode attention over the paged KV cache: one query token per sequence,
its keys and values read through the sequence's block table.

Three implementations of one contract, picked once per model (LlamaModel):

    attend(q, k_cache, v_cache, group) -> [B, H, D]
        q: [B, H, D]; k_cache, v_cache: [slots, KV, D] (H % KV == 0, GQA)
        = softmax(q·K^T / sqrt(D)) · V over each sequence's ctx_lens[b] keys

    compiled   the CPU op (kernels/csrc/cpu_ops.cpp): reads the cache rows in
               place, float32 math; with the other compiled ops, a bf16
               decode step of 32 sequences at context 128 takes 0.52x the
               torch path's time (bench/step_targets.py)
    triton     the CUDA kernel (kernels/paged_attention.py), same contract
    torch      gathers each sequence's slots into a padded copy, then SDPA
               with a mask: the fallback where neither of the others runs
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("loramux.model")


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences with one new token each, attended in one call."""

    token_index: torch.Tensor  # [B] long, where each query sits in the flat batch
    block_table: torch.Tensor  # [B, max_blocks] long, each sequence's blocks (padded with 0)
    ctx_lens: torch.Tensor  # [B] long, keys each query attends to (its own included)
    block_size: int
    # the torch path's padded gather: [B, C] long slots, [B, 1, 1, C] bool (True: a real key)
    kv_slots: torch.Tensor
    mask: torch.Tensor


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DecodeGroup], torch.Tensor]


def torch_decode_attention(q, k_cache, v_cache, d: DecodeGroup) -> torch.Tensor:
    # index_select over the flat slots, not k_cache[kv_slots]: the same rows, but aten::index's
    # generic advanced indexing costs 2-4x as much per step here
    slots = d.kv_slots.reshape(-1)
    shape = (*d.kv_slots.shape, *k_cache.shape[1:])  # [B, C, KV, D]
    kd = k_cache.index_select(0, slots).view(shape).transpose(1, 2)  # [B, KV, C, D]
    vd = v_cache.index_select(0, slots).view(shape).transpose(1, 2)
    o = F.scaled_dot_product_attention(q[:, :, None, :], kd, vd, attn_mask=d.mask, enable_gqa=True)
    return o[:, :, 0, :]


def compiled_decode_attention(ops) -> Attend:
    def attend(q, k_cache, v_cache, d: DecodeGroup) -> torch.Tensor:
        return ops.paged_decode_attention(q.contiguous(), k_cache, v_cache, d.block_table, d.ctx_lens,
                                          d.block_size, q.shape[-1] ** -0.5)

    return attend


def triton_decode_attention() -> Attend:
    from loramux.kernels.paged_attention import paged_decode_attention  # imports triton

    def attend(q, k_cache, v_cache, d: DecodeGroup) -> torch.Tensor:
        return paged_decode_attention(q.contiguous(), k_cache, v_cache, d.block_table, d.ctx_lens,
                                      d.block_size, q.shape[-1] ** -0.5)

    return attend


def select_decode_attention(device: torch.device, cache) -> tuple[str, Attend]:
    """(name, attend) for activations on `device`: triton wherever the LoRA
    kernels are Triton too (CUDA, or LORAMUX_TRITON=1: the tests run it under
    the interpreter), the compiled op on a CPU where it builds (cache: where
    its build is kept), else torch."""
    from loramux.adapters_store.device_pool import triton_lora_path

    if triton_lora_path(device):
        return "triton", triton_decode_attention()
    if device.type == "cpu":
        from loramux.kernels.cpu_ext import cpu_ops, cpu_ops_error

        ops = cpu_ops(cache)
        if ops is not None:
            return "compiled", compiled_decode_attention(ops)
        log.warning("decode attention: torch path (%s)", cpu_ops_error())
    return "torch", torch_decode_attention
