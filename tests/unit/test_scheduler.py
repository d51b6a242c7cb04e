"""The scheduler's admission and preemption rule, driven without a model: every step of each worker is played
out on the real Scheduler and BlockManager (a "step" only counts tokens as computed), so thousands of seeded
schedules under KV pressure run in seconds and show that every request that fits the pool finishes."""
import random

import pytest
import torch

from semipd.runtime.block_manager import BlockManager
from semipd.runtime.config import EngineConfig
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.scheduler import Scheduler
from semipd.runtime.sequence import Sequence, Status

pytestmark = pytest.mark.unit


class Driver:
    """Plays the two workers' loop bodies in turn: schedule, 'compute', report back."""

    def __init__(self, num_blocks, block_size=4, budget=8, max_num_seqs=8, prefix_caching=True):
        config = EngineConfig(model="unused", max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.metrics = EngineMetrics("test")
        self.finished: list[Sequence] = []
        self.sched = Scheduler(config, self.bm, self.metrics, RecentSamples(), self.finished.append)

    def add(self, request_id, prompt_len, max_tokens, first_token=1):
        prompt = [first_token + i for i in range(prompt_len)]
        seq = Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens), lambda out: None,
                       torch.device("cpu"))
        self.sched.add(seq)
        return seq

    @staticmethod
    def append(seq, token):
        seq.output_token_ids.append(token)
        return "length" if len(seq.output_token_ids) >= seq.params.max_tokens else None

    def prefill_step(self) -> bool:
        chunks = self.sched.schedule_prefill()
        ended = {seq: 7 for seq, n in chunks if seq.num_computed_tokens + n == seq.num_tokens}
        self.sched.prefilled(chunks, ended, self.append)
        return bool(chunks)

    def decode_step(self) -> bool:
        batch = self.sched.schedule_decode()
        self.sched.decoded(batch, [7] * len(batch), self.append)
        return bool(batch)

    def run(self, max_steps=20000, rng=None):
        for step in range(max_steps):
            if not self.sched.by_id:
                return step
            order = [self.prefill_step, self.decode_step]
            if rng is not None:
                rng.shuffle(order)                     # the two workers interleave in any order
            worked = [f() for f in order]
            if not any(worked):
                waiting, prefilling, handoff, running = self.sched.counts()
                raise AssertionError(f"no progress: {waiting} waiting, {prefilling} in prefill, {handoff} handed "
                                     f"off, {running} decoding; {self.bm.num_free} of {self.bm.num_blocks} free")
        raise AssertionError("did not finish")


def test_a_prompt_is_admitted_only_when_the_pool_can_hold_all_of_it():
    # The old rule admitted b with its first chunk as soon as three blocks were free; with a second prompt
    # partly prefilled the two could together need more than the pool and neither could grow (the stall the
    # random schedules below find). Now b waits until its whole prompt fits besides what the others hold.
    d = Driver(num_blocks=12, block_size=4, budget=16)
    a, b = d.add("a", 20, 2), d.add("b", 30, 2, first_token=100)
    d.prefill_step()
    d.prefill_step()                                   # a's last 4 tokens; 12 budget left for b's first chunk
    assert a.status == Status.HANDOFF and b.status == Status.WAITING
    d.run()
    assert {s.request_id for s in d.finished} == {"a", "b"}
    assert all(s.finish_reason == "length" for s in d.finished)


def test_a_request_that_needs_the_whole_pool_is_admitted_once_nothing_else_runs():
    d = Driver(num_blocks=8, block_size=4, budget=8)
    d.add("small", 3, 3)
    d.add("whole", 30, 2, first_token=100)            # 8 blocks with its two generated tokens
    d.run()
    assert sorted(s.request_id for s in d.finished) == ["small", "whole"]


