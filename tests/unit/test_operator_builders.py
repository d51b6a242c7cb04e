"""Builders: spec -> Deployment/Service/Secret/PodMonitor. What rolls pods is exactly the pod template, so the
template (and its hash) must not move with replicas or the split, and must move with everything pods run."""
import base64
import copy

import pytest

from semipd.operator import builders, names, spec

pytestmark = pytest.mark.unit

BASE = {"model": {"pvc": {"claimName": "llama", "subPath": "llama-3-8b"}},
        "engine": {"image": "registry.example/semipd:1.0"}}


def make(**changes) -> spec.ServiceSpec:
    body = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = body
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec.parse("chat", "serving", body)


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_engine_args_follow_the_engine_contract():
    s = make(servedModelName="llama-3", engine__args=["--max-num-seqs", "32"])
    assert builders.engine_args(s) == [
        "serve", "--model", "/models/llama-3-8b", "--served-model-name", "llama-3", "--host", "0.0.0.0",
        "--port", "8000", "--partition-policy", "external", "--sm-split", "prefill=0.5",
        "--partition-file", "/etc/semipd/podinfo/sm-partition", "--admin-token-file", "/etc/semipd/admin/token",
        "--max-num-seqs", "32"]
    assert builders.engine_args(make(partition__backend="greenctx"))[-2:] == ["--partition-backend", "greenctx"]
    assert "--served-model-name" in builders.engine_args(make()) and "chat" in builders.engine_args(make())


def test_engine_args_parse_with_the_real_engine_cli():
    """The flags are the engine's own: its argparse parser accepts every one of them."""
    import argparse

    from semipd.runtime import cli
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(builders.engine_args(make(partition__backend="cpu")))
    assert (args.partition_policy, args.sm_split, args.partition_backend, args.port) == ("external", "prefill=0.5",
                                                                                     "cpu", 8000)
    assert args.partition_file == names.PARTITION_FILE and args.admin_token_file == names.ADMIN_TOKEN_FILE


@pytest.mark.parametrize("model, path, volume", [
    ({"pvc": {"claimName": "c"}}, "/models", {"persistentVolumeClaim": {"claimName": "c", "readOnly": True}}),
    ({"hostPath": "/data/llama"}, "/models", {"hostPath": {"path": "/data/llama", "type": "Directory"}}),
    ({"imagePath": "/opt/model"}, "/opt/model", None),
    ({"uri": "hf://org/model"}, "hf://org/model", {"emptyDir": {}}),
])
def test_model_sources(model, path, volume):
    s = spec.parse("chat", "ns", {"model": model, "engine": {"image": "i"}})
    dep = builders.deployment(s, 1)
    args = container(dep)["args"]
    assert args[args.index("--model") + 1] == path
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
    if volume is None:
        assert "model" not in vols and "model" not in mounts
    else:
        assert {k: v for k, v in vols["model"].items() if k != "name"} == volume
        assert mounts["model"]["mountPath"] == "/models"
        assert mounts["model"]["readOnly"] is ("uri" not in model)


