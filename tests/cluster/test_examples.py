"""examples/ applied to the real control plane, so none of them rots: the SemiPDServices reconcile into what they
say, and the other projects' objects (minimal CRDs of our own, tests/cluster/crds/) are accepted with strict field
validation and point at what really exists: KEDA's target answers /scale, the InferencePool selects the engine
pods on the Service's port, Argo CD ignores exactly the scale subresource's field, Flux installs a chart path with
values its schema accepts."""
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from semipd.operator import crd, names
from semipd.operator.kube import ApiError, Kube
from semipd.operator.testing import OperatorProcess, poll

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
WAIT = 90


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def plural(obj: dict) -> str:
    return {"SemiPDService": names.PLURAL, "Application": "applications", "GitRepository": "gitrepositories",
            "HelmRelease": "helmreleases", "ScaledObject": "scaledobjects",
            "InferencePool": "inferencepools"}[obj["kind"]]


def apply_strict(kube: Kube, obj: dict, namespace: str) -> dict:
    """What `kubectl apply --server-side` does (strict field validation: an unknown field is an error)."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    from semipd.operator.kube import path
    return kube.request("PATCH", path(obj["apiVersion"], plural(obj), namespace, obj["metadata"]["name"]),
                        body=obj, content_type="application/apply-patch+yaml",
                        query={"fieldManager": "examples-test", "fieldValidation": "Strict"})


@pytest.fixture(scope="module")
def kube(control_plane) -> Kube:
    control_plane.require_controllers()
    k = Kube(control_plane.api_client())
    crd.install(k)
    for doc in yaml.safe_load_all((Path(__file__).parent / "crds" / "example-kinds.yaml").read_text()):
        k.apply(doc, "customresourcedefinitions")
    for doc in yaml.safe_load_all((Path(__file__).parent / "crds" / "example-kinds.yaml").read_text()):
        name = doc["metadata"]["name"]
        poll(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in (
            k.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name).get("status") or {}).get(
                "conditions") or []), WAIT, what=f"{name} established")
    return k


def test_examples_apply_and_fit_together(control_plane, kube, namespace, tmp_path):
    op = OperatorProcess(control_plane.kubeconfig, [namespace], tmp_path / "operator.log").start(timeout=WAIT)
    try:
        (minimal,) = load("minimal.yaml")
        (full,) = load("full.yaml")
        for obj in (minimal, full):
            apply_strict(kube, obj, namespace)

        def reconciled(name):
            def check():
                obj = kube.get(names.API_VERSION, names.PLURAL, namespace, name)
                conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
                return obj if (obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
                               and conds.get("Stalled", {}).get("status") == "False") else None
            return check
        for name in ("llama", "llama-prod"):
            poll(reconciled(name), WAIT, what=f"{name} reconciled", log=op.log)
        # full.yaml: everything it sets reached its children.
        pod = kube.get("apps/v1", "deployments", namespace, "llama-prod")["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["containers"]] == ["engine", "log-shipper"]
        assert [c["name"] for c in pod["initContainers"]] == ["check-model"]
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert kube.get("v1", "services", namespace, "llama-prod")["spec"]["type"] == "LoadBalancer"
        assert kube.get("policy/v1", "poddisruptionbudgets", namespace, "llama-prod")["spec"]["maxUnavailable"] == 1

        # KEDA: its target is the minimal service, and what KEDA's HPA reads, /scale, answers for it.
        (scaled,) = load("keda-scaledobject.yaml")
        apply_strict(kube, scaled, namespace)
        ref = scaled["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == (names.API_VERSION, names.KIND)
        target = kube.get(names.API_VERSION, names.PLURAL, namespace, ref["name"])
        assert "autoscaling" not in target["spec"], "KEDA needs a service whose count it may own (replicas)"
        scale = kube.get(names.API_VERSION, names.PLURAL, namespace, ref["name"] + "/scale")
        assert scale["status"]["selector"] == names.selector_string(ref["name"])
        assert f'model_name="{target["spec"].get("servedModelName", ref["name"])}"' in \
            scaled["spec"]["triggers"][0]["metadata"]["query"]

        # The InferencePool selects the engine pods of that service, on the port its Service serves.
        (pool,) = load("inferencepool.yaml")
        apply_strict(kube, pool, namespace)
        engine_pods = poll(lambda: kube.list("v1", "pods", namespace, ",".join(
            f"{k}={v}" for k, v in pool["spec"]["selector"]["matchLabels"].items())) or None, WAIT,
            what="engine pods the pool selects", log=op.log)
        assert all(p["metadata"]["labels"][names.SERVICE_LABEL] == "llama" for p in engine_pods)
        svc = kube.get("v1", "services", namespace, "llama")
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [svc["spec"]["ports"][0]["port"]]

        # Argo CD: the chart path exists; what it ignores is exactly what /scale writes.
        (app,) = load("argocd-application.yaml")
        apply_strict(kube, app, namespace)
        assert (REPO / app["spec"]["source"]["path"] / "Chart.yaml").exists()
        (ignored,) = app["spec"]["ignoreDifferences"]
        scale_path = crd.load()["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"]
        assert (ignored["group"], ignored["kind"]) == (names.GROUP, names.KIND)
        assert ignored["jsonPointers"] == [scale_path.replace(".", "/")]
        assert {"ServerSideApply=true", "RespectIgnoreDifferences=true"} <= set(app["spec"]["syncPolicy"]["syncOptions"])

        # Flux: the source and the release apply; the chart path exists and its values pass values.schema.json.
        source, release = load("flux-helmrelease.yaml")
        for obj in (source, release):
            apply_strict(kube, obj, namespace)
        assert release["spec"]["chart"]["spec"]["sourceRef"] == {"kind": source["kind"],
                                                                 "name": source["metadata"]["name"]}
        chart = REPO / release["spec"]["chart"]["spec"]["chart"]
        schema = json.loads((chart / "values.schema.json").read_text())
        values = yaml.safe_load((chart / "values.yaml").read_text())
        for key, value in release["spec"]["values"].items():
            values[key] = {**values.get(key, {}), **value}
        jsonschema.Draft7Validator(schema).validate(values)

        # And a drifted example would be caught: the same object with a misspelt field is refused.
        drifted = copy.deepcopy(pool)
        drifted["spec"]["targetPort"] = 8000
        with pytest.raises(ApiError) as err:
            apply_strict(kube, drifted, namespace)
        # (server-side apply answers an undeclared field with a 500 "field not declared in schema")
        assert "spec.targetPort" in err.value.message and "not declared in schema" in err.value.message
    finally:
        op.stop()
        for item in kube.list(names.API_VERSION, names.PLURAL, namespace):
            kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                             {"metadata": {"finalizers": None}})
