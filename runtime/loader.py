"""Read a Hugging Face model directory (config.json + safetensors) into a CausalLM on the target device.

Memory: the model is built on the meta device (no storage), every checkpoint header is checked against it,
then `to_empty` allocates each parameter once on the target device and each checkpoint tensor is copied
straight into its parameter (or its slice of a fused q/k/v or gate/up parameter). safetensors memory-maps
the files, so at any moment the only extra memory is the one tensor being copied: never a state dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from semipd.runtime.layers import Linear
from semipd.runtime.models import ARCHITECTURES, CausalLM, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints saved; we recompute them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Hugging Face's defaults for fields a config.json may leave out, per model_type.
DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(Exception):
    """The model directory cannot be served; the message names the file and the field or tensor."""


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str, ops, *,
               max_model_len: int | None = None) -> tuple[CausalLM, ModelConfig]:
    """max_model_len (optional) sizes the rotary table and is the length a sliding window must cover."""
    cfg = read_model_config(model_dir, max_model_len=max_model_len)
    if not dtype.is_floating_point:
        raise ModelLoadError(f"dtype {dtype} is not a floating-point type")
    model = build_model(cfg, dtype, ops)
    files = check_weights(model, model_dir)
    model.to_empty(device=torch.device(device))
    load_weights(model, files)
    model.init_rotary(torch.device(device), max_model_len)
    return model.eval(), cfg


def build_model(cfg: ModelConfig, dtype: torch.dtype, ops) -> CausalLM:
    """The model's structure with no storage yet; `to_empty(device=...)` allocates it."""
    with torch.device("meta"):
        return CausalLM(cfg, ops, dtype)


# ---- config.json ---------------------------------------------------------------------------------------

def read_model_config(model_dir: str, *, max_model_len: int | None = None) -> ModelConfig:
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: model directory does not exist")
    path = root / "config.json"
    raw = _read_json(path, required=True)
    gen = _read_json(root / "generation_config.json", required=False) or {}
    return parse_config(raw, gen, str(path), max_model_len=max_model_len)


