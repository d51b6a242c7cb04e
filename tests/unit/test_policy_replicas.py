"""The replica decision, jointly with the splits: scale out by what the load needs, never while new pods start,
scale in only after the stabilisation window, zero traffic scales in, missing metrics hold."""
import pytest

from semipd.policy import Observation, PolicyConfig, PolicyState, ReplicaBounds, SplitBounds, Targets, decide
from semipd.policy.replicas import wanted
from semipd.policy.split import Assessment

pytestmark = pytest.mark.unit

BOUNDS = ReplicaBounds(min=1, max=8, scale_down_stabilization_s=300)
CFG = PolicyConfig(targets=Targets(ttft_s=0.5, tpot_s=0.05), split=SplitBounds(cooldown_s=30), replicas=BOUNDS,
                   window_s=60)


def obs(name, ttft=0.2, tpot=0.02, rate=300.0, split=0.484848, **kw):
    fields = dict(split=split, ttft_s=ttft, tpot_s=tpot, requests=rate / 100, arrival_rate=rate / 100,
                  prompt_rate=rate, prompt_throughput=rate, sample_age_s=1.0)
    fields.update(kw)
    return Observation(name, **fields)


def step(observations, state, now, current, ready=None, cfg=CFG):
    return decide(observations, cfg, state, now, current, current if ready is None else ready).replicas


def test_with_a_capacity_estimate_scale_out_goes_straight_to_what_the_load_needs():
    # four pods at 1000 tok/s each, one pod takes 500 at 80 % utilisation -> 3200/... = 10 pods, capped at 8
    a = [Assessment(valid=True, traffic=True, load=1000, feasible=False, capacity=625)] * 4
    need, reason, message = wanted(a, current=4, bounds=BOUNDS)
    assert (need, reason) == (8, "NoSplitMeetsSLO") and "500 per pod" in message
    a = [Assessment(valid=True, traffic=True, load=1500, feasible=False, capacity=1250)] * 2
    assert wanted(a, current=2, bounds=BOUNDS)[0] == 3          # 3000 tok/s at 1000 per pod


def test_a_pod_far_over_its_target_scales_out_before_its_split_reaches_a_bound():
    # the split could still step (feasible unknown), but at 3x the target one cooled-down step at a time comes
    # too late: scale out now, in proportion (the simulator's fleet stayed Steady while the load quadrupled)
    far = Assessment(valid=True, traffic=True, load=1000, pressure=3.0)
    need, reason, message = wanted([far, Assessment(valid=True, traffic=True, load=200, pressure=0.5)], current=2,
                                   bounds=BOUNDS)
    assert (need, reason) == (4, "Overloaded") and "1 pod(s) at 2x a target" in message
    near = Assessment(valid=True, traffic=True, load=1000, pressure=1.5)       # over, but a split step may do
    assert wanted([near], current=2, bounds=BOUNDS)[1] == "Steady"


def test_without_a_model_scale_out_sizes_by_what_saturated_pods_served_not_by_the_latency():
    # two pods with a queue served 500 prompt tok/s each; 2000 arrive: at 80 % utilisation that is 5 pods, however
    # far over the latency is (a backlog left from start-up would otherwise double the fleet again and again)
    a = [Assessment(valid=True, traffic=True, load=1000, pressure=9.0, served=500, saturated=True)] * 2
    need, reason, message = wanted(a, current=2, bounds=BOUNDS)
    assert (need, reason) == (5, "Overloaded") and "as saturated pods served" in message
    idle = [Assessment(valid=True, traffic=True, load=1000, pressure=9.0, served=500, saturated=False)] * 2
    assert wanted(idle, current=2, bounds=BOUNDS)[0] == 4           # no queue: proportional, at most doubling


