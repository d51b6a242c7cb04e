"""Write a small random-weight model directory offline: config, safetensors weights and a real tokenizer.

It is a genuine Hugging Face model directory (transformers loads it), made without the hub and without
transformers' modeling code, so the engine can be tested and demonstrated anywhere. The tokenizer is a
byte-level BPE trained here on a built-in English text, with ChatML special tokens and chat template.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHS = {
    "llama": ("LlamaForCausalLM", False),     # (architecture, tie_word_embeddings)
    "qwen2": ("Qwen2ForCausalLM", True),
    "qwen3": ("Qwen3ForCausalLM", True),
    "mistral": ("MistralForCausalLM", False),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 512
# Bump when the generator's output changes, so a cached default model is rebuilt.
FORMAT_VERSION = 1
MARKER = "semipd-tiny-model.json"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CORPUS = """\
The morning train left the station a little after seven. Most of the passengers were reading, and a few
were asleep with their heads against the windows. Outside, the fields were still grey with frost, and the
river beside the line moved slowly under a thin layer of mist. A child in the second carriage counted the
cows she could see and told her father every number out loud.

In the small town at the end of the line there is a bakery that opens before dawn. The baker starts the
ovens at four, mixes flour, water, salt and yeast, and shapes the loaves by hand. By six the first bread is
cooling on wooden racks, and the smell reaches the square where the market traders are setting up their
stalls. People buy bread, cheese, apples, eggs and honey, and they talk about the weather and the harvest.

A computer program is a list of instructions that a machine follows one step at a time. Good programs are
written for people to read as well as for machines to run. They use clear names, small functions and
simple data. When a program fails, the error message should say what went wrong and what to do next. Tests
check that the program still does what it promised after every change, so that mistakes are found early.

The library on the hill was built of red stone more than a hundred years ago. Its reading room has tall
windows, long oak tables and green lamps. Students come there to study history, mathematics, music and
languages. The librarian knows where every book is kept and can usually find an answer to any question,
even a strange one, within a few minutes.

Cooking a simple soup takes patience rather than skill. Chop an onion, two carrots and a stick of celery,
and let them soften in a little oil. Add potatoes, water or stock, a bay leaf and some pepper. Let it
simmer for half an hour, then taste it and add salt. Serve it hot with fresh bread and butter.

Weather changes quickly near the sea. A bright blue sky in the morning can turn to heavy rain by noon, and
the wind can rise from a gentle breeze to a strong gale in less than an hour. Fishermen watch the clouds
and the colour of the water, and they listen to the forecast on the radio before they leave the harbour.

Learning a new language is easier when you use it every day. Read short stories, listen to songs, write a
few sentences about your day, and speak with other people even when you make mistakes. Words that you use
often will stay with you, and the grammar will slowly begin to feel natural.

The old clock in the hall strikes every hour. Its pendulum swings left and right, and its hands move in
small steps around a white face with black numbers. Someone must wind it once a week, or it stops, and then
the house feels strangely quiet until it is started again.

Questions and answers: What is the capital of France? Paris is the capital of France. How many days are in
a week? There are seven days in a week. What colour is the sky on a clear day? It is blue. Why do leaves
fall in autumn? Trees stop feeding them as the days grow shorter and colder. Can you help me? Yes, of
course, I would be glad to help you. Thank you very much. You are welcome.

