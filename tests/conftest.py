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


# The control plane the cluster and system tiers share (tests/cluster_harness.py). The fixtures live here, at
# the root, so both folders see them and one pytest run starts ONE control plane; the harness module (and the
# kubernetes client) is imported only when a test asks for one, so the unit tier stays quick.
@pytest.fixture(scope="session")
def control_plane(request, tmp_path_factory):
    """A real kube-apiserver + etcd (+ kube-controller-manager) on loopback, one per session; skips (fails under
    SEMIPD_REQUIRE_CLUSTER=1) when it cannot be had here."""
    import cluster_harness
    yield from cluster_harness.run_control_plane(request, tmp_path_factory)


@pytest.fixture
def namespace(control_plane) -> str:
    """A fresh namespace per test, deleted afterwards."""
    import cluster_harness
    yield from cluster_harness.fresh_namespace(control_plane)
