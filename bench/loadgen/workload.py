"""The workload description `semipd bench` sends and `semipd simulate` replays: arrivals and lengths, seeded.

One description, two consumers: the load generator turns each RequestSpec into an HTTP request, the simulator
into a simulated one, so measured and predicted curves come from the very same trace."""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

LENGTH_KINDS = ("fixed", "uniform", "lognormal", "file")


@dataclass(frozen=True)
class LengthDist:
    """Token counts of prompts or outputs.

    fixed: always `mean`; uniform: integers in [low, high]; lognormal: ShareGPT-like heavy tail with median
    `mean` and shape `sigma`, clipped to [low, high]; file: drawn from `values` (read from a JSONL file)."""
    kind: str = "fixed"
    mean: float = 128
    low: int = 1
    high: int = 4096
    sigma: float = 0.8
    values: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length kind must be one of {', '.join(LENGTH_KINDS)}, not {self.kind!r}")
        if self.kind == "file" and not self.values:
            raise ValueError("a file length distribution needs at least one value")
        if self.kind != "file" and (self.mean < 1 or self.low < 1 or self.high < self.low):
            raise ValueError(f"lengths need 1 <= low <= high and mean >= 1 (got mean={self.mean}, "
                             f"low={self.low}, high={self.high})")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(round(self.mean))
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        if self.kind == "lognormal":
            return min(self.high, max(self.low, int(round(rng.lognormvariate(math.log(self.mean), self.sigma)))))
        return rng.choice(self.values)

    def describe(self) -> dict:
        d = asdict(self)
        if self.kind == "file":
            d["values"] = len(self.values)
        return d


def parse_length(text: str) -> LengthDist:
    """`128` or `fixed:128`; `uniform:64:512`; `lognormal:256[:sigma[:low:high]]`. Raises ValueError with the
    accepted forms, for argparse to turn into a usage error."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return LengthDist("fixed", mean=int(parts[0]))
        kind, nums = parts[0], [float(p) for p in parts[1:]]
        if kind == "fixed" and len(nums) == 1:
            return LengthDist("fixed", mean=int(nums[0]))
        if kind == "uniform" and len(nums) == 2:
            return LengthDist("uniform", mean=(nums[0] + nums[1]) / 2, low=int(nums[0]), high=int(nums[1]))
        if kind == "lognormal" and len(nums) in (1, 2, 4):
            sigma = nums[1] if len(nums) > 1 else 0.8
            low, high = (int(nums[2]), int(nums[3])) if len(nums) == 4 else (1, 8192)
            return LengthDist("lognormal", mean=nums[0], sigma=sigma, low=low, high=high)
    except ValueError as exc:
        if "length" in str(exc):
            raise
    raise ValueError(f"bad length {text!r}: use N, fixed:N, uniform:LOW:HIGH or lognormal:MEDIAN[:SIGMA[:LOW:HIGH]]")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a trace: when it is sent (seconds from the start) and how long it is.

    `prompt` is set only when the trace came from a JSONL file of prompts; otherwise the sender makes a prompt of
    `prompt_tokens` tokens. `output_tokens` is sent as max_tokens with ignore_eos, so the length is what was asked."""
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt: str | None = None


@dataclass(frozen=True)
class Workload:
    """Arrivals at `rate` requests/s with gamma-distributed gaps (`burstiness` is the gamma shape: 1 = Poisson,
    below 1 burstier, above 1 more regular), stopping after `num_requests` or at `duration_s`."""
    rate: float = 1.0
    input: LengthDist = LengthDist("fixed", mean=128)
    output: LengthDist = LengthDist("fixed", mean=64)
    burstiness: float = 1.0
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    prompts: tuple[tuple[str, int | None], ...] = field(default=(), repr=False)   # (prompt, output tokens or None)

    def __post_init__(self):
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (got {self.rate})")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0 (got {self.burstiness}; 1 = Poisson)")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a workload needs num_requests or duration_s")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1 (got {self.num_requests})")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds (got {self.duration_s})")

    def at_rate(self, rate: float) -> "Workload":
        return replace(self, rate=rate)

    def requests(self) -> list[RequestSpec]:
        """The trace: deterministic for a seed, and the same lengths at every rate of a sweep (only the gaps
        scale), so a sweep compares one population of requests under different loads."""
        lengths = random.Random(self.seed)
        gaps = random.Random(self.seed + 1)
        out: list[RequestSpec] = []
        t = 0.0
        while True:
            i = len(out)
            if self.num_requests is not None and i >= self.num_requests:
                break
            if i > 0:   # the first request goes at 0; the trace's length is then a whole number of gaps
                t += gaps.gammavariate(self.burstiness, 1.0 / (self.burstiness * self.rate))
            if self.duration_s is not None and t > self.duration_s:
                break
            prompt = None
            if self.prompts:
                prompt, out_tokens = self.prompts[i % len(self.prompts)]
                out_len = out_tokens if out_tokens is not None else self.output.draw(lengths)
                in_len = max(1, len(prompt) // 4)      # an estimate for reports; the server counts the truth
            else:
                in_len, out_len = self.input.draw(lengths), self.output.draw(lengths)
            out.append(RequestSpec(i, t, in_len, max(1, out_len), prompt))
        return out

    def describe(self) -> dict:
        return {"rate": self.rate, "burstiness": self.burstiness, "num_requests": self.num_requests,
                "duration_s": self.duration_s, "seed": self.seed, "input": self.input.describe(),
                "output": self.output.describe(), "prompts": len(self.prompts)}


def read_jsonl(path: str | Path) -> tuple[LengthDist | None, LengthDist | None, tuple[tuple[str, int | None], ...]]:
    """A JSONL file of lengths ({"input_tokens": N, "output_tokens": M}) or of prompts ({"prompt": "...",
    optional "output_tokens": M}). Returns (input lengths, output lengths, prompts); one kind per file."""
    inputs, outputs, prompts = [], [], []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object")
        out = row.get("output_tokens")
        if out is not None and (not isinstance(out, int) or out < 1):
            raise ValueError(f"{path}:{n}: output_tokens must be a positive integer")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError(f"{path}:{n}: prompt must be a non-empty string")
            prompts.append((row["prompt"], out))
        elif isinstance(row.get("input_tokens"), int) and row["input_tokens"] >= 1:
            inputs.append(row["input_tokens"])
            outputs.append(out if out is not None else None)
        else:
            raise ValueError(f"{path}:{n}: needs \"prompt\" or a positive integer \"input_tokens\"")
    if prompts and inputs:
        raise ValueError(f"{path}: mixes prompts and lengths; use one kind per file")
    if not prompts and not inputs:
        raise ValueError(f"{path}: no requests in the file")
    if prompts:
        return None, None, tuple(prompts)
    if any(o is None for o in outputs):
        return LengthDist("file", values=tuple(inputs)), None, ()
    return LengthDist("file", values=tuple(inputs)), LengthDist("file", values=tuple(outputs)), ()
