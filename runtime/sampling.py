"""Sampling parameters and the batched sampler (logit bias, presence/frequency/repetition penalties, greedy,
temperature, top-k, top-p, per-request seeds) and the logprobs of what was sampled. Every step is one batched
tensor operation over the rows that ask for it; rows that ask for nothing special cost nothing extra."""
from dataclasses import dataclass, field

import torch

from semipd.runtime.guided import advance, apply_grammar_masks

GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20              # top alternatives a request may ask for (OpenAI's top_logprobs limit)


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
    presence_penalty: float = 0.0     # minus this for every token already generated (OpenAI, vLLM)
    frequency_penalty: float = 0.0    # minus this times how often a token was generated
    repetition_penalty: float = 1.0   # divides positive, multiplies negative logits of prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None       # None: none; k: the sampled token's logprob and the k most likely
    guided: object = None             # a compiled grammar (runtime/guided.py) the output must follow

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:       # 0, as OpenAI allows: only the most likely token (see _restricted_draw)
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and softmax to NaN; vLLM treats such values as greedy.
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           histories: list[tuple[list[int], list[int]]] | None = None) -> list[int]:
    """Next token per row of logits [N, V] (float32). Seeded rows draw from their own generator, so a seed gives
    the same text whatever else shares the batch. `histories`: each row's (prompt ids, output ids), read only by
    the penalties."""
    logits = _apply_logit_bias(logits, params)
    if histories is not None:
        logits = _apply_penalties(logits, params, histories)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.all()):
        return logits.argmax(dim=-1).tolist()
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                         device=logits.device, dtype=logits.dtype)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    out = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    rows = torch.tensor(sampled, device=logits.device)
    uniforms = _uniforms([generators[i] for i in sampled], logits.device)
    out[rows] = _draw(probs[rows], [params[i] for i in sampled], uniforms)
    return out.tolist()


TOP_CANDIDATES = 1024          # a row's top-k / nucleus is looked for among its most likely tokens first


def _uniforms(generators: list, device) -> torch.Tensor:
    """One uniform draw per row: a seeded row's from its own generator, so its tokens do not depend on the
    batch; the rest from the global generator in one call."""
    u = torch.rand(len(generators), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    return u


def _draw(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling (one cumsum and one search per row, not torch.multinomial) of each row's token,
    after top-k and then top-p (renormalised within top-k, as vLLM does). The restriction is computed on the
    TOP_CANDIDATES most likely tokens (one topk, no sort of the vocabulary); a row whose nucleus is wider than
    that is drawn from its full sort."""
    vocab = probs.shape[1]
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=probs.device)
    ps = torch.tensor([p.top_p for p in params], device=probs.device, dtype=probs.dtype)
    restricted = (ks < vocab) | (ps < 1)
    out = _inverse_cdf(probs, u)
    if not bool(restricted.any()):
        return out
    rows = restricted.nonzero()[:, 0]
    finite_ks = [k for k in ks[rows].tolist() if k < vocab]
    candidates = min(vocab, max([TOP_CANDIDATES, *finite_ks]))
    values, ids = probs[rows].topk(candidates, dim=-1)
    token, complete = _restricted_draw(values, ids, ks[rows], ps[rows], u[rows])
    if not bool(complete.all()):                  # nucleus wider than the candidates: sort those rows in full
        wide = (~complete).nonzero()[:, 0]
        values_all, ids_all = probs[rows[wide]].sort(dim=-1, descending=True)
        token[wide], _ = _restricted_draw(values_all, ids_all, ks[rows[wide]], ps[rows[wide]], u[rows[wide]])
    out[rows] = token
    return out


def _restricted_draw(values, ids, ks, ps, u):
    """values/ids: each row's most likely tokens, descending. A token stays if it is within top-k and the mass
    before it (of the top-k's renormalised mass) has not yet reached top_p; the most likely always stays.
    Returns the tokens drawn, and whether each row's kept set was decided within these candidates."""
    width = values.shape[1]
    in_top_k = torch.arange(width, device=values.device)[None, :] < ks[:, None]
    kept = values * in_top_k
    cum = kept.cumsum(dim=-1)
    within = ks <= width                       # the row's whole top-k is among the candidates
    total = torch.where(within, cum[:, -1], torch.ones_like(ps))   # no top-k: the vocabulary's mass, 1
    keep = in_top_k & ((cum - kept) < ps[:, None] * total[:, None])
    keep[:, 0] = True
    complete = within | (cum[:, -1] >= ps)     # otherwise the nucleus may reach past the candidates
    j = _inverse_cdf(values * keep, u)
    return ids.gather(1, j[:, None])[:, 0], complete


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = weights.cumsum(dim=-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    return j.clamp_(max=weights.shape[1] - 1)


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    pairs = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias.items()]
    if not pairs:
        return logits
    rows, tokens, biases = zip(*pairs)
    logits = logits.clone()
    logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)),
                      torch.tensor(biases, device=logits.device, dtype=logits.dtype), accumulate=True)
    return logits


