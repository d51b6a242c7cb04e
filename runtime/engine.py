"""The semi-PD engine: two worker threads, prefill and decode, running at the same time over one model and one
paged KV pool.

- prefill worker: FCFS queue, a token budget per step, long prompts chunked. When a prompt is done it samples the
  first token and hands the request to decode: its block table plus that token (and, on CUDA, an event recorded
  on the prefill stream). KV is never copied.
- decode worker: continuous batching up to max_num_seqs. When the pool runs out of blocks it preempts the newest
  request, which goes back to the front of the prefill queue to be recomputed.
Each worker asks the partition controller, at the top of every iteration, which SM split and stream to use.
Who sets the split is config.partition_policy: external writers (admin API, partition file), nobody (static), or
the in-engine SLO policy (runtime/slo_loop.py), which reads the engine's own recent measurements (self.recent).
"""
import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable

import torch

from semipd.runtime.config import EngineConfig, check_partition_policy, cpu_share
from semipd.runtime.detokenizer import Detokenizer
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.model_runner import ModelRunner
from semipd.runtime.partition import PartitionController, PartitionFileWatcher, emulated_wait, make_backend
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sampling import SamplingParams, sample
from semipd.runtime.sequence import RequestOutput, Sequence, Status

log = logging.getLogger("semipd.engine")

__all__ = ["Engine", "EngineOverloaded", "RequestOutput"]


class EngineOverloaded(RuntimeError):
    """The prefill queue is full; the client should retry later."""