def parse_config(raw: dict, gen: dict, source: str, *, max_model_len: int | None = None) -> ModelConfig:
    f = _Fields(raw, source)
    archs = raw.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else archs
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{source}: architectures {archs!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
    family = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
              "MistralForCausalLM": "mistral"}[arch]
    if f.get("hidden_act", str, "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    if family == "llama" and f.get("mlp_bias", bool, False):
        raise ModelLoadError(f"{source}: mlp_bias true is not supported")

    hidden = f.positive("hidden_size")
    heads = f.positive("num_attention_heads")
    kv_heads = f.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
    # Qwen3Config defaults head_dim to 128 rather than deriving it; the others derive it.
    if raw.get("head_dim") is not None:
        head_dim = f.positive("head_dim")
    else:
        head_dim = 128 if family == "qwen3" and "head_dim" not in raw else hidden // heads
    if head_dim <= 0 or head_dim % 2:
        raise ModelLoadError(f"{source}: head_dim {head_dim} must be a positive even number")

    rope_theta, rope_scaling = _rope(raw, source)
    max_positions = f.positive("max_position_embeddings", DEFAULT_MAX_POSITIONS[family])
    window = _sliding_window(raw, family, source)
    limit = max_model_len or max_positions
    if window is not None and window < limit:
        raise ModelLoadError(f"{source}: sliding_window {window} is shorter than the serving length {limit}; "
                             "sliding-window attention is not implemented (serve with max_model_len <= "
                             f"{window})")

    bias = f.get("attention_bias", bool, False)
    eos = _token_ids(raw.get("eos_token_id"), "eos_token_id", source)
    for token in _token_ids(gen.get("eos_token_id"), "eos_token_id", source + " (generation_config.json)"):
        if token not in eos:
            eos.append(token)
    bos = raw.get("bos_token_id", gen.get("bos_token_id"))
    if bos is not None and not _is_int(bos):
        raise ModelLoadError(f"{source}: bos_token_id {bos!r} is not an integer")

    cfg = ModelConfig(
        architecture=arch,
        vocab_size=f.positive("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.positive("intermediate_size"),
        num_layers=f.positive("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(f.get("rms_norm_eps", (int, float), 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
        attention_bias=True if family == "qwen2" else bias if family != "mistral" else False,
        o_proj_bias=bias if family in ("llama", "qwen3") else False,
        qk_norm=family == "qwen3",
        eos_token_ids=eos,
        bos_token_id=bos,
        torch_dtype=_dtype(raw, source),
        sliding_window=window,
    )
    _check_rope(cfg, source)
    return cfg


class _Fields:
    """Typed reads from config.json that fail with the file and field named."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, key: str, kind, default):
        value = self.raw.get(key, default)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ModelLoadError(f"{self.source}: {key} {value!r} should be of type "
                                 f"{'/'.join(k.__name__ for k in kinds)}")
        return value

    def positive(self, key: str, default=None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise ModelLoadError(f"{self.source}: required field {key} is missing")
        if not _is_int(value) or value <= 0:
            raise ModelLoadError(f"{self.source}: {key} {value!r} should be a positive integer")
        return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path, *, required: bool):
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """Transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x wrote rope_theta + rope_scaling."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ModelLoadError(f"{source}: rope_parameters {params!r} should be an object")
        scaling = dict(params)
        theta = scaling.pop("rope_theta", raw.get("rope_theta", 10000.0))
        field = "rope_parameters"
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
        field = "rope_scaling"
        if scaling is not None and not isinstance(scaling, dict):
            raise ModelLoadError(f"{source}: rope_scaling {scaling!r} should be an object or null")
        scaling = dict(scaling) if scaling else None
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelLoadError(f"{source}: rope_theta {theta!r} should be a positive number")
    if scaling is not None:
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelLoadError(f"{source}: {field}.partial_rotary_factor is not supported")
        scaling.pop("partial_rotary_factor", None)
        if scaling.get("rope_type", "default") in ("default", None):
            scaling = None
    return float(theta), scaling


def _check_rope(cfg: ModelConfig, source: str) -> None:
    from semipd.kernels import build_cos_sin_cache
    try:
        # One row is enough to run the same validation the real table build will run.
        build_cos_sin_cache(cfg.head_dim, 1, cfg.rope_theta, cfg.rope_scaling)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{source}: rope scaling {cfg.rope_scaling!r}: {e}") from None


def _sliding_window(raw: dict, family: str, source: str) -> int | None:
    window = raw.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        # Qwen only slides when use_sliding_window is set, and then only on the "sliding_attention" layers.
        layer_types = raw.get("layer_types") or []
        if not raw.get("use_sliding_window", False):
            return None
        if layer_types and "sliding_attention" not in layer_types:
            return None
        if not layer_types and raw.get("max_window_layers", 28) >= raw.get("num_hidden_layers", 0):
            return None
    elif family == "llama":
        return None
    if window is not None and (not _is_int(window) or window <= 0):
        raise ModelLoadError(f"{source}: sliding_window {window!r} should be a positive integer or null")
    return window


def _token_ids(value, field: str, source: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ModelLoadError(f"{source}: {field} {value!r} should be a token id or a list of them")
    return list(values)


def _dtype(raw: dict, source: str) -> torch.dtype | None:
    key = "dtype" if "dtype" in raw else "torch_dtype"
    name = raw.get(key)
    if name is None:
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"{source}: {key} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- weights -------------------------------------------------------------------------------------------

def weight_targets(model: CausalLM) -> dict[str, tuple[torch.nn.Parameter, int | None, int | None]]:
    """Checkpoint tensor name -> (parameter, first row, rows) it fills; (param, None, None) for a whole one."""
    targets = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Linear):
            parent = module_name.rpartition(".")[0]
            for shard, (offset, size) in module.shards.items():
                for pname, param in module.named_parameters(recurse=False):
                    targets[f"{parent}.{shard}.{pname}"] = (param, offset, size)
            continue
        for pname, param in module.named_parameters(recurse=False):
            targets[f"{module_name}.{pname}" if module_name else pname] = (param, None, None)
    return targets


def check_weights(model: CausalLM, model_dir: str) -> dict[Path, list[str]]:
    """Check every checkpoint header against the model before any storage is allocated.

    Returns each safetensors file with the tensor names to copy from it.
    """
    root = Path(model_dir)
    files, index_path = _weight_files(root)
    targets = weight_targets(model)
    where: dict[str, Path] = {}
    plan: dict[Path, list[str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in where:
                        raise ModelLoadError(f"{path}: tensor {name!r} is also in {where[name]}")
                    where[name] = path
                    if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
                        continue  # tied models may still ship the head; the embedding is used instead
                    if name not in targets:
                        raise ModelLoadError(f"{path}: unexpected tensor {name!r} for {model.cfg.architecture}")
                    param, _, rows = targets[name]
                    want = tuple(param.shape) if rows is None else (rows, *param.shape[1:])
                    got = tuple(f.get_slice(name).get_shape())
                    if got != want:
                        raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(got)}, "
                                             f"expected {list(want)} from config.json")
                    plan.setdefault(path, []).append(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ModelLoadError(f"{path}: cannot read safetensors file: {e}") from None
    missing = [name for name in targets if name not in where]
    if missing:
        source = index_path or (files[0] if len(files) == 1 else root)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: checkpoint has no tensor {missing[0]!r}{more}")
    if index_path is not None:
        _check_index(index_path, where)
    return plan


def _weight_files(root: Path) -> tuple[list[Path], Path | None]:
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, required=True)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: weight_map is missing or empty")
        files = []
        for name, shard in weight_map.items():
            path = root / str(shard)
            if not path.is_file():
                raise ModelLoadError(f"{index_path}: weight_map names shard {shard!r} (for tensor {name!r}), "
                                     f"which does not exist in {root}")
            if path not in files:
                files.append(path)
        return files, index_path
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root}: no *.safetensors weights found (other formats are not supported)")
    return files, None


def _check_index(index_path: Path, where: dict[str, Path]) -> None:
    weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in weight_map.items():
        if name not in where:
            raise ModelLoadError(f"{index_path}: weight_map lists tensor {name!r} in {shard!r}, "
                                 "but no shard contains it")


@torch.no_grad()
def load_weights(model: CausalLM, plan: dict[Path, list[str]]) -> None:
    """Copy each checkpoint tensor into the storage `to_empty` gave its parameter (casting on the way)."""
    targets = weight_targets(model)
    for path, names in plan.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                param, offset, rows = targets[name]
                dest = param.data if rows is None else param.data[offset:offset + rows]
                dest.copy_(f.get_tensor(name))
