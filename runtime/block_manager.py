"""The unified memory manager: one pool of KV blocks shared by the prefill and decode workers, with automatic
prefix caching.

Both workers allocate from it concurrently, so "check free space, take blocks, update usage" is one step under
one lock (semi-PD's fix for the write-after-read race between the two phases).

Prefix caching: a block whose every token has its K/V computed is registered under a hash of its tokens chained
with the hash of the prefix before it, so equal hashes mean equal prefixes (sha256: a collision would serve
another prompt's KV). Blocks are reference-counted; a request admitted with a prompt whose leading blocks are
registered takes those blocks instead of computing them. A block nobody references stays registered and counts
as free; it is evicted, least recently released first, only when a block is needed and no never-registered one
is left. Registered blocks are never written again: a request computes at least its last prompt token itself,
in a block of its own, and a second copy of a block two requests computed at once stays private to its owner.

Block ids are reused with no stream ordering of their own: every step syncs the host before it returns its
blocks (sampling reads its logits), so no kernel is still writing a block when another request takes it.
"""
import hashlib
import threading
from array import array
from collections import OrderedDict, deque

from semipd.runtime.sequence import Sequence


def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._never_used = deque(range(num_blocks))            # free and registered under no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but registered: oldest release first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._never_used) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks (referenced or not): what prefix hits can come from."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks that hold seq's leading tokens, at most up to its last token but one (that one is
        computed for its logits). Caller holds no lock; the answer is a hint until `allocate` takes them."""
        if not self.enable_prefix_caching:
            return []
        hashes = self._full_block_hashes(seq, seq.num_tokens - 1)
        blocks = []
        with self._lock:
            for h in hashes:
                block = self._block_of.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] = (), headroom: int = 0) -> bool:
        """Grow seq's block table to hold num_tokens tokens, all or nothing. `prefix`: cached blocks to start an
        empty table with (from cached_prefix); they count as computed. `headroom`: free blocks that must remain."""
        with self._lock:
            if any(self._block_of.get(h) != b for h, b in zip(seq.block_hashes, prefix)):
                prefix = []                             # evicted since the lookup: compute it
            revived = sum(1 for b in prefix if self._ref[b] == 0)
            missing = self.blocks_needed(num_tokens) - len(seq.block_table) - len(prefix)
            if max(missing, 0) + revived + headroom > self.num_free:
                return False
            for block in prefix:
                if self._ref[block] == 0:
                    del self._evictable[block]
                self._ref[block] += 1
            seq.block_table.extend(prefix)
            for _ in range(max(missing, 0)):
                seq.block_table.append(self._take_free())
            if prefix:
                seq.num_computed_tokens = len(prefix) * self.block_size
                seq.num_registered_blocks = len(prefix)
            return True

    def _take_free(self) -> int:
        if self._never_used:
            block = self._never_used.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._ref[block] = 1
        return block

    def register_computed(self, seq: Sequence) -> None:
        """Register seq's blocks that are full and computed, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq, seq.num_computed_tokens)
        with self._lock:
            for i in range(seq.num_registered_blocks, full):
                block = seq.block_table[i]
                if block not in self._hash_of and hashes[i] not in self._block_of:
                    self._hash_of[block] = hashes[i]
                    self._block_of[hashes[i]] = block
            seq.num_registered_blocks = full

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Chained hashes of seq's full blocks within its first num_tokens tokens, extended and kept on seq."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(chain_hash(hashes[-1] if hashes else None, seq.token_ids(i * bs, (i + 1) * bs)))
        return hashes[:num_tokens // bs]

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks go first, so eviction takes a prompt's end before its shared start."""
        with self._lock:
            for block in reversed(seq.block_table):
                self._ref[block] -= 1
                if self._ref[block] == 0:
                    if block in self._hash_of:
                        self._evictable[block] = None
                    else:
                        self._never_used.append(block)
            seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
