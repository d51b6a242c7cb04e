"""The discrete-event core: a clock with one event heap, and the pods it runs.

`SemiPDPod` models runtime/engine.py and runtime/scheduler.py: a prefill worker and a decode worker run at the same time, each step's time
from its own SM share; FCFS prefill under a token budget with chunking (the prompt being chunked first, then new
requests while budget, KV blocks and decode slots last); continuous-batching decode up to max_num_seqs; one KV
block pool (block_size tokens per block) that both allocate from; when decode runs out of blocks the newest
request is preempted and goes to the front of the prefill queue to be recomputed (prompt plus generated tokens);
the handoff passes a prefilled request to decode without copying anything. A new split is applied by each worker
at the top of its next iteration, never mid-step.

`UnifiedPod` is the baseline: one worker time-shares the whole GPU; every step is one mixed batch of every running
decode plus chunked prefill up to the token budget (decode tokens count against it), as vLLM's default scheduler.

Decode is aggregated: a running request is (context and step index when it joined, step index of its last token),
so a decode step costs O(1) plus O(log B) per request that finishes, whatever the batch size. Token times exist
only as one list of step end times per pod (and per request only when ITLs are recorded)."""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass

from semipd.loadgen.report import RequestResult
from semipd.loadgen.workload import RequestSpec
from semipd.sim.metrics import PodMetrics
from semipd.sim.models import LatencyModel

TOTAL_SMS = 132
SM_GROUP = 8            # Hopper green contexts split in groups of 8 SMs (runtime/partition.py)


