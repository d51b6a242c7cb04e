import logging
from types import SimpleNamespace

import pytest

from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.partition import (HISTORY_STEPS, CpuBackend, GreenContextBackend, PartitionController,
                                      PartitionError, PartitionFileWatcher, Split, make_backend, parse_split_value)

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
    ("prefill=64.0", ("sms", 64)), (1.5, ("fraction", 1.5)),     # well-formed; resolve judges the range
])
def test_parse_split_value(value, expected):
    assert parse_split_value(value) == expected


@pytest.mark.parametrize("value", ["decode=64", "prefill", "prefill=abc", {"decode": 3}, {"prefill": "x"},
                                   True, float("nan"), "prefill=inf", None, [64]])
def test_malformed_values_are_value_errors_not_impossible_splits(value):
    # the admin API answers 400 for these and 422 (with the allowed values) only for a PartitionError
    with pytest.raises(ValueError) as err:
        PartitionController(CpuBackend()).resolve(value)
    assert not isinstance(err.value, PartitionError)


@pytest.mark.parametrize("value", [1.5, {"prefill": 1.5}, "prefill=1.5", -0.25, 0, 0.0, 1.0, -8, 200, "prefill=60"])
def test_every_impossible_value_names_the_allowed_values(value):
    c = PartitionController(CpuBackend())
    with pytest.raises(PartitionError) as err:
        c.resolve(value)
    assert err.value.allowed == list(range(8, 121, 8))
    assert "allowed prefill SM counts: [8, 16," in str(err.value)


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
    for bad in ("prefill=61", "prefill=lots"):    # impossible or malformed: logged and ignored, never a crash
        path.write_text(bad)
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


def test_cpu_backend_records_each_step_with_the_split_in_force():
    c = PartitionController(CpuBackend())
    c.begin_step("prefill")
    c.begin_step("decode")
    c.set("prefill=16", "cli")
    c.begin_step("decode")
    c.idle("prefill")                        # an idle boundary is not a step
    c.begin_step("prefill")
    assert [(phase, s.prefill_sms) for phase, s in c.history] == [
        ("prefill", 64), ("decode", 64), ("decode", 16), ("prefill", 16)]


def test_the_step_record_keeps_only_the_latest_steps():
    c = PartitionController(CpuBackend())
    for _ in range(HISTORY_STEPS + 10):
        c.begin_step("decode")
    c.set("prefill=16", "cli")
    c.begin_step("prefill")
    assert len(c.history) == HISTORY_STEPS
    assert c.history[-1] == ("prefill", Split(16, 116))
    assert c.history[0] == ("decode", Split(64, 68))


def test_auto_on_a_cpu_device_chooses_the_cpu_stand_in_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="semipd.partition"):
        backend = make_backend("auto", "cpu")
    assert isinstance(backend, CpuBackend)
    assert [r.getMessage() for r in caplog.records if r.name == "semipd.partition"] == [
        "partition backend: cpu (no CUDA device; splits are recorded, not enforced)"]


def test_green_contexts_on_a_cpu_device_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--partition-backend greenctx needs a CUDA device"):
        make_backend("greenctx", "cpu")


def test_the_shared_baseline_runs_on_a_cpu_device_over_the_whole_machine():
    backend = make_backend("shared", "cpu")
    assert backend.name == "shared" and backend.total_sms == 132
    assert backend.streams(next(iter(backend.splits.values()))) == (None, None)
    assert "unified baseline" in backend.describe() and "CPU" in backend.describe()


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="unknown partition backend 'mps'"):
        make_backend("mps", "cpu")


# ---- GreenContextBackend against a stand-in for cuda.bindings.driver ---------------------------------------------

OK = "CUDA_SUCCESS"


def _sm(count: int, alignment: int = 0):
    return SimpleNamespace(type="sm", sm=SimpleNamespace(smCount=count, smCoscheduledAlignment=alignment,
                                                         minSmPartitionSize=alignment))


