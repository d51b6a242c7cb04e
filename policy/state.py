"""The policy's memory, explicit so a restarted operator (or engine) keeps its sense: per pod the split it asked
for, when it last moved and which way, the samples its latency models are fitted from, the recent load; for the
service the last scaling and the recent replica recommendations. It round-trips through plain JSON."""
import json
import math
from dataclasses import asdict, dataclass, field

SAMPLE_LIMIT = 64           # model samples kept per pod
LOAD_POINTS = 8             # load history kept per pod (for the trend)
RECOMMENDATION_LIMIT = 128  # replica recommendations kept for the scale-in stabilisation window


@dataclass
class PodState:
    desired: float | None = None            # the split the policy last asked this pod to run
    last_change: float | None = None        # when it last changed
    last_direction: int = 0                 # +1 towards prefill, -1 towards decode
    ttft_samples: list = field(default_factory=list)    # (time, x, prompt_rate, ttft)
    tpot_samples: list = field(default_factory=list)    # (time, y, tpot)
    load: list = field(default_factory=list)            # (time, prompt_rate)

    def add(self, samples: list, item: tuple, limit: int = SAMPLE_LIMIT, split_index: int | None = None) -> None:
        """Append; past the limit drop the oldest sample of the split seen most often (with `split_index`),
        so a long stay at one split never erases what the other splits taught (the fit needs them)."""
        samples.append(list(item))
        while len(samples) > limit:
            if split_index is None:
                del samples[0]
                continue
            counts: dict[float, int] = {}
            for s in samples:
                key = round(s[split_index], 2)
                counts[key] = counts.get(key, 0) + 1
            crowded = max(counts, key=counts.get)
            del samples[next(i for i, s in enumerate(samples) if round(s[split_index], 2) == crowded)]


@dataclass
class PolicyState:
    pods: dict[str, PodState] = field(default_factory=dict)
    last_scale: float | None = None
    recommendations: list = field(default_factory=list)  # (time, replicas wanted)
    low_since: float | None = None                       # since when fewer pods would do
    served_capacity: float | None = None                 # prompt tok/s a saturated pod last served (no model)
    proven_capacity: float | None = None                 # the most prompt tok/s a pod served within its targets

    def pod(self, name: str) -> PodState:
        return self.pods.setdefault(name, PodState())

    def forget_missing(self, present: set[str]) -> None:
        for name in [n for n in self.pods if n not in present]:
            del self.pods[name]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Compact: numbers rounded to what the decisions can tell apart (it is written to status often)."""
        return json.dumps(_rounded(self.to_dict()), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> "PolicyState":
        try:
            return cls.from_dict(json.loads(text)) if text else cls()
        except (ValueError, TypeError, AttributeError):
            return cls()    # unreadable (hand-edited, older format): start afresh rather than stop

    @classmethod
    def from_dict(cls, data: dict | None) -> "PolicyState":
        data = data or {}
        known = set(PodState.__dataclass_fields__)
        pods = {name: PodState(**{k: v for k, v in (p or {}).items() if k in known})
                for name, p in (data.get("pods") or {}).items()}
        return cls(pods=pods, last_scale=data.get("last_scale"),
                   recommendations=list(data.get("recommendations") or []), low_since=data.get("low_since"),
                   served_capacity=data.get("served_capacity"), proven_capacity=data.get("proven_capacity"))


def _rounded(value):
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return value
        # clock readings (epoch seconds) keep a tenth of a second; measurements six significant digits
        return round(value, 1) if abs(value) >= 1e5 else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
