"""Shared pytest setup."""
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter (on CPU
# tensors, through numpy); the variable must be set before triton is imported.
# With one, the kernels compile for it, so a test of the Triton path
# (LORAMUX_TRITON=1) puts its tensors and model on CUDA (helpers.tiny's
# TRITON_DEVICE; DEVICE in test_kernels_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
