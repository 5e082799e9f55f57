"""Block tables of sequences over one model's BlockPool: prefix matching, growth, fork, free."""

from counterpoint.serving.engine.block_pool import BlockPool, chain_hash
from counterpoint.serving.engine.request import Sequence


class KVManager:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size

    def match_prefix(self, seq: Sequence) -> int:
        """Take cached full blocks for a sequence that holds none; returns the tokens they cover."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.pool.enable_prefix_caching:
            return 0
        bs, prev = self.block_size, None
        # NOTE: the last token is always computed, so its logits exist; only blocks before it match.
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            block_hash = chain_hash(prev, tokens)
            block = self.pool.lookup(block_hash, tokens)
            if block is None:
                break
            self.pool.incref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
            prev = block_hash
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the matched blocks past num_tokens (a multiple of the block size)."""
        keep = num_tokens // self.block_size
        for block in reversed(seq.block_table[keep:]):
            self.pool.decref(block)
        del seq.block_table[keep:], seq.block_hashes[keep:]
        seq.num_computed_tokens = num_tokens

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        target = seq.num_computed_tokens + num_new_tokens
        grow = max(0, -(-target // self.block_size) - len(seq.block_table))
        return grow + int(self._needs_copy(seq))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Blocks for the next num_new_tokens tokens; returns copy-on-write (src, dst) pairs."""
        copies = []
        if self._needs_copy(seq):
            idx = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[idx], self.pool.allocate()
            self.pool.decref(src)
            seq.block_table[idx] = dst
            copies.append((src, dst))
        target = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < target:
            seq.block_table.append(self.pool.allocate())
        self._register_full_blocks(seq, target)
        return copies

    def fork(self, child: Sequence) -> None:
        """The child shares every block of the parent it was copied from."""
        for block in child.block_table:
            self.pool.incref(block)

    def free(self, seq: Sequence) -> None:
        # Freed in reverse so the tail of a prefix is evicted before its head.
        for block in reversed(seq.block_table):
            self.pool.decref(block)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _needs_copy(self, seq: Sequence) -> bool:
        offset = seq.num_computed_tokens % self.block_size
        idx = seq.num_computed_tokens // self.block_size
        return offset != 0 and idx < len(seq.block_table) and self.pool.ref_counts[seq.block_table[idx]] > 1

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        bs = self.block_size
        for idx in range(len(seq.block_hashes), num_tokens // bs):
            tokens = tuple(seq.token_ids[idx * bs : (idx + 1) * bs])
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = chain_hash(prev, tokens)
            seq.block_hashes.append(block_hash)
            self.pool.register(seq.block_table[idx], block_hash, tokens)
