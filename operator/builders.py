"""Pure functions: a ServiceSpec in, the children's manifests (plain dicts) out. No I/O, no kopf.

What rolls pods is exactly what is in the pod template; replicas live on the Deployment and the split lives in
each pod's annotation, so neither can ever change the template or its hash."""
import base64
import copy
import hashlib
import json

from semipd.operator import names
from semipd.operator.spec import ServiceSpec

PODMONITOR_API_VERSION = "monitoring.coreos.com/v1"


def split_string(prefill: float | int) -> str:
    """The annotation/`--sm-split` form the engine parses: prefill=64 (SMs) or prefill=0.5 (fraction)."""
    if isinstance(prefill, int) and not isinstance(prefill, bool):
        return f"prefill={prefill}"
    return f"prefill={round(float(prefill), 6):g}"


def desired_replicas(spec: ServiceSpec, current: int | None, target: int | None = None) -> int:
    """Without autoscaling, spec.replicas (whoever wrote it: Git, kubectl scale, HPA, KEDA). With it, the policy's
    target, else the current count, kept inside the bounds: the operator moves the count, the spec only bounds it."""
    auto = spec.autoscaling
    if auto is None:
        return int(spec.replicas)
    start = target if target is not None else auto.min_replicas if current is None else current
    return max(auto.min_replicas, min(auto.max_replicas, start))


def model_path(spec: ServiceSpec) -> str:
    m = spec.model
    if m.pvc_claim:
        return f"{names.MODEL_DIR}/{m.pvc_sub_path}".rstrip("/") if m.pvc_sub_path else names.MODEL_DIR
    if m.host_path:
        return names.MODEL_DIR
    if m.image_path:
        return m.image_path
    return m.uri


def engine_args(spec: ServiceSpec) -> list[str]:
    """`semipd serve ...` exactly as the engine contract names its flags, then the user's extra arguments."""
    args = [
        "serve",
        "--model", model_path(spec),
        "--served-model-name", spec.served_model_name,
        "--host", "0.0.0.0",
        "--port", str(spec.engine.port),
        "--partition-policy", "external",
        "--sm-split", split_string(names.BOOT_SPLIT),
        "--partition-file", names.PARTITION_FILE,
        "--admin-token-file", names.ADMIN_TOKEN_FILE,
    ]
    if spec.model.uri:               # fetched at start-up into the pod's emptyDir, where a restart finds it again
        args += ["--download-dir", names.MODEL_DIR]
    if spec.partition.backend:
        args += ["--partition-backend", spec.partition.backend]
    return args + list(spec.engine.args)


def _model_volume(spec: ServiceSpec) -> dict | None:
    m = spec.model
    if m.pvc_claim:
        return {"name": "model", "persistentVolumeClaim": {"claimName": m.pvc_claim, "readOnly": True}}
    if m.host_path:
        return {"name": "model", "hostPath": {"path": m.host_path, "type": "Directory"}}
    if m.uri:
        return {"name": "model", "emptyDir": {}}
    return None  # imagePath: the model is inside the image


