"""The GQA-packed prefill kernel compiled for a real GPU (not the interpreter) at production head layouts, against
the torch reference: Llama-3-8B (32 query heads over 8 KV heads, G = 4) and Qwen2.5-7B (28 over 4, G = 7, a
group that does not divide the 128-row tile, so 2 rows of each tile are spare and must never be stored).

A few thousand query tokens in bfloat16 over a shuffled paged cache: a chunk after a long cached prefix, a fresh
prompt, one token after a 4k prefix and a short prompt, none a multiple of the 16-token page or of a query block.
The unused pages of the pool hold NaN, so a key read from the wrong page shows up in the output."""
import pytest
import torch

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 16  # the engine's page
Q_LENS = [2000, 1000, 1, 333]
SEQ_LENS = [3533, 1000, 4097, 333]  # cached prefixes of 1533, 0, 4096 and 0 tokens
# Both sides compute in float32; the kernel multiplies bfloat16 operands (q, k, v and the probabilities p) on the
# tensor cores and each side rounds the output to bfloat16 once: the bound of tests/kernels/kernel_cases.py and
# of the GPU suite's kernels stage, 2 bfloat16 eps absolute and relative.
TOLERANCE = dict(atol=2 * torch.finfo(torch.bfloat16).eps, rtol=2 * torch.finfo(torch.bfloat16).eps)


def _paged_case(device, num_q_heads, num_kv_heads, head_dim, dtype=torch.bfloat16, spare_pages=7):
    gen = torch.Generator(device=device).manual_seed(0)
    pages = [-(-n // BLOCK_SIZE) for n in SEQ_LENS]
    pool = sum(pages) + spare_pages
    shape = (pool, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    order = torch.randperm(pool, generator=gen, device=device)
    tables = torch.zeros(len(SEQ_LENS), max(pages) + 1, dtype=torch.int32, device=device)  # a padding column
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = order[used:used + n].to(torch.int32)
        used += n
    spare = order[used:]
    k_cache[spare] = float("nan")
    v_cache[spare] = float("nan")
    cu = torch.tensor([0] + [sum(Q_LENS[:i + 1]) for i in range(len(Q_LENS))], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=device)
    q = torch.randn(sum(Q_LENS), num_q_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, k_cache, v_cache, tables, cu, seq_lens, max(Q_LENS), head_dim ** -0.5


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(32, 8, 128), (28, 4, 128)],
                         ids=["llama-3-8b", "qwen2.5-7b"])
def test_compiled_prefill_matches_reference(device, num_q_heads, num_kv_heads, head_dim):
    from semipd.kernels import load_ops
    from semipd.kernels.prefill_attention import prefill_kernel
    from semipd.kernels.triton_utils import is_interpreted
    if is_interpreted(prefill_kernel):
        pytest.skip("TRITON_INTERPRET=1 was set in this process (tests/kernels sets it): run "
                    "`pytest -m gpu tests/gpu` on its own to compile the kernel")
    triton_ops, ref = load_ops("triton"), load_ops("torch")
    args = _paged_case(device, num_q_heads, num_kv_heads, head_dim)
    with torch.inference_mode():
        got = triton_ops.prefill_attention(*args)
        want = ref.prefill_attention(*args)
        torch.cuda.synchronize(device)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert torch.isfinite(got).all(), "non-finite output: a spare (NaN) page was read, or a row was not written"
    err = (got.float() - want.float()).abs()
    worst = int(err.flatten().argmax())
    token, head = divmod(worst // head_dim, num_q_heads)
    torch.testing.assert_close(got, want, **TOLERANCE,
                               msg=lambda m: f"{m}\nworst |error| {float(err.max()):.4g} at token {token}, head {head}")
    # Per sequence: the chunk, the fresh prompt, the single token and the short prompt each agree on average
    # far below the bound (a systematic error, e.g. one masked key too many, would lift a whole sequence).
    starts = args[4].tolist()
    for b in range(len(Q_LENS)):
        assert float(err[starts[b]:starts[b + 1]].mean()) < TOLERANCE["atol"] / 4, f"sequence {b}"
