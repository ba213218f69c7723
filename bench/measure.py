"""How the benchmarks compare a measurement with its baseline: pure timing helpers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["Compared", "alternated_medians", "quartiles", "ratio_figures"]

#: Seconds the runs of one comparison should take together, about; and the most runs.
BUDGET_S = 2.0
MOST_RUNS = 30


class Compared(NamedTuple):
    """A measurement next to its baseline, from alternated runs."""

    #: Median seconds of the measurement's runs.
    measured: float
    #: Median seconds of the baseline's runs.
    baseline: float
    #: How many runs of each.
    runs: int
    #: Lower and upper quartile of the per-pair ratios (a run of the measurement over the
    #: baseline run beside it): how far one comparison strays from the ratio of medians.
    #: Both are that ratio when there is one run.
    ratio_q1: float
    ratio_q3: float

    @property
    def ratio(self) -> float:
        """Median measurement over median baseline: the figure a target is read against."""
        return self.measured / self.baseline


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The lower and upper quartile of ``values`` (inclusive method: both lie within the
    values); the value itself twice when there is one."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def alternated_medians(
    measure: Callable[[], float], baseline: Callable[[], float], repeat: int
) -> Compared:
    """Medians of runs of ``measure`` and ``baseline`` (each returns its own seconds),
    alternated so that both see the same moments of a shared machine, how many of each
    were run, and the spread of the per-pair ratios: at least ``repeat`` runs, more when
    they are short, up to about :data:`BUDGET_S` seconds in all (at most
    :data:`MOST_RUNS`): the median of three runs of a few milliseconds is mostly noise."""
    measured, based = [measure()], [baseline()]
    pair = measured[0] + based[0]
    runs = max(repeat, min(MOST_RUNS, math.ceil(BUDGET_S / pair) if pair > 0 else MOST_RUNS))
    for _ in range(runs - 1):
        measured.append(measure())
        based.append(baseline())
    ratios = [m / b for m, b in zip(measured, based, strict=True)]
    q1, q3 = quartiles(ratios)
    return Compared(statistics.median(measured), statistics.median(based), runs, q1, q3)


def ratio_figures(compared: Compared, measured: str, baseline: str) -> dict[str, float]:
    """A comparison as a table row's figures: the medians under the names ``measured``
    and ``baseline``, ``runs``, ``ratio`` and the per-pair ratios' ``ratio_q1`` and
    ``ratio_q3``."""
    return {
        measured: compared.measured,
        baseline: compared.baseline,
        "runs": compared.runs,
        "ratio": compared.ratio,
        "ratio_q1": compared.ratio_q1,
        "ratio_q3": compared.ratio_q3,
    }
