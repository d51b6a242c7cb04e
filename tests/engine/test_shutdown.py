"""SIGTERM: new work gets 503, in-flight streams finish within the grace period, the process exits 0."""
import json
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.engine

LONG_CONTEXT = ["--max-model-len", "2048"]


class Stream(threading.Thread):
    """A streaming completion read to its end in the background; `started` is set at the first token chunk."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started = threading.Event()
        self.events: list = []
        self.error: Exception | None = None

    def run(self):
        body = {"prompt": "keep going", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=300) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payload = line[6:]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.started.set()

    @property
    def completion_tokens(self) -> int | None:
        usage = [e["usage"] for e in self.events if isinstance(e, dict) and e.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None


def test_sigterm_drains_in_flight_and_refuses_new(start_server):
    server = start_server(*LONG_CONTEXT, "--graceful-timeout", "120")
    streams = [Stream(server.url, 1500) for _ in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120) and s.error is None, s.error

    server.proc.send_signal(signal.SIGTERM)

    r = httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "shutting_down"
    assert int(r.headers["retry-after"]) >= 1          # and the client may try again (another pod) at once
    assert httpx.get(server.url + "/health", timeout=30).status_code == 503
    assert any(s.is_alive() for s in streams), "the streams ended before the refusal could be checked"

    for s in streams:
        s.join(300)
        assert s.error is None, s.error
        assert s.events[-1] == "[DONE]"
        assert s.completion_tokens == 1500
        assert [e for e in s.events if isinstance(e, dict) and e["choices"]][-1]["choices"][0]["finish_reason"] \
            == "length"
    assert server.proc.wait(60) == 0, server.log()
    assert "shut down cleanly" in server.log()


def test_grace_period_ends_long_requests_with_an_error_and_exits_zero(start_server):
    server = start_server(*LONG_CONTEXT, "--graceful-timeout", "1")
    streams = [Stream(server.url, 2000) for _ in range(2)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(120) and stream.error is None, stream.error
    full = {}
    waiting = threading.Thread(target=lambda: full.update(response=httpx.post(
        server.url + "/v1/completions", json={"prompt": "not streamed", "max_tokens": 2000, "ignore_eos": True},
        timeout=120)))
    waiting.start()
    while server.log().count("max_tokens 2000") < 3:     # the engine has all three requests
        assert server.proc.poll() is None and waiting.is_alive(), server.log()
        time.sleep(0.1)

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()
    for stream in streams:
        stream.join(60)
        assert stream.error is None, stream.error
        # cut short, and said so: an error event, then [DONE], no finish_reason and no usage
        *chunks, error, done = stream.events
        assert done == "[DONE]"
        assert error["error"]["code"] == "shutting_down" and error["error"]["type"] == "service_unavailable"
        assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
        assert stream.completion_tokens is None
    waiting.join(60)
    r = full["response"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert int(r.headers["retry-after"]) >= 1
    log = server.log()
    assert "grace period over" in log
    assert "Traceback" not in log and "Exception" not in log, log

