"""Paged KV cache: the block allocator, plain Python (the tensors are
server/model/kv_tensors.py).

The cache is `num_blocks` blocks of `block_size` token slots each. A request
owns a block table (a list of block ids); token `i` of the request lives in
slot `block_ids[i // block_size] * block_size + i % block_size`:

    request tokens:  0 1 2 3 | 4 5 6 7 | 8 9
    block_ids:       [  17   ,   3     ,  42 ]        (block_size = 4)
    slots:           68..71    12..15    168..169
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """allocate() asked for more blocks than are free; nothing was allocated."""


class BlockAllocator:
    """Free list of KV block ids. No device code: the tensors live elsewhere."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, not {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used = bytearray(num_blocks)  # 1 where the block is allocated

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks allocated, in [0, 1]."""
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._used[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list. All-or-nothing: an unknown id, a block
        that is not allocated, or a block listed twice raises and frees none."""
        seen = set()
        for b in blocks:
            if not (0 <= b < self.num_blocks):
                raise ValueError(f"block {b} is not a block of this cache")
            if not self._used[b] or b in seen:
                raise ValueError(f"block {b} freed twice")
            seen.add(b)
        for b in blocks:
            self._used[b] = 0
            self._free.append(b)