def test_scale_in_goes_by_what_pods_served_within_their_targets_not_by_a_saturated_figure():
    # saturated pods measure a pod at its limit, where latencies are far over: alone, they never size a scale-in
    a = [Assessment(valid=True, traffic=True, load=100, margin_ok=True, served=5000, saturated=True)] * 4
    assert wanted(a, current=4, bounds=BOUNDS)[:2] == (3, "LowLoad")     # one at a time, not to 1
    calm = [Assessment(valid=True, traffic=True, load=100, margin_ok=True, served=100, pressure=0.2)] * 4
    assert wanted(calm, current=4, bounds=BOUNDS, remembered=5000)[:2] == (3, "LowLoad")
    need, reason, message = wanted(calm, current=4, bounds=BOUNDS, remembered=5000, proven=500)
    assert (need, reason) == (1, "LowLoad") and "within the targets" in message   # 400 tok/s fit one pod at 400


def test_one_pod_near_its_target_does_not_hold_a_fleet_but_the_typical_pod_does():
    def pods(*pressures):
        return [Assessment(valid=True, traffic=True, load=100, served=100, pressure=p) for p in pressures]
    need, reason, _ = wanted(pods(0.2, 0.3, 0.2, 0.95), current=4, bounds=BOUNDS, proven=500)
    assert (need, reason) == (1, "LowLoad")
    assert wanted(pods(0.9, 0.85, 0.9, 0.1), current=4, bounds=BOUNDS, proven=500)[:2] == (4, "Steady")


def test_the_proven_capacity_is_what_calm_pods_took_and_the_most_of_it_is_kept():
    state = PolicyState()
    # catching up on a backlog: served 900 of 400 arriving; what it was proven to take is the 400
    step([obs("a", rate=400, prompt_throughput=900.0), obs("b", rate=400, prompt_throughput=900.0)], state, 0.0, 2)
    assert state.proven_capacity == 400.0
    step([obs("a", rate=200), obs("b", rate=200)], state, 15.0, 2)            # a lighter window: the 400 stays
    assert state.proven_capacity == 400.0
    step([obs("a", ttft=0.45, rate=800), obs("b", ttft=0.45, rate=800)], state, 30.0, 2)   # near the target
    assert state.proven_capacity == 400.0
    assert PolicyState.from_json(state.to_json()).proven_capacity == 400.0


def test_a_saturated_window_is_remembered_for_the_scale_in_and_survives_a_restart():
    state = PolicyState()
    busy = [obs("a", ttft=1.6, waiting=5.0, prompt_throughput=500.0),
            obs("b", ttft=1.6, waiting=5.0, prompt_throughput=500.0)]
    step(busy, state, 100.0, 2)
    assert state.served_capacity == 500.0
    restored = PolicyState.from_json(state.to_json())
    assert restored.served_capacity == 500.0


def test_through_decide_a_far_miss_scales_out_while_the_split_also_moves():
    state = PolicyState()
    d = decide([obs("a", ttft=1.6), obs("b", ttft=1.6)], CFG, state, 100.0, 2, 2)
    assert d.splits["a"].changed and d.splits["a"].reason == "TTFTAboveTarget"
    assert d.replicas.changed and d.replicas.reason == "Overloaded" and d.replicas.target == 4


def test_capacity_need_is_never_less_than_one_more_pod():
    a = [Assessment(valid=True, traffic=True, load=100, feasible=False, capacity=10_000)]
    assert wanted(a, current=3, bounds=BOUNDS)[0] == 4


def test_without_a_capacity_estimate_scale_out_is_proportional_and_at_most_doubles():
    a = [Assessment(valid=True, traffic=True, load=800, feasible=False, pressure=1.5)] * 2
    assert wanted(a, current=2, bounds=BOUNDS)[0] == 3
    a = [Assessment(valid=True, traffic=True, load=800, feasible=False, pressure=40.0)] * 2
    assert wanted(a, current=2, bounds=BOUNDS)[0] == 4


def test_both_targets_missed_scales_out_through_decide():
    state = PolicyState()
    d = step([obs("a", ttft=1.5, tpot=0.09)], state, now=0.0, current=1)
    assert d.changed and d.reason == "NoSplitMeetsSLO" and d.target == 2


