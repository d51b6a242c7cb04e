"""Paged decode attention: one new query token per sequence against its cached keys and values.

Layout: q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
seq_lens [B] int32 (0 = a padded batch slot, which gets zeros).

- GQA: one program serves a KV head and all G = Hq/Hkv query heads that read it, stacked as the rows of one
  tile (padded to 16 rows so tl.dot can use tensor cores). Each K/V tile is read once for G heads.
- Tiles of BLOCK_N tokens are independent of the page size: every token looks up its own page.
- Split-K: decode is bandwidth-bound and B * Hkv programs may be too few to keep every SM streaming, so the
  KV length is cut into num_splits pieces on a third grid axis. Each piece writes its partial output and
  log-sum-exp into a workspace and merge_splits_kernel combines them. The split count depends only on the
  batch shape (never on the sequence lengths), so a captured CUDA graph stays valid.
- Softmax runs in base 2 (exp2 with log2(e) folded into the scale), in float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from semipd.kernels.reference import decode_attention as decode_attention_reference  # noqa: F401
from semipd.kernels.triton_utils import (check_head_dim, check_runnable, compute_dtype, dot_precision,
                                        is_interpreted, num_sms)
from semipd.kernels.workspace import DecodeWorkspace

DEFAULT_MAX_SPLITS = 32
WAVES = 2  # aim for about this many programs per SM before splitting stops


@triton.jit
def decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                  partial_out_ptr, partial_lse_ptr, qk_scale,
                  q_stride_b, q_stride_h, kc_stride_b, kc_stride_o, kc_stride_h,
                  vc_stride_b, vc_stride_o, vc_stride_h, bt_stride, out_stride_b, out_stride_h,
                  po_stride_b, po_stride_h, po_stride_s, pl_stride_b, pl_stride_h,
                  block_size, group, head_dim,
                  NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g  # the query heads of this KV group
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)

    # This split's token range, whole tiles, so only the last tile of a sequence is partial.
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(block_tables_ptr + seq * bt_stride + n // block_size, mask=n_mask, other=0).to(tl.int64)
        offset = n % block_size
        # K is loaded already transposed ([D, BLOCK_N]) by swapping the pointer axes.
        k = tl.load(k_cache_ptr + block[None, :] * kc_stride_b + offset[None, :] * kc_stride_o
                    + kv_head * kc_stride_h + d[:, None],
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(COMPUTE)
        v = tl.load(v_cache_ptr + block[:, None] * vc_stride_b + offset[:, None] * vc_stride_o
                    + kv_head * vc_stride_h + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)

        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        m_i = m_new

    # An empty range (seq_len 0, or a split past the end) leaves l_i = 0: write zeros, and lse = -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    row_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(partial_out_ptr + seq * po_stride_b + heads[:, None] * po_stride_h + split * po_stride_s
                 + d[None, :], out, mask=row_mask)
        tl.store(partial_lse_ptr + seq * pl_stride_b + heads * pl_stride_h + split, lse, mask=g_mask)


@triton.jit
def merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr,
                        po_stride_b, po_stride_h, po_stride_s, pl_stride_b, pl_stride_h, out_stride_b, out_stride_h,
                        head_dim, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s w_s * partial_s / sum_s w_s with w_s = 2^(lse_s - max lse): the exact softmax over all splits."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(partial_lse_ptr + seq * pl_stride_b + head * pl_stride_h + s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0)), 0.0)
    part = tl.load(partial_out_ptr + seq * po_stride_b + head * po_stride_h + s[:, None] * po_stride_s + d[None, :],
                   mask=(weight > 0)[:, None] & (d < head_dim)[None, :], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * out_stride_b + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def choose_num_splits(batch: int, num_kv_heads: int, device: torch.device, max_splits: int = DEFAULT_MAX_SPLITS):
    """Enough splits for about WAVES programs per SM; 1 once the batch fills the GPU by itself."""
    programs = max(batch * num_kv_heads, 1)
    return max(1, min(max_splits, triton.cdiv(WAVES * num_sms(device), programs)))


def _block_n(interpreted: bool) -> int:
    return 32 if interpreted else 64  # the interpreter pays per tile: fewer, bigger ones


def make_workspace(max_batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                   device) -> DecodeWorkspace:
    """The workspace for decode steps of up to max_batch sequences of at most max_seq_len tokens (for the engine:
    one CUDA graph's batch size and max_model_len). It holds the splits choose_num_splits picks for max_batch,
    capped at the tiles of max_seq_len since a split past the last tile does no work; the launcher caps its own
    choice at workspace.max_splits, so a smaller batch on the same workspace fits too."""
    splits = min(choose_num_splits(max_batch, num_kv_heads, torch.device(device)),
                 max(1, triton.cdiv(max_seq_len, _block_n(is_interpreted(decode_kernel)))))
    return DecodeWorkspace(max_batch, num_q_heads, head_dim, splits, device)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, workspace=None, *,
                     num_splits: int | None = None):
    """Paged decode attention; see the module docstring. num_splits overrides the split-K heuristic.

    For CUDA-graph capture pass a DecodeWorkspace: the partial buffers are then not allocated here, and the only
    allocation left is the output, which PyTorch serves from the graph's private memory pool during capture.
    """
    check_runnable(decode_kernel, q, k_cache, v_cache)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check_head_dim("decode_attention", head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    for t in (q, k_cache, v_cache, block_tables):
        if t.stride(-1) != 1:
            raise ValueError("decode_attention needs the last dimension of q, caches and block_tables contiguous")
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    if num_splits is None:
        limit = workspace.max_splits if workspace is not None else DEFAULT_MAX_SPLITS
        num_splits = choose_num_splits(batch, num_kv_heads, q.device, limit)
    if num_splits > 1:
        if workspace is None:
            workspace = DecodeWorkspace(batch, num_q_heads, head_dim, num_splits, q.device)
        workspace.check(batch, num_q_heads, head_dim, num_splits)
        partial_out, partial_lse = workspace.partial_out, workspace.partial_lse
    else:
        partial_out, partial_lse = out, out  # unused by the kernel when NUM_SPLITS == 1

    compute = compute_dtype(decode_kernel, k_cache.dtype)
    block_d = triton.next_power_of_2(head_dim)
    block_n = _block_n(is_interpreted(decode_kernel))
    decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, partial_out, partial_lse, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2) if num_splits > 1 else 0,
        partial_lse.stride(0), partial_lse.stride(1),
        k_cache.shape[1], group, head_dim,
        NUM_SPLITS=num_splits, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        COMPUTE=compute, PRECISION=dot_precision(compute), num_warps=4, num_stages=2)
    if num_splits > 1:
        merge_splits_kernel[(batch, num_q_heads)](
            partial_out, partial_lse, out,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
            head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d)
    return out