class Engine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer
        check_partition_policy(config)
        self.config = config
        self.runner = ModelRunner(config)
        # CPU: while both phases work each worker gets its share of the cores; a worker whose peer is idle
        # takes both shares. Thread counts are per OS thread in torch, so each worker sets its own.
        self._cpu_share = cpu_share(config.torch_threads) if self.runner.device.type == "cpu" else None
        self._busy = {"prefill": False, "decode": False}
        self.block_manager = self.runner.block_manager
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.model_name = config.model_name
        self.model_dir = str(config.model)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = set(self.runner.model_config.eos_token_ids)
        self.created = int(time.time())
        self.metrics = EngineMetrics(self.model_name)
        self.recent = RecentSamples()
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
        self._lock = threading.Condition(threading.RLock())   # guards the queues below, wakes idle workers
        self._waiting: deque[Sequence] = deque()     # not yet prefilled (FCFS; preempted requests go first)
        self._prefilling: list[Sequence] = []        # admitted, prompt partly computed (chunked prefill)
        self._handoff: deque[Sequence] = deque()     # prefilled, waiting for a decode slot
        self._running: list[Sequence] = []           # the decode batch
        self._by_id: dict[str, Sequence] = {}
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
        with self._lock:
            self._lock.notify_all()
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
        with self._lock:
            if self._stop.is_set():
                raise EngineOverloaded("the engine is shutting down")
            if len(self._waiting) >= self.config.max_num_waiting:
                raise EngineOverloaded(f"the request queue is full ({self.config.max_num_waiting} waiting)")
            if request_id in self._by_id:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._by_id[request_id] = seq
            self._waiting.append(seq)
            self._lock.notify_all()
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
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None or seq.finished:
                return
            seq.aborted = True
            if seq.status == Status.WAITING:
                self._waiting.remove(seq)
                self._finish(seq, "abort")
            elif seq.status == Status.HANDOFF:
                self._handoff.remove(seq)
                self._finish(seq, "abort")
            self._lock.notify_all()
        self._update_gauges()

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._by_id)

    def queue_state(self) -> tuple[int, int, float]:
        """Requests waiting for prefill, prefilled ones waiting for a decode slot, and the KV pool's usage."""
        with self._lock:
            return len(self._waiting), len(self._handoff), self.block_manager.usage

    # ---- worker loops -----------------------------------------------------------------------------------------
    def _loop(self, phase: str, step: Callable[[], bool]):
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    if not step():
                        self.partition.idle(phase)
                        with self._lock:
                            self._lock.wait(0.05)
        except BaseException as exc:  # a dead worker must not leave clients hanging
            log.exception("%s worker failed", threading.current_thread().name)
            self.worker_error = exc
            self._stop.set()
            with self._lock:
                for seq in list(self._by_id.values()):
                    self._finish(seq, "abort")

    def _claim_cores(self, phase: str, peer: str, has_work: bool) -> None:
        self._busy[phase] = has_work
        if self._cpu_share is not None and has_work:
            threads = self._cpu_share if self._busy[peer] else 2 * self._cpu_share
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _prefill_step(self) -> bool:
        chunks = self._schedule_prefill()
        self._claim_cores("prefill", "decode", bool(chunks))
        if not chunks:
            return False
        split, stream = self.partition.begin_step("prefill")
        started = time.monotonic()
        done = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in chunks]
        with _on_stream(stream):
            logits = self.runner.prefill(chunks, done)
            finished_seqs = [seq for (seq, _), d in zip(chunks, done) if d]
            tokens = sample(logits, [s.params for s in finished_seqs], [s.generator for s in finished_seqs]) \
                if finished_seqs else []
            event = _record_event(stream)
            if stream is not None and not finished_seqs:
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
        now = time.monotonic()
        with self._lock:
            for seq, n in chunks:
                seq.num_computed_tokens += n
            for seq, token in zip(finished_seqs, tokens):
                self._prefilling.remove(seq)
                if seq.aborted:
                    self._finish(seq, "abort")
                    continue
                if seq.first_token_time is None:
                    self.metrics.prompt_tokens.inc(len(seq.prompt_token_ids))
                seq.ready_event = event
                self._append_token(seq, token, now)
                if not seq.finished:
                    seq.status = Status.HANDOFF
                    self._handoff.append(seq)
            for seq, n in chunks:
                if seq.aborted and not seq.finished:
                    self._prefilling.remove(seq)
                    self._finish(seq, "abort")
            self._lock.notify_all()
        self._update_gauges()
        return True

    def _schedule_prefill(self) -> list[tuple[Sequence, int]]:
        """FCFS under the token budget: first the prompt being chunked, then new requests while budget, KV blocks
        and decode slots last. Blocks are taken here, under the one allocator lock."""
        budget = self.config.max_num_batched_tokens
        chunks: list[tuple[Sequence, int]] = []
        with self._lock:
            for seq in [s for s in self._prefilling if s.aborted]:
                self._prefilling.remove(seq)
                self._finish(seq, "abort")
            for seq in list(self._prefilling):
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if n <= 0 or not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                    return chunks
                chunks.append((seq, n))
                budget -= n
            while self._waiting and budget > 0:
                seq = self._waiting[0]
                active = len(self._prefilling) + len(self._handoff) + len(self._running)
                if active >= self.config.max_num_seqs:
                    break
                n = min(seq.num_tokens, budget)
                if not self.block_manager.allocate(seq, n):
                    break
                self._waiting.popleft()
                seq.status = Status.PREFILL
                if seq.admitted_time is None:
                    seq.admitted_time = time.monotonic()
                    self.metrics.queue_time.observe(seq.admitted_time - seq.arrival_time)
                self._prefilling.append(seq)
                chunks.append((seq, n))
                budget -= n
        return chunks

    def _decode_step(self) -> bool:
        batch = self._schedule_decode()
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
            tokens = sample(logits, [s.params for s in batch], [s.generator for s in batch])
        self._emulate_share("decode", split, time.monotonic() - started)
        self.metrics.step("decode", time.monotonic() - started, len(batch))
        now = time.monotonic()
        with self._lock:
            for seq, token in zip(batch, tokens):
                if seq.finished:                       # aborted by a preemption race or a worker error
                    continue
                seq.num_computed_tokens += 1
                if seq.aborted:
                    self._running.remove(seq)
                    self._finish(seq, "abort")
                    continue
                self._append_token(seq, token, now)
                if seq.finished:
                    self._running.remove(seq)
            self._lock.notify_all()
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

    def _schedule_decode(self) -> list[Sequence]:
        with self._lock:
            for seq in [s for s in self._running if s.aborted]:
                self._running.remove(seq)
                self._finish(seq, "abort")
            while self._handoff and len(self._running) < self.config.max_num_seqs:
                seq = self._handoff.popleft()
                seq.status = Status.DECODE
                self._running.append(seq)
            # every sequence needs a slot for its newest token; when the pool is dry, the newest request yields
            for seq in sorted(self._running, key=lambda s: s.order):
                if seq not in self._running:
                    continue
                while not self.block_manager.allocate(seq, seq.num_tokens):
                    victim = max(self._running, key=lambda s: s.order)
                    self._preempt(victim)
                    if victim is seq:
                        break
            return list(self._running)

    def _preempt(self, seq: Sequence):
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self._waiting.appendleft(seq)
        self.metrics.preemptions.inc()
        self.recent.count("preemptions")
        log.debug("preempted %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)

    # ---- output -----------------------------------------------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int, now: float):
        """Record a sampled token, decide whether the request is done, stream what can be streamed."""
        seq.output_token_ids.append(token)
        seq.pending_ids.append(token)
        self.metrics.generation_tokens.inc()
        self.recent.count("output_tokens")
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.ttft.observe(now - seq.arrival_time)
            self.recent.ttft(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        p = seq.params
        stop_hit = self.detokenizer.add_token(seq)
        reason = None
        if stop_hit:
            reason = "stop"
        elif (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            if not stop_hit:
                self.detokenizer.flush(seq)
            self._finish(seq, reason)
        else:
            self._emit(seq, finished=False)

    def _emit(self, seq: Sequence, finished: bool):
        text = self.detokenizer.releasable(seq, finished)
        ids, seq.pending_ids = seq.pending_ids, []
        seq.on_output(RequestOutput(seq.request_id, ids, text, finished, seq.finish_reason,
                                    len(seq.prompt_token_ids), len(seq.output_token_ids)))

    def _finish(self, seq: Sequence, reason: str):
        """Caller holds self._lock."""
        if seq.finished:
            return
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        self.block_manager.free(seq)
        self._by_id.pop(seq.request_id, None)
        self.metrics.finished(reason)
        if reason != "abort" and seq.first_token_time is not None:
            now = time.monotonic()
            self.metrics.e2e.observe(now - seq.arrival_time)
            if len(seq.output_token_ids) > 1:
                tpot = (now - seq.first_token_time) / (len(seq.output_token_ids) - 1)
                self.metrics.tpot.observe(tpot)
                self.recent.tpot(tpot)
        self._emit(seq, finished=True)
        self._update_gauges()      # a purge of aborted requests can leave an empty batch: no step would update them

    def _update_gauges(self):
        with self._lock:
            waiting, prefilling = len(self._waiting), len(self._prefilling)
            handoff, running = len(self._handoff), len(self._running)
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
