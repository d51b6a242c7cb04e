"""One simulated run: a trace into a fixed set of pods (one, or N behind a least-loaded router), a controller on
their splits; results in report.RequestResult form. And a sweep of runs over rates, as `semipd bench` sweeps."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from semipd.loadgen.report import SLO, RequestResult, summarize
from semipd.loadgen.workload import RequestSpec, Workload
from semipd.sim.control import Controller, Static
from semipd.sim.models import LatencyModel
from semipd.sim.pod import Clock, Pod, PodConfig, make_pod

MODES = ("unified", "static", "semipd-rule", "policy")
DRAIN_LIMIT_S = 1800.0      # a run stops this long after the last arrival; what is left counts as failed

logging.getLogger("semipd.slo").setLevel(logging.WARNING)   # the SLO loop logs every move at info


@dataclass
class RunOutcome:
    results: list[RequestResult]
    duration_s: float
    pods: list[Pod]
    controller: Controller

    def extra(self) -> dict:
        reasons = Counter(e["reason"] for e in self.controller.log)
        return {"switches": sum(p.switches for p in self.pods), "final_splits": [round(p.split, 4) for p in self.pods],
                "preemptions": sum(p.metrics.c["preemptions"] for p in self.pods),
                "decision_reasons": dict(reasons), "controller": self.controller.describe()}


def least_loaded(pods: list[Pod], rr: list[int]) -> Pod:
    """Fewest outstanding requests; ties go round-robin (so an idle fleet still spreads)."""
    best = min(p.outstanding for p in pods)
    tied = [p for p in pods if p.outstanding == best]
    rr[0] += 1
    return tied[rr[0] % len(tied)]


def run_pods(requests: list[RequestSpec], model: LatencyModel, kind: str, cfg: PodConfig,
             controller: Controller | None = None, pods: int = 1, split: float = 0.5,
             clock: Clock | None = None) -> RunOutcome:
    """Replay `requests` into `pods` pods of `kind` (semipd | unified)."""
    clock = clock or Clock()
    results: list[RequestResult] = []
    fleet = [make_pod(kind, f"pod-{i}", clock, model, cfg, split, results) for i in range(pods)]
    controller = controller or Static()
    controller.attach(clock, lambda: fleet)
    rr = [0]

    def arrive(spec: RequestSpec):
        (fleet[0] if len(fleet) == 1 else least_loaded(fleet, rr)).add(spec)

    for spec in requests:
        clock.at(spec.arrival_s, arrive, spec)
    total = len(requests)
    last = requests[-1].arrival_s if requests else 0.0
    clock.run(until=last + DRAIN_LIMIT_S, stop=lambda: len(results) >= total)
    done = {r.index for r in results}
    for spec in requests:
        if spec.index not in done:
            results.append(RequestResult(spec.index, spec.arrival_s, spec.arrival_s, spec.prompt_tokens, 0,
                                         error="unfinished"))
    results.sort(key=lambda r: r.index)
    end = max([r.arrival_s + r.e2e_s for r in results if r.ok], default=0.0)
    start = requests[0].arrival_s if requests else 0.0
    return RunOutcome(results, end - start, fleet, controller)


def sweep(workload: Workload, rates: list[float], make_run, slo: SLO, progress=None,
          keep_requests: bool = True) -> list[dict]:
    """`make_run(requests) -> RunOutcome` per rate; runs in report.document's shape plus a "sim" block."""
    runs = []
    for rate in rates:
        reqs = workload.at_rate(rate).requests()
        out = make_run(reqs)
        summary = summarize(out.results, out.duration_s, slo)
        runs.append({"rate": rate, "summary": summary,
                     "requests": [r.record() for r in out.results] if keep_requests else [],
                     "sim": out.extra()})
        if progress:
            progress(rate, summary, out)
    return runs
