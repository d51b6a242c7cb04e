"""Paged prefill attention for a variable-length batch, in one launch (also serves chunked prefill).

Layout: q [T, Hq, D] holds every sequence's new tokens back to back, sequence b in rows
cu_seqlens_q[b]:cu_seqlens_q[b+1]. Their keys and values are already in the paged cache
(k_cache/v_cache [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks] int32), after a cached prefix of
seq_lens[b] - q_len tokens. Query i of sequence b sits at position seq_lens[b] - q_len + i and sees cache
positions 0..its own.

FlashAttention-2 style: one program per (sequence, block of query tokens, KV head) streams the keys it may see in
tiles of BLOCK_N tokens, each token looking up its own page, with an online softmax in float32.

- GQA packing: the program serves every one of the G = Hq/Hkv query heads that read its KV head. The M axis of
  its tile flattens (query token, head in group): row r is token r // G, head kv_head * G + r % G, so BLOCK_M
  rows hold BLOCK_M // G tokens and each K/V tile loaded is multiplied against all G heads at once rather
  than fetched once per head by G programs. The work per loaded tile is BLOCK_M rows either way, so a long
  prompt moves about as many K/V bytes as a per-head kernel with BLOCK_M-token tiles; the gain is in short
  query blocks (a chunk of a few tokens after a long cached prefix, or one token), whose K/V stream is read
  once per KV head instead of once per query head, and whose MMAs have G times more live rows.
- G need not be a power of two (Qwen: 14 query / 2 KV heads, G = 7): the rows past the last whole token,
  BLOCK_M - (BLOCK_M // G) * G of them (2 of 128 at G = 7), are masked out; no head is padded.
- The causal mask compares each key with its row's token position, so all heads of a token see the same keys.
  A block spans BLOCK_M // G tokens (32 at G = 4), so it also computes less of the masked-out corner of the
  causal triangle than a block of BLOCK_M tokens would.
- The grid is sized by max_seqlen_q, a host integer, so the launch never reads device memory on the host.
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
                   block_size, head_dim,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    # Query tokens per program: whole tokens only, every head of a token in the same tile.
    BLOCK_T: tl.constexpr = BLOCK_M // GROUP
    seq = tl.program_id(0).to(tl.int64)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if q_block * BLOCK_T >= q_len:  # this sequence is shorter than the longest one
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    token = r // GROUP  # within this block; BLOCK_T for the spare rows when G does not divide BLOCK_M
    i = q_block * BLOCK_T + token  # query index within the sequence
    head = kv_head * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    row_mask = (token < BLOCK_T) & (i < q_len)
    d_mask = d < head_dim
    # For contiguous q the G heads of a token are adjacent, so each token's rows are one run of G * D elements.
    q = tl.load(q_ptr + (q_start + i)[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)
    position = prefix + i

    # Keys beyond the last query of this block are invisible to all of it.
    kv_end = tl.minimum(seq_len, prefix + (q_block + 1) * BLOCK_T)
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
        # Key 0 is in the first tile and visible to every row (masked rows included: their position is past
        # it), so m_new is finite from the first tile on and no row ever computes exp2(-inf - -inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# What one program may keep in shared memory: H100/H200 allow 227 KB per block; the rest of the headroom is
# for the scratch Triton adds when it converts layouts (e.g. p from the accumulator layout to a dot operand).
SMEM_BUDGET = 160 * 1024
MIN_DOT_M = 16  # tl.dot needs M >= 16


def _min_rows(group: int) -> int:
    # A tile holds at least one whole token, all G heads of it.
    return max(MIN_DOT_M, triton.next_power_of_2(group))


def _shared_bytes(block_m: int, block_n: int, stages: int, block_d: int, elem_size: int) -> int:
    # The Q tile (BLOCK_M rows: tokens x heads of the group) stays resident; each pipeline stage buffers one K
    # and one V tile of BLOCK_N x BLOCK_D.
    return (block_m + 2 * stages * block_n) * block_d * elem_size


def _config(head_dim: int, elem_size: int, group: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts tile rows, BLOCK_M // group query tokens.

    The interpreter pays per program and per tile, not per element: 32 x 32 tiles (8 tokens at G = 4).

    On a GPU start from 128 x 64 tiles with 3 stages, which fit 2-byte types up to head dim 128
    ((128 + 2*3*64) * 128 * 2 = 128 KB) whatever the group: packing changes what the 128 rows are (16 tokens x
    8 heads, 18 x 7, ...), not how many, so registers and shared memory match a per-head tile. Shrink while
    the estimate exceeds SMEM_BUDGET: float32 at head dim 128 would need (128 + 2*3*64) * 128 * 4 = 256 KB.
    Stages go first (they only hide latency), then BLOCK_N (more loop iterations), then BLOCK_M (more
    programs) down to one token's rows; float32 at 128 ends at 128 x 32 with 2 stages, 128 KB. A group over
    128 heads gets next_power_of_2(group) rows, one token per program, or a ValueError where even that with
    one stage of 32-key tiles would not fit.
    """
    min_rows = _min_rows(group)
    if interpreted:
        return max(32, min_rows), 32, 4, 1
    block_d = triton.next_power_of_2(head_dim)
    block_m, block_n, stages = max(128, min_rows), 64, 3
    warps = 4 if head_dim <= 64 else 8
    while _shared_bytes(block_m, block_n, stages, block_d, elem_size) > SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif block_m > min_rows:
            block_m //= 2
        elif stages > 1:  # only a group too large for two stages of 32-token K/V tiles gets here
            stages -= 1
        else:
            # No model comes close (Falcon's 71 query heads over one KV head take 128 rows), so no group split.
            raise ValueError(f"prefill_attention: {group} query heads per KV head need a {block_m}-row tile, which "
                             f"at head_dim {head_dim} and {elem_size}-byte elements does not fit "
                             f"{SMEM_BUDGET // 1024} KB of shared memory; use the torch backend")
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
    group = num_q_heads // num_kv_heads
    compute = compute_dtype(prefill_kernel, k_cache.dtype)
    block_m, block_n, warps, stages = _config(head_dim, k_cache.element_size(), group,
                                              is_interpreted(prefill_kernel))
    grid = (batch, triton.cdiv(max_seqlen_q, block_m // group), num_kv_heads)
    prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), k_cache.shape[1], head_dim,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        COMPUTE=compute, PRECISION=dot_precision(compute), num_warps=warps, num_stages=stages)
    return out
