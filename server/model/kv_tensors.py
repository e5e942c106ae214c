"""The KV tensors: keys and values of every layer in one flat slot space,
the blocks of server/engine/kv_cache.py's allocator (which stays plain Python,
so the scheduler never imports torch)."""
from __future__ import annotations

import torch

from loramux.server.config import ModelConfig


class KVCache:
    """Key and value tensors for every layer, addressed by flat slot
    (block * block_size + offset)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device="cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (cfg.num_layers, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.k[i], self.v[i]

    @staticmethod
    def blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int, dtype) -> int:
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        per_block = per_token * block_size * torch.empty((), dtype=dtype).element_size()
        return max(1, budget_bytes // per_block)
