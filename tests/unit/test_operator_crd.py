"""The CRD file itself: names, subresources, printer columns, a description on every field, a structural schema,
CEL rules for each rule the issue names, defaults equal to the operator's, and every status key declared."""
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from semipd.operator import builders, conditions, crd, names, spec, status

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def walk(node: dict, path: str):
    """Yield (path, schema node) for every declared node below `node` (properties, items, map values)."""
    for key, child in (node.get("properties") or {}).items():
        yield f"{path}.{key}", child
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield f"{path}[]", node["items"]
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_names_and_subresources():
    c = crd.load()
    assert c["metadata"]["name"] == "semipdservices.semipd.io"
    assert c["spec"]["group"] == names.GROUP and c["spec"]["scope"] == "Namespaced"
    assert c["spec"]["names"]["kind"] == names.KIND and "spd" in c["spec"]["names"]["shortNames"]
    (version,) = c["spec"]["versions"]
    assert version["name"] == names.VERSION and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {col["name"]: col for col in version["additionalPrinterColumns"]}
    for name in ("Ready", "Replicas", "Split", "TTFT", "TPOT", "Age"):
        assert name in columns and columns[name].get("priority", 0) == 0, name
    # Each column reads a field the schema declares (a typo would print an empty column forever).
    declared = {p for p, _ in walk(crd.schema(c), "")}
    for col in columns.values():
        jp = col["jsonPath"]
        if jp.startswith(".metadata") or "[?(" in jp:
            continue
        assert jp in declared, jp


# Generated from the API server's OpenAPI (operator/podschema.py), which describes the first levels only.
GENERATED = (".spec.podTemplate.spec", ".spec.podTemplate.tolerations", ".spec.podTemplate.affinity",
             ".spec.podTemplate.volumes", ".spec.podTemplate.volumeMounts")


def test_every_field_has_a_description():
    missing = [p for p, node in walk(crd.schema(), "") if not node.get("description") and not p.endswith("{}")
               and not any(p.startswith(g + ".") or p.startswith(g + "[") for g in GENERATED)]
    assert missing == []
    pod_spec = crd.schema()["properties"]["spec"]["properties"]["podTemplate"]["properties"]["spec"]
    assert all(node.get("description") for node in pod_spec["properties"].values())


def test_schema_is_structural():
    """Every node says its type (or is int-or-string / free-form), as structural schemas require."""
    untyped = [p for p, node in walk(crd.schema(), "")
               if "type" not in node and not node.get("x-kubernetes-int-or-string")
               and not node.get("x-kubernetes-preserve-unknown-fields")]
    assert untyped == []


def _rules(node: dict) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules_cover_the_issue():
    props = crd.schema()["properties"]["spec"]
    sp = props["properties"]
    # one owner of the count: under autoscaling spec.replicas (so the scale subresource) is frozen
    assert any("has(oldSelf.autoscaling)" in r and "self.replicas == oldSelf.replicas" in r for r in _rules(props))
    assert sp["replicas"]["default"] == 1     # so GET .../scale always finds spec.replicas
    assert any("oldSelf.servedModelName" in r for r in _rules(props))
    assert any("minReplicas <= self.maxReplicas" in r for r in _rules(sp["autoscaling"]))
    assert any("self.min <= self.max" in r for r in _rules(sp["partition"]))
    assert any("self.initial >= self.min" in r for r in _rules(sp["partition"]))
    assert any("has(self.pvc)" in r and "has(self.uri)" in r for r in _rules(sp["model"]))
    for bound in ("initial", "min", "max"):
        field = sp["partition"]["properties"][bound]
        assert (field["minimum"], field["maximum"]) == (0, 1) and field["exclusiveMinimum"], bound
    # Every rule carries a message a user can act on.
    for p, node in [("spec", props)] + list(walk(props, "spec")):
        for r in node.get("x-kubernetes-validations", []):
            assert len(r.get("message", "")) > 20, p


