"""Write new tokens' keys and values into the paged KV cache.

One program per token copies all its KV heads: token t goes to block slot // block_size at offset
slot % block_size; slot -1 marks a padding token and writes nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl

from semipd.kernels.reference import store_kv as store_kv_reference  # noqa: F401  (the ground truth)
from semipd.kernels.triton_utils import check_runnable


@triton.jit
def store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
                    kc_stride_b, kc_stride_o, kc_stride_h, vc_stride_b, vc_stride_o, vc_stride_h,
                    block_size, num_heads, head_dim,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # token * key_stride_t overflows int32 for a large batch of wide rows
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = tl.maximum(slot, 0) // block_size
    offset = tl.maximum(slot, 0) % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    heads_to_write = tl.where(slot >= 0, num_heads, 0)  # a padding token writes no head
    mask = (h < heads_to_write) & (d < head_dim)

    k = tl.load(key_ptr + token * key_stride_t + h * key_stride_h + d, mask=mask).to(tl.float32)
    v = tl.load(value_ptr + token * value_stride_t + h * value_stride_h + d, mask=mask).to(tl.float32)
    k_dst = k_cache_ptr + block * kc_stride_b + offset * kc_stride_o + h * kc_stride_h + d
    v_dst = v_cache_ptr + block * vc_stride_b + offset * vc_stride_o + h * vc_stride_h + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_runnable(store_kv_kernel, key, value, k_cache, v_cache)
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    for t in (key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("store_kv needs the head dimension contiguous (stride 1)")
    store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim))
