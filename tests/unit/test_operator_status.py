"""Status helpers: when a pod's split is pushed (and when not, so nothing thrashes), bounded history, spec
parsing errors that say what is wrong."""
from datetime import datetime, timedelta, timezone

import pytest

from semipd.operator import spec, status

pytestmark = pytest.mark.unit

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)


def test_push_due():
    assert not status.push_due(None, "prefill=0.5", ready=False, now=NOW, retry_after=15)
    assert status.push_due(None, "prefill=0.5", ready=True, now=NOW, retry_after=15)
    acked = {"name": "p", "desired": "prefill=0.5", "applied": "prefill=0.5"}
    assert not status.push_due(acked, "prefill=0.5", ready=True, now=NOW, retry_after=15)
    assert status.push_due(acked, "prefill=0.3", ready=True, now=NOW, retry_after=15)
    failed = {"name": "p", "desired": "prefill=0.5", "lastError": "refused",
              "lastAttemptTime": status.stamp(NOW - timedelta(seconds=5))}
    assert not status.push_due(failed, "prefill=0.5", ready=True, now=NOW, retry_after=15)
    assert status.push_due(failed, "prefill=0.5", ready=True, now=NOW + timedelta(seconds=11), retry_after=15)
    assert status.push_due(failed, "prefill=0.4", ready=True, now=NOW, retry_after=15)


def test_pod_ready_needs_condition_ip_and_no_deletion():
    pod = {"metadata": {}, "status": {"podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert status.pod_ready(pod)
    assert not status.pod_ready({"metadata": {}, "status": {"conditions": pod["status"]["conditions"]}})
    assert not status.pod_ready({**pod, "metadata": {"deletionTimestamp": "2025-01-01T00:00:00Z"}})
    assert not status.pod_ready({"metadata": {}, "status": {"podIP": "10.0.0.5", "conditions": [
        {"type": "Ready", "status": "False"}]}})


def test_history_records_changes_only_and_is_bounded():
    h = status.record([], "Split", None, "prefill=0.5", "Spec", NOW)
    assert h == []
    h = status.record(h, "Split", "prefill=0.5", "prefill=0.5", "Spec", NOW)
    assert h == []
    for i in range(15):
        h = status.record(h, "Scale", i, i + 1, "Spec", NOW)
    assert len(h) == status.HISTORY_LIMIT and h[-1] == {"time": "2025-05-01T12:00:00Z", "kind": "Scale",
                                                        "from": "14", "to": "15", "reason": "Spec"}


def test_changed():
    assert not status.changed({"split": "a", "replicas": 1}, {"split": "a"})
    assert status.changed({"split": "a"}, {"split": "b"})
    assert status.changed(None, {"split": "a"})


@pytest.mark.parametrize("body, message", [
    ({"engine": {"image": "i"}}, "exactly one of pvc, hostPath, imagePath, uri"),
    ({"model": {"hostPath": "/a", "uri": "hf://x"}, "engine": {"image": "i"}}, "exactly one"),
    ({"model": {"hostPath": "/a"}, "engine": {}}, "spec.engine.image is required"),
    ({"model": {"hostPath": "/a"}, "engine": {"image": "i"},
      "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must be less than or equal"),
    ({"model": {"hostPath": "/a"}, "engine": {"image": "i"}, "partition": {"initial": 0.95}}, "0 < min <= initial"),
])
def test_bad_specs_say_what_is_wrong(body, message):
    with pytest.raises(spec.SpecError, match=message):
        spec.parse("s", "ns", body)


def test_served_model_name_defaults_to_object_name():
    s = spec.parse("chat", "ns", {"model": {"imagePath": "/m"}, "engine": {"image": "i"}})
    assert s.served_model_name == "chat" and s.replicas == 1 and s.autoscaling is None
