"""The asyncio helpers: the capped doubling backoff, waiting on tasks or an event."""

from __future__ import annotations

import asyncio

import pytest

from provisioner.aio import doubling, wait_all_or_event
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


def test_waiting_on_tasks_or_an_event_ends_at_the_first_of_all_done_event_or_timeout() -> None:
    """wait_all_or_event returns once every task is done, at once when the event is set
    while one still runs, or at the timeout; it never cancels the tasks."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        quick = asyncio.ensure_future(asyncio.sleep(0.05))
        slow = asyncio.ensure_future(asyncio.sleep(0.2))
        started = loop.time()
        await wait_all_or_event([quick, slow], event, timeout=5)
        assert quick.done()
        assert slow.done()
        assert loop.time() - started < 1

        stuck = asyncio.ensure_future(asyncio.sleep(60))
        started = loop.time()
        await wait_all_or_event([stuck], event, timeout=0.1)
        assert 0.1 <= loop.time() - started < 1
        loop.call_later(0.05, event.set)
        await wait_all_or_event([stuck], event, timeout=5)
        assert loop.time() - started < 1
        assert not stuck.done()
        stuck.cancel()

    asyncio.run(scenario())