def test_pod_has_downward_api_token_probes_and_is_non_root():
    dep = builders.deployment(make(), 1)
    pod = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    items = {i["path"]: i["fieldRef"]["fieldPath"] for i in vols["podinfo"]["downwardAPI"]["items"]}
    assert items == {"sm-partition": "metadata.annotations['semipd.io/sm-partition']",
                     "annotations": "metadata.annotations"}
    assert vols["admin-token"]["secret"]["secretName"] == "chat-admin-token"
    assert vols["admin-token"]["secret"]["defaultMode"] == 0o440
    mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
    assert mounts["/etc/semipd/podinfo"]["readOnly"] and mounts["/etc/semipd/admin"]["readOnly"]
    c = container(dep)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_gpu_resources_and_mig_names():
    assert container(builders.deployment(make(), 1))["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    mig = make(resources={"gpus": 2, "gpuResourceName": "nvidia.com/mig-3g.40gb", "cpu": "8", "memory": "64Gi"})
    assert container(builders.deployment(mig, 1))["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"nvidia.com/mig-3g.40gb": "2", "memory": "64Gi"}}
    assert container(builders.deployment(make(resources={"gpus": 0}), 1))["resources"] == {}


def test_hash_ignores_replicas_and_split():
    a = builders.deployment(make(), 1)
    b = builders.deployment(make(partition={"initial": 0.3, "min": 0.2, "max": 0.8, "step": 0.1,
                                            "cooldownSeconds": 5}, slo={"ttftMs": 200}), 7)
    assert a["spec"]["template"] == b["spec"]["template"]
    assert (a["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]
            == b["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION])
    assert (a["spec"]["replicas"], b["spec"]["replicas"]) == (1, 7)
    assert "0.3" not in str(b["spec"]["template"])


@pytest.mark.parametrize("change", [
    {"engine__image": "registry.example/semipd:1.1"},
    {"model": {"pvc": {"claimName": "llama", "subPath": "llama-3-70b"}}},
    {"resources": {"gpus": 2}},
    {"resources": {"gpuResourceName": "nvidia.com/mig-1g.10gb"}},
    {"engine__args": ["--max-num-seqs", "8"]},
    {"partition__backend": "shared"},
    {"podTemplate": {"nodeSelector": {"gpu": "h100"}}},
])
def test_hash_moves_with_what_pods_run(change):
    before = builders.deployment(make(), 1)["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]
    after = builders.deployment(make(**change), 1)["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]
    assert before != after


def test_user_labels_cannot_steal_the_selector_and_split_annotation_is_reserved():
    s = make(podTemplate={"labels": {names.SERVICE_LABEL: "other", "team": "a"},
                          "annotations": {names.SPLIT_ANNOTATION: "prefill=0.9", "owner": "me"}})
    dep = builders.deployment(s, 1)
    meta = dep["spec"]["template"]["metadata"]
    assert meta["labels"][names.SERVICE_LABEL] == "chat" and meta["labels"]["team"] == "a"
    assert dep["spec"]["selector"] == {"matchLabels": {names.SERVICE_LABEL: "chat"}}
    assert names.SPLIT_ANNOTATION not in meta["annotations"] and meta["annotations"]["owner"] == "me"


def test_rollout_strategy():
    assert builders.deployment(make(), 1)["spec"]["strategy"] == {"type": "RollingUpdate"}
    tight = builders.deployment(make(rollout={"maxSurge": 0, "maxUnavailable": 1}), 1)
    assert tight["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_service_secret_podmonitor():
    s = make(engine__port=9000)
    svc = builders.service(s)
    assert svc["spec"]["selector"] == {names.SERVICE_LABEL: "chat"}
    assert svc["spec"]["ports"][0]["port"] == 9000 and svc["spec"]["ports"][0]["targetPort"] == "http"
    sec = builders.admin_secret(s, "t0ken")
    assert sec["metadata"]["name"] == "chat-admin-token"
    assert base64.b64decode(sec["data"]["token"]) == b"t0ken"
    pm = builders.pod_monitor(s)
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    for obj in (svc, sec, pm, builders.deployment(s, 1)):
        assert obj["metadata"]["labels"][names.MANAGED_BY_LABEL] == names.MANAGED_BY
        assert obj["metadata"]["namespace"] == "serving"


def test_split_strings_and_replicas():
    assert builders.split_string(0.5) == "prefill=0.5"
    assert builders.split_string(1 / 3) == "prefill=0.333333"
    assert builders.split_string(64) == "prefill=64"
    assert builders.desired_replicas(make(), None) == 1
    assert builders.desired_replicas(make(replicas=3), 1) == 3
    assert builders.desired_replicas(make(replicas=3), 1, target=5) == 3      # spec.replicas owns it
    auto = make(autoscaling={"minReplicas": 2, "maxReplicas": 4})
    assert [builders.desired_replicas(auto, c) for c in (None, 1, 3, 9)] == [2, 2, 3, 4]
    # under autoscaling the policy's target wins, inside the bounds; a defaulted spec.replicas is ignored
    auto_with_default = make(replicas=1, autoscaling={"minReplicas": 2, "maxReplicas": 4})
    assert [builders.desired_replicas(auto_with_default, 2, t) for t in (3, 1, 7)] == [3, 2, 4]


def test_an_hf_model_is_fetched_by_the_engine_into_the_pods_model_volume():
    from semipd.operator.builders import engine_args
    from semipd.operator.spec import parse
    args = engine_args(parse("svc", "ns", {"model": {"uri": "hf://org/model@v1"}, "engine": {"image": "i"}}))
    assert args[args.index("--model") + 1] == "hf://org/model@v1"
    assert args[args.index("--download-dir") + 1] == "/models"


@pytest.mark.parametrize("uri", ["s3://bucket/model", "hf://no-org", "https://example.com/model"])
def test_a_model_uri_the_engine_cannot_fetch_is_an_invalid_spec(uri):
    from semipd.operator.spec import SpecError, parse
    with pytest.raises(SpecError, match="only hf://ORG/NAME"):
        parse("svc", "ns", {"model": {"uri": uri}, "engine": {"image": "i"}})
