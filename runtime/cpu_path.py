"""The CPU decode step through torch.compile (`semipd serve --cpu-compile`): the one place a CPU-only mechanism
enters the engine. ModelRunner asks `make_decode_path` once; on any device but the CPU, or without the flag, it
gets None and decodes as before (CUDA keeps its graphs and Triton kernels; nothing here is imported there).

What it compiles is the real model: a twin of each decoder layer that shares its weights (nothing is copied)
and differs only where eager code would stop inductor:
  - the oneDNN-packed matmuls go through a custom op (`semipd_cpu::packed_linear`): inductor's own mkldnn
    lowering wants the packed weight to be a graph constant, which would compile each layer separately;
  - decode attention reads the paged pool through the block table inside one reduction, which inductor fuses
    into a loop over the blocks (no gathered copy of K and V, no mask tensor per step); its width is the block
    table's, so no step's lengths are read on the host (no graph break, no recompile as contexts grow);
  - the KV store is one index_copy_ into the pool (decode on CPU never has padding slots).
Embedding, final norm and the head stay eager: one op each. The prefill worker keeps using the eager modules.

Shapes: one graph serves every layer (weights are inputs, not constants) and every batch of 2 or more (dynamic);
torch specialises size 1, so batch 1 has a graph of its own, and dynamo guards on the torch thread count, which
the engine switches per step (runtime/cpu_threads.py). All of them are compiled at start-up
(`warm_up`), so no request waits for the compiler. Block tables one block wide are padded to two (masked), for the same reason.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch
import torch.fx.experimental._config
from torch import nn

from semipd.runtime.batch import ForwardBatch

log = logging.getLogger("semipd.cpu_path")


@torch.library.custom_op("semipd_cpu::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) on a weight packed by layers.pack_for_cpu, opaque to inductor (it schedules around it)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


class _PackedLinear(nn.Module):
    """A layers.Linear whose weight is packed, seen by the compiler through packed_linear."""

    def __init__(self, linear):
        super().__init__()
        self.packed, self.bias = linear.packed, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """reference.store_kv for the engine's contiguous pools and a batch with no padding slot (CPU decode)."""
    for cache, new in ((k_cache, key), (v_cache, value)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new.to(cache.dtype))


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, workspace=None):
    """reference.decode_attention written as reductions over the block table, for inductor to fuse: the scores
    are q.k summed over D and the output p.v summed over the tokens, both read straight from the pool, in
    float32. Tokens past seq_lens[b] (padding blocks included) are masked; seq_len 0 gives zeros."""
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    width = block_tables.shape[1] * block_size
    table = block_tables.long().clamp(0, num_blocks - 1)                # padding entries: any block, masked
    k = k_cache[table].view(batch, width, num_kv_heads, 1, head_dim)
    v = v_cache[table].view(batch, width, num_kv_heads, 1, head_dim)
    qf = q.view(batch, 1, num_kv_heads, group, head_dim).float()
    scores = (qf * k.float()).sum(-1) * scale                              # [B, L, Hkv, G]
    lens = seq_lens.long()
    valid = torch.arange(width, device=q.device)[None, :] < lens[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1)
    out = (probs[..., None] * v.float()).sum(1)                            # [B, Hkv, G, D]
    out = torch.where((lens > 0)[:, None, None, None], out, 0.0)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def _twin(module: nn.Module, ops) -> nn.Module:
    """A shallow copy of `module` and its children sharing every tensor, with `ops` where they had ops and the
    packed linears behind packed_linear."""
    from semipd.runtime.layers import Linear
    if isinstance(module, Linear):
        return _PackedLinear(module) if module.packed is not None else module
    twin = copy.copy(module)
    twin._modules = {name: _twin(child, ops) for name, child in module._modules.items()}
    if hasattr(module, "ops"):
        twin.ops = ops
    return twin


