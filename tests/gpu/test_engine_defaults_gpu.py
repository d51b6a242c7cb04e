"""The engine's CUDA defaults on a real GPU: the KV pool is sized from --gpu-memory-utilization after weights
and measured activations, the engine then stays inside that share while it serves a full prefill budget and a
full decode batch at once, and max_model_len follows the pool when the pool is the limit."""
import pytest
import torch

from semipd.runtime.config import EngineConfig
from semipd.runtime.model_runner import ModelRunner
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama", hidden_size=512,
                            intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2,
                            max_position_embeddings=8192)


def in_use(device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def test_the_pool_takes_what_the_utilization_leaves_and_serving_stays_inside_it(model_dir, device):
    torch.cuda.empty_cache()
    before = in_use(device)
    _, total = torch.cuda.mem_get_info(device)
    share = 0.3
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cuda", gpu_memory_utilization=share,
                                      max_num_batched_tokens=2048, max_num_seqs=64))
    pool_bytes = sum(t.numel() * t.element_size() for t in runner.k_caches + runner.v_caches)
    assert runner.block_manager.num_blocks == runner.num_blocks   # the profiling scratch pool is gone
    assert pool_bytes > 0.5 * (share * total - before), "the pool should get most of the share"
    assert runner.max_model_len == 8192                           # the pool holds far more than the model
    # a full prefill budget and a full decode batch, as the two workers would run them
    from semipd.runtime.sampling import SamplingParams
    from semipd.runtime.sequence import Sequence
    params = SamplingParams(max_tokens=1)
    prompt = Sequence("p", [1 + i % 400 for i in range(2048)], params, lambda out: None, device)
    assert runner.block_manager.allocate(prompt, 2048)
    batch = [Sequence(f"d{i}", [1, 2, 3], params, lambda out: None, device) for i in range(64)]
    for seq in batch:
        assert runner.block_manager.allocate(seq, 3)
    torch.cuda.reset_peak_memory_stats(device)
    runner.prefill([(prompt, 2048)], [True])
    runner._decode_eager(batch)
    torch.cuda.synchronize(device)
    peak_in_use = in_use(device) - torch.cuda.memory_allocated(device) + torch.cuda.max_memory_allocated(device)
    assert peak_in_use <= share * total * 1.02, f"{peak_in_use / 2**30:.2f} GiB in use, share {share * total / 2**30:.2f}"
    del runner
    torch.cuda.empty_cache()


def test_max_model_len_follows_a_pool_smaller_than_the_model_allows(model_dir, device):
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cuda", kv_cache_memory=0.01))
    assert runner.max_model_len == runner.num_blocks * runner.block_size < 8192
    del runner
    torch.cuda.empty_cache()
