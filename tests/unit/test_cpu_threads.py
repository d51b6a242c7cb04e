"""How the engine shares a CPU between its two workers (runtime/cpu_threads.py): a share each while both work,
decode alone takes the cores the OpenMP helper budget leaves, prefill never grows, and no OpenMP team outlives
model loading."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from semipd.runtime.config import EngineConfig
from semipd.runtime.cpu_threads import CoreShares, core_shares, in_own_thread
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


@pytest.mark.parametrize("cores,flag,expected", [
    (2, None, CoreShares(1, 1, 2)),
    (4, None, CoreShares(2, 2, 3)),
    (16, None, CoreShares(8, 8, 9)),
    (8, 2, CoreShares(2, 2, 7)),
    (2, 2, CoreShares(2, 2, 2)),        # the user asked for more than the cores: decode never shrinks alone
    (1, None, CoreShares(1, 1, 1)),
])
def test_core_shares(cores, flag, expected):
    shares = core_shares(flag, cores=cores)
    assert shares == expected
    if 2 * shares.prefill <= cores:
        # libgomp keeps spinning only while 1 + the helpers of every team (size - 1) stay within the cores
        assert 1 + (shares.prefill - 1) + (shares.decode_alone - 1) <= cores


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    return Engine(EngineConfig(model=str(path), device="cpu", torch_threads=1, max_model_len=256,
                               num_kv_blocks=64))


def test_decode_alone_takes_the_cores_prefill_leaves(engine):
    def decode_step_with_prefill(prefill_busy: bool) -> int:
        engine._busy["prefill"] = prefill_busy
        engine._claim_cores("decode", "prefill", has_work=True)
        return torch.get_num_threads()

    assert in_fresh_thread(lambda: decode_step_with_prefill(False)) == engine._cores.decode_alone
    assert in_fresh_thread(lambda: decode_step_with_prefill(True)) == 1


def test_prefill_keeps_its_share_even_alone(engine):
    engine._busy["decode"] = False

    def prefill_threads() -> int:
        torch.set_num_threads(5)
        engine._claim_cores("prefill", "decode", has_work=True)
        return torch.get_num_threads()

    assert in_fresh_thread(prefill_threads) == 1
    assert engine._busy["prefill"] is True
    engine._claim_cores("prefill", "decode", has_work=False)
    assert engine._busy["prefill"] is False


def test_in_own_thread_returns_and_raises():
    assert in_own_thread(lambda a, b=0: threading.current_thread() is not threading.main_thread() and a + b,
                         2, b=3) == 5
    with pytest.raises(KeyError, match="missing"):
        in_own_thread(lambda: {}["missing"])


LOADING = textwrap.dedent("""
    import os, sys, time
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.engine import Engine
    from semipd.runtime.tiny_model import write_tiny_model

    def threads():
        return len(os.listdir("/proc/self/task"))

    path = write_tiny_model(sys.argv[1])
    before = threads()
    engine = Engine(EngineConfig(model=str(path), device="cpu", max_model_len=256, num_kv_blocks=64))
    deadline = time.monotonic() + 20        # a released helper exits on its own time
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    print(before, threads())
""")


def test_no_openmp_team_outlives_model_loading(tmp_path):
    # OMP_NUM_THREADS=2: loading runs teams of two whatever the machine, so a team left on the main thread
    # would keep its helper thread alive (and make libgomp stop spinning once the workers run theirs)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", LOADING, str(tmp_path / "tiny")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before
