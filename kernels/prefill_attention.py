"""Paged prefill attention for a variable-length batch, in one launch (also serves chunked prefill).

Layout: q [T, Hq, D] holds every sequence's new tokens back to back, sequence b in rows
cu_seqlens_q[b]:cu_seqlens_q[b+1]. Their keys and values are already in the paged cache
(k_cache/v_cache [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks] int32), after a cached prefix of
seq_lens[b] - q_len tokens. Query i of sequence b sits at position seq_lens[b] - q_len + i and sees cache
positions 0..its own.

FlashAttention-2 style: one program per (sequence, block of BLOCK_M queries, query head) streams the keys it may
see in tiles of BLOCK_N tokens, each token looking up its own page, with an online softmax in float32. The grid
is sized by max_seqlen_q, a host integer, so the launch never reads device memory on the host.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from semipd.kernels.reference import prefill_attention as prefill_attention_reference  # noqa: F401
from semipd.kernels.triton_utils import check_head_dim, check_runnable, compute_dtype, dot_precision, is_interpreted


@triton.jit
def prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr,
                   qk_scale, q_stride_t, q_stride_h, kc_stride_b, kc_stride_o, kc_stride_h,
                   vc_stride_b, vc_stride_o, vc_stride_h, bt_stride, out_stride_t, out_stride_h,
                   block_size, group, head_dim,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    q_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:  # this sequence is shorter than the longest one
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    kv_head = head // group

    i = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < q_len
    d_mask = d < head_dim
    q = tl.load(q_ptr + (q_start + i)[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)
    position = prefix + i

    # Keys beyond the last query of this block are invisible to all of it.
    kv_end = tl.minimum(seq_len, prefix + (q_block + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile_start in range(0, kv_end, BLOCK_N):
        n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = n < kv_end
        block = tl.load(block_tables_ptr + seq * bt_stride + n // block_size, mask=n_mask, other=0).to(tl.int64)
        offset = n % block_size
        k = tl.load(k_cache_ptr + block[None, :] * kc_stride_b + offset[None, :] * kc_stride_o
                    + kv_head * kc_stride_h + d[:, None],
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(COMPUTE)
        v = tl.load(v_cache_ptr + block[:, None] * vc_stride_b + offset[:, None] * vc_stride_o
                    + kv_head * vc_stride_h + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)

        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        visible = n_mask[None, :] & (n[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        # Key 0 is in the first tile and visible to every query, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * out_stride_t + head * out_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & d_mask[None, :])


# What one program may keep in shared memory: H100/H200 allow 227 KB per block; the rest of the headroom is
# for the scratch Triton adds when it converts layouts (e.g. p from the accumulator layout to a dot operand).
SMEM_BUDGET = 160 * 1024


def _shared_bytes(block_m: int, block_n: int, stages: int, block_d: int, elem_size: int) -> int:
    # The Q tile stays resident; each pipeline stage buffers one K and one V tile of BLOCK_N x BLOCK_D.
    return (block_m + 2 * stages * block_n) * block_d * elem_size


def _config(head_dim: int, elem_size: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter pays per tile, not per element: big tiles.

    On a GPU start from 128 x 64 tiles with 3 stages, which fit 2-byte types up to head dim 128
    ((128 + 2*3*64) * 128 * 2 = 128 KB), and shrink while the estimate exceeds SMEM_BUDGET: float32 at head dim
    128 would need (128 + 2*3*64) * 128 * 4 = 256 KB. Stages go first (they only hide latency), then BLOCK_N
    (more loop iterations), then BLOCK_M (more programs); float32 at 128 ends at 128 x 32 with 2 stages, 128 KB.
    """
    if interpreted:
        return 32, 32, 4, 1
    block_d = triton.next_power_of_2(head_dim)
    block_m, block_n, stages = 128, 64, 3
    warps = 4 if head_dim <= 64 else 8
    while _shared_bytes(block_m, block_n, stages, block_d, elem_size) > SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif block_m > 16:  # tl.dot needs M >= 16
            block_m //= 2
        else:
            break
    return block_m, block_n, warps, stages


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q: int,
                      scale: float):
    check_runnable(prefill_kernel, q, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check_head_dim("prefill_attention", head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    for t in (q, k_cache, v_cache, block_tables):
        if t.stride(-1) != 1:
            raise ValueError("prefill_attention needs the last dimension of q, caches and block_tables contiguous")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_seqlen_q <= 0:
        return out
    compute = compute_dtype(prefill_kernel, k_cache.dtype)
    block_m, block_n, warps, stages = _config(head_dim, k_cache.element_size(), is_interpreted(prefill_kernel))
    grid = (batch, triton.cdiv(max_seqlen_q, block_m), num_q_heads)
    prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), k_cache.shape[1], num_q_heads // num_kv_heads, head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        COMPUTE=compute, PRECISION=dot_precision(compute), num_warps=warps, num_stages=stages)
    return out
