"""One pod's split: from its window of observations to the prefill share it should run, with the reason.

Order of precedence: unusable metrics hold the last decision; a pod still adopting the last split holds; no
traffic holds; the cooldown holds. A TTFT miss with requests waiting and prefill mostly idle is admission waiting
for decode (slots, KV): a step towards decode. Then, when latency models are trusted (fitted and agreeing with what the pod
measures now), the policy jumps to the split with the most margin under the predicted load; otherwise it steps
as semi-PD's feedback rule does (TTFT misses: towards prefill; else TPOT misses: towards decode). Either way it
moves only when a target is missed or about to be (hysteresis), so a steady load that meets its targets causes
no switching at all."""
import math
from dataclasses import dataclass

from semipd.policy import fit
from semipd.policy.state import LOAD_POINTS, PodState
from semipd.policy.types import Observation, PolicyConfig, SplitBounds, SplitDecision

MIN_GAIN = 0.05             # a model jump must buy at least 5 % of a target in predicted margin
AGREEMENT = 1.5             # a model within this factor of what the pod measures now is believed
NEAR_MISS = 0.8             # a latency above 80 % of its target with the load rising is about to miss
RISING = 1.2                # ... and the load "rises" when it is projected 20 % above today's within the horizon
FLAP_COOLDOWNS = 3          # a reversal within this many cooldowns of the last move is oscillation
IDLE_PREFILL = 0.5          # requests wait although prefill computed less than half the window: it is not the
                            # bottleneck; admission waits for decode slots or KV blocks that decode frees


@dataclass(frozen=True)
class Assessment:
    """What the replica decision needs to know about one pod."""
    valid: bool                 # its metrics were usable
    traffic: bool = False       # requests arrived in the window
    load: float = 0.0           # predicted prompt tokens/s
    feasible: bool | None = None    # some split meets every target at that load (None: not known yet)
    capacity: float | None = None   # prompt tokens/s one pod can take within the targets (model estimate)
    pressure: float = 0.0       # the worst observed latency / target
    margin_ok: bool = False     # every observed latency is well under its target
    served: float = 0.0         # prompt tokens/s it prefilled in the window
    saturated: bool = False     # requests were waiting: what it served is what it can serve now


@dataclass(frozen=True)
class Models:
    ttft: fit.TTFTModel | None
    tpot: fit.TPOTModel | None


def grid(bounds: SplitBounds) -> list[float]:
    """The splits worth asking for: whole SM groups inside the bounds (finer values round onto them)."""
    g = bounds.granularity
    lo, hi = math.ceil(bounds.min / g - 1e-9), math.floor(bounds.max / g + 1e-9)
    points = [round(k * g, 6) for k in range(lo, hi + 1)]
    return points or [round((bounds.min + bounds.max) / 2, 6)]


def snap(x: float, bounds: SplitBounds) -> float:
    return min(grid(bounds), key=lambda p: (abs(p - x), p))


def step_from(x: float, direction: int, bounds: SplitBounds) -> float:
    """At most `step` away (but always at least one SM group, or nothing would change), inside the bounds.
    Counted from the SM group `x` rounds onto, so an off-grid split still moves to another group."""
    points = grid(bounds)
    cell = snap(x, bounds)
    reach = max(bounds.step, bounds.granularity) + 1e-9
    ahead = [p for p in points if 0 < (p - cell) * direction <= reach]
    if ahead:
        return max(ahead, key=lambda p: (p - cell) * direction)
    further = [p for p in points if (p - cell) * direction > 0]
    return min(further, key=lambda p: (p - cell) * direction) if further else x


def unusable(obs: Observation, cfg: PolicyConfig) -> tuple[str, str] | None:
    if obs.sample_age_s is None:
        return "MetricsMissing", "no samples from this pod"
    numbers = [obs.sample_age_s, obs.requests, obs.prompt_rate, obs.arrival_rate, obs.output_rate, obs.waiting,
               obs.handoff, obs.kv_usage, obs.preemption_rate, obs.prompt_throughput]
    numbers += [v for v in (obs.split, obs.ttft_s, obs.tpot_s, obs.prefill_busy) if v is not None]
    if any(math.isnan(v) or math.isinf(v) for v in numbers):
        return "MetricsInvalid", "a measurement is NaN or infinite"
    if obs.sample_age_s > cfg.max_sample_age_s:
        return "MetricsStale", f"newest sample is {obs.sample_age_s:.0f} s old (limit {cfg.max_sample_age_s:.0f} s)"
    return None


