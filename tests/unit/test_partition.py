import pytest

from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.partition import (CpuBackend, PartitionController, PartitionError, PartitionFileWatcher,
                                      parse_split_value)

pytestmark = pytest.mark.unit


def test_hopper_rounding_rules():
    backend = CpuBackend(total_sms=132, granularity=8)
    assert sorted(backend.splits) == list(range(8, 121, 8))
    for split in backend.splits.values():
        assert split.prefill_sms % 8 == 0 and split.prefill_sms + split.decode_sms == 132
        assert split.decode_sms >= 8


@pytest.mark.parametrize("value, expected", [
    ("prefill=64", ("sms", 64)), ("prefill=0.5", ("fraction", 0.5)), (" prefill = 16 ", ("sms", 16)),
    (64, ("sms", 64)), (0.25, ("fraction", 0.25)), ({"prefill": 40}, ("sms", 40)), ({"prefill": 0.75}, ("fraction", 0.75)),
    ("prefill=64.0", ("sms", 64)),
])
def test_parse_split_value(value, expected):
    assert parse_split_value(value) == expected


@pytest.mark.parametrize("value", ["decode=64", "prefill", "prefill=abc", {"decode": 3}, {"prefill": "x"},
                                   True, 1.5, float("nan"), None, [64]])
def test_parse_split_value_rejects(value):
    with pytest.raises(PartitionError):
        parse_split_value(value)


def test_fraction_rounds_to_nearest_allowed_and_reports_it():
    c = PartitionController(CpuBackend())
    state = c.set("prefill=0.5", source="cli")       # 66 SMs wanted: 64 and 72 are the neighbours
    assert state["prefill_sms"] == 64 and state["decode_sms"] == 68
    assert state["requested"] == "prefill=0.5" and state["source"] == "cli"
    assert c.set({"prefill": 0.99}, "admin-api")["prefill_sms"] == 120   # clamps to the largest allowed


def test_impossible_split_names_the_allowed_values():
    c = PartitionController(CpuBackend())
    with pytest.raises(PartitionError) as err:
        c.set("prefill=60", source="admin-api")
    assert err.value.allowed == list(range(8, 121, 8))
    assert "allowed prefill SM counts" in str(err.value)


def test_switch_completes_when_both_workers_reach_an_iteration_boundary():
    metrics = EngineMetrics("m")
    c = PartitionController(CpuBackend(), metrics)
    c.history = []
    c.set("prefill=16", "cli")
    c.begin_step("prefill")
    c.begin_step("prefill")
    assert c.switches == 0                   # decode has not picked it up yet
    c.begin_step("decode")
    assert c.switches == 1
    assert c.get()["applied"] == {"prefill": 16, "decode": 116}
    assert [s.prefill_sms for _, s in c.history] == [16, 16, 16]
    assert metrics.registry.get_sample_value("semipd:partition_switches_total",
                                             {"model_name": "m", "engine": "0"}) == 1
    assert metrics.registry.get_sample_value("semipd:sm_count",
                                             {"model_name": "m", "engine": "0", "phase": "decode"}) == 116


def test_last_writer_wins_and_is_reported(tmp_path):
    c = PartitionController(CpuBackend())
    path = tmp_path / "sm-partition"
    path.write_text("prefill=24")
    watcher = PartitionFileWatcher(str(path), c)
    watcher.poll()
    assert c.get()["prefill_sms"] == 24 and c.get()["source"] == "partition-file"
    c.set({"prefill": 96}, "admin-api")
    assert c.get()["source"] == "admin-api"
    watcher.poll()                           # unchanged file: the admin's later write stands
    assert c.get()["prefill_sms"] == 96
    path.write_text('semipd.io/other="x"\nsemipd.io/sm-partition="prefill=0.25"\n')   # full annotations projection
    watcher.poll()
    assert c.get()["prefill_sms"] == 32 and c.get()["source"] == "partition-file"
    path.write_text("prefill=61")            # impossible: logged and ignored, never crashes the watcher
    watcher.poll()
    assert c.get()["prefill_sms"] == 32


def test_an_idle_worker_does_not_hold_a_switch_open():
    c = PartitionController(CpuBackend())
    c.set("prefill=16", "cli")
    c.begin_step("decode")
    assert c.switches == 0
    c.idle("prefill")                        # prefill has no work: it will use the new split when it has some
    assert c.switches == 1 and c.get()["applied"]["prefill"] == 16
    c.idle("prefill")
    assert c.switches == 1                   # idling without a pending switch changes nothing
