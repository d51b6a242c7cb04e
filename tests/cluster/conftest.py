"""Cluster-tier fixtures shared by the modules that run the operator as a process. Each module provides its own
`kube` (it decides which CRDs to install)."""
import pytest

from semipd.operator import names
from semipd.operator.testing import OperatorProcess

WAIT = 90  # seconds: a bound for the operator to start, not a performance claim


@pytest.fixture
def start_operator(control_plane, kube, namespace, tmp_path):
    """Start (and restart) operators that serve only this test's namespace; stop them all at the end.
    start_operator(log="operator.log", **OperatorProcess options)."""
    procs = []

    def start(log: str = "operator.log", **kwargs) -> OperatorProcess:
        op = OperatorProcess(control_plane.kubeconfig, [namespace], tmp_path / log, **kwargs)
        procs.append(op)
        return op.start(timeout=WAIT)

    yield start
    for op in procs:
        op.stop()
    # With the operator gone nobody would remove kopf's finalizer, and the namespace could never go.
    for item in kube.list(names.API_VERSION, names.PLURAL, namespace):
        kube.merge_patch(names.API_VERSION, names.PLURAL, namespace, item["metadata"]["name"],
                         {"metadata": {"finalizers": None}})
