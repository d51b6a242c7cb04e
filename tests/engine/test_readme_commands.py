"""README's commands against a real `semipd serve`, as a user pastes them: the curl of "Two commands", the
OpenAI client example, the admin API's curls, `--partition-policy slo`, and `semipd tiny-model` then serve.
The only edit is the port (each server here gets a free one; README's is 8000) and, for tiny-model, the folder.
The commands that only start long work (`semipd bench`, `simulate`) are parsed in tests/unit/test_docs_reference.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from doc_snippets import blocks, shell_commands  # noqa: E402

pytestmark = pytest.mark.engine


def readme_block(lang: str, marker: str) -> str:
    [found] = [b.text for b in blocks("README.md", {lang}) if marker in b.text]
    return found


def on_port(text: str, port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{port}", text)


def bash(script: str, env: dict | None = None) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{script}\n--- exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def admin_token() -> str:
    return re.search(r"export SEMIPD_ADMIN_TOKEN=(\S+)", readme_block("bash", "admin/partition")).group(1)


@pytest.fixture(scope="module")
def readme_server(start_server_module):
    """One server for the blocks that only send requests, started with README's admin token in its env."""
    return start_server_module(env={"SEMIPD_ADMIN_TOKEN": admin_token()})


def test_the_try_it_curl_and_the_openai_client_example(readme_server):
    port = port_of(readme_server)
    reply = json.loads(bash(on_port(readme_block("bash", "v1/chat/completions"), port)))
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1

    example = on_port(readme_block("python", "from openai import OpenAI"), port)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README.md (OpenAI clients)", "exec"), {})
    assert "completion_tokens=" in printed.getvalue()   # the usage chunk the example prints last


def test_the_admin_partition_curls(readme_server):
    out = bash(on_port(readme_block("bash", "admin/partition"), port_of(readme_server)))
    bodies = json.loads("[" + out.replace("}{", "},{") + "]")    # each curl prints one body, no newline
    assert [b.get("error") for b in bodies] == [None, None], bodies
    got, put = bodies
    assert got["policy"] == "external" and abs(got["prefill_fraction"] - 0.5) < 0.05
    assert put["source"] == "admin-api" and abs(put["prefill_fraction"] - 0.25) < 0.1, put


def test_the_slo_policy_command(start_server):
    [command] = shell_commands(readme_block("bash", "--partition-policy slo"))
    argv = shlex.split(command)
    assert argv[:2] == ["semipd", "serve"]
    server = start_server(*argv[2:], env={"SEMIPD_ADMIN_TOKEN": "t"})
    split = httpx.get(server.url + "/admin/partition", headers={"Authorization": "Bearer t"}, timeout=10).json()
    assert split["policy"] == "slo" and split["source"] == "default", split


def test_tiny_model_then_serve(start_server_without_model, tmp_path):
    [command] = shell_commands(readme_block("bash", "semipd tiny-model"))
    make, serve = command.split(" && ")
    bash(make.replace("semipd ", f"{shlex.quote(sys.executable)} -m semipd.runtime.cli ", 1)
         .replace("/tmp/tiny-qwen3", str(tmp_path / "tiny-qwen3")), env={"HF_HUB_OFFLINE": "1"})
    argv = shlex.split(serve.replace("/tmp/tiny-qwen3", str(tmp_path / "tiny-qwen3")))
    port_flag = argv.index("--port")
    del argv[port_flag:port_flag + 2]                      # README's 8001: any free port here
    server = start_server_without_model(*argv[2:])
    [card] = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert card["id"] == "tiny-qwen3"
