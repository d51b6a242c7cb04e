"""The admin API: bearer token (401 without, 403 wrong or not configured), 422 with the allowed values for an
impossible split, 200 and a real switch otherwise. GET needs the token too."""
import httpx
import pytest

pytestmark = pytest.mark.engine

TOKEN = "s3cret-admin-token-9f2d"


@pytest.fixture(scope="module")
def admin_server(start_server_module):
    return start_server_module(env={"SEMIPD_ADMIN_TOKEN": TOKEN})


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def partition(server, method="GET", headers=None, **kw) -> httpx.Response:
    return httpx.request(method, server.url + "/admin/partition", headers=headers, timeout=30, **kw)


def test_disabled_without_a_configured_token(default_server):
    for method, kw in (("GET", {}), ("PUT", {"json": {"prefill": 0.5}})):
        r = partition(default_server, method, headers=auth("anything"), **kw)
        assert r.status_code == 403
        error = r.json()["error"]
        assert error["code"] == "admin_disabled"
        assert "--admin-token-file" in error["message"] and "SEMIPD_ADMIN_TOKEN" in error["message"]


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_missing_token_is_401(admin_server, method):
    for headers in (None, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        r = partition(admin_server, method, headers=headers, json={"prefill": 0.5})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_wrong_token_is_403(admin_server, method):
    for token in ("wrong", TOKEN[:-1], TOKEN + "x"):
        r = partition(admin_server, method, headers=auth(token), json={"prefill": 0.5})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "invalid_token"


def test_get_reports_the_split(admin_server):
    r = partition(admin_server, headers=auth())
    assert r.status_code == 200
    body = r.json()
    assert body["prefill_sms"] + body["decode_sms"] == body["total_sms"]
    assert body["prefill_sms"] in body["allowed_prefill_sms"]
    assert {"backend", "granularity", "source", "requested"} <= set(body)


def test_impossible_split_is_422_with_allowed_values(admin_server):
    before = partition(admin_server, headers=auth()).json()
    allowed = before["allowed_prefill_sms"]
    impossible = next(n for n in range(1, before["total_sms"] + 2) if n not in allowed)
    r = partition(admin_server, "PUT", headers=auth(), json={"prefill": impossible})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["allowed_prefill_sms"] == allowed
    assert str(impossible) in error["message"]
    assert partition(admin_server, headers=auth()).json()["prefill_sms"] == before["prefill_sms"]


@pytest.mark.parametrize("body", [b"{not json", b'{"decode": 8}', b'{"prefill": "lots"}', b'{"prefill": true}',
                                  b"[64]"])
def test_malformed_body_is_400(admin_server, body):
    r = partition(admin_server, "PUT", headers=auth() | {"content-type": "application/json"}, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_put_switches_the_split(admin_server, read_metric):
    before = partition(admin_server, headers=auth()).json()
    target = next(n for n in before["allowed_prefill_sms"] if n != before["prefill_sms"])
    r = partition(admin_server, "PUT", headers=auth(), json={"prefill": target})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prefill_sms"] == target
    assert body["decode_sms"] == body["total_sms"] - target
    assert body["source"] == "admin-api"
    assert partition(admin_server, headers=auth()).json()["prefill_sms"] == target
    assert read_metric(admin_server, "semipd:sm_count", phase="prefill") == target
    # the workers keep serving on the new split
    done = httpx.post(admin_server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3,
                                                                  "ignore_eos": True}, timeout=60)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3


def test_fraction_is_rounded_to_an_allowed_split(admin_server):
    r = partition(admin_server, "PUT", headers=auth(), json={"prefill": 0.3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prefill_sms"] in body["allowed_prefill_sms"]
    assert abs(body["prefill_sms"] - 0.3 * body["total_sms"]) <= body["granularity"]


def test_token_never_logged(admin_server):
    partition(admin_server, headers=auth())
    assert "/admin/partition" in admin_server.log()
    assert TOKEN not in admin_server.log()
