"""Small asyncio helpers: waiting on events with a deadline, without scattered cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["doubling", "sleep_unless", "wait_all_or_event", "wait_first", "wait_task_or_event"]


async def wait_first(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until any of ``events`` is set; ``True`` then, ``False`` after ``timeout``."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        # The only cancels outside shutdown: these tasks do nothing but wait on an event.
        for waiter in waiters:
            waiter.cancel()


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; ``True`` when stopped."""
    return await wait_first(stop, timeout=max(0.0, seconds))


async def wait_task_or_event(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    """Wait until ``task`` is done or ``event`` is set, whichever comes first; ``task``
    is left running."""
    if task.done() or event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def wait_all_or_event(
    tasks: Iterable[asyncio.Future[Any]], event: asyncio.Event, *, timeout: float
) -> None:
    """Wait until every one of ``tasks`` is done, ``event`` is set, or ``timeout`` seconds
    have passed, whichever comes first; ``tasks`` are left running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    if not pending or event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        while pending and not waiter.done():
            left = deadline - loop.time()
            if left <= 0:
                return
            done, _ = await asyncio.wait(
                {*pending, waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
    finally:
        waiter.cancel()


#: The most doublings :func:`doubling` counts: past it the wait is the cap for any cap a
#: float holds, and ``base * 2 ** 1024`` is an OverflowError (after 1,025 failures in a row:
#: under 9 hours of a store retried every 30 s).
_MAX_DOUBLINGS = 1000


def doubling(base: float, cap: float, failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``base`` after the first,
    doubling with each one more, at most ``cap``, however many failures."""
    return float(min(cap, base * 2.0 ** min(max(0, failures - 1), _MAX_DOUBLINGS)))
