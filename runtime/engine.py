"""The semi-PD engine: two worker threads, prefill and decode, running at the same time over one model and one
paged KV pool.

A request's path: add_request -> Scheduler (runtime/scheduler.py: queues, admission, preemption, finish) ->
prefill worker (its prompt, chunked under a token budget, minus what the prefix cache holds; the first token)
-> handoff (its block table plus that token and, on CUDA, an event recorded on the prefill stream; KV is never
copied) -> decode worker (continuous batching) -> OutputProcessor (runtime/output.py: text, stop, stream).
Each worker asks the partition controller, at the top of every iteration, which SM split and stream to use.
Who sets the split is config.partition_policy: external writers (admin API, partition file), nobody (static), or
the in-engine SLO policy (runtime/slo_loop.py), which reads the engine's own recent measurements (self.recent).
"""
import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from semipd.runtime.config import EngineConfig, check_partition_policy
from semipd.runtime.cpu_threads import core_shares, in_own_thread
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.model_runner import ModelRunner, resolve_device
from semipd.runtime.output import OutputProcessor
from semipd.runtime.partition import PartitionController, PartitionFileWatcher, emulated_wait, make_backend
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sampling import SamplingParams, sample_step
from semipd.runtime.scheduler import EngineOverloaded, Scheduler
from semipd.runtime.sequence import RequestOutput, Sequence

log = logging.getLogger("semipd.engine")

__all__ = ["Engine", "EngineOverloaded", "RequestOutput"]


