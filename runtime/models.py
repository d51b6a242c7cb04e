"""One decoder for the Llama, Qwen2, Qwen3 and Mistral families; their differences are ModelConfig flags.

The parameter names match the Hugging Face checkpoints, except that q/k/v live in one `qkv_proj` and
gate/up in one `gate_up_proj` (see layers.Linear.shards); the loader maps checkpoint tensors onto them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semipd.runtime.batch import ForwardBatch
from semipd.runtime.layers import DecoderLayer, Linear, RMSNorm, empty_param, linear, pack_for_cpu

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None                 # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool                      # bias on q/k/v (Qwen2 always; Llama/Qwen3 when attention_bias)
    o_proj_bias: bool                         # bias on o_proj (Llama/Qwen3 attention_bias; never Qwen2)
    qk_norm: bool                             # per-head RMSNorm on q and k before rotary (Qwen3)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: torch.dtype | None = None    # what the checkpoint says it was saved in
    sliding_window: int | None = None         # accepted only when it never limits attention (see loader)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.model = Decoder(cfg, ops, dtype)
        # Tied models read the embedding matrix as the output head; no second parameter exists to fill.
        self.lm_head = None if cfg.tie_word_embeddings else Head(cfg, dtype)
        self.packed_head: torch.Tensor | None = None
        self.cos_sin_cache: torch.Tensor | None = None
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    def init_rotary(self, device: torch.device, max_position: int | None = None) -> None:
        from semipd.kernels import build_cos_sin_cache
        cfg = self.cfg
        self.cos_sin_cache = build_cos_sin_cache(cfg.head_dim, max_position or cfg.max_position_embeddings,
                                                 cfg.rope_theta, cfg.rope_scaling, device=device)

    def attach_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """One [num_blocks, block_size, num_kv_heads, head_dim] pair per layer, shared by both workers."""
        cfg = self.cfg
        if len(k_caches) != cfg.num_layers or len(v_caches) != cfg.num_layers:
            raise ValueError(f"need {cfg.num_layers} K and V caches, got {len(k_caches)} and {len(v_caches)}")
        for cache in (*k_caches, *v_caches):
            if cache.dim() != 4 or tuple(cache.shape[2:]) != (cfg.num_kv_heads, cfg.head_dim):
                raise ValueError(f"KV cache shape {tuple(cache.shape)} is not "
                                 f"[num_blocks, block_size, {cfg.num_kv_heads}, {cfg.head_dim}]")
        self.k_caches, self.v_caches = list(k_caches), list(v_caches)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if not self.k_caches:
            raise RuntimeError("attach_kv_cache() must be called before the first forward")
        if self.cos_sin_cache is None:
            raise RuntimeError("init_rotary() must be called before the first forward (load_model does it)")
        x = self.model.embed_tokens(batch.input_ids)
        residual = None
        for layer, k_cache, v_cache in zip(self.model.layers, self.k_caches, self.v_caches):
            x, residual = layer(x, residual, batch, k_cache, v_cache, self.cos_sin_cache)
        x, _ = self.model.norm(x, residual)
        return x

    def pack_for_cpu(self) -> int:
        """Pack every matmul weight for oneDNN (see layers.pack_for_cpu); returns how many were packed.
        A tied head keeps its dense embedding for lookups, so only it is held twice."""
        packed = sum(m.pack_for_cpu() for m in self.modules() if isinstance(m, Linear))
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        self.packed_head = pack_for_cpu(head.weight)
        if self.packed_head is not None:
            packed += 1
            if self.lm_head is not None:
                self.lm_head.weight = None
        return packed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, None, self.packed_head).float()


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(cfg, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.weight = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