def record(obs: Observation, ps: PodState, now: float) -> None:
    ps.add(ps.load, (now, obs.prompt_rate), limit=LOAD_POINTS)
    if not obs.split_stable or obs.split is None or obs.requests <= 0:
        return  # a window that mixed splits (or saw nothing) would teach the models a split it did not run
    if obs.ttft_s is not None:
        ps.add(ps.ttft_samples, (now, obs.split, obs.prompt_rate, obs.ttft_s), split_index=1)
    if obs.tpot_s is not None:
        ps.add(ps.tpot_samples, (now, 1.0 - obs.split, obs.tpot_s), split_index=1)


def predicted_load(obs: Observation, ps: PodState, cfg: PolicyConfig) -> float:
    """Today's prompt rate, or where its trend leads within the horizon if that is higher (a ramp is met before
    the percentile breaks; a falling load is left to the scale-in window)."""
    return max(obs.prompt_rate, obs.prompt_rate + fit.slope(ps.load) * cfg.horizon_s)


def fitted(ps: PodState, now: float, resolution: float) -> Models:
    return Models(fit.fit_ttft(ps.ttft_samples, now, resolution), fit.fit_tpot(ps.tpot_samples, now, resolution))


class _Judge:
    """The targets against one pod's numbers and models."""

    def __init__(self, obs: Observation, cfg: PolicyConfig, models: Models):
        t = cfg.targets
        self.obs, self.cfg, self.t = obs, cfg, t
        self.ttft_ratio = obs.ttft_s / t.ttft_s if t.ttft_s and obs.ttft_s is not None else None
        self.tpot_ratio = obs.tpot_s / t.tpot_s if t.tpot_s and obs.tpot_s is not None else None
        self.ttft_miss = self.ttft_ratio is not None and self.ttft_ratio > 1
        self.tpot_miss = self.tpot_ratio is not None and self.tpot_ratio > 1
        self.models = models if self._believed(models) else None

    def _believed(self, m: Models) -> bool:
        """Every set target has a model, and each model agrees with what the pod measures at its split now."""
        obs, t = self.obs, self.t
        if (t.ttft_s and m.ttft is None) or (t.tpot_s and m.tpot is None) or obs.split is None:
            return False
        if t.ttft_s and obs.ttft_s is not None and not _agrees(m.ttft.predict(obs.split, obs.prompt_rate), obs.ttft_s):
            return False
        if t.tpot_s and obs.tpot_s is not None and not _agrees(m.tpot.predict(1 - obs.split), obs.tpot_s):
            return False
        return True

    @property
    def pressure(self) -> float:
        return max([r for r in (self.ttft_ratio, self.tpot_ratio) if r is not None], default=0.0)

    def margin(self, x: float, load: float) -> float:
        m, t = self.models, self.t
        margins = []
        if t.ttft_s:
            margins.append(1 - m.ttft.predict(x, load) / t.ttft_s)
        if t.tpot_s:
            margins.append(1 - m.tpot.predict(1 - x) / t.tpot_s)
        return min(margins)

    def capacity(self) -> float | None:
        """Prompt tokens/s one pod takes within both targets at its best split (None: not modelled)."""
        m, t, b = self.models, self.t, self.cfg.split
        if m is None or not t.ttft_s:
            return None
        x = b.max
        if t.tpot_s:
            x = min(x, 1 - m.tpot.min_share(t.tpot_s))
        return 0.0 if x < b.min else m.ttft.capacity(x, t.ttft_s)


def _agrees(predicted: float, observed: float) -> bool:
    if not math.isfinite(predicted) or predicted <= 0 or observed <= 0:
        return False
    return 1 / AGREEMENT <= predicted / observed <= AGREEMENT


