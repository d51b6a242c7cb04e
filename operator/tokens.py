"""Per-service admin tokens, derived from one operator key, so the operator never has to read a Secret it did
not make.

The pods of a SemiPDService read their bearer token from the Secret NAME-admin-token. If the operator had to
read those Secrets back, its RBAC would need `get` on Secrets in every namespace it serves (RBAC cannot name
Secrets whose names it does not know in advance), which is every Secret of the cluster. Instead each token is
HMAC-SHA256(key, namespace/name/uid): the operator computes it, writes it once into the service's Secret (`create`
only, which reveals nothing), and reads one Secret only, its own key, which RBAC names (`resourceNames`).

The object's uid is in the derivation, so a re-created SemiPDService of the same name gets a new token. A
service's Secret deleted by hand comes back with the same token (the pods notice nothing). Rotating the key
changes every token: delete the key Secret and the services' admin Secrets, and the operator makes both anew."""
import base64
import hashlib
import hmac
import secrets

from semipd.operator.kube import ApiError, Kube

KEY_BYTES = 32
KEY_FIELD = "key"
DEFAULT_KEY_SECRET = "semipd-token-key"


class TokenKeyError(Exception):
    """The operator key cannot be read or made; the message says what to fix."""


def derive_admin_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    digest = hmac.new(key, f"{namespace}/{name}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def key_secret_manifest(namespace: str, name: str, key: bytes) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "semipd", "app.kubernetes.io/component": "token-key"}},
            "data": {KEY_FIELD: base64.b64encode(key).decode()}}


def ensure_key(kube: Kube, namespace: str, name: str) -> bytes:
    """The operator key from Secret NAMESPACE/NAME, made (random) when it does not exist. Two operators starting
    at once both end up with the winner's key: the loser's create is a 409 and it reads the winner's."""
    try:
        secret = kube.get_or_none("v1", "secrets", namespace, name)
        if secret is None:
            try:
                kube.create(key_secret_manifest(namespace, name, secrets.token_bytes(KEY_BYTES)), "secrets")
            except ApiError as e:
                if not e.conflict:
                    raise
            secret = kube.get("v1", "secrets", namespace, name)
    except ApiError as e:
        raise TokenKeyError(f"cannot read or create the token key Secret {namespace}/{name}: {e} (the chart's Role "
                        "grants get on exactly this Secret and create in its namespace)") from None
    raw = (secret.get("data") or {}).get(KEY_FIELD)
    key = base64.b64decode(raw) if raw else b""
    if len(key) < 16:
        raise TokenKeyError(f"Secret {namespace}/{name} has no '{KEY_FIELD}' of at least 16 bytes; delete it and the "
                        "operator makes a new one (every service's admin token changes with it)")
    return key