def test_a_preempted_request_waits_for_room_for_the_batch_to_grow_before_it_is_recomputed():
    """Re-admitted only with its whole recompute, the watermark and one block per request in decode free, so it
    does not walk back into the shortage that pushed it out (prefix caching off: every block is recomputed)."""
    readmissions = []
    for seed in range(200):
        rng = random.Random(seed)
        d = Driver(num_blocks=16, block_size=4, budget=rng.choice([8, 16, 64]), max_num_seqs=rng.choice([4, 8]),
                   prefix_caching=False)
        seqs = [d.add(f"r{i}", rng.randint(2, 12), rng.randint(8, 30), first_token=10 * i)
                for i in range(rng.randint(3, 8))]
        while d.sched.by_id:
            before = {s: (s.status, d.bm.num_free, d.bm.blocks_needed(s.num_tokens), d.sched.counts()[3])
                      for s in seqs}
            d.prefill_step()
            for s in seqs:
                status, free, need, running = before[s]
                if s.preemptions and status == Status.WAITING and s.status != Status.WAITING:
                    readmissions.append((seed, free, need, running))
            d.decode_step()
        assert all(s.finished and len(s.output_token_ids) == s.params.max_tokens for s in seqs)
    assert len(readmissions) > 20, "the pool was meant to run dry and push requests out"
    for seed, free, need, running in readmissions:
        assert free >= need + 1 + running, f"seed {seed}: re-admitted with {free} free for {need} blocks"


@pytest.mark.parametrize("num_blocks", [12, 20, 40])
def test_every_request_finishes_under_any_kv_pressure_in_seeded_random_schedules(num_blocks):
    """Random prompts (up to the pool's size), shared prefixes, random arrivals into a running engine and a
    random interleaving of the two workers: each seed must drain, with the pool whole afterwards."""
    preemptions = 0
    for seed in range(60):
        rng = random.Random(seed)
        d = Driver(num_blocks=num_blocks, block_size=4, budget=rng.choice([4, 8, 16]),
                   max_num_seqs=rng.choice([2, 4, 8]), prefix_caching=rng.random() < 0.7)
        pool_tokens = num_blocks * 4
        pending = []
        for i in range(rng.randint(4, 14)):
            max_tokens = rng.randint(1, 12)
            prompt_len = rng.randint(1, pool_tokens - max_tokens)
            pending.append((rng.randint(0, 40), f"r{i}", prompt_len, max_tokens, rng.choice([1, 1, 500 + i])))
        pending.sort()
        step = 0
        while pending or d.sched.by_id:
            while pending and pending[0][0] <= step:
                _, rid, n, m, first = pending.pop(0)
                d.add(rid, n, m, first)
            order = [d.prefill_step, d.decode_step]
            rng.shuffle(order)
            worked = [f() for f in order]
            assert any(worked) or pending or not d.sched.by_id, f"seed {seed}: no progress at step {step}"
            step += 1
            assert step < 20000, f"seed {seed}: did not drain"
        assert all(s.finish_reason == "length" and len(s.output_token_ids) == s.params.max_tokens
                   for s in d.finished), f"seed {seed}"
        assert d.bm.num_free == num_blocks, f"seed {seed}: blocks leaked"
        preemptions += int(d.metrics.preemptions._value.get())
    print(f"pool {num_blocks} blocks: {preemptions} preemptions over 60 seeded schedules")
    if num_blocks == 12:
        assert preemptions > 0, "the smallest pool was meant to force preemption"


def test_a_cached_prefix_is_counted_in_the_vllm_metrics_and_on_the_request():
    d = Driver(num_blocks=20, block_size=4, budget=64)
    d.add("first", 10, 1)
    d.run()
    second = d.add("second", 10, 1)
    d.run()
    assert second.num_cached_tokens == 8
    assert d.metrics.prefix_cache_hits._value.get() == 8
    assert d.metrics.prefix_cache_queries._value.get() == 20


def test_finish_is_the_one_way_out_from_every_queue():
    d = Driver(num_blocks=20, block_size=4, budget=4, max_num_seqs=8)
    waiting = d.add("waiting", 3, 5)
    d.sched.abort("waiting")
    assert waiting.finished and waiting.finish_reason == "abort"
    chunked = d.add("chunked", 10, 5)
    d.prefill_step()
    assert chunked.status == Status.PREFILL
    d.sched.abort("chunked")                          # being computed: it leaves when its step returns
    assert not chunked.finished
    d.prefill_step()
    assert chunked.finished and d.bm.num_free == 20
    assert [s.request_id for s in d.finished] == ["waiting", "chunked"]