def _apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                     histories: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """vLLM's semantics: presence and frequency count generated tokens only; repetition counts prompt and output."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    outputs = _padded([histories[i][1] for i in rows], vocab, dev)
    counts = torch.zeros(len(rows), vocab + 1, device=dev, dtype=logits.dtype)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
    counts = counts[:, :vocab]
    prompts = _padded([histories[i][0] for i in rows], vocab, dev)
    seen = torch.zeros(len(rows), vocab + 1, device=dev, dtype=torch.bool)
    seen.scatter_(1, prompts, True)
    seen = seen[:, :vocab] | (counts > 0)
    column = lambda name: torch.tensor([getattr(params[i], name) for i in rows], device=dev,  # noqa: E731
                                       dtype=logits.dtype)[:, None]
    sub = logits[rows]
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    logits = logits.clone()
    logits[rows] = sub
    return logits


def _padded(lists: list[list[int]], pad: int, device) -> torch.Tensor:
    """Rows of token ids padded with `pad` (a spare column past the vocabulary, dropped after scattering)."""
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], device=device, dtype=torch.int64)


@dataclass(slots=True)
class TokenLogprobs:
    logprob: float                       # of the sampled token
    top: list[tuple[int, float]]         # the k most likely tokens and their logprobs, most likely first


def logprobs_of(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    """The model's own log-probabilities (a log-softmax of the raw logits, before bias, penalties and
    temperature, as vLLM reports them) of each row's sampled token and of its k most likely ones."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=lp.device)[:, None])[:, 0].tolist()
    k = max(params[i].logprobs for i in rows)
    top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        out[i] = TokenLogprobs(chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
    return out


@dataclass(slots=True)
class Sampled:
    token: int
    logprobs: TokenLogprobs | None = None
    grammar_done: bool = False        # the request's grammar is complete: nothing may follow


def sample_step(logits: torch.Tensor, seqs) -> list[Sampled]:
    """One worker step's sampling for its sequences (anything with params, generator, grammar, prompt_token_ids
    and output_token_ids): grammar masks first (filled on the CPU while the device may still be computing),
    histories gathered only when a row is penalized, logprobs only when one asks."""
    params = [s.params for s in seqs]
    matchers = [s.grammar for s in seqs]
    constrained = any(m is not None for m in matchers)
    masked = apply_grammar_masks(logits, matchers) if constrained else logits
    histories = ([(s.prompt_token_ids, s.output_token_ids) for s in seqs]
                 if any(p.penalized for p in params) else None)
    tokens = sample(masked, params, [s.generator for s in seqs], histories)
    done = advance(matchers, tokens) if constrained else [False] * len(tokens)
    logprobs = (logprobs_of(logits, tokens, params) if any(p.logprobs is not None for p in params)
                else [None] * len(tokens))
    return [Sampled(t, lp, d) for t, lp, d in zip(tokens, logprobs, done)]
