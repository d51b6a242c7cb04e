"""Per-request records, their summary, and the one JSON document `semipd bench` and `semipd simulate` both write.

Definitions (the same as vLLM's `bench serve` and semi-PD's paper):
- TTFT: from sending the request to receiving its first output token.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request; undefined for one-token outputs.
- ITL: every gap between two consecutive output tokens, pooled over all requests (a chunk carrying k tokens
  counts as k gaps of its gap / k).
- A request meets the SLOs when it succeeded, its TTFT <= the TTFT target and its TPOT <= the TPOT target (a target
  not given always holds; an undefined TPOT holds). Attainment: the share of requests meeting the SLOs, failed
  ones counted as misses. Goodput: requests meeting the SLOs per second of the run.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERCENTILES = (50, 90, 99)
SCHEMA = "semipd.bench/v1"


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    attainment: float = 0.9          # the goal a sweep's "highest rate" is read at


@dataclass
class RequestResult:
    index: int
    arrival_s: float                 # when it was due (trace time)
    sent_s: float                    # when it was sent (run time; a lagging client sends late)
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    token_ids: list[int] | None = None   # the output ids, only when the client asked for them (return_token_ids)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slo: SLO) -> bool:
        if not self.ok:
            return False
        if slo.ttft_s is not None and self.ttft_s > slo.ttft_s:
            return False
        tpot = self.tpot_s
        return slo.tpot_s is None or tpot is None or tpot <= slo.tpot_s

    def record(self) -> dict:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        if d["token_ids"] is None:
            del d["token_ids"]
        return d


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), so figures match other tools'."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict:
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else None
    return out


def summarize(results: list[RequestResult], duration_s: float, slo: SLO) -> dict:
    """The figures of one run. `duration_s`: from the first send to the last completion."""
    ok = [r for r in results if r.ok]
    met = sum(r.meets(slo) for r in results)
    duration = max(duration_s, 1e-9)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r.output_tokens for r in ok) / duration,
        "input_throughput": sum(r.prompt_tokens for r in ok) / duration,
        "ttft_s": _stats([r.ttft_s for r in ok]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _stats([g for r in ok for g in r.itl_s]),
        "e2e_s": _stats([r.e2e_s for r in ok]),
        "slo_met": met,
        "attainment": met / len(results) if results else None,
        "goodput": met / duration,
        "errors": _error_counts(results),
    }


def _error_counts(results: list[RequestResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            counts[r.error] = counts.get(r.error, 0) + 1
    return counts


def max_rate_at(runs: list[dict], goal: float) -> float | None:
    """The highest swept rate whose attainment reaches `goal`, counting only rates below the first one that
    misses it (a sweep that recovers past a miss is noise, not capacity). None: even the lowest rate misses."""
    best = None
    for run in sorted(runs, key=lambda r: r["rate"]):
        attainment = run["summary"]["attainment"]
        if attainment is None or attainment < goal:
            break
        best = run["rate"]
    return best


def document(tool: str, label: str, workload: dict, slo: SLO, runs: list[dict], simulated: bool,
             extra: dict | None = None) -> dict:
    """The JSON both tools write. `runs`: [{"rate", "summary", "requests"}] in sweep order."""
    doc = {
        "schema": SCHEMA,
        "tool": tool,
        "label": label,
        "simulated": simulated,
        "workload": workload,
        "slo": asdict(slo),
        "runs": runs,
        "max_rate_at_goal": max_rate_at(runs, slo.attainment),
    }
    doc.update(extra or {})
    return doc


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read_json(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a semipd bench/simulate result (schema {doc.get('schema')!r})")
    return doc


CSV_FIELDS = ("rate", "index", "arrival_s", "sent_s", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
              "itl_mean_s", "error")


def write_csv(path: str | Path, runs: list[dict]) -> None:
    """One row per request of every run (the JSON holds the ITL lists; the CSV their mean)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for run in runs:
            for rec in run["requests"]:
                itl = rec.get("itl_s") or []
                w.writerow({"rate": run["rate"], **{k: rec.get(k) for k in CSV_FIELDS[1:-2]},
                            "itl_mean_s": sum(itl) / len(itl) if itl else None, "error": rec.get("error")})
