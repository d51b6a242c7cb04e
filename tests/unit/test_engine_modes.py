"""The start-up rules of the partition policies (never two controllers on one knob), the admin token that
follows its file, and the cpu backend's SM-share emulation formula."""
import dataclasses
import logging
import os

import pytest

from semipd.runtime.admin_token import AdminToken
from semipd.runtime.config import EngineConfig, SloSettings, check_partition_policy
from semipd.runtime.partition import CpuBackend, PartitionController, emulated_wait

pytestmark = pytest.mark.unit


def config(**kw) -> EngineConfig:
    slo = kw.pop("slo", {})
    return EngineConfig(model="m", slo=SloSettings(**slo), **kw)


@pytest.mark.parametrize("kw", [
    {}, {"partition_policy": "external", "partition_file": "/f"}, {"partition_policy": "static"},
    {"partition_policy": "slo", "slo": {"ttft_ms": 100}}, {"partition_policy": "slo", "slo": {"tpot_ms": 20}},
])
def test_accepted_combinations(kw):
    check_partition_policy(config(**kw))


def test_external_is_the_default():
    assert EngineConfig(model="m").partition_policy == "external"


@pytest.mark.parametrize("kw, words", [
    ({"partition_policy": "static", "partition_file": "/f"}, "--partition-file"),
    ({"partition_policy": "slo", "partition_file": "/f", "slo": {"ttft_ms": 1}}, "owns the split"),
    ({"partition_policy": "slo"}, "needs a target"),
    ({"slo": {"ttft_ms": 100}}, "need --partition-policy slo"),
    ({"partition_policy": "sometimes"}, "choose one of"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": -1}}, "--slo-ttft-ms"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": float("nan")}}, "--slo-ttft-ms"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": 1, "percentile": 100}}, "--slo-percentile"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": 1, "partition_min": 0.6, "partition_max": 0.4}},
     "--partition-min"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": 1, "partition_max": 1.0}}, "--partition-max"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": 1, "interval": 0}}, "--policy-interval"),
    ({"partition_policy": "slo", "slo": {"ttft_ms": 1, "partition_cooldown": -1}}, "--partition-cooldown"),
])
def test_refused_combinations_say_why_in_one_line(kw, words):
    with pytest.raises(ValueError) as err:
        check_partition_policy(config(**kw))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_emulated_wait_stretches_a_step_to_its_share():
    assert emulated_wait(1.0, 1.0) == 0.0
    assert emulated_wait(0.2, 0.25) == pytest.approx(0.6)        # 4x as long in all
    assert emulated_wait(0.3, 0.75) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        emulated_wait(1.0, 0.0)


def test_moving_sms_to_prefill_shortens_prefill_and_lengthens_decode():
    c = PartitionController(CpuBackend())
    small, large = c.resolve(0.25), c.resolve(0.75)
    ratio = emulated_wait(1, c.share("prefill", small)) + 1, emulated_wait(1, c.share("prefill", large)) + 1
    assert ratio[0] / ratio[1] == pytest.approx(3.0, rel=0.05)   # 132/32 vs 132/96
    assert c.share("decode", large) < c.share("decode", small)


def test_changed_at_marks_switches_not_the_start_up_split():
    c = PartitionController(CpuBackend(), initial="prefill=32")
    assert c.changed_at is None
    c.set("prefill=32", source="x")
    assert c.changed_at is None                                    # the same split: no switch
    c.set("prefill=40", source="x")
    assert c.changed_at is not None


def write(path, text):
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # a new mtime even within one clock tick


def test_admin_token_follows_its_file(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("tok-A1\n")
    token = AdminToken("tok-A1", str(path))
    assert token.current() == "tok-A1"
    write(path, "tok-B22\n")
    assert token.current() == "tok-B22"
    caplog.set_level(logging.INFO)
    for broken in ("", "   \n"):
        write(path, broken)
        assert token.current() == "tok-B22"                  # an empty rewrite keeps the previous one
    path.unlink()
    assert token.current() == "tok-B22"                      # so does a vanished file
    path.write_text("tok-C333")
    assert token.current() == "tok-C333"
    assert "keeping the previous token" in caplog.text
    assert not any(t in caplog.text for t in ("tok-A1", "tok-B22", "tok-C333"))


def test_admin_token_without_a_file_is_fixed():
    assert AdminToken("env-token").current() == "env-token"
    assert AdminToken(None).current() is None
