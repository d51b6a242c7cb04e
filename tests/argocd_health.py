"""Runs the chart's Argo CD health check (charts/semipd/files/argocd-health.lua) the way Argo CD does: in
gopher-lua, Argo CD's Lua interpreter, with the object as `obj` (tests/luahealth/, built once from the Go module
proxy and cached like the control plane)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "charts" / "semipd" / "files" / "argocd-health.lua"
SOURCE = REPO / "tests" / "luahealth"


def runner() -> Path:
    import cluster_harness
    digest = hashlib.sha256(b"".join((SOURCE / f).read_bytes() for f in ("main.go", "go.mod", "go.sum")))
    binary = Path(os.environ.get("SEMIPD_CACHE", Path.home() / ".cache" / "semipd")) / "luahealth" / \
        digest.hexdigest()[:16] / "luahealth"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(["go", "build", "-trimpath", "-o", str(binary) + ".tmp", "."], cwd=SOURCE,
                               capture_output=True, text=True)
        if built.returncode != 0:
            cluster_harness.unavailable(f"cannot build tests/luahealth (Go and the module proxy): {built.stderr}")
        os.replace(str(binary) + ".tmp", binary)
    return binary


def health(obj: dict) -> dict:
    """{"status": Healthy|Progressing|Degraded|Suspended, "message": ...} as Argo CD would show it."""
    out = subprocess.run([str(runner()), str(SCRIPT)], input=json.dumps(obj), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)
