"""Many pods: a router, pods that take `startup_s` to load a model before they serve, scale-in that drains, and
three autoscalers. Every pod costs GPU time from the moment it starts until it is removed.

- router: least outstanding requests among ready, non-draining pods (ties round-robin);
- scale-out: new pods start at once and serve after `startup_s` (model load; default 90 s);
- scale-in: pods still starting go first (removed at once), then the ready pods with the fewest outstanding
  requests, which stop receiving requests and are removed when their last request finishes (drain);

Autoscalers (each on its own clock):
- `ours`: semipd.policy.decide with ReplicaBounds, joint split + replicas, on operator-mode observations
  (control.OperatorPolicy: Prometheus-scraped histograms every 15 s, 60 s window, decisions every 15 s);
- `dynamo`: an averages-based planner like NVIDIA Dynamo's (research/anchors.md): every 180 s, the average
  request rate of the last interval, a linear-trend prediction of the next, replicas = ceil(predicted rate /
  per-pod capacity), the capacity profiled beforehand (one pod's rate at the attainment goal, as Dynamo's
  pre-deployment profiling gives it); splits static;
- `keda`: a queue-threshold autoscaler like KEDA's Prometheus scaler on vllm:num_requests_waiting feeding the
  HPA: every 15 s, desired = ceil(current * (waiting per pod / target)), a 10 % tolerance, scale-up at most
  max(4 pods, 100 %) per period, scale-down to the highest recommendation of the last 300 s; splits static.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field

from semipd.loadgen.report import SLO, RequestResult, summarize
from semipd.policy import ReplicaBounds
from semipd.sim.control import OperatorPolicy, operator_config
from semipd.sim.metrics import Scraper
from semipd.sim.models import LatencyModel
from semipd.sim.pod import Clock, Pod, PodConfig, make_pod

AUTOSCALERS = ("ours", "dynamo", "keda")


@dataclass
class Member:
    pod: Pod
    started: float
    ready_at: float
    state: str = "starting"        # starting | ready | draining | removed
    removed: float | None = None


class Fleet:
    def __init__(self, clock: Clock, model: LatencyModel, cfg: PodConfig, kind: str = "semipd", split: float = 0.5,
                 startup_s: float = 90.0, initial: int = 1, max_pods: int = 50):
        self.clock, self.model, self.cfg, self.kind, self.split = clock, model, cfg, kind, split
        self.startup_s, self.max_pods = startup_s, max_pods
        self.results: list[RequestResult] = []
        self.members: list[Member] = []
        self.timeline: list[tuple[float, int, int]] = []     # (t, pods costing GPU time, ready pods)
        self._n = 0
        self._rr = 0
        self.arrivals = 0
        self.backlog: list = []
        for _ in range(initial):
            self._start(ready_now=True)

    # ---- pods -------------------------------------------------------------------------------------------------
    def _start(self, ready_now: bool = False) -> None:
        now = self.clock.now
        pod = make_pod(self.kind, f"pod-{self._n}", self.clock, self.model, self.cfg, self.split, self.results)
        self._n += 1
        m = Member(pod, now, now if ready_now else now + self.startup_s)
        pod.on_idle = lambda p, m=m: self._idle(m)
        self.members.append(m)
        if ready_now:
            m.state = "ready"
        else:
            self.clock.at(m.ready_at, self._ready, m)
        self._mark()

    def _ready(self, m: Member) -> None:
        if m.state == "starting":
            m.state = "ready"
            self._mark()
            backlog, self.backlog = self.backlog, []
            for spec in backlog:
                self.route(spec)

    def _idle(self, m: Member) -> None:
        if m.state == "draining" and m.pod.outstanding == 0:
            self._remove(m)

    def _remove(self, m: Member) -> None:
        m.state, m.removed = "removed", self.clock.now
        self._mark()

    def _mark(self) -> None:
        self.timeline.append((self.clock.now, self.current(costing=True), len(self.ready())))

    def ready(self) -> list[Pod]:
        return [m.pod for m in self.members if m.state == "ready"]

    def current(self, costing: bool = False) -> int:
        """Pods that count as replicas (starting + ready); with `costing`, also the draining ones."""
        states = ("starting", "ready", "draining") if costing else ("starting", "ready")
        return sum(1 for m in self.members if m.state in states)

    def scale_to(self, n: int) -> None:
        n = max(1, min(self.max_pods, n))
        cur = self.current()
        for _ in range(n - cur):
            self._start()
        if n >= cur:
            return
        extra = cur - n
        starting = [m for m in self.members if m.state == "starting"][::-1]
        for m in starting[:extra]:
            self._remove(m)
            extra -= 1
        ready = sorted((m for m in self.members if m.state == "ready"), key=lambda m: m.pod.outstanding)
        for m in ready[:max(0, min(extra, len(ready) - 1))]:   # the last ready pod always stays
            m.state = "draining"
            if m.pod.outstanding == 0:
                self._remove(m)
        self._mark()

    # ---- requests ---------------------------------------------------------------------------------------------
    def route(self, spec) -> None:
        self.arrivals += 1
        pods = self.ready()
        if not pods:
            self.backlog.append(spec)
            return
        best = min(p.outstanding for p in pods)
        tied = [p for p in pods if p.outstanding == best]
        self._rr += 1
        tied[self._rr % len(tied)].add(spec)

    def gpu_hours(self, end: float) -> float:
        return sum(((m.removed if m.removed is not None else end) - m.started) for m in self.members) / 3600.0


class DynamoLike:
    name = "dynamo-like planner"

    def __init__(self, fleet: Fleet, capacity_rps: float, interval: float = 180.0, bounds=(1, 50)):
        self.fleet, self.capacity, self.interval, self.bounds = fleet, capacity_rps, interval, bounds
        self.history: list[float] = []
        self.log: list[dict] = []
        self._last_arrivals = 0

    def attach(self, clock: Clock) -> None:
        self.clock = clock
        clock.at(self.interval, self._tick)

    def _tick(self, _):
        now = self.clock.now
        rate = (self.fleet.arrivals - self._last_arrivals) / self.interval
        self._last_arrivals = self.fleet.arrivals
        self.history.append(rate)
        prev = self.history[-2] if len(self.history) > 1 else rate
        predicted = max(0.0, rate + (rate - prev))
        target = max(self.bounds[0], min(self.bounds[1], math.ceil(predicted / self.capacity)))
        self.log.append({"t": round(now, 1), "rate": rate, "predicted": predicted, "target": target})
        self.fleet.scale_to(target)
        self.clock.at(now + self.interval, self._tick)

    def describe(self):
        return {"name": self.name, "interval_s": self.interval, "capacity_rps": self.capacity,
                "predictor": "linear trend of the last two interval averages"}


class KedaLike:
    name = "keda-like queue autoscaler"

    def __init__(self, fleet: Fleet, scraper: Scraper, target_waiting: float = 5.0, interval: float = 15.0,
                 stabilization: float = 300.0, tolerance: float = 0.1, bounds=(1, 50)):
        self.fleet, self.scraper, self.target = fleet, scraper, target_waiting
        self.interval, self.stabilization, self.tolerance, self.bounds = interval, stabilization, tolerance, bounds
        self.recs: list[tuple[float, int]] = []
        self.log: list[dict] = []

    def attach(self, clock: Clock) -> None:
        self.clock = clock
        clock.at(self.interval + self.scraper.interval / 2, self._tick)

    def _tick(self, _):
        now = self.clock.now
        cur = self.fleet.current()
        seen = [self.scraper.waiting(p.name, now) for p in self.fleet.ready()]
        waiting = sum(w for w in seen if w is not None)       # ignoreNullValues: a missing series is skipped
        ratio = (waiting / max(cur, 1)) / self.target
        desired = cur if abs(ratio - 1) <= self.tolerance else math.ceil(cur * ratio)
        desired = min(desired, max(2 * cur, cur + 4))          # the HPA's default scale-up limit per period
        desired = max(self.bounds[0], min(self.bounds[1], desired))
        self.recs = [r for r in self.recs if now - r[0] <= self.stabilization] + [(now, desired)]
        target = desired if desired >= cur else max(r[1] for r in self.recs)
        self.log.append({"t": round(now, 1), "waiting": waiting, "desired": desired, "target": target})
        if target != cur:
            self.fleet.scale_to(target)
        self.clock.at(now + self.interval, self._tick)

    def describe(self):
        return {"name": self.name, "interval_s": self.interval, "target_waiting_per_pod": self.target,
                "scale_down_stabilization_s": self.stabilization, "tolerance": self.tolerance}


@dataclass
class FleetOutcome:
    autoscaler: str
    results: list[RequestResult]
    gpu_hours: float
    duration_s: float
    timeline: list
    log: list = field(default_factory=list)
    describe: dict = field(default_factory=dict)
    switches: int = 0

    def summary(self, slo: SLO) -> dict:
        s = summarize(self.results, self.duration_s, slo)
        return {"autoscaler": self.autoscaler, "gpu_hours": self.gpu_hours, "attainment": s["attainment"],
                "ttft_p90_s": s["ttft_s"]["p90"], "tpot_p90_s": s["tpot_s"]["p90"], "requests": s["requests"],
                "failed": s["failed"], "max_pods": max((n for _, n, _ in self.timeline), default=0),
                "switches": self.switches, "controller": self.describe}


def run_fleet(requests, model: LatencyModel, cfg: PodConfig, autoscaler: str, slo: SLO, capacity_rps: float | None,
              max_pods: int = 50, startup_s: float = 90.0, split: float = 0.5, initial: int = 1,
              scale_down_s: float = 300.0, keda_target: float = 5.0) -> FleetOutcome:
    clock = Clock()
    fleet = Fleet(clock, model, cfg, "semipd", split, startup_s, initial, max_pods)
    scraper = Scraper(15.0)

    def scrape(_):
        scraper.scrape(fleet.ready(), clock.now)
        clock.at(clock.now + scraper.interval, scrape)
    clock.at(0.0, scrape)
    log_source, describe = None, {}
    if autoscaler == "ours":
        config = operator_config(slo.ttft_s, slo.tpot_s, initial=split,
                                 replicas=ReplicaBounds(min=1, max=max_pods, scale_down_stabilization_s=scale_down_s))
        ctl = OperatorPolicy(config, scraper=scraper, on_replicas=fleet.scale_to,
                             replicas_fn=lambda: (fleet.current(), len(fleet.ready())))
        ctl.attach(clock, fleet.ready)
        log_source, describe = ctl, ctl.describe()
    elif autoscaler == "dynamo":
        if not capacity_rps:
            raise ValueError("the dynamo-like planner needs a per-pod capacity (req/s)")
        ctl = DynamoLike(fleet, capacity_rps, bounds=(1, max_pods))
        ctl.attach(clock)
        log_source, describe = ctl, ctl.describe()
    elif autoscaler == "keda":
        ctl = KedaLike(fleet, scraper, target_waiting=keda_target, stabilization=scale_down_s, bounds=(1, max_pods))
        ctl.attach(clock)
        log_source, describe = ctl, ctl.describe()
    else:
        raise ValueError(f"autoscaler must be one of {', '.join(AUTOSCALERS)}")
    for spec in requests:
        clock.at(spec.arrival_s, fleet.route, spec)
    total = len(requests)
    last = requests[-1].arrival_s if requests else 0.0
    clock.run(until=last + 1800.0, stop=lambda: len(fleet.results) >= total)
    end = clock.now
    done = {r.index for r in fleet.results}
    results = list(fleet.results) + [RequestResult(s.index, s.arrival_s, s.arrival_s, s.prompt_tokens, 0,
                                                   error="unfinished") for s in requests if s.index not in done]
    results.sort(key=lambda r: r.index)
    log = getattr(log_source, "replica_log", None) or getattr(log_source, "log", [])
    switches = sum(m.pod.switches for m in fleet.members)
    return FleetOutcome(autoscaler, results, fleet.gpu_hours(end), end, fleet.timeline, log, describe, switches)


def pod_capacity(model, cfg, slo: SLO, trace, split: float = 0.5, rates=None, seconds: float = 120.0) -> float:
    """One pod's highest rate at the attainment goal on the trace's lengths (Poisson, static split): what a
    planner's pre-deployment profiling would measure."""
    from semipd.loadgen.workload import Workload
    from semipd.sim.run import run_pods
    best = None
    for rate in rates or [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32]:
        reqs = Workload(rate=rate, input=trace.input, output=trace.output, duration_s=seconds,
                        seed=trace.seed + 7).requests()
        out = run_pods(reqs, model, "semipd", cfg, None, 1, split)
        att = summarize(out.results, out.duration_s, slo)["attainment"]
        if att is None or att < slo.attainment:
            break
        best = rate
    return best or 1.0


