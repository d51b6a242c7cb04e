"""Preallocated split-K buffers for decode attention, so a decode step can be captured in a CUDA graph.

Decode attention splits each sequence's KV length into up to max_splits pieces when the batch alone cannot fill
the GPU; every piece writes a partial output and its log-sum-exp, and a second kernel merges them. Allocating
those buffers once (per CUDA-graph batch size or once for the largest) keeps the launch free of allocations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeWorkspace:
    max_batch: int
    num_q_heads: int
    head_dim: int
    max_splits: int
    device: torch.device | str | None = None
    partial_out: torch.Tensor = field(init=False, repr=False)  # [max_batch, Hq, max_splits, D] float32
    partial_lse: torch.Tensor = field(init=False, repr=False)  # [max_batch, Hq, max_splits] float32

    def __post_init__(self):
        for name in ("max_batch", "num_q_heads", "head_dim", "max_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeWorkspace.{name} must be >= 1, got {getattr(self, name)}")
        shape = (self.max_batch, self.num_q_heads, self.max_splits)
        self.partial_out = torch.empty(*shape, self.head_dim, dtype=torch.float32, device=self.device)
        self.partial_lse = torch.empty(*shape, dtype=torch.float32, device=self.device)

    def check(self, batch: int, num_q_heads: int, head_dim: int, num_splits: int) -> None:
        if batch > self.max_batch or num_q_heads != self.num_q_heads or head_dim != self.head_dim \
                or num_splits > self.max_splits:
            raise ValueError(
                f"decode workspace sized for batch<={self.max_batch}, Hq={self.num_q_heads}, D={self.head_dim}, "
                f"splits<={self.max_splits} cannot serve batch={batch}, Hq={num_q_heads}, D={head_dim}, "
                f"splits={num_splits}")
