"""A SemiPDService spec as plain dataclasses. The API server has already validated and defaulted the object
(crds/semipdservice.yaml); the defaults here only matter for specs that never went through it, and a unit test
keeps them equal to the CRD's."""
import copy
import re
from dataclasses import dataclass, field
from typing import Any

from semipd.operator import names


class SpecError(ValueError):
    """A spec the CRD should have rejected (for example one applied before the CRD had its validation rules)."""


@dataclass(frozen=True)
class ModelSource:
    pvc_claim: str | None = None
    pvc_sub_path: str = ""
    host_path: str | None = None
    image_path: str | None = None
    uri: str | None = None


@dataclass(frozen=True)
class Engine:
    image: str
    image_pull_policy: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[dict, ...] = ()
    port: int = 8000


@dataclass(frozen=True)
class Resources:
    gpus: int = 1
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None


@dataclass(frozen=True)
class Partition:
    initial: float = 0.5
    min: float = 0.1
    max: float = 0.9
    step: float = 0.05
    cooldown_seconds: int = 30
    backend: str | None = None


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: float = 90
    attainment: float = 0.9
    window_seconds: int = 60            # the range the percentiles and rates are measured over

    @property
    def targets(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass(frozen=True)
class Prometheus:
    url: str | None = None
    interval_seconds: int = 15          # how often the control loop reads it and decides
    pod_label: str = "pod"              # the labels a PodMonitor (or the scrape config) gives each series
    namespace_label: str = "namespace"


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    scale_down_stabilization_seconds: int = 300
    target_utilization: float = 0.8


# What spec.podTemplate may not set, because the operator's pods depend on it (docs/operator.md). Rejected with
# InvalidSpec rather than silently replaced, so the author learns where the value must go instead.
OWNED_ENGINE_FIELDS = {
    "image": "spec.engine.image", "command": "the operator (semipd)", "args": "spec.engine.args",
    "ports": "spec.engine.port", "startupProbe": "the operator", "readinessProbe": "the operator",
    "livenessProbe": "the operator",
}
RESERVED_VOLUMES = ("podinfo", "admin-token", "model")     # the split file, the admin token, the model
LEGACY_SPEC_FIELDS = ("nodeSelector", "tolerations", "affinity", "volumes", "serviceAccountName",
                      "runtimeClassName", "priorityClassName")


@dataclass(frozen=True)
class PodTemplate:
    """spec.podTemplate as one pod template: `metadata` (labels, annotations) and a PodSpec, with the older flat
    fields already moved to where they belong (volumeMounts onto the engine container)."""
    metadata: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)

    @property
    def labels(self) -> dict:
        return dict(self.metadata.get("labels") or {})

    @property
    def annotations(self) -> dict:
        return dict(self.metadata.get("annotations") or {})


