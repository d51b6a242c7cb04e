"""Argument types `semipd bench` and `semipd simulate` share: each raises ArgumentTypeError, which argparse
reports naming the flag (exit 2)."""
import argparse

from semipd.loadgen.workload import LengthDist, parse_length

MAX_SWEEP_RATES = 1000


def _number(text: str, kind, ok, rule: str):
    """`kind(text)` when `ok` holds for it; otherwise the ArgumentTypeError argparse turns into a usage error."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {rule} (got {text})")
    return v


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive finite number")


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, ">= 1")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, ">= 0")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.9")


def temperature(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 2, "in [0, 2]")


def length(text: str) -> LengthDist:
    try:
        return parse_length(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def url(text: str) -> str:
    from semipd.loadgen.client import normalize_url
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_sweep(text: str) -> list[float]:
    """`A:B:STEP` -> [A, A+STEP, ..., B] (B included when the steps land on it, to 1e-9)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"use START:STOP:STEP, e.g. 1:8:0.5 (got {text!r})")
    try:
        a, b, step = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"START, STOP and STEP must be numbers (got {text!r})") from None
    if not (a > 0 and b >= a and step > 0) or any(map(lambda v: v == float("inf"), (a, b, step))):
        raise argparse.ArgumentTypeError(f"need 0 < START <= STOP and STEP > 0 (got {text!r})")
    n = int((b - a) / step + 1e-9) + 1
    if n > MAX_SWEEP_RATES:
        raise argparse.ArgumentTypeError(f"{n} rates; at most {MAX_SWEEP_RATES} in one sweep")
    return [round(a + i * step, 9) for i in range(n)]
