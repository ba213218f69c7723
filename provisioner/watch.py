"""Wake-ups: what tells the daemon that the store (or a template) may have changed.

Each source is a coroutine that sets a shared :class:`asyncio.Event` and runs
until ``stop`` is set; none of them reads the change itself (the change feed
does), so a spurious wake-up costs one cheap query and a missed one is healed
by the next wake-up or the periodic reconcile.

- SQLite: a few-millisecond poll of the newest change id (see :func:`sqlite_wakeups`);
- PostgreSQL: ``LISTEN provisioner_changes`` (the triggers ``NOTIFY``);
- MariaDB/MySQL: a timer (the change table is polled).
- Templates: :mod:`watchfiles` on the template directories.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import psycopg
from sqlalchemy import func, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from .aio import sleep_unless
from .logs import get_logger
from .store.changefeed import NOTIFY_CHANNEL
from .store.schema import changes

__all__ = [
    "coalesce",
    "newest_change_sql",
    "poll_wakeups",
    "postgres_wakeups",
    "sqlite_wakeups",
    "template_wakeups",
]

log = get_logger(__name__)


def newest_change_sql() -> str:
    """``SELECT max(id) FROM changes`` as SQLite text, compiled once from Core."""
    return str(select(func.max(changes.c.id)).compile(dialect=sqlite_dialect.dialect()))


async def sqlite_wakeups(
    db_path: Path, wake: asyncio.Event, stop: asyncio.Event, *, interval: float = 0.005
) -> None:
    """Set ``wake`` whenever the newest change id of the SQLite store moves; also once at start.

    Every ``interval`` seconds it reads ``max(changes.id)`` on its own connection: a few
    microseconds (an index seek; in WAL mode a reader never waits on a writer, and with
    ``timeout=0`` it never waits at all), so it runs on the event loop.  Unlike a file
    watch it wakes only for the change feed (not for the daemon's own writes to the same
    file: target rows, cursor, registrations), and at once (no debounce).  A lock held
    for a moment is retried at the next tick; any other failure (store gone, not
    migrated) every second with a fresh connection.  The file is never created.
    """
    query = newest_change_sql()
    uri = db_path.resolve().as_uri() + "?mode=rw"
    conn: sqlite3.Connection | None = None
    last: object = _UNREAD
    failing = False
    try:
        while not stop.is_set():
            try:
                if conn is None:
                    conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
                newest = conn.execute(query).fetchone()[0]
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorname", "") in _BUSY:
                    await asyncio.sleep(interval)  # a writer holds a lock for a moment
                    continue
                if not failing:
                    log.warning("store.poll_failed", error=str(exc))
                failing = True
                if conn is not None:
                    conn.close()
                    conn = None
            else:
                failing = False
                if newest != last:
                    last = newest
                    wake.set()
            await asyncio.sleep(max(interval, 1.0) if failing else interval)
    finally:
        if conn is not None:
            conn.close()


_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
#: The poll's "nothing read yet": differs from every id and from None (an empty feed).
_UNREAD = object()


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
