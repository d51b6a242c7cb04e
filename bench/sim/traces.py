"""Generated traces for the fleet: a bursty diurnal day with BurstGPT-like statistics.

BurstGPT (Wang et al., traces of Azure OpenAI GPT service) describes LLM serving traffic as: a daily cycle in the
request rate; within it, arrivals burstier than Poisson (gamma-distributed gaps with shape below 1); heavy-tailed
request and response lengths. This generator has exactly those three properties and nothing fitted to the real
trace (the parameters are ours, stated in `DayTrace`):

- rate(t) = mean * (1 - amplitude * cos(2 pi t / day)): the trough at t = 0 (night), the peak at day / 2;
- gaps gamma(shape = burstiness) in operational time (time rescaled by the cumulative rate), so the burstiness
  holds at every hour of the day;
- lengths lognormal (median, sigma) clipped, as workload.LengthDist draws them.

The day is time-compressed: `day_s` simulated seconds stand for 24 hours (default 1800 s, a 48x compression);
pod start-up times are NOT compressed, which makes a scale-out relatively slower than in a real day."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from semipd.loadgen.workload import LengthDist, RequestSpec, parse_length


@dataclass(frozen=True)
class DayTrace:
    mean_rate: float = 200.0            # requests/s averaged over the day
    day_s: float = 1800.0               # simulated seconds standing for 24 h
    amplitude: float = 0.6              # peak = mean * 1.6, trough = mean * 0.4
    burstiness: float = 0.5             # gamma shape of the gaps (1 = Poisson; below 1 burstier)
    input: LengthDist = parse_length("lognormal:300:1.1:4:8192")
    output: LengthDist = parse_length("lognormal:150:1.0:2:2048")
    seed: int = 0

    def rate(self, t: float) -> float:
        return self.mean_rate * (1 - self.amplitude * math.cos(2 * math.pi * t / self.day_s))

    def cumulative(self, t: float) -> float:
        w = 2 * math.pi / self.day_s
        return self.mean_rate * (t - self.amplitude * math.sin(w * t) / w)

    def _invert(self, u: float, guess: float) -> float:
        t = guess
        for _ in range(50):
            f = self.cumulative(t) - u
            r = self.rate(t)
            step = f / max(r, 1e-9)
            t -= step
            if abs(step) < 1e-7:
                break
        return t

    def requests(self) -> list[RequestSpec]:
        lengths, gaps = random.Random(self.seed), random.Random(self.seed + 1)
        out, u, t = [], 0.0, 0.0
        end = self.cumulative(self.day_s)
        k = self.burstiness
        while True:
            u += gaps.gammavariate(k, 1.0 / k)
            if u > end:
                break
            t = self._invert(u, t)
            out.append(RequestSpec(len(out), t, self.input.draw(lengths), max(1, self.output.draw(lengths))))
        return out

    def describe(self) -> dict:
        return {"kind": "bursty diurnal (BurstGPT-like, generated)", "mean_rate": self.mean_rate,
                "peak_rate": self.mean_rate * (1 + self.amplitude), "trough_rate": self.mean_rate * (1 - self.amplitude),
                "day_s": self.day_s, "compression": 86400 / self.day_s, "burstiness": self.burstiness,
                "input": self.input.describe(), "output": self.output.describe(), "seed": self.seed}


def diurnal_trace(**kwargs) -> list[RequestSpec]:
    """The requests of one generated day (DayTrace's fields as keywords)."""
    return DayTrace(**kwargs).requests()
