"""The model's per-token ops between its GEMMs: RMSNorm and the rotary
embedding (HF Llama's math), picked once per model as base_linear.py picks
the GEMMs.

    compiled   kernels/csrc/cpu_ops.cpp's rms_norm and rope_: one pass over
               the rows each, float32 math rounded where torch's ops round
               (bf16 and fp16 bit for bit; float32 within an ulp: summation
               order, fused multiply-adds); the rotation is in place
    torch      the same math in torch ops (CUDA, LORAMUX_CPU_OPS=0, no compiler)

In torch ops a norm is seven calls and a rotation five, each a pass over a
few rows: in a decode step the dispatch, not the math, costs about 15% of a
single sequence's step on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what cpu_ops.cpp dispatches on


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D] (the rotate-half layout of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass(frozen=True)
class LayerOps:
    path: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (x [T, heads, D], cos, sin [T, D]) -> x rotated; x itself may be rotated in place
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


TORCH_OPS = LayerOps("torch", rms_norm, rope)


def compiled_layer_ops(ops) -> LayerOps:
    def norm(x, weight, eps):
        if x.dim() == 2 and x.is_contiguous() and x.dtype in COMPILED_DTYPES and x.shape[0]:
            return ops.rms_norm(x, weight, eps)
        return rms_norm(x, weight, eps)

    def rotate(x, cos, sin):
        if x.dtype in COMPILED_DTYPES and x.stride(-1) == 1 and x.stride(1) == x.shape[2] and x.shape[0]:
            ops.rope_(x, cos, sin)
            return x
        return rope(x, cos, sin)

    return LayerOps("compiled", norm, rotate)


def select_layer_ops(device: torch.device, cache) -> LayerOps:
    """The compiled ops on a CPU where they build (cache: where their build
    is kept), else torch's."""
    if device.type == "cpu":
        from loramux.kernels.cpu_ext import cpu_ops

        ops = cpu_ops(cache)  # why not, when None: logged once by the decode attention's choice
        if ops is not None:
            return compiled_layer_ops(ops)
    return TORCH_OPS
