"""The in-engine SLO loop: the Observation it builds from the engine's own samples over the window, and what it
does with the policy's answer. The engine and the policy are stand-ins here; tests/engine/test_slo_policy.py
runs the real ones."""
from types import SimpleNamespace

import pytest

from semipd.policy.types import Decision, SplitDecision
from semipd.runtime.config import SloSettings
from semipd.runtime.partition import CpuBackend, PartitionController
from semipd.runtime.recent import RecentSamples, percentile
from semipd.runtime.slo_loop import SloLoop

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeEngine:
    def __init__(self, clock):
        self.recent = RecentSamples(clock=clock)
        self.partition = PartitionController(CpuBackend(), initial="prefill=32")
        self.queues = (3, 1, 0.25)

    def queue_state(self):
        return self.queues


def make_loop(decisions=None, **settings):
    clock = Clock()
    engine = FakeEngine(clock)
    calls = []

    def decide(observations, config, state, now):
        calls.append((observations, config, now))
        return decisions.pop(0) if decisions else Decision()
    loop = SloLoop(engine, SloSettings(**{"ttft_ms": 200, "tpot_ms": 50, "window": 30, **settings}),
                   decide=decide, state=object(), clock=clock)
    return loop, engine, clock, calls


def test_percentile_interpolates_between_ranks():
    assert percentile([], 90) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile(list(range(1, 11)), 50) == pytest.approx(5.5)
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    assert percentile([3, 1, 2], 100) == 3


def test_policy_config_from_the_flags():
    loop, *_ = make_loop(percentile=95, partition_min=0.2, partition_max=0.8, partition_step=0.1,
                         partition_cooldown=7)
    c = loop.config
    assert (c.targets.ttft_s, c.targets.tpot_s, c.targets.percentile) == (0.2, 0.05, 95)
    assert (c.split.min, c.split.max, c.split.step, c.split.cooldown_s) == (0.2, 0.8, 0.1, 7)
    assert c.replicas is None
    assert c.initial == pytest.approx(32 / 132)       # the start-up split, as a prefill share


def test_observation_reads_the_window_only():
    loop, engine, clock, _ = make_loop(window=30, percentile=90)
    recent = engine.recent
    recent.ttft(9.0)                                  # before the window: must not count
    recent.count("arrivals", 100)
    clock.now += 40
    for i in range(10):                               # inside the window: TTFT 0.1 .. 1.0, TPOT 0.01 .. 0.1
        recent.ttft((i + 1) / 10)
        recent.tpot((i + 1) / 100)
    loop.observe(clock.now - 30)                      # a read at the window's start: the base for rates
    recent.count("arrivals", 6)
    recent.count("arrived_prompt_tokens", 600)
    recent.count("prefilled_tokens", 450)
    recent.count("output_tokens", 90)
    recent.count("preemptions", 3)
    recent.count("prefill_busy_s", 12.0)
    obs = loop.observe(clock.now)
    assert obs.pod == "self" and obs.sample_age_s == 0.0
    assert obs.ttft_s == pytest.approx(0.91) and obs.tpot_s == pytest.approx(0.091)
    assert obs.requests == 6
    assert (obs.arrival_rate, obs.prompt_rate, obs.prompt_throughput, obs.output_rate, obs.preemption_rate) == \
        pytest.approx((6 / 30, 20, 15, 3, 0.1))
    assert (obs.waiting, obs.handoff, obs.kv_usage) == (3, 1, 0.25)
    assert obs.prefill_busy == pytest.approx(12.0 / 30)
    assert obs.split == pytest.approx(32 / 132) and obs.split_stable


def test_no_traffic_is_zero_not_missing():
    loop, engine, clock, _ = make_loop()
    clock.now += 5
    obs = loop.observe(clock.now)
    assert (obs.ttft_s, obs.tpot_s, obs.requests, obs.arrival_rate) == (None, None, 0, 0)
    assert obs.sample_age_s == 0.0


def test_reads_stay_bounded_by_the_window():
    loop, engine, clock, _ = make_loop(window=30)
    for _ in range(100):
        clock.now += 5
        engine.recent.count("arrivals", 5)
        obs = loop.observe(clock.now)
    assert len(loop._reads) <= 30 / 5 + 2
    assert obs.arrival_rate == pytest.approx(1.0)


def test_a_switch_inside_the_window_makes_the_split_unstable():
    loop, engine, clock, _ = make_loop(window=30)
    engine.partition.set(0.75, source="test")
    clock.now = engine.partition.changed_at + 10
    assert not loop.observe(clock.now).split_stable
    clock.now += 25
    assert loop.observe(clock.now).split_stable


def test_a_changed_decision_is_applied_with_its_source():
    decisions = [Decision(splits={"self": SplitDecision(0.6, True, "TTFTMissed", "p90 TTFT 0.9s > 0.2s")})]
    loop, engine, clock, calls = make_loop(decisions)
    clock.now += 5
    loop.tick(clock.now)
    [(observations, config, now)] = calls
    assert [o.pod for o in observations] == ["self"] and now == clock.now and config is loop.config
    state = engine.partition.get()
    assert state["source"] == "slo-policy"
    assert state["prefill_sms"] == 80                 # 0.6 of 132 rounded to Hopper's groups of 8
    assert loop.last["reason"] == "TTFTMissed" and loop.last["changed"]


def test_an_unchanged_decision_leaves_the_split_alone():
    decisions = [Decision(splits={"self": SplitDecision(0.9, False, "Cooldown", "")})]
    loop, engine, clock, _ = make_loop(decisions)
    loop.tick(clock.now + 5)
    assert engine.partition.get()["source"] == "cli" and engine.partition.get()["prefill_sms"] == 32
    assert loop.last["reason"] == "Cooldown"


def test_an_impossible_split_is_logged_not_raised(caplog):
    decisions = [Decision(splits={"self": SplitDecision(1.5, True, "Bug", "")})]
    loop, engine, clock, _ = make_loop(decisions)
    loop.tick(clock.now + 5)
    assert engine.partition.get()["prefill_sms"] == 32
    assert "cannot be applied" in caplog.text
