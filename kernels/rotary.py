"""Rotary position embedding, neox style (rotate halves, as Hugging Face Llama/Qwen's rotate_half).

One program per token rotates all its query and key heads with the cos/sin row of its position:
  out[:half] = x[:half] * cos - x[half:] * sin,   out[half:] = x[half:] * cos + x[:half] * sin.
The table itself (build_cos_sin_cache) lives in semipd.kernels.rope so the CPU engine can build it without triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semipd.kernels.reference import rotary_embedding as rotary_embedding_reference  # noqa: F401
from semipd.kernels.rope import build_cos_sin_cache  # noqa: F401  (re-exported: the table this kernel reads)
from semipd.kernels.triton_utils import check_runnable


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, x_stride_t, x_stride_h, out_stride_t, out_stride_h, num_heads, half,
                  cos, sin, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < half)
    src = x_ptr + token * x_stride_t + h * x_stride_h + d
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + half, mask=mask).to(tl.float32)
    dst = out_ptr + token * out_stride_t + h * out_stride_h + d
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(positions_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
                  q_stride_t, q_stride_h, k_stride_t, k_stride_h, qo_stride_t, qo_stride_h, ko_stride_t, ko_stride_h,
                  cache_stride, num_q_heads, num_kv_heads, half,
                  BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * cache_stride + d, mask=d < half).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + half + d, mask=d < half).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, q_stride_t, q_stride_h, qo_stride_t, qo_stride_h, num_q_heads, half,
                  cos, sin, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, k_stride_t, k_stride_h, ko_stride_t, ko_stride_h, num_kv_heads, half,
                  cos, sin, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(positions, q, k, cos_sin_cache):
    check_runnable(rotary_kernel, q, k, cos_sin_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if cos_sin_cache.shape[1] != head_dim or k.shape[2] != head_dim:
        raise ValueError(f"rotary: head dims differ (q {head_dim}, k {k.shape[2]}, "
                         f"cos/sin table {cos_sin_cache.shape[1]}); partial rotary is not supported")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary needs the head dimension contiguous (stride 1)")
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)
    if num_tokens:
        half = head_dim // 2
        rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0), num_q_heads, num_kv_heads, half,
            BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half))
    return q_out, k_out
