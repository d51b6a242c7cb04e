"""Do the two phases really run on different SMs? For every candidate split of the green-context backend, launch
a probe kernel on the prefill stream and on the decode stream at the same time; each block spins for a while and
records the SM it ran on (%smid) and when (%globaltimer). Then check:

- the prefill and decode SM sets are disjoint;
- each set has exactly the SM count the driver reported for its green context (larger always fails; smaller
  fails too unless --allow-under, since a probe that missed SMs has not shown where the rest of the group runs);
- the two kernels really overlapped in time (reported; the check would be weaker without it).

The shared backend is the control: there the two sets must overlap, or the probe could not see an overlap at all.

    python bench/sm_disjointness.py [--splits 8,64,120] [--json out.json] [--allow-under]
    python bench/sm_disjointness.py --dry-run        # no GPU: the check logic on synthetic SM-id sets

Exit codes: 0 all good, 1 a check failed (overlap, a size other than the reported one, control without overlap),
2 no CUDA device.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field

from gpu_common import (EXIT_FAILED, EXIT_OK, add_common_args, format_table, int_list, refuse_without_cuda,
                        write_json)

PROG = "sm_disjointness"
HOPPER_SMS = 132
MAX_BLOCKS_PER_SM = 32      # Hopper's resident-block limit; a 1-warp probe block reaches it


# ---- the check (pure logic, unit-tested without a GPU) --------------------------------------------------------

@dataclass
class SplitCheck:
    backend: str
    requested: int | None            # prefill SMs asked for (None for the shared control)
    prefill_reported: int            # what the driver reported for each side's green context
    decode_reported: int
    prefill_seen: int                # distinct SM ids the probe recorded on each side
    decode_seen: int
    overlap: list[int]               # SM ids seen on both sides
    expect_disjoint: bool
    concurrent: bool | None = None   # did the two probe kernels overlap in time (None: unknown)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _size_status(seen: int, reported: int) -> str:
    return "match" if seen == reported else ("under" if seen < reported else "over")


def check_split(backend: str, requested: int | None, prefill_ids, decode_ids, prefill_reported: int,
                decode_reported: int, total_sms: int, *, expect_disjoint: bool = True,
                concurrent: bool | None = None, allow_under: bool = False,
                stream_reported: tuple[int | None, int | None] = (None, None)) -> SplitCheck:
    """Judge one split from the SM ids each side's probe recorded and the sizes the driver reported."""
    prefill_ids, decode_ids = set(prefill_ids), set(decode_ids)
    overlap = sorted(prefill_ids & decode_ids)
    check = SplitCheck(backend, requested, prefill_reported, decode_reported, len(prefill_ids), len(decode_ids),
                       overlap, expect_disjoint, concurrent)
    for side, ids, reported, from_stream in (("prefill", prefill_ids, prefill_reported, stream_reported[0]),
                                             ("decode", decode_ids, decode_reported, stream_reported[1])):
        if not ids:
            check.problems.append(f"{side}: the probe recorded no SM at all (the kernel did not run)")
            continue
        bad = sorted(i for i in ids if not 0 <= i < total_sms)
        if bad:
            check.problems.append(f"{side}: SM ids {bad} are outside 0..{total_sms - 1}")
        status = _size_status(len(ids), reported)
        if status == "over":
            check.problems.append(f"{side} ran on {len(ids)} SMs, more than the {reported} the driver reported")
        elif status == "under":
            # the shared control only has to show overlap: its "reported" size is the whole device, not a group
            message = f"{side} reached {len(ids)} of its {reported} SMs"
            (check.notes if allow_under or not expect_disjoint else check.problems).append(message)
        if from_stream is not None and from_stream != reported:
            check.problems.append(f"{side}: its stream is bound to {from_stream} SMs, but the backend reported "
                                  f"{reported}")
    if expect_disjoint:
        if overlap:
            shown = overlap[:16] + (["..."] if len(overlap) > 16 else [])
            check.problems.append(f"prefill and decode shared {len(overlap)} SMs: {shown}")
        if prefill_reported + decode_reported > total_sms:
            check.problems.append(f"the driver reported {prefill_reported} + {decode_reported} SMs, more than "
                                  f"the device's {total_sms}")
    elif not overlap:
        check.problems.append("control: the shared streams did not overlap, so this probe cannot detect overlap")
    if concurrent is False:
        check.notes.append("the two probe kernels did not run at the same time")
    return check


