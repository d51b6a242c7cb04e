"""The loader: config parsing (both rope shapes), clear errors for broken model directories, in-place loading."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from semipd.kernels import build_cos_sin_cache, load_ops
from semipd.runtime.loader import (ModelLoadError, build_model, check_weights, load_model, load_weights,
                                   parse_config, read_model_config)
from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.unit

OPS = load_ops("torch")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("pristine"), "qwen2")


@pytest.fixture
def model_dir(pristine, tmp_path):
    """A private copy of a tiny Qwen2 model that a test may break."""
    return shutil.copytree(pristine, tmp_path / "model")


def load(path):
    return load_model(str(path), torch.float32, torch.device("cpu"), OPS)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_unsupported_architecture_names_config_and_field(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"config\.json: architectures \['GPT2LMHeadModel'\] is not supported"):
        load(model_dir)


def test_corrupt_config_json_names_the_file(model_dir):
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ModelLoadError, match=r"config\.json: cannot be read as JSON"):
        load(model_dir)


def test_missing_config_json(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        load(model_dir)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", None, "required field hidden_size is missing"),
    ("num_hidden_layers", "two", "num_hidden_layers 'two' should be a positive integer"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("eos_token_id", "x", "eos_token_id 'x' should be a token id"),
])
def test_bad_config_field_is_named(model_dir, field, value, message):
    config = json.loads((model_dir / "config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load(model_dir)


def test_missing_shard_named_by_index(model_dir):
    names = list(load_file(model_dir / "model.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names[:3]}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in names[3:]})
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json: weight_map names shard "
                                             r"'model-00002-of-00002\.safetensors'.*does not exist"):
        load(model_dir)


def test_missing_tensor_is_named(model_dir):
    edit_weights(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError,
                       match=r"model\.safetensors: checkpoint has no tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    edit_weights(model_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra"):
        load(model_dir)


def test_shape_mismatch_is_named(model_dir):
    edit_weights(model_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                             r"has shape \[96, 64\], expected \[128, 64\]"):
        load(model_dir)


def test_truncated_safetensors_is_named(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors file"):
        load(model_dir)


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights found"):
        load(model_dir)


def test_sharded_checkpoint_loads_like_a_single_file(model_dir, tmp_path):
    single, _ = load(model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = shutil.copytree(model_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, sharded / file)
    weight_map = {n: f for f, members in shards.items() for n in members}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load(sharded)
    for (name, a), (_, b) in zip(single.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tied_model_ignores_a_saved_head_and_uses_the_embedding(model_dir):
    edit_weights(model_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model, cfg = load(model_dir)
    assert cfg.tie_word_embeddings and model.lm_head is None
    hidden = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T)


def test_parameters_are_filled_in_place_with_no_second_copy(tmp_path):
    """Each parameter's storage is allocated once by to_empty and then written by the copy, never replaced.

    A loader that built a state dict and assigned it (or re-created parameters) would change the data
    pointers; one that forgot a slice of a fused parameter would leave it unequal to the file.
    """
    path = write_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    cfg = read_model_config(str(path))
    model = build_model(cfg, torch.float32, OPS)
    plan = check_weights(model, str(path))
    model.to_empty(device="cpu")
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    load_weights(model, plan)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before

    ref = load_file(path / "model.safetensors")
    params = dict(model.named_parameters())
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        qkv = torch.cat([ref[prefix + f"self_attn.{n}_proj.weight"] for n in "qkv"]).float()
        assert torch.equal(params[prefix + "self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([ref[prefix + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]).float()
        assert torch.equal(params[prefix + "mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(params["lm_head.weight"], ref["lm_head.weight"].float())
    assert params["lm_head.weight"].dtype == torch.float32  # the bf16 checkpoint was cast on copy


BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


def test_rope_parameters_and_legacy_rope_fields_parse_alike():
    new = parse_config({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}, {},
                       "new/config.json")
    old = parse_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}}, {},
                       "old/config.json")
    assert new == old
    assert new.rope_theta == 500000.0 and new.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    plain = parse_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, {}, "x")
    assert plain.rope_scaling is None
    # The scaling is real: it changes the rotation angles at small positions.
    scaled = build_cos_sin_cache(new.head_dim, 64, new.rope_theta, new.rope_scaling)
    assert not torch.allclose(scaled, build_cos_sin_cache(plain.head_dim, 64, plain.rope_theta, None))


def test_unknown_rope_type_is_refused():
    with pytest.raises(ModelLoadError, match="config.json: rope scaling .*yarn"):
        parse_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {}, "m/config.json")


def test_family_flags_and_defaults():
    qwen2 = parse_config({**BASE, "architectures": ["Qwen2ForCausalLM"]}, {}, "x")
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = parse_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, {}, "x")
    assert (qwen3.attention_bias, qwen3.o_proj_bias, qwen3.qk_norm, qwen3.head_dim) == (True, True, True, 128)
    llama = parse_config({**BASE, "torch_dtype": "bfloat16"}, {}, "x")
    assert (llama.head_dim, llama.num_kv_heads, llama.torch_dtype) == (16, 2, torch.bfloat16)


def test_eos_ids_merge_config_and_generation_config():
    cfg = parse_config({**BASE, "eos_token_id": 7, "bos_token_id": 1}, {"eos_token_id": [9, 7]}, "x")
    assert cfg.eos_token_ids == [7, 9] and cfg.bos_token_id == 1


def test_real_sliding_window_is_refused_unless_the_serving_length_fits():
    mistral = {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}
    with pytest.raises(ModelLoadError, match=r"x/config.json: sliding_window 1024 is shorter than the serving "
                                             r"length 4096"):
        parse_config(mistral, {}, "x/config.json")
    assert parse_config(mistral, {}, "x", max_model_len=1024).sliding_window == 1024
    assert parse_config({**mistral, "sliding_window": None}, {}, "x").sliding_window is None
    # Qwen ignores sliding_window unless use_sliding_window is on.
    qwen = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 1024}
    assert parse_config(qwen, {}, "x").sliding_window is None
    with pytest.raises(ModelLoadError, match="sliding_window 1024"):
        parse_config({**qwen, "use_sliding_window": True, "max_window_layers": 0}, {}, "x")


PEAK_ANON_SCRIPT = r"""
import sys, threading, time
import torch
from semipd.kernels import load_ops
from semipd.runtime.loader import load_model

def anon_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_bytes())
        time.sleep(0.0005)
base = anon_bytes()
sampler = threading.Thread(target=sample)
sampler.start()
model, _ = load_model(sys.argv[1], torch.float32, "cpu", load_ops("torch"), max_model_len=64)
done.set()
sampler.join()
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(params, peak[0] - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux's /proc")
def test_loading_holds_the_weights_once_in_memory(tmp_path):
    """Anonymous memory at its peak during load_model stays near one copy of the weights. The checkpoint is read
    through safetensors' file mapping (file-backed pages, not anonymous), so a loader that first built a state
    dict, or copied each tensor through an intermediate, would show about two copies."""
    path = write_tiny_model(tmp_path / "m", "llama", hidden_size=512, intermediate_size=1536, num_layers=8,
                            num_heads=8, num_kv_heads=4, vocab_size=16000)
    out = subprocess.run([sys.executable, "-c", PEAK_ANON_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True, timeout=300)
    params, peak = map(int, out.stdout.split())
    assert params > 100 * 2**20                    # big enough that a second copy would stand out
    assert peak < 1.4 * params, f"peak anonymous memory {peak / 2**20:.0f} MiB for {params / 2**20:.0f} MiB of weights"
