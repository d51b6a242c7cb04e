import pytest
import torch

from semipd.runtime.sampling import SamplingParams, sample

pytestmark = pytest.mark.unit


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert sample(logits, [SamplingParams(temperature=0)] * 4, [None] * 4) == logits.argmax(-1).tolist()


def test_seed_reproducible_whatever_shares_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    g_alone = gen(7)
    alone = [sample(logits[1:2], [p], [g_alone])[0] for _ in range(20)]
    g_mixed = gen(7)
    mixed = [sample(logits, [SamplingParams(temperature=0), p, SamplingParams(temperature=0.8)],
                    [None, g_mixed, None])[1] for _ in range(20)]
    assert mixed == alone
    assert len(set(alone)) > 1                 # it really samples: a fixed answer would pass the line above


def test_top_k_one_and_tiny_or_zero_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 64)
    best = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 8, [None] * 8) == best
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 8, [None] * 8) == best
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=0)] * 8, [None] * 8) == best


def test_top_k_never_leaves_the_k_best():
    torch.manual_seed(2)
    logits = torch.randn(1, 64).repeat(200, 1)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = sample(logits, [SamplingParams(temperature=2.0, top_k=3)] * 200, [None] * 200)
    assert set(drawn) <= top3 and len(set(drawn)) > 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(top_k=-2),
                                    dict(max_tokens=0)])
def test_bad_params_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two, the third never appears
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    params = [SamplingParams(temperature=1.0, top_p=0.7) for _ in range(400)]
    tokens = sample(logits, params, [gen(i) for i in range(400)])
    assert set(tokens) == {0, 1}


def test_a_vanishing_temperature_is_greedy_not_a_crash():
    # 1e-40 passes as a float but logits / 1e-40 overflow to inf and softmax to NaN
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-6), SamplingParams(temperature=0)]
    assert all(p.greedy for p in params)
    assert sample(logits, params, [None, gen(1), None]) == logits.argmax(-1).tolist()


def _expected(probs, top_k, top_p):
    """The kept distribution by definition: top-k, renormalise, keep while the mass before is below top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k > 0 else order
    mass = sum(probs[i] for i in kept)
    out, before = {}, 0.0
    for i in kept:
        if before >= top_p * mass and out:
            break
        out[i] = probs[i]
        before += probs[i]
    total = sum(out.values())
    return {i: v / total for i, v in out.items()}


@pytest.mark.parametrize("candidates", [1024, 3])      # 3: every nucleus is wider, so the full-sort path runs
@pytest.mark.parametrize("top_k,top_p", [(-1, 0.7), (5, 1.0), (6, 0.5), (-1, 1.0)])
def test_draws_follow_the_top_k_top_p_distribution(monkeypatch, candidates, top_k, top_p):
    import semipd.runtime.sampling as sampling
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", candidates)
    probs = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.02]
    logits = torch.tensor(probs).log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)] * 4000
    torch.manual_seed(0)
    drawn = sample(logits, params, [None] * 4000)
    expected = _expected(probs, top_k, top_p)
    assert set(drawn) <= set(expected)
    for token, p in expected.items():
        assert abs(drawn.count(token) / 4000 - p) < 0.03, (token, drawn.count(token) / 4000, p)
