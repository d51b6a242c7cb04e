"""The torch references are the ground truth for the Triton kernels, so they are checked here against
independent dense computations and against transformers itself."""
import pytest
import torch
import torch.nn.functional as F

from kernel_cases import assert_close, dense_attention, make_paged_kv
from semipd.kernels import build_cos_sin_cache, load_ops

pytestmark = pytest.mark.kernels
ref = load_ops("torch")


def test_load_ops_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        load_ops("cuda")


def test_store_kv_writes_slots_and_skips_padding():
    num_blocks, block_size, heads, dim = 4, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, heads, dim)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(3, heads, dim), torch.randn(3, heads, dim)
    slots = torch.tensor([9, -1, 2])  # block 2 offset 1, padding, block 0 offset 2
    ref.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[0, 2], value[2])
    assert k_cache.count_nonzero() == 2 * heads * dim  # the padding row went nowhere


@pytest.mark.parametrize("group", [1, 4])
def test_decode_reference_matches_dense(group):
    seq_lens = [1, 7, 16, 33]
    kv = make_paged_kv(seq_lens, 2, 16, 8, torch.float32)
    q = torch.randn(len(seq_lens), 2 * group, 16)
    out = ref.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.25)
    for b in range(len(seq_lens)):
        expected = dense_attention(q[b:b + 1], kv.dense_k[b], kv.dense_v[b], 0.25)[0].float()
        assert_close(out[b], expected)


def test_decode_reference_zero_length_gives_zeros():
    kv = make_paged_kv([5, 0], 1, 8, 4, torch.float32)
    out = ref.decode_attention(torch.randn(2, 2, 8), kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0)
    assert torch.equal(out[1], torch.zeros(2, 8)) and out[0].abs().sum() > 0


def test_prefill_reference_matches_dense_with_cached_prefix():
    seq_lens, q_lens = [5, 19, 8], [5, 6, 1]  # fresh prompt, chunk after a 13-token prefix, one token
    kv = make_paged_kv(seq_lens, 2, 16, 4, torch.float32)
    cu = torch.tensor([0, 5, 11, 12], dtype=torch.int32)
    q = torch.randn(12, 8, 16)
    out = ref.prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, 6, 0.3)
    for b in range(3):
        qb = q[cu[b]:cu[b + 1]]
        expected = dense_attention(qb, kv.dense_k[b], kv.dense_v[b], 0.3, causal_offset=seq_lens[b] - q_lens[b])
        assert_close(out[cu[b]:cu[b + 1]], expected.float())


def test_prefill_reference_equals_sdpa_causal_on_fresh_prompt():
    kv = make_paged_kv([11], 4, 32, 4, torch.float32)
    q = torch.randn(11, 4, 32)
    out = ref.prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables,
                                torch.tensor([0, 11], dtype=torch.int32), kv.seq_lens, 11, 32 ** -0.5)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), kv.dense_k[0].transpose(0, 1),
                                              kv.dense_v[0].transpose(0, 1), is_causal=True)
    assert_close(out, expected.transpose(0, 1))


def test_rms_norm_reference_matches_hf_in_float32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, res = torch.randn(5, 64), torch.randn(5, 64)
    hf = LlamaRMSNorm(64, eps=1e-6)
    hf.weight.data = torch.randn(64)
    assert_close(ref.rms_norm(x, hf.weight.data, 1e-6), hf(x).detach())
    out, summed = ref.rms_norm(x, hf.weight.data, 1e-6, residual=res)
    assert_close(summed, x + res)
    assert_close(out, hf(x + res).detach())


def test_rms_norm_reference_keeps_residual_sum_in_model_dtype():
    x, res = torch.randn(3, 32).half(), torch.randn(3, 32).half()
    out, summed = ref.rms_norm(x, torch.ones(32).half(), 1e-5, residual=res)
    assert out.dtype == summed.dtype == torch.float16
    assert torch.equal(summed, x + res)


def test_rotary_reference_matches_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cache = build_cos_sin_cache(16, 64, 10000.0)
    positions = torch.tensor([0, 3, 63, 17])
    q, k = torch.randn(4, 4, 16), torch.randn(4, 2, 16)
    cos_half, sin_half = cache[positions, :8], cache[positions, 8:]
    cos, sin = torch.cat((cos_half, cos_half), -1), torch.cat((sin_half, sin_half), -1)
    # HF works on [batch, heads, seq, dim]; unsqueeze_dim=1 broadcasts cos/sin over heads.
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    rq, rk = ref.rotary_embedding(positions, q, k, cache)
    assert_close(rq, hq[0].transpose(0, 1))
    assert_close(rk, hk[0].transpose(0, 1))


def test_silu_and_mul_reference():
    x = torch.randn(3, 10)
    assert_close(ref.silu_and_mul(x), x[:, :5] * torch.sigmoid(x[:, :5]) * x[:, 5:])


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 2.0},
                                     LLAMA3, {"rope_type": "default"}])
def test_cos_sin_cache_matches_transformers_rotary_embedding(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    kwargs = dict(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                  max_position_embeddings=131072)
    if scaling:
        kwargs["rope_scaling"] = dict(scaling)
    hf = LlamaRotaryEmbedding(LlamaConfig(**kwargs))
    assert hf.attention_scaling == 1.0
    positions = torch.tensor([0, 1, 7, 1000, 8191, 65537, 131071])
    cos, sin = hf(torch.zeros(1, len(positions), 128), positions[None])
    cache = build_cos_sin_cache(128, 131072, 500000.0, scaling)
    assert cache.shape == (131072, 128) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[positions, :64], cos[0, :, :64], atol=0, rtol=0)
    torch.testing.assert_close(cache[positions, 64:], sin[0, :, :64], atol=0, rtol=0)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope scaling"),
    ({"rope_type": "linear"}, "missing 'factor'"),
    ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, "missing 'low_freq_factor'"),
])
def test_cos_sin_cache_rejects_bad_scaling(scaling, message):
    with pytest.raises(ValueError, match=message):
        build_cos_sin_cache(64, 16, 10000.0, scaling)


def test_cos_sin_cache_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        build_cos_sin_cache(63, 16, 10000.0)
