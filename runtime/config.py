"""Engine and server configuration. `semipd serve` flags map one to one onto these fields."""
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("SEMIPD_CACHE", Path.home() / ".cache" / "semipd"))


def cpu_share(torch_threads: int | None) -> int:
    """Threads each CPU worker gets while both work (a lone worker takes twice as many): the flag, or half the
    cores this process may use (a container's cpuset, not the host's count)."""
    if torch_threads:
        return torch_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


@dataclass(slots=True)
class EngineConfig:
    model: str                                  # Hugging Face model directory
    served_model_name: str | None = None        # name clients send in "model"; default: the directory name
    dtype: str = "auto"                         # auto | float32 | float16 | bfloat16 (auto: bf16 on CUDA, f32 on CPU)
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None            # default: the model's max_position_embeddings
    max_num_seqs: int = 64                      # decode batch limit
    max_num_batched_tokens: int = 512           # prefill token budget per step (longer prompts are chunked)
    max_num_waiting: int = 256                  # prefill queue limit; beyond it requests get 503
    block_size: int = 16
    num_kv_blocks: int | None = None            # default: sized from kv_cache_memory
    kv_cache_memory: float = 0.25               # GiB on CPU; on CUDA a fraction of free memory if <= 1
    kernel_backend: str = "auto"                # auto | triton | torch
    partition_backend: str = "auto"             # auto | greenctx | shared | cpu
    sm_split: str | None = None                 # initial split, "prefill=64" or "prefill=0.5"
    partition_file: str | None = None           # watched file holding the semipd.io/sm-partition value
    cuda_graphs: bool = True                    # decode CUDA graphs (per split) on CUDA
    seed: int = 0
    torch_threads: int | None = None            # CPU only: threads per worker while both work (a lone one
                                                # takes twice as many); default: half the cores

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None              # from --admin-token-file or SEMIPD_ADMIN_TOKEN
    graceful_timeout: float = 30.0              # seconds in-flight requests get after SIGTERM
    log_level: str = "info"
    extra: dict = field(default_factory=dict)
