"""SM partitioning: which share of the GPU's streaming multiprocessors each phase runs on.

Every backend offers the same thing: a fixed list of candidate splits made once at start-up, and for each split
a (prefill stream, decode stream) pair. A split change is only a pointer swap; each worker picks up the new
streams at its next iteration boundary, so nothing drains and nothing restarts.

Backends:
- greenctx: CUDA green contexts. One driver-level split per candidate (cuDevSmResourceSplitByCount, result =
  prefill, remainder = decode), so the two phases never overlap. Needs cuda-python's `cuda.bindings`.
- shared: two ordinary CUDA streams over the whole GPU; no isolation (the "unified" baseline). On a CPU device,
  the same baseline over the whole machine.
- cpu: no GPU. Applies the driver's rounding rules for a given SM count; on it the controller records which split
  each phase used for each step (PartitionController.history), so the switching logic is tested without a GPU.
  It is a named stand-in, not a partition. With `--emulate-sm-share` a split also costs what it would on a GPU,
  to first order: a step that computed t seconds on share s of the SMs waits t*(1/s - 1) more (emulated_wait),
  so moving SMs to a phase shortens its steps and lengthens the other's. That is a stand-in too: a linear
  compute-bound model, not a measurement of any GPU (memory-bound decode scales less than linearly).
"""
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("semipd.partition")

HOPPER_SMS = 132
HOPPER_GRANULARITY = 8          # cuDevSmResourceSplitByCount default: groups of >= 8 SMs, in steps of 8
HISTORY_STEPS = 4096            # per-step record kept on the cpu backend: enough to check a run, bounded in memory


class PartitionError(ValueError):
    """A well-formed split the device cannot make; `allowed` lists the prefill SM counts it can."""
    def __init__(self, message: str, allowed: list[int]):
        super().__init__(message)
        self.allowed = allowed


@dataclass(frozen=True, slots=True)
class Split:
    prefill_sms: int
    decode_sms: int


