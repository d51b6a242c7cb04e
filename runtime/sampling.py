"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, per-request seeds)."""
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1                   # -1 or 0: off
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:       # 0, as OpenAI allows: only the most likely token (see _apply_top_p)
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and softmax to NaN; vLLM treats such values as greedy.
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """Next token per row of logits [N, V] (float32). Seeded rows draw from their own generator, so a seed gives
    the same text whatever else shares the batch."""
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.all()):
        return logits.argmax(dim=-1).tolist()
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                         device=logits.device, dtype=logits.dtype)
    scaled = logits / temps[:, None]
    scaled = _apply_top_k(scaled, [p.top_k for p in params])
    scaled = _apply_top_p(scaled, [p.top_p for p in params])
    probs = torch.softmax(scaled, dim=-1)
    out = logits.argmax(dim=-1)
    unseeded = [i for i, (p, g) in enumerate(zip(params, generators)) if not p.greedy and g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=logits.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy and g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g).squeeze(0)
    return out.tolist()


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if all(k == vocab for k in ks):
        return logits
    k_t = torch.tensor(ks, device=logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k_t - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    p_t = torch.tensor(top_ps, device=logits.device, dtype=logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token once the mass before it already reaches top_p; the most likely token always stays
    drop = (cum - sorted_logits.softmax(dim=-1)) >= p_t[:, None]
    drop[:, 0] = False          # the mass before it is 0, which a top_p of 0 would otherwise reach
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
