import os

# Triton decides interpret-or-compile when a kernel is decorated, so this must happen before any test module
# imports a kernel. Without a GPU the interpreter is the only way Triton code runs at all.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # reference computations in the test process share 2 cores with the servers under test; more threads only thrash
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run `pytest -m gpu` on an H100/H200)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
