"""spec.podTemplate: a pod template merged into the operator's pod (which fields are whose), the older flat form
still rendering exactly as before, and the schema generator's rules for turning the apiserver's OpenAPI into a
structural CRD schema."""
import copy

import pytest

from semipd.operator import builders, names, podschema, spec

pytestmark = pytest.mark.unit

BASE = {"model": {"hostPath": "/m"}, "engine": {"image": "img:1", "env": [{"name": "A", "value": "1"}]},
        "resources": {"gpus": 1, "memory": "64Gi"}}


def render(pod_template: dict, **extra) -> dict:
    body = {**copy.deepcopy(BASE), "podTemplate": pod_template, **extra}
    return builders.pod_template(spec.parse("svc", "ns", body))


def engine(tpl: dict) -> dict:
    return next(c for c in tpl["spec"]["containers"] if c["name"] == names.ENGINE_CONTAINER)


FULL = {
    "metadata": {"labels": {"team": "a", names.SERVICE_LABEL: "steal"},
                 "annotations": {"x": "y", names.SPLIT_ANNOTATION: "prefill=0.9"}},
    "spec": {
        "containers": [
            {"name": "engine", "env": [{"name": "HOME", "value": "/home/x"}, {"name": "B", "value": "2"}],
             "envFrom": [{"secretRef": {"name": "hf"}}],
             "resources": {"limits": {"memory": "1Gi", "ephemeral-storage": "20Gi"}},
             "securityContext": {"runAsUser": 2000},
             "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": "/cache"}]},
            {"name": "proxy", "image": "envoy:1"},
        ],
        "initContainers": [{"name": "warm", "image": "busybox:1"}],
        "imagePullSecrets": [{"name": "registry"}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
        "schedulerName": "volcano",
        "securityContext": {"fsGroup": 3000},
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                    {"name": "cache", "emptyDir": {}}],
    },
}


def test_template_merges_into_the_operators_pod():
    tpl = render(FULL)
    meta, pod = tpl["metadata"], tpl["spec"]
    assert meta["labels"]["team"] == "a" and meta["labels"][names.SERVICE_LABEL] == "svc"   # the selector holds
    assert meta["annotations"]["x"] == "y" and names.SPLIT_ANNOTATION not in meta["annotations"]
    assert [c["name"] for c in pod["containers"]] == ["engine", "proxy"]
    assert pod["initContainers"] == FULL["spec"]["initContainers"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}] and pod["schedulerName"] == "volcano"
    assert pod["tolerations"] == FULL["spec"]["tolerations"]
    assert pod["topologySpreadConstraints"] == FULL["spec"]["topologySpreadConstraints"]
    # Pod securityContext: field by field, the template winning.
    assert pod["securityContext"]["fsGroup"] == 3000 and pod["securityContext"]["runAsUser"] == 1000
    c = engine(tpl)
    assert c["image"] == "img:1" and c["args"] == builders.engine_args(spec.parse("svc", "ns", BASE))
    assert {e["name"]: e["value"] for e in c["env"]} == {"A": "1", "HOME": "/home/x", "B": "2"}
    assert c["envFrom"] == [{"secretRef": {"name": "hf"}}]
    # spec.resources wins where both say something; the template adds what it alone names.
    assert c["resources"]["limits"] == {"memory": "64Gi", "ephemeral-storage": "20Gi", "nvidia.com/gpu": "1"}
    assert c["securityContext"]["runAsUser"] == 2000 and c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm" and mounts["/cache"] == "cache" and mounts[names.PODINFO_DIR] == "podinfo"
    vols = {v["name"]: v for v in pod["volumes"]}
    # The operator's own /dev/shm volume is no longer mounted anywhere, so it goes; /tmp stays.
    assert "dshm" not in vols and "tmp" in vols and vols["shm"]["emptyDir"]["sizeLimit"] == "16Gi"
    assert {"podinfo", "admin-token", "model"} <= set(vols)


def test_an_empty_template_changes_nothing():
    assert render({}) == render({"metadata": {}, "spec": {}}) == builders.operator_pod_template(
        spec.parse("svc", "ns", BASE))


def test_the_flat_form_renders_as_it_always_did():
    """Hashes computed with the operator before pod templates: upgrading must not restart anyone's pods."""
    plain = {"model": {"hostPath": "/m"}, "engine": {"image": "img:1"}}
    legacy = {"model": {"pvc": {"claimName": "models", "subPath": "x"}},
              "engine": {"image": "img:1", "env": [{"name": "A", "value": "1"}]},
              "resources": {"gpus": 1, "memory": "64Gi", "cpu": "8"},
              "podTemplate": {"labels": {"team": "a"}, "annotations": {"x": "y"}, "nodeSelector": {"n": "1"},
                              "tolerations": [{"key": "k", "operator": "Exists"}], "affinity": {"nodeAffinity": {}},
                              "volumes": [{"name": "cache", "emptyDir": {}}],
                              "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                              "serviceAccountName": "sa", "runtimeClassName": "nvidia",
                              "priorityClassName": "high"}}
    for body, expected in ((plain, "e4400fc6e5dcd452"), (legacy, "6c63117ed62abfd8")):
        assert builders.template_hash(builders.pod_template(spec.parse("svc", "ns", body))) == expected
    # And the flat form means the same pod as the template form.
    t = legacy["podTemplate"]
    modern = {"metadata": {"labels": t["labels"], "annotations": t["annotations"]},
              "spec": {**{k: t[k] for k in spec.LEGACY_SPEC_FIELDS},
                       "containers": [{"name": "engine", "volumeMounts": t["volumeMounts"]}]}}
    assert builders.pod_template(spec.parse("svc", "ns", {**legacy, "podTemplate": modern})) == \
        builders.pod_template(spec.parse("svc", "ns", legacy))


@pytest.mark.parametrize("engine_fields, named", [
    ({"image": "evil:1"}, "image through spec.engine.image"),
    ({"args": ["--x"]}, "args through spec.engine.args"),
    ({"command": ["sh"]}, "command"),
    ({"ports": [{"containerPort": 1}]}, "ports through spec.engine.port"),
    ({"readinessProbe": {}}, "readinessProbe"),
])
def test_what_the_operator_owns_is_refused_with_where_it_goes(engine_fields, named):
    with pytest.raises(spec.SpecError) as err:
        render({"spec": {"containers": [{"name": "engine", **engine_fields}]}})
    assert "which the operator owns" in str(err.value) and named in str(err.value)
    # A sidecar may set all of these.
    render({"spec": {"containers": [{"name": "side", "image": "x", **engine_fields}]}})


@pytest.mark.parametrize("template, message", [
    ({"spec": {"volumes": [{"name": "podinfo", "emptyDir": {}}]}}, "the operator owns the volumes"),
    ({"spec": {"containers": [{"name": "engine", "volumeMounts": [{"name": "x", "mountPath": "/models/"}]}]}},
     "the operator owns /etc/semipd/podinfo"),
    ({"labels": {"a": "b"}, "spec": {}}, "mixes the pod template form"),
    ({"spec": {"ephemeralContainers": [{"name": "dbg"}]}}, "ephemeral"),
])
def test_reserved_volumes_paths_and_mixed_forms_are_refused(template, message):
    with pytest.raises(spec.SpecError) as err:
        render(template)
    assert message in str(err.value)


def test_engine_image_pull_policy_wins_over_the_template():
    c = engine(render({"spec": {"containers": [{"name": "engine", "imagePullPolicy": "Always"}]}}))
    assert c["imagePullPolicy"] == "Always"
    body = {**BASE, "engine": {**BASE["engine"], "imagePullPolicy": "Never"}}
    tpl = builders.pod_template(spec.parse("svc", "ns", {**body, "podTemplate": {
        "spec": {"containers": [{"name": "engine", "imagePullPolicy": "Always"}]}}}))
    assert engine(tpl)["imagePullPolicy"] == "Never"


