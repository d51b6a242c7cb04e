import pytest
import torch
import triton

from kernel_cases import DTYPES, LAYOUTS, assert_close, kv_cache_in_layout, make_paged_kv
from semipd.kernels import load_ops
from semipd.kernels.prefill_attention import SMEM_BUDGET, _config, _min_rows, _shared_bytes

pytestmark = pytest.mark.kernels
triton_ops, ref = load_ops("triton"), load_ops("torch")


def _case(q_lens, seq_lens, group, num_kv_heads, head_dim, dtype, block_size=16):
    """Sequence b has seq_lens[b] tokens in the cache, of which the last q_lens[b] are the new queries."""
    kv = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=sum(seq_lens) + group)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(5)).to(dtype)
    return (q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, max(q_lens), head_dim ** -0.5)


# A fresh prompt ending mid-block, a chunk after a 21-token cached prefix, a single new token after a prefix,
# a one-token prompt, and a prompt spanning two query blocks of the interpreter config (32 rows: 32 tokens at
# G = 1, 8 at G = 4, 4 at G = 8, so every sequence but the one-token ones spans several blocks there).
Q_LENS = [13, 19, 1, 1, 40]
SEQ_LENS = [13, 40, 18, 1, 40]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads", [(1, 2), (4, 1), (8, 1)])
def test_prefill_matches_reference(dtype, group, num_kv_heads):
    args = _case(Q_LENS, SEQ_LENS, group, num_kv_heads, 64, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


# Every dtype at head dim 128, and float32 at both GQA extremes; the last sequence is one token after a prefix.
@pytest.mark.parametrize("dtype, group, num_kv_heads", [(torch.float16, 4, 1), (torch.bfloat16, 4, 1),
                                                        (torch.float32, 1, 2), (torch.float32, 8, 1)])
def test_prefill_head_dim_128(dtype, group, num_kv_heads):
    args = _case([7, 20, 1], [30, 20, 9], group, num_kv_heads, 128, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


# Llama-3-8B's head layout (32 query heads, 8 KV heads, head dim 128: G = 4, 8 tokens per interpreter block):
# a chunk of 37 tokens after a 26-token cached prefix and a fresh 23-token prompt, neither a multiple of the
# block (8 tokens) nor of the tile (32 keys) nor of the 16-token pages.
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_llama3_8b_heads(dtype):
    args = _case([37, 23], [63, 23], 4, 8, 128, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


# A group that is not a power of two (Qwen2: 14 query heads over 2 KV heads, G = 7): 32 rows hold 4 tokens and
# 4 spare rows; lengths straddle those 4-token blocks. (A spare row that was stored would write the next block's
# first token, which the interpreter, running blocks in order, then overwrites with the right value: only the
# GPU test, tests/gpu/test_prefill_kernel_gpu.py at G = 7, can catch that race.)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_group_not_a_power_of_two(dtype):
    args = _case([10, 1, 7], [29, 12, 7], 7, 2, 64, dtype)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


# MHA (G = 1: one head per row, the unpacked case) at Llama's 32 heads of 128, and a group larger than the
# interpreter's 32 rows (G = 64: one token per program), where the tile grows to the group.
@pytest.mark.parametrize("group, num_kv_heads, head_dim", [(1, 32, 128), (64, 1, 32)])
def test_prefill_group_extremes(group, num_kv_heads, head_dim):
    args = _case([9, 3], [21, 3], group, num_kv_heads, head_dim, torch.float32)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


def test_prefill_heads_of_a_group_stay_apart():
    # Every query head gets its own output: zeroing one head's queries changes that head alone (packing must
    # not mix rows of different heads), and each head equals the reference run on that head by itself.
    q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale = _case([11], [30], 4, 2, 64, torch.float32)
    out = triton_ops.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    q2 = q.clone()
    q2[:, 5] = 0.0
    out2 = triton_ops.prefill_attention(q2, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    changed = (out2 != out).flatten(2).any(-1).any(0)
    assert changed.tolist() == [h == 5 for h in range(8)]
    for head in (0, 3, 4, 7):  # one of each end of both groups
        kv = head // 4
        alone = ref.prefill_attention(q[:, head:head + 1], k_cache[:, :, kv:kv + 1], v_cache[:, :, kv:kv + 1],
                                      tables, cu, seq_lens, max_q, scale)
        assert_close(out[:, head:head + 1], alone)


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "contiguous"])
def test_prefill_on_strided_kv_cache(layout):
    q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale = _case([13, 19], [13, 40], 4, 2, 64, torch.float16)
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    k_cache, v_cache = kv_cache_in_layout(k_cache, v_cache, layout)
    assert not k_cache.is_contiguous() and not v_cache.is_contiguous()
    args = (q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    assert_close(triton_ops.prefill_attention(*args), expected)
    assert_close(ref.prefill_attention(*args), expected)


def test_prefill_block_size_not_a_tile_multiple():
    # Pages of 5 tokens: tiles of 32 straddle pages, every token looks up its own.
    args = _case([9, 12], [23, 12], 4, 2, 64, torch.float32, block_size=5)
    assert_close(triton_ops.prefill_attention(*args), ref.prefill_attention(*args))


def test_prefill_last_query_equals_decode():
    # The last query of a prefill sees the whole sequence: the same answer decode gives for that token.
    q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale = _case([6, 11], [20, 11], 4, 1, 64, torch.float32)
    out = triton_ops.prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, max_q, scale)
    last = (cu[1:] - 1).long()
    decoded = ref.decode_attention(q[last], k_cache, v_cache, tables, seq_lens, scale)
    assert_close(out[last], decoded)


def test_prefill_rejects_a_head_dim_too_small_for_tl_dot():
    args = _case([3], [3], 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match=r"prefill_attention: head_dim 8 .* need head_dim >= 16"):
        triton_ops.prefill_attention(*args)


@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7, 8, 32, 256])
def test_prefill_gpu_config_fits_shared_memory(elem_size, head_dim, group):
    # The compiled (not interpreted) config: float32 at head dim 128 once asked for 256 KB, over the 227 KB an
    # H100/H200 block may use. BLOCK_M counts rows (tokens x heads of the group) and must hold one whole token.
    block_d = triton.next_power_of_2(head_dim)
    if _shared_bytes(_min_rows(group), 32, 1, block_d, elem_size) > SMEM_BUDGET:  # refused, not miscompiled
        with pytest.raises(ValueError, match=f"{group} query heads per KV head .* use the torch backend"):
            _config(head_dim, elem_size, group, interpreted=False)
        return
    block_m, block_n, warps, stages = _config(head_dim, elem_size, group, interpreted=False)
    assert _shared_bytes(block_m, block_n, stages, block_d, elem_size) <= SMEM_BUDGET
    assert SMEM_BUDGET < 227 * 1024 and block_n >= 16 and stages >= 1
    assert block_m >= 16 and block_m >= group and block_m == triton.next_power_of_2(block_m)
    if elem_size == 2 and head_dim <= 128 and group <= 128:
        # The tuned half-precision config is kept whatever the group: Llama-3-8B (G = 4) runs 32 tokens x 4
        # heads per 128-row tile, G = 7 runs 18 tokens (126 rows, 2 masked).
        assert (block_m, block_n, stages) == (128, 64, 3)


