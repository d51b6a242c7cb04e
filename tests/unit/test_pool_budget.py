import pytest

from semipd.runtime.model_runner import kv_pool_budget

pytestmark = pytest.mark.unit
GiB = 2**30


def test_the_pool_gets_the_share_less_what_is_in_use_and_what_steps_need():
    # 80 GiB device, 16 GiB in use (weights), 0.9 share, 2 GiB activations + graphs: 72 - 16 - 2
    assert kv_pool_budget(80 * GiB, 64 * GiB, 0.9, 2 * GiB) == int(0.9 * 80 * GiB) - 16 * GiB - 2 * GiB


def test_another_process_counts_against_the_share_and_the_pool_never_exceeds_what_is_free():
    # 40 GiB held by another process and 16 by our weights: 72 - 56 - 2
    assert kv_pool_budget(80 * GiB, 24 * GiB, 0.9, 2 * GiB) == int(0.9 * 80 * GiB) - 56 * GiB - 2 * GiB
    # a share of 1.0 still leaves what the steps need
    assert kv_pool_budget(80 * GiB, 10 * GiB, 1.0, 1 * GiB) == 9 * GiB


def test_nothing_left_is_zero_not_negative():
    assert kv_pool_budget(80 * GiB, 4 * GiB, 0.5, 1 * GiB) == 0
