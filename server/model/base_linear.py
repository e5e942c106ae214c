"""The model's base GEMMs, F.linear(x, W, bias), picked once per model.

With few rows of x (one sequence decoding alone, or a handful) a GEMM is a
pass over W at M=1..4 and its speed is the speed of reading W. torch's CPU
GEMM reaches about a third of this machine's read bandwidth there; the
compiled op small_linear (kernels/csrc/cpu_ops.cpp) streams W once for all
rows, float32 math, each output rounded once as torch's bf16 GEMM does:

    compiled   small_linear for 1..SMALL_LINEAR_ROWS rows, F.linear above
    torch      F.linear always (CUDA, LORAMUX_CPU_OPS=0, no compiler)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SMALL_LINEAR_ROWS = 4  # cpu_ops.cpp's SMALL_M: one pass over W serves this many rows
SMALL_LINEAR_DTYPES = (torch.float32, torch.bfloat16)

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def compiled_linear(ops) -> Linear:
    def linear(x, weight, bias=None):
        if x.shape[0] <= SMALL_LINEAR_ROWS and x.shape[0] > 0 and x.dtype in SMALL_LINEAR_DTYPES:
            return ops.small_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    return linear


def select_base_linear(device: torch.device, cache) -> tuple[str, Linear]:
    """(name, linear) for weights on `device`: the compiled op on a CPU where
    the compiled ops build (cache: where their build is kept), else torch."""
    if device.type == "cpu":
        from loramux.kernels.cpu_ext import cpu_ops

        ops = cpu_ops(cache)  # why not, when None: logged once by the decode attention's choice
        if ops is not None:
            return "compiled", compiled_linear(ops)
    return "torch", F.linear
