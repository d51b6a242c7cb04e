"""Who moves a simulated pod's split (and, in a fleet, the replica count). All pluggable, all logged.

- `Static`: nobody; the start-up split stays.
- `InProcessPolicy`: semipd.policy.decide on the pod's own exact recent measurements, through the engine's own
  SLO loop class (runtime/slo_loop.py's SloLoop, unmodified, on the simulated clock): what
  `semipd serve --partition-policy slo` does.
- `OperatorPolicy`: semipd.policy.decide on what Prometheus would show the operator: each pod's histograms and
  counters scraped every `scrape_interval`, read every `interval` over `window` by operator/observe.py's own
  `observation` (histogram_quantile percentiles with vLLM's bucket edges), the decision pushed `push_delay` later.
- `SemiPDRule`: semi-PD's own feedback rule as a baseline (research/semipd.md §4): every window, P90 TTFT misses
  -> one SM group to prefill, else 1.1 x P90 TPOT misses -> one group to decode; no model, no trend, no cooldown.
"""
from __future__ import annotations

from semipd.operator.observe import observation as operator_observation
from semipd.policy import PolicyConfig, PolicyState, SplitBounds, Targets, decide
from semipd.runtime.config import SloSettings
from semipd.runtime.recent import percentile
from semipd.runtime.slo_loop import SloLoop
from semipd.sim.metrics import Scraper
from semipd.sim.pod import SM_GROUP, TOTAL_SMS, Clock, Pod


class Controller:
    name = "static"

    def __init__(self):
        self.log: list[dict] = []

    def attach(self, clock: Clock, pods_fn) -> None:
        """`pods_fn()`: the pods the controller sees now (a fleet's ready pods)."""
        self.clock, self.pods_fn = clock, pods_fn

    def _log(self, pod: str, split: float, changed: bool, reason: str, message: str, **extra) -> None:
        self.log.append({"t": round(self.clock.now, 3), "pod": pod, "split": round(split, 4), "changed": changed,
                         "reason": reason, "message": message, **extra})

    def describe(self) -> dict:
        return {"name": self.name}


class Static(Controller):
    name = "static"


class _PartitionView:
    """What SloLoop reads and writes of the engine's partition controller, over a simulated pod."""

    def __init__(self, pod: Pod):
        self.pod = pod

    def get(self) -> dict:
        return {"prefill_sms": self.pod.prefill_sms, "total_sms": self.pod.cfg.total_sms}

    @property
    def changed_at(self):
        return self.pod.changed_at

    def set(self, x: float, source: str = "") -> dict:
        return {"prefill_sms": self.pod.set_split(x)}


class _EngineView:
    def __init__(self, pod: Pod):
        self.recent = pod.metrics.recent
        self.partition = _PartitionView(pod)
        self.queue_state = pod.queue_state


class InProcessPolicy(Controller):
    name = "policy (in-process)"

    def __init__(self, settings: SloSettings):
        super().__init__()
        self.settings = settings
        self.loops: dict[str, SloLoop] = {}

    def attach(self, clock, pods_fn):
        super().attach(clock, pods_fn)
        clock.at(self.settings.interval, self._tick)

    def _tick(self, _):
        now = self.clock.now
        for pod in self.pods_fn():
            loop = self.loops.get(pod.name)
            if loop is None:
                loop = self.loops[pod.name] = SloLoop(_EngineView(pod), self.settings, clock=self.clock)
                continue    # its first read is the base of its first window
            loop.tick(now)
            last = loop.last or {}
            self._log(pod.name, pod.split, bool(last.get("changed")), last.get("reason", "?"),
                      last.get("message", ""), ttft_s=last.get("ttft_s"), tpot_s=last.get("tpot_s"))
        self.clock.at(now + self.settings.interval, self._tick)

    def describe(self):
        s = self.settings
        return {"name": self.name, "decide": f"{decide.__module__}.decide", "interval_s": s.interval,
                "window_s": s.window, "cooldown_s": s.partition_cooldown, "step": s.partition_step,
                "bounds": [s.partition_min, s.partition_max]}