# ---- the schema generator, on a small OpenAPI document of the same shape as the apiserver's ----

def _ref(name):
    return {"$ref": podschema.REF_PREFIX + name}


OPENAPI = {"components": {"schemas": {
    podschema.CORE + "PodSpec": {
        "type": "object", "required": ["containers"], "description": "PodSpec is a description of a pod. More.",
        "properties": {
            "containers": {"type": "array", "items": _ref(podschema.CORE + "Container"),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
            "ephemeralContainers": {"type": "array", "items": _ref(podschema.CORE + "Container")},
            "overhead": {"type": "object", "additionalProperties": _ref(podschema.QUANTITY)},
            "dnsPolicy": {"type": "string", "enum": ["ClusterFirst", "Default"], "default": "ClusterFirst"},
        }},
    podschema.CORE + "Container": {
        "type": "object", "required": ["name"],
        "properties": {
            "name": {"type": "string", "default": ""},
            "ports": {"type": "array", "items": {"allOf": [_ref(podschema.CORE + "ContainerPort")], "default": {}},
                      "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["containerPort", "protocol"]},
        }},
    podschema.CORE + "ContainerPort": {
        "type": "object", "required": ["containerPort"],
        "properties": {"containerPort": {"type": "integer", "format": "int32"},
                       "protocol": {"type": "string"},
                       "target": _ref(podschema.INT_OR_STRING)}},
    podschema.QUANTITY: {"oneOf": [{"type": "string"}, {"type": "number"}]},
    podschema.INT_OR_STRING: {"format": "int-or-string", "oneOf": [{"type": "integer"}, {"type": "string"}]},
}}}


def test_generator_inlines_refs_and_makes_the_schema_structural():
    pod = podschema.pod_template_properties(OPENAPI)["spec"]
    assert "required" not in pod and "ephemeralContainers" not in pod["properties"]
    containers = pod["properties"]["containers"]
    assert containers["x-kubernetes-list-type"] == "map" and containers["items"]["required"] == ["name"]
    ports = containers["items"]["properties"]["ports"]
    # protocol may be absent, and a CRD's list-map keys may not: the list becomes atomic.
    assert "x-kubernetes-list-type" not in ports and "x-kubernetes-list-map-keys" not in ports
    port = ports["items"]
    assert port["properties"]["containerPort"] == {"type": "integer", "format": "int32"}
    assert port["properties"]["target"] == {"x-kubernetes-int-or-string": True}
    assert pod["properties"]["overhead"]["additionalProperties"] == {
        "anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
    dns = pod["properties"]["dnsPolicy"]
    assert "default" not in dns and dns["enum"] == ["ClusterFirst", "Default"]
    assert "default" not in containers["items"]["properties"]["name"]


def test_generator_refuses_cycles_and_untyped_nodes():
    cyclic = copy.deepcopy(OPENAPI)
    cyclic["components"]["schemas"][podschema.CORE + "ContainerPort"]["properties"]["loop"] = _ref(
        podschema.CORE + "Container")
    with pytest.raises(podschema.SchemaError, match="cycle"):
        podschema.pod_template_properties(cyclic)
    untyped = copy.deepcopy(OPENAPI)
    untyped["components"]["schemas"][podschema.CORE + "Container"]["properties"]["odd"] = {"oneOf": []}
    with pytest.raises(podschema.SchemaError, match="without a type"):
        podschema.pod_template_properties(untyped)


def test_generator_rewrites_only_its_block():
    text = ("a:\n  b: 1\n  # " + podschema.BEGIN[2:] + "\n  stale: {}\n  " + podschema.END + "\nc: 2\n")
    out = podschema.splice(text, lambda indent, _: " " * indent + "fresh: 1\n")
    assert out == "a:\n  b: 1\n  fresh: 1\nc: 2\n"
    with pytest.raises(podschema.SchemaError):
        podschema.splice("nothing here\n", lambda indent, _: "")