def summary_table(checks: list[SplitCheck]) -> str:
    rows = []
    for c in checks:
        rows.append([c.backend, c.requested, c.prefill_reported, c.prefill_seen, c.decode_reported, c.decode_seen,
                     len(c.overlap), {True: "yes", False: "NO", None: "?"}[c.concurrent],
                     "ok" if c.ok else "FAIL"])
    table = format_table(["backend", "asked", "P drv", "P seen", "D drv", "D seen", "shared SMs", "concurrent",
                          "result"], rows)
    details = [f"  {c.backend} asked={c.requested}: {m}" for c in checks for m in c.problems + c.notes]
    return table + ("\n" + "\n".join(details) if details else "")


def synthetic_checks(total_sms: int, splits: list[int]) -> tuple[list[SplitCheck], list[str]]:
    """Dry run: clean splits, one planted overlap, an under-filled side (failing by default, passing with
    allow_under) and the shared control. Returns the checks and what went wrong in the logic itself (empty when
    every case was judged as it must be)."""
    checks, wrong = [], []
    for p in splits:
        c = check_split("synthetic", p, range(p), range(p, total_sms), p, total_sms - p, total_sms, concurrent=True)
        checks.append(c)
        if not c.ok:
            wrong.append(f"clean split prefill={p} was judged bad: {c.problems}")
    planted = check_split("synthetic-overlap", 16, range(16), range(8, total_sms), 16, total_sms - 16, total_sms,
                          concurrent=True)
    under = check_split("synthetic-under", 16, range(12), range(16, total_sms), 16, total_sms - 16, total_sms,
                        concurrent=True)
    allowed_under = check_split("synthetic-under-allowed", 16, range(12), range(16, total_sms), 16,
                                total_sms - 16, total_sms, concurrent=True, allow_under=True)
    control = check_split("synthetic-shared", None, range(total_sms), range(total_sms), total_sms, total_sms,
                          total_sms, expect_disjoint=False, concurrent=True)
    checks += [planted, under, allowed_under, control]
    if planted.ok or planted.overlap != list(range(8, 16)):
        wrong.append("the planted overlap (SMs 8..15) was not detected")
    if under.ok:
        wrong.append("an under-filled side must fail by default")
    if not allowed_under.ok or not allowed_under.notes:
        wrong.append("an under-filled side must be noted, and pass with --allow-under")
    if not control.ok:
        wrong.append(f"the overlapping control was judged bad: {control.problems}")
    return checks, wrong


# ---- the probe (needs a GPU) ------------------------------------------------------------------------------------

@dataclass
class Probe:
    sm_ids: set[int]
    start_ns: int        # first block's start (%globaltimer)
    end_ns: int          # last block's end
    blocks: int


_KERNEL = None


def probe_kernel():
    """The Triton kernel, built on first use so the check logic imports without triton or a GPU."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _globaltimer():
            # is_pure=False: every read is a new value, never hoisted out of the spin loop
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                             is_pure=False, pack=1)

        @triton.jit
        def smid_probe(out_ptr, spin_ns):
            # spin first so blocks stay resident and the kernel on the other stream runs meanwhile
            pid = tl.program_id(0)
            start = _globaltimer()
            now = start
            while now - start < spin_ns:
                now = _globaltimer()
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
            row = out_ptr + pid.to(tl.int64) * 3
            tl.store(row, sm.to(tl.int64))
            tl.store(row + 1, start)
            tl.store(row + 2, now)

        _KERNEL = smid_probe
    return _KERNEL


def launch_probe(stream, expected_sms: int, device, spin_us: float = 1000.0, waves: int = 4):
    """Queue the probe on `stream` with `waves` full loads of `expected_sms` SMs, so every SM of the side
    receives blocks. Returns the output buffer (made on that stream); read it with read_probe after a sync."""
    import torch
    grid = max(1, expected_sms) * MAX_BLOCKS_PER_SM * waves
    with torch.cuda.stream(stream):
        out = torch.zeros(grid, 3, dtype=torch.int64, device=device)
        probe_kernel()[(grid,)](out, int(spin_us * 1000), num_warps=1)
    return out


def read_probe(out) -> Probe:
    rows = out.cpu()
    ran = rows[rows[:, 1] > 0]
    if not len(ran):
        return Probe(set(), 0, 0, 0)
    return Probe(set(ran[:, 0].tolist()), int(ran[:, 1].min()), int(ran[:, 2].max()), len(ran))


def probe_streams(streams, expected_sms: list[int], device, spin_us: float = 1000.0, waves: int = 4) -> list[Probe]:
    """Launch the probe on every stream back to back, so they run together, and read where each block ran."""
    outs = [launch_probe(s, n, device, spin_us, waves) for s, n in zip(streams, expected_sms)]
    for stream in streams:
        stream.synchronize()
    return [read_probe(out) for out in outs]


def ran_together(a: Probe, b: Probe) -> bool:
    return max(a.start_ns, b.start_ns) < min(a.end_ns, b.end_ns)


def stream_sm_count(stream) -> int | None:
    """The SM count the driver binds to a stream (cuStreamGetDevResource), or None where the bindings lack it."""
    try:
        from cuda.bindings import driver as cu
        err, res = cu.cuStreamGetDevResource(cu.CUstream(stream.cuda_stream),
                                             cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
        return res.sm.smCount if err == cu.CUresult.CUDA_SUCCESS else None
    except Exception:
        return None


def check_backend_split(backend, requested, split, device, *, expect_disjoint, spin_us, waves,
                        allow_under=False) -> SplitCheck:
    prefill_stream, decode_stream = backend.streams(split)
    if expect_disjoint:
        reported = (split.prefill_sms, split.decode_sms)
    else:
        reported = (backend.total_sms, backend.total_sms)
    p, d = probe_streams([prefill_stream, decode_stream], list(reported), device, spin_us, waves)
    return check_split(backend.name, requested, p.sm_ids, d.sm_ids, reported[0], reported[1], backend.total_sms,
                       expect_disjoint=expect_disjoint, concurrent=ran_together(p, d), allow_under=allow_under,
                       stream_reported=(stream_sm_count(prefill_stream), stream_sm_count(decode_stream)))


def run_gpu(args) -> tuple[list[SplitCheck], dict]:
    import torch
    from semipd.runtime.partition import GreenContextBackend, SharedBackend
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    # compile and load the probe once on an ordinary stream, so the first split does not pay for it
    probe_streams([torch.cuda.current_stream(device)], [1], device, spin_us=0, waves=1)
    checks = []
    if args.backend in ("greenctx", "both"):
        gc = GreenContextBackend(device)
        wanted = args.splits or sorted(gc.splits)
        missing = [p for p in wanted if p not in gc.splits]
        if missing:
            raise SystemExit(f"{PROG}: prefill sizes {missing} are not candidate splits; choose from "
                             f"{sorted(gc.splits)}")
        for p in wanted:
            checks.append(check_backend_split(gc, p, gc.splits[p], device, expect_disjoint=True,
                                              spin_us=args.spin_us, waves=args.waves, allow_under=args.allow_under))
    if args.backend in ("shared", "both"):
        shared = SharedBackend(device)
        split = next(iter(shared.splits.values()))
        checks.append(check_backend_split(shared, None, split, device, expect_disjoint=False,
                                          spin_us=args.spin_us, waves=args.waves, allow_under=args.allow_under))
    props = torch.cuda.get_device_properties(device)
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "driver": _driver_version()}
    return checks, meta


def _driver_version() -> int | None:
    try:
        from cuda.bindings import driver as cu
        err, version = cu.cuDriverGetVersion()
        return version if err == cu.CUresult.CUDA_SUCCESS else None
    except Exception:
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--splits", type=int_list, default=None,
                        help="prefill SM counts to check (default: every candidate split)")
    parser.add_argument("--backend", choices=["greenctx", "shared", "both"], default="both",
                        help="greenctx: the splits; shared: the overlap control (default: both)")
    parser.add_argument("--spin-us", type=float, default=1000.0, help="how long each probe block spins (µs)")
    parser.add_argument("--waves", type=int, default=4, help="probe blocks per side, in full loads of its SMs")
    parser.add_argument("--allow-under", action="store_true",
                        help="a side that reached fewer SMs than the driver reported is only noted (default: it fails)")
    parser.add_argument("--total-sms", type=int, default=HOPPER_SMS, help="dry run only: the pretend GPU's SMs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        splits = args.splits or list(range(8, args.total_sms - 8 + 1, 8))
        if max(splits) >= args.total_sms:
            print(f"{PROG}: --splits must leave decode some of the {args.total_sms} SMs", file=sys.stderr)
            return 2
        checks, wrong = synthetic_checks(args.total_sms, splits)
        print("dry run: synthetic SM-id sets, no GPU (the planted overlap and the under-filled side must FAIL, "
              "everything else ok)")
        print(summary_table(checks))
        write_json(args.json, {"dry_run": True, "checks": [asdict(c) | {"ok": c.ok} for c in checks],
                               "logic_errors": wrong})
        for w in wrong:
            print(f"{PROG}: check logic is wrong: {w}", file=sys.stderr)
        return EXIT_FAILED if wrong else EXIT_OK
    refused = refuse_without_cuda(PROG)
    if refused is not None:
        return refused
    try:
        checks, meta = run_gpu(args)
    except (RuntimeError, ImportError) as exc:
        print(f"{PROG}: could not set up the partitions: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{meta['device']}: {meta['sms']} SMs, torch {meta['torch']}, CUDA {meta['cuda']}, driver {meta['driver']}")
    print(summary_table(checks))
    write_json(args.json, {"meta": meta, "checks": [asdict(c) | {"ok": c.ok} for c in checks]})
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
