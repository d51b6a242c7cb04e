"""What the GPU benchmarks share: refusing cleanly without CUDA, CUDA-event timing, plain tables, JSON output.

The scripts in bench/ import this as a top-level module (`python bench/x.py` puts bench/ on sys.path); the GPU
tests put bench/ on sys.path themselves.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1        # the check ran and found a problem
EXIT_NO_GPU = 2        # refused: nothing to measure on


def cuda_missing_reason() -> str | None:
    """None when a CUDA device is usable, else a short reason (for the one-line refusal)."""
    try:
        import torch
    except Exception as exc:  # a broken torch install is also "no GPU to run on"
        return f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def refuse_without_cuda(prog: str) -> int | None:
    """Print one line and return EXIT_NO_GPU when there is no CUDA device; None when there is one."""
    reason = cuda_missing_reason()
    if reason is None:
        return None
    print(f"{prog}: no CUDA device ({reason}); run it on an H100/H200, or pass --dry-run", file=sys.stderr)
    return EXIT_NO_GPU


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cuda:0", help="CUDA device (default cuda:0)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: exercise argument parsing, the logic and the table with synthetic data")


def int_list(text: str) -> list[int]:
    """'8,64,120' -> [8, 64, 120]; argparse type, so bad input is a usage error, not a traceback."""
    import argparse
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        print(f"wrote {path}")


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def fmt_ms(value: float | None, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def time_on_stream(fn, stream, warmup: int, iters: int) -> list[float]:
    """Milliseconds per call of fn, each call bracketed by CUDA events on `stream` (fn issues its work on the
    current stream, which is `stream` here)."""
    import torch
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        pairs = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            pairs.append((start, end))
    stream.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]
