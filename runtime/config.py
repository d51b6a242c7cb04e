"""Engine and server configuration. `semipd serve` flags map one to one onto these fields."""
import os
import math
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("SEMIPD_CACHE", Path.home() / ".cache" / "semipd"))


PARTITION_POLICIES = ("external", "static", "slo")


@dataclass(slots=True)
class SloSettings:
    """The in-engine SLO policy (`--partition-policy slo`): its targets, split bounds and clocks."""
    ttft_ms: float | None = None                # TTFT target at `percentile`; None: not steered towards
    tpot_ms: float | None = None                # TPOT target at `percentile`
    percentile: float = 90.0
    partition_min: float = 0.1                  # prefill share bounds the policy stays within
    partition_max: float = 0.9
    partition_step: float = 0.05                # largest feedback move
    partition_cooldown: float = 30.0            # seconds between two split changes
    interval: float = 5.0                       # seconds between two decisions
    window: float = 30.0                        # seconds of measurements each decision reads


@dataclass(slots=True)
class EngineConfig:
    model: str                                  # Hugging Face model directory, or hf://ORG/NAME[@REVISION]
    served_model_name: str | None = None        # name clients send in "model"; default: the directory name
    dtype: str = "auto"                         # auto | float32 | float16 | bfloat16 (auto: bf16 on CUDA, f32 on CPU)
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None            # default: the model's, or less if that is more than the pool holds
    max_num_seqs: int = 64                      # decode batch limit
    max_num_batched_tokens: int = 512           # prefill token budget per step (longer prompts are chunked)
    max_num_waiting: int = 256                  # prefill queue limit; beyond it requests get 503
    block_size: int = 16
    num_kv_blocks: int | None = None            # default: sized from kv_cache_memory
    gpu_memory_utilization: float = 0.9         # CUDA: share of the device's memory this engine may use in all
    kv_cache_memory: float | None = None        # GiB for the KV pool (default: 0.25 on CPU; on CUDA what
                                                # gpu_memory_utilization leaves after weights and activations)
    enable_prefix_caching: bool = True          # share the KV of repeated prompt prefixes (full blocks)
    kernel_backend: str = "auto"                # auto | triton | torch
    partition_backend: str = "auto"             # auto | greenctx | shared | cpu
    sm_split: str | None = None                 # initial split, "prefill=64" or "prefill=0.5"
    partition_file: str | None = None           # watched file holding the semipd.io/sm-partition value
    partition_policy: str = "external"          # external: admin API and file | static | slo: in-engine policy
    slo: SloSettings = field(default_factory=SloSettings)
    emulate_sm_share: bool = False              # cpu backend: stretch each step to its SM share (a stand-in)
    cuda_graphs: bool = True                    # decode CUDA graphs (per split) on CUDA
    cpu_compile: bool = False                   # CPU: decode forward through torch.compile (runtime/cpu_path.py)
    seed: int = 0
    download_dir: str = str(DEFAULT_CACHE_DIR / "models")   # where hf:// models are fetched to
    torch_threads: int | None = None            # CPU only: threads per worker while both work (decode alone
                                                # takes the rest, runtime/cpu_threads.py); default: half the cores

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def check_memory(config: EngineConfig) -> None:
    """A ValueError (one line, in flag names) for memory settings no pool can be sized from."""
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {config.gpu_memory_utilization}")
    if config.kv_cache_memory is not None and not config.kv_cache_memory > 0:
        raise ValueError(f"--kv-cache-memory must be a positive number of GiB, got {config.kv_cache_memory}")
    if config.num_kv_blocks is not None and config.num_kv_blocks < 1:
        raise ValueError(f"--num-kv-blocks must be at least 1, got {config.num_kv_blocks}")


def check_partition_policy(config: EngineConfig) -> None:
    """One owner per split: a ValueError (one line, in flag names) for a combination that would give it two, or
    for SLO settings that cannot work. `semipd serve` turns it into exit status 2; Engine into 'cannot start'."""
    policy, slo = config.partition_policy, config.slo
    if policy not in PARTITION_POLICIES:
        raise ValueError(f"--partition-policy {policy!r}: choose one of {', '.join(PARTITION_POLICIES)}")
    targets = (slo.ttft_ms, slo.tpot_ms)
    if policy != "slo":
        if any(t is not None for t in targets):
            raise ValueError(f"--slo-ttft-ms/--slo-tpot-ms need --partition-policy slo (it is {policy}): "
                             "only the in-engine policy reads them")
        if policy == "static" and config.partition_file:
            raise ValueError("--partition-file cannot be used with --partition-policy static (the split would "
                             "follow the file); use --partition-policy external")
        return
    if config.partition_file:
        raise ValueError("--partition-file cannot be used with --partition-policy slo: the in-engine SLO "
                         "policy owns the split; use --partition-policy external to follow the file")
    if all(t is None for t in targets):
        raise ValueError("--partition-policy slo needs a target: --slo-ttft-ms and/or --slo-tpot-ms")
    positive = {"--slo-ttft-ms": slo.ttft_ms, "--slo-tpot-ms": slo.tpot_ms, "--policy-interval": slo.interval,
                "--policy-window": slo.window, "--partition-step": slo.partition_step}
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    if not 0 < slo.percentile < 100:
        raise ValueError(f"--slo-percentile must be between 0 and 100 (exclusive), got {slo.percentile}")
    if not 0 < slo.partition_min < slo.partition_max < 1:
        raise ValueError(f"--partition-min and --partition-max must satisfy 0 < min < max < 1 (prefill shares), "
                         f"got {slo.partition_min} and {slo.partition_max}")
    if not (math.isfinite(slo.partition_cooldown) and slo.partition_cooldown >= 0):
        raise ValueError(f"--partition-cooldown must be zero or more seconds, got {slo.partition_cooldown}")


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None              # from --admin-token-file or SEMIPD_ADMIN_TOKEN
    admin_token_file: str | None = None         # re-read when it changes (a re-created Secret)
    graceful_timeout: float = 30.0              # seconds in-flight requests get after SIGTERM
    tool_call_parser: str = "auto"              # auto (by architecture) | llama3_json | hermes | mistral
    # Larger bodies get 413 before they are read. 16 MiB holds a 1M-token prompt sent as token ids (about 8
    # bytes each in JSON) with room to spare; far more is no prompt any model here can take.
    max_request_body_bytes: int = 16 * 2**20
    log_level: str = "info"
    extra: dict = field(default_factory=dict)