def _layer_step(layer, x, residual, batch, k_cache, v_cache, cos_sin_cache):
    return layer(x, residual, batch, k_cache, v_cache, cos_sin_cache)


class CompiledDecode:
    """model(batch) for decode batches, the decoder layers compiled by inductor."""

    def __init__(self, model):
        self.model = model
        ops = dataclasses.replace(model.ops, store_kv=store_kv, decode_attention=decode_attention)
        self.layers = [_twin(layer, ops) for layer in model.model.layers]
        # dynamic_threads: the kernels read the calling thread's OpenMP count when they run, not the count at
        # compile time, so they follow the engine's per-worker share (1 core while both workers run, 2 alone).
        # cpp_wrapper: the graph runs in C++ with the GIL released; inductor's Python wrapper holds it through
        # each kernel, which starved the prefill worker (TTFT 1.7 -> 6.8 s on bench_engine's burst).
        # No duck sizing: dims that happen to be equal while tracing (the warm-up's batch 2 and two-block table)
        # would share one symbol, and every later step where they differ would recompile.
        torch.fx.experimental._config.use_duck_shape = False
        self.step = torch.compile(_layer_step, dynamic=True,
                                  options={"cpp.dynamic_threads": True, "cpp_wrapper": True})

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.model
        if batch.block_tables.shape[1] == 1:     # a second (masked) column: no graph specialised to width 1
            batch = dataclasses.replace(batch, block_tables=torch.nn.functional.pad(batch.block_tables, (0, 1)))
        x = model.model.embed_tokens(batch.input_ids)
        # Layer 0 adds a zero residual (exactly x), so every layer runs the same graph.
        residual = torch.zeros_like(x)
        for layer, k_cache, v_cache in zip(self.layers, model.k_caches, model.v_caches):
            x, residual = self.step(layer, x, residual, batch, k_cache, v_cache, model.cos_sin_cache)
        x, _ = model.model.norm(x, residual)
        return x

    @torch.inference_mode()
    def warm_up(self, block_size: int, thread_counts=()) -> float:
        """Compile the graphs a decode step can need (batch 1, batch 2+, under each torch thread count the
        engine switches between: dynamo guards on it) on a batch that writes its KV into block 0 before any
        request has a block; returns the seconds it took."""
        started = time.monotonic()
        before = torch.get_num_threads()
        try:
            for threads in dict.fromkeys(thread_counts or (before,)):
                torch.set_num_threads(threads)
                self._warm_up(block_size)
        finally:
            torch.set_num_threads(before)
        return time.monotonic() - started

    def _warm_up(self, block_size: int) -> None:
        for size in (1, 2):
            slots = torch.arange(size, dtype=torch.int64) % block_size
            batch = ForwardBatch(
                input_ids=torch.zeros(size, dtype=torch.int64), positions=torch.zeros(size, dtype=torch.int64),
                is_prefill=False, slot_mapping=slots, block_tables=torch.zeros(size, 2, dtype=torch.int32),
                seq_lens=torch.ones(size, dtype=torch.int32), cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32),
                max_seqlen_q=1, max_seqlen_k=1, logits_indices=torch.arange(size, dtype=torch.int64))
            self(batch)


def make_decode_path(runner, enabled: bool, thread_counts=()) -> CompiledDecode | None:
    """The compiled decode forward for `runner`, or None: the flag is off, the device is not the CPU, or the
    kernels are not the torch references. `thread_counts`: the torch thread counts decode will run under."""
    if not enabled:
        return None
    if runner.device.type != "cpu" or runner.kernel_backend != "torch":
        log.warning("--cpu-compile applies to CPU decode with the torch kernels only; ignored on %s (%s kernels)",
                    runner.device, runner.kernel_backend)
        return None
    path = CompiledDecode(runner.model)
    seconds = path.warm_up(runner.block_size, thread_counts)
    log.info("CPU decode forward compiled by torch.compile (inductor) in %.1fs", seconds)
    return path
