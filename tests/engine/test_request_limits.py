"""One request must not stall or endanger the others: a body over --max-request-body-mib (16 MiB by default) is
refused with 413 before it is read, and a huge prompt is parsed and tokenized off the event loop, so /health
and running streams keep answering while it is."""
import http.client
import json
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.engine

DEFAULT_LIMIT = 16 * 2**20        # default_server runs with the default --max-request-body-mib
STEADY_ANSWERS = 5                # answers that must arrive while the huge prompt is being handled


def raw_post(url: str, path: str, headers: dict[str, str], body_parts) -> tuple[int, dict]:
    """POST over a bare socket, so a body can be announced or sent only in part; the status and JSON body."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        for part in body_parts:
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def chunked(total: int, piece: int = 1 << 16):
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield f"{n:x}\r\n".encode() + b" " * n + b"\r\n"
        sent += n


def assert_too_large(status: int, body: dict):
    assert status == 413, body
    error = body["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "16 MiB" in error["message"] and "--max-request-body-mib" in error["message"]


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(default_server):
    # only the headers and a few bytes go out: the answer must not wait for the 17 MiB announced
    status, body = raw_post(default_server.url, "/v1/completions",
                            {"Content-Type": "application/json", "Content-Length": str(DEFAULT_LIMIT + 2**20)},
                            [b'{"prompt": "'])
    assert_too_large(status, body)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(default_server):
    status, body = raw_post(default_server.url, "/v1/chat/completions",
                            {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                            chunked(DEFAULT_LIMIT + 1))
    assert_too_large(status, body)
    ok = httpx.post(default_server.url + "/v1/completions", json={"prompt": "still here", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200, ok.text


class Streams(threading.Thread):
    """Long streams one after another until stopped, counting the token chunks received."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.chunks, self.errors = url, 0, []
        self.stop, self.running = threading.Event(), threading.Event()

    def run(self):
        body = {"prompt": "keep streaming", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    with client.stream("POST", self.url + "/v1/completions", json=body) as r:
                        r.raise_for_status()
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                self.chunks += 1
                                self.running.set()
                            if self.stop.is_set():
                                break
                except Exception as exc:      # noqa: BLE001 - reported by the test
                    self.errors.append(repr(exc))
                    self.running.set()
                    return


def test_health_and_streams_keep_answering_while_a_huge_prompt_is_tokenized(default_server):
    url = default_server.url
    prompt = " ".join(f"word{i % 9973}" for i in range(400_000))       # ~4 MB: seconds of tokenizing
    data = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    assert len(data) < DEFAULT_LIMIT
    uploaded, answered = threading.Event(), threading.Event()
    huge: dict = {}

    def body():
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + (1 << 16)]
        uploaded.set()          # httpx asks for more only once the last piece is written

    def send_huge():
        try:
            huge["response"] = httpx.post(url + "/v1/completions", content=body(),
                                          headers={"Content-Type": "application/json"}, timeout=300)
        finally:
            answered.set()

    streams = Streams(url)
    streams.start()
    try:
        assert streams.running.wait(120) and not streams.errors, streams.errors
        sender = threading.Thread(target=send_huge, daemon=True)
        sender.start()
        assert uploaded.wait(120)
        chunks_before, health_answers = streams.chunks, []
        with httpx.Client(timeout=120) as client:
            while not answered.is_set():
                status = client.get(url + "/health").status_code
                if not answered.is_set():
                    health_answers.append(status)
        chunks_meanwhile = streams.chunks - chunks_before
        sender.join(60)
    finally:
        streams.stop.set()
        streams.join(120)
    r = huge["response"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert set(health_answers) <= {200}, health_answers
    assert len(health_answers) >= STEADY_ANSWERS, "/health froze while the huge prompt was handled"
    assert chunks_meanwhile >= STEADY_ANSWERS, "the running stream froze while the huge prompt was handled"
    assert not streams.errors, streams.errors
