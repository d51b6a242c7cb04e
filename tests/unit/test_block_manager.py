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


# ---- prefix caching ---------------------------------------------------------------------------------------------
def prompt_seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams(), lambda out: None, torch.device("cpu"))


def compute(bm, seq):
    """What the prefill worker does for a whole prompt: blocks, then its KV counted as computed and offered."""
    prefix = bm.cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    return prefix


def test_a_repeated_prefix_shares_the_computed_blocks_and_keeps_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = prompt_seq(range(1, 11))                    # 10 tokens: two full blocks and a partial one
    compute(bm, first)
    second = prompt_seq(list(range(1, 9)) + [99, 98])   # same first 8 tokens, then different
    prefix = bm.cached_prefix(second)
    assert prefix == first.block_table[:2]
    assert bm.allocate(second, second.num_tokens, prefix)
    assert second.num_computed_tokens == 8 and second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert bm.num_free == 8 - 3 - 1                     # the shared blocks are held once

    exact = prompt_seq(range(1, 9))                     # 8 tokens, both blocks cached: the last is computed
    assert bm.cached_prefix(exact) == first.block_table[:1]


def test_a_different_earlier_block_means_no_hit_even_with_equal_later_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, prompt_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.cached_prefix(prompt_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_released_blocks_stay_cached_count_as_free_and_are_evicted_only_when_needed_tail_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = prompt_seq(range(1, 13))                        # 3 full blocks
    compute(bm, a)
    blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free == 4 and bm.usage == 0.0 and bm.num_cached == 3
    filler = prompt_seq([50, 51, 52, 53], "filler")
    assert bm.allocate(filler, 4)                       # takes the never-used block first: nothing evicted
    assert filler.block_table[0] not in blocks and bm.num_cached == 3
    other = prompt_seq([60], "other")
    assert bm.allocate(other, 1)                        # now one cached block goes: the prompt's tail
    assert other.block_table == [blocks[2]] and bm.num_cached == 2
    again = prompt_seq(range(1, 14))
    assert bm.cached_prefix(again) == blocks[:2]        # its start survived


def test_taking_a_cached_prefix_counts_revived_blocks_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = prompt_seq(range(1, 9))
    compute(bm, a)
    bm.free(a)
    b = prompt_seq(list(range(1, 5)) + [7, 7, 7, 7, 7])  # hits block 1; needs 2 more
    prefix = bm.cached_prefix(b)
    assert len(prefix) == 1
    assert not bm.allocate(b, b.num_tokens, prefix, headroom=1)   # 1 revived + 2 new + 1 headroom > 3
    assert b.block_table == [] and bm.num_free == 3
    assert bm.allocate(b, b.num_tokens, prefix)


def test_a_prefix_evicted_between_lookup_and_allocation_is_computed_instead():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = prompt_seq(range(1, 6))
    compute(bm, a)
    bm.free(a)
    b = prompt_seq(range(1, 6), "b")
    prefix = bm.cached_prefix(b)
    assert len(prefix) == 1
    thief = prompt_seq([9] * 8, "thief")
    assert bm.allocate(thief, 8)                        # evicts the cached block
    bm.free(thief)
    assert bm.allocate(b, b.num_tokens, prefix)
    assert b.num_computed_tokens == 0


def test_two_requests_that_computed_the_same_block_keep_one_in_the_cache_and_free_both():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = prompt_seq(range(1, 6), "a"), prompt_seq(range(1, 6), "b")
    for seq in (a, b):                                  # both admitted before either registered
        assert bm.allocate(seq, seq.num_tokens)
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.register_computed(seq)
    assert bm.num_cached == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 4 and bm.num_cached == 1


def test_prefix_caching_off_registers_nothing():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    compute(bm, prompt_seq(range(1, 10)))
    assert bm.num_cached == 0 and bm.cached_prefix(prompt_seq(range(1, 10))) == []


def test_generated_tokens_fill_blocks_that_a_follow_up_prompt_reuses():
    bm = BlockManager(num_blocks=8, block_size=4)
    turn = prompt_seq([1, 2, 3])
    compute(bm, turn)
    for token in (4, 5, 6):                             # decode: a slot for each new token, then it is computed
        turn.output_token_ids.append(token)
        assert bm.allocate(turn, turn.num_tokens)
        turn.num_computed_tokens += 1
        bm.register_computed(turn)
    follow_up = prompt_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.cached_prefix(follow_up) == turn.block_table[:1]
