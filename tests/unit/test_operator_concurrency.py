"""No thread waits on a service's slow pods: background passes coalesce into the running one, and the split
pushes of one pass run side by side."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from semipd.operator import pods
from semipd.operator.handlers import Passes

pytestmark = pytest.mark.unit


def test_a_background_trigger_never_waits_and_the_running_pass_goes_round_again():
    passes, inside, release, runs = Passes(), threading.Event(), threading.Event(), []

    def slow_pass():
        runs.append(len(runs))
        if len(runs) == 1:
            inside.set()
            release.wait(30)

    first = threading.Thread(target=passes.run, args=(("ns", "svc"), slow_pass, True))
    first.start()
    assert inside.wait(30)
    returned = threading.Event()
    threading.Thread(target=lambda: (passes.run(("ns", "svc"), slow_pass, False), returned.set())).start()
    assert returned.wait(30) and len(runs) == 1       # came back at once, while the first pass is still inside
    other = []
    passes.run(("ns", "other"), lambda: other.append(1), False)
    assert other == [1]                              # another service is not held up either
    release.set()
    first.join(30)
    assert runs == [0, 1]                            # the running pass went round once more for the trigger


def test_a_failing_pass_lets_go():
    passes = Passes()
    with pytest.raises(RuntimeError):
        passes.run(("ns", "svc"), lambda: (_ for _ in ()).throw(RuntimeError("boom")), True)
    ran = []
    passes.run(("ns", "svc"), lambda: ran.append(1), False)
    assert ran == [1]


def test_split_pushes_run_side_by_side():
    """A stand-in admin endpoint (named so: only its concurrency matters here) answers no push until all four
    are in flight at once; pushed one after another, each would time out."""
    barrier = threading.Barrier(4, timeout=20)

    class Admin(BaseHTTPRequestHandler):
        def do_PUT(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                self.send_response(504)
                self.end_headers()
                return
            data = json.dumps({"prefill_sms": round(body["prefill"] * 132)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        results = pods.push_all([("127.0.0.1", f) for f in (0.25, 0.5, 0.6, 0.75)], port, "t", timeout=30)
    finally:
        server.shutdown()
    assert [r.ok for r in results] == [True] * 4
    assert [r.prefill_sms for r in results] == [33, 66, 79, 99]
