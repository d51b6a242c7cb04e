"""The penalties' incremental token counts (sampling.TokenCounts) against the counts rebuilt from each row's
whole history every step, over seeded random schedules: batches that change, rows that skip steps or get
several tokens at once (a preempted request, a first token from prefill), penalized rows mixed with plain ones,
tokens at both ends of the vocabulary and tables that outgrow their first capacity."""
import random

import pytest
import torch

from semipd.runtime.sampling import SamplingParams, TokenCounts, _apply_penalties, sample_step, token_counts
from semipd.runtime.sequence import Sequence

pytestmark = pytest.mark.unit


def rebuilt_penalties(logits, params, histories):
    """The penalties as the sampler computed them before the counts were kept: dense [rows, vocab] counts and
    seen-masks rebuilt from every (prompt, output) history (vLLM's semantics)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    vocab = logits.shape[1]
    counts = torch.zeros(len(rows), vocab)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for j, i in enumerate(rows):
        prompt, output = histories[i]
        for t in output:
            counts[j, t] += 1
        seen[j, prompt] = True
    seen |= counts > 0
    column = lambda name: torch.tensor([getattr(params[i], name) for i in rows])[:, None]  # noqa: E731
    sub = logits[rows]
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    out = logits.clone()
    out[rows] = sub
    return out


def request(params: SamplingParams, prompt: list[int]) -> Sequence:
    """A request as the sampler sees it: the engine's own Sequence."""
    return Sequence("test", prompt, params, lambda out: None, torch.device("cpu"))


def random_params(rng):
    if rng.random() < 0.3:
        return SamplingParams(temperature=0)                      # plain: no counts kept
    return SamplingParams(temperature=0, presence_penalty=rng.choice([0.0, 0.5, -1.0]),
                          frequency_penalty=rng.choice([0.0, 0.3, 2.0]),
                          repetition_penalty=rng.choice([1.0, 1.3, 0.7]))


@pytest.mark.parametrize("seed", range(12))
def test_kept_counts_penalize_exactly_as_counts_rebuilt_from_the_history(seed):
    rng = random.Random(seed)
    vocab = rng.choice([7, 50, 1000])
    edge = [0, vocab - 1]
    rows = [request(random_params(rng), [rng.choice(edge + list(range(vocab))) for _ in range(rng.randint(1, 60))])
            for _ in range(rng.randint(2, 10))]
    for step in range(40):
        batch = [r for r in rows if rng.random() < 0.8] or rows[:1]        # some rows sit a step out
        for r in batch:                                                   # usually one new token, sometimes more
            r.output_token_ids += [rng.choice(edge + list(range(vocab))) for _ in range(rng.choice([0, 1, 1, 3]))]
        logits = torch.randn(len(batch), vocab, generator=torch.Generator().manual_seed(seed * 100 + step))
        params = [r.params for r in batch]
        kept = [token_counts(r) if r.params.penalized else None for r in batch]
        want = rebuilt_penalties(logits, params, [(r.prompt_token_ids, r.output_token_ids) for r in batch])
        assert torch.equal(_apply_penalties(logits, params, kept), want), f"seed {seed}, step {step}"


def test_counts_grow_past_their_first_capacity_and_stay_per_token():
    counts = TokenCounts([5, 5, 9])
    output = list(range(100, 200)) + [5, 100, 100]
    counts.update(output[:40])
    counts.update(output)
    got = dict(zip(counts.tokens.tolist(), counts.counts.tolist()))
    assert got[5] == 1 and got[9] == 0 and got[100] == 3 and got[150] == 1
    assert sorted(got) == sorted({5, 9, *range(100, 200)}) and counts.counted == len(output)


def test_sample_step_keeps_counts_only_for_penalized_rows_and_brings_them_up_to_date():
    penalized = request(SamplingParams(temperature=0, frequency_penalty=2.0), [1, 2, 3])
    plain = request(SamplingParams(temperature=0), [1, 2, 3])
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 4.0]] * 2)
    for _ in range(3):
        for row, s in zip((penalized, plain), sample_step(logits, [penalized, plain])):
            row.output_token_ids.append(s.token)
    # frequency 2.0: token 4 drops below 5 after one use, and 5 below 4's 3.0 after one more
    assert penalized.output_token_ids == [4, 5, 4] and plain.output_token_ids == [4, 4, 4]
    assert plain.token_counts is None and penalized.token_counts.counted == 2
