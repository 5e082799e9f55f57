"""A fixed pool of KV blocks with reference counts and a hash-chained prefix cache.

A block whose count falls to zero goes to the back of the free queue but keeps its hash, so a
later request with the same prefix can take it back; allocation evicts from the front (LRU).
"""

from collections import OrderedDict


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained from the previous block so equal hashes mean equal prefixes."""
    return hash((prev, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_key: list[tuple | None] = [None] * num_blocks  # (hash, token ids) of a cached block
        self.cached: dict[int, int] = {}  # hash -> block id
        self.num_queries = 0
        self.num_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("KV block pool is exhausted; the scheduler must check can_allocate first")
        block, _ = self.free.popitem(last=False)
        self._evict(block)
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """A cached block holding exactly these tokens after this prefix, or None."""
        self.num_queries += 1
        block = self.cached.get(block_hash)
        # NOTE: a hash hit is confirmed by comparing token ids; collisions must not corrupt outputs.
        if block is None or self.block_key[block] != (block_hash, token_ids):
            return None
        self.num_hits += 1
        return block

    def register(self, block: int, block_hash: int, token_ids: tuple[int, ...]) -> None:
        if not self.enable_prefix_caching or block_hash in self.cached:
            return
        self.block_key[block] = (block_hash, token_ids)
        self.cached[block_hash] = block

    def _evict(self, block: int) -> None:
        key = self.block_key[block]
        if key is not None:
            self.block_key[block] = None
            if self.cached.get(key[0]) == block:
                del self.cached[key[0]]
