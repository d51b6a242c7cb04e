"""semipd policy: SLO observations in, SM splits and replica counts (with reasons) out. No torch, no Kubernetes,
no HTTP: the engine (`--partition-policy slo`), the operator and the simulator all call `decide`."""
from dataclasses import replace

from semipd.policy.replicas import decide_replicas
from semipd.policy.split import Models, decide_split, fitted
from semipd.policy.state import PodState, PolicyState
from semipd.policy.types import (
    Decision, Observation, PolicyConfig, ReplicaBounds, ReplicaDecision, SplitBounds, SplitDecision, Targets,
)

__all__ = ["Decision", "Observation", "PodState", "PolicyConfig", "PolicyState", "ReplicaBounds", "ReplicaDecision",
           "SplitBounds", "SplitDecision", "Targets", "decide"]


def decide(observations: list[Observation], config: PolicyConfig, state: PolicyState, now: float,
           current_replicas: int = 1, ready_replicas: int = 1) -> Decision:
    """One control step over every pod of a service. `state` is updated in place (models, clocks, history);
    `now` is any clock in seconds, the same one on every call."""
    state.forget_missing({o.pod for o in observations})
    resolution = config.split.granularity / 2
    pooled = _pooled(state, now, resolution)
    decision = Decision()
    assessments = []
    for obs in observations:
        split, assessment = decide_split(obs, config, state.pod(obs.pod), now, pooled)
        decision.splits[obs.pod] = split
        assessments.append(replace(assessment, served=obs.prompt_throughput, saturated=obs.waiting >= 1))
    if config.replicas is not None:
        decision.replicas = decide_replicas(assessments, config, state, now, current_replicas, ready_replicas)
    return decision


def _pooled(state: PolicyState, now: float, resolution: float) -> Models:
    """Every pod's samples together: the same hardware and model, so a new pod starts from what the others learnt."""
    merged = PodState()
    for ps in state.pods.values():
        merged.ttft_samples += ps.ttft_samples
        merged.tpot_samples += ps.tpot_samples
    return fitted(merged, now, resolution)
