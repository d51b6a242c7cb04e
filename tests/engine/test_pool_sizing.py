"""The start-up profile that sizes the CUDA KV pool, run on CPU with a named stand-in for CUDA's allocator
statistics (there is no GPU here): a full prefill budget and a full decode batch run on a scratch pool, and the
scratch pool is gone afterwards. The GPU tier (tests/gpu/test_engine_defaults_gpu.py) measures the real thing."""
import pytest

from semipd.runtime.config import EngineConfig
from semipd.runtime.model_runner import ModelRunner

pytestmark = pytest.mark.engine


def test_the_activation_profile_runs_both_steps_at_full_size_on_a_scratch_pool(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), device="cpu", num_kv_blocks=64, max_model_len=512,
                          max_num_batched_tokens=300, max_num_seqs=12)
    runner = ModelRunner(config)
    outputs = []

    def fake_peak(step):               # stands in for torch.cuda's peak statistics
        outputs.append(step())
        return 1000

    assert runner._activation_peak(config, peak_of=fake_peak) == 2000
    prefill_logits, decode_logits = outputs
    vocab = runner.model_config.vocab_size
    assert tuple(prefill_logits.shape) == (1, vocab)
    assert tuple(decode_logits.shape) == (12, vocab)
    assert runner.block_manager is None and runner.k_caches == []    # the scratch pool is released