def emulated_wait(seconds: float, share: float) -> float:
    """The extra time a step that computed `seconds` with the whole machine would take on `share` (0-1] of the
    SMs if its time scaled inversely with them: the cpu backend's --emulate-sm-share."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"an SM share must be in (0, 1], got {share}")
    return seconds * (1.0 / share - 1.0)


def candidate_prefill_sms(total_sms: int, granularity: int) -> list[int]:
    """Prefill group sizes the driver can make: multiples of the granularity, leaving decode at least one group."""
    return list(range(granularity, total_sms - granularity + 1, granularity))


class CpuBackend:
    name = "cpu"

    def __init__(self, total_sms: int = HOPPER_SMS, granularity: int = HOPPER_GRANULARITY):
        self.total_sms = total_sms
        self.granularity = granularity
        self.splits = {p: Split(p, total_sms - p) for p in candidate_prefill_sms(total_sms, granularity)}

    def streams(self, split: Split):
        return None, None

    def describe(self) -> str:
        return f"cpu stand-in with {self.total_sms} SMs in groups of {self.granularity} (no GPU: nothing is isolated)"


class SharedBackend:
    """Both phases on the whole GPU; a 'split' is only recorded, never enforced. On a CPU device it is the same
    baseline over the whole machine (the cpu stand-in's SM count, no streams), so one flag names the unified
    baseline everywhere; unlike the cpu backend it refuses --emulate-sm-share."""
    name = "shared"

    def __init__(self, device):
        import torch
        self.granularity = HOPPER_GRANULARITY
        if torch.device(device).type == "cuda":
            self.total_sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self._where = f"shared streams over all {self.total_sms} SMs"
        else:
            self.total_sms = HOPPER_SMS
            self._streams = (None, None)
            self._where = "both phases on the whole CPU"
        self.splits = {p: Split(p, self.total_sms - p) for p in candidate_prefill_sms(self.total_sms, self.granularity)}

    def streams(self, split: Split):
        return self._streams

    def describe(self) -> str:
        return f"{self._where} (no isolation: the unified baseline)"


class GreenContextBackend:
    """All candidate splits made at start-up: each is one driver split of the device into prefill + remainder.
    `splits` is keyed by the prefill SM count the driver really gave, so the allowed values users see are real."""
    name = "greenctx"

    def __init__(self, device):
        import torch
        from cuda.bindings import driver as cu
        self._cu = cu
        self._device = device
        torch.cuda.init()
        torch.zeros(1, device=device)          # primary context first: green contexts retain it
        index = torch.device(device).index
        self._build(index if index is not None else torch.cuda.current_device())

    def _build(self, ordinal: int):
        cu = self._cu
        self._dev = self._check(cu.cuDeviceGet(ordinal))
        device_res = self._check(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        self.total_sms = device_res.sm.smCount
        # The fields describe the newer split API; cuDevSmResourceSplitByCount with flags 0 (what we call) still
        # makes groups of >= 8 SMs in steps of 8 on Hopper, so never ask in finer steps than that.
        reported = max(getattr(device_res.sm, "smCoscheduledAlignment", 0) or 0,
                       getattr(device_res.sm, "minSmPartitionSize", 0) or 0)
        self.granularity = max(HOPPER_GRANULARITY, reported)
        self._workqueue = self._balanced_workqueue()
        self._keep = []                         # contexts and streams live for the whole process
        self.splits: dict[int, Split] = {}
        self._streams: dict[Split, tuple] = {}
        for want in candidate_prefill_sms(self.total_sms, self.granularity):
            self._add_split(device_res, want)
        log.info("green contexts: %d candidate splits over %d SMs, prefill SMs %s (balanced workqueues: %s)",
                 len(self.splits), self.total_sms, sorted(self.splits), self._workqueue is not None)

    def _add_split(self, device_res, want: int):
        cu = self._cu
        result, groups, remainder = self._check(cu.cuDevSmResourceSplitByCount(1, device_res, 0, want))
        if groups != 1 or remainder.sm.smCount == 0:
            log.warning("the driver cannot make a %d-SM prefill group beside a decode remainder; skipping it", want)
            return
        given = result[0].sm.smCount
        if given in self.splits:
            # checked before any context exists, so a request the driver rounds onto a known split costs nothing
            log.info("prefill=%d gives the %d-SM group an earlier request gave; no new contexts", want, given)
            return
        split = Split(given, remainder.sm.smCount)
        self._streams[split] = (self._context(result[0]), self._context(remainder))
        self.splits[given] = split

    def _check(self, ret):
        err, *values = ret
        if err != self._cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return values[0] if len(values) == 1 else values

    def _balanced_workqueue(self):
        """CUDA >= 13.1: ask the driver for non-overlapping hardware queues per green context, else streams of the
        two phases may serialise in a shared queue even on disjoint SMs."""
        cu = self._cu
        try:
            if self._check(cu.cuDriverGetVersion()) < 13010:
                return None
            wq = self._check(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_WORKQUEUE_CONFIG))
            wq.wqConfig.sharingScope = cu.CUdevWorkqueueConfigScope.CU_WORKQUEUE_SCOPE_GREEN_CTX_BALANCED
            return wq
        except Exception as exc:  # older driver or bindings: plain green contexts still isolate SMs
            log.info("balanced workqueues unavailable (%s)", exc)
            return None

    def _context(self, sm_resource):
        """A green context on `sm_resource` and a stream on it; fails if the context got another SM count."""
        cu = self._cu
        ctx = self._green_context(sm_resource)
        raw = self._check(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        self._keep += [ctx, raw]
        actual = self._check(cu.cuGreenCtxGetDevResource(ctx, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)).sm.smCount
        if actual != sm_resource.sm.smCount:
            raise RuntimeError(f"the driver split off {sm_resource.sm.smCount} SMs, but the green context made "
                               f"from them has {actual}")
        return self._wrap(raw)

    def _green_context(self, sm_resource):
        if self._workqueue is not None:
            try:
                return self._create(sm_resource, self._workqueue)
            except RuntimeError as exc:
                # workqueues only help concurrency; the SM split alone still isolates the phases
                log.warning("a green context with a balanced workqueue failed (%s); continuing without workqueues",
                            exc)
                self._workqueue = None
        return self._create(sm_resource)

    def _create(self, *resources):
        cu = self._cu
        desc = self._check(cu.cuDevResourceGenerateDesc(list(resources), len(resources)))
        return self._check(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))

    def _wrap(self, raw):
        import torch
        return torch.cuda.ExternalStream(int(raw), device=self._device)

    def streams(self, split: Split):
        return self._streams[split]

    def describe(self) -> str:
        return f"green contexts over {self.total_sms} SMs in groups of {self.granularity}"


def make_backend(name: str, device) -> "CpuBackend | SharedBackend | GreenContextBackend":
    """Pick the partition backend. 'auto' prefers green contexts on CUDA and says why when it cannot."""
    import torch
    on_cuda = torch.device(device).type == "cuda"
    if name == "cpu":
        return CpuBackend()
    if name == "greenctx" and not on_cuda:
        raise ValueError(f"--partition-backend {name} needs a CUDA device; this engine runs on {device}")
    if name == "shared":
        return SharedBackend(device)
    if name == "greenctx":
        return GreenContextBackend(device)
    if name != "auto":
        raise ValueError(f"unknown partition backend {name!r}: choose auto, greenctx, shared or cpu")
    if not on_cuda:
        backend = CpuBackend()
        log.info("partition backend: cpu (no CUDA device; splits are recorded, not enforced)")
        return backend
    try:
        backend = GreenContextBackend(device)
        log.info("partition backend: greenctx (CUDA green contexts are available)")
        return backend
    except Exception as exc:
        log.warning("partition backend: shared (green contexts unavailable: %s)", exc)
        return SharedBackend(device)


def parse_split_value(value) -> tuple[str, float]:
    """'prefill=64' | 'prefill=0.5' | 64 | 0.5 | {'prefill': 64} -> ('sms', 64) or ('fraction', 0.5).
    A malformed value is a ValueError; whether the number is possible is for PartitionController.resolve."""
    raw = value
    if isinstance(value, dict):
        if set(value) != {"prefill"}:
            raise ValueError(f'expected {{"prefill": N}} (SMs) or {{"prefill": F}} (fraction), got {json.dumps(raw)}')
        value = value["prefill"]
    if isinstance(value, str):
        text = value.strip()
        key, sep, number = text.partition("=")
        if not sep or key.strip() != "prefill":
            raise ValueError(f"expected prefill=N (SMs) or prefill=F (fraction), got {raw!r}")
        number = number.strip()
        try:
            value = int(number) if number.isdigit() else float(number)
        except ValueError:
            raise ValueError(f"expected a number after prefill=, got {number!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the prefill share must be a finite number, got {raw!r}")
    if isinstance(value, int) or value.is_integer():
        return "sms", int(value)
    return "fraction", value


class PartitionController:
    """The one owner of the current split. Writers (CLI, admin API, watched file) set it; workers read it at
    their iteration boundaries; the last writer wins and is reported."""

    def __init__(self, backend, metrics=None, initial=None):
        self.backend = backend
        self.metrics = metrics
        self._lock = threading.Lock()
        keys = sorted(backend.splits)
        self._split = backend.splits[keys[len(keys) // 2]] if keys else None
        self.source = "default"
        self.requested = None
        self._pending_phases: set[str] = set()
        self._switch_started: float | None = None
        self.switches = 0
        self.changed_at: float | None = None     # monotonic time of the last change after start-up
        self.applied = {"prefill": self._split, "decode": self._split}
        # the cpu stand-in has no hardware to show which split a step ran on, so it keeps the last steps' record
        self.history: deque[tuple[str, Split]] | None = (deque(maxlen=HISTORY_STEPS) if backend.name == "cpu"
                                                         else None)
        self._report()
        if initial is not None:
            self.set(initial, source="cli")
            self.changed_at = None               # the start-up split is no switch: every step ran on it

    @property
    def allowed(self) -> list[int]:
        return sorted(self.backend.splits)

    def resolve(self, value) -> Split:
        kind, number = parse_split_value(value)
        allowed = self.allowed
        if kind == "fraction":
            if not 0.0 < number < 1.0:
                raise PartitionError(f"a fractional prefill share must be between 0 and 1, got {number}; allowed "
                                     f"prefill SM counts: {allowed}", allowed)
            want = number * self.backend.total_sms
            return self.backend.splits[min(allowed, key=lambda p: (abs(p - want), p))]
        if number not in self.backend.splits:
            raise PartitionError(
                f"prefill={number} SMs is not possible on this device ({self.backend.total_sms} SMs, groups of "
                f"{self.backend.granularity}); allowed prefill SM counts: {allowed}", allowed)
        return self.backend.splits[number]

    def set(self, value, source: str) -> dict:
        split = self.resolve(value)
        with self._lock:
            self.requested = value
            self.source = source
            if split != self._split:
                self._split = split
                self._pending_phases = {"prefill", "decode"}
                self._switch_started = self.changed_at = time.monotonic()
            log.info("SM split set to prefill=%d decode=%d by %s", split.prefill_sms, split.decode_sms, source)
        self._report()
        return self.get()

    def share(self, phase: str, split: Split) -> float:
        """The share of all SMs `phase` runs on under `split`."""
        sms = split.prefill_sms if phase == "prefill" else split.decode_sms
        return sms / self.backend.total_sms

    def begin_step(self, phase: str):
        """Called by a worker at the start of each iteration: the split and stream it must use for that step."""
        with self._lock:
            split = self._adopt(phase)
            if self.history is not None:
                self.history.append((phase, split))
        prefill_stream, decode_stream = self.backend.streams(split)
        return split, prefill_stream if phase == "prefill" else decode_stream

    def idle(self, phase: str) -> None:
        """A worker with nothing to do is at an iteration boundary too: its next step will use the new split, so
        an idle phase must not hold a switch open (and inflate the switch latency) until work arrives."""
        with self._lock:
            if phase in self._pending_phases:
                self._adopt(phase)

    def _adopt(self, phase: str) -> Split:
        split = self._split
        self.applied[phase] = split
        if phase in self._pending_phases:
            self._pending_phases.discard(phase)
            if not self._pending_phases:
                self.switches += 1
                if self.metrics is not None:
                    self.metrics.partition_switched(time.monotonic() - self._switch_started)
        return split

    def get(self) -> dict:
        with self._lock:
            split = self._split
            return {
                "prefill_sms": split.prefill_sms,
                "decode_sms": split.decode_sms,
                "prefill_fraction": round(split.prefill_sms / self.backend.total_sms, 4),
                "total_sms": self.backend.total_sms,
                "backend": self.backend.name,
                "granularity": self.backend.granularity,
                "allowed_prefill_sms": self.allowed,
                "source": self.source,
                "requested": self.requested,
                "applied": {phase: s.prefill_sms if phase == "prefill" else s.decode_sms
                            for phase, s in self.applied.items()},
                "switches": self.switches,
            }

    def _report(self):
        if self.metrics is not None:
            self.metrics.set_sm_counts(self._split.prefill_sms, self._split.decode_sms)


class PartitionFileWatcher:
    """Follows the file the pod's downward-API volume projects from the annotation semipd.io/sm-partition.
    The file holds the annotation's value ('prefill=64'); a full annotations projection (key="value" lines) works too."""
    ANNOTATION = "semipd.io/sm-partition"

    def __init__(self, path: str, controller: PartitionController, interval: float = 0.5):
        self.path = Path(path)
        self.controller = controller
        self.interval = interval
        self._last: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition-file", daemon=True)

    def start(self):
        self.poll()
        self._thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.poll()

    def read_value(self) -> str | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == self.ANNOTATION:
                return json.loads(value) if value.startswith('"') else value
        return text or None

    def poll(self):
        value = self.read_value()
        if value is None or value == self._last:
            return
        self._last = value
        try:
            self.controller.set(value, source="partition-file")
        except ValueError as exc:       # malformed or impossible: keep the split, say why
            log.warning("ignoring %s: %s", self.path, exc)
