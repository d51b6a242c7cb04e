"""Per-pod split: write the desired split to each pod's annotation (the engine follows it through its
downward-API file) and push it to the pod's admin endpoint, best-effort, recording what each pod acknowledged."""
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import httpx

from semipd.operator import health, names, status
from semipd.operator.builders import split_string
from semipd.operator.kube import ApiError, Kube

log = logging.getLogger("semipd.operator.pods")


@dataclass(frozen=True)
class PushResult:
    ok: bool
    prefill_sms: int | None = None
    error: str | None = None


def push_split(ip: str, port: int, token: str, prefill: float, timeout: float) -> PushResult:
    """PUT http://IP:PORT/admin/partition {"prefill": F}. Errors are described without the token."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        resp = httpx.put(f"http://{host}:{port}/admin/partition", json={"prefill": prefill},
                         headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.TimeoutException:
        return PushResult(False, error=f"PUT /admin/partition: no answer within {timeout:g} s")
    except httpx.HTTPError as e:
        return PushResult(False, error=f"PUT /admin/partition: {type(e).__name__}: {e}")
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code >= 400:
        detail = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return PushResult(False, error=f"PUT /admin/partition: HTTP {resp.status_code}: {detail or resp.text[:200]}")
    sms = body.get("prefill_sms") if isinstance(body, dict) else None
    return PushResult(True, prefill_sms=sms if isinstance(sms, int) else None)


@dataclass(frozen=True)
class Plan:
    """What one pod should run and why (the policy's reason, or Spec/Initial when no policy decided)."""
    split: str
    reason: str
    message: str = ""


PUSH_WORKERS = 8    # pushes run side by side: one slow pod costs one timeout, not one per pod after it


def sync(kube: Kube, namespace: str, service: str, port: int, plan_for: Callable[[str], Plan], token: str | None,
         previous: list[dict] | None, now: datetime, push_timeout: float, retry_after: float,
         emit=lambda *a, **k: None) -> list[dict]:
    """Annotate every live pod of the service with its desired split, push it where due (in parallel), and
    return the status.pods entries (desired, applied, appliedSMs, reason, lastError, lastAttemptTime)."""
    before = {p.get("name"): p for p in previous or []}
    entries, due = [], []
    for pod in kube.list("v1", "pods", namespace, names.selector_string(service)):
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        name = meta["name"]
        plan = plan_for(name)
        if (meta.get("annotations") or {}).get(names.SPLIT_ANNOTATION) != plan.split:
            try:
                kube.merge_patch("v1", "pods", namespace, name,
                                 {"metadata": {"annotations": {names.SPLIT_ANNOTATION: plan.split}}})
            except ApiError as e:
                if e.not_found:
                    continue  # the pod went away meanwhile
                raise
        old = before.get(name)
        entry = {k: v for k, v in (old or {}).items() if k in KEPT}
        entry.update(name=name, desired=plan.split, reason=plan.reason)
        entries.append(entry)
        if token and status.push_due(old, plan.split, status.pod_ready(pod), now, retry_after):
            due.append((entry, pod["status"]["podIP"], old))
    results = push_all([(ip, _fraction(entry["desired"])) for entry, ip, _ in due], port, token, push_timeout)
    for (entry, _, old), result in zip(due, results):
        _record_push(entry, old, result, now, namespace, emit)
    return entries


def push_all(targets: list[tuple[str, float]], port: int, token: str, timeout: float) -> list[PushResult]:
    """push_split to every (pod IP, prefill) side by side, results in order: one slow pod costs one timeout."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(PUSH_WORKERS, len(targets))) as pool:
        return list(pool.map(lambda t: push_split(t[0], port, token, t[1], timeout), targets))


KEPT = ("name", "applied", "appliedSMs", "lastError", "lastAttemptTime", "ttftMs", "tpotMs")


def _record_push(entry: dict, old: dict | None, result: PushResult, now: datetime, namespace: str, emit) -> None:
    entry["lastAttemptTime"] = status.stamp(now)
    health.PUSHES.labels(result="ok" if result.ok else "failed").inc()
    if not result.ok:
        health.ERRORS.labels(reason="PartitionPushFailed").inc()
    if result.ok:
        entry["applied"] = entry["desired"]
        entry.pop("lastError", None)
        if result.prefill_sms is not None:
            entry["appliedSMs"] = result.prefill_sms
        return
    if (old or {}).get("lastError") is None:
        emit("PartitionPushFailed", f"pod {entry['name']}: {result.error}", warning=True)
    entry["lastError"] = result.error
    log.info("split push to pod %s/%s failed: %s", namespace, entry["name"], result.error)


def _fraction(split: str) -> float:
    return float(split.partition("=")[2])
