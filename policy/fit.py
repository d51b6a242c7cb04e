"""Online latency models, refitted from each window's observations (semi-PD's forms, research/semipd.md §4):

    TTFT(x) = a1 / (x - k*P) + b1      x: prefill share, P: prompt tokens/s arriving; lambda = k*P is the load
    TPOT(y) = a2 / y + b2              y: decode share

TTFT's form is an M/M/1 queue whose service rate grows with x: lambda is the share the arriving work keeps busy,
so TTFT blows up as x approaches it. Samples are weighted by recency (the workload drifts), and a model is
trusted only when the data can pin it down: enough samples, more than one split seen, and a good fit."""
import math
from dataclasses import dataclass

MIN_SAMPLES = 6
MIN_R2 = 0.7
HALF_LIFE_S = 600.0         # a sample's weight halves every ten minutes
K_GRID = 16                 # coarse candidate k values between 0 and the largest the samples allow
REFINE = 8                  # ternary-search rounds around the best of them
SLACK = 0.02                # every sample must keep x - k*P above this (the queue stays stable where it was seen)


@dataclass(frozen=True)
class TTFTModel:
    a1: float
    b1: float
    k: float
    r2: float
    samples: int

    def predict(self, x: float, prompt_rate: float) -> float:
        free = x - self.k * prompt_rate
        return math.inf if free <= 0 else self.a1 / free + self.b1

    def capacity(self, x: float, ttft_target: float) -> float:
        """The prompt tokens/s at which TTFT(x) reaches the target (inf when load does not matter, 0 when the
        target is out of reach even unloaded)."""
        if ttft_target <= self.b1:
            return 0.0
        needed = self.a1 / (ttft_target - self.b1)          # x - k*P must stay at least this
        if x <= needed:
            return 0.0
        return math.inf if self.k <= 0 else (x - needed) / self.k


@dataclass(frozen=True)
class TPOTModel:
    a2: float
    b2: float
    r2: float
    samples: int

    def predict(self, y: float) -> float:
        return math.inf if y <= 0 else self.a2 / y + self.b2

    def min_share(self, tpot_target: float) -> float:
        """The smallest decode share that keeps TPOT at the target (above 1: none does)."""
        return math.inf if tpot_target <= self.b2 else self.a2 / (tpot_target - self.b2)


def weights(times: list[float], now: float) -> list[float]:
    return [0.5 ** (max(0.0, now - t) / HALF_LIFE_S) for t in times]


def _linear(u: list[float], t: list[float], w: list[float]) -> tuple[float, float, float]:
    """Weighted least squares t = a*u + b with a, b >= 0; returns (a, b, weighted squared error). One pass over
    the samples: the fit runs for many candidate k on every decision."""
    sw = su = st = suu = sut = stt = 0.0
    for wi, ui, ti in zip(w, u, t):
        sw += wi
        su += wi * ui
        st += wi * ti
        suu += wi * ui * ui
        sut += wi * ui * ti
        stt += wi * ti * ti
    var = suu * sw - su * su
    a = (sut * sw - su * st) / var if var > 0 else 0.0
    b = (st - a * su) / sw
    if a < 0:
        a, b = 0.0, st / sw
    elif b < 0:
        a, b = (sut / suu if suu > 0 else 0.0), 0.0
    sse = stt - 2 * a * sut - 2 * b * st + a * a * suu + 2 * a * b * su + b * b * sw
    return a, b, max(sse, 0.0)


def _r2(t: list[float], w: list[float], sse: float) -> float:
    sw = sum(w)
    mt = sum(wi * ti for wi, ti in zip(w, t)) / sw
    sst = sum(wi * (ti - mt) ** 2 for wi, ti in zip(w, t))
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse <= 1e-18 else 0.0)


def distinct(values: list[float], resolution: float) -> int:
    """How many values differ by more than `resolution` (splits closer than one SM group are one split)."""
    seen: list[float] = []
    for v in sorted(values):
        if not seen or v - seen[-1] > resolution:
            seen.append(v)
    return len(seen)


def fit_ttft(samples: list[tuple[float, float, float, float]], now: float,
             resolution: float = 0.03) -> TTFTModel | None:
    """samples: (time, x, prompt_rate, ttft). None when they cannot pin the model down."""
    if len(samples) < MIN_SAMPLES or distinct([s[1] for s in samples], resolution) < 2:
        return None
    w = weights([s[0] for s in samples], now)
    t = [s[3] for s in samples]
    loaded = [(s[1] - SLACK) / s[2] for s in samples if s[2] > 0]
    k_max = max(0.0, min(loaded)) if loaded else 0.0

    def at(k):
        return (*_linear([1.0 / max(s[1] - k * s[2], 1e-9) for s in samples], t, w), k)

    # coarse grid over k, then narrow around the best cell (the error is smooth in k)
    coarse = [at(k_max * i / K_GRID) for i in range(K_GRID + 1)]
    i = min(range(len(coarse)), key=lambda j: coarse[j][2])
    lo, hi = k_max * max(i - 1, 0) / K_GRID, k_max * min(i + 1, K_GRID) / K_GRID
    best = coarse[i]
    for _ in range(REFINE):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        f1, f2 = at(m1), at(m2)
        best = min(best, f1, f2, key=lambda r: r[2])
        lo, hi = (lo, m2) if f1[2] <= f2[2] else (m1, hi)
    a, b, sse, k = best
    r2 = _r2(t, w, sse)
    return TTFTModel(a, b, k, r2, len(samples)) if r2 >= MIN_R2 else None


def fit_tpot(samples: list[tuple[float, float, float]], now: float,
             resolution: float = 0.03) -> TPOTModel | None:
    """samples: (time, y, tpot). None when they cannot pin the model down."""
    if len(samples) < MIN_SAMPLES or distinct([s[1] for s in samples], resolution) < 2:
        return None
    w = weights([s[0] for s in samples], now)
    t = [s[2] for s in samples]
    a, b, sse = _linear([1.0 / s[1] for s in samples], t, w)
    r2 = _r2(t, w, sse)
    return TPOTModel(a, b, r2, len(samples)) if r2 >= MIN_R2 else None


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points; 0 with fewer than three."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mt = sum(p[0] for p in points) / n
    mv = sum(p[1] for p in points) / n
    stt = sum((p[0] - mt) ** 2 for p in points)
    return 0.0 if stt <= 0 else sum((p[0] - mt) * (p[1] - mv) for p in points) / stt
