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


def record(history: list[dict] | None, kind: str, before, after, reason: str, now: datetime) -> list[dict]:
    """Append a decision when something actually changed; keep the last HISTORY_LIMIT."""
    history = list(history or [])
    if before is None or str(before) == str(after):
        return history
    history.append({"time": stamp(now), "kind": kind, "from": str(before), "to": str(after), "reason": reason})
    return history[-HISTORY_LIMIT:]


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
    """Whether writing `new` (a merge patch of status) would change anything in `old`."""
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())
