"""Runs the model for a prefill or decode step: builds the flat batch from sequences, owns the KV pool tensors.

One instance serves both workers concurrently: it keeps no per-step state, each call builds its own batch."""
import logging
import time

import torch

from semipd.kernels import load_ops
from semipd.runtime.batch import ForwardBatch
from semipd.runtime.block_manager import BlockManager
from semipd.runtime.config import EngineConfig
from semipd.runtime.loader import load_model
from semipd.runtime.sequence import Sequence

log = logging.getLogger("semipd.runner")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kernel_backend = resolve_kernel_backend(config.kernel_backend, self.device)
        self.ops = load_ops(self.kernel_backend)
        self.model, self.model_config = load_model(config.model, self.dtype, self.device, self.ops,
                                                   max_model_len=config.max_model_len)
        if self.device.type == "cpu" and self.model.pack_for_cpu():
            log.info("CPU matmul weights packed for oneDNN")
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({mc.max_position_embeddings}) in config.json")
        self.block_size = config.block_size
        bytes_per_block = 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory(config.kv_cache_memory, bytes_per_block)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"the KV pool ({self.num_blocks} blocks x {self.block_size} tokens) cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}; raise --kv-cache-memory or "
                             f"--num-kv-blocks, or lower --max-model-len")
        shape = (self.num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        self.model.attach_kv_cache(self.k_caches, self.v_caches)
        self.block_manager = BlockManager(self.num_blocks, self.block_size)
        self.decode_graphs: dict[tuple, DecodeGraph] = {}
        log.info("model %s on %s (%s, %s kernels); KV pool %d blocks x %d tokens (%.1f MiB)", config.model,
                 self.device, str(self.dtype).removeprefix("torch."), self.kernel_backend, self.num_blocks,
                 self.block_size, self.num_blocks * bytes_per_block / 2**20)

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

    def _blocks_from_memory(self, amount: float, bytes_per_block: int) -> int:
        if self.device.type == "cuda" and amount <= 1.0:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * amount
        else:
            budget = amount * 2**30
        return max(1, int(budget // bytes_per_block))

    def _tensor(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

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
        hidden = self.model(batch)
        return self.model.compute_logits(hidden)


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
        tables = [s.block_table + [0] * (self.block_tables.shape[1] - len(s.block_table)) for s in seqs]
        self.input_ids.copy_(torch.tensor([s.last_token_id for s in seqs] + [0] * pad), non_blocking=True)
        self.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping.copy_(torch.tensor([bm.slot(s, p) for s, p in zip(seqs, positions)] + [-1] * pad),
                                non_blocking=True)
        self.seq_lens.copy_(torch.tensor([p + 1 for p in positions] + [0] * pad, dtype=torch.int32),
                            non_blocking=True)
        self.block_tables[:n].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        self.block_tables[n:].zero_()
        self.graph.replay()
        return self.logits[:n]
