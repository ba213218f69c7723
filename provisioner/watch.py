"""Wake-ups: what tells the daemon that the store (or a template) may have changed.

Each source is a coroutine that sets a shared :class:`asyncio.Event` and runs
until ``stop`` is set; none of them reads the change itself (the change feed
does), so a spurious wake-up costs one cheap query and a missed one is healed
by the next wake-up or the periodic reconcile.

- SQLite: :mod:`watchfiles` on the database file and its WAL;
- PostgreSQL: ``LISTEN provisioner_changes`` (the triggers ``NOTIFY``);
- MariaDB/MySQL: a timer (the change table is polled).
- Templates: :mod:`watchfiles` on the template directories.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from .aio import sleep_unless
from .logs import get_logger
from .store.changefeed import NOTIFY_CHANNEL

__all__ = [
    "coalesce",
    "poll_wakeups",
    "postgres_wakeups",
    "sqlite_filter",
    "sqlite_wakeups",
    "template_wakeups",
]

log = get_logger(__name__)


def sqlite_filter(db_path: Path) -> Callable[[object, str], bool]:
    """A watchfiles filter that passes the database file, its WAL and journal only."""
    names = {db_path.name, db_path.name + "-wal", db_path.name + "-journal"}

    def accept(_change: object, path: str) -> bool:
        return Path(path).name in names

    return accept


async def sqlite_wakeups(db_path: Path, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` whenever the SQLite database or its WAL is written."""
    from watchfiles import awatch

    db_path = db_path.resolve()
    async for _changes in awatch(
        db_path.parent,
        watch_filter=sqlite_filter(db_path),
        stop_event=stop,
        debounce=20,
        step=10,
        recursive=False,
    ):
        wake.set()


async def template_wakeups(dirs: Iterable[Path], wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` whenever a template file in ``dirs`` changes."""
    from watchfiles import awatch

    existing = [d for d in dirs if d.is_dir()]
    if not existing:
        await stop.wait()
        return
    async for _changes in awatch(*existing, stop_event=stop, debounce=50, step=20):
        log.info("templates.changed")
        wake.set()


async def poll_wakeups(interval: float, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` every ``interval`` seconds (MariaDB/MySQL have no notifications)."""
    while not await sleep_unless(stop, interval):
        wake.set()


async def postgres_wakeups(
    url: str,
    wake: asyncio.Event,
    stop: asyncio.Event,
    *,
    backoff_cap: float = 30.0,
) -> None:
    """Set ``wake`` on every ``NOTIFY provisioner_changes``; reconnect with capped backoff.

    After each (re)connect it sets ``wake`` once, since notifications sent while
    it was away are lost (the change feed still has the changes).
    """
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    delay = 0.5
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")  # a constant channel name
                log.info("store.listening", channel=NOTIFY_CHANNEL)
                delay = 0.5
                wake.set()
                await _relay_notifies(conn, wake, stop)
        except (psycopg.Error, OSError) as exc:
            log.warning("store.listen_failed", error=str(exc), retry_in_s=round(delay, 2))
            await sleep_unless(stop, delay)
            delay = min(backoff_cap, delay * 2) * random.uniform(0.8, 1.2)  # noqa: S311


async def _relay_notifies(
    conn: psycopg.AsyncConnection[object], wake: asyncio.Event, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        # A bounded wait so a stop request is noticed within a second.
        async for _note in conn.notifies(timeout=1.0):
            wake.set()
        await conn.execute("SELECT 1")  # notices a dead server between notifications


async def coalesce(
    wake: asyncio.Event,
    *,
    quiet: float,
    max_wait: float,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """After a wake-up, wait until ``quiet`` seconds pass with no new one, or ``max_wait`` in all.

    A burst of edits thus becomes one apply, while a single edit waits only ``quiet``.
    """
    now = clock or asyncio.get_running_loop().time
    start = now()
    while True:
        wake.clear()
        remaining = max_wait - (now() - start)
        if remaining <= 0:
            return
        await sleep(min(quiet, remaining))
        if not wake.is_set():
            return
