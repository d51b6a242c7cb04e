import pytest
import torch

from kernel_cases import DTYPES, assert_close
from semipd.kernels import load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * scale).to(dtype) for scale in (3.0, 2.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: not a power of two, the tail is masked
def test_rms_norm(dtype, tokens, hidden):
    x, _ = _inputs((tokens, hidden), dtype)
    weight = torch.randn(hidden).to(dtype)
    assert_close(triton_ops.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_rms_norm_fused_residual(dtype, tokens):
    x, residual = _inputs((tokens, 128), dtype, seed=3)
    weight = torch.randn(128).to(dtype)
    out, summed = triton_ops.rms_norm(x, weight, 1e-5, residual=residual)
    expected_out, expected_sum = ref.rms_norm(x, weight, 1e-5, residual=residual)
    assert_close(summed, expected_sum)
    assert_close(out, expected_out)


def test_rms_norm_on_heads_of_a_strided_view():
    # Qwen3 normalises each head of q and k, which are slices of the fused qkv projection.
    qkv = torch.randn(3, 6, 32)
    q = qkv[:, :4]
    weight = torch.randn(32)
    assert_close(triton_ops.rms_norm(q, weight, 1e-6), ref.rms_norm(q, weight, 1e-6))


def test_rms_norm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight shape"):
        triton_ops.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
