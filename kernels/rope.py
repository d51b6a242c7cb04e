"""The cos/sin table that rotary embedding reads: one row per position, cat(cos[D/2], sin[D/2]) in float32.

Kept free of triton so the CPU engine can build it; semipd.kernels and semipd.kernels.rotary re-export it.
The inverse frequencies follow Hugging Face's rope initialisation for the types we support, so a model run
through our kernels rotates exactly as transformers does.
"""
from __future__ import annotations

import math

import torch

SUPPORTED = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, base: float, rope_scaling: dict | None = None, device=None):
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rotary head_dim must be a positive even number, got {head_dim}")
    scaling = dict(rope_scaling or {})
    # Older configs say "type", newer ones "rope_type".
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(SUPPORTED)}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        # Positions are stretched by factor, so every frequency slows down by the same factor.
        return inv_freq / float(_require(scaling, "factor"))
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq, scaling: dict):
    """Llama 3.1: long wavelengths are slowed by factor, short ones kept, the band between interpolated."""
    factor = float(_require(scaling, "factor"))
    low = float(_require(scaling, "low_freq_factor"))
    high = float(_require(scaling, "high_freq_factor"))
    original = float(_require(scaling, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    slowed = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, slowed)


def _require(scaling: dict, key: str):
    if key not in scaling:
        raise ValueError(f"rope_scaling {scaling!r} is missing {key!r}")
    return scaling[key]


def build_cos_sin_cache(head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None,
                        device=None):
    """Tensor[max_position, head_dim] float32 whose row p is cat(cos(p * inv_freq), sin(p * inv_freq))."""
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    inv_freq = inverse_frequencies(head_dim, base, rope_scaling, device=device)
    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
