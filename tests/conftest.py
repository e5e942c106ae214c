"""Shared pytest setup."""
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter (on CPU
# tensors, through numpy); the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
