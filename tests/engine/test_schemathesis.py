"""The server against its own OpenAPI document: schemathesis (a property-based API tester) generates requests
for every operation, valid and invalid, and checks that none gets a 5xx and every response matches the
document (status, content type, body schema). Bounded: 10 examples per operation and phase, a fixed seed."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def test_no_generated_request_gets_a_server_error_or_an_undocumented_response(start_server, tmp_path):
    server = start_server("--max-model-len", "256")
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    run = subprocess.run(
        [st, "run", server.url + "/openapi.json", "--checks",
         "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
         "--max-examples", "10", "--seed", "1", "--request-timeout", "120", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "generated" in run.stdout and "Traceback" not in server.log(), report
