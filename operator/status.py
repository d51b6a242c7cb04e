"""Pure helpers for the status the operator writes: per-pod split entries, decision history, the status dict.
Every key written here is declared in the CRD's status schema (a unit test checks it), so nothing is pruned."""
from datetime import datetime, timezone

from semipd.operator import names

HISTORY_LIMIT = 10  # the CRD's maxItems for status.history


def stamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def pod_ready(pod: dict) -> bool:
    st = pod.get("status") or {}
    if not st.get("podIP") or pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def push_due(entry: dict | None, desired: str, ready: bool, now: datetime, retry_after: float) -> bool:
    """Push the split to a pod's admin endpoint when it is ready and has not acknowledged this split; after a
    failure, wait `retry_after` seconds before trying the same split again (a new split is pushed at once)."""
    if not ready:
        return False
    if entry is None:
        return True
    if entry.get("applied") == desired:
        return False
    if entry.get("lastError") and entry.get("desired") == desired:
        last = parse_stamp(entry.get("lastAttemptTime"))
        if last is not None and (now - last).total_seconds() < retry_after:
            return False
    return True


def record(history: list[dict] | None, kind: str, before, after, reason: str, now: datetime, pod: str | None = None,
           message: str = "") -> list[dict]:
    """Append a decision when something actually changed; keep the last HISTORY_LIMIT."""
    history = list(history or [])
    if before is None or str(before) == str(after):
        return history
    item = {"time": stamp(now), "kind": kind, "from": str(before), "to": str(after), "reason": reason}
    if pod:
        item["pod"] = pod
    if message:
        item["message"] = message[:1024]
    history.append(item)
    return history[-HISTORY_LIMIT:]


def split_summary(entries: list[dict], default: str) -> str:
    """One split for the printer column: the pods' common one, or the range they span."""
    values = sorted({e["desired"] for e in entries}, key=lambda s: float(s.partition("=")[2]))
    if not values:
        return default
    return values[0] if len(values) == 1 else f"{values[0]}..{values[-1].partition('=')[2]}"


def slo_figures(percentile: float, metrics, measured_at: float | None) -> dict:
    """status.slo: the service-wide latencies at the spec's percentile, as numbers and as the printer columns'
    text ("212ms@p90"); "-" when nothing was measured."""
    def text(value):
        return "-" if value is None else f"{value:.0f}ms@p{percentile:g}" if value >= 10 else \
            f"{value:.1f}ms@p{percentile:g}"
    out = {"percentile": percentile, "ttft": text(metrics.ttft_ms), "tpot": text(metrics.tpot_ms),
           "ttftMs": None if metrics.ttft_ms is None else round(metrics.ttft_ms, 1),
           "tpotMs": None if metrics.tpot_ms is None else round(metrics.tpot_ms, 2)}
    if measured_at is not None:
        out["lastUpdated"] = stamp(datetime.fromtimestamp(measured_at, tz=timezone.utc))
    return out


def deployment_counts(deployment: dict | None) -> dict:
    st = (deployment or {}).get("status") or {}
    return {
        "replicas": int(st.get("replicas", 0)),
        "readyReplicas": int(st.get("readyReplicas", 0)),
        "updatedReplicas": int(st.get("updatedReplicas", 0)),
    }


def assemble(*, service: str, deployment: dict | None, conditions: list[dict], split: str,
             template_hash: str | None, pods: list[dict], history: list[dict]) -> dict:
    status = {
        **deployment_counts(deployment),
        "selector": names.selector_string(service),
        "split": split,
        "conditions": conditions,
        "pods": sorted(pods, key=lambda p: p["name"]),
        "history": history,
    }
    if template_hash:
        status["podTemplateHash"] = template_hash
    return status


def changed(old: dict | None, new: dict) -> bool:
    """Whether writing `new` (a merge patch of status) would change anything in `old`. A None in `new` deletes
    that key, so it equals an absent one."""
    old = old or {}
    return any(_pruned(old.get(k)) != _pruned(v) for k, v in new.items())


def _pruned(value):
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value
