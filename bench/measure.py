"""How the benchmarks compare a measurement with its baseline: pure timing helpers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

__all__ = ["alternated_medians"]

#: Seconds the runs of one comparison should take together, about; and the most runs.
BUDGET_S = 0.5
MOST_RUNS = 30


def alternated_medians(
    measure: Callable[[], float], baseline: Callable[[], float], repeat: int
) -> tuple[float, float, int]:
    """Medians of runs of ``measure`` and ``baseline`` (each returns its own seconds),
    alternated so that both see the same moments of a shared machine, and how many of
    each were run: at least ``repeat``, more when they are short, up to about
    :data:`BUDGET_S` seconds in all (at most :data:`MOST_RUNS`): the median of three runs
    of a few milliseconds is mostly noise."""
    measured, based = [measure()], [baseline()]
    pair = measured[0] + based[0]
    runs = max(repeat, min(MOST_RUNS, math.ceil(BUDGET_S / pair) if pair > 0 else MOST_RUNS))
    for _ in range(runs - 1):
        measured.append(measure())
        based.append(baseline())
    return statistics.median(measured), statistics.median(based), runs
