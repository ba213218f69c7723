"""The benchmarks' comparison helpers (bench.measure): pure timing arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bench.measure import MOST_RUNS, alternated_medians, quartiles, ratio_figures


def _clock(values: list[float]) -> Callable[[], float]:
    """A measurement that returns ``values`` in turn (its "seconds")."""
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def test_quartiles_of_one_value_are_that_value() -> None:
    """One run gives no spread: both quartiles are its value."""
    assert quartiles([1.4]) == (1.4, 1.4)


def test_quartiles_lie_within_the_values() -> None:
    """The quartiles of 1..5 are 2 and 4 (inclusive method)."""
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 4.0)


def test_alternated_medians_compare_medians_and_pairs() -> None:
    """The ratio is median over median; the quartiles are of each run over its pair."""
    measured = _clock([3.0, 2.0, 4.0])
    baseline = _clock([2.0, 2.0, 2.0])
    # Each pair takes 4+ s: the budget asks for one run, ``repeat`` for three.
    compared = alternated_medians(measured, baseline, repeat=3)
    assert compared.runs == 3
    assert compared.ratio == pytest.approx(1.5)
    assert (compared.ratio_q1, compared.ratio_q3) == pytest.approx((1.25, 1.75))


def test_short_runs_are_repeated_up_to_the_cap() -> None:
    """Runs of a microsecond are repeated MOST_RUNS times, not until the budget is spent."""
    compared = alternated_medians(lambda: 1e-6, lambda: 1e-6, repeat=1)
    assert compared.runs == MOST_RUNS


def test_ratio_figures_name_the_medians() -> None:
    """A comparison becomes a row's figures under the names given."""
    compared = alternated_medians(_clock([3.0]), _clock([2.0]), repeat=1)
    assert ratio_figures(compared, "sync_s", "raw_s") == {
        "sync_s": 3.0,
        "raw_s": 2.0,
        "runs": 1,
        "ratio": 1.5,
        "ratio_q1": 1.5,
        "ratio_q3": 1.5,
    }
