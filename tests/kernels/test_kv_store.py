import pytest
import torch

from kernel_cases import DTYPES, LAYOUTS, kv_cache_in_layout
from semipd.kernels import load_ops

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, head_dim", [(1, 64), (3, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)  # the reference takes another path for strided caches
def test_store_kv_matches_reference_and_leaves_other_slots(dtype, num_heads, head_dim, layout):
    num_blocks, block_size, tokens = 4, 16, 6
    gen = torch.Generator().manual_seed(1)
    # key/value are slices of a wider projection output, as in the model (strided token axis).
    kv = torch.randn(tokens, 2 * num_heads + 1, head_dim, generator=gen).to(dtype)
    key, value = kv[:, :num_heads], kv[:, num_heads:2 * num_heads]
    slots = torch.tensor([0, 17, -1, 63, 5, -1], dtype=torch.int64)  # padding twice, last slot of the cache
    shape = (num_blocks, block_size, num_heads, head_dim)
    caches = []
    for _ in range(2):  # one (k, v) pair per backend, laid out as the parameter says
        caches += kv_cache_in_layout(torch.full(shape, float("nan"), dtype=dtype),
                                     torch.full(shape, float("nan"), dtype=dtype), layout)
    if layout == "fused" or (layout == "head_major" and num_heads > 1):  # one head transposed is contiguous
        assert not any(c.is_contiguous() for c in caches)
    triton_ops.store_kv(key, value, caches[0], caches[1], slots)
    ref.store_kv(key, value, caches[2], caches[3], slots)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    for cache, new in zip(caches, (key, value, key, value)):
        for t, slot in enumerate(slots.tolist()):
            if slot >= 0:  # a copy in the cache's own dtype: exact
                assert torch.equal(cache[slot // block_size, slot % block_size], new[t])
        assert cache.flatten(0, 1)[~written].isnan().all()  # nothing else touched, padding included


def test_store_kv_converts_to_cache_dtype():
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(1, 1, 8)
    triton_ops.store_kv(key, key, k_cache, v_cache, torch.tensor([6]))
    assert torch.equal(k_cache[1, 2], key[0].half())
