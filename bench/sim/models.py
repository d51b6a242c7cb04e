"""Step-time models of one GPU: how long a prefill step, a decode step or a unified mixed step takes on a share of
the streaming multiprocessors. Every figure they give is a model, not a measurement.

One interface (`LatencyModel`), two implementations:

- `Roofline`: analytic, from the GPU's spec sheet and the model's shapes. Every constant is at the top of this file
  with where it comes from.
- `Profile`: calibrated, read from a profile JSON in exactly the format `bench/sm_sweep.py --json` writes (or the
  CPU engine's own step-time metrics turned into that format): per phase, linear interpolation (and linear
  extrapolation) over SMs and size, `with_other_ms` when the other phase is busy, `alone_ms` when it is not.

Shares are fractions of the whole GPU's SMs (0 < s <= 1). Contexts are KV tokens.
"""
from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# ---- the GPUs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    tflops: float           # dense bf16 tensor-core peak, TFLOP/s (spec sheet)
    hbm_tbps: float         # HBM bandwidth, TB/s (spec sheet)
    memory_gb: float        # HBM capacity, GB


# NVIDIA's spec sheets (SXM parts): H100 989 TFLOP/s dense bf16, 3.35 TB/s, 80 GB; H200 the same chip and compute
# with 4.8 TB/s and 141 GB. research/anchors.md, "Physical limits", gives the same bandwidths.
GPUS = {
    "h100": GPU("H100 SXM", 132, 989.0, 3.35, 80.0),
    "h200": GPU("H200 SXM", 132, 989.0, 4.8, 141.0),
}

# ---- the roofline's constants (documented in docs/simulate.md, "Latency models") --------------------------------

GEMM_EFFICIENCY = 0.65      # share of peak FLOP/s a prefill reaches: a large bf16 GEMM ran at ~790 of 989 TFLOP/s
                            # on an H200 here (anchors.md, 0.80); norms, RoPE, SiLU and sampling bring it down
ATTENTION_EFFICIENCY = 0.45  # causal prefill attention (FlashAttention-class kernels reach ~40-60 % of peak)
BANDWIDTH_EFFICIENCY = 0.90  # share of HBM spec a decode step streams at: a device copy moved ~3.1 of 3.35 TB/s on
                            # an H100 and ~4.3 of 4.8 on an H200 (anchors.md)
DECODE_SATURATION = 0.5     # share of the SMs at which decode reaches full achieved bandwidth; below it bandwidth
                            # falls in proportion. See docs/simulate.md: semi-PD's and SGLang's PD-multiplexing
                            # measurements put the knee at roughly 40-60 % of the SMs (research/semipd.md §4,
                            # research/anchors.md "SGLang PD-Multiplexing"); 0.5 is the middle.
PREFILL_OVERHEAD_S = 0.002  # fixed per prefill step: scheduling, input preparation, sampling, launch gaps
DECODE_OVERHEAD_S = 0.001   # fixed per decode step (CUDA-graphed): scheduling, sampling, detokenising
MIXED_OVERHEAD_S = 0.002    # fixed per unified step (eager mixed batch)
CONTENTION = 0.10           # while the other phase runs, the share of HBM bandwidth (decode) or of issue rate
                            # (prefill) it takes away on a disjoint SM set: L2 and HBM are shared, SMs are not


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide FLOPs and bytes. `dtype_bytes` 2 = bf16 weights and KV."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        q = self.hidden * self.heads * self.hd
        kv = 2 * self.hidden * self.kv_heads * self.hd
        o = self.heads * self.hd * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp

    @property
    def matmul_params(self) -> int:
        """Parameters every token multiplies through (layers + LM head; the embedding is a lookup)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        embed = 0 if self.tied_embeddings else self.vocab * self.hidden
        return (self.matmul_params + embed) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.hd * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> float:
        """FLOPs of one (query token, key token) pair over all layers: QK^T and PV, 2 FLOPs per MAC each."""
        return 4.0 * self.layers * self.heads * self.hd


PRESETS = {
    "llama-3-8b": ModelShape("llama-3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                             vocab=128256),
    "llama-3-70b": ModelShape("llama-3-70b", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672,
                              vocab=128256),
    "qwen3-8b": ModelShape("qwen3-8b", hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288,
                           vocab=151936, head_dim=128),
}


def model_shape(spec: str) -> ModelShape:
    """A preset name or a Hugging Face config.json (or a directory holding one). ValueError names what is wrong."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model config {spec!r}: not a preset ({', '.join(PRESETS)}) and no such config.json")
    try:
        cfg = json.loads(path.read_text())
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            name=cfg.get("_name_or_path") or path.parent.name or "model", hidden=hidden,
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]), head_dim=cfg.get("head_dim"),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a usable model config ({exc})") from None


