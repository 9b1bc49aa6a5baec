"""KVBlockPool: the fixed set of KV-cache blocks, their reference counts, and the prefix cache over them.

A block holds `block_size` consecutive positions of one sequence (every layer's keys and values live
at the same block index in the paged tensors of mlc.kernels.paged_attention). A full block can be
registered under a hash of (parent block's hash, its tokens): two sequences whose prompts share a
prefix then point at the same physical blocks. A block whose reference count drops to zero stays
findable by its hash until the pool needs it for something else; free blocks are reused least
recently freed first, so the prefix cache is LRU for free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

NO_PARENT = 0


def block_hash(parent: int, tokens: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """The prefix-cache key of a full block: its parent's hash and its own tokens.

    The key keeps the tokens themselves, so a dict lookup compares them exactly and two different
    blocks can never be confused by a hash collision of their own contents.
    """
    return (parent, tuple(tokens))


class KVBlockPool:
    """Allocation, reference counting and prefix caching of KV blocks (pure bookkeeping, no tensors)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        self.key_of: list[tuple | None] = [None] * num_blocks
        self.cached: dict[tuple, int] = {}  # key -> block id, for full registered blocks
        # Blocks with refcount 0, oldest first; a block here may still be in `cached` (reusable by prefix).
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence."""
        return 1.0 - len(self.free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (refcount 1), evicting the least recently freed cached blocks; caller checks num_free."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            key = self.key_of[block]
            if key is not None:
                self.key_of[block] = None
                if self.cached.get(key) == block:
                    del self.cached[key]
            self.refcount[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Take one more reference on blocks already in use (n > 1 samples sharing a prompt)."""
        for b in blocks:
            self.refcount[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; the last block is freed first so a prefix outlives its tail."""
        for b in reversed(blocks):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free[b] = None

    def lookup(self, tokens: Sequence[int], max_tokens: int, root: int = NO_PARENT) -> tuple[list[int], int]:
        """(blocks, parent hash) of the longest cached run of full blocks starting tokens, within max_tokens.

        The blocks are referenced for the caller. Counts queried and hit tokens for /metrics. root starts the chain
        of hashes (a LoRA adapter's salt: blocks computed under another adapter are not found).
        """
        if not self.enable_prefix_caching:
            return [], root
        bs = self.block_size
        blocks: list[int] = []
        parent = root
        self.prefix_queries += max_tokens
        for i in range(max_tokens // bs):
            key = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self.cached.get(key)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self.free[block]
            self.refcount[block] += 1
            blocks.append(block)
            parent = hash(key)
        self.prefix_hits += len(blocks) * bs
        return blocks, parent

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Make a just-filled block findable by its prefix; returns its hash (the next block's parent)."""
        key = block_hash(parent, tokens)
        if self.enable_prefix_caching and key not in self.cached and self.key_of[block] is None:
            self.cached[key] = block
            self.key_of[block] = key
        return hash(key)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        self.cached.clear()
        self.key_of = [None] * self.num_blocks
