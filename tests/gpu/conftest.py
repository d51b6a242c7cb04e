"""GPU-tier fixtures. The benchmark scripts in bench/ are plain scripts, not a package: put bench/ on sys.path so
the tests use the very same probe, check and timing code the scripts run."""
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def device():
    import torch
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def greenctx(device):
    """Every candidate split, built once per module the way the engine builds them."""
    from semipd.runtime.partition import GreenContextBackend
    return GreenContextBackend(device)


@pytest.fixture(scope="module")
def shared(device):
    from semipd.runtime.partition import SharedBackend
    return SharedBackend(device)
