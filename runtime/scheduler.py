"""Who runs next: the queues a request moves through, admission into the one KV pool, preemption, and the one
way a request leaves (`finish`). Both workers and the server call in concurrently; `lock` guards it all.

    waiting --admit--> prefilling --last chunk--> handoff --decode slot--> running --> finished
       ^                                                                      |
       +----------------------- preempted: the KV pool ran dry ---------------+

Progress under KV pressure, the rule:
- Admission reserves. A request is admitted (FCFS, the queue's head first, none skipped) only when the free blocks,
  less those the prompts already in prefill still need, cover its whole prompt, not just its first chunk, plus
  a headroom. So the prompts in prefill can always finish once decode gives blocks back: prefill waits, it never
  preempts.
- Decode preempts. When the pool is dry, the decode batch's newest request (by arrival) gives its blocks back
  and goes to the front of the queue, to be recomputed (from the prefix cache, where its blocks survive).
- Watermark. The headroom is 1% of the pool for a new request; a preempted one also waits for one free block
  per request in decode, so it is not re-admitted into the shortage that just pushed it out. With nothing
  admitted there is no headroom: any request that fits the pool gets in.
So the oldest request in decode always advances (newer ones yield to it), decode empties when even it cannot,
and with decode empty the prompts in prefill finish.
"""
import logging
import threading
import time
from collections import deque
from typing import Callable

from semipd.runtime.block_manager import BlockManager
from semipd.runtime.config import EngineConfig
from semipd.runtime.metrics import EngineMetrics
from semipd.runtime.recent import RecentSamples
from semipd.runtime.sequence import Sequence, Status

log = logging.getLogger("semipd.scheduler")

WATERMARK = 0.01          # of the pool, kept free by every admission while other requests are in


