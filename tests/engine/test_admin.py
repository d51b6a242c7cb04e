"""The admin API: bearer token (401 without, 403 wrong or not configured), 422 with the allowed values for an
impossible split, 200 and a real switch otherwise. GET needs the token too. The serve flags that feed it:
--admin-token-file, --sm-split, --partition-backend and --partition-file."""
import time

import httpx
import pytest

pytestmark = pytest.mark.engine

TOKEN = "s3cret-admin-token-9f2d"


@pytest.fixture(scope="module")
def admin_server(start_server_module):
    # on CPU even where a GPU exists: the tests check the cpu stand-in's exact splits
    return start_server_module("--device", "cpu", env={"SEMIPD_ADMIN_TOKEN": TOKEN})


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
    # nothing has written a split yet (earlier tests only send refused requests): the cpu stand-in's default,
    # the middle of the Hopper candidates
    r = partition(admin_server, headers=auth())
    assert r.status_code == 200
    body = r.json()
    assert (body["backend"], body["total_sms"], body["granularity"]) == ("cpu", 132, 8)
    assert body["allowed_prefill_sms"] == list(range(8, 121, 8))
    assert (body["prefill_sms"], body["decode_sms"], body["prefill_fraction"]) == (64, 68, round(64 / 132, 4))
    assert (body["source"], body["requested"]) == ("default", None)
    assert body["applied"] == {"prefill": 64, "decode": 68}
    assert body["switches"] == 0
    assert body["policy"] == "external"          # the default: this API and the partition file own the split


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


@pytest.mark.parametrize("value", [1.5, -0.25, 0])
def test_a_share_outside_the_device_is_422_with_allowed_values(admin_server, value):
    before = partition(admin_server, headers=auth()).json()
    r = partition(admin_server, "PUT", headers=auth(), json={"prefill": value})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "impossible_partition"
    assert error["allowed_prefill_sms"] == before["allowed_prefill_sms"] != []
    assert partition(admin_server, headers=auth()).json()["prefill_sms"] == before["prefill_sms"]


@pytest.mark.parametrize("body", [b"{not json", b'{"decode": 8}', b'{"prefill": "lots"}', b'{"prefill": true}',
                                  b"[64]", b'{"prefill": NaN}'])
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


FILE_TOKEN = "t0ken-from-a-file-71c3"


@pytest.fixture(scope="module")
def flag_server(start_server_module, tmp_path_factory):
    """A server configured by flags only: token file, initial split, cpu backend, watched partition file (empty
    at start, as the downward-API file is before the annotation exists)."""
    root = tmp_path_factory.mktemp("flags")
    token_file = root / "admin-token"
    token_file.write_text(FILE_TOKEN + "\n")
    partition_file = root / "sm-partition"
    partition_file.write_text("")
    server = start_server_module("--device", "cpu", "--admin-token-file", str(token_file), "--sm-split",
                                 "prefill=32", "--partition-backend", "cpu", "--partition-file", str(partition_file))
    return server, partition_file


def test_admin_token_file_is_the_token(flag_server):
    server, _ = flag_server
    assert partition(server, headers=auth(FILE_TOKEN)).status_code == 200
    for token in (TOKEN, FILE_TOKEN + "x", FILE_TOKEN[:-1]):
        for method in ("GET", "PUT"):
            r = partition(server, method, headers=auth(token), json={"prefill": 16})
            assert r.status_code == 403, (token, method, r.text)
    assert FILE_TOKEN not in server.log()


def test_cli_split_then_partition_file_then_admin_api(flag_server):
    server, partition_file = flag_server
    state = partition(server, headers=auth(FILE_TOKEN)).json()
    assert (state["backend"], state["prefill_sms"], state["decode_sms"]) == ("cpu", 32, 100)
    assert (state["source"], state["requested"]) == ("cli", "prefill=32")

    partition_file.write_text("prefill=96")
    deadline = time.monotonic() + 30
    while (state["prefill_sms"], state["source"]) != (96, "partition-file"):
        assert time.monotonic() < deadline, f"the partition file was not applied: {state}"
        time.sleep(0.2)
        state = partition(server, headers=auth(FILE_TOKEN)).json()

    r = partition(server, "PUT", headers=auth(FILE_TOKEN), json={"prefill": 40})
    assert r.status_code == 200, r.text
    time.sleep(1.5)                      # several watcher polls: the unchanged file must not take it back
    state = partition(server, headers=auth(FILE_TOKEN)).json()
    assert (state["prefill_sms"], state["source"]) == (40, "admin-api")
