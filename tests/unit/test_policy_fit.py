"""The online latency models recover known parameters from synthetic samples, and refuse data that cannot pin
them down."""
import json
import random
import subprocess
import sys

import pytest

from semipd.policy import fit

pytestmark = pytest.mark.unit

A1, B1, K = 0.05, 0.02, 0.0004        # TTFT = 0.05 / (x - 0.0004 P) + 0.02
A2, B2 = 0.01, 0.005                  # TPOT = 0.01 / y + 0.005


def ttft_samples(rng, n=40, noise=0.02):
    out = []
    while len(out) < n:
        x, p = rng.choice([0.3, 0.4, 0.5, 0.6, 0.7, 0.8]), rng.uniform(0, 1200)
        if x - K * p < 0.05:
            continue
        out.append((0.0, x, p, (A1 / (x - K * p) + B1) * (1 + rng.gauss(0, noise))))
    return out


def test_ttft_fit_recovers_a1_b1_and_the_load_coefficient():
    model = fit.fit_ttft(ttft_samples(random.Random(1)), now=0.0)
    assert model is not None and model.r2 > 0.95
    assert model.a1 == pytest.approx(A1, rel=0.15)
    assert model.b1 == pytest.approx(B1, abs=0.01)
    assert model.k == pytest.approx(K, rel=0.15)
    # and it predicts where it was not sampled
    assert model.predict(0.65, 900) == pytest.approx(A1 / (0.65 - K * 900) + B1, rel=0.15)


def test_ttft_capacity_is_the_load_at_which_the_target_is_reached():
    model = fit.TTFTModel(A1, B1, K, 1.0, 10)
    cap = model.capacity(0.7, 0.5)
    assert model.predict(0.7, cap) == pytest.approx(0.5)
    assert model.capacity(0.7, 0.01) == 0.0           # below b1: out of reach even unloaded
    assert fit.TTFTModel(A1, B1, 0.0, 1.0, 10).capacity(0.7, 0.5) == float("inf")


def test_tpot_fit_recovers_a2_b2():
    rng = random.Random(2)
    samples = [(0.0, y, (A2 / y + B2) * (1 + rng.gauss(0, 0.02))) for y in (0.2, 0.3, 0.5, 0.7) for _ in range(5)]
    model = fit.fit_tpot(samples, now=0.0)
    assert model is not None and model.r2 > 0.95
    assert model.a2 == pytest.approx(A2, rel=0.1)
    assert model.b2 == pytest.approx(B2, abs=0.002)
    assert model.min_share(0.05) == pytest.approx(A2 / (0.05 - B2), rel=0.1)


def test_one_split_only_or_too_few_samples_gives_no_model():
    same_split = [(0.0, 0.5, p, A1 / (0.5 - K * p) + B1) for p in range(0, 1000, 100)]
    assert fit.fit_ttft(same_split, now=0.0) is None
    assert fit.fit_ttft(ttft_samples(random.Random(3), n=fit.MIN_SAMPLES - 1), now=0.0) is None
    assert fit.fit_tpot([(0.0, 0.5, 0.02), (0.0, 0.5, 0.021)] * 4, now=0.0) is None


def test_noise_without_structure_is_not_trusted():
    rng = random.Random(4)
    noise = [(0.0, rng.choice([0.3, 0.6]), rng.uniform(0, 500), rng.uniform(0.1, 1.0)) for _ in range(30)]
    assert fit.fit_ttft(noise, now=0.0) is None


def test_recent_samples_outweigh_old_ones():
    old = [(0.0, y, 2 * (A2 / y + B2)) for y in (0.3, 0.5, 0.7)] * 3      # the workload was twice as heavy
    new = [(3600.0, y, A2 / y + B2) for y in (0.3, 0.5, 0.7)] * 3
    model = fit.fit_tpot(old + new, now=3600.0)
    assert model.predict(0.5) == pytest.approx(A2 / 0.5 + B2, rel=0.05)


def test_distinct_counts_splits_one_sm_group_apart():
    assert fit.distinct([0.48, 0.485, 0.49], 0.03) == 1
    assert fit.distinct([0.42, 0.485, 0.545], 0.03) == 3


def test_slope_of_a_linear_ramp():
    assert fit.slope([(t, 100 + 5 * t) for t in range(0, 50, 10)]) == pytest.approx(5)
    assert fit.slope([(0, 1), (1, 2)]) == 0.0


def test_the_policy_imports_without_torch():
    code = "import sys, semipd.policy; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'kubernetes', 'kopf', 'httpx'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
