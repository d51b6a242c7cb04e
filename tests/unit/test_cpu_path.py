"""The CPU decode path behind `--cpu-compile` (runtime/cpu_path.py): its packed matmul is F.linear, its attention
is the reference's, the compiled decode forward picks eager's greedy tokens, the flag reaches the engine config,
and anything but the CPU with the torch kernels never goes through it. No timing is asserted."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from semipd.kernels import reference
from semipd.runtime import cpu_path
from semipd.runtime.config import EngineConfig
from semipd.runtime.cpu_threads import core_shares
from semipd.runtime.layers import _packable_dtypes, pack_for_cpu
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.sequence import Sequence
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", _packable_dtypes(), ids=str)
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_linear_is_f_linear(dtype, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40).to(dtype), torch.randn(48).to(dtype)
    packed = pack_for_cpu(weight)
    assert packed is not None
    x = torch.randn(rows, 40).to(dtype)
    want = F.linear(x.float(), weight.float(), bias.float())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    torch.testing.assert_close(cpu_path.packed_linear(x, packed, bias).float(), want, **tol)
    torch.testing.assert_close(cpu_path.packed_linear(x, packed, None).float(), want - bias.float(), **tol)


def test_decode_attention_matches_the_reference():
    """Across lengths 0, one token, a block boundary and padding table entries (-1, out of range)."""
    torch.manual_seed(0)
    num_blocks, block_size, hkv, hq, d = 12, 4, 2, 6, 8
    k_cache, v_cache = torch.randn(num_blocks, block_size, hkv, d), torch.randn(num_blocks, block_size, hkv, d)
    tables = torch.tensor([[3, 7, 1], [5, -1, 99], [2, 0, -1], [9, 4, 8]], dtype=torch.int32)
    lens = torch.tensor([9, 1, 0, 12], dtype=torch.int32)
    q = torch.randn(4, hq, d)
    want = reference.decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
    got = cpu_path.decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_store_kv_matches_the_reference():
    k, v = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k2, v2 = k.clone(), v.clone()
    key, value, slots = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([5, 0, 11])
    reference.store_kv(key, value, k, v, slots)
    cpu_path.store_kv(key, value, k2, v2, slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)


def _greedy(runner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill each prompt, then `steps` decode steps of the whole batch, greedy; the tokens of each row."""
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=steps), lambda out: None, runner.device)
            for i, p in enumerate(prompts)]
    for seq in seqs:
        assert runner.block_manager.allocate(seq, seq.num_tokens)
        logits = runner.prefill([(seq, seq.num_tokens)], [True])
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(int(logits[0].argmax()))
    for _ in range(steps):
        for seq in seqs:
            assert runner.block_manager.allocate(seq, seq.num_tokens)
        logits = runner.decode(seqs)
        for seq, row in zip(seqs, logits):
            seq.num_computed_tokens = seq.num_tokens
            seq.output_token_ids.append(int(row.argmax()))
    out = [list(s.output_token_ids) for s in seqs]
    for seq in seqs:
        runner.block_manager.free(seq)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cpu-path"), num_layers=2, hidden_size=64, num_heads=4,
                            num_kv_heads=2)


def test_compiled_decode_gives_eager_greedy_tokens(tiny_dir, caplog):
    from semipd.runtime.model_runner import ModelRunner

    config = EngineConfig(model=str(tiny_dir), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                          enable_prefix_caching=False)
    eager = ModelRunner(config)
    assert eager.cpu_decode is None
    config.cpu_compile = True
    with caplog.at_level(logging.INFO, logger="semipd.cpu_path"):
        compiled = ModelRunner(config)
    assert isinstance(compiled.cpu_decode, cpu_path.CompiledDecode)
    assert "compiled" in caplog.text
    # batch 3 and batch 1 (their own graphs), contexts from one block (padded to two) across several blocks
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 9], [11, 2, 6, 1, 1, 5, 30, 2, 9, 8, 4]]
    cores, before = core_shares(), torch.get_num_threads()
    counts = {cores.decode_shared, cores.decode_alone}
    try:
        for threads in counts:                        # what Engine gives the decode worker, busy peer or idle
            torch.set_num_threads(threads)
            for batch in (prompts, prompts[:1]):
                assert _greedy(compiled, batch, 12) == _greedy(eager, batch, 12)
    finally:
        torch.set_num_threads(before)
    # the graphs compiled at start-up served every step: batch 1 and 3, tables 2 to 5 blocks wide, both thread
    # counts (dynamo guards on it)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    assert len(_debug_get_cache_entry_list(cpu_path._layer_step.__code__)) == 2 * len(counts)


def test_the_flag_reaches_the_engine_config(monkeypatch):
    from semipd.runtime import cli

    seen = {}

    def fake_run_server(engine_config, server_config):
        seen["config"] = engine_config
        return 0

    monkeypatch.setattr("semipd.runtime.server.serve", fake_run_server)
    assert cli.main(["serve", "--model", "/nonexistent", "--cpu-compile"]) == 0
    assert seen["config"].cpu_compile is True
    assert cli.main(["serve", "--model", "/nonexistent"]) == 0
    assert seen["config"].cpu_compile is False
    assert EngineConfig(model="m").cpu_compile is False


class _Runner:
    def __init__(self, device: str, backend: str):
        self.device, self.kernel_backend, self.block_size = torch.device(device), backend, 16

    @property
    def model(self):
        raise AssertionError("the seam must not touch the model when it declines")


@pytest.mark.parametrize("device,backend", [("cuda", "triton"), ("cuda:1", "torch"), ("cpu", "triton")])
def test_the_seam_declines_off_the_cpu_reference_path(device, backend, caplog):
    with caplog.at_level(logging.WARNING, logger="semipd.cpu_path"):
        assert cpu_path.make_decode_path(_Runner(device, backend), enabled=True) is None
    assert "--cpu-compile" in caplog.text
    assert cpu_path.make_decode_path(_Runner("cpu", "torch"), enabled=False) is None
