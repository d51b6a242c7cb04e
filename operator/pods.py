"""Per-pod split: write the desired split to each pod's annotation (the engine follows it through its
downward-API file) and push it to the pod's admin endpoint, best-effort, recording what each pod acknowledged."""
import logging
from dataclasses import dataclass
from datetime import datetime

import httpx

from semipd.operator import names, status
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


def sync(kube: Kube, namespace: str, service: str, port: int, prefill: float, token: str | None,
         previous: list[dict] | None, now: datetime, push_timeout: float, retry_after: float,
         emit=lambda *a, **k: None) -> list[dict]:
    """Annotate every live pod of the service with the desired split, push it where due, and return the
    status.pods entries (desired, applied, appliedSMs, lastError, lastAttemptTime)."""
    desired = split_string(prefill)
    before = {p.get("name"): p for p in previous or []}
    entries = []
    for pod in kube.list("v1", "pods", namespace, names.selector_string(service)):
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        name = meta["name"]
        if (meta.get("annotations") or {}).get(names.SPLIT_ANNOTATION) != desired:
            try:
                kube.merge_patch("v1", "pods", namespace, name,
                                 {"metadata": {"annotations": {names.SPLIT_ANNOTATION: desired}}})
            except ApiError as e:
                if e.not_found:
                    continue  # the pod went away meanwhile
                raise
        old = before.get(name)
        entry = {k: v for k, v in (old or {}).items()
                 if k in ("name", "applied", "appliedSMs", "lastError", "lastAttemptTime")}
        entry["name"] = name
        ready = status.pod_ready(pod)
        if token and status.push_due(old, desired, ready, now, retry_after):
            result = push_split(pod["status"]["podIP"], port, token, prefill, push_timeout)
            entry["lastAttemptTime"] = status.stamp(now)
            if result.ok:
                entry["applied"] = desired
                entry.pop("lastError", None)
                if result.prefill_sms is not None:
                    entry["appliedSMs"] = result.prefill_sms
            else:
                if (old or {}).get("lastError") is None:
                    emit("PartitionPushFailed", f"pod {name}: {result.error}", warning=True)
                entry["lastError"] = result.error
                log.info("split push to pod %s/%s failed: %s", namespace, name, result.error)
        entry["desired"] = desired
        entries.append(entry)
    return entries
