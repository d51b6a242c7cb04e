import pytest
import torch

from kernel_cases import DTYPES, assert_close
from semipd.kernels import build_cos_sin_cache, load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(4, 4, 64), (8, 1, 128), (4, 1, 64)])
@pytest.mark.parametrize("positions", [[0, 1, 4095, 777, 3], [777]], ids=["5 tokens", "1 token"])
def test_rotary_matches_reference(dtype, num_q_heads, num_kv_heads, head_dim, positions):
    cache = build_cos_sin_cache(head_dim, 4096, 500000.0,
                                {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    gen = torch.Generator().manual_seed(2)
    positions = torch.tensor(positions)
    # q and k come out of one fused projection: strided views, not contiguous tensors.
    qkv = torch.randn(len(positions), num_q_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    q, k = qkv[:, :num_q_heads], qkv[:, num_q_heads:num_q_heads + num_kv_heads]
    before = qkv.clone()
    got_q, got_k = triton_ops.rotary_embedding(positions, q, k, cache)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    assert_close(got_q, want_q)
    assert_close(got_k, want_k)
    assert torch.equal(qkv, before)  # inputs untouched: the contract returns new tensors


def test_rotary_position_zero_is_identity():
    cache = build_cos_sin_cache(64, 8, 10000.0)
    q, k = torch.randn(2, 2, 64), torch.randn(2, 1, 64)
    got_q, got_k = triton_ops.rotary_embedding(torch.zeros(2, dtype=torch.int64), q, k, cache)
    assert_close(got_q, q)
    assert_close(got_k, k)
