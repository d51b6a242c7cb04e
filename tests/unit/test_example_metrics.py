"""examples/: the Grafana dashboard asks only for series the engine exports, grouped only by labels they carry,
and every YAML example parses (the cluster tier applies them to a real API server)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from semipd.runtime.metrics import EngineMetrics

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels Prometheus adds when it scrapes a pod (PodMonitor), plus histogram buckets' `le`.
SCRAPE_LABELS = {"namespace", "pod", "container", "instance", "job", "le"}


def exported() -> dict[str, set[str]]:
    """Every series name a semipd engine exposes on /metrics, with the labels it carries."""
    series = {}
    for family in EngineMetrics("m").registry.collect():
        labels = set(family.samples[0].labels) if family.samples else set()
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels
    # Families whose every series has a per-phase label expose no sample before the first observation.
    m = EngineMetrics("m")
    for metric in (m.sm_count, m.queue_length, m.step_seconds, m.step_tokens, m.emulated_wait):
        metric.labels(phase="prefill", model_name="m", engine="0")
    for family in m.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    m.success.labels(finished_reason="stop", model_name="m", engine="0").inc()
    for family in m.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def operator_exported() -> dict[str, set[str]]:
    """The operator's own series (semipd.operator.health), with their labels."""
    from semipd.operator import health
    series = {}
    for metric in (health.RECONCILES, health.ERRORS, health.PASSES_IN_FLIGHT, health.PASSES_WAITING,
                   health.PASSES_QUEUED, health.DECISION_SECONDS, health.PUSHES, health.PEERING_ACTIVE, health.READY):
        for family in metric.collect():
            for suffix in SUFFIXES[family.type]:
                series[family.name + suffix] = set(metric._labelnames) | ({"le"} if family.type == "histogram" else set())
    return series


def dashboard_exprs() -> list[str]:
    d = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_uses_only_exported_metrics_and_labels():
    series = {**exported(), **operator_exported()}
    assert "vllm:time_to_first_token_seconds_bucket" in series and "semipd:sm_count" in series
    assert "semipd_operator_decision_seconds_bucket" in series and "semipd_operator_reconciles_total" in series
    used = set()
    for expr in dashboard_exprs():
        names = re.findall(r"\b((?:vllm|semipd):[A-Za-z0-9_:]+|semipd_operator_[A-Za-z0-9_]+)", expr)
        assert names, expr
        for name in names:
            assert name in series, f"{name} is not exported (runtime/metrics.py): {expr}"
            used.add(name)
        known = set().union(*(series[n] for n in names)) | SCRAPE_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in known, f"label {label!r} is on none of {names}: {expr}"
        for label in re.findall(r"([A-Za-z_]+)=~?\"", expr):
            assert label in known, f"label {label!r} is on none of {names}: {expr}"
    # The SLO loop's inputs are all on it.
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
                 "semipd:request_arrivals_total", "vllm:num_requests_waiting", "semipd:sm_count",
                 "vllm:kv_cache_usage_perc"):
        assert name in used, name
    # And the operator's: reconciles, errors, decision latency, pushes, queue depth.
    for name in ("semipd_operator_reconciles_total", "semipd_operator_errors_total",
                 "semipd_operator_decision_seconds_bucket", "semipd_operator_split_pushes_total",
                 "semipd_operator_passes_queued"):
        assert name in used, name


def test_keda_query_names_an_exported_metric():
    obj = yaml.safe_load((EXAMPLES / "keda-scaledobject.yaml").read_text())
    query = obj["spec"]["triggers"][0]["metadata"]["query"]
    assert all(n in exported() for n in re.findall(r"\b((?:vllm|semipd):[A-Za-z0-9_:]+)", query))


def test_every_example_parses():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"minimal.yaml", "full.yaml", "argocd-application.yaml",
                                       "flux-helmrelease.yaml", "keda-scaledobject.yaml", "inferencepool.yaml"}
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        assert docs and all(d.get("apiVersion") and d.get("kind") for d in docs), f.name
