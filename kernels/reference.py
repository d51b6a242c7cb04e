"""Plain-torch versions of every kernel: the engine's CPU path and the ground truth for the Triton tests.

They are written to be obviously correct first and reasonably fast on CPU second: whole-batch block gathers
and one SDPA call per batch (decode), one masked SDPA per sequence (prefill). Everything accumulates
in float32 and is returned in the input's dtype, like the Triton kernels.

Layouts shared with the Triton kernels:
  k_cache, v_cache   [num_blocks, block_size, Hkv, D]; token t of a sequence lives in block
                     block_tables[b, t // block_size] at offset t % block_size.
  slot               block_id * block_size + offset, -1 = padding (skipped).
  GQA                query head h reads KV head h // (Hq // Hkv), as Hugging Face's repeat_kv does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    for cache, new in ((k_cache, key), (v_cache, value)):
        if cache.is_contiguous():       # the engine's pools: one row copy per token (5x faster on CPU)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.to(cache.dtype))
        else:                           # two-index assignment works for any strides, unlike a flattened view
            block_size = cache.shape[1]
            cache[slots // block_size, slots % block_size] = new.to(cache.dtype)


def gather_kv(cache, block_tables, num_tokens: int):
    """[B, max_blocks] block ids -> [B, num_tokens, Hkv, D]: each sequence's first num_tokens cached tokens.

    Table entries past a sequence's length may be padding (any value); they are replaced by block 0 so the
    gather stays in bounds, and the caller masks those tokens out. index_select copies whole blocks, which on
    CPU is about twice as fast as advanced indexing (cache[table]) on a pool larger than the caches.
    """
    batch = block_tables.shape[0]
    block_size = cache.shape[1]
    nblocks = -(-num_tokens // block_size)
    table = block_tables[:, :nblocks].long()
    table = torch.where((table >= 0) & (table < cache.shape[0]), table, torch.zeros_like(table))
    kv = cache.index_select(0, table.flatten())  # [B * nblocks, block_size, Hkv, D]
    return kv.view(batch, nblocks * block_size, *cache.shape[2:])[:, :num_tokens]


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, workspace=None, *,
                     num_splits: int | None = None):
    """One query token per sequence over its first seq_lens[b] cached tokens; seq_len 0 gives zeros.

    The gathered K/V go to SDPA as [B, Hkv, L, D] views, and the query heads of each KV group as its query rows
    ([B, Hkv, G, D]), so nothing is repeated, permuted or upcast into a copy: SDPA's CPU kernel reads half
    precision as it is and accumulates in float32, as the Triton kernel does. workspace and num_splits only
    matter to the Triton kernel; they are accepted so both backends share a signature.
    """
    batch, num_heads, head_dim = q.shape
    max_len = int(seq_lens.max()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q)
    k = gather_kv(k_cache, block_tables, max_len).to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    v = gather_kv(v_cache, block_tables, max_len).to(q.dtype).transpose(1, 2)
    num_kv_heads = k.shape[1]
    lens = seq_lens.to(q.device).long()
    valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, L]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    # A sequence with no tokens has an all-masked row, which SDPA turns into NaN; it contributes nothing instead.
    out = torch.where((lens > 0)[:, None, None, None], out, 0.0)
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q: int,
                      scale: float):
    """Causal attention for a variable-length batch whose new K/V are already in the paged cache.

    Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its query i sits at absolute position
    seq_lens[b] - q_len + i and sees cache positions 0..that position (the cached prefix plus the causal part).
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b:b + 1], seq_len)[0].float()  # [L, Hkv, D]
        v = gather_kv(v_cache, block_tables[b:b + 1], seq_len)[0].float()
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, L, D]; SDPA maps query heads onto KV groups
        qb = q[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]  # [q_len, L]
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
        out[start:end] = ob.transpose(0, 1).to(q.dtype)
    return out


def rms_norm(x, weight, eps: float, residual=None):
    """norm(x) * w, or with a residual (norm(x + residual) * w, x + residual); normalises the last dim."""
    if residual is not None:
        # The residual stream stays in the model dtype, as in Hugging Face Llama.
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (normed * weight.float()).to(x.dtype)
    return out if residual is None else (out, x)


def rotary_embedding(positions, q, k, cos_sin_cache):
    """Neox-style rotation (rotate halves, as Hugging Face's rotate_half); returns new (q, k)."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()].float()  # [T, D]
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]

    def rotate(x):
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x):
    """silu(x[:, :I]) * x[:, I:] for x of width 2I."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :half]) * xf[..., half:]).to(x.dtype)