class FakeDriver:
    """The driver calls GreenContextBackend makes. A split rounds the request up to `step` SMs; a context can be
    made to reject a workqueue resource, or to hold `shrink` SMs fewer than the resource it was made from."""

    def __init__(self, total=132, step=8, alignment=0, version=13010, reject_workqueue=False, shrink=0):
        self.total, self.step, self.alignment, self.version = total, step, alignment, version
        self.reject_workqueue, self.shrink = reject_workqueue, shrink
        self.requests: list[int] = []
        self.contexts: list[SimpleNamespace] = []
        self.CUresult = SimpleNamespace(CUDA_SUCCESS=OK)
        self.CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM="sm",
                                                 CU_DEV_RESOURCE_TYPE_WORKQUEUE_CONFIG="wq")
        self.CUdevWorkqueueConfigScope = SimpleNamespace(CU_WORKQUEUE_SCOPE_GREEN_CTX_BALANCED="balanced")
        self.CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
        self.CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)

    def cuDeviceGet(self, ordinal):
        return OK, ordinal

    def cuDriverGetVersion(self):
        return OK, self.version

    def cuDeviceGetDevResource(self, dev, kind):
        if kind == "sm":
            return OK, _sm(self.total, self.alignment)
        return OK, SimpleNamespace(type="wq", wqConfig=SimpleNamespace(sharingScope="device"))

    def cuDevSmResourceSplitByCount(self, groups, res, flags, want):
        self.requests.append(want)
        given = -(-want // self.step) * self.step
        if given > res.sm.smCount:
            return OK, [], 0, res
        return OK, [_sm(given)], 1, _sm(res.sm.smCount - given)

    def cuDevResourceGenerateDesc(self, resources, count):
        return OK, tuple(resources)

    def cuGreenCtxCreate(self, desc, dev, flags):
        with_workqueue = any(r.type == "wq" for r in desc)
        if with_workqueue and self.reject_workqueue:
            return "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION", None
        sm = next(r for r in desc if r.type == "sm")
        ctx = SimpleNamespace(sms=sm.sm.smCount - self.shrink, workqueue=with_workqueue)
        self.contexts.append(ctx)
        return OK, ctx

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        return OK, ("stream", len(self.contexts))

    def cuGreenCtxGetDevResource(self, ctx, kind):
        return OK, _sm(ctx.sms)


class FakeGreenContextBackend(GreenContextBackend):
    def __init__(self, driver):          # no torch, no GPU: only the driver-facing part
        self._cu = driver
        self._build(0)

    def _wrap(self, raw):
        return raw


def test_green_contexts_are_requested_in_steps_of_at_least_8():
    fine = FakeDriver(alignment=2)             # what the newer split API reports on Hopper
    assert FakeGreenContextBackend(fine).granularity == 8
    assert fine.requests == list(range(8, 125, 8))
    coarse = FakeDriver(alignment=16, step=16)
    assert FakeGreenContextBackend(coarse).granularity == 16
    assert coarse.requests == list(range(16, 117, 16))


def test_splits_are_keyed_by_the_size_the_driver_gives_and_duplicates_make_no_contexts(caplog):
    driver = FakeDriver(step=16)               # 8 and 16 -> 16, 24 and 32 -> 32, ..., 120 -> 128
    with caplog.at_level(logging.INFO, logger="semipd.partition"):
        backend = FakeGreenContextBackend(driver)
    assert sorted(backend.splits) == list(range(16, 129, 16))
    assert all(s.prefill_sms == p and s.decode_sms == 132 - p for p, s in backend.splits.items())
    assert len(driver.contexts) == 2 * len(backend.splits)
    assert len({backend.streams(s) for s in backend.splits.values()}) == len(backend.splits)
    assert "prefill=32 gives the 32-SM group an earlier request gave; no new contexts" in caplog.text
    assert "keeping both" not in caplog.text
    c = PartitionController(backend)
    assert c.get()["allowed_prefill_sms"] == list(range(16, 129, 16))
    assert c.history is None                   # a real backend keeps no per-step record
    with pytest.raises(PartitionError) as err:
        c.set("prefill=8", "admin-api")        # asked for at start-up, but the driver never gives 8
    assert err.value.allowed == list(range(16, 129, 16))


def test_a_rejected_workqueue_resource_falls_back_to_plain_green_contexts(caplog):
    driver = FakeDriver(reject_workqueue=True)
    with caplog.at_level(logging.INFO, logger="semipd.partition"):
        backend = FakeGreenContextBackend(driver)
    assert sorted(backend.splits) == list(range(8, 121, 8))
    assert driver.contexts and not any(ctx.workqueue for ctx in driver.contexts)
    assert caplog.text.count("continuing without workqueues") == 1


@pytest.mark.parametrize("version, with_workqueue", [(13010, True), (13000, False)])
def test_balanced_workqueues_only_from_driver_13_1(version, with_workqueue):
    driver = FakeDriver(version=version)
    FakeGreenContextBackend(driver)
    assert {ctx.workqueue for ctx in driver.contexts} == {with_workqueue}


def test_a_context_that_holds_another_sm_count_than_its_split_fails():
    with pytest.raises(RuntimeError, match="split off 8 SMs, but the green context made from them has 7"):
        FakeGreenContextBackend(FakeDriver(shrink=1))