class OperatorPolicy(Controller):
    """Also the fleet's joint split + replica controller: give `config.replicas` and `on_replicas`."""
    name = "policy (operator)"

    def __init__(self, config: PolicyConfig, scrape_interval: float = 15.0, interval: float = 15.0,
                 push_delay: float = 1.0, scraper: Scraper | None = None, on_replicas=None, replicas_fn=None):
        super().__init__()
        self.config, self.interval, self.push_delay = config, interval, push_delay
        self.scraper = scraper or Scraper(scrape_interval)
        self.own_scraper = scraper is None
        self.state = PolicyState()
        self.on_replicas, self.replicas_fn = on_replicas, replicas_fn
        self.replica_log: list[dict] = []

    def attach(self, clock, pods_fn):
        super().attach(clock, pods_fn)
        if self.own_scraper:
            clock.at(0.0, self._scrape)
        # the operator's reads fall between scrapes (half an interval after one, on average)
        clock.at(self.interval + self.scraper.interval / 2, self._tick)

    def _scrape(self, _):
        self.scraper.scrape(self.pods_fn(), self.clock.now)
        self.clock.at(self.clock.now + self.scraper.interval, self._scrape)

    def _tick(self, _):
        now = self.clock.now
        pods = {p.name: p for p in self.pods_fn()}
        q = self.config.targets.percentile / 100
        window = self.config.window_s
        obs = [operator_observation(name, self.scraper.values(name, now, window, q), window) for name in pods]
        current, ready = self.replicas_fn() if self.replicas_fn else (len(pods), len(pods))
        decision = decide(obs, self.config, self.state, now, current, ready)
        for o in obs:
            d = decision.splits[o.pod]
            self._log(o.pod, d.split, d.changed, d.reason, d.message, ttft_s=o.ttft_s, tpot_s=o.tpot_s)
            if d.changed:
                self.clock.at(now + self.push_delay, self._push, (pods[o.pod], d.split))
        if decision.replicas is not None:
            r = decision.replicas
            self.replica_log.append({"t": round(now, 1), "target": r.target, "changed": r.changed,
                                     "reason": r.reason, "message": r.message, "current": current, "ready": ready})
            if r.changed and self.on_replicas:
                self.on_replicas(r.target)
        self.clock.at(now + self.interval, self._tick)

    def _push(self, arg):
        pod, split = arg
        pod.set_split(split)

    def describe(self):
        c = self.config
        return {"name": self.name, "decide": f"{decide.__module__}.decide", "interval_s": self.interval,
                "scrape_interval_s": self.scraper.interval, "window_s": c.window_s, "push_delay_s": self.push_delay,
                "cooldown_s": c.split.cooldown_s, "step": c.split.step, "bounds": [c.split.min, c.split.max]}


class SemiPDRule(Controller):
    """semi-PD's feedback loop (Algorithm 1 / DynamicPartitioner.replan, research/semipd.md §4), without its
    fitted curves: every `window` seconds, on the P90s of the requests measured since the last decision (the
    windows are cleared after each replan), TTFT misses -> one SM group to prefill, else TPOT with semi-PD's 10 %
    margin misses -> one group to decode (one group = 8 of 132 SMs, about semi-PD's ±6 points per decision)."""
    name = "semi-PD rule"

    def __init__(self, ttft_s: float | None, tpot_s: float | None, window: float = 30.0, percentile_: float = 90.0,
                 bounds: tuple[float, float] = (0.1, 0.9), margin: float = 1.1):
        super().__init__()
        self.ttft_s, self.tpot_s, self.window, self.p = ttft_s, tpot_s, window, percentile_
        self.bounds, self.margin = bounds, margin
        self.step = SM_GROUP / TOTAL_SMS

    def attach(self, clock, pods_fn):
        super().attach(clock, pods_fn)
        clock.at(self.window, self._tick)

    def _tick(self, _):
        now = self.clock.now
        for pod in self.pods_fn():
            ttfts, tpots = pod.metrics.recent.since(now - self.window)
            ttft, tpot = percentile(ttfts, self.p), percentile(tpots, self.p)
            x, reason = pod.split, "WithinTargets"
            if self.ttft_s and ttft is not None and ttft > self.ttft_s:
                x, reason = min(self.bounds[1], pod.split + self.step), "TTFTAboveTarget"
            elif self.tpot_s and tpot is not None and self.margin * tpot > self.tpot_s:
                x, reason = max(self.bounds[0], pod.split - self.step), "TPOTAboveTarget"
            changed = abs(x - pod.split) > 1e-9
            if changed:
                pod.set_split(x)
            self._log(pod.name, pod.split, changed, reason, "", ttft_s=ttft, tpot_s=tpot)
        self.clock.at(now + self.window, self._tick)

    def describe(self):
        return {"name": self.name, "window_s": self.window, "step": self.step, "bounds": list(self.bounds),
                "tpot_margin": self.margin}


def operator_config(ttft_s, tpot_s, percentile_: float = 90.0, bounds=(0.1, 0.9), step: float = 0.05,
                    cooldown: float = 30.0, initial: float = 0.5, window: float = 60.0, scrape_interval: float = 15.0,
                    replicas=None) -> PolicyConfig:
    """The PolicyConfig operator/control.py's policy_config builds from a SemiPDService spec."""
    return PolicyConfig(targets=Targets(ttft_s=ttft_s, tpot_s=tpot_s, percentile=percentile_),
                        split=SplitBounds(min=bounds[0], max=bounds[1], step=step, cooldown_s=cooldown),
                        replicas=replicas, initial=initial, window_s=window,
                        max_sample_age_s=max(60.0, 3.0 * scrape_interval))


def inprocess_settings(ttft_s, tpot_s, percentile_: float = 90.0, bounds=(0.1, 0.9), step: float = 0.05,
                       cooldown: float = 30.0, interval: float = 5.0, window: float = 30.0) -> SloSettings:
    """`semipd serve --partition-policy slo`'s settings (its defaults: every 5 s over 30 s, cooldown 30 s)."""
    return SloSettings(ttft_ms=None if ttft_s is None else ttft_s * 1000,
                       tpot_ms=None if tpot_s is None else tpot_s * 1000, percentile=percentile_,
                       partition_min=bounds[0], partition_max=bounds[1], partition_step=step,
                       partition_cooldown=cooldown, interval=interval, window=window)