def kv_blocks_for(gpu: GPU, shape: ModelShape, block_size: int = 16, memory_fraction: float = 0.9,
                  activation_gb: float = 4.0) -> int:
    """KV blocks that fit beside the weights: `memory_fraction` of HBM, minus the weights, minus activations and
    workspace of both workers (semi-PD keeps two sets: research/semipd.md §1, "What is NOT shared")."""
    free = gpu.memory_gb * 1e9 * memory_fraction - shape.weight_bytes - activation_gb * 1e9
    return max(0, int(free // (shape.kv_bytes_per_token * block_size)))


# ---- the interface -------------------------------------------------------------------------------------------

class LatencyModel:
    """Seconds per step. `chunks`: (new tokens, tokens already in the KV cache before them) per prefill sequence;
    `batch`, `context`: decode sequences and their summed KV tokens; `share`: fraction of the SMs;
    `other_busy`: the other phase is running a step at the same time (on the rest of the SMs).
    `api_overhead_s`: what a client sees beyond the engine's own TTFT and end-to-end latency (HTTP, tokenizing,
    streaming); 0 for the roofline, measured for a calibrated profile."""
    name = "model"
    api_overhead_s = 0.0

    def prefill(self, chunks: list[tuple[int, int]], share: float, other_busy: bool = False) -> float:
        raise NotImplementedError

    def decode(self, batch: int, context: int, share: float, other_busy: bool = False) -> float:
        raise NotImplementedError

    def mixed(self, chunks: list[tuple[int, int]], batch: int, context: int) -> float:
        """One unified step on the whole GPU: the prefill chunks and every running decode in one batch."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


def attention_pairs(chunks: list[tuple[int, int]]) -> float:
    """Causal (query, key) pairs of prefill chunks: a chunk of n tokens after c cached ones attends n*c + n(n+1)/2."""
    return sum(n * c + n * (n + 1) / 2 for n, c in chunks)


class Roofline(LatencyModel):
    """Prefill compute-bound, its rate proportional to the share; decode bandwidth-bound (weights plus every KV
    token read each step) with the bandwidth a share reaches saturating at DECODE_SATURATION; a fixed overhead
    per step. Each step takes the larger of its compute and memory times (they overlap within a kernel)."""

    def __init__(self, gpu: GPU, shape: ModelShape, saturation: float = DECODE_SATURATION):
        self.gpu, self.shape, self.saturation = gpu, shape, saturation
        self.name = f"roofline {gpu.name} {shape.name}"
        self._flops = gpu.tflops * 1e12
        self._bw = gpu.hbm_tbps * 1e12 * BANDWIDTH_EFFICIENCY

    def _bandwidth(self, share: float) -> float:
        return self._bw * min(1.0, share / self.saturation)

    def _gemm(self, tokens: int, share: float, bandwidth: float) -> float:
        compute = 2.0 * self.shape.matmul_params * tokens / (self._flops * GEMM_EFFICIENCY * share)
        weights = self.shape.weight_bytes / bandwidth
        return max(compute, weights)

    def prefill(self, chunks, share, other_busy=False):
        tokens = sum(n for n, _ in chunks)
        if tokens <= 0:
            return 0.0
        s = share * (1 - CONTENTION) if other_busy else share
        attn = attention_pairs(chunks) * self.shape.attention_flops_per_pair / (self._flops * ATTENTION_EFFICIENCY * s)
        kv_read = sum(c for _, c in chunks) * self.shape.kv_bytes_per_token / self._bandwidth(share)
        return self._gemm(tokens, s, self._bandwidth(share)) + attn + kv_read + PREFILL_OVERHEAD_S

    def decode(self, batch, context, share, other_busy=False):
        if batch <= 0:
            return 0.0
        bw = self._bandwidth(share) * ((1 - CONTENTION) if other_busy else 1.0)
        kv = context * self.shape.kv_bytes_per_token / bw
        attn_compute = context * self.shape.attention_flops_per_pair / (self._flops * ATTENTION_EFFICIENCY * share)
        return self._gemm(batch, share, bw) + max(kv, attn_compute) + DECODE_OVERHEAD_S

    def mixed(self, chunks, batch, context):
        tokens = sum(n for n, _ in chunks) + batch
        if tokens <= 0:
            return 0.0
        bw = self._bandwidth(1.0)
        attn = attention_pairs(chunks) * self.shape.attention_flops_per_pair / (self._flops * ATTENTION_EFFICIENCY)
        kv = (context + sum(c for _, c in chunks)) * self.shape.kv_bytes_per_token / bw
        return self._gemm(tokens, 1.0, bw) + attn + kv + MIXED_OVERHEAD_S

    def describe(self):
        return {"name": self.name, "kind": "roofline", "gpu": self.gpu.__dict__, "model": self.shape.__dict__,
                "constants": {"gemm_efficiency": GEMM_EFFICIENCY, "attention_efficiency": ATTENTION_EFFICIENCY,
                              "bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "decode_saturation": self.saturation,
                              "prefill_overhead_s": PREFILL_OVERHEAD_S, "decode_overhead_s": DECODE_OVERHEAD_S,
                              "mixed_overhead_s": MIXED_OVERHEAD_S, "contention": CONTENTION}}


# ---- the calibrated model ------------------------------------------------------------------------------------

def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through sorted points, extrapolating the end segments linearly; one point: constant."""
    if len(xs) == 1:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class _Surface:
    """Milliseconds over (SMs, size[, context]) from a profile's rows of one phase and one column."""

    def __init__(self, points: dict[tuple[int, int, int], float]):
        self.contexts = sorted({c for _, _, c in points})
        self.grid: dict[int, dict[int, list[tuple[int, float]]]] = {}
        for (sms, size, ctx), ms in points.items():
            self.grid.setdefault(ctx, {}).setdefault(sms, []).append((size, ms))
        for by_sms in self.grid.values():
            for rows in by_sms.values():
                rows.sort()

    def at(self, sms: float, size: float, ctx: float | None) -> float:
        if ctx is None or len(self.contexts) == 1:
            return self._at_context(self.contexts[0], sms, size)
        values = [self._at_context(c, sms, size) for c in self.contexts]
        return _interp(self.contexts, values, ctx)

    def _at_context(self, ctx: int, sms: float, size: float) -> float:
        by_sms = self.grid[ctx]
        counts = sorted(by_sms)
        per = [_interp([s for s, _ in by_sms[n]], [m for _, m in by_sms[n]], size) for n in counts]
        # time is closer to linear in 1/SMs than in SMs (a/x + b, semi-PD's form): interpolate over 1/SMs
        inv = [1.0 / n for n in counts]
        order = sorted(range(len(inv)), key=lambda i: inv[i])
        return _interp([inv[i] for i in order], [per[i] for i in order], 1.0 / max(sms, 1e-9))


class Profile(LatencyModel):
    """Step times read from a profile file in sm_sweep.py's JSON format ({"meta": {...}, "rows": [...]}).

    Rows: target, prefill_sms, decode_sms, phase (prefill | decode), size (tokens | batch), alone_ms,
    with_other_ms, ... A decode row may carry "context" (KV tokens per sequence; default meta["context"], else
    1024). Several contexts: interpolated linearly in context; one: scaled by a roofline-shaped context term
    (weights plus context*KV bytes, from `shape`). The "full" target (both phases on every SM) is kept as the
    whole-GPU point and gives the unified mixed step. Interpolation is linear over 1/SMs and over size, and
    extrapolates linearly (clamped at zero). Times of a profile timed over fewer layers than the model (the
    synthetic "x1 layer(s)" workload) are scaled up by layers/profile layers. A profile made by
    bench/profile_engine.py may carry meta["calibration"] from a serving run: a factor per phase (the engine's
    mean step under real load over what the rows predict for it) and the API's own overhead per request."""

    def __init__(self, data: dict, shape: ModelShape | None = None, source: str = "profile"):
        rows = data.get("rows")
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{source}: a profile needs a non-empty \"rows\" list (sm_sweep.py --json)")
        meta = data.get("meta") or {}
        self.meta, self.shape, self.source = meta, shape, source
        self.total_sms = int(meta.get("sms") or 132)
        self.context = int(meta.get("context") or 1024)
        self.scale = 1.0
        m = re.search(r"x(\d+) layer", str(meta.get("workload", "")))
        if m and shape is not None:
            self.scale = shape.layers / int(m.group(1))
        self.name = f"profile {meta.get('device', source)}"
        pts = {(p, col): {} for p in ("prefill", "decode") for col in ("alone_ms", "with_other_ms")}
        full: dict[tuple[str, int, int], float] = {}
        for i, row in enumerate(rows):
            try:
                phase, size = row["phase"], int(row["size"])
                sms = int(row["prefill_sms"] if phase == "prefill" else row["decode_sms"])
                ctx = int(row.get("context") or self.context) if phase == "decode" else 0
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{source}: row {i} lacks phase/size/SMs ({exc})") from None
            if phase not in ("prefill", "decode"):
                raise ValueError(f"{source}: row {i}: phase must be prefill or decode, not {phase!r}")
            is_full = row.get("target") == "full" or (row.get("prefill_sms") == row.get("decode_sms") == self.total_sms)
            for col in ("alone_ms", "with_other_ms"):
                v = row.get(col)
                if isinstance(v, (int, float)) and v > 0 and math.isfinite(v):
                    if is_full:
                        if col == "alone_ms":
                            full[(phase, size, ctx)] = float(v)
                        continue
                    pts[(phase, col)][(sms, size, ctx)] = float(v)
            if is_full and row.get("alone_ms"):
                # the whole GPU is also the 100 % point of each phase alone
                pts[(phase, "alone_ms")].setdefault((self.total_sms, size, ctx), float(row["alone_ms"]))
        for phase in ("prefill", "decode"):
            if not pts[(phase, "alone_ms")]:
                raise ValueError(f"{source}: no {phase} rows with alone_ms")
        self.surfaces = {k: _Surface(v) for k, v in pts.items() if v}
        self.full = full
        cal = meta.get("calibration") or {}
        self.factors = {"prefill": float(cal.get("prefill_factor") or 1.0),
                        "decode": float(cal.get("decode_factor") or 1.0)}
        self.api_overhead_s = float(cal.get("api_overhead_ms") or 0.0) / 1000.0

    @classmethod
    def load(cls, path: str | Path, shape: ModelShape | None = None) -> "Profile":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read profile {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {path}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile {path}: expected a JSON object with \"rows\"")
        return cls(data, shape, str(path))

    def _surface(self, phase: str, other_busy: bool) -> _Surface:
        if other_busy and (phase, "with_other_ms") in self.surfaces:
            return self.surfaces[(phase, "with_other_ms")]
        return self.surfaces[(phase, "alone_ms")]

    def _context_factor(self, per_seq_ctx: float) -> float:
        """One profiled context: scale a decode step by (weights + B*ctx*KV) / (weights + B*ctx0*KV), taken per
        sequence as (w + ctx) / (w + ctx0) with w the weight bytes in KV-token units (roofline-shaped)."""
        if self.shape is None:
            return 1.0
        w = self.shape.weight_bytes / self.shape.kv_bytes_per_token / 64   # weights spread over a batch of ~64
        return (w + per_seq_ctx) / (w + self.context)

    def prefill(self, chunks, share, other_busy=False):
        tokens = sum(n for n, _ in chunks)
        if tokens <= 0:
            return 0.0
        ms = self._surface("prefill", other_busy).at(share * self.total_sms, tokens, None)
        return max(ms, 0.0) * self.scale * self.factors["prefill"] / 1000.0

    def decode(self, batch, context, share, other_busy=False):
        if batch <= 0:
            return 0.0
        surface = self._surface("decode", other_busy)
        per_seq = context / batch
        ms = surface.at(share * self.total_sms, batch, per_seq)
        if len(surface.contexts) == 1:
            ms *= self._context_factor(per_seq)
        return max(ms, 0.0) * self.scale * self.factors["decode"] / 1000.0

    def mixed(self, chunks, batch, context):
        # no profile row times a mixed batch: a prefill of the chunk's tokens plus the decode batch's tokens on the
        # whole GPU, plus the decode step's KV-dependent part (its time above a one-sequence step); documented
        tokens = sum(n for n, _ in chunks)
        prefill = self.prefill([(tokens + batch, 0)], 1.0) if tokens else 0.0
        if batch <= 0:
            return prefill
        d = self.decode(batch, context, 1.0)
        if not tokens:
            return d
        return prefill + max(0.0, d - self.decode(1, context // batch, 1.0))

    def describe(self):
        return {"name": self.name, "kind": "profile", "source": self.source, "meta": self.meta,
                "layer_scale": self.scale, "rows": sum(len(s.grid) for s in self.surfaces.values())}


def make_model(gpu: str, model_config: str = "llama-3-8b", profile: str | None = None) -> tuple[LatencyModel, GPU, ModelShape]:
    """--gpu h100|h200|profile with --model-config and --profile. ValueError names the bad value."""
    shape = model_shape(model_config)
    if gpu == "profile":
        if not profile:
            raise ValueError("--gpu profile needs --profile FILE")
        return Profile.load(profile, shape), GPUS["h100"], shape
    if gpu not in GPUS:
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, profile (not {gpu!r})")
    return Roofline(GPUS[gpu], shape), GPUS[gpu], shape
