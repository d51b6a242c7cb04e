"""Sampling parameters and the batched sampler (logit bias, presence/frequency/repetition penalties, greedy,
temperature, top-k, top-p, per-request seeds) and the logprobs of what was sampled. Every step is one batched
tensor operation over the rows that ask for it; rows that ask for nothing special cost nothing extra.

Penalties read each row's TokenCounts: its distinct prompt and output tokens with their output counts, built
once at the sequence's first sampling and extended by the tokens added since, so a step's penalty work is
O(distinct tokens in the batch), neither O(history) rebuilt nor O(batch x vocabulary)."""
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
    longest_stop: int = field(init=False, repr=False, compare=False, default=0)   # the text held back, per token

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
        self.longest_stop = max(map(len, self.stop), default=0)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and softmax to NaN; vLLM treats such values as greedy.
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           counts: list["TokenCounts | None"] | None = None) -> list[int]:
    """Next token per row of logits [N, V] (float32). Seeded rows draw from their own generator, so a seed gives
    the same text whatever else shares the batch. `counts`: each penalized row's TokenCounts (None for the
    others), read only by the penalties."""
    logits = _apply_logit_bias(logits, params)
    if counts is not None:
        logits = _apply_penalties(logits, params, counts)
    if all(p.greedy for p in params):
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


class TokenCounts:
    """One sequence's history as the penalties read it: every distinct token of its prompt and output (the
    repetition penalty's set) and how often its output holds each (presence and frequency count output only,
    as in vLLM). Built once from the prompt; `update` adds the output tokens appended since the last call,
    about one per step. Host memory, O(distinct tokens), never O(vocabulary)."""

    def __init__(self, prompt_token_ids: list[int]):
        distinct = torch.tensor(prompt_token_ids, dtype=torch.int64).unique()
        self.size = len(distinct)
        self._tokens = torch.zeros(max(16, 2 * self.size), dtype=torch.int64)
        self._counts = torch.zeros_like(self._tokens, dtype=torch.float32)
        self._tokens[:self.size] = distinct
        self._views = self._tokens.numpy(), self._counts.numpy()   # element updates without tensor indexing
        self._entry = dict(zip(distinct.tolist(), range(self.size)))
        self.counted = 0                  # output tokens already counted

    @property
    def tokens(self) -> torch.Tensor:
        return self._tokens[:self.size]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[:self.size]

    def update(self, output_token_ids: list[int]) -> None:
        for token in output_token_ids[self.counted:]:
            entry = self._entry.get(token)
            if entry is None:
                entry = self._add(token)
            self._views[1][entry] += 1
        self.counted = len(output_token_ids)

    def _add(self, token: int) -> int:
        if self.size == len(self._tokens):
            self._tokens = torch.cat([self._tokens, torch.zeros_like(self._tokens)])
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._views = self._tokens.numpy(), self._counts.numpy()
        entry = self._entry[token] = self.size
        self._views[0][entry] = token
        self.size += 1
        return entry


def token_counts(seq) -> TokenCounts:
    """seq's TokenCounts, made at its first sampling and brought up to date with its output."""
    if seq.token_counts is None:
        seq.token_counts = TokenCounts(seq.prompt_token_ids)
    seq.token_counts.update(seq.output_token_ids)
    return seq.token_counts


def _apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                     counts: list[TokenCounts | None]) -> torch.Tensor:
    """vLLM's semantics: presence and frequency count generated tokens only; repetition counts prompt and output.
    Only the (row, token) entries of each row's TokenCounts can change, so only they are computed: gathered,
    penalized and written back into a copy of the logits."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    tokens = torch.cat([counts[i].tokens for i in rows]).to(dev)
    output_counts = torch.cat([counts[i].counts for i in rows]).to(dev, logits.dtype)
    sizes = torch.tensor([counts[i].size for i in rows], device=dev)
    per_entry = lambda values, dtype: torch.tensor(values, device=dev, dtype=dtype).repeat_interleave(  # noqa: E731
        sizes, output_size=len(tokens))
    # Entries as flat offsets into the logits: index_select and index_copy_ on one dimension are many times
    # faster on CPU than two-tensor advanced indexing, and a row's entries are distinct, so no offset repeats.
    flat = per_entry(rows, torch.int64) * vocab + tokens
    column = lambda name: per_entry([getattr(params[i], name) for i in rows], logits.dtype)  # noqa: E731
    logits = logits.contiguous()
    values = logits.view(-1).index_select(0, flat)
    rep = column("repetition_penalty")
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - column("frequency_penalty") * output_counts - column("presence_penalty") * (output_counts > 0)
    return logits.clone().view(-1).index_copy_(0, flat, values).view(logits.shape)


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
    """One worker step's sampling for its sequences (anything with params, generator, grammar, prompt_token_ids,
    output_token_ids and token_counts): grammar masks first (filled on the CPU while the device may still be
    computing), token counts kept only for penalized rows, logprobs only when one asks."""
    params = [s.params for s in seqs]
    matchers = [s.grammar for s in seqs]
    constrained = any(m is not None for m in matchers)
    masked = apply_grammar_masks(logits, matchers) if constrained else logits
    counts = ([token_counts(s) if p.penalized else None for s, p in zip(seqs, params)]
              if any(p.penalized for p in params) else None)
    tokens = sample(masked, params, [s.generator for s in seqs], counts)
    done = advance(matchers, tokens) if constrained else [False] * len(tokens)
    logprobs = (logprobs_of(logits, tokens, params) if any(p.logprobs is not None for p in params)
                else [None] * len(tokens))
    return [Sampled(t, lp, d) for t, lp, d in zip(tokens, logprobs, done)]
