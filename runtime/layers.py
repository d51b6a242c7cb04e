"""Building blocks of the decoder: fused linears, RMSNorm, attention over the paged KV cache, the SiLU MLP.

Parameters are created empty (the loader builds the model on the meta device and fills every parameter in
place from safetensors), and no module keeps anything about the call it is serving: the prefill and decode
workers run the same modules concurrently, so all per-step data (positions, slots, block tables) comes in as
arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semipd.runtime.batch import ForwardBatch


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """What oneDNN packs on this CPU: float32 always, bfloat16 where the CPU has native bf16 (AVX-512 BF16/AMX)
    or oneDNN emulates it well (AVX-512); float16 is left to F.linear."""
    dtypes = (torch.float32,)
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            dtypes += (torch.bfloat16,)
    except (RuntimeError, AttributeError):
        pass
    return dtypes


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a float32 or bfloat16 [out, in] weight, or None where oneDNN cannot make one.

    F.linear on CPU repacks the whole weight on every call, which dominates at decode's few rows: on 2 cores
    a 16-row step over a 125M model takes ~70 ms with F.linear and ~37 ms on weights packed once (float32);
    in bfloat16 packing saves about 40% of the matmul time as well.
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() \
            or weight.dtype not in _packable_dtypes():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except (RuntimeError, AttributeError):     # a torch built without these ops: plain F.linear still works
        return None


def linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b), where W may be several checkpoint tensors stacked along the output dim.

    `shards` maps each checkpoint sub-module name (q_proj, k_proj, ...) to its (offset, size) rows, so the
    loader can copy each checkpoint tensor straight into its slice; one matmul then serves all of them.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.shards: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shards[name] = (offset, size)
            offset += size
        self.weight = empty_param(offset, in_features, dtype=dtype)
        self.bias = empty_param(offset, dtype=dtype) if bias else None
        self.packed: torch.Tensor | None = None

    def pack_for_cpu(self) -> bool:
        """Swap the loaded weight for its oneDNN-packed copy (the dense one is released: one copy stays)."""
        self.packed = pack_for_cpu(self.weight)
        if self.packed is not None:
            self.weight = None
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = empty_param(size, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = Linear(cfg.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                               cfg.attention_bias, dtype)
        self.o_proj = Linear(q_size, {"o_proj": cfg.hidden_size}, cfg.o_proj_bias, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops, dtype) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cos_sin_cache: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Qwen3 normalises each head's vector before the rotation.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(batch.positions, q, k, cos_sin_cache)
        self.ops.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        if batch.is_prefill:
            o = self.ops.prefill_attention(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q,
                                           batch.seq_lens, batch.max_seqlen_q, self.scale)
        else:
            o = self.ops.decode_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, self.scale,
                                          batch.decode_workspace)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, {"gate_proj": size, "up_proj": size}, False, dtype)
        self.down_proj = Linear(size, {"down_proj": cfg.hidden_size}, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, ops, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.self_attn = Attention(cfg, ops, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.mlp = MLP(cfg, ops, dtype)

    def forward(self, x, residual, batch, k_cache, v_cache, cos_sin_cache):
        # The residual add is fused into the next norm: x is the last sub-layer's output, not yet added.
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, k_cache, v_cache, cos_sin_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual
