"""What changing the SM split costs.

(a) creation: for each candidate split, the driver split, both green contexts, their streams and their
    destruction (cuda.bindings, timed on the host); and building the engine's whole GreenContextBackend.
(b) first launch on a fresh green context: a torch op and a Triton kernel, first call versus the steady state
    (both kernels were already loaded in the primary context, so what remains is the per-context cost).
(c) switching through the real engine: an Engine with the green-context backend under a running workload (long
    decode requests plus a steady stream of prefill-only requests); PartitionController.set() is called and we
    wait until both workers have begun a step on the new split. Reported two ways: the engine's own
    semipd:partition_switch_seconds (set() to the second begin_step) and the wall time seen by the caller.
    Also the controller alone: set() plus one begin_step per phase, no GPU work.

    python bench/switch_latency.py [--model DIR] [--switches 20] [--json out.json]
    python bench/switch_latency.py --dry-run   # no GPU: (c) on CPU with the cpu backend and a tiny model

Exit codes: 0 done, 1 something could not be measured, 2 no CUDA device.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from gpu_common import (EXIT_FAILED, EXIT_OK, add_common_args, fmt_ms, format_table, int_list, median,
                        refuse_without_cuda, write_json)

PROG = "switch_latency"


# ---- (a) and (b): green-context creation and first launch --------------------------------------------------

@dataclass
class CreationRow:
    requested: int
    prefill_sms: int
    decode_sms: int
    split_ms: float               # cuDevSmResourceSplitByCount
    contexts_ms: float            # descriptors + cuGreenCtxCreate for both sides
    streams_ms: float             # cuGreenCtxStreamCreate for both sides
    destroy_ms: float             # cuStreamDestroy + cuGreenCtxDestroy for both sides
    first_op_ms: float            # torch op on the fresh prefill stream, launch to completion
    steady_op_ms: float
    first_triton_ms: float
    steady_triton_ms: float


def _check(cu, ret):
    err, *values = ret
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return values[0] if len(values) == 1 else values


def _launch_ms(fn, stream, repeats: int) -> tuple[float, float]:
    """Host wall time of fn + stream sync: the first call, then the median of the next `repeats`."""
    import torch
    times = []
    with torch.cuda.stream(stream):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            fn()
            stream.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return times[0], median(times[1:])


def measure_creation(device, splits: list[int] | None, repeats: int = 20) -> tuple[list[CreationRow], dict]:
    import torch
    from cuda.bindings import driver as cu
    from sm_disjointness import probe_kernel
    from semipd.runtime.partition import candidate_prefill_sms
    x = torch.zeros(1 << 20, device=device)
    probe_out = torch.zeros(64, 3, dtype=torch.int64, device=device)
    kernel = probe_kernel()

    def torch_op():
        x.add_(1.0)

    def triton_op():
        kernel[(64,)](probe_out, 0, num_warps=1)

    plain = torch.cuda.Stream(device)
    _launch_ms(torch_op, plain, 2)             # primary context, modules and the Triton binary all warm
    _launch_ms(triton_op, plain, 2)
    dev = _check(cu, cu.cuDeviceGet(device.index or 0))
    sm = cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    res = _check(cu, cu.cuDeviceGetDevResource(dev, sm))
    # older bindings lack these fields; Hopper's documented default is groups of 8
    granularity = max(getattr(res.sm, "smCoscheduledAlignment", 0) or 8, getattr(res.sm, "minSmPartitionSize", 0) or 0)
    wanted = splits or candidate_prefill_sms(res.sm.smCount, granularity)
    extra = _balanced_workqueue(cu, dev)
    rows = []
    for p in wanted:
        t0 = time.perf_counter()
        result, _, remainder = _check(cu, cu.cuDevSmResourceSplitByCount(1, res, 0, p))
        t1 = time.perf_counter()
        contexts = []
        for part in (result[0], remainder):
            desc = _check(cu, cu.cuDevResourceGenerateDesc([part] + extra, 1 + len(extra)))
            contexts.append(_check(cu, cu.cuGreenCtxCreate(desc, dev,
                                                           cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)))
        t2 = time.perf_counter()
        raw = [_check(cu, cu.cuGreenCtxStreamCreate(c, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
               for c in contexts]
        t3 = time.perf_counter()
        sizes = [_check(cu, cu.cuGreenCtxGetDevResource(c, sm)).sm.smCount for c in contexts]
        stream = torch.cuda.ExternalStream(int(raw[0]), device=device)
        torch.cuda.synchronize(device)
        first_op, steady_op = _launch_ms(torch_op, stream, repeats)
        first_tri, steady_tri = _launch_ms(triton_op, stream, repeats)
        t4 = time.perf_counter()
        for s in raw:
            _check(cu, cu.cuStreamDestroy(s))
        for c in contexts:
            _check(cu, cu.cuGreenCtxDestroy(c))
        t5 = time.perf_counter()
        rows.append(CreationRow(p, sizes[0], sizes[1], (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3,
                                (t5 - t4) * 1e3, first_op, steady_op, first_tri, steady_tri))
    return rows, {"balanced_workqueues": bool(extra), "granularity": granularity, "total_sms": res.sm.smCount}


def _balanced_workqueue(cu, dev) -> list:
    """The same workqueue choice as the engine's backend: balanced on drivers >= 13.1, where the bindings know it."""
    try:
        if _check(cu, cu.cuDriverGetVersion()) < 13010:
            return []
        wq = _check(cu, cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_WORKQUEUE_CONFIG))
        wq.wqConfig.sharingScope = cu.CUdevWorkqueueConfigScope.CU_WORKQUEUE_SCOPE_GREEN_CTX_BALANCED
        return [wq]
    except Exception:
        return []


