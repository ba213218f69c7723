"""What the benchmarks ran on, printed before their figures (a script helper, not a test).

Figures from different machines differ by more than most changes do: this machine's
figures were half of an earlier session's with the same code.  A fixed pure-Python loop
timed here lets two runs' figures be compared, or not.
"""

from __future__ import annotations

import os
import platform
import time

__all__ = ["describe", "python_loop_s"]

#: Iterations of :func:`python_loop_s`' loop.
LOOP = 10_000_000


def python_loop_s() -> float:
    """Seconds for one thread to run ``LOOP`` additions in a plain Python loop (the best
    of three runs: the least disturbed by the rest of the machine)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(LOOP):
            total += i
        best = min(best, time.perf_counter() - start)
    return best


def describe() -> str:
    """One line: CPUs, CPU model where known, Python, and :func:`python_loop_s`."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                "",
            )
    except OSError:
        pass  # not Linux: the line just lacks the model
    cpus = os.cpu_count() or 0
    return (
        f"machine: {cpus} CPUs {model or platform.machine()}, Python {platform.python_version()},"
        f" {LOOP:,}-step Python loop {python_loop_s():.2f} s (lower is faster)"
    )
