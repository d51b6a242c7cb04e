"""The unified memory manager: one pool of KV blocks shared by the prefill and decode workers.

Both workers allocate from it concurrently, so "check free space, take blocks, update usage" is one step under
one lock (semi-PD's fix for the write-after-read race between the two phases)."""
import threading
from collections import deque

from semipd.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = deque(range(num_blocks))
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; all or nothing."""
        with self._lock:
            missing = self.blocks_needed(num_tokens) - len(seq.block_table)
            if missing <= 0:
                return True
            if missing > len(self._free):
                return False
            seq.block_table.extend(self._free.popleft() for _ in range(missing))
            return True

    def free(self, seq: Sequence) -> None:
        with self._lock:
            self._free.extend(seq.block_table)
            seq.block_table = []
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