def creation_table(rows: list[CreationRow]) -> str:
    return format_table(
        ["asked", "P SMs", "D SMs", "split ms", "2 ctx ms", "2 streams ms", "destroy ms", "1st op ms", "op ms",
         "1st triton ms", "triton ms"],
        [[r.requested, r.prefill_sms, r.decode_sms, fmt_ms(r.split_ms), fmt_ms(r.contexts_ms), fmt_ms(r.streams_ms),
          fmt_ms(r.destroy_ms), fmt_ms(r.first_op_ms), fmt_ms(r.steady_op_ms), fmt_ms(r.first_triton_ms),
          fmt_ms(r.steady_triton_ms)] for r in rows])


# ---- (c) switching ----------------------------------------------------------------------------------------------

def controller_switch_us(backend, rounds: int = 1000) -> float:
    """set() to a new split plus one begin_step per phase: the controller's own cost, no GPU work."""
    from semipd.runtime.partition import PartitionController
    controller = PartitionController(backend)
    allowed = controller.allowed
    pair = [allowed[0], allowed[-1]]
    start = time.perf_counter()
    for i in range(rounds):
        controller.set(f"prefill={pair[i % 2]}", source="bench")
        controller.begin_step("prefill")
        controller.begin_step("decode")
    return (time.perf_counter() - start) / rounds * 1e6


@dataclass
class SwitchSample:
    to_prefill_sms: int
    metric_ms: float | None       # semipd:partition_switch_seconds for this switch
    wall_ms: float                # set() returned .. both workers seen on the new split by the caller


class Load:
    """Keeps the engine busy in both phases: `decode` long requests always running, and at least two
    prefill-only requests (max_tokens=1, they finish at prefill) always waiting."""

    def __init__(self, engine, decode: int, prompt_len: int):
        from semipd.runtime.sampling import SamplingParams
        self.engine, self.decode, self.prompt_len = engine, decode, prompt_len
        self.vocab = engine.runner.model_config.vocab_size
        room = engine.max_model_len - prompt_len - 1
        self.long = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
        self.short = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        self.live = {"decode": 0, "prefill": 0}
        self.tokens = 0
        self.errors: list[str] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)

    def _submit(self, kind: str):
        seed = next(self._ids)
        prompt = [(7 * i + seed) % self.vocab for i in range(self.prompt_len)]
        params = self.long if kind == "decode" else self.short

        def on_output(out, kind=kind):
            with self._lock:
                self.tokens += len(out.token_ids)
                if out.finished:
                    self.live[kind] -= 1
        with self._lock:
            self.live[kind] += 1
        try:
            self.engine.add_request(f"bench-{kind}-{next(self._ids)}", prompt, params, on_output)
        except Exception as exc:  # queue full or shutting down: count it, try again next round
            with self._lock:
                self.live[kind] -= 1
            self.errors.append(str(exc))

    def _run(self):
        while not self._stop.wait(0.001):
            for kind, want in (("decode", self.decode), ("prefill", 2)):
                while self.live[kind] < want and not self._stop.is_set():
                    self._submit(kind)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _metric(engine, name: str, **labels) -> float:
    values = {"model_name": engine.model_name, "engine": "0", **labels}
    return engine.metrics.registry.get_sample_value(name, values) or 0.0


