import pytest
import torch

import triton

from kernel_cases import DTYPES, LAYOUTS, assert_close, kv_cache_in_layout, make_paged_kv
from semipd.kernels import DecodeWorkspace, load_ops
from semipd.kernels.decode_attention import _block_n, choose_num_splits, make_workspace

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")

# A single token, one full block, lengths that end mid-block, and an empty (padded) batch slot.
SEQ_LENS = [1, 16, 37, 0, 50]


def _case(group, num_kv_heads, head_dim, dtype, seq_lens=SEQ_LENS, block_size=16):
    kv = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=group + head_dim)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(7)).to(dtype)
    return q, kv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads", [(1, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(dtype, group, num_kv_heads, num_splits):
    q, kv = _case(group, num_kv_heads, 64, dtype)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    got = triton_ops.decode_attention(*args, num_splits=num_splits)
    assert_close(got, ref.decode_attention(*args))
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # seq_len 0: zeros, not NaN


# Every dtype at head dim 128, and float32 at both GQA extremes; rows: two tiles, one token, empty, mid-tile.
@pytest.mark.parametrize("dtype, group, num_kv_heads", [(torch.float16, 4, 1), (torch.bfloat16, 4, 1),
                                                        (torch.float32, 1, 2), (torch.float32, 8, 1)])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_head_dim_128(dtype, group, num_kv_heads, num_splits):
    q, kv = _case(group, num_kv_heads, 128, dtype, seq_lens=[33, 1, 0, 5])
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 128 ** -0.5)
    got = triton_ops.decode_attention(*args, num_splits=num_splits)
    assert_close(got, ref.decode_attention(*args))
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_spans_several_tiles(dtype):
    # 130 tokens in 2 splits: the first split runs 3 tiles, so its online softmax rescales what it has summed
    # whenever a later tile raises the row maximum; the second ends in a partial tile; the merge joins them.
    seq_lens, num_splits = [130, 70], 2
    tiles = triton.cdiv(seq_lens[0], _block_n(interpreted=True))
    assert triton.cdiv(tiles, num_splits) >= 2, "the tile size changed: lengthen the sequence to keep >1 tile"
    q, kv = _case(4, 1, 64, dtype, seq_lens=seq_lens)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    assert_close(triton_ops.decode_attention(*args, num_splits=num_splits), ref.decode_attention(*args))


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "contiguous"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_on_strided_kv_cache(layout, num_splits):
    q, kv = _case(4, 2, 64, torch.float16)
    expected = ref.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    k_cache, v_cache = kv_cache_in_layout(kv.k_cache, kv.v_cache, layout)
    assert not k_cache.is_contiguous() and not v_cache.is_contiguous()
    args = (q, k_cache, v_cache, kv.block_tables, kv.seq_lens, 0.125)
    assert_close(triton_ops.decode_attention(*args, num_splits=num_splits), expected)
    assert_close(ref.decode_attention(*args), expected)


def test_decode_more_splits_than_tiles():
    # 7 splits over sequences of one or two tiles: most splits are empty and must drop out of the merge.
    q, kv = _case(4, 1, 64, torch.float32, seq_lens=[1, 40])
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    assert_close(triton_ops.decode_attention(*args, num_splits=7), ref.decode_attention(*args))


def test_decode_splits_on_its_own_for_a_small_batch():
    q, kv = _case(4, 1, 64, torch.float32, seq_lens=[70])
    assert choose_num_splits(1, 1, q.device) > 1  # so the default call below takes the split-K path
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    assert_close(triton_ops.decode_attention(*args), ref.decode_attention(*args))


def test_decode_with_preallocated_workspace():
    # A workspace sized for a bigger batch (as for CUDA graphs) and full of NaN from a previous life.
    q, kv = _case(4, 2, 64, torch.float16, seq_lens=[9, 70, 0])
    workspace = DecodeWorkspace(max_batch=8, num_q_heads=8, head_dim=64, max_splits=4)
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    got = triton_ops.decode_attention(*args, workspace=workspace, num_splits=4)
    assert_close(got, ref.decode_attention(*args))


def test_make_workspace_holds_what_the_launcher_picks_and_no_more_than_the_tiles():
    cpu = torch.device("cpu")
    roomy = make_workspace(2, 8, 2, 64, max_seq_len=4096, device=cpu)
    assert roomy.max_splits == choose_num_splits(2, 2, cpu) > 1
    assert (roomy.max_batch, roomy.num_q_heads, roomy.head_dim) == (2, 8, 64)
    # 40 tokens are 2 tiles under the interpreter: a third split would never have work.
    assert make_workspace(1, 4, 1, 64, max_seq_len=40, device=cpu).max_splits == 2
    # A batch smaller than the workspace's runs on it, split as far as the workspace allows (3, not 4).
    workspace = make_workspace(3, 4, 1, 64, max_seq_len=128, device=cpu)
    assert workspace.max_splits == 3 < choose_num_splits(2, 1, cpu)
    workspace.partial_out.fill_(float("nan"))
    q, kv = _case(4, 1, 64, torch.float32, seq_lens=[9, 70])
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    assert_close(triton_ops.decode_attention(*args, workspace), ref.decode_attention(*args))


def test_decode_rejects_a_workspace_too_small():
    q, kv = _case(4, 2, 64, torch.float32, seq_lens=[9, 9, 9])
    workspace = DecodeWorkspace(max_batch=2, num_q_heads=8, head_dim=64, max_splits=4)
    with pytest.raises(ValueError, match="cannot serve batch=3"):
        triton_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125,
                                    workspace=workspace, num_splits=2)


def test_split_count_depends_on_batch_shape_only():
    cpu = torch.device("cpu")
    assert choose_num_splits(1, 8, cpu, max_splits=16) == 1  # 8 programs already fill 2 waves of 4 SMs
    assert choose_num_splits(1, 1, cpu, max_splits=5) == 5  # capped by the workspace
    assert choose_num_splits(256, 8, cpu) == 1


def test_decode_rejects_bad_gqa_ratio():
    q, kv = _case(1, 3, 64, torch.float32, seq_lens=[4])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_ops.decode_attention(q[:, :2], kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0)


def test_decode_rejects_a_head_dim_too_small_for_tl_dot():
    q, kv = _case(1, 1, 8, torch.float32, seq_lens=[4])
    with pytest.raises(ValueError, match=r"decode_attention: head_dim 8 .* need head_dim >= 16"):
        triton_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0)