def decide_split(obs: Observation, cfg: PolicyConfig, ps: PodState, now: float,
                 pooled: Models) -> tuple[SplitDecision, Assessment]:
    bounds = cfg.split
    if ps.desired is None:
        # the initial split exactly as the spec gives it (the pod already runs it; snapping would only rewrite
        # its annotation with a value that rounds onto the same SMs)
        ps.desired = cfg.initial if bounds.min <= cfg.initial <= bounds.max else snap(cfg.initial, bounds)
    elif not bounds.min - 1e-9 <= ps.desired <= bounds.max + 1e-9:
        return _change(ps, snap(ps.desired, bounds), now, "Bounds",
                       "the split bounds changed; moved inside them"), Assessment(valid=True)
    current = ps.desired

    bad = unusable(obs, cfg)
    if bad:
        return _hold(current, *bad), Assessment(valid=False)
    record(obs, ps, now)
    if obs.split is not None and abs(obs.split - current) > bounds.granularity / 2 + 1e-9:
        return (_hold(current, "Applying", f"the pod runs prefill={obs.split:.3f}, asked for {current:.3f}"),
                Assessment(valid=True, traffic=obs.requests > 0, load=obs.prompt_rate))
    if obs.requests <= 0:
        return (_hold(current, "NoTraffic", "no requests in the window"),
                Assessment(valid=True, feasible=True, margin_ok=True))
    if not (cfg.targets.ttft_s or cfg.targets.tpot_s):
        return _hold(current, "NoTargets", "no latency target is set"), Assessment(valid=True, traffic=True)

    load = predicted_load(obs, ps, cfg)
    own = fitted(ps, now, bounds.granularity / 2)
    judge = _Judge(obs, cfg, own)
    if judge.models is None:
        judge = _Judge(obs, cfg, Models(own.ttft or pooled.ttft, own.tpot or pooled.tpot))
    if judge.ttft_miss and admission_blocked(obs):
        return _to_decode_for_admission(judge, current, load, ps, now, cfg)
    if judge.models is not None:
        return _by_model(judge, current, load, ps, now, cfg)
    return _by_feedback(judge, current, load, ps, now, cfg)


def admission_blocked(obs: Observation) -> bool:
    """Requests wait while the prefill worker is mostly idle: the queue is not prefill's. The engine admits a
    request only with a decode slot and KV blocks free, and only decode frees them; more prefill SMs would slow
    decode and lengthen the wait (semi-PD's rule makes exactly that move)."""
    return obs.waiting >= 1 and obs.prefill_busy is not None and obs.prefill_busy < IDLE_PREFILL


def _to_decode_for_admission(judge: _Judge, current: float, load: float, ps: PodState, now: float,
                             cfg: PolicyConfig) -> tuple[SplitDecision, Assessment]:
    obs = judge.obs
    figures = _figures(judge) + (f"; {obs.waiting:.0f} waiting while prefill computed {obs.prefill_busy:.0%} of "
                                 f"the window: admission waits for decode")
    base = dict(valid=True, traffic=True, load=load, pressure=judge.pressure)
    target = step_from(current, -1, cfg.split)
    if target == current:
        return (_hold(current, "AtBound", figures + f"; the split is at its bound ({current:.3f})"),
                Assessment(**base, feasible=False))
    if _cooling(ps, now, cfg):
        return _hold(current, "Cooldown", figures), Assessment(**base)
    return (_change(ps, target, now, "AdmissionBlocked", figures + f"; step {current:.3f} -> {target:.3f}"),
            Assessment(**base))


