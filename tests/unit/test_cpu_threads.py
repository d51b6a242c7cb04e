"""How the engine shares a CPU between its two workers: a share each while both work, both shares for a worker
whose peer is idle, and OpenMP threads that sleep rather than spin while they wait (set by the CLI)."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from semipd.runtime.config import EngineConfig
from semipd.runtime.engine import Engine
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.unit


def in_fresh_thread(fn):
    """torch thread counts belong to the OS thread that sets them, as in the engine's workers."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", fn()))
    worker.start()
    worker.join()
    return result["value"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    return Engine(EngineConfig(model=str(path), device="cpu", torch_threads=1, max_model_len=256,
                               num_kv_blocks=64))


def test_a_worker_alone_takes_both_shares(engine):
    def decode_step_with_prefill(prefill_busy: bool) -> int:
        engine._busy["prefill"] = prefill_busy
        engine._claim_cores("decode", "prefill", has_work=True)
        return torch.get_num_threads()

    assert in_fresh_thread(lambda: decode_step_with_prefill(False)) == 2
    assert in_fresh_thread(lambda: decode_step_with_prefill(True)) == 1


def test_an_idle_worker_frees_its_share_for_the_peer(engine):
    engine._busy["decode"] = True
    engine._claim_cores("decode", "prefill", has_work=False)
    assert engine._busy["decode"] is False

    def prefill_threads() -> int:
        engine._claim_cores("prefill", "decode", has_work=True)
        return torch.get_num_threads()

    assert in_fresh_thread(prefill_threads) == 2


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_makes_openmp_threads_sleep_unless_the_user_said_otherwise(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, semipd.runtime.cli, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # torch must not be loaded yet: libgomp reads the policy once, when torch loads it
    assert out.stdout.split() == [expected, "False"]
