"""Small asyncio helpers: waiting on events with a deadline, without scattered cancels."""

from __future__ import annotations

import asyncio

__all__ = ["sleep_unless", "wait_first"]


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
