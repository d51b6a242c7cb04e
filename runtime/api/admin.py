"""The admin API: GET and PUT /admin/partition, the prefill/decode split, behind a bearer token.

GET needs the token like PUT (the operator has it anyway, and the split plus the allowed values say more about
the deployment than /metrics). PUT obeys only under --partition-policy external; static and slo answer 409,
since the split then has another owner (nobody, or the in-engine policy). The token file is followed
(runtime/admin_token.py)."""
import hmac
import json
import logging

from fastapi import APIRouter, Request

from semipd.runtime.api.bodies import json_body
from semipd.runtime.api.context import ServerContext, context
from semipd.runtime.partition import PartitionError
from semipd.runtime.protocol import APIError, bad_request

log = logging.getLogger("semipd.server")

POLICY_OWNS_SPLIT = {      # why a PUT cannot move the split, and how to make it possible
    "static": "the partition policy is static: the split stays at its start-up value; start the server with "
              "--partition-policy external to set it through this API (or change --sm-split and restart)",
    "slo": "the split is owned by the in-engine SLO policy (--partition-policy slo); start the server with "
           "--partition-policy external to set it through this API",
}

router = APIRouter()


@router.get("/admin/partition")
async def get_partition(request: Request):
    ctx = authorized(request)
    state = {**ctx.engine.partition.get(), "policy": ctx.policy}
    if ctx.engine.slo_loop is not None:
        state["decision"] = ctx.engine.slo_loop.last   # the in-engine policy's latest decision and its reason
    return state


@router.put("/admin/partition")
async def put_partition(request: Request):
    ctx = authorized(request)
    if ctx.policy != "external":
        raise APIError(409, POLICY_OWNS_SPLIT[ctx.policy], type="conflict_error",
                       code=f"partition_policy_{ctx.policy}")
    value = parse_partition(await json_body(request))
    try:
        result = ctx.engine.partition.set(value, source="admin-api")
    except PartitionError as e:
        raise APIError(422, str(e), param="prefill", code="impossible_partition",
                       extra={"allowed_prefill_sms": list(e.allowed)}) from None
    except ValueError as e:
        raise bad_request(f"prefill: {e}", "prefill") from None
    log.info("partition set by admin API: %s", {k: result.get(k) for k in ("prefill_sms", "decode_sms")})
    return {**result, "policy": ctx.policy}


def authorized(request: Request) -> ServerContext:
    """The context, once the request has shown the admin token (403 or 401 otherwise)."""
    ctx = context(request)
    token = ctx.admin_token.current()
    if not token:
        raise APIError(403, "the admin API is disabled; start the server with --admin-token-file PATH or "
                            "SEMIPD_ADMIN_TOKEN to enable it", type="permission_error", code="admin_disabled")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "missing bearer token (Authorization: Bearer <admin token>)",
                       type="authentication_error", code="missing_token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(403, "wrong admin token", type="permission_error", code="invalid_token")
    return ctx


def parse_partition(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict) or set(data) != {"prefill"}:
        raise bad_request('body must be {"prefill": <SMs as an integer, or a fraction in (0, 1)>}', "prefill")
    value = data["prefill"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request("prefill: must be a number (SMs, or a fraction in (0, 1))", "prefill")
    return {"prefill": value}
