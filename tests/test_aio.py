"""The asyncio helpers' pure parts: the capped doubling backoff."""

from __future__ import annotations

import pytest

from provisioner.aio import doubling
from provisioner.ami.changes import verify_backoff
from provisioner.ami.pbx import STORE_RETRY_BASE, STORE_RETRY_MAX


def test_doubling_starts_at_base_and_stops_at_the_cap() -> None:
    """The wait is base after one failure, twice that after two, and never over the cap."""
    assert [doubling(0.5, 30.0, n) for n in (0, 1, 2, 3, 7, 8)] == [0.5, 0.5, 1.0, 2.0, 30.0, 30.0]


@pytest.mark.parametrize("failures", [1025, 1100, 10**6])
def test_a_long_outage_waits_the_cap_instead_of_overflowing(failures: int) -> None:
    """However many failures in a row (1,025 registration writes refused is under 9 hours of
    a store down), the wait is the cap, not an OverflowError that would stop the daemon."""
    assert doubling(STORE_RETRY_BASE, STORE_RETRY_MAX, failures) == STORE_RETRY_MAX
    assert verify_backoff(failures) == verify_backoff(50)
