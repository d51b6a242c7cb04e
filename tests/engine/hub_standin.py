"""A stand-in for the Hugging Face Hub (which this machine cannot reach): the few routes snapshot_download
uses, serving one repository's files from a local directory, and a log of what was asked for. Named as what it
is; tests point HF_ENDPOINT at it."""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStandIn:
    def __init__(self, model_dir: Path, repo: str):
        self.repo = repo
        self.files = {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file()}
        self.commit = hashlib.sha1(b"".join(self.files[k] for k in sorted(self.files))).hexdigest()
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        """Gone: connections are refused from now on."""
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=None, head=False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, value):
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _route(self, head):
                hub.requests.append((self.command, self.path))
                path = self.path.split("?")[0]
                if path.startswith(f"/api/models/{hub.repo}/tree/"):
                    return self._json([{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                       for n, b in hub.files.items()])
                if path.startswith(f"/api/models/{hub.repo}/revision/") or path == f"/api/models/{hub.repo}":
                    return self._json({"id": hub.repo, "sha": hub.commit,
                                       "siblings": [{"rfilename": n} for n in hub.files]})
                repo, _, rest = path.lstrip("/").partition("/resolve/")
                name = rest.partition("/")[2]
                if repo == hub.repo and name in hub.files:
                    body = hub.files[name]
                    return self._send(200, body, {"ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                                                  "X-Repo-Commit": hub.commit}, head)
                self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                           head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        return Handler