def _by_model(judge: _Judge, current: float, load: float, ps: PodState, now: float,
              cfg: PolicyConfig) -> tuple[SplitDecision, Assessment]:
    best = max(grid(cfg.split), key=lambda x: (judge.margin(x, load), -abs(x - current)))
    best_margin, now_margin = judge.margin(best, load), judge.margin(current, load)
    assessment = Assessment(valid=True, traffic=True, load=load, feasible=best_margin >= 0,
                            capacity=judge.capacity(), pressure=judge.pressure,
                            margin_ok=now_margin >= 0.2 and not (judge.ttft_miss or judge.tpot_miss))
    missing = judge.ttft_miss or judge.tpot_miss
    if not missing and now_margin >= 0:
        return _hold(current, "WithinTargets", _figures(judge) + f"; predicted margin {now_margin:.0%}"), assessment
    if _cooling(ps, now, cfg):
        return _hold(current, "Cooldown", _figures(judge)), assessment
    if best == current or best_margin - now_margin < MIN_GAIN:
        reason = "NoSplitMeetsSLO" if best_margin < 0 else "BestSplit"
        return _hold(current, reason, _figures(judge) + f"; best predicted margin {best_margin:.0%} at "
                                                        f"prefill={best:.3f}"), assessment
    reason = ("TTFTAboveTarget" if judge.ttft_miss else "TPOTAboveTarget" if judge.tpot_miss else "LoadRising")
    message = (_figures(judge) + f"; model: prefill={best:.3f} gives margin {best_margin:.0%} (now {now_margin:.0%}) "
               f"at {load:.0f} prompt tok/s")
    return _change(ps, best, now, reason, message), assessment


def _by_feedback(judge: _Judge, current: float, load: float, ps: PodState, now: float,
                 cfg: PolicyConfig) -> tuple[SplitDecision, Assessment]:
    obs, bounds = judge.obs, cfg.split
    figures = _figures(judge)
    base = dict(valid=True, traffic=True, load=load, pressure=judge.pressure,
                margin_ok=judge.pressure <= 0.5 and not (judge.ttft_miss or judge.tpot_miss))
    if judge.ttft_miss and judge.tpot_miss:
        return _hold(current, "BothAboveTarget", figures + "; no split helps both"), Assessment(**base, feasible=False)
    direction, reason = 0, "WithinTargets"
    if judge.ttft_miss:
        direction, reason = 1, "TTFTAboveTarget"
    elif judge.tpot_miss:
        direction, reason = -1, "TPOTAboveTarget"
    elif (judge.ttft_ratio is not None and judge.ttft_ratio >= NEAR_MISS and load >= RISING * obs.prompt_rate
          and (judge.tpot_ratio is None or judge.tpot_ratio < NEAR_MISS)):
        direction, reason = 1, "LoadRising"
    if direction == 0:
        return _hold(current, reason, figures), Assessment(**base, feasible=True)
    target = step_from(current, direction, bounds)
    if target == current:
        return (_hold(current, "AtBound", figures + f"; the split is at its bound ({current:.3f})"),
                Assessment(**base, feasible=False))
    if _cooling(ps, now, cfg):
        return _hold(current, "Cooldown", figures), Assessment(**base)
    if (ps.last_direction == -direction and ps.last_change is not None
            and now - ps.last_change < FLAP_COOLDOWNS * max(bounds.cooldown_s, 1.0)):
        return (_hold(current, "Oscillating", figures + "; the last move went the other way: no split meets both "
                                                        "targets at this load"), Assessment(**base, feasible=False))
    return _change(ps, target, now, reason, figures + f"; step {current:.3f} -> {target:.3f}"), Assessment(**base)


def _cooling(ps: PodState, now: float, cfg: PolicyConfig) -> bool:
    return ps.last_change is not None and now - ps.last_change < cfg.split.cooldown_s


def _figures(judge: _Judge) -> str:
    obs, t = judge.obs, judge.t
    parts = []
    if obs.ttft_s is not None:
        parts.append(f"TTFT p{t.percentile:g} {obs.ttft_s * 1000:.0f} ms" +
                     (f" (target {t.ttft_s * 1000:.0f})" if t.ttft_s else ""))
    if obs.tpot_s is not None:
        parts.append(f"TPOT p{t.percentile:g} {obs.tpot_s * 1000:.1f} ms" +
                     (f" (target {t.tpot_s * 1000:.1f})" if t.tpot_s else ""))
    return ", ".join(parts) or "no latency samples"


def _hold(split: float, reason: str, message: str) -> SplitDecision:
    return SplitDecision(split, False, reason, message)


def _change(ps: PodState, split: float, now: float, reason: str, message: str) -> SplitDecision:
    before = ps.desired
    ps.last_direction = 0 if before is None else (1 if split > before else -1)
    ps.desired, ps.last_change = split, now
    return SplitDecision(split, True, reason, message)