Numbers and dates: one, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June, July, August, September,
October, November, December. 1 2 3 4 5 6 7 8 9 0, 10, 20, 100, 2024, 3.14, 50%.
"""


def write_tiny_model(out_dir, arch: str = "llama", *, hidden_size: int = 64, intermediate_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                     vocab_size: int | None = None, max_position_embeddings: int = 2048,
                     rope_scaling: dict | str | None = None, dtype: str = "float32", seed: int = 0) -> Path:
    """Write the model directory and return its path. Same arguments, same files (bit for bit)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; "
                             "pass head_dim")
        head_dim = hidden_size // num_heads
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")

    tokenizer = train_tokenizer()
    tok_vocab = tokenizer.get_vocab_size()
    if vocab_size is None:
        vocab_size = tok_vocab
    if vocab_size < tok_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tok_vocab} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    shape = dict(arch=arch, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                 num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
                 max_position_embeddings=max_position_embeddings, rope_scaling=_rope_scaling(rope_scaling,
                 max_position_embeddings), dtype=dtype)
    _write_json(out / "config.json", _config(shape, ids))
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
    })
    save_file(_weights(shape, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(tokenizer, out, max_position_embeddings)
    return out


def _rope_scaling(rope_scaling, max_positions: int) -> dict | None:
    if rope_scaling is None:
        return None
    if rope_scaling == "llama3":
        # Pretend pretraining saw a quarter of the window, so the scaling changes real frequencies.
        return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": max(1, max_positions // 4)}
    if isinstance(rope_scaling, dict):
        return dict(rope_scaling)
    raise ValueError(f"rope_scaling must be None, 'llama3' or a dict, got {rope_scaling!r}")


def _config(s: dict, ids: dict) -> dict:
    architecture, tied = ARCHS[s["arch"]]
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if s["rope_scaling"]:
        rope = {"rope_theta": 10000.0, **s["rope_scaling"]}
    config = {
        "architectures": [architecture],
        "model_type": s["arch"],
        "vocab_size": s["vocab_size"],
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_layers"],
        "num_attention_heads": s["num_heads"],
        "num_key_value_heads": s["num_kv_heads"],
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": s["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "rope_parameters": rope,
        "tie_word_embeddings": tied,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": s["dtype"],
    }
    if s["arch"] in ("llama", "qwen3"):
        config["attention_bias"] = False
    if s["arch"] == "llama":
        config["mlp_bias"] = False
    if s["arch"] in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=s["num_layers"])
    if s["arch"] == "mistral":
        config["sliding_window"] = None
    return config


def _weights(s: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights scaled so activations stay near unit size and logits spread over a few units.

    Linear weights use std 1/sqrt(fan_in); the embedding (also the head when tied) uses 2/sqrt(hidden), so
    the logits have std ~2 and the layers' outputs outweigh the embedding: the next token depends on the
    context, not only on the last token. Norm weights are near 1 but not 1, so a misplaced norm shows.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[s["dtype"]]
    hidden, inter, head_dim = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q_size, kv_size = s["num_heads"] * head_dim, s["num_kv_heads"] * head_dim

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def linear(rows, cols):
        return normal(rows, cols, std=1 / math.sqrt(cols))

    def norm(size):
        return (1 + normal(size, std=0.1).float()).to(dtype)

    w = {"model.embed_tokens.weight": normal(s["vocab_size"], hidden, std=2 / math.sqrt(hidden))}
    for i in range(s["num_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(q_size, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_size, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_size, hidden)
        if s["arch"] == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(q_size, std=0.2)
            w[p + "self_attn.k_proj.bias"] = normal(kv_size, std=0.2)
            w[p + "self_attn.v_proj.bias"] = normal(kv_size, std=0.2)
        if s["arch"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, q_size)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm(hidden)
    if not ARCHS[s["arch"]][1]:
        w["lm_head.weight"] = normal(s["vocab_size"], hidden, std=2 / math.sqrt(hidden))
    return w


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE on CORPUS: every byte is a token, so any text (any language, emoji) round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return tokenizer


def _save_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                             "normalized": False, "single_word": False}
             for t in SPECIAL_TOKENS}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        # Older transformers read the template from here, newer ones from chat_template.jinja.
        "chat_template": CHAT_TEMPLATE,
    })
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- the embedded default model ------------------------------------------------------------------------

def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The tiny Llama that `semipd serve` uses without --model, built once under the cache directory.

    It is built in a temporary sibling directory and renamed into place, so a concurrent or interrupted
    build never leaves a half-written model where the server would load it.
    """
    from semipd.runtime import config as runtime_config

    final = Path(cache_dir or runtime_config.DEFAULT_CACHE_DIR) / "models" / "tiny-llama"
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=final.parent))
    try:
        write_tiny_model(tmp, "llama")
        _write_json(tmp / MARKER, {"version": FORMAT_VERSION, "arch": "llama"})
        if final.exists() and not _is_current(final):
            # An older format: move it aside first (rename cannot replace a non-empty directory).
            stale = Path(tempfile.mkdtemp(prefix=".tiny-llama-stale-", dir=final.parent))
            os.replace(final, stale / "model")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):  # another process won the race with a good model: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


# ---- `semipd tiny-model` -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="semipd tiny-model",
                                     description="Write a small random-weight Hugging Face model directory.")
    parser.add_argument("dir", help="output directory (must be empty or not exist, unless --force)")
    parser.add_argument("--arch", choices=list(ARCHS), default="llama")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's size")
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--rope-scaling", choices=["llama3"], default=None)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)

    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        parser.error(f"{out} exists and is not an empty directory (use --force to write into it)")
    try:
        path = write_tiny_model(out, args.arch, hidden_size=args.hidden_size,
                                intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                                num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                                vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
                                rope_scaling=args.rope_scaling, dtype=args.dtype, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
