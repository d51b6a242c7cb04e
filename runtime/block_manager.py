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

Each sequence's block table is kept twice, in step: the list seq.block_table (what this module and the scheduler
reason about) and a row of BlockTables, a host tensor the model runner gathers a batch's tables from in one
operation. Rows are host memory only, read by that gather; what a step copies to the device is the gathered
batch, in memory of its own, so a row, like a block, is reused with no stream ordering of its own.
"""
import hashlib
import threading
from array import array
from collections import OrderedDict, deque

import torch

from semipd.runtime.sequence import Sequence

INITIAL_TABLE_ROWS = 16       # BlockTables doubles its rows when more sequences hold blocks at once


class BlockTables:
    """Every sequence's block table as a row of one int32 tensor [rows, width]: a row is taken with a sequence's
    first block, extended as blocks are added (an element write, not a rebuilt list) and zeroed when the blocks
    are released, so past a sequence's blocks its row reads 0 (the padding ForwardBatch documents).

    Written only under BlockManager's lock. Gathered without it: a worker gathers only its own sequences' rows,
    and only that worker's scheduling (or, before a handoff, the worker it came from, under the scheduler's lock)
    writes them. A growth copies every row under the lock, so a gather from the tensor before the growth still
    sees its rows whole."""

    def __init__(self, width: int, rows: int = INITIAL_TABLE_ROWS):
        self._tensor = torch.zeros(rows, max(1, width), dtype=torch.int32)
        self._view = self._tensor.numpy()        # element writes through numpy: far cheaper than tensor indexing
        self._free_rows = list(range(rows - 1, -1, -1))

    @property
    def tensor(self) -> torch.Tensor:
        return self._tensor

    def take(self) -> int:
        if not self._free_rows:
            self._grow(2 * self._tensor.shape[0], self._tensor.shape[1])
        return self._free_rows.pop()

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        end = start + len(blocks)
        if end > self._tensor.shape[1]:           # only when a caller goes past the width it was promised
            self._grow(self._tensor.shape[0], max(end, 2 * self._tensor.shape[1]))
        self._view[row, start:end] = blocks

    def release(self, row: int, length: int) -> None:
        self._view[row, :length] = 0
        self._free_rows.append(row)

    def _grow(self, rows: int, width: int) -> None:
        old = self._tensor
        new = torch.zeros(rows, width, dtype=torch.int32)
        new[:old.shape[0], :old.shape[1]] = old
        self._free_rows[:0] = range(rows - 1, old.shape[0] - 1, -1)   # new rows, taken after the old free ones
        self._tensor, self._view = new, new.numpy()

    def gather(self, rows: list[int], width: int, pin_memory: bool = False) -> torch.Tensor:
        """[len(rows), width] int32: those rows' first `width` columns, in one index_select. With pin_memory the
        result is in page-locked memory, so its copy to the device can be truly asynchronous."""
        table = self._tensor
        out = torch.empty(len(rows), width, dtype=torch.int32, pin_memory=pin_memory)
        return torch.index_select(table[:, :width], 0, torch.tensor(rows, dtype=torch.int64), out=out)


def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_blocks_per_seq: int | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._never_used = deque(range(num_blocks))            # free and registered under no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but registered: oldest release first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._lock = threading.Lock()
        # No table holds a block twice, so num_blocks columns always do; the runner passes its max_model_len's.
        self.tables = BlockTables(max_blocks_per_seq or num_blocks)

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
        if not prefix and not headroom and self.blocks_needed(num_tokens) <= len(seq.block_table):
            return True                                 # the decode step's usual case: no lock, nothing to do
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
            start = len(seq.block_table)
            seq.block_table.extend(prefix)
            for _ in range(max(missing, 0)):
                seq.block_table.append(self._take_free())
            self._write_row(seq, start)
            if prefix:
                seq.num_computed_tokens = len(prefix) * self.block_size
                seq.num_registered_blocks = len(prefix)
            return True

    def _write_row(self, seq: Sequence, start: int) -> None:
        """Mirror the blocks seq's table got from `start` on into its row of self.tables."""
        if len(seq.block_table) == start:
            return
        if seq.table_row is None:
            seq.table_row = self.tables.take()
        self.tables.write(seq.table_row, start, seq.block_table[start:])

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
            if seq.table_row is not None:
                self.tables.release(seq.table_row, len(seq.block_table))
                seq.table_row = None
            seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
