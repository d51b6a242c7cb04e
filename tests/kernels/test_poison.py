import pytest
import torch

pytestmark = pytest.mark.kernels


def test_uninitialized_outputs_are_poisoned():
    # The kernel tests rely on this: an output element a kernel forgets to write stays NaN.
    assert torch.empty(4).isnan().all()
    assert torch.empty_like(torch.zeros(2, 3, dtype=torch.bfloat16)).isnan().all()
