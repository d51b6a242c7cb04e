"""The block manager's table rows (BlockTables), which the model runner gathers a batch's tables from, against
the lists they mirror: seeded random schedules of both workers on the real Scheduler, under KV pressure
(preemption), with shared prompt starts (prefix-cache hits), aborts, and a table that starts with one row and
two columns so it must grow both ways. After every step each live sequence's row must hold its block list and
zeros after it, and a gathered batch must equal the lists padded with zeros (how batches were built before)."""
import random

import pytest
import torch

from semipd.runtime.block_manager import BlockManager, BlockTables
from semipd.runtime.config import EngineConfig
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.scheduler import Scheduler
from semipd.runtime.sequence import Sequence

pytestmark = pytest.mark.unit


def padded(seqs, width):
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)


def check_rows(bm, seqs):
    table = bm.tables.tensor
    holders = [s for s in seqs if s.block_table]
    rows = [s.table_row for s in holders]
    assert None not in rows and len(set(rows)) == len(rows), "each sequence holding blocks has a row of its own"
    for s in seqs:
        if not s.block_table:
            assert s.table_row is None, f"{s.request_id} holds no blocks but keeps row {s.table_row}"
            continue
        row = table[s.table_row]
        assert row[:len(s.block_table)].tolist() == s.block_table, s.request_id
        assert not row[len(s.block_table):].any(), f"{s.request_id}: its row is not zero past its blocks"


def check_gather(bm, batch):
    if batch:
        width = max(len(s.block_table) for s in batch)
        assert torch.equal(bm.tables.gather([s.table_row for s in batch], width), padded(batch, width))


def append(seq, token):
    seq.output_token_ids.append(token)
    return "length" if len(seq.output_token_ids) >= seq.params.max_tokens else None


def test_table_rows_mirror_the_block_lists_through_random_schedules():
    preemptions = cached = 0
    for seed in range(40):
        metrics = run_schedule(seed)
        preemptions += metrics.preemptions._value.get()
        cached += metrics.prefix_cache_hits._value.get()
    assert preemptions > 10 and cached > 100, "the schedules were meant to preempt and to hit the prefix cache"


def run_schedule(seed):
    rng = random.Random(seed)
    num_blocks, block_size = rng.choice([12, 20, 40]), 4
    config = EngineConfig(model="unused", max_num_batched_tokens=rng.choice([4, 8, 16]),
                          max_num_seqs=rng.choice([2, 4, 8]))
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=rng.random() < 0.8)
    bm.tables = BlockTables(width=2, rows=1)           # grows in rows and columns during the run
    metrics = EngineMetrics("test")
    sched = Scheduler(config, bm, metrics, RecentSamples(), lambda seq: None)
    shared = [rng.randrange(50) for _ in range(12)]
    seqs, pending = [], sorted((rng.randint(0, 10), i) for i in range(rng.randint(6, 14)))
    for step in range(5000):
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            max_tokens = rng.randint(1, 24)
            start = shared[:rng.choice([0, 4, 8, 12])]
            room = num_blocks * block_size - max_tokens - len(start)     # the request fits the pool alone
            prompt = start + [rng.randrange(50) for _ in range(rng.randint(1, min(room, 40)))]
            seqs.append(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), lambda out: None,
                                 torch.device("cpu")))
            sched.add(seqs[-1])
        if not pending and not sched.by_id:
            break
        if seqs and rng.random() < 0.03:
            sched.abort(rng.choice(seqs).request_id)
        for worker in rng.sample(["prefill", "decode"], 2):
            if worker == "prefill":
                chunks = sched.schedule_prefill()
                check_gather(bm, [s for s, _ in chunks])
                ended = {s: 7 for s, n in chunks if s.num_computed_tokens + n == s.num_tokens}
                sched.prefilled(chunks, ended, append)
            else:
                batch = sched.schedule_decode()
                check_gather(bm, batch)
                sched.decoded(batch, [rng.randrange(50) for _ in batch], append)
            check_rows(bm, seqs)
    else:
        raise AssertionError(f"seed {seed}: did not drain")
    assert bm.num_free == num_blocks and not bm.tables.tensor.any(), "every row zeroed once its blocks went back"
    assert bm.tables.tensor.shape[1] > 2, "the run was meant to outgrow the table's first width"
    return metrics


def test_a_row_is_taken_with_the_first_block_and_given_back_zeroed_with_the_last():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = (Sequence(n, list(range(10)), SamplingParams(), lambda out: None, torch.device("cpu")) for n in "ab")
    assert bm.allocate(a, 5) and bm.allocate(b, 4) and bm.allocate(a, 9)
    assert a.table_row != b.table_row
    assert bm.tables.gather([b.table_row, a.table_row], 3).tolist() == [b.block_table + [0, 0], a.block_table]
    row = a.table_row
    bm.free(a)
    assert a.table_row is None and not bm.tables.tensor[row].any()
    c = Sequence("c", [1], SamplingParams(), lambda out: None, torch.device("cpu"))
    assert bm.allocate(c, 1) and c.table_row == row      # the row comes back into use, clean
    assert bm.tables.tensor[row].tolist()[:2] == [c.block_table[0], 0]