def test_crd_defaults_equal_the_operators():
    sp = crd.schema()["properties"]["spec"]["properties"]
    parsed = spec.parse("x", "ns", {"model": {"hostPath": "/m"}, "engine": {"image": "img"}})
    assert sp["engine"]["properties"]["port"]["default"] == parsed.engine.port
    res = sp["resources"]["properties"]
    assert res["gpus"]["default"] == parsed.resources.gpus
    assert res["gpuResourceName"]["default"] == parsed.resources.gpu_resource_name
    part = sp["partition"]["properties"]
    assert (part["initial"]["default"], part["min"]["default"], part["max"]["default"], part["step"]["default"],
            part["cooldownSeconds"]["default"]) == (parsed.partition.initial, parsed.partition.min,
                                                    parsed.partition.max, parsed.partition.step,
                                                    parsed.partition.cooldown_seconds)
    slo = sp["slo"]["properties"]
    assert (slo["percentile"]["default"], slo["attainment"]["default"], slo["windowSeconds"]["default"]) == (
        parsed.slo.percentile, parsed.slo.attainment, parsed.slo.window_seconds)
    assert sp["replicas"]["default"] == parsed.replicas
    prom = sp["prometheus"]["properties"]
    assert (prom["intervalSeconds"]["default"], prom["podLabel"]["default"], prom["namespaceLabel"]["default"]) == (
        parsed.prometheus.interval_seconds, parsed.prometheus.pod_label, parsed.prometheus.namespace_label)
    auto = sp["autoscaling"]["properties"]
    scaled = spec.parse("x", "ns", {"model": {"hostPath": "/m"}, "engine": {"image": "img"},
                                    "autoscaling": {"minReplicas": 1, "maxReplicas": 2}}).autoscaling
    assert (auto["scaleDownStabilizationSeconds"]["default"], auto["targetUtilization"]["default"]) == (
        scaled.scale_down_stabilization_seconds, scaled.target_utilization)
    assert sp["partition"]["properties"]["backend"]["enum"] == ["auto", "greenctx", "shared", "cpu"]
    assert sp["service"]["properties"]["type"]["default"] == parsed.service.type
    assert parsed.disruption_budget is None and "default" not in sp["disruptionBudget"]


def _paths(value, path=""):
    """Key paths of a status dict in the walk() notation."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}"
            yield from _paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item, f"{path}[]")


def test_every_status_key_the_operator_writes_is_declared():
    """The API server prunes undeclared status fields silently; declare each one the operator writes."""
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    dep = {"metadata": {"generation": 1}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}}
    obs = conditions.Observed(desired_replicas=2, deployment=dep)
    conds = conditions.merge(None, conditions.compute(obs), 3, status.stamp(now))
    history = status.record([], "Split", "prefill=0.5", "prefill=0.3", "TTFTAboveTarget", now, pod="p",
                            message="TTFT p90 812 ms (target 500)")
    pods = [{"name": "p", "desired": "prefill=0.3", "applied": "prefill=0.3", "appliedSMs": 40, "reason": "Spec",
             "lastError": "x", "lastAttemptTime": status.stamp(now), "ttftMs": 12.5, "tpotMs": 3.1}]
    written = status.assemble(service="s", deployment=dep, conditions=conds, split="prefill=0.3",
                              template_hash="abc", pods=pods, history=history)
    written["observedGeneration"] = 3
    written["slo"] = status.slo_figures(95, conditions.Metrics(ttft_ms=212.0, tpot_ms=9.5), measured_at=1.7e9)
    written["autoscaling"] = {"desiredReplicas": 3, "reason": "NoSplitMeetsSLO", "message": "m"}
    written["policyState"] = "{}"
    declared = {p for p, _ in walk(crd.schema()["properties"]["status"], "")}
    assert sorted(set(_paths(written)) - declared) == []


def test_packaged_and_chart_copies_are_the_source():
    source = (REPO / "crds" / "semipdservice.yaml").read_text()
    assert crd.CRD_FILE.read_text() == source
    assert (REPO / "charts" / "semipd" / "crds" / "semipdservice.yaml").read_text() == source
    assert yaml.safe_load(source) == crd.load()