def test_no_second_scale_out_while_new_pods_start_or_settle():
    state = PolicyState()
    assert step([obs("a", ttft=1.5, tpot=0.09)], state, now=0.0, current=1).target == 2
    waiting = step([obs("a", ttft=1.5, tpot=0.09)], state, now=15.0, current=2, ready=1)
    assert (waiting.changed, waiting.reason) == (False, "WaitingForPods")
    settling = step([obs("a", ttft=1.5, tpot=0.09), obs("b", ttft=1.5, tpot=0.09)], state, now=30.0, current=2)
    assert (settling.changed, settling.reason) == (False, "Settling")
    again = step([obs("a", ttft=1.5, tpot=0.09), obs("b", ttft=1.5, tpot=0.09)], state, now=61.0, current=2)
    assert again.changed and again.target > 2


def test_scale_in_waits_for_the_whole_stabilisation_window():
    state = PolicyState()
    calm = [obs(n, ttft=0.05, tpot=0.01, rate=50) for n in "abc"]
    decisions = [step(calm, state, now=t, current=3) for t in range(0, 300, 15)]
    assert all(not d.changed and d.reason == "Stabilizing" for d in decisions)
    d = step(calm, state, now=301.0, current=3)
    assert d.changed and d.target == 2 and d.reason == "LowLoad"


def test_a_busy_moment_inside_the_window_restarts_it():
    state = PolicyState()
    calm = [obs(n, ttft=0.05, tpot=0.01, rate=50) for n in "ab"]
    step(calm, state, now=0.0, current=2)
    step([obs("a", ttft=0.45, tpot=0.02), obs("b", ttft=0.05, tpot=0.01)], state, now=200.0, current=2)
    # the window starts again at the first calm window after the busy one (320 s)
    assert not step(calm, state, now=320.0, current=2).changed
    assert not step(calm, state, now=520.0, current=2).changed
    assert step(calm, state, now=621.0, current=2).changed


def test_zero_traffic_scales_in_to_the_minimum_after_the_window():
    state = PolicyState()
    idle = [obs(n, ttft=None, tpot=None, rate=0, requests=0) for n in "abcd"]
    assert not step(idle, state, now=0.0, current=4).changed
    d = step(idle, state, now=301.0, current=4)
    assert d.changed and d.target == BOUNDS.min and d.reason == "NoTraffic"


def test_missing_metrics_hold_the_count():
    state = PolicyState()
    gone = [obs(n, sample_age_s=None) for n in "ab"]
    d = step(gone, state, now=0.0, current=2)
    assert (d.changed, d.reason) == (False, "MetricsMissing")


def test_one_pod_without_metrics_does_not_block_a_scale_out_but_blocks_scale_in():
    state = PolicyState()
    d = step([obs("a", ttft=1.5, tpot=0.09), obs("b", sample_age_s=None)], state, now=0.0, current=2)
    assert d.changed and d.target > 2
    state = PolicyState()
    calm = [obs("a", ttft=0.05, tpot=0.01, rate=50), obs("b", sample_age_s=None)]
    for t in range(0, 400, 15):
        assert not step(calm, state, now=t, current=2).changed


def test_counts_outside_the_bounds_are_pulled_inside():
    state = PolicyState()
    d = step([obs("a")], state, now=0.0, current=12)
    assert (d.target, d.changed, d.reason) == (8, True, "Bounds")


def test_a_steady_load_within_targets_keeps_the_count():
    state = PolicyState()
    busy = [obs(n, ttft=0.35, tpot=0.035, rate=600) for n in "ab"]
    assert not any(step(busy, state, now=t, current=2).changed for t in range(0, 1200, 15))


def test_without_replica_bounds_the_policy_leaves_the_count_alone():
    cfg = PolicyConfig(targets=CFG.targets)
    assert decide([obs("a", ttft=2.0, tpot=0.2)], cfg, PolicyState(), 0.0, 1, 1).replicas is None
