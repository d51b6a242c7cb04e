import pytest
import torch

from kernel_cases import DTYPES, assert_close
from semipd.kernels import load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, head_dim", [(1, 64), (3, 128)])
def test_store_kv_matches_reference_and_leaves_other_slots(dtype, num_heads, head_dim):
    num_blocks, block_size, tokens = 4, 16, 6
    gen = torch.Generator().manual_seed(1)
    # key/value are slices of a wider projection output, as in the model (strided token axis).
    kv = torch.randn(tokens, 2 * num_heads + 1, head_dim, generator=gen).to(dtype)
    key, value = kv[:, :num_heads], kv[:, num_heads:2 * num_heads]
    slots = torch.tensor([0, 17, -1, 63, 5, -1], dtype=torch.int64)  # padding twice, last slot of the cache
    caches = [torch.full((num_blocks, block_size, num_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    triton_ops.store_kv(key, value, caches[0], caches[1], slots)
    ref.store_kv(key, value, caches[2], caches[3], slots)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    for got, expected in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat_got, flat_expected = got.flatten(0, 1), expected.flatten(0, 1)
        assert_close(flat_got[written], flat_expected[written])
        assert flat_got[~written].isnan().all()  # nothing else touched, padding included
    assert_close(caches[0][1, 1], key[1])


def test_store_kv_converts_to_cache_dtype():
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(1, 1, 8)
    triton_ops.store_kv(key, key, k_cache, v_cache, torch.tensor([6]))
    assert torch.equal(k_cache[1, 2], key[0].half())
