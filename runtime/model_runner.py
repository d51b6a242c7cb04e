"""Runs the model for a prefill or decode step: builds the flat batch from sequences, owns the KV pool tensors.

One instance serves both workers concurrently: it keeps no per-step state, each call builds its own batch."""
import logging
import time

import torch

from semipd.kernels import load_ops
from semipd.runtime.batch import ForwardBatch
from semipd.runtime.block_manager import BlockManager
from semipd.runtime.config import EngineConfig, check_memory
from semipd.runtime.cpu_path import make_decode_path
from semipd.runtime.cpu_threads import core_shares
from semipd.runtime.loader import load_model
from semipd.runtime.sampling import SamplingParams
from semipd.runtime.sequence import Sequence

log = logging.getLogger("semipd.runner")

CPU_KV_CACHE_GIB = 0.25           # the KV pool on CPU when --kv-cache-memory is not given
CUDA_GRAPH_RESERVE = 512 * 2**20  # what decode graphs may take (one shared memory pool, captured after the KV pool)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_pool_budget(total: int, free: int, utilization: float, other_needs: int) -> int:
    """Bytes for the KV pool: this engine may use `utilization` of the device; what is already in use (its own
    weights, other processes) and what it will need besides (activations, graphs) come off, and never more than
    is free."""
    in_use = total - free
    return max(0, min(int(total * utilization) - in_use, free) - other_needs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose auto, float32, float16 or bfloat16")
    return DTYPES[name]


def resolve_kernel_backend(name: str, device: torch.device) -> str:
    """Triton kernels on CUDA, their torch references on CPU (Triton on CPU only runs in the slow interpreter)."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in ("triton", "torch"):
        raise ValueError(f"unknown kernel backend {name!r}: choose auto, triton or torch")
    return name


class ModelRunner:
    def __init__(self, config: EngineConfig):
        check_memory(config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kernel_backend = resolve_kernel_backend(config.kernel_backend, self.device)
        self.ops = load_ops(self.kernel_backend)
        self.model, self.model_config = load_model(config.model, self.dtype, self.device, self.ops,
                                                   max_model_len=config.max_model_len)
        if self.device.type == "cpu" and self.model.pack_for_cpu():
            log.info("CPU matmul weights packed for oneDNN")
        mc = self.model_config
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({mc.max_position_embeddings}) in config.json")
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.block_size = config.block_size
        bytes_per_block = 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        self.num_blocks = config.num_kv_blocks or self._pool_blocks(config, bytes_per_block)
        pool_tokens = self.num_blocks * self.block_size
        if config.max_model_len is None and pool_tokens < self.max_model_len:
            log.info("max_model_len set to %d, what the KV pool holds for one request (the model allows %d; "
                     "give more memory to the pool, or set --max-model-len)", pool_tokens, self.max_model_len)
            self.max_model_len = pool_tokens
        if pool_tokens < self.max_model_len:
            raise ValueError(f"the KV pool ({self.num_blocks} blocks x {self.block_size} tokens) cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}; raise --gpu-memory-utilization, "
                             f"--kv-cache-memory or --num-kv-blocks, or lower --max-model-len")
        self._make_pool(self.num_blocks, config.enable_prefix_caching)
        self.decode_graphs: dict[tuple, DecodeGraph] = {}
        # None unless CPU and --cpu-compile; compiled for the thread counts Engine gives the decode worker
        cores = core_shares(config.torch_threads)
        self.cpu_decode = make_decode_path(self, config.cpu_compile, (cores.decode_shared, cores.decode_alone))
        log.info("model %s on %s (%s, %s kernels); KV pool %d blocks x %d tokens (%.1f MiB), prefix caching %s",
                 config.model, self.device, str(self.dtype).removeprefix("torch."), self.kernel_backend,
                 self.num_blocks, self.block_size, self.num_blocks * bytes_per_block / 2**20,
                 "on" if config.enable_prefix_caching else "off")

    def _make_pool(self, num_blocks: int, enable_prefix_caching: bool) -> None:
        mc = self.model_config
        shape = (num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        self.model.attach_kv_cache(self.k_caches, self.v_caches)
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching,
                                          max_blocks_per_seq=-(-self.max_model_len // self.block_size))

    def _pool_blocks(self, config: EngineConfig, bytes_per_block: int) -> int:
        """--kv-cache-memory GiB when given; on CPU its default; on CUDA what --gpu-memory-utilization leaves once
        the weights, the other processes, the measured activations and the CUDA-graph reserve are counted."""
        if config.kv_cache_memory is not None or self.device.type != "cuda":
            gib = config.kv_cache_memory if config.kv_cache_memory is not None else CPU_KV_CACHE_GIB
            return max(1, int(gib * 2**30 // bytes_per_block))
        activations = self._activation_peak(config)
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = CUDA_GRAPH_RESERVE if config.cuda_graphs else 0
        budget = kv_pool_budget(total, free, config.gpu_memory_utilization, activations + reserve)
        log.info("KV pool: %.0f%% of %.1f GiB, less %.1f GiB in use (weights, other processes), %.2f GiB of "
                 "activations (measured) and %.2f GiB for CUDA graphs: %.1f GiB",
                 100 * config.gpu_memory_utilization, total / 2**30, (total - free) / 2**30, activations / 2**30,
                 reserve / 2**30, budget / 2**30)
        if budget < bytes_per_block:
            raise ValueError(f"no GPU memory left for the KV pool: --gpu-memory-utilization "
                             f"{config.gpu_memory_utilization} of {total / 2**30:.1f} GiB is taken by the weights, "
                             f"other processes ({(total - free) / 2**30:.1f} GiB in use) and activations; raise it, "
                             f"or lower --max-num-batched-tokens")
        return int(budget // bytes_per_block)

    @torch.inference_mode()
    def _activation_peak(self, config: EngineConfig, peak_of=None) -> int:
        """Bytes a prefill step of the full token budget and a decode step of the full batch take beyond the
        weights, measured on a scratch pool: the two workers run at once, so their peaks add up. `peak_of(step)`
        runs a step and returns its peak (default: CUDA's allocator statistics)."""
        peak_of = peak_of or (lambda step: _cuda_peak(step, self.device))
        tokens = min(config.max_num_batched_tokens, self.max_model_len - 1)
        seqs = config.max_num_seqs
        self._make_pool(-(-tokens // self.block_size) + seqs, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=1)
        prompt = Sequence("profile-prefill", [0] * tokens, params, lambda out: None, self.device)
        self.block_manager.allocate(prompt, tokens)
        batch = [Sequence(f"profile-decode-{i}", [0], params, lambda out: None, self.device) for i in range(seqs)]
        for seq in batch:
            self.block_manager.allocate(seq, 1)
        try:
            return (peak_of(lambda: self.prefill([(prompt, tokens)], [True]))
                    + peak_of(lambda: self._decode_eager(batch)))
        finally:
            self.k_caches = self.v_caches = []
            self.model.k_caches = self.model.v_caches = []
            self.block_manager = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def capture_decode_graphs(self, decode_streams: list, max_batch: int) -> None:
        """One set of decode graphs per split, each captured on that split's decode stream: a graph keeps the SMs
        of the stream it was captured on, whatever stream later replays it. Done once, at start-up."""
        pool = torch.cuda.graph_pool_handle()
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= _bucket(max_batch)]
        started = time.monotonic()
        try:
            for stream in {_stream_key(s): s for s in decode_streams}.values():
                for size in sizes:
                    self.decode_graphs[(_stream_key(stream), size)] = DecodeGraph(self, size, stream, pool)
        except Exception as exc:  # an engine that decodes eagerly beats one that does not start
            log.warning("decode CUDA graph capture failed, decoding eagerly: %s", exc)
            self.decode_graphs.clear()
            return
        log.info("captured %d decode CUDA graphs (%d streams x batch sizes %s) in %.1fs", len(self.decode_graphs),
                 len(self.decode_graphs) // max(1, len(sizes)), sizes, time.monotonic() - started)

    def _tensor(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """The batch's tables, [B, longest table]: one gather from the block manager's rows (in pinned memory on
        CUDA, so the copy is asynchronous), not B lists padded to a rectangle each step."""
        width = max(len(s.block_table) for s in seqs)
        tables = self.block_manager.tables.gather([s.table_row for s in seqs], width,
                                                  pin_memory=self.device.type == "cuda")
        return tables.to(self.device, non_blocking=True) if self.device.type == "cuda" else tables

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]], sample_rows: list[bool]) -> torch.Tensor:
        """Compute KV for the next `n` tokens of each sequence; logits for the rows whose chunk ends the prompt."""
        bm = self.block_manager
        input_ids, positions, slots, seq_lens, cu, logits_idx = [], [], [], [], [0], []
        for (seq, n), want_logits in zip(chunks, sample_rows):
            start = seq.num_computed_tokens
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            slots += [bm.slot(seq, p) for p in range(start, start + n)]
            seq_lens.append(start + n)
            cu.append(cu[-1] + n)
            if want_logits:
                logits_idx.append(cu[-1] - 1)
        batch = ForwardBatch(
            input_ids=self._tensor(input_ids, torch.int64), positions=self._tensor(positions, torch.int64),
            is_prefill=True, slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._block_tables([s for s, _ in chunks]), seq_lens=self._tensor(seq_lens, torch.int32),
            cu_seqlens_q=self._tensor(cu, torch.int32), max_seqlen_q=max(n for _, n in chunks),
            max_seqlen_k=max(seq_lens), logits_indices=self._tensor(logits_idx, torch.int64))
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], stream=None) -> torch.Tensor:
        """One token for each sequence: its last token's KV goes into the cache, logits predict the next.
        On CUDA this replays the graph captured for the current split's decode stream when there is one."""
        graph = self.decode_graphs.get((_stream_key(stream), _bucket(len(seqs)))) if self.decode_graphs else None
        if graph is not None:
            return graph.replay(self, seqs)
        return self._decode_eager(seqs)

    def _decode_eager(self, seqs: list[Sequence]) -> torch.Tensor:
        bm = self.block_manager
        positions = [s.num_tokens - 1 for s in seqs]
        batch = ForwardBatch(
            input_ids=self._tensor([s.last_token_id for s in seqs], torch.int64),
            positions=self._tensor(positions, torch.int64), is_prefill=False,
            slot_mapping=self._tensor([bm.slot(s, p) for s, p in zip(seqs, positions)], torch.int64),
            block_tables=self._block_tables(seqs), seq_lens=self._tensor([p + 1 for p in positions], torch.int32),
            cu_seqlens_q=self._tensor(list(range(len(seqs) + 1)), torch.int32), max_seqlen_q=1,
            max_seqlen_k=max(positions) + 1, logits_indices=self._tensor(list(range(len(seqs))), torch.int64))
        hidden = (self.cpu_decode or self.model)(batch)
        return self.model.compute_logits(hidden)


