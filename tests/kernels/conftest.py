import os; os.environ["TRITON_INTERPRET"] = "1"  # must precede any triton import: @triton.jit reads it once

# Triton decides between compiling and interpreting when a kernel is decorated, so the variable has to be set
# before semipd.kernels' Triton modules are imported (load_ops("triton") imports them).
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def poison_uninitialized():
    """Every torch.empty in these tests is filled with NaN, so a kernel that skips an output element (or a merge
    that reads an unwritten workspace lane) shows up as NaN in the result."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
