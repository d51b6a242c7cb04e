"""The Prometheus HTTP API, as far as the control loop needs it: instant queries returning a vector."""
import math
from dataclasses import dataclass

import httpx


class PrometheusError(Exception):
    """Prometheus could not answer (down, unreachable, a bad query): the message says which, for the status."""


@dataclass(frozen=True)
class Sample:
    labels: dict
    value: float        # NaN where Prometheus computed one (a quantile over no observations)


@dataclass
class Prometheus:
    url: str
    timeout: float = 5.0

    def query(self, promql: str) -> list[Sample]:
        try:
            resp = httpx.get(f"{self.url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=self.timeout)
        except httpx.TimeoutException:
            raise PrometheusError(f"Prometheus at {self.url} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise PrometheusError(f"Prometheus at {self.url} is unreachable: {type(e).__name__}: {e}") from None
        try:
            body = resp.json()
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {resp.status_code} without JSON: "
                                  f"{resp.text[:200]}") from None
        if resp.status_code >= 400 or body.get("status") != "success":
            raise PrometheusError(f"Prometheus rejected a query (HTTP {resp.status_code}, {body.get('errorType')}): "
                                  f"{body.get('error')}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise PrometheusError(f"expected a vector from Prometheus, got {data.get('resultType')}")
        return [Sample(r.get("metric") or {}, _number(r["value"][1])) for r in data.get("result") or []]


def _number(text: str) -> float:
    try:
        return float(text)     # Prometheus writes NaN, +Inf and -Inf as such; float() reads them
    except (TypeError, ValueError):
        return math.nan
