"""Our decoder against transformers on the same tiny random models: logits and greedy tokens must agree.

The test drives the model the way the engine does: flat token batches over a paged KV cache, with whole-prompt
prefill, chunked prefill (a second chunk over a cached prefix), and decode steps, through the torch ops.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

from semipd.kernels import load_ops
from semipd.runtime.batch import ForwardBatch
from semipd.runtime.layers import Linear, _packable_dtypes
from semipd.runtime.loader import load_model
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.unit

BLOCK_SIZE = 4
NUM_BLOCKS = 64
VARIANTS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),  # head_dim != hidden/heads, as in real Qwen3
    "mistral": dict(arch="mistral", num_kv_heads=1),
    "llama3-rope": dict(arch="llama", rope_scaling="llama3", seed=1),
}


class PagedKV:
    """The engine's block bookkeeping in miniature: blocks handed out in a scrambled order, per sequence."""

    def __init__(self, cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE):
        self.block_size = block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape) for _ in range(cfg.num_layers)]

    def batch(self, chunks: list[tuple[int, list[int]]], is_prefill: bool, all_logits=False) -> ForwardBatch:
        """chunks: (sequence id, new tokens); each continues where that sequence's cache ends."""
        ids, positions, slots, seq_lens, cu = [], [], [], [], [0]
        for seq, tokens in chunks:
            start = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for pos in range(start, end):
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            self.lens[seq] = end
            seq_lens.append(end)
            cu.append(cu[-1] + len(tokens))
        width = max(len(self.tables[seq]) for seq, _ in chunks)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in chunks]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        last = cu_t[1:].long() - 1
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            cu_seqlens_q=cu_t,
            max_seqlen_q=max(len(t) for _, t in chunks),
            max_seqlen_k=max(seq_lens),
            logits_indices=torch.arange(len(ids)) if all_logits else last,
        )


def run(model, batch: ForwardBatch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(batch)
        return model.compute_logits(hidden[batch.logits_indices])


@pytest.fixture(scope="module", params=[(v, packed) for v in VARIANTS for packed in (False, True)],
                ids=lambda p: f"{p[0]}-{'packed' if p[1] else 'dense'}")
def pair(request, tmp_path_factory):
    """(our model, its config, the transformers model) for one tiny model directory; 'packed' is the layout the
    engine serves from on CPU (matmul weights reordered for oneDNN)."""
    from transformers import AutoModelForCausalLM

    variant, packed = request.param
    path = write_tiny_model(tmp_path_factory.mktemp(variant), **VARIANTS[variant])
    ours, cfg = load_model(str(path), torch.float32, torch.device("cpu"), load_ops("torch"))
    if packed:
        assert ours.pack_for_cpu() == 4 * cfg.num_layers + 1     # qkv, o, gate_up, down per layer; the head
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, cfg, theirs


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens])).logits[0].float()