class Clock:
    """Simulated seconds and one heap of (time, sequence, callback, argument) events."""

    def __init__(self):
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    def at(self, t: float, fn, arg=None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def run(self, until: float | None = None, stop=None) -> None:
        heap = self._heap
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            t, _, fn, arg = heapq.heappop(heap)
            self.now = t
            fn(arg)
            if stop is not None and stop():
                return


@dataclass(frozen=True)
class PodConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_kv_blocks: int = 20000
    block_size: int = 16
    record_itl: bool = True
    total_sms: int = TOTAL_SMS


def split_sms(x: float, total: int = TOTAL_SMS) -> int:
    """Prefill SMs for a prefill share: whole groups of 8, each side at least one group."""
    groups = total // SM_GROUP
    g = min(max(round(x * total / SM_GROUP), 1), groups - 1)
    return g * SM_GROUP


class Req:
    __slots__ = ("spec", "index", "arrival", "prompt", "out", "gen", "computed", "blocks", "first", "last_tok",
                 "order", "c0", "k0", "kf", "stint", "itl", "done", "preemptions", "on_done")

    def __init__(self, spec: RequestSpec, order: int, record_itl: bool):
        self.spec, self.index, self.arrival = spec, spec.index, spec.arrival_s
        self.prompt, self.out = spec.prompt_tokens, spec.output_tokens
        self.gen = 0                 # output tokens emitted
        self.computed = 0            # tokens whose KV is computed (prefill side)
        self.blocks = 0              # KV blocks held (outside the decode batch; inside it, derived)
        self.first = self.last_tok = None
        self.order = order
        self.c0 = self.k0 = self.kf = 0
        self.stint = 0               # bumps on preemption: stale finish-heap entries are skipped
        self.itl = [] if record_itl else None
        self.done = False
        self.preemptions = 0
        self.on_done = None

    @property
    def tokens(self) -> int:
        return self.prompt + self.gen


class Batch:
    """The decode batch, aggregated. Step k (counted from 0) attends context c0 + (k - k0) for a member that joined
    at step k0 with context c0, and emits one token at its end; the member's last token comes at step kf."""

    def __init__(self, block_size: int, record_itl: bool):
        self.bs = block_size
        self.k = -1                  # the step being run or last run
        self.members: dict[int, Req] = {}
        self.s0 = 0                  # sum of (c0 - k0) over members: context of step k = s0 + n*k
        self.residue = [0] * block_size
        self.finish: list = []       # (kf, order, stint, req)
        self.step_end: list[float] | None = [] if record_itl else None

    @property
    def n(self) -> int:
        return len(self.members)

    def context(self, k: int) -> int:
        return self.s0 + self.n * k

    def held(self, r: Req, k: int) -> int:
        """Blocks r holds once step k (>= k0) is allocated."""
        return -(-(r.c0 + k - r.k0) // self.bs)

    def _key(self, r: Req) -> int:
        return (1 - r.c0 + r.k0) % self.bs

    def start_step(self, newcomers: list[Req], pool: "Pool") -> list[Req]:
        """Begin step k+1: join newcomers, allocate every member's block for its newest token, preempting the
        newest members while the pool is short. Returns the preempted (their blocks freed)."""
        k = self.k + 1
        self.k = k
        demand = self.residue[k % self.bs]
        fresh = {}
        for r in newcomers:
            r.c0, r.k0 = r.tokens, k
            r.kf = k + (r.out - r.gen) - 1
            need = max(0, -(-r.c0 // self.bs) - r.blocks)
            fresh[r.index] = need
            demand += need
            self.members[r.index] = r
            self.s0 += r.c0 - k
            heapq.heappush(self.finish, (r.kf, r.order, r.stint, r))
        for r in newcomers:
            self.residue[self._key(r)] += 1
        preempted = []
        while demand > pool.free and self.members:
            victim = max(self.members.values(), key=lambda m: m.order)
            if victim.index in fresh:
                demand -= fresh[victim.index]
                freed = victim.blocks
            else:
                demand -= 1 if self._key(victim) == k % self.bs else 0
                freed = self.held(victim, k - 1)
            self._remove(victim, k)          # it emitted tokens through step k-1
            pool.free += freed
            victim.blocks = 0
            preempted.append(victim)
        pool.free -= demand
        return preempted

    def _remove(self, r: Req, k: int) -> None:
        """Take r out before step k; its generated count covers steps k0..k-1."""
        del self.members[r.index]
        self.s0 -= r.c0 - r.k0
        self.residue[self._key(r)] -= 1
        r.gen += k - r.k0
        r.stint += 1

    def end_step(self, t: float) -> list[Req]:
        """Step k ended at t: every member emitted a token. Returns those that emitted their last."""
        k = self.k
        if self.step_end is not None:
            self.step_end.append(t)
        done = []
        heap = self.finish
        while heap and heap[0][0] <= k:
            kf, _, stint, r = heapq.heappop(heap)
            if stint != r.stint or r.index not in self.members:
                continue
            del self.members[r.index]
            self.s0 -= r.c0 - r.k0
            self.residue[self._key(r)] -= 1
            r.blocks = self.held(r, k)
            r.gen = r.out
            done.append(r)
        return done

    def itl(self, r: Req, k_last: int) -> None:
        """Append r's token gaps for its stint k0..k_last (needs step end times)."""
        if r.itl is None or self.step_end is None or k_last < r.k0:
            return
        times = self.step_end[r.k0:k_last + 1]
        prev = r.last_tok
        for t in times:
            r.itl.append(t - prev)
            prev = t
        r.last_tok = prev


class Pool:
    def __init__(self, blocks: int):
        self.total = self.free = blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.free / self.total if self.total else 0.0


class Pod:
    """What both pod kinds share: queues, the block pool, arrivals, finishing, metrics."""
    kind = "pod"

    def __init__(self, name: str, clock: Clock, model: LatencyModel, cfg: PodConfig, split: float = 0.5,
                 results: list | None = None):
        self.name, self.clock, self.model, self.cfg = name, clock, model, cfg
        self.pool = Pool(cfg.num_kv_blocks)
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []
        self.handoff: deque[Req] = deque()
        self.batch = Batch(cfg.block_size, cfg.record_itl)
        self.results = results if results is not None else []
        self.metrics = PodMetrics(clock)
        self.outstanding = 0
        self._orders = itertools.count()
        self.split = split                  # asked for (what the partition controller reports)
        self.changed_at: float | None = None
        self.switches = 0
        self.on_idle = None                 # called when the pod has nothing left (draining)

    # ---- the split --------------------------------------------------------------------------------------------
    @property
    def prefill_sms(self) -> int:
        return split_sms(self.split, self.cfg.total_sms)

    def set_split(self, x: float) -> int:
        sms = split_sms(x, self.cfg.total_sms)
        if sms != self.prefill_sms:
            self.switches += 1
            self.changed_at = self.clock.now
        self.split = sms / self.cfg.total_sms
        self.metrics.sms(sms, self.cfg.total_sms - sms)
        return sms

    # ---- requests ---------------------------------------------------------------------------------------------
    def add(self, spec: RequestSpec, on_done=None) -> None:
        r = Req(spec, next(self._orders), self.cfg.record_itl)
        r.on_done = on_done
        self.outstanding += 1
        self.waiting.append(r)
        self.metrics.arrival(r.prompt)
        self.kick()

    def kick(self) -> None:
        raise NotImplementedError

    def queue_state(self) -> tuple[int, int, float]:
        return len(self.waiting), len(self.handoff), self.pool.usage

    def _schedule_prefill(self, budget: int) -> list[tuple[Req, int]]:
        """runtime/scheduler.py's schedule_prefill: the chunked prompt first, then FCFS while budget, slots and
        the admission rule allow (the whole prompt must fit besides what admitted prompts still need, plus the
        watermark and, for a preempted request, a block per decoding one). No prefix cache is modelled."""
        bs, pool = self.cfg.block_size, self.pool
        chunks = []
        for r in self.prefilling:
            n = min(r.tokens - r.computed, budget)
            if n <= 0 or not self._allocate(r, r.computed + n):
                return chunks
            chunks.append((r, n))
            budget -= n
        while self.waiting and budget > 0:
            r = self.waiting[0]
            if len(self.prefilling) + len(self.handoff) + self.batch.n + self._pending() >= self.cfg.max_num_seqs:
                break
            n = min(r.tokens, budget)
            bpt = self.cfg.block_size
            reserved = sum(-(-q.tokens // bpt) - q.blocks for q in self.prefilling)
            rest = -(-r.tokens // bpt) - -(-n // bpt)
            active = len(self.prefilling) + len(self.handoff) + self.batch.n + self._pending()
            headroom = (max(1, int(0.01 * pool.total)) + (self.batch.n if r.preemptions else 0)) if active else 0
            if -(-n // bpt) + reserved + rest + headroom > pool.free or not self._allocate(r, n):
                break
            self.waiting.popleft()
            if r.first is None and r.preemptions == 0:
                self.metrics.queue_time(self.clock.now - r.arrival)
            self.prefilling.append(r)
            chunks.append((r, n))
            budget -= n
        del bs, pool
        return chunks

    def _pending(self) -> int:
        return 0

    def _allocate(self, r: Req, tokens: int) -> bool:
        need = -(-tokens // self.cfg.block_size) - r.blocks
        if need <= 0:
            return True
        if need > self.pool.free:
            return False
        self.pool.free -= need
        r.blocks += need
        return True

    def _prefill_done(self, chunks: list[tuple[Req, int]], now: float) -> list[Req]:
        """Chunks computed; requests whose prompt is done emit a token. Returns those that go on to decode."""
        onward = []
        prefilled = 0
        for r, n in chunks:
            r.computed += n
            prefilled += n
            if r.computed < r.tokens:
                continue
            self.prefilling.remove(r)
            first = r.first is None
            if first:
                r.first = now
                self.metrics.first_token(now - r.arrival, r.prompt)
            elif r.itl is not None:
                r.itl.append(now - r.last_tok)
            r.last_tok = now
            r.gen += 1
            self.metrics.tokens(1)
            if r.gen >= r.out:
                self._finish(r, now)
            else:
                onward.append(r)
        self.metrics.prefilled(prefilled)
        return onward

    def _decode_done(self, now: float) -> None:
        b = self.batch
        self.metrics.tokens(b.n)
        k = b.k
        for r in b.end_step(now):
            b.itl(r, k)
            self.pool.free += r.blocks
            r.blocks = 0
            self._finish(r, now)

    def _admit(self, batch) -> list[Req]:
        """Handed-off requests that join the decode batch at its next step, up to max_num_seqs (as the engine)."""
        newcomers = []
        while self.handoff and batch.n + len(newcomers) < self.cfg.max_num_seqs:
            newcomers.append(self.handoff.popleft())
        return newcomers

    def _preempted(self, victims: list[Req]) -> None:
        k = self.batch.k
        for r in victims:
            self.batch.itl(r, k - 1)
            r.computed = 0
            r.preemptions += 1
            self.metrics.preemption()
            self.waiting.appendleft(r)

    def _finish(self, r: Req, now: float) -> None:
        r.done = True
        self.pool.free += r.blocks
        r.blocks = 0
        self.outstanding -= 1
        e2e = now - r.arrival
        if r.out > 1:
            self.metrics.tpot((now - r.first) / (r.out - 1))
        self.metrics.finished(e2e)
        seen = self.model.api_overhead_s       # the client sees the engine's latencies this much later
        self.results.append(RequestResult(r.index, r.arrival, r.arrival, r.prompt, r.out, r.first - r.arrival + seen,
                                          e2e + seen, r.itl if r.itl is not None else []))
        if r.on_done is not None:
            r.on_done(self, r)
        if self.outstanding == 0 and self.on_idle is not None:
            self.on_idle(self)

    def _gauges(self) -> None:
        self.metrics.gauges(len(self.waiting), len(self.handoff),
                            len(self.prefilling) + len(self.handoff) + self.batch.n, self.pool.usage)


class SemiPDPod(Pod):
    kind = "semipd"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.p_busy = self.d_busy = False
        self.p_share = self.d_share = None    # applied at each worker's iteration boundary
        self._chunks: list = []
        self.metrics.sms(self.prefill_sms, self.cfg.total_sms - self.prefill_sms)
        self.step_log: list | None = None     # (phase, start, end, share) when set to a list

    def kick(self) -> None:
        self._try_prefill()
        self._try_decode()

    def _try_prefill(self) -> None:
        if self.p_busy:
            return
        chunks = self._schedule_prefill(self.cfg.max_num_batched_tokens)
        if not chunks:
            self._gauges()
            return
        sms = self.prefill_sms
        self.p_share = sms / self.cfg.total_sms
        now = self.clock.now
        dur = self.model.prefill([(n, r.computed) for r, n in chunks], self.p_share, self.d_busy)
        self.p_busy, self._chunks = True, chunks
        if self.step_log is not None:
            self.step_log.append(("prefill", now, now + dur, self.p_share))
        self.metrics.step("prefill", dur)
        self.clock.at(now + dur, self._prefill_end)
        self._gauges()

    def _prefill_end(self, _) -> None:
        now = self.clock.now
        chunks, self._chunks, self.p_busy = self._chunks, [], False
        for r in self._prefill_done(chunks, now):
            self.handoff.append(r)
        self._try_decode()
        self._try_prefill()

    def _try_decode(self) -> None:
        if self.d_busy:
            return
        b = self.batch
        newcomers = self._admit(b)
        if b.n == 0 and not newcomers:
            self._gauges()
            return
        victims = b.start_step(newcomers, self.pool)
        if victims:
            self._preempted(victims)
        if b.n == 0:
            b.k -= 1            # nothing ran: the step never happened
            self._try_prefill()
            return
        sms = self.cfg.total_sms - self.prefill_sms
        self.d_share = sms / self.cfg.total_sms
        now = self.clock.now
        dur = self.model.decode(b.n, b.context(b.k), self.d_share, self.p_busy)
        self.d_busy = True
        if self.step_log is not None:
            self.step_log.append(("decode", now, now + dur, self.d_share))
        self.metrics.step("decode", dur)
        self.clock.at(now + dur, self._decode_end)
        if victims:
            self._try_prefill()
        self._gauges()

    def _decode_end(self, _) -> None:
        self.d_busy = False
        self._decode_done(self.clock.now)
        self._try_decode()
        self._try_prefill()


class UnifiedPod(Pod):
    """One worker, the whole GPU, one mixed batch per step."""
    kind = "unified"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy = False
        self._chunks: list = []
        self._decoding = False
        self.step_log: list | None = None
        self.metrics.sms(self.cfg.total_sms, self.cfg.total_sms)

    def set_split(self, x: float) -> int:      # no split to move: both phases share every SM
        return self.cfg.total_sms

    def _pending(self) -> int:
        return 0

    def kick(self) -> None:
        if self.busy:
            return
        b = self.batch
        newcomers = self._admit(b)
        decoding = False
        if b.n or newcomers:
            victims = b.start_step(newcomers, self.pool)
            if victims:
                self._preempted(victims)
            decoding = b.n > 0
            if not decoding:
                b.k -= 1
        chunks = self._schedule_prefill(max(0, self.cfg.max_num_batched_tokens - b.n))
        if not decoding and not chunks:
            self._gauges()
            return
        now = self.clock.now
        dur = self.model.mixed([(n, r.computed) for r, n in chunks], b.n if decoding else 0,
                               b.context(b.k) if decoding else 0)
        self.busy, self._chunks, self._decoding = True, chunks, decoding
        if self.step_log is not None:
            self.step_log.append(("mixed", now, now + dur, 1.0))
        self.metrics.step("prefill" if chunks else "decode", dur)
        self.clock.at(now + dur, self._end)
        self._gauges()

    def _end(self, _) -> None:
        now = self.clock.now
        self.busy = False
        if self._decoding:
            self._decode_done(now)
        for r in self._prefill_done(self._chunks, now):
            self.handoff.append(r)
        self._chunks = []
        self.kick()


def make_pod(kind: str, name: str, clock: Clock, model: LatencyModel, cfg: PodConfig, split: float = 0.5,
             results: list | None = None) -> Pod:
    cls = UnifiedPod if kind == "unified" else SemiPDPod
    pod = cls(name, clock, model, cfg, split, results)
    if kind != "unified":
        pod.set_split(split)
        pod.switches, pod.changed_at = 0, None
    return pod


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Batch", "Clock", "Pod", "PodConfig", "Req", "SemiPDPod", "UnifiedPod", "make_pod", "split_sms",
           "ceil_div", "math"]
