"""The KV pool's bookkeeping: which blocks a sequence holds, which are free, which cache a prefix.

A full block is keyed by its tokens chained with the key of the block before it, so one key names
the whole prefix up to the block's end (vLLM's and nano-vllm's prefix caching). A hit is checked
against the block's recorded identity (parent key and tokens), so a hash collision costs a miss,
never a wrong answer. When a block's last holder lets go, a keyed block keeps its KV and joins an
LRU of evictable blocks: a later sequence with the same prefix takes it back instead of computing
it. New blocks come from the never-keyed free list first, then from the LRU's oldest end.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from worker_orcd.engine.sequence import Sequence

Identity = tuple[int | None, tuple[int, ...]]  # (parent key, the block's tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._identity: list[Identity | None] = [None] * num_blocks  # keyed blocks only
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._cached: dict[int, int] = {}  # key: block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, keyed or not: what allocation can still take."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: Seq[int]) -> list[int]:
        """The cached blocks holding the longest run of leading full blocks of `token_ids`,
        short of the last token: its logits are needed, so it is always computed."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        key = None
        for start in range(0, len(token_ids) - self.block_size, self.block_size):
            identity = (key, tuple(token_ids[start : start + self.block_size]))
            key = hash(identity)
            block = self._cached.get(key)
            if block is None or self._identity[block] != identity:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: Seq[int] = ()) -> bool:
        """Whether `allocate(seq, num_tokens, prefix)` would succeed."""
        new = self.blocks_for(num_tokens) - len(seq.block_table) - len(prefix)
        reclaimed = sum(1 for block in prefix if self.ref_counts[block] == 0)
        return max(new, 0) + reclaimed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, prefix: Seq[int] = ()) -> None:
        """Give `seq` blocks for its first `num_tokens` positions. `prefix`, for a sequence that
        holds none yet, are the blocks `match_prefix` found: their tokens count as computed."""
        assert self.can_allocate(seq, num_tokens, prefix), "check can_allocate first"
        if prefix:
            assert not seq.block_table, "a prefix only starts a sequence's blocks"
            for block in prefix:
                self._hold(block)
                seq.block_hashes.append(hash(self._identity[block]))
            seq.block_table.extend(prefix)
            seq.num_computed_tokens = seq.num_cached_tokens = len(prefix) * self.block_size
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take_new())

    def cache_blocks(self, seq: Sequence) -> None:
        """Key the blocks that the sequence's computed tokens now fill, for later hits. A prefix
        another block already caches stays keyed to that block."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for index in range(len(seq.block_hashes), full):
            start = index * self.block_size
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            identity = (parent, tuple(seq.token_ids[start : start + self.block_size]))
            key = hash(identity)
            seq.block_hashes.append(key)
            block = seq.block_table[index]
            if key not in self._cached and self._identity[block] is None:
                self._cached[key] = block
                self._identity[block] = identity

    def free(self, seq: Sequence) -> None:
        """Let go of the sequence's blocks, last first, so that the LRU evicts a prefix's tail
        before its head."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self._identity[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def _take_new(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[hash(self._identity[block])]
            self._identity[block] = None
        self.ref_counts[block] = 1
        return block
