import threading

import pytest
import torch

from semipd.runtime.block_manager import BlockManager
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.sequence import Sequence

pytestmark = pytest.mark.unit


def make_seq(n_prompt=5):
    return Sequence("r", list(range(1, n_prompt + 1)), SamplingParams(), lambda out: None, torch.device("cpu"))


def test_allocation_grows_block_table_and_maps_slots():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free == 2
    assert bm.allocate(seq, 8) and len(seq.block_table) == 2   # still fits in two blocks
    b0, b1 = seq.block_table
    assert [bm.slot(seq, p) for p in (0, 3, 4, 7)] == [b0 * 4, b0 * 4 + 3, b1 * 4, b1 * 4 + 3]


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(), make_seq()
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)                 # needs 2 blocks, 1 left
    assert b.block_table == [] and bm.num_free == 1
    bm.free(a)
    assert bm.num_free == 3 and a.block_table == [] and bm.usage == 0.0


def test_concurrent_allocators_never_hand_out_a_block_twice():
    bm = BlockManager(num_blocks=1000, block_size=1)
    seqs = [make_seq() for _ in range(8)]

    def grab(seq):
        for n in range(1, 200):
            if not bm.allocate(seq, n):
                break

    threads = [threading.Thread(target=grab, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [b for s in seqs for b in s.block_table]
    assert len(taken) == len(set(taken))
    assert len(taken) + bm.num_free == 1000