class EngineOverloaded(RuntimeError):
    """The prefill queue is full; the client should retry later."""


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, metrics: EngineMetrics,
                 recent: RecentSamples, on_finish: Callable[[Sequence], None]):
        self.config = config
        self.block_manager = block_manager
        self.metrics = metrics
        self.recent = recent
        self.on_finish = on_finish            # streams the last output; called under the lock
        self.lock = threading.Condition(threading.RLock())
        self.waiting: deque[Sequence] = deque()     # not yet prefilled (FCFS; preempted requests go first)
        self.prefilling: list[Sequence] = []        # admitted, prompt partly computed (chunked prefill)
        self.handoff: deque[Sequence] = deque()     # prefilled, waiting for a decode slot
        self.running: list[Sequence] = []           # the decode batch
        self.by_id: dict[str, Sequence] = {}
        self.closed = False
        self.watermark = max(1, int(WATERMARK * block_manager.num_blocks))

    # ---- arrivals and departures ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        with self.lock:
            if self.closed:
                raise EngineOverloaded("the engine is shutting down")
            if len(self.waiting) >= self.config.max_num_waiting:
                raise EngineOverloaded(f"the request queue is full ({self.config.max_num_waiting} waiting)")
            if seq.request_id in self.by_id:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
            self.by_id[seq.request_id] = seq
            self.waiting.append(seq)
            self.lock.notify_all()

    def abort(self, request_id: str) -> None:
        """Queued requests leave at once; one a worker is computing leaves when that step returns."""
        with self.lock:
            seq = self.by_id.get(request_id)
            if seq is None or seq.finished:
                return
            seq.aborted = True
            if seq.status in (Status.WAITING, Status.HANDOFF):
                self.finish(seq, "abort")
            self.lock.notify_all()

    def abort_all(self) -> None:
        with self.lock:
            self.closed = True
            for seq in list(self.by_id.values()):
                self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str) -> None:
        """The one way out, whatever the queue: blocks back to the pool, the final output streamed."""
        with self.lock:
            if seq.finished:
                return
            queue = {Status.WAITING: self.waiting, Status.PREFILL: self.prefilling, Status.HANDOFF: self.handoff,
                     Status.DECODE: self.running}[seq.status]
            queue.remove(seq)
            seq.finish_reason = reason
            seq.status = Status.FINISHED
            self.block_manager.free(seq)
            self.by_id.pop(seq.request_id, None)
            self.metrics.finished(reason)
            self.on_finish(seq)
            self.lock.notify_all()

    def _drop_aborted(self, queue) -> None:
        for seq in [s for s in queue if s.aborted]:
            self.finish(seq, "abort")

    # ---- prefill ----------------------------------------------------------------------------------------------
    def schedule_prefill(self) -> list[tuple[Sequence, int]]:
        """FCFS under the token budget: first the prompts being chunked, then new requests while budget, decode
        slots and the admission rule allow. Blocks are taken here, under the pool's lock."""
        budget = self.config.max_num_batched_tokens
        chunks: list[tuple[Sequence, int]] = []
        bm = self.block_manager
        with self.lock:
            self._drop_aborted(self.prefilling)
            for seq in self.prefilling:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if n <= 0 or not bm.allocate(seq, seq.num_computed_tokens + n):
                    return chunks          # decode holds the blocks this prompt needs; it gives them back
                chunks.append((seq, n))
                budget -= n
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if self.num_active() >= self.config.max_num_seqs:
                    break
                n = self._admit(seq, budget)
                if n is None:
                    break
                chunks.append((seq, n))
                budget -= n
        return chunks

    def num_active(self) -> int:
        return len(self.prefilling) + len(self.handoff) + len(self.running)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Take seq's cached prefix and its first chunk's blocks if the admission rule allows; its chunk size."""
        bm = self.block_manager
        prefix = bm.cached_prefix(seq)
        cached = len(prefix) * bm.block_size
        n = min(seq.num_tokens - cached, budget)
        reserved = sum(bm.blocks_needed(s.num_tokens) - len(s.block_table) for s in self.prefilling)
        rest_of_prompt = bm.blocks_needed(seq.num_tokens) - bm.blocks_needed(cached + n)
        headroom = 0
        if self.num_active():
            headroom = self.watermark + (len(self.running) if seq.preemptions else 0)
        if not bm.allocate(seq, cached + n, prefix, headroom=reserved + rest_of_prompt + headroom):
            return None
        self.waiting.popleft()
        seq.status = Status.PREFILL
        self.prefilling.append(seq)
        self.metrics.prefix_cache_queries.inc(seq.num_tokens)
        self.metrics.prefix_cache_hits.inc(cached)
        if seq.admitted_time is None:
            seq.admitted_time = time.monotonic()
            seq.num_cached_tokens = min(cached, len(seq.prompt_token_ids))
            self.metrics.queue_time.observe(seq.admitted_time - seq.arrival_time)
        return n

    def prefilled(self, chunks: list[tuple[Sequence, int]], first_tokens: dict,
                  append_token: Callable[[Sequence, object], str | None]) -> None:
        """After a prefill step: the chunks' KV is in the pool (offered to the prefix cache); each prompt that
        ended gets its first token (what the sampler gave: `append_token` records it and says whether that ends
        the request) and goes to the decode worker.

        Only the prefill worker touches a prompt in prefill, so its counts and its output are processed outside
        the lock (detokenizing and streaming must not hold up the decode worker or the server); the lock is
        taken only to move requests between queues."""
        for seq, n in chunks:
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
        reasons = {seq: append_token(seq, token) for seq, token in first_tokens.items() if not seq.aborted}
        with self.lock:
            for seq, reason in reasons.items():
                if seq.finished:
                    continue
                if reason:
                    self.finish(seq, reason)
                else:
                    self.prefilling.remove(seq)
                    seq.status = Status.HANDOFF
                    self.handoff.append(seq)
            self._drop_aborted(self.prefilling)
            self.lock.notify_all()

    # ---- decode -----------------------------------------------------------------------------------------------
    def schedule_decode(self) -> list[Sequence]:
        bm = self.block_manager
        with self.lock:
            self._drop_aborted(self.running)
            while self.handoff and len(self.running) < self.config.max_num_seqs:
                seq = self.handoff.popleft()
                seq.status = Status.DECODE
                self.running.append(seq)
            # every sequence needs a slot for its newest token; when the pool is dry, the newest request yields
            for seq in sorted(self.running, key=lambda s: s.order):
                if seq not in self.running:
                    continue
                while not bm.allocate(seq, seq.num_tokens):
                    victim = max(self.running, key=lambda s: s.order)
                    self._preempt(victim)
                    if victim is seq:
                        break
            return list(self.running)

    def decoded(self, batch: list[Sequence], tokens: list,
                append_token: Callable[[Sequence, object], str | None]) -> None:
        """After a decode step; as in `prefilled`, the output is processed outside the lock (only the decode
        worker touches the requests in its batch)."""
        live = [(seq, token) for seq, token in zip(batch, tokens) if seq.status == Status.DECODE]
        for seq, _ in live:
            seq.num_computed_tokens += 1
            self.block_manager.register_computed(seq)
        reasons = [(seq, "abort" if seq.aborted else append_token(seq, token)) for seq, token in live]
        with self.lock:
            for seq, reason in reasons:
                if reason and not seq.finished:
                    self.finish(seq, reason)
            self.lock.notify_all()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        self.metrics.preemptions.inc()
        self.recent.count("preemptions")
        log.debug("preempted %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)

    # ---- state ------------------------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int, int, int]:
        """Requests waiting, in prefill, handed off, in decode."""
        with self.lock:
            return len(self.waiting), len(self.prefilling), len(self.handoff), len(self.running)