def _parser() -> argparse.ArgumentParser:
    from semipd.loadgen.args import fraction, positive_float, positive_int
    from semipd.sim.cli import BANNER, _split, add_model_args
    p = argparse.ArgumentParser(prog="semipd simulate fleet", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Autoscalers compared on one generated bursty diurnal day (BurstGPT-like "
                                            "statistics, time-compressed). " + BANNER)
    add_model_args(p)
    t = p.add_argument_group("the day")
    t.add_argument("--mean-rate", type=positive_float, default=150.0, help="requests/s averaged over the day")
    t.add_argument("--day", type=positive_float, default=1800.0, help="simulated seconds standing for 24 h")
    t.add_argument("--amplitude", type=float, default=0.6, help="diurnal swing: peak = mean * (1 + amplitude)")
    t.add_argument("--burstiness", type=positive_float, default=0.5, help="gamma shape of the gaps (< 1 bursty)")
    t.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("the fleet")
    f.add_argument("--autoscaler", action="append", choices=AUTOSCALERS,
                   help="repeat to compare several (default: all three)")
    f.add_argument("--max-pods", type=positive_int, default=50)
    f.add_argument("--startup", type=positive_float, default=90.0, help="seconds a new pod takes to load the model")
    f.add_argument("--split", type=_split, default=0.5, help="start-up split (static for dynamo and keda)")
    f.add_argument("--pod-capacity", type=positive_float,
                   help="req/s per pod for the dynamo-like planner (default: profiled by a one-pod sweep)")
    f.add_argument("--keda-target", type=positive_float, default=5.0, help="waiting requests per pod")
    s = p.add_argument_group("SLOs")
    s.add_argument("--slo-ttft", type=positive_float, default=0.3, metavar="SECONDS")
    s.add_argument("--slo-tpot", type=positive_float, default=0.15, metavar="SECONDS")
    s.add_argument("--goal", type=fraction, default=0.9)
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.json", help="the summary per autoscaler and the pod timelines")
    o.add_argument("--plot", metavar="FILE.png", help="pods over time per autoscaler, with the arrival rate")
    return p


def format_table(rows: list[dict]) -> str:
    lines = ["SIMULATED fleet", f"{'autoscaler':<12}{'GPU-hours':>10}{'attain':>9}{'p90 TTFT':>10}{'p90 TPOT':>10}"
                                f"{'max pods':>9}{'switches':>9}{'failed':>8}"]
    for r in rows:
        ttft = f"{r['ttft_p90_s'] * 1000:.0f}" if r["ttft_p90_s"] is not None else "-"
        tpot = f"{r['tpot_p90_s'] * 1000:.1f}" if r["tpot_p90_s"] is not None else "-"
        lines.append(f"{r['autoscaler']:<12}{r['gpu_hours']:>10.2f}{r['attainment'] * 100:>8.1f}%{ttft:>10}"
                     f"{tpot:>10}{r['max_pods']:>9}{r['switches']:>9}{r['failed']:>8}")
    return "\n".join(lines)


def plot_fleet(outcomes: list[FleetOutcome], trace, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for o in outcomes:
        xs, ys = [], []
        for t, n, _ in o.timeline:
            if xs:
                xs.append(t)
                ys.append(ys[-1])
            xs.append(t)
            ys.append(n)
        xs.append(o.duration_s)
        ys.append(ys[-1] if ys else 0)
        ax.plot(xs, ys, label=f"{o.autoscaler} (simulated)")
    ax.set_xlabel("simulated seconds (the day compressed)")
    ax.set_ylabel("pods costing GPU time")
    ax2 = ax.twinx()
    ts = [trace.day_s * i / 200 for i in range(201)]
    ax2.plot(ts, [trace.rate(t) for t in ts], color="grey", linestyle=":", label="mean arrival rate")
    ax2.set_ylabel("requests/s (mean of the trace)")
    ax.legend(loc="upper left")
    ax.set_title("SIMULATED fleet: pods over a bursty diurnal day")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_fleet(model, cfg, trace, slo: SLO, autoscalers, max_pods=50, startup_s=90.0, split=0.5,
                  capacity=None, keda_target=5.0, progress=print) -> tuple[list[dict], list[FleetOutcome], float]:
    requests = trace.requests()
    progress(f"[SIMULATED] fleet: {len(requests)} requests over {trace.day_s:g} s "
             f"(mean {trace.mean_rate:g} req/s, peak {trace.mean_rate * (1 + trace.amplitude):g})")
    if capacity is None:
        started = time.monotonic()
        capacity = pod_capacity(model, cfg, slo, trace, split)
        progress(f"[SIMULATED] profiled one pod: {capacity:g} req/s at {slo.attainment:.0%} attainment "
                 f"({time.monotonic() - started:.0f} s)")
    # every autoscaler starts with the pods the night's trough needs (by the profiled capacity when there is one)
    trough = trace.mean_rate * (1 - trace.amplitude)
    initial = max(1, math.ceil(trough / capacity)) if capacity else 1
    rows, outcomes = [], []
    for name in autoscalers:
        started = time.monotonic()
        o = run_fleet(requests, model, cfg, name, slo, capacity, max_pods, startup_s, split, initial=initial,
                      keda_target=keda_target)
        row = o.summary(slo)
        rows.append(row)
        outcomes.append(o)
        progress(f"[SIMULATED] {name}: {row['gpu_hours']:.2f} GPU-hours, attainment {row['attainment']:.1%}, "
                 f"max {row['max_pods']} pods ({time.monotonic() - started:.0f} s)")
    return rows, outcomes, capacity


def main(argv: list[str]) -> int:
    from semipd.sim.cli import BANNER, _check_outputs, build_model
    from semipd.sim.traces import DayTrace
    parser = _parser()
    args = parser.parse_args(argv)
    _check_outputs(parser, args)
    if not 0 <= args.amplitude < 1:
        parser.error("argument --amplitude: must be in [0, 1)")
    model, cfg = build_model(parser, args)
    from dataclasses import replace
    cfg = replace(cfg, record_itl=False)
    trace = DayTrace(mean_rate=args.mean_rate, day_s=args.day, amplitude=args.amplitude,
                     burstiness=args.burstiness, seed=args.seed)
    slo = SLO(args.slo_ttft, args.slo_tpot, args.goal)
    print(BANNER, flush=True)
    rows, outcomes, capacity = compare_fleet(model, cfg, trace, slo, args.autoscaler or list(AUTOSCALERS),
                                             args.max_pods, args.startup, args.split, args.pod_capacity,
                                             args.keda_target, progress=lambda s: print(s, flush=True))
    print(format_table(rows))
    if args.output:
        doc = {"tool": "semipd simulate fleet", "simulated": True, "trace": trace.describe(),
               "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment},
               "model": model.describe(), "pod_capacity_rps": capacity, "startup_s": args.startup,
               "rows": rows, "timelines": {o.autoscaler: o.timeline for o in outcomes}}
        with open(args.output, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.output} (simulated)")
    if args.plot:
        plot_fleet(outcomes, trace, args.plot)
        print(f"wrote {args.plot} (simulated)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