def _cuda_peak(step, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def _bucket(n: int) -> int:
    return next((b for b in GRAPH_BATCH_SIZES if b >= n), n)


def _stream_key(stream):
    return None if stream is None else stream.cuda_stream


class DecodeGraph:
    """A decode step for up to `size` sequences, captured on one stream. Inputs live in static buffers; unused
    rows have slot -1 (nothing stored) and length 0 (nothing attended)."""

    def __init__(self, runner: ModelRunner, size: int, stream, pool):
        dev, mc = runner.device, runner.model_config
        width = -(-runner.max_model_len // runner.block_size)
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(size, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(size, width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=dev)
        self.batch = ForwardBatch(
            input_ids=self.input_ids, positions=self.positions, is_prefill=False, slot_mapping=self.slot_mapping,
            block_tables=self.block_tables, seq_lens=self.seq_lens,
            cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32, device=dev), max_seqlen_q=1,
            max_seqlen_k=runner.max_model_len, logits_indices=torch.arange(size, dtype=torch.int64, device=dev),
            # One workspace for all layers, allocated here rather than by each layer inside the capture.
            decode_workspace=runner.ops.make_decode_workspace(size, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                                              runner.max_model_len, dev))
        self.graph = torch.cuda.CUDAGraph()
        # The buffers above were filled on the current stream; warm-up and capture run on `stream`, which does not
        # otherwise wait for it (green-context streams are non-blocking).
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            runner.model.compute_logits(runner.model(self.batch))       # warm-up: kernels compiled, autotuned
        stream.synchronize()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.logits = runner.model.compute_logits(runner.model(self.batch))

    def replay(self, runner: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
        bm, n = runner.block_manager, len(seqs)
        positions = [s.num_tokens - 1 for s in seqs]
        pad = self.size - n
        # Only the columns this batch uses: a row's kernel reads no further than its own length, so what an
        # earlier step left past them is never read, and the host's work stays O(batch x context), not
        # O(batch x max_model_len).
        width = max(len(s.block_table) for s in seqs)
        tables = bm.tables.gather([s.table_row for s in seqs], width, pin_memory=runner.device.type == "cuda")
        self.input_ids.copy_(torch.tensor([s.last_token_id for s in seqs] + [0] * pad), non_blocking=True)
        self.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping.copy_(torch.tensor([bm.slot(s, p) for s, p in zip(seqs, positions)] + [-1] * pad),
                                non_blocking=True)
        self.seq_lens.copy_(torch.tensor([p + 1 for p in positions] + [0] * pad, dtype=torch.int32),
                            non_blocking=True)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        # Rows past n keep what a larger batch left there: their length is 0, so no kernel reads them (zeroing
        # them would be device work that grows with max_model_len).
        self.graph.replay()
        return self.logits[:n]