def pod_template_from(tpl: dict, engine_container: str, reserved_paths: tuple[str, ...]) -> PodTemplate:
    """Normalise spec.podTemplate (either form) and refuse what the operator owns."""
    tpl = copy.deepcopy(tpl or {})
    legacy = {k: tpl.pop(k) for k in ("labels", "annotations", "volumeMounts", *LEGACY_SPEC_FIELDS) if k in tpl}
    metadata, pod_spec = tpl.get("metadata") or {}, tpl.get("spec") or {}
    if legacy and ("metadata" in tpl or "spec" in tpl):     # as the CRD's rule: present, even if empty
        raise SpecError("spec.podTemplate mixes the pod template form (metadata, spec) with the older flat fields "
                        f"({', '.join(sorted(legacy))}); use one form")
    if legacy:
        metadata = {k: legacy[k] for k in ("labels", "annotations") if legacy.get(k)}
        pod_spec = {k: legacy[k] for k in LEGACY_SPEC_FIELDS if legacy.get(k)}
        if legacy.get("volumeMounts"):
            pod_spec["containers"] = [{"name": engine_container, "volumeMounts": legacy["volumeMounts"]}]
    for c in pod_spec.get("containers") or ():
        if c.get("name") != engine_container:
            continue
        owned = sorted(f for f in OWNED_ENGINE_FIELDS if f in c)
        if owned:
            raise SpecError(f"spec.podTemplate.spec.containers[name={engine_container}] sets {', '.join(owned)}, "
                            "which the operator owns; set " + "; ".join(
                                f"{f} through {OWNED_ENGINE_FIELDS[f]}" for f in owned))
        for m in c.get("volumeMounts") or ():
            if m.get("mountPath", "").rstrip("/") in reserved_paths:
                raise SpecError(f"spec.podTemplate mounts {m['mountPath']} into the {engine_container} container; "
                                f"the operator owns {', '.join(reserved_paths)}")
    for v in pod_spec.get("volumes") or ():
        if v.get("name") in RESERVED_VOLUMES:
            raise SpecError(f"spec.podTemplate.spec.volumes names {v['name']!r}; the operator owns the volumes "
                            f"{', '.join(RESERVED_VOLUMES)}: choose another name")
    if "ephemeralContainers" in pod_spec:
        raise SpecError("spec.podTemplate.spec.ephemeralContainers: a pod template cannot carry ephemeral containers")
    return PodTemplate(metadata=metadata, spec=pod_spec)


@dataclass(frozen=True)
class DisruptionBudget:
    min_available: int | str | None = None
    max_unavailable: int | str | None = None
    unhealthy_pod_eviction_policy: str | None = None


@dataclass(frozen=True)
class ServiceOptions:
    type: str = "ClusterIP"
    annotations: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    load_balancer_class: str | None = None
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_traffic_policy: str | None = None


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    model: ModelSource
    engine: Engine
    served_model_name: str
    replicas: int = 1                           # ignored while autoscaling is set (the operator owns the count)
    autoscaling: Autoscaling | None = None
    resources: Resources = Resources()
    partition: Partition = Partition()
    slo: SLO = SLO()
    prometheus: Prometheus = Prometheus()
    pod_template: PodTemplate = PodTemplate()
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None
    disruption_budget: DisruptionBudget | None = None   # None: no PodDisruptionBudget (an existing one is deleted)
    service: ServiceOptions = ServiceOptions()

    @property
    def controlled(self) -> bool:
        """The SLO control loop runs: there are metrics to read and targets to steer towards."""
        return bool(self.prometheus.url) and self.slo.targets


