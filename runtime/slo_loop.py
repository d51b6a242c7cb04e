"""The in-engine SLO policy (`semipd serve --partition-policy slo`): the policy the operator runs, here on the
engine's own measurements, with no Kubernetes and no Prometheus.

Every `interval` seconds it builds one Observation for this engine (pod "self") from the last `window` seconds,
asks semipd.policy.decide, and applies the split it returns. In this mode it is the split's only writer (the
admin API answers 409 and --partition-file is refused): never two controllers on one knob."""
import logging
import threading
import time
from collections import deque

from semipd.policy.types import Observation, PolicyConfig, SplitBounds, Targets
from semipd.runtime.config import SloSettings
from semipd.runtime.recent import Totals, percentile

log = logging.getLogger("semipd.slo")

POD = "self"


def policy_config(settings: SloSettings, initial: float) -> PolicyConfig:
    def seconds(ms):
        return None if ms is None else ms / 1000.0
    return PolicyConfig(
        targets=Targets(ttft_s=seconds(settings.ttft_ms), tpot_s=seconds(settings.tpot_ms),
                        percentile=settings.percentile),
        split=SplitBounds(min=settings.partition_min, max=settings.partition_max, step=settings.partition_step,
                          cooldown_s=settings.partition_cooldown),
        replicas=None, initial=initial)


class SloLoop:
    """`engine` needs: recent (RecentSamples), partition (PartitionController), queue_state(). `decide` and `state`
    default to semipd.policy's; tests pass their own."""

    def __init__(self, engine, settings: SloSettings, decide=None, state=None, clock=time.monotonic):
        if decide is None:
            try:
                from semipd.policy import PolicyState, decide
            except ImportError as exc:
                raise ValueError(f"--partition-policy slo: the policy module cannot be loaded ({exc})") from None
            state = PolicyState() if state is None else state
        self.engine, self.settings = engine, settings
        self._decide, self._state, self._clock = decide, state, clock
        self.config = policy_config(settings, initial=self.current_split())
        # (time, totals) read at each decision; differences between the newest and the one at the window's
        # start are the window's rates. One entry per interval, trimmed to the window: bounded.
        self._reads: deque[tuple[float, Totals]] = deque([(clock(), engine.recent.totals())])
        self.last: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slo-policy", daemon=True)

    def start(self):
        log.info("in-engine SLO policy: TTFT %s ms, TPOT %s ms at p%g, prefill share %g-%g, step %g, cooldown %gs, "
                 "every %gs over %gs", self.settings.ttft_ms, self.settings.tpot_ms, self.settings.percentile,
                 self.settings.partition_min, self.settings.partition_max, self.settings.partition_step,
                 self.settings.partition_cooldown, self.settings.interval, self.settings.window)
        self._thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.settings.interval):
            try:
                self.tick(self._clock())
            except Exception:     # a policy bug must not take the engine down: the split stays where it is
                log.exception("in-engine SLO policy failed; the split stays")

    def current_split(self) -> float:
        state = self.engine.partition.get()
        return state["prefill_sms"] / state["total_sms"]

    def observe(self, now: float) -> Observation:
        start = now - self.settings.window
        totals = self.engine.recent.totals()
        self._reads.append((now, totals))
        while len(self._reads) > 2 and self._reads[1][0] <= start:
            self._reads.popleft()            # keep the newest read at or before the window's start as the base
        base_time, base = self._reads[0]
        span = now - base_time

        def rate(name: str) -> float:
            return (getattr(totals, name) - getattr(base, name)) / span if span > 0 else 0.0

        ttfts, tpots = self.engine.recent.since(start)
        waiting, handoff, kv_usage = self.engine.queue_state()
        changed_at = self.engine.partition.changed_at
        p = self.settings.percentile
        return Observation(
            pod=POD, split=self.current_split(), split_stable=changed_at is None or changed_at <= start,
            ttft_s=percentile(ttfts, p), tpot_s=percentile(tpots, p),
            requests=float(totals.arrivals - base.arrivals), arrival_rate=rate("arrivals"),
            prompt_rate=rate("arrived_prompt_tokens"), prompt_throughput=rate("prefilled_tokens"),
            output_rate=rate("output_tokens"), waiting=float(waiting), handoff=float(handoff), kv_usage=kv_usage,
            preemption_rate=rate("preemptions"), prefill_busy=min(1.0, rate("prefill_busy_s")),
            sample_age_s=0.0)     # its own numbers are always fresh

    def tick(self, now: float) -> None:
        obs = self.observe(now)
        decision = self._decide([obs], self.config, self._state, now)
        choice = decision.splits.get(POD)
        if choice is None:
            log.warning("the SLO policy returned no split for this engine; the split stays")
            return
        self.last = {"split": choice.split, "changed": choice.changed, "reason": choice.reason,
                     "message": choice.message, "ttft_s": obs.ttft_s, "tpot_s": obs.tpot_s,
                     "requests": obs.requests}
        if not choice.changed:
            log.debug("SLO policy holds prefill share %.3f: %s: %s", obs.split, choice.reason, choice.message)
            return
        try:
            applied = self.engine.partition.set(choice.split, source="slo-policy")
        except ValueError as exc:         # a share the device cannot make: say so, keep the split
            log.warning("SLO policy asked for prefill share %s, which cannot be applied: %s", choice.split, exc)
            return
        log.info("SLO policy: prefill share %.3f -> %.3f (prefill=%d SMs): %s: %s", obs.split, choice.split,
                 applied["prefill_sms"], choice.reason, choice.message)
