"""The engine's own recent measurements, for the in-engine SLO policy (runtime/slo_loop.py).

Prometheus histograms cannot be read back as percentiles over a window, so the engine also keeps each request's
TTFT and TPOT with the time it was measured (bounded deques: memory stays flat under any load; at the cap the
window is the most recent requests), and plain running totals whose differences between two reads are rates."""
import threading
import time
from collections import deque
from dataclasses import dataclass

MAX_SAMPLES = 8192      # per latency: several minutes of a busy pod, a few hundred KB


@dataclass(frozen=True, slots=True)
class Totals:
    arrivals: int = 0               # requests accepted into the queue
    arrived_prompt_tokens: int = 0
    prefilled_tokens: int = 0       # prompt tokens computed (chunks, recomputes included)
    output_tokens: int = 0
    preemptions: int = 0
    prefill_busy_s: float = 0.0     # seconds the prefill worker spent in steps


class RecentSamples:
    def __init__(self, max_samples: int = MAX_SAMPLES, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._totals = dict.fromkeys(Totals.__slots__, 0)

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append((self._clock(), seconds))

    def tpot(self, seconds: float) -> None:
        with self._lock:
            self._tpot.append((self._clock(), seconds))

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._totals[name] += n

    def totals(self) -> Totals:
        with self._lock:
            return Totals(**self._totals)

    def since(self, start: float) -> tuple[list[float], list[float]]:
        """TTFT and TPOT values measured at or after `start` (monotonic seconds)."""
        with self._lock:
            return ([v for t, v in self._ttft if t >= start], [v for t, v in self._tpot if t >= start])


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0-100), interpolated between the two nearest ranks; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
