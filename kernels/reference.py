"""Plain-torch versions of every kernel: the engine's CPU path and the ground truth for the Triton tests.

They are written to be obviously correct first and reasonably fast on CPU second: whole-batch gathers through
the block table and one matmul per batch (decode), one masked attention per sequence (prefill). Everything is
computed in float32 and returned in the input's dtype, like the Triton kernels.

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
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    # Two-index assignment works for any cache strides, unlike a write through a flattened view.
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def gather_kv(cache, block_tables, num_tokens: int):
    """[B, max_blocks] block ids -> [B, num_tokens, Hkv, D]: each sequence's first num_tokens cached tokens.

    Table entries past a sequence's length may be padding (any value); they are replaced by block 0 so the
    gather stays in bounds, and the caller masks those tokens out.
    """
    block_size = cache.shape[1]
    nblocks = -(-num_tokens // block_size)
    table = block_tables[:, :nblocks].long()
    table = torch.where((table >= 0) & (table < cache.shape[0]), table, torch.zeros_like(table))
    kv = cache[table]  # [B, nblocks, block_size, Hkv, D]
    return kv.flatten(1, 2)[:, :num_tokens]


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, workspace=None, *,
                     num_splits: int | None = None):
    """One query token per sequence over its first seq_lens[b] cached tokens; seq_len 0 gives zeros.

    workspace and num_splits only matter to the Triton kernel; they are accepted so both backends share a
    signature.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q)
    k = gather_kv(k_cache, block_tables, max_len).float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = gather_kv(v_cache, block_tables, max_len).float().transpose(1, 2)  # [B, Hkv, L, D]
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k) * scale  # [B, Hkv, G, L]
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None].long()  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A sequence with no tokens has an all -inf row, whose softmax is NaN; it contributes nothing instead.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.matmul(probs, v)  # [B, Hkv, G, D]
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q: int,
                      scale: float):
    """Causal attention for a variable-length batch whose new K/V are already in the paged cache.

    Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its query i sits at absolute position
    seq_lens[b] - q_len + i and sees cache positions 0..that position (the cached prefix plus the causal part).
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
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
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]  # [q_len, L]
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=allowed, scale=scale)
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
