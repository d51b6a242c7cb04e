import pytest
import torch

from kernel_cases import DTYPES, assert_close
from semipd.kernels import load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, width", [(1, 64), (5, 1500)])  # 1500: several programs per row, masked tail
def test_silu_and_mul(dtype, tokens, width):
    x = (torch.randn(tokens, 2 * width, generator=torch.Generator().manual_seed(4)) * 4).to(dtype)
    assert_close(triton_ops.silu_and_mul(x), ref.silu_and_mul(x))


def test_silu_and_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        triton_ops.silu_and_mul(torch.randn(2, 7))