def measure_engine_switch(model_dir: str, device: str, backend: str, switches: int, dwell_s: float,
                          decode_reqs: int, prompt_len: int, timeout_s: float = 30.0) -> dict:
    from semipd.runtime.config import EngineConfig
    from semipd.runtime.engine import Engine
    on_cuda = device.startswith("cuda")
    engine = Engine(EngineConfig(model=model_dir, device=device, dtype="bfloat16" if on_cuda else "float32",
                                 partition_backend=backend, max_num_seqs=decode_reqs + 8))
    load = Load(engine, decode_reqs, prompt_len)
    samples: list[SwitchSample] = []
    try:
        engine.start()
        load.start()
        _wait(lambda: load.tokens >= 4 * decode_reqs and _mean_step_ms(engine, "prefill") is not None,
              timeout_s, "both phases to run", engine=engine)
        allowed = engine.partition.allowed
        targets = [allowed[0], allowed[-1], allowed[len(allowed) // 2]]
        for i in range(switches):
            time.sleep(dwell_s)
            want = targets[i % len(targets)]
            if engine.partition.get()["prefill_sms"] == engine.partition.backend.splits[want].prefill_sms:
                want = targets[(i + 1) % len(targets)]
            count0 = _metric(engine, "semipd:partition_switch_seconds_count")
            sum0 = _metric(engine, "semipd:partition_switch_seconds_sum")
            start = time.perf_counter()
            engine.partition.set(f"prefill={want}", source="bench")
            # the controller counts the switch just before it observes the histogram: wait for the histogram
            _wait(lambda: _metric(engine, "semipd:partition_switch_seconds_count") > count0, timeout_s,
                  "both workers on the new split", engine=engine)
            wall = (time.perf_counter() - start) * 1e3
            metric = (_metric(engine, "semipd:partition_switch_seconds_sum") - sum0) * 1e3
            samples.append(SwitchSample(engine.partition.backend.splits[want].prefill_sms, metric, wall))
        steps = {phase: _mean_step_ms(engine, phase) for phase in ("prefill", "decode")}
        info = {"partition": engine.partition.backend.describe(), "mean_step_ms": steps,
                "load_errors": len(load.errors)}
    finally:
        load.stop()
        engine.shutdown()
    if engine.worker_error is not None:
        raise RuntimeError(f"an engine worker failed: {engine.worker_error!r}")
    return info | {"samples": [asdict(s) for s in samples]}


def _mean_step_ms(engine, phase: str) -> float | None:
    count = _metric(engine, "semipd:step_seconds_count", phase=phase)
    return _metric(engine, "semipd:step_seconds_sum", phase=phase) / count * 1e3 if count else None


def _wait(condition, timeout_s: float, what: str, engine=None):
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if engine is not None and engine.worker_error is not None:
            raise RuntimeError(f"an engine worker failed: {engine.worker_error!r}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.0001)


def switch_table(result: dict) -> str:
    samples = result["samples"]
    rows = [[i + 1, s["to_prefill_sms"], fmt_ms(s["metric_ms"]), fmt_ms(s["wall_ms"])] for i, s in enumerate(samples)]
    rows.append(["median", "", fmt_ms(median(s["metric_ms"] for s in samples)),
                 fmt_ms(median(s["wall_ms"] for s in samples))])
    return format_table(["switch", "to P SMs", "engine metric ms", "caller wall ms"], rows)


def _tiny_model(tmp: str) -> str:
    from semipd.runtime.tiny_model import write_tiny_model
    return str(write_tiny_model(tmp, "llama"))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--splits", type=int_list, default=None, help="(a)/(b): prefill SM counts (default: all)")
    parser.add_argument("--model", metavar="DIR", help="(c): model for the engine (default: a tiny random Llama)")
    parser.add_argument("--switches", type=int, default=20, help="(c): how many split changes to time")
    parser.add_argument("--dwell", type=float, default=0.2, help="(c): seconds on each split before the next")
    parser.add_argument("--decode-requests", type=int, default=16, help="(c): long requests kept decoding")
    parser.add_argument("--prompt-len", type=int, default=256, help="(c): prompt tokens per request")
    parser.add_argument("--skip-creation", action="store_true", help="skip (a) and (b)")
    parser.add_argument("--skip-engine", action="store_true", help="skip (c)")
    args = parser.parse_args(argv)
    for name in ("switches", "decode_requests", "prompt_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.dwell < 0:
        parser.error("--dwell must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out: dict = {"dry_run": args.dry_run}
    if args.dry_run:
        from semipd.runtime.partition import CpuBackend
        print("dry run: no GPU. (a)/(b) need one and are skipped; (c) runs the real engine on CPU with the cpu "
              "backend (splits recorded, not enforced), so its numbers say nothing about a GPU")
        out["controller_us"] = controller_switch_us(CpuBackend())
        print(f"controller alone: {out['controller_us']:.1f} µs per switch (set + one begin_step per phase)")
        device, backend = "cpu", "cpu"
        args.prompt_len = min(args.prompt_len, 32)
    else:
        refused = refuse_without_cuda(PROG)
        if refused is not None:
            return refused
        import torch
        device, backend = args.device, "greenctx"
        dev = torch.device(device)
        torch.cuda.set_device(dev)
        try:
            if not args.skip_creation:
                rows, meta = measure_creation(dev, args.splits)
                from semipd.runtime.partition import GreenContextBackend
                start = time.perf_counter()
                gc = GreenContextBackend(dev)
                out["backend_build_ms"] = (time.perf_counter() - start) * 1e3
                out["creation"], out["creation_meta"] = [asdict(r) for r in rows], meta
                print(f"(a)+(b) green contexts, {meta['total_sms']} SMs, granularity {meta['granularity']}, "
                      f"balanced workqueues: {meta['balanced_workqueues']}")
                print(creation_table(rows))
                print(f"GreenContextBackend (all {len(gc.splits)} candidate splits, as the engine builds it): "
                      f"{out['backend_build_ms']:.1f} ms")
                out["controller_us"] = controller_switch_us(gc)
                print(f"controller alone: {out['controller_us']:.1f} µs per switch (set + one begin_step per phase)")
        except (RuntimeError, ImportError) as exc:
            print(f"{PROG}: green contexts: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if not args.skip_engine:
        with tempfile.TemporaryDirectory(prefix="semipd-switch-") as tmp:
            model = args.model or _tiny_model(tmp)
            try:
                result = measure_engine_switch(model, device, backend, args.switches, args.dwell,
                                               args.decode_requests, args.prompt_len)
            except (RuntimeError, ValueError, OSError) as exc:
                print(f"{PROG}: engine switch: {exc}", file=sys.stderr)
                return EXIT_FAILED
        out["engine_switch"] = result
        steps = result["mean_step_ms"]
        print(f"(c) switches through the engine ({result['partition']}); mean step: prefill "
              f"{fmt_ms(steps['prefill'])} ms, decode {fmt_ms(steps['decode'])} ms")
        print(switch_table(result))
    write_json(args.json, out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
