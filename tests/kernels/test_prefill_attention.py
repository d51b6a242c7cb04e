import pytest
import torch
import triton

from kernel_cases import DTYPES, LAYOUTS, assert_close, kv_cache_in_layout, make_paged_kv
from semipd.kernels import load_ops
from semipd.kernels.prefill_attention import SMEM_BUDGET, _config, _shared_bytes

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


# Every dtype at head dim 128, and float32 at both GQA extremes; the last sequence is one token after a prefix.
@pytest.mark.parametrize("dtype, group, num_kv_heads", [(torch.float16, 4, 1), (torch.bfloat16, 4, 1),
                                                        (torch.float32, 1, 2), (torch.float32, 8, 1)])
def test_prefill_head_dim_128(dtype, group, num_kv_heads):
    args = _case([7, 20, 1], [30, 20, 9], group, num_kv_heads, 128, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "contiguous"])
def test_prefill_on_strided_kv_cache(layout):
    q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale = _case([13, 19], [13, 40], 4, 2, 64, torch.float16)
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    k_cache, v_cache = kv_cache_in_layout(k_cache, v_cache, layout)
    assert not k_cache.is_contiguous() and not v_cache.is_contiguous()
    args = (q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    assert_close(triton_ops.prefill_attention(*args), expected)
    assert_close(ref.prefill_attention(*args), expected)


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


def test_prefill_rejects_a_head_dim_too_small_for_tl_dot():
    args = _case([3], [3], 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match=r"prefill_attention: head_dim 8 .* need head_dim >= 16"):
        triton_ops.prefill_attention(*args)


@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_prefill_gpu_config_fits_shared_memory(elem_size, head_dim):
    # The compiled (not interpreted) config: float32 at head dim 128 once asked for 256 KB, over the 227 KB an
    # H100/H200 block may use.
    block_m, block_n, warps, stages = _config(head_dim, elem_size, interpreted=False)
    assert _shared_bytes(block_m, block_n, stages, triton.next_power_of_2(head_dim), elem_size) <= SMEM_BUDGET
    assert SMEM_BUDGET < 227 * 1024 and block_m >= 16 and block_n >= 16 and stages >= 1
    if elem_size == 2 and head_dim <= 128:
        assert (block_m, block_n, stages) == (128, 64, 3)  # the tuned half-precision config is kept
