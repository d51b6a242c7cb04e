"""How the two workers share a CPU's cores, within what libgomp (torch's OpenMP) tolerates.

A waiting OpenMP helper thread spins for a while before it sleeps, so the next parallel region starts at once.
But once the process holds more helper threads, in all its teams together, than it has cores, libgomp spins
only ~100 iterations: every parallel region then wakes its helpers through the kernel. A decode step runs a
hundred or more regions; on a 2-core VM that cost the benchmark model's step at batch 2 half its speed
(`python bench/cpu_teams.py`: 19-23 ms alone, 31-33 ms beside a second team; 24 against 42-52 ms in the engine). An OS thread keeps the helpers of its largest team until it exits, so the rule
is on the largest team each thread ever runs: 1 + the sum of (team size - 1) must not exceed the cores.

Hence:
  - prefill always runs `share` threads (its steps are long and compute-bound; more threads help them least);
  - decode runs `share` threads while prefill works, and alone takes what the rule leaves (cores + 1 - share:
    2 of 2 cores), because the inter-token latency of a lightly loaded server is decode alone;
  - the model is loaded in a thread of its own that ends, so the main thread keeps no team.
A worker never sets another's count: torch thread counts belong to the OS thread that sets them.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 2


def cpu_share(torch_threads: int | None) -> int:
    """Threads each CPU worker gets while both work: the flag, or half the cores."""
    return torch_threads or max(1, usable_cores() // 2)


@dataclass(frozen=True)
class CoreShares:
    prefill: int            # always
    decode_shared: int      # while prefill works
    decode_alone: int       # while prefill is idle

    def decode(self, prefill_busy: bool) -> int:
        return self.decode_shared if prefill_busy else self.decode_alone


def core_shares(torch_threads: int | None = None, cores: int | None = None) -> CoreShares:
    share = cpu_share(torch_threads) if cores is None else (torch_threads or max(1, cores // 2))
    cores = usable_cores() if cores is None else cores
    return CoreShares(prefill=share, decode_shared=share, decode_alone=max(share, cores + 1 - share))


def in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a thread that ends when it returns, taking its OpenMP team with it; its exception
    is raised here."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"{getattr(fn, '__name__', 'task')}-loader")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
