"""The CUDA decode path's host work, run on CPU: DecodeGraph's static buffers filled by replay() must give the
model what the eager decode batch gives it. The graphs are captured with CPU stand-ins for torch.cuda's graph
and stream calls, and a stand-in graph whose replay recomputes the model on the static buffers (what a real
replay does on the device). Batches shrink and grow and change order across steps, so rows and columns hold
what earlier, larger batches left there."""
import contextlib
import random

import pytest
import torch

from semipd.runtime.config import EngineConfig
from semipd.runtime.model_runner import ModelRunner
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.sequence import Sequence
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.unit


class RecomputingGraphStandIn:
    """Stands in for torch.cuda.CUDAGraph: replay reruns the model on the graph's static batch, into the logits
    tensor the capture produced, as a replayed graph would."""

    def __init__(self):
        self.rerun = None

    def replay(self):
        self.rerun()


class StreamStandIn:
    cuda_stream = 1

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


@contextlib.contextmanager
def cuda_stand_ins():
    names = {"CUDAGraph": RecomputingGraphStandIn, "graph_pool_handle": lambda: None,
             "current_stream": StreamStandIn, "stream": lambda s: contextlib.nullcontext(),
             "graph": lambda *a, **k: contextlib.nullcontext()}
    saved = {n: getattr(torch.cuda, n) for n in names}
    try:
        for n, value in names.items():
            setattr(torch.cuda, n, value)
        yield
    finally:
        for n, value in saved.items():
            setattr(torch.cuda, n, value)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", max_position_embeddings=256)
    runner = ModelRunner(EngineConfig(model=str(path), device="cpu", max_model_len=256, block_size=4,
                                      num_kv_blocks=200, enable_prefix_caching=False))
    stream = StreamStandIn()
    with cuda_stand_ins():
        runner.capture_decode_graphs([stream], max_batch=8)
    assert sorted(size for _, size in runner.decode_graphs) == [1, 2, 4, 8]
    for graph in runner.decode_graphs.values():
        graph.graph.rerun = (lambda g=graph: g.logits.copy_(runner.model.compute_logits(runner.model(g.batch))))
    return runner, stream


@torch.inference_mode()
def test_replayed_static_buffers_give_the_model_what_the_eager_batch_gives_it(runner):
    runner, stream = runner
    rng = random.Random(0)
    bm = runner.block_manager
    seqs = []
    for i in range(8):
        seq = Sequence(f"s{i}", [rng.randrange(1, 400) for _ in range(rng.randint(3, 90))], SamplingParams(),
                       lambda out: None, runner.device)
        assert bm.allocate(seq, seq.num_tokens)
        runner.prefill([(seq, seq.num_tokens)], [False])
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(rng.randrange(1, 400))
        seqs.append(seq)
    for step, size in enumerate([8, 5, 8, 3, 1, 7, 2, 8, 6, 4]):
        batch = rng.sample(seqs, size)
        for seq in batch:
            assert bm.allocate(seq, seq.num_tokens)
        # The graph first: if it stored this token's K/V in the wrong slot, its own attention would miss it.
        replayed = runner.decode(batch, stream).clone()
        graph = runner.decode_graphs[(stream.cuda_stream, 8 if size > 4 else 4 if size > 2 else size)]
        width = max(len(s.block_table) for s in batch)
        want_tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch]
        assert graph.block_tables[:size, :width].tolist() == want_tables, f"step {step}"
        assert not graph.seq_lens[size:].any() and (graph.slot_mapping[size:] == -1).all(), f"step {step}"
        eager = runner._decode_eager(batch)
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        for seq, token in zip(batch, eager.argmax(-1).tolist()):
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(token)
