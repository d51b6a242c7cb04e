"""A small dict-in, dict-out Kubernetes REST client over the official client's ApiClient (its connection, TLS and
auth handling), so builders can stay plain dicts and one apply path serves every kind, PodMonitor included."""
import json
import urllib.parse
from dataclasses import dataclass

from kubernetes.client import ApiClient

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """A non-2xx answer. `message` is the API server's own explanation (from its Status body)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        # 422: the object fails validation; 400: it cannot even be decoded. Retrying either cannot help.
        return self.status in (400, 422)


def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """/api/v1/namespaces/ns/services/name or /apis/apps/v1/namespaces/ns/deployments/name[/status]."""
    parts = ["/api" if "/" not in api_version else "/apis", api_version]
    if namespace:
        parts += ["namespaces", namespace]
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


@dataclass
class Kube:
    api: ApiClient
    field_manager: str = "semipd-operator"
    timeout: float = 30.0

    def request(self, method: str, url_path: str, body=None, query: dict | None = None,
                content_type: str = "application/json", accept: str = "application/json") -> dict:
        if query:
            url_path += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": accept, "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=url_path, header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
        raw = resp.read() or b""
        if resp.status >= 400:
            raise _error(resp.status, resp.reason or "", raw)
        return json.loads(raw) if raw else {}

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict:
        return self.request("GET", path(api_version, plural, namespace, name))

    def get_or_none(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self.get(api_version, plural, namespace, name)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return self.request("GET", path(api_version, plural, namespace), query=query).get("items", [])

    def create(self, obj: dict, plural: str) -> dict:
        meta = obj["metadata"]
        return self.request("POST", path(obj["apiVersion"], plural, meta.get("namespace")), body=obj)

    def apply(self, obj: dict, plural: str) -> dict:
        """Server-side apply, forcing ownership: the operator is the one writer of what it declares, and fields it
        stops declaring are removed. A no-op apply writes nothing, so repeating it is free and rolls nothing."""
        meta = obj["metadata"]
        return self.request("PATCH", path(obj["apiVersion"], plural, meta.get("namespace"), meta["name"]),
                            body=obj, content_type=APPLY,
                            query={"fieldManager": self.field_manager, "force": "true"})

    def merge_patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: dict,
                    subresource: str | None = None) -> dict:
        return self.request("PATCH", path(api_version, plural, namespace, name, subresource), body=patch,
                            content_type=MERGE, query={"fieldManager": self.field_manager})

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict:
        return self.request("DELETE", path(api_version, plural, namespace, name))


def _error(status: int, reason: str, raw: bytes) -> ApiError:
    try:
        body = json.loads(raw)
        message = body.get("message") or raw.decode(errors="replace")
        reason = body.get("reason") or reason
    except ValueError:
        message = raw.decode(errors="replace").strip()
    return ApiError(status, reason, message)
