"""semipd kernels: the hot-path ops behind one namespace, with a plain-torch and a Triton backend.

load_ops("torch") is the CPU path (and the tests' ground truth) and never imports triton; load_ops("triton")
imports the Triton launchers, which need a GPU, or TRITON_INTERPRET=1 set before this call on CPU.
"""
from __future__ import annotations

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


def load_ops(backend: str) -> Ops:
    if backend == "torch":
        from semipd.kernels import reference as r
        return Ops("torch", r.store_kv, r.decode_attention, r.prefill_attention, r.rms_norm,
                   r.rotary_embedding, r.silu_and_mul)
    if backend == "triton":
        # Imported here so the torch path works without triton and kernels are decorated only when asked for.
        from semipd.kernels import activation, decode_attention, kv_store, prefill_attention, rmsnorm, rotary
        return Ops("triton", kv_store.store_kv, decode_attention.decode_attention,
                   prefill_attention.prefill_attention, rmsnorm.rms_norm, rotary.rotary_embedding,
                   activation.silu_and_mul)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DecodeWorkspace", "Ops", "build_cos_sin_cache", "load_ops"]
