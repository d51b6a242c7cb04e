"""Pure functions: a ServiceSpec in, the children's manifests (plain dicts) out. No I/O, no kopf.

What rolls pods is exactly what is in the pod template; replicas live on the Deployment and the split lives in
each pod's annotation, so neither can ever change the template or its hash."""
import base64
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
    volumes += [dict(v) for v in spec.pod_template.volumes]
    mounts += [dict(m) for m in spec.pod_template.volume_mounts]
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


def pod_template(spec: ServiceSpec) -> dict:
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
    tpl = spec.pod_template
    annotations = {k: v for k, v in tpl.annotations.items() if k != names.SPLIT_ANNOTATION}
    annotations["kubectl.kubernetes.io/default-container"] = names.ENGINE_CONTAINER
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
    if tpl.node_selector:
        pod_spec["nodeSelector"] = dict(tpl.node_selector)
    if tpl.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tpl.tolerations]
    if tpl.affinity:
        pod_spec["affinity"] = tpl.affinity
    if tpl.service_account_name:
        pod_spec["serviceAccountName"] = tpl.service_account_name
    if tpl.runtime_class_name:
        pod_spec["runtimeClassName"] = tpl.runtime_class_name
    if tpl.priority_class_name:
        pod_spec["priorityClassName"] = tpl.priority_class_name
    return {
        "metadata": {"labels": {**tpl.labels, **names.child_labels(spec.name)}, "annotations": annotations},
        "spec": pod_spec,
    }


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
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector(spec.name),
            "ports": [{"name": "http", "port": spec.engine.port, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }


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
