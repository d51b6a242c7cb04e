"""Cross-site: a browser sends text/plain, form and Content-Type-less bodies to any origin without a CORS
preflight. Such a body must be refused with 415 and start no generation, even when it holds valid JSON; JSON
sent as application/json (with or without a charset) is served."""
import json

import httpx
import pytest

pytestmark = pytest.mark.engine

BODIES = {
    "/v1/completions": {"prompt": "cross-site", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "cross-site"}], "max_tokens": 2},
}
SIMPLE_REQUEST_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                        "multipart/form-data; boundary=x", None]


def post(url: str, path: str, content_type: str | None) -> httpx.Response:
    # httpx adds no Content-Type of its own to a bytes body
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(url + path, content=json.dumps(BODIES[path]).encode(), headers=headers, timeout=60)


@pytest.mark.parametrize("path", list(BODIES))
def test_bodies_a_page_can_send_without_preflight_are_refused(default_server, read_metric, path):
    arrivals = read_metric(default_server, "semipd:request_arrivals_total")
    for content_type in SIMPLE_REQUEST_TYPES:
        r = post(default_server.url, path, content_type)
        assert r.status_code == 415, (content_type, r.text)
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    assert read_metric(default_server, "semipd:request_arrivals_total") == arrivals    # nothing was started


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_is_served(default_server, content_type):
    for path in BODIES:
        r = post(default_server.url, path, content_type)
        assert r.status_code == 200, (path, r.text)