class Engine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer
        check_partition_policy(config)
        self.config = config
        torch.manual_seed(config.seed)       # the generator of every request without a seed of its own
        on_cpu = resolve_device(config.device).type == "cpu"
        # CPU: loaded on a thread that ends, so that no OpenMP team outlives the loading (runtime/cpu_threads.py)
        self.runner = in_own_thread(ModelRunner, config) if on_cpu else ModelRunner(config)
        self._cores = core_shares(config.torch_threads) if on_cpu else None
        self._busy = {"prefill": False, "decode": False}
        self.block_manager = self.runner.block_manager
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model_name = config.model_name
        self.model_dir = str(config.model)
        self.max_model_len = self.runner.max_model_len
        self.created = int(time.time())
        self.metrics = EngineMetrics(self.model_name)
        self.recent = RecentSamples()
        self.output = OutputProcessor(self.tokenizer, set(self.runner.model_config.eos_token_ids),
                                      self.max_model_len, self.metrics, self.recent)
        self.scheduler = Scheduler(config, self.block_manager, self.metrics, self.recent, self._finished)
        self._guided = None
        self._guided_lock = threading.Lock()
        backend = make_backend(config.partition_backend, self.runner.device)
        if config.emulate_sm_share and backend.name != "cpu":
            raise ValueError(f"--emulate-sm-share is for the cpu partition backend only (this engine uses "
                             f"{backend.name}): a real partition must not be slowed by a stand-in")
        self.partition = PartitionController(backend, self.metrics, initial=config.sm_split)
        if self.runner.device.type == "cuda" and config.cuda_graphs:
            backend = self.partition.backend
            self.runner.capture_decode_graphs([backend.streams(s)[1] for s in backend.splits.values()],
                                              config.max_num_seqs)
        self._file_watcher = (PartitionFileWatcher(config.partition_file, self.partition)
                              if config.partition_file else None)
        self.slo_loop = None
        if config.partition_policy == "slo":
            from semipd.runtime.slo_loop import SloLoop
            self.slo_loop = SloLoop(self, config.slo)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=("prefill", self._prefill_step), name="prefill",
                                          daemon=True),
                         threading.Thread(target=self._loop, args=("decode", self._decode_step), name="decode",
                                          daemon=True)]
        self.worker_error: BaseException | None = None

    # ---- public API -------------------------------------------------------------------------------------------
    def start(self):
        if self._file_watcher:
            self._file_watcher.start()
        if self.slo_loop:
            self.slo_loop.start()
        for t in self._threads:
            t.start()

    def shutdown(self, timeout: float = 10.0):
        self._stop.set()
        with self.scheduler.lock:
            self.scheduler.closed = True
            self.scheduler.lock.notify_all()
        if self._file_watcher:
            self._file_watcher.stop()
        if self.slo_loop:
            self.slo_loop.stop()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, but this model's maximum context length is "
                             f"{self.max_model_len} tokens (prompt plus at least one generated token)")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds this model's "
                             f"maximum context length of {self.max_model_len} tokens")
        vocab = self.runner.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    on_output: Callable[[RequestOutput], None]) -> None:
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params, on_output, self.runner.device)
        if params.guided is not None:
            seq.grammar = self.guided.matcher(params.guided)
        self.scheduler.add(seq)
        n = len(prompt_token_ids)
        self.metrics.arrivals.inc()
        self.metrics.arrived_prompt_tokens.inc(n)
        self.recent.count("arrivals")
        self.recent.count("arrived_prompt_tokens", n)
        self._update_gauges()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.add_request(request_id, prompt_token_ids, params,
                         lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request. Queued ones go at once; a running one is freed at its worker's next iteration."""
        self.scheduler.abort(request_id)
        self._update_gauges()

    @property
    def guided(self):
        """Structured output (runtime/guided.py), set up on first use: reading the vocabulary takes a while."""
        with self._guided_lock:
            if self._guided is None:
                from semipd.runtime.guided import GuidedDecoding
                self._guided = GuidedDecoding(self.tokenizer, self.runner.model_config.vocab_size)
            return self._guided

    def num_unfinished(self) -> int:
        with self.scheduler.lock:
            return len(self.scheduler.by_id)

    def queue_state(self) -> tuple[int, int, float]:
        """Requests waiting for prefill, prefilled ones waiting for a decode slot, and the KV pool's usage."""
        waiting, _, handoff, _ = self.scheduler.counts()
        return waiting, handoff, self.block_manager.usage

    # ---- worker loops -----------------------------------------------------------------------------------------
    def _loop(self, phase: str, step: Callable[[], bool]):
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    if not step():
                        self.partition.idle(phase)
                        with self.scheduler.lock:
                            self.scheduler.lock.wait(0.05)
        except BaseException as exc:  # a dead worker must not leave clients hanging
            log.exception("%s worker failed", threading.current_thread().name)
            self.worker_error = exc
            self._stop.set()
            self.scheduler.abort_all()

    def _claim_cores(self, phase: str, peer: str, has_work: bool) -> None:
        """CPU: this worker's torch threads for its next step, by runtime/cpu_threads.py's rule."""
        self._busy[phase] = has_work
        if self._cores is not None and has_work:
            threads = self._cores.prefill if phase == "prefill" else self._cores.decode(self._busy[peer])
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _prefill_step(self) -> bool:
        chunks = self.scheduler.schedule_prefill()
        self._claim_cores("prefill", "decode", bool(chunks))
        if not chunks:
            return False
        split, stream = self.partition.begin_step("prefill")
        started = time.monotonic()
        done = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in chunks]
        with _on_stream(stream):
            logits = self.runner.prefill(chunks, done)
            ended = [seq for (seq, _), d in zip(chunks, done) if d]
            tokens = sample_step(logits, ended) if ended else []
            event = _record_event(stream)
            if stream is not None and not ended:
                # Sampling waits for the step's GPU work; a step of partial chunks must wait too, or the next
                # chunk could run on another split's stream before this one has written its KV, and an abort
                # could free blocks that kernels still write.
                stream.synchronize()
        self._emulate_share("prefill", split, time.monotonic() - started)
        prefilled = sum(n for _, n in chunks)
        took = time.monotonic() - started
        self.metrics.step("prefill", took, prefilled)
        self.recent.count("prefilled_tokens", prefilled)
        self.recent.count("prefill_busy_s", took)
        for seq in ended:
            seq.ready_event = event
        self.scheduler.prefilled(chunks, dict(zip(ended, tokens)), self.output.append_token)
        self._update_gauges()
        return True

    def _decode_step(self) -> bool:
        batch = self.scheduler.schedule_decode()
        self._claim_cores("decode", "prefill", bool(batch))
        if not batch:
            return False
        split, stream = self.partition.begin_step("decode")
        started = time.monotonic()
        with _on_stream(stream):
            for seq in batch:
                if seq.ready_event is not None:       # the prefill stream's work on this request is done
                    _wait_event(stream, seq.ready_event)
                    seq.ready_event = None
            logits = self.runner.decode(batch, stream)
            tokens = sample_step(logits, batch)
        self._emulate_share("decode", split, time.monotonic() - started)
        self.metrics.step("decode", time.monotonic() - started, len(batch))
        self.scheduler.decoded(batch, tokens, self.output.append_token)
        self._update_gauges()
        return True

    def _emulate_share(self, phase: str, split, computed: float) -> None:
        """--emulate-sm-share (cpu backend): stretch the step to what it would take on its share of the SMs, before
        its tokens are released, so latencies and step times feel the split. The stop event's wait keeps
        shutdown prompt."""
        if not self.config.emulate_sm_share:
            return
        extra = emulated_wait(computed, self.partition.share(phase, split))
        self.metrics.phase(self.metrics.emulated_wait, phase).inc(extra)
        self._stop.wait(extra)

    def _finished(self, seq: Sequence) -> None:
        """Scheduler.finish's last act, under its lock."""
        self.output.finished(seq)
        self._update_gauges()      # a purge of aborted requests can leave an empty batch: no step would update them

    def _update_gauges(self):
        waiting, prefilling, handoff, running = self.scheduler.counts()
        self.metrics.waiting.set(waiting)
        self.metrics.running.set(prefilling + handoff + running)
        self.metrics.kv_usage.set(self.block_manager.usage)
        self.metrics.phase(self.metrics.queue_length, "prefill").set(waiting)
        self.metrics.phase(self.metrics.queue_length, "decode").set(handoff)


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _record_event(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait_event(stream, event):
    if stream is not None and event is not None:
        stream.wait_event(event)
