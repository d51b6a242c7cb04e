"""What one forward step hands the model: flat tokens plus the paged-KV addressing for them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from semipd.kernels.workspace import DecodeWorkspace


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor      # [T] int64, the new tokens of every sequence, concatenated
    positions: torch.Tensor      # [T] int64, absolute position of each new token
    is_prefill: bool             # prefill/extend (any number of new tokens per sequence) or decode (exactly one)
    slot_mapping: torch.Tensor   # [T] int64, KV slot (block_id * block_size + offset) each new token is written to
    block_tables: torch.Tensor   # [B, max_blocks] int32, past each sequence's blocks 0 (or, in a replayed decode
                                 # graph's buffer, what an earlier step left): no kernel reads past seq_lens
    seq_lens: torch.Tensor       # [B] int32, KV length of each sequence after this step (cached prefix + new)
    cu_seqlens_q: torch.Tensor   # [B+1] int32, offsets of each sequence's new tokens in input_ids
    max_seqlen_q: int
    max_seqlen_k: int
    logits_indices: torch.Tensor  # [N] int64, rows of the hidden states whose next-token logits are needed
    # Decode only: split-K buffers shared by every layer's decode attention, preallocated so a captured CUDA graph
    # allocates nothing per layer. None lets the kernel allocate its own (eager decode).
    decode_workspace: DecodeWorkspace | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
