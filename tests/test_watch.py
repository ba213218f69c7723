"""Wake-ups of the daemon: the SQLite change-feed follower and the burst window."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import Engine, text

from provisioner.store.changefeed import save_cursor
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.watch import (
    DirectoryWatch,
    NewestChange,
    _poll_feed,
    coalesce,
    sqlite_wakeups,
)

Scenario = Callable[[asyncio.Event, asyncio.Event], Awaitable[None]]


def _store(tmp_path: Path) -> tuple[Path, Engine]:
    path = tmp_path / "store.db"
    engine = open_engine(f"sqlite:///{path}")
    upgrade(engine)
    return path, engine


def _add_profile(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO profiles (name, description, created_at, updated_at) "
                "VALUES (:n, '', '2026-01-01', '2026-01-01')"
            ),
            {"n": name},
        )


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _follow(path: Path, scenario: Scenario, **kwargs: float) -> None:
    """Run ``sqlite_wakeups`` on ``path`` while ``scenario(wake, stop)`` runs, then stop it."""

    async def main() -> None:
        wake, stop = asyncio.Event(), asyncio.Event()
        source = asyncio.ensure_future(sqlite_wakeups(path, wake, stop, **kwargs))
        try:
            await scenario(wake, stop)
        finally:
            stop.set()
            await asyncio.wait_for(source, 5)

    asyncio.run(main())


def test_sqlite_wakeups_follow_the_change_feed_only(tmp_path: Path) -> None:
    """A wake-up at start and one per committed change; the daemon's own writes to the same
    file (here its cursor) wake nobody."""
    path, engine = _store(tmp_path)

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "no wake-up at start"
        wake.clear()
        await asyncio.to_thread(_save_cursor, engine)
        assert not await _set_within(wake, 0.3), "woken by a write outside the change feed"
        await asyncio.to_thread(_add_profile, engine, "sales")
        assert await _set_within(wake, 5), "no wake-up for a committed change"
        wake.clear()
        await asyncio.sleep(1.2)  # past the follow-up reads: asleep until the next write
        await asyncio.to_thread(_add_profile, engine, "support")
        assert await _set_within(wake, 5), "no wake-up for a change after a calm period"

    try:
        _follow(path, scenario)
    finally:
        engine.dispose()


def _save_cursor(engine: Engine) -> None:
    with engine.begin() as conn:
        save_cursor(conn, 12345)


def test_sqlite_wakeups_by_polling_follow_the_change_feed(tmp_path: Path) -> None:
    """The polling follower (no inotify) also wakes at start and for a committed change."""
    path, engine = _store(tmp_path)
    feed = NewestChange(path)

    async def scenario() -> None:
        wake, stop = asyncio.Event(), asyncio.Event()
        poller = asyncio.ensure_future(_poll_feed(feed, wake, stop, 0.005))
        try:
            assert await _set_within(wake, 5)
            wake.clear()
            await asyncio.to_thread(_add_profile, engine, "sales")
            assert await _set_within(wake, 5)
        finally:
            stop.set()
            await asyncio.wait_for(poller, 5)

    try:
        asyncio.run(scenario())
    finally:
        feed.close()
        engine.dispose()


def test_sqlite_wakeups_never_create_a_missing_store(tmp_path: Path) -> None:
    """A store file that does not exist is not created by the follower, and wakes nobody."""
    path = tmp_path / "missing.db"

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert not await _set_within(wake, 0.3)

    _follow(path, scenario)
    assert not path.exists()


def test_directory_watch_reports_only_the_named_files(tmp_path: Path) -> None:
    """Writes to the watched names are reported; writes to other files of the directory not."""
    watch = DirectoryWatch(tmp_path, ["store.db", "store.db-wal"])
    try:
        assert watch.written() is False
        (tmp_path / "other.conf").write_text("x")
        assert watch.written() is False
        (tmp_path / "store.db-wal").write_bytes(b"frame")
        assert watch.written() is True
        assert watch.written() is False  # drained
    finally:
        watch.close()


def test_coalesce_returns_once_wake_ups_stop() -> None:
    """A burst of wake-ups holds the apply until ``quiet`` passes without one."""

    async def scenario() -> float:
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def burst() -> None:
            for _ in range(5):
                wake.set()
                await asyncio.sleep(0.02)

        started = loop.time()
        edits = asyncio.ensure_future(burst())
        await coalesce(wake, quiet=0.1, max_wait=5)
        await edits
        return loop.time() - started

    assert asyncio.run(scenario()) >= 0.1 + 4 * 0.02
