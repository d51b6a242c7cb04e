"""The offline tiny model: deterministic, a real Hugging Face directory, a working tokenizer and chat template."""
import json

import pytest
import torch
from safetensors import safe_open

from semipd.runtime import tiny_model
from semipd.runtime.loader import read_model_config
from semipd.runtime.tiny_model import default_model_dir, write_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenizer(llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(llama)


def file_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_same_seed_same_files_other_seed_other_weights(tmp_path, llama):
    again = write_tiny_model(tmp_path / "again")
    assert file_bytes(again) == file_bytes(llama)
    other = file_bytes(write_tiny_model(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != file_bytes(llama)["model.safetensors"]
    assert other["tokenizer.json"] == file_bytes(llama)["tokenizer.json"]


@pytest.mark.parametrize("arch,architecture,tied,extra", [
    ("llama", "LlamaForCausalLM", False, "lm_head.weight"),
    ("qwen2", "Qwen2ForCausalLM", True, "model.layers.0.self_attn.q_proj.bias"),
    ("qwen3", "Qwen3ForCausalLM", True, "model.layers.0.self_attn.q_norm.weight"),
    ("mistral", "MistralForCausalLM", False, "lm_head.weight"),
])
def test_each_arch_is_a_transformers_config_with_its_tensors(tmp_path, arch, architecture, tied, extra):
    from transformers import AutoConfig

    path = write_tiny_model(tmp_path / arch, arch)
    hf = AutoConfig.from_pretrained(path)
    assert hf.architectures == [architecture] and hf.tie_word_embeddings is tied
    assert hf.vocab_size == tiny_model.TOKENIZER_VOCAB  # defaults to the tokenizer's size
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert extra in names
    assert ("lm_head.weight" in names) is not tied


def test_larger_vocab_and_llama3_rope(tmp_path):
    from transformers import AutoConfig

    path = write_tiny_model(tmp_path / "m", vocab_size=1000, rope_scaling="llama3", dtype="bfloat16")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.shape == (1000, 64) and embed.dtype == torch.bfloat16
    hf = AutoConfig.from_pretrained(path)
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert read_model_config(str(path)).rope_scaling["original_max_position_embeddings"] == 512


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        write_tiny_model(tmp_path / "a", "gpt2")
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 512"):
        write_tiny_model(tmp_path / "b", vocab_size=100)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        write_tiny_model(tmp_path / "c", num_heads=4, num_kv_heads=3)
    assert not (tmp_path / "b").exists()


def test_tokenizer_round_trips_text_and_knows_its_specials(llama, tokenizer):
    text = "The baker opens at four. Ünïcode, emoji ☕ and numbers 3.14 survive!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges happened: fewer tokens than bytes
    for special in tiny_model.SPECIAL_TOKENS:
        assert len(tokenizer(special)["input_ids"]) == 1
    config = json.loads((llama / "config.json").read_text())
    generation = json.loads((llama / "generation_config.json").read_text())
    assert tokenizer.eos_token == "<|im_end|>"
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("assistant\n")


def test_different_prompts_give_different_greedy_continuations(llama, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    texts = ["The morning train", "A computer program", "Cooking a simple soup", "Weather changes"]
    outs = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        outs.append(tuple(out[0, ids["input_ids"].shape[1]:].tolist()))
    assert len(set(outs)) == len(texts)
    assert any(len(set(o)) > 2 for o in outs)  # not one token repeated forever


def test_default_model_dir_builds_once_and_rebuilds_a_stale_one(tmp_path):
    path = default_model_dir(tmp_path)
    assert path == tmp_path / "models" / "tiny-llama"
    assert read_model_config(str(path)).architecture == "LlamaForCausalLM"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama"]  # no temporary left behind

    (path / tiny_model.MARKER).write_text(json.dumps({"version": -1}))
    (path / "model.safetensors").write_bytes(b"junk from an old version")
    assert default_model_dir(tmp_path) == path
    assert read_model_config(str(path)).num_layers == 2
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama"]


def test_cli_writes_the_model_and_refuses_a_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "cli"
    assert tiny_model.main([str(out), "--arch", "qwen3", "--hidden-size", "32", "--num-layers", "1",
                            "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = read_model_config(str(out))
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers) == ("Qwen3ForCausalLM", 32, 1)
    with pytest.raises(SystemExit) as exc:
        tiny_model.main([str(out)])
    assert exc.value.code == 2
    assert "is not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tiny_model.main([str(tmp_path / "x"), "--num-heads", "4", "--num-kv-heads", "3"])
    assert "multiple of num_kv_heads" in capsys.readouterr().err
