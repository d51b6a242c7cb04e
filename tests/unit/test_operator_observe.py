"""From Prometheus's answers to the policy's observations (pure parts): the PromQL the loop sends, what counts
as missing, zero traffic, a stalled queue; the policy configuration a spec gives; the status it writes."""
import math

import pytest

from semipd.operator import control, observe, spec, status
from semipd.operator.conditions import Metrics, metrics_available

pytestmark = pytest.mark.unit


def make(**extra):
    body = {"model": {"hostPath": "/m"}, "engine": {"image": "i"}, "slo": {"ttftMs": 500, "tpotMs": 50}}
    body.update(extra)
    return spec.parse("svc", "ns", body)


def test_queries_select_by_the_configured_labels_and_escape_pod_names():
    s = make(prometheus={"url": "http://p:9090", "podLabel": "kubernetes_pod_name", "namespaceLabel": "kns"},
             slo={"ttftMs": 500, "percentile": 95, "windowSeconds": 30})
    q = observe.queries(s, ["svc-a.b", "svc-c"])
    assert q["ttft"] == ('histogram_quantile(0.95, sum by (kubernetes_pod_name, le) (rate('
                         'vllm:time_to_first_token_seconds_bucket{kns="ns",kubernetes_pod_name=~"svc\\\\-a\\\\.b|svc\\\\-c"}'
                         '[30s])))')
    assert 'phase="decode"' in q["handoff"] and "semipd:request_arrivals_total" in q["requests"]
    assert all("kubernetes_pod_name" in v for v in q.values())


def test_a_pod_without_series_is_missing_and_zero_traffic_is_a_measurement():
    assert observe.observation("p", {}, 60).sample_age_s is None
    # series there, but fewer than two scrapes in the window: a gap, not zero traffic
    assert observe.observation("p", {"age": 3.0, "waiting": 0.0}, 60).sample_age_s is None
    idle = observe.observation("p", {"age": 1.0, "requests": 0.0, "ttft": math.nan, "tpot": math.nan,
                                     "prefill_sms": 64, "decode_sms": 68}, 60)
    assert (idle.sample_age_s, idle.requests, idle.ttft_s, idle.tpot_s) == (1.0, 0.0, None, None)
    assert idle.split == pytest.approx(64 / 132) and idle.split_stable


def test_arrivals_waiting_with_no_first_token_in_the_window_means_ttft_of_at_least_the_window():
    stalled = observe.observation("p", {"age": 0.5, "requests": 12.0, "waiting": 9.0, "ttft": math.nan}, 60)
    assert stalled.ttft_s == 60.0


def test_a_split_that_changed_within_the_window_is_not_a_model_sample():
    o = observe.observation("p", {"age": 0.5, "requests": 3.0, "split_changes": 1.0, "prefill_sms": 72,
                                  "decode_sms": 60}, 60)
    assert not o.split_stable and o.split == pytest.approx(72 / 132)


def test_the_prefill_busy_share_comes_from_the_prefill_step_seconds_and_absent_is_unknown():
    s = make(slo={"ttftMs": 500, "windowSeconds": 30})
    q = observe.queries(s, ["svc-a"])["prefill_busy"]
    assert q.startswith("sum by (pod) (rate(semipd:step_seconds_sum{") and 'phase="prefill"' in q and "[30s]" in q
    base = {"age": 0.5, "requests": 3.0}
    assert observe.observation("p", base | {"prefill_busy": 0.25}, 30).prefill_busy == 0.25
    assert observe.observation("p", base | {"prefill_busy": 1.0000001}, 30).prefill_busy == 1.0
    assert observe.observation("p", base, 30).prefill_busy is None
    assert math.isnan(observe.observation("p", base | {"prefill_busy": math.nan}, 30).prefill_busy)


def test_nan_in_a_rate_reaches_the_policy_as_nan():
    o = observe.observation("p", {"age": 0.5, "requests": 3.0, "prompt_rate": math.nan}, 60)
    assert math.isnan(o.prompt_rate)


def test_policy_config_from_the_spec():
    s = make(partition={"initial": 0.4, "min": 0.2, "max": 0.8, "step": 0.1, "cooldownSeconds": 12},
             autoscaling={"minReplicas": 2, "maxReplicas": 5, "scaleDownStabilizationSeconds": 120},
             prometheus={"url": "http://p:9090", "intervalSeconds": 30})
    cfg = control.policy_config(s)
    assert (cfg.targets.ttft_s, cfg.targets.tpot_s, cfg.targets.percentile) == (0.5, 0.05, 90)
    assert (cfg.split.min, cfg.split.max, cfg.split.step, cfg.split.cooldown_s, cfg.initial) == (
        0.2, 0.8, 0.1, 12, 0.4)
    assert (cfg.replicas.min, cfg.replicas.max, cfg.replicas.scale_down_stabilization_s) == (2, 5, 120)
    assert cfg.max_sample_age_s == 90 and cfg.window_s == 60
    assert control.policy_config(make()).replicas is None
    assert not make().controlled and make(prometheus={"url": "http://p:9090"}).controlled


def test_status_split_summary_and_slo_text():
    assert status.split_summary([], "prefill=0.5") == "prefill=0.5"
    same = [{"desired": "prefill=0.5"}, {"desired": "prefill=0.5"}]
    assert status.split_summary(same, "x") == "prefill=0.5"
    mixed = [{"desired": "prefill=0.606061"}, {"desired": "prefill=0.424242"}, {"desired": "prefill=0.5"}]
    assert status.split_summary(mixed, "x") == "prefill=0.424242..0.606061"
    figures = status.slo_figures(95, Metrics(ttft_ms=212.4, tpot_ms=3.26), measured_at=0.0)
    assert (figures["ttft"], figures["tpot"], figures["percentile"]) == ("212ms@p95", "3.3ms@p95", 95)
    assert status.slo_figures(90, Metrics(), None)["ttft"] == "-"


def test_a_none_in_the_new_status_equals_an_absent_key():
    assert not status.changed({"slo": {"ttft": "-"}}, {"slo": {"ttft": "-", "ttftMs": None}})
    assert status.changed({"slo": {"ttft": "-", "ttftMs": 3.0}}, {"slo": {"ttft": "-", "ttftMs": None}})


def test_metrics_condition_says_why_decisions_hold():
    down = metrics_available(Metrics(configured=True, queried=True, error="Prometheus at http://p is unreachable"))
    assert (down.status, down.reason) == ("False", "QueryFailed") and "last decision holds" in down.message
    unscraped = metrics_available(Metrics(configured=True, queried=True, error="no series", error_reason="NoSeries"))
    assert unscraped.reason == "NoSeries"