def prompts(cfg, lengths, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Token 3 and up: the specials (0-2) include EOS, which would end generation early.
    return [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_logits_match_transformers_through_prefill_chunked_prefill_and_decode(pair):
    model, cfg, hf = pair
    kv = PagedKV(cfg)
    model.attach_kv_cache(kv.k, kv.v)
    a, b, c, d = prompts(cfg, [5, 9, 3, 6])
    seqs = {0: a, 1: b[:6], 2: c}

    # Step 1: whole prompts A and C, the first chunk of B; logits at every position.
    step = kv.batch([(0, a), (1, b[:6]), (2, c)], is_prefill=True, all_logits=True)
    got = run(model, step)
    close(got, torch.cat([hf_logits(hf, a), hf_logits(hf, b[:6]), hf_logits(hf, c)]))

    # Step 2: B's second chunk attends to its cached first chunk, next to a fresh prompt D.
    step = kv.batch([(1, b[6:]), (3, d)], is_prefill=True, all_logits=True)
    got = run(model, step)
    seqs[1], seqs[3] = b, d
    close(got, torch.cat([hf_logits(hf, b)[6:], hf_logits(hf, d)]))

    # Decode steps: one token per sequence, the argmax of the previous step.
    last = torch.stack([hf_logits(hf, seqs[s])[-1] for s in range(4)])
    for _ in range(3):
        nxt = last.argmax(-1).tolist()
        for s in range(4):
            seqs[s] = seqs[s] + [nxt[s]]
        got = run(model, kv.batch([(s, [nxt[s]]) for s in range(4)], is_prefill=False))
        last = torch.stack([hf_logits(hf, seqs[s])[-1] for s in range(4)])
        close(got, last)


def greedy(model, cfg, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A minimal engine loop: one prefill of all prompts, then batched decode until EOS or the limit."""
    kv = PagedKV(cfg)
    model.attach_kv_cache(kv.k, kv.v)
    out = {s: [] for s in range(len(prompt_ids))}
    logits = run(model, kv.batch(list(enumerate(prompt_ids)), is_prefill=True))
    live = list(range(len(prompt_ids)))
    while True:
        for s, token in zip(live, logits.argmax(-1).tolist()):
            out[s].append(token)
        live = [s for s in live if out[s][-1] not in cfg.eos_token_ids and len(out[s]) < max_new_tokens]
        if not live:
            return [out[s] for s in range(len(prompt_ids))]
        logits = run(model, kv.batch([(s, [out[s][-1]]) for s in live], is_prefill=False))


def test_greedy_generation_equals_transformers_generate(pair):
    model, cfg, hf = pair
    batch = prompts(cfg, [4, 11, 7], seed=1)
    ours = greedy(model, cfg, batch, max_new_tokens=8)
    for prompt, tokens in zip(batch, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=8, do_sample=False)
        assert tokens == ref[0, len(prompt):].tolist()


def test_concurrent_prefill_and_decode_threads_match_serial_results(pair):
    """The engine's two workers call one model at once; no call may see another's batch."""
    model, cfg, _ = pair
    prefill_prompts = prompts(cfg, [6, 8, 5, 7], seed=2)
    decode_prompt = prompts(cfg, [5], seed=3)[0]

    def scenario(concurrent: bool):
        kv = PagedKV(cfg)
        model.attach_kv_cache(kv.k, kv.v)
        first = run(model, kv.batch([(100, decode_prompt)], is_prefill=True)).argmax(-1).tolist()
        results = {"prefill": [], "decode": []}

        def prefill_worker():
            for i, p in enumerate(prefill_prompts):
                results["prefill"].append(run(model, kv.batch([(i, p)], is_prefill=True)))

        def decode_worker():
            token = first[0]
            for _ in range(8):
                logits = run(model, kv.batch([(100, [token])], is_prefill=False))
                results["decode"].append(logits)
                token = int(logits.argmax(-1))

        if concurrent:
            threads = [threading.Thread(target=prefill_worker), threading.Thread(target=decode_worker)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            prefill_worker()
            decode_worker()
        return results

    serial, parallel = scenario(False), scenario(True)
    for key in serial:
        for s, p in zip(serial[key], parallel[key], strict=True):
            close(p, s)


def test_forward_without_kv_cache_is_a_clear_error(tmp_path):
    path = write_tiny_model(tmp_path / "m")
    model, cfg = load_model(str(path), torch.float32, "cpu", load_ops("torch"))
    kv = PagedKV(cfg)
    with pytest.raises(RuntimeError, match="attach_kv_cache"):
        model(kv.batch([(0, [5, 6])], is_prefill=True))
    with pytest.raises(ValueError, match="caches"):
        model.attach_kv_cache(kv.k[:1], kv.v[:1])


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_packing_keeps_one_copy_of_each_matmul_weight(tmp_path, arch, tied):
    path = write_tiny_model(tmp_path / "m", arch)
    model, cfg = load_model(str(path), torch.float32, "cpu", load_ops("torch"))
    model.pack_for_cpu()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.packed is not None for m in linears)
    assert model.packed_head is not None
    # the embedding is still read by lookups; an untied head's dense weight is gone
    assert model.model.embed_tokens.weight is not None
    assert tied or model.lm_head.weight is None


def test_packing_leaves_other_dtypes_dense(tmp_path):
    path = write_tiny_model(tmp_path / "m")
    model, _ = load_model(str(path), torch.float16, "cpu", load_ops("torch"))
    assert model.pack_for_cpu() == 0
    assert all(m.weight is not None for m in model.modules() if isinstance(m, Linear))


@pytest.mark.skipif(torch.bfloat16 not in _packable_dtypes(), reason="oneDNN has no bf16 on this CPU")
def test_bf16_packing_matches_f_linear(tmp_path):
    """bf16 weights are packed where oneDNN supports bf16, and the packed matmul is F.linear's."""
    path = write_tiny_model(tmp_path / "m")
    model, cfg = load_model(str(path), torch.bfloat16, "cpu", load_ops("torch"))
    dense = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, Linear)}
    assert model.pack_for_cpu() == 4 * cfg.num_layers + 1
    x = torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16)
    m = model.model.layers[0].self_attn.qkv_proj
    ref = F.linear(x.float(), dense["model.layers.0.self_attn.qkv_proj"].float(),
                   None if m.bias is None else m.bias.float())
    torch.testing.assert_close(m(x).float(), ref, atol=5e-2, rtol=2e-2)
