"""semipd kernels: the hot-path ops behind one namespace, with a plain-torch and a Triton backend.

load_ops("torch") is the CPU path (and the tests' ground truth) and never imports triton; load_ops("triton")
imports the Triton launchers, which need a GPU, or TRITON_INTERPRET=1 set before this call on CPU.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable

from semipd.kernels.rope import build_cos_sin_cache
from semipd.kernels.workspace import DecodeWorkspace

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    backend: str
    store_kv: Callable
    decode_attention: Callable
    prefill_attention: Callable
    rms_norm: Callable
    rotary_embedding: Callable
    silu_and_mul: Callable
    # (max_batch, num_q_heads, num_kv_heads, head_dim, max_seq_len, device) -> DecodeWorkspace or None: what to
    # pass decode_attention as its workspace so a captured decode step allocates nothing (None: not needed).
    make_decode_workspace: Callable


def _no_workspace(*args, **kwargs):
    return None  # the torch reference has no split-K buffers


_INTERPRETER_LOCK = threading.Lock()


def _one_at_a_time(op: Callable) -> Callable:
    """The Triton interpreter patches triton.language globally while a kernel runs, so two threads (the engine's
    prefill and decode workers) must not interpret kernels at the same time. Compiled kernels need no lock."""
    @functools.wraps(op)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return op(*args, **kwargs)
    return locked


def load_ops(backend: str) -> Ops:
    if backend == "torch":
        from semipd.kernels import reference as r
        return Ops("torch", r.store_kv, r.decode_attention, r.prefill_attention, r.rms_norm,
                   r.rotary_embedding, r.silu_and_mul, _no_workspace)
    if backend == "triton":
        # Imported here so the torch path works without triton and kernels are decorated only when asked for.
        from semipd.kernels import activation, decode_attention, kv_store, prefill_attention, rmsnorm, rotary
        ops = [kv_store.store_kv, decode_attention.decode_attention, prefill_attention.prefill_attention,
               rmsnorm.rms_norm, rotary.rotary_embedding, activation.silu_and_mul]
        if os.environ.get("TRITON_INTERPRET") == "1":
            ops = [_one_at_a_time(op) for op in ops]
        return Ops("triton", *ops, decode_attention.make_workspace)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DecodeWorkspace", "Ops", "build_cos_sin_cache", "load_ops"]