def _volumes(spec: ServiceSpec) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "podinfo", "downwardAPI": {"items": [
            {"path": "sm-partition",
             "fieldRef": {"fieldPath": f"metadata.annotations['{names.SPLIT_ANNOTATION}']"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]}},
        # 0440 and fsGroup: readable by the engine's group, not by the world.
        {"name": "admin-token", "secret": {"secretName": names.admin_secret_name(spec.name), "defaultMode": 0o440,
                                           "items": [{"key": names.ADMIN_TOKEN_KEY, "path": "token"}]}},
        # The root filesystem is read-only; caches (torch, Triton, the tiny model) go to /tmp.
        {"name": "tmp", "emptyDir": {}},
        # PyTorch uses shared memory; the container runtime's default /dev/shm (64 MiB) is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "podinfo", "mountPath": names.PODINFO_DIR, "readOnly": True},
        {"name": "admin-token", "mountPath": names.ADMIN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    model = _model_volume(spec)
    if model is not None:
        volumes.append(model)
        mounts.append({"name": "model", "mountPath": names.MODEL_DIR, "readOnly": not spec.model.uri})
    return volumes, mounts


def _resources(spec: ServiceSpec) -> dict:
    r = spec.resources
    requests, limits = {}, {}
    if r.gpus:
        limits[r.gpu_resource_name] = str(r.gpus)
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(spec: ServiceSpec) -> list[dict]:
    env = [dict(e) for e in spec.engine.env]
    if not any(e.get("name") == "HOME" for e in env):
        env.append({"name": "HOME", "value": "/tmp"})
    return env


# Loading a large model takes minutes: the startup probe allows STARTUP_PERIOD_S x STARTUP_FAILURES (30 min)
# before liveness applies.
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 180
# The Deployment must not call a rollout failed (ProgressDeadlineExceeded, Stalled) while a pod is still within
# its startup allowance: the whole allowance, plus time to pull a multi-GB image and pass readiness once.
PROGRESS_DEADLINE_S = STARTUP_PERIOD_S * STARTUP_FAILURES + 600


def _probe(period: int, failures: int, timeout: int) -> dict:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def operator_pod_template(spec: ServiceSpec) -> dict:
    """The pod the operator needs, before spec.podTemplate is merged in."""
    volumes, mounts = _volumes(spec)
    container = {
        "name": names.ENGINE_CONTAINER,
        "image": spec.engine.image,
        "command": ["semipd"],
        "args": engine_args(spec),
        "ports": [{"name": "http", "containerPort": spec.engine.port, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "startupProbe": _probe(period=STARTUP_PERIOD_S, failures=STARTUP_FAILURES, timeout=5),
        "readinessProbe": _probe(period=5, failures=3, timeout=5),
        "livenessProbe": _probe(period=10, failures=6, timeout=5),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.engine.image_pull_policy:
        container["imagePullPolicy"] = spec.engine.image_pull_policy
    pod_spec = {
        "containers": [container],
        "volumes": volumes,
        # The engine never talks to the API server.
        "automountServiceAccountToken": False,
        # The engine drains for up to 30 s after SIGTERM (its --graceful-timeout).
        "terminationGracePeriodSeconds": 45,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "metadata": {"labels": names.child_labels(spec.name),
                     "annotations": {"kubectl.kubernetes.io/default-container": names.ENGINE_CONTAINER}},
        "spec": pod_spec,
    }


# The operator's volumes a podTemplate may replace (by name, or by mounting something else at their path).
REPLACEABLE_VOLUMES = {"tmp": "/tmp", "dshm": "/dev/shm"}


def pod_template(spec: ServiceSpec) -> dict:
    """The operator's pod with spec.podTemplate merged in, strategic-merge style (docs/operator.md):
    * labels and annotations are added; the operator's labels (the selector) and its default-container annotation
      win, and semipd.io/sm-partition is never taken from the template (it is the split, set per pod);
    * containers merge by name: the one named `engine` merges into the operator's engine container, any other is
      added after it (sidecars); initContainers, imagePullSecrets, tolerations and the rest are the template's;
    * in the engine container, env merges by name and volumeMounts by mountPath (the template's entry replaces
      the operator's: HOME, /tmp, /dev/shm), envFrom is added, resources merge key by key with spec.resources
      winning, securityContext merges field by field with the template winning, and spec.engine.imagePullPolicy
      wins when set; image, command, args, ports and probes are the operator's (spec.parse refuses them);
    * volumes merge by name (podinfo, admin-token and model are the operator's: spec.parse refuses them); an
      operator volume (tmp, dshm) no container mounts any more is dropped;
    * the pod securityContext merges field by field, the template winning; any other PodSpec field is the
      template's where it sets one.
    With an empty template the result is the operator's pod, unchanged, so upgrading restarts nothing."""
    base = operator_pod_template(spec)
    user_meta, user_spec = spec.pod_template.metadata, spec.pod_template.spec
    meta = base["metadata"]
    user_annotations = {k: v for k, v in (user_meta.get("annotations") or {}).items() if k != names.SPLIT_ANNOTATION}
    meta["labels"] = {**(user_meta.get("labels") or {}), **meta["labels"]}
    meta["annotations"] = {**user_annotations, **meta["annotations"]}
    pod = base["spec"]
    for key, value in user_spec.items():
        if key == "containers":
            pod["containers"] = _merge_containers(pod["containers"], value, spec)
        elif key == "volumes":
            pod["volumes"] = _merge_by(pod["volumes"], value, "name")
        elif key == "securityContext":
            pod["securityContext"] = {**pod["securityContext"], **copy.deepcopy(value)}
        else:
            pod[key] = copy.deepcopy(value)
    mounted = {m.get("name") for c in pod["containers"] + pod.get("initContainers", []) for m in c.get("volumeMounts") or ()}
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in REPLACEABLE_VOLUMES or v["name"] in mounted]
    return base


def _merge_by(ours: list[dict], theirs: list[dict], key: str) -> list[dict]:
    """Our entries in order, each replaced by the template's entry with the same key; then the template's others."""
    theirs_by = {t.get(key): t for t in theirs}
    merged = [copy.deepcopy(theirs_by.pop(o.get(key))) if o.get(key) in theirs_by else o for o in ours]
    return merged + [copy.deepcopy(t) for t in theirs if t.get(key) in theirs_by]


def _merge_containers(ours: list[dict], theirs: list[dict], spec: ServiceSpec) -> list[dict]:
    (engine,) = ours
    out = [engine]
    for c in theirs:
        if c.get("name") != names.ENGINE_CONTAINER:
            out.append(copy.deepcopy(c))
            continue
        for key, value in c.items():
            if key == "env":
                engine["env"] = _merge_by(engine["env"], value, "name")
            elif key == "volumeMounts":
                engine["volumeMounts"] = _merge_by(engine["volumeMounts"], value, "mountPath")
            elif key == "envFrom":
                engine["envFrom"] = copy.deepcopy(value)
            elif key == "resources":
                engine["resources"] = _merge_resources(engine.get("resources") or {}, value)
            elif key == "securityContext":
                engine["securityContext"] = {**engine["securityContext"], **copy.deepcopy(value)}
            elif key == "imagePullPolicy":
                engine["imagePullPolicy"] = spec.engine.image_pull_policy or value
            elif key != "name":
                engine[key] = copy.deepcopy(value)
    return out


def _merge_resources(ours: dict, theirs: dict) -> dict:
    out = copy.deepcopy(theirs)
    for part in ("requests", "limits"):
        if ours.get(part):
            out[part] = {**(theirs.get(part) or {}), **ours[part]}
    return {k: v for k, v in out.items() if v}


def template_hash(template: dict) -> str:
    """Stable across processes and runs (sorted keys), so a restarted operator computes the same value."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _metadata(spec: ServiceSpec, name: str, annotations: dict | None = None) -> dict:
    meta = {"name": name, "namespace": spec.namespace, "labels": names.child_labels(spec.name)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def deployment(spec: ServiceSpec, replicas: int) -> dict:
    template = pod_template(spec)
    strategy: dict = {"type": "RollingUpdate"}
    rolling = {k: v for k, v in (("maxSurge", spec.max_surge), ("maxUnavailable", spec.max_unavailable))
               if v is not None}
    if rolling:
        strategy["rollingUpdate"] = rolling
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, spec.name, {names.TEMPLATE_HASH_ANNOTATION: template_hash(template)}),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": names.selector(spec.name)},
            "strategy": strategy,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def service(spec: ServiceSpec) -> dict:
    """spec.service adds type, annotations (a cloud's load-balancer settings), labels (the operator's win) and the
    load-balancer fields; what the operator stops declaring, server-side apply removes."""
    opts = spec.service
    meta = _metadata(spec, spec.name, dict(opts.annotations) or None)
    meta["labels"] = {**opts.labels, **meta["labels"]}
    body = {
        "type": opts.type,
        "selector": names.selector(spec.name),
        "ports": [{"name": "http", "port": spec.engine.port, "targetPort": "http", "protocol": "TCP",
                   "appProtocol": "http"}],
    }
    if opts.load_balancer_class:
        body["loadBalancerClass"] = opts.load_balancer_class
    if opts.load_balancer_source_ranges:
        body["loadBalancerSourceRanges"] = list(opts.load_balancer_source_ranges)
    if opts.external_traffic_policy:
        body["externalTrafficPolicy"] = opts.external_traffic_policy
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def pod_disruption_budget(spec: ServiceSpec) -> dict | None:
    """The PodDisruptionBudget spec.disruptionBudget asks for (None: there must be none). Same selector as the
    Deployment, so drains and cluster upgrades keep that many engine pods serving."""
    budget = spec.disruption_budget
    if budget is None:
        return None
    body: dict = {"selector": {"matchLabels": names.selector(spec.name)}}
    if budget.min_available is not None:
        body["minAvailable"] = budget.min_available
    else:
        body["maxUnavailable"] = budget.max_unavailable
    if budget.unhealthy_pod_eviction_policy:
        body["unhealthyPodEvictionPolicy"] = budget.unhealthy_pod_eviction_policy
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _metadata(spec, spec.name),
            "spec": body}


def admin_secret(spec: ServiceSpec, token: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(spec, names.admin_secret_name(spec.name)),
        "type": "Opaque",
        "data": {names.ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def pod_monitor(spec: ServiceSpec) -> dict:
    return {
        "apiVersion": PODMONITOR_API_VERSION,
        "kind": "PodMonitor",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": names.selector(spec.name)},
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }
