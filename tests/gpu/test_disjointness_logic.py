"""The disjointness check's logic, fed with SM-id sets we choose (no GPU): it must catch every way a partition
can leak and pass the clean cases, or a green run on the H100 would mean nothing."""
import json

import pytest

from sm_disjointness import Probe, check_split, main, parse_args, ran_together, synthetic_checks

pytestmark = pytest.mark.unit

TOTAL = 132


def test_clean_split_passes_with_matching_sizes():
    c = check_split("greenctx", 64, range(64), range(64, TOTAL), 64, 68, TOTAL, concurrent=True)
    assert c.ok, c.problems
    assert (c.prefill_seen, c.decode_seen, c.overlap) == (64, 68, [])


def test_overlap_is_detected_and_names_the_shared_sms():
    c = check_split("greenctx", 16, {0, 1, 2, 40}, {40, 41, 2}, 16, 116, TOTAL)
    assert not c.ok
    assert c.overlap == [2, 40]
    assert any("shared 2 SMs" in p for p in c.problems)


def test_a_single_shared_sm_is_enough_to_fail():
    c = check_split("greenctx", 8, range(8), list(range(8, TOTAL)) + [7], 8, 124, TOTAL)
    assert not c.ok and c.overlap == [7]


def test_a_side_larger_than_the_driver_reported_fails():
    c = check_split("greenctx", 8, range(10), range(10, TOTAL), 8, 124, TOTAL)
    assert not c.ok
    assert any("prefill ran on 10 SMs, more than the 8" in p for p in c.problems)


def test_an_under_filled_side_fails_by_default_and_is_only_noted_with_allow_under():
    default = check_split("greenctx", 16, range(12), range(16, TOTAL), 16, 116, TOTAL)
    assert not default.ok
    assert default.problems == ["prefill reached 12 of its 16 SMs"]
    relaxed = check_split("greenctx", 16, range(12), range(16, TOTAL), 16, 116, TOTAL, allow_under=True)
    assert relaxed.ok
    assert relaxed.notes == ["prefill reached 12 of its 16 SMs"]


def test_the_allow_under_flag_is_off_unless_given():
    assert parse_args([]).allow_under is False
    assert parse_args(["--allow-under"]).allow_under is True


def test_an_under_filled_shared_control_is_only_noted():
    # the control's "reported" size is the whole device: it must show overlap, not fill every SM
    c = check_split("shared", None, range(TOTAL - 2), range(TOTAL), TOTAL, TOTAL, TOTAL, expect_disjoint=False)
    assert c.ok, c.problems
    assert c.notes == [f"prefill reached {TOTAL - 2} of its {TOTAL} SMs"]


def test_a_side_that_recorded_nothing_fails():
    c = check_split("greenctx", 8, range(8), [], 8, 124, TOTAL)
    assert not c.ok
    assert any("decode: the probe recorded no SM" in p for p in c.problems)


def test_sm_ids_outside_the_device_fail():
    c = check_split("greenctx", 8, [0, 1, 2, 3, 4, 5, 6, 200], range(8, TOTAL), 8, 124, TOTAL)
    assert not c.ok
    assert any("[200]" in p for p in c.problems)


def test_reported_sizes_that_exceed_the_device_fail():
    c = check_split("greenctx", 64, range(64), range(64, TOTAL), 64, 72, TOTAL)
    assert not c.ok
    assert any("more than the device's 132" in p for p in c.problems)


def test_a_stream_bound_to_a_different_size_than_the_backend_reported_fails():
    c = check_split("greenctx", 64, range(64), range(64, TOTAL), 64, 68, TOTAL, stream_reported=(64, 132))
    assert not c.ok
    assert c.problems == ["decode: its stream is bound to 132 SMs, but the backend reported 68"]
    unknown = check_split("greenctx", 64, range(64), range(64, TOTAL), 64, 68, TOTAL, stream_reported=(None, None))
    assert unknown.ok


def test_shared_control_must_overlap():
    seen = check_split("shared", None, range(TOTAL), range(TOTAL), TOTAL, TOTAL, TOTAL, expect_disjoint=False)
    assert seen.ok
    blind = check_split("shared", None, range(66), range(66, TOTAL), TOTAL, TOTAL, TOTAL, expect_disjoint=False)
    assert not blind.ok
    assert any("cannot detect overlap" in p for p in blind.problems)


def test_not_running_together_is_a_note_not_a_failure():
    c = check_split("greenctx", 64, range(64), range(64, TOTAL), 64, 68, TOTAL, concurrent=False)
    assert c.ok
    assert c.notes == ["the two probe kernels did not run at the same time"]


def test_ran_together_compares_the_busy_windows():
    a = Probe({0}, start_ns=100, end_ns=200, blocks=1)
    assert ran_together(a, Probe({1}, 150, 300, 1))
    assert ran_together(a, Probe({1}, 0, 500, 1))
    assert not ran_together(a, Probe({1}, 200, 300, 1))      # one ends as the other starts: serial
    assert not ran_together(a, Probe({1}, 10, 90, 1))


def test_synthetic_cases_are_judged_as_they_must_be():
    checks, wrong = synthetic_checks(TOTAL, [8, 64, 120])
    assert wrong == []
    verdicts = {(c.backend, c.requested): c.ok for c in checks}
    assert verdicts[("synthetic-overlap", 16)] is False
    assert verdicts[("synthetic-under", 16)] is False
    assert verdicts[("synthetic-under-allowed", 16)] is True
    assert all(ok for (name, _), ok in verdicts.items() if name not in ("synthetic-overlap", "synthetic-under"))


def test_dry_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["--dry-run", "--splits", "8,64,120", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synthetic-overlap" in text and "FAIL" in text
    data = json.loads(out.read_text())
    assert data["logic_errors"] == []
    failing = [c for c in data["checks"] if not c["ok"]]
    assert [c["backend"] for c in failing] == ["synthetic-overlap", "synthetic-under"]
    assert failing[0]["overlap"] == list(range(8, 16))
    assert failing[1]["problems"] == ["prefill reached 12 of its 16 SMs"]


def test_dry_run_refuses_a_split_that_leaves_decode_nothing(capsys):
    assert main(["--dry-run", "--splits", "132"]) == 2
    assert "must leave decode" in capsys.readouterr().err
