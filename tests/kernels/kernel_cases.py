"""Shared builders for the kernel tests: random paged KV caches with a known dense copy, and tolerances."""
from __future__ import annotations

from dataclasses import dataclass

import torch



def _tolerance(dtype):
    """Kernel and reference both compute in float32 and differ in summation order only, then each rounds the
    output to the dtype: two roundings of at most one ulp each (the interpreter truncates float32 -> bfloat16
    instead of rounding to nearest), so 2 eps for the half types. float32 gets the summation-order slack of
    ~100 terms of float32 rounding (2^-23 each)."""
    eps = torch.finfo(dtype).eps
    bound = 2 * eps if dtype != torch.float32 else 128 * eps
    return dict(atol=bound, rtol=bound)


TOLERANCE = {dtype: _tolerance(dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
DTYPES = list(TOLERANCE)


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert not torch.isnan(actual).any(), "output has NaN: an element was not written"
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with -1
    seq_lens: torch.Tensor  # [B] int32
    dense_k: list  # per sequence [L, Hkv, D], what the cache holds for it
    dense_v: list


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3) -> PagedKV:
    """Random KV for each sequence scattered over shuffled blocks; spare blocks hold junk that must be ignored."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(per_seq + [1]) + 1  # one more column than needed: padding must never be read
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    dense_k, dense_v, used = [], [], 0
    for b, (n, nb) in enumerate(zip(seq_lens, per_seq)):
        blocks = order[used:used + nb]
        used += nb
        tables[b, :nb] = blocks.to(torch.int32)
        dense_k.append(k_cache[blocks.long()].flatten(0, 1)[:n])
        dense_v.append(v_cache[blocks.long()].flatten(0, 1)[:n])
    return PagedKV(k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), dense_k, dense_v)


def dense_attention(q, k, v, scale, causal_offset=None):
    """Naive attention for one sequence: q [Lq, Hq, D], k/v [L, Hkv, D], written out longhand in float64.

    causal_offset: query i may see keys j <= causal_offset + i; None lets every query see every key.
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal_offset is not None:
        allowed = torch.arange(k.shape[0])[None, :] <= causal_offset + torch.arange(q.shape[0])[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


LAYOUTS = ["contiguous", "fused", "head_major"]


def kv_cache_in_layout(k_cache, v_cache, layout):
    """The same cache values as [num_blocks, block_size, Hkv, D] views over another storage; the head dim stays
    contiguous, every other stride changes:
      fused       K and V side by side on the head axis of one [num_blocks, block_size, 2*Hkv, D] tensor
      head_major  storage [num_blocks, Hkv, block_size, D], seen through a transpose
    """
    if layout == "contiguous":
        return k_cache, v_cache
    if layout == "fused":
        heads = k_cache.shape[2]
        storage = torch.cat((k_cache, v_cache), dim=2)
        return storage[:, :, :heads], storage[:, :, heads:]
    if layout == "head_major":
        return tuple(c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    raise ValueError(layout)
