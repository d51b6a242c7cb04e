import pytest
import torch

from kernel_cases import DTYPES, assert_close, make_paged_kv
from semipd.kernels import load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


def _case(q_lens, seq_lens, group, num_kv_heads, head_dim, dtype, block_size=16):
    """Sequence b has seq_lens[b] tokens in the cache, of which the last q_lens[b] are the new queries."""
    kv = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=sum(seq_lens) + group)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(5)).to(dtype)
    return (q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, max(q_lens), head_dim ** -0.5)


# A fresh prompt ending mid-block, a chunk after a 21-token cached prefix, a single new token after a prefix,
# a one-token prompt, and a prompt spanning two query blocks of the interpreter config (BLOCK_M 32).
Q_LENS = [13, 19, 1, 1, 40]
SEQ_LENS = [13, 40, 18, 1, 40]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads", [(1, 2), (4, 1), (8, 1)])
def test_prefill_matches_reference(dtype, group, num_kv_heads):
    args = _case(Q_LENS, SEQ_LENS, group, num_kv_heads, 64, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_head_dim_128(dtype):
    args = _case([7, 20], [30, 20], 4, 1, 128, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


def test_prefill_block_size_not_a_tile_multiple():
    # Pages of 5 tokens: tiles of 32 straddle pages, every token looks up its own.
    args = _case([9, 12], [23, 12], 4, 2, 64, torch.float32, block_size=5)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


def test_prefill_last_query_equals_decode():
    # The last query of a prefill sees the whole sequence: the same answer decode gives for that token.
    q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale = _case([6, 11], [20, 11], 4, 1, 64, torch.float32)
    out = triton_ops.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    last = (cu[1:] - 1).long()
    decoded = ref.decode_attention(q[last], k_cache, v_cache, tables, seq_lens, scale)
    assert_close(out[last], decoded)