@pytest.mark.parametrize("group", [1, 4, 7, 8, 32, 64])
def test_prefill_interpreter_config_holds_whole_tokens(group):
    block_m, block_n, _, _ = _config(64, 4, group, interpreted=True)
    assert block_m == max(32, _min_rows(group)) and block_m // group >= 1


# The interpreter never compiles, so a kernel it runs may still fail to compile (a constexpr that is not one, a
# tile that outgrows shared memory). Triton's wheel ships ptxas, so the real sm_90 (H100/H200) build runs on CPU:
# a fresh interpreter (this one has TRITON_INTERPRET=1, fixed at decoration) compiles the kernel with the
# launcher's _config and the specialization a Llama-like launch gets (16-aligned pointers, strides divisible by
# 16), and reports the shared memory each build asks for.
_COMPILE_FOR_HOPPER = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from semipd.kernels import prefill_attention as pa
from semipd.kernels.triton_utils import TL_DTYPE, dot_precision
import torch
kernel = pa.prefill_kernel
assert isinstance(kernel, triton.runtime.JITFunction), "TRITON_INTERPRET leaked into the compile check"
results = []
for head_dim, group, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    elem = dtype.itemsize
    block_m, block_n, warps, stages = pa._config(head_dim, elem, group, interpreted=False)
    ptr = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    consts = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
                  COMPUTE=TL_DTYPE[dtype], PRECISION=dot_precision(TL_DTYPE[dtype]))
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in ("block_tables_ptr", "cu_seqlens_ptr", "seq_lens_ptr") else ptr
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
        if name.endswith("_ptr") or name in ("q_stride_t", "q_stride_h", "kc_stride_b", "kc_stride_o",
                                              "kc_stride_h", "vc_stride_b", "vc_stride_o", "vc_stride_h",
                                              "out_stride_t", "out_stride_h", "block_size", "head_dim"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    results.append(dict(head_dim=head_dim, group=group, block_m=block_m, shared=compiled.metadata.shared,
                        estimate=pa._shared_bytes(block_m, block_n, stages, consts["BLOCK_D"], elem)))
print(json.dumps(results))
"""


def test_prefill_compiles_for_hopper_within_shared_memory():
    import json
    import os
    import subprocess
    import sys
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as exc:  # a Triton without its CUDA backend or ptxas cannot build sm_90 code here
        pytest.skip(f"no sm_90 toolchain in this Triton install: {exc}")
    # Llama-3-8B (G = 4, head dim 128) in bfloat16, Qwen2's G = 7, and MHA at head dim 64 in float16.
    cases = [[128, 4, "bfloat16"], [128, 7, "bfloat16"], [64, 1, "float16"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["head_dim"], r["group"]) for r in results] == [(d, g) for d, g, _ in cases]
    for r in results:
        # 227 KB is what one H100/H200 block may use; _shared_bytes must not underestimate what Triton allocates.
        assert 0 < r["shared"] <= r["estimate"] <= SMEM_BUDGET < 227 * 1024, r
        assert r["block_m"] == 128, r