def parse(name: str, namespace: str, spec: dict[str, Any]) -> ServiceSpec:
    """Turn the `spec` of a SemiPDService into a ServiceSpec, or raise SpecError saying what is wrong."""
    spec = spec or {}
    model = spec.get("model") or {}
    pvc = model.get("pvc") or {}
    source = ModelSource(pvc_claim=pvc.get("claimName"), pvc_sub_path=pvc.get("subPath") or "",
                         host_path=model.get("hostPath"), image_path=model.get("imagePath"), uri=model.get("uri"))
    chosen = [k for k, v in (("pvc", source.pvc_claim), ("hostPath", source.host_path),
                             ("imagePath", source.image_path), ("uri", source.uri)) if v]
    if len(chosen) != 1:
        raise SpecError(f"spec.model must set exactly one of pvc, hostPath, imagePath, uri (got {chosen or 'none'})")
    if source.uri and not re.fullmatch(r"hf://[^/@]+/[^/@]+(@.+)?", source.uri):
        raise SpecError(f"spec.model.uri {source.uri!r}: only hf://ORG/NAME[@REVISION] is fetched; use a PVC, a "
                        f"hostPath or a model baked into the image for anything else")

    eng = spec.get("engine") or {}
    if not eng.get("image"):
        raise SpecError("spec.engine.image is required")
    engine = Engine(image=eng["image"], image_pull_policy=eng.get("imagePullPolicy"),
                    args=tuple(str(a) for a in eng.get("args") or ()), env=tuple(eng.get("env") or ()),
                    port=int(eng.get("port", 8000)))

    res = spec.get("resources") or {}
    resources = Resources(gpus=int(res.get("gpus", 1)),
                          gpu_resource_name=res.get("gpuResourceName") or "nvidia.com/gpu",
                          cpu=_quantity(res.get("cpu")), memory=_quantity(res.get("memory")))

    part = spec.get("partition") or {}
    partition = Partition(initial=float(part.get("initial", 0.5)), min=float(part.get("min", 0.1)),
                          max=float(part.get("max", 0.9)), step=float(part.get("step", 0.05)),
                          cooldown_seconds=int(part.get("cooldownSeconds", 30)), backend=part.get("backend"))
    if not (0 < partition.min <= partition.initial <= partition.max < 1):
        raise SpecError("spec.partition needs 0 < min <= initial <= max < 1")

    slo_spec = spec.get("slo") or {}
    slo = SLO(ttft_ms=slo_spec.get("ttftMs"), tpot_ms=slo_spec.get("tpotMs"),
              percentile=float(slo_spec.get("percentile", 90)), attainment=float(slo_spec.get("attainment", 0.9)),
              window_seconds=int(slo_spec.get("windowSeconds", 60)))

    prom = spec.get("prometheus") or {}
    prometheus = Prometheus(url=prom.get("url"), interval_seconds=int(prom.get("intervalSeconds", 15)),
                            pod_label=prom.get("podLabel") or "pod",
                            namespace_label=prom.get("namespaceLabel") or "namespace")

    auto = spec.get("autoscaling")
    autoscaling = None
    if auto is not None:
        autoscaling = Autoscaling(
            min_replicas=int(auto["minReplicas"]), max_replicas=int(auto["maxReplicas"]),
            scale_down_stabilization_seconds=int(auto.get("scaleDownStabilizationSeconds", 300)),
            target_utilization=float(auto.get("targetUtilization", 0.8)))
        if autoscaling.min_replicas > autoscaling.max_replicas:
            raise SpecError("spec.autoscaling.minReplicas must be less than or equal to maxReplicas")

    pod_template = pod_template_from(spec.get("podTemplate") or {}, names.ENGINE_CONTAINER, names.RESERVED_PATHS)

    pdb = spec.get("disruptionBudget")
    budget = None
    if pdb is not None:
        budget = DisruptionBudget(min_available=pdb.get("minAvailable"), max_unavailable=pdb.get("maxUnavailable"),
                                  unhealthy_pod_eviction_policy=pdb.get("unhealthyPodEvictionPolicy"))
        if (budget.min_available is None) == (budget.max_unavailable is None):
            raise SpecError("spec.disruptionBudget must set exactly one of minAvailable, maxUnavailable")
    svc = spec.get("service") or {}
    service = ServiceOptions(type=svc.get("type") or "ClusterIP", annotations=dict(svc.get("annotations") or {}),
                             labels=dict(svc.get("labels") or {}), load_balancer_class=svc.get("loadBalancerClass"),
                             load_balancer_source_ranges=tuple(svc.get("loadBalancerSourceRanges") or ()),
                             external_traffic_policy=svc.get("externalTrafficPolicy"))

    rollout = spec.get("rollout") or {}
    return ServiceSpec(
        name=name, namespace=namespace, model=source, engine=engine,
        served_model_name=spec.get("servedModelName") or name,
        replicas=int(spec.get("replicas", 1)), autoscaling=autoscaling,
        resources=resources, partition=partition, slo=slo, prometheus=prometheus, pod_template=pod_template,
        max_surge=rollout.get("maxSurge"), max_unavailable=rollout.get("maxUnavailable"),
        disruption_budget=budget, service=service)


def _quantity(value) -> str | None:
    return None if value is None else str(value)
