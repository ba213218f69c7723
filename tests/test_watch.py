"""Wake-ups of the daemon: the SQLite change-feed follower, the template watcher and the
burst window."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import Engine, text

from provisioner import watch as watch_module
from provisioner.accounts import Accounts, Policy
from provisioner.store.changefeed import NOTIFY_CHANNEL, save_cursor
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.watch import (
    DirectoryWatch,
    NewestChange,
    TemplateStamp,
    _poll_feed,
    coalesce,
    sqlite_wakeups,
    template_stamp,
    template_wakeups,
)

from .faultkit import Daemon, endpoints, seed_store, store_url, tcp_options, until, write_config

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


def _link_to(tmp_path: Path, target: Path) -> Path:
    """A symbolic link ``links/provisioner.db`` under ``tmp_path`` (another name, another
    directory) naming ``target``."""
    link = tmp_path / "links" / "provisioner.db"
    link.parent.mkdir()
    link.symlink_to(target)
    return link


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


def test_sqlite_wakeups_follow_a_store_reached_through_a_symbolic_link(tmp_path: Path) -> None:
    """A store named by a symbolic link of another name wakes the follower for each commit."""
    real, engine = _store(tmp_path)
    link = _link_to(tmp_path, real)

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "no wake-up at start"
        wake.clear()
        await asyncio.sleep(1.2)  # past the follow-up reads of the start
        await asyncio.to_thread(_add_profile, engine, "sales")
        assert await _set_within(wake, 1), "no wake-up for a change written to the real file"

    try:
        _follow(link, scenario)
    finally:
        engine.dispose()


def test_sqlite_wakeups_follow_a_symbolic_link_pointed_at_another_store(tmp_path: Path) -> None:
    """A symbolic link naming the store, pointed at another database (``ln -sfn``: another
    name, another directory), wakes the follower, and so does each later commit to the
    database it names now."""
    first, engine = _store(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    second = other / "restored.db"
    second_engine = open_engine(f"sqlite:///{second}")
    upgrade(second_engine)
    link = _link_to(tmp_path, first)

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "no wake-up at start"
        wake.clear()
        await asyncio.sleep(1.2)  # past the follow-up reads of the start
        (link.parent / "next.db").symlink_to(second)
        os.replace(link.parent / "next.db", link)  # the operator's retarget
        assert await _set_within(wake, 5), "no wake-up for the link pointed elsewhere"
        wake.clear()
        await asyncio.sleep(1.2)
        await asyncio.to_thread(_add_profile, second_engine, "sales")
        assert await _set_within(wake, 5), "no wake-up for a change to the new target"
        wake.clear()
        await asyncio.sleep(1.2)
        await asyncio.to_thread(_add_profile, second_engine, "support")
        assert await _set_within(wake, 5), "no wake-up for a later change to the new target"

    try:
        _follow(link, scenario)
    finally:
        engine.dispose()
        second_engine.dispose()


def _store_at(path: Path) -> Engine:
    """A migrated SQLite store at ``path`` (its directory made); its engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = open_engine(f"sqlite:///{path}")
    upgrade(engine)
    return engine


def _repoint(link: Path, target: str | Path) -> None:
    """Point the symbolic link ``link`` at ``target`` as ``ln -sfn`` does: a new link
    renamed over the old one."""
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(target)
    os.replace(fresh, link)


def _follow_a_retarget(path: Path, retarget: Callable[[], None], target: Engine) -> None:
    """Follow ``path``; after ``retarget()`` (made once the start's reads are over) the
    follower wakes, and wakes within a second for each change then committed in the store
    of ``target``."""

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "no wake-up at start"
        wake.clear()
        await asyncio.sleep(1.2)  # past the follow-up reads of the start
        retarget()
        assert await _set_within(wake, 5), "no wake-up for the path led elsewhere"
        for name in ("sales", "support"):
            wake.clear()
            await asyncio.sleep(1.2)  # past the follow-up reads: asleep until a write
            await asyncio.to_thread(_add_profile, target, name)
            assert await _set_within(wake, 1), f"no wake-up for {name} in the new store"

    _follow(path, scenario)


def test_sqlite_wakeups_follow_a_link_of_a_chain_pointed_at_another_store(
    tmp_path: Path,
) -> None:
    """The store reached through a chain of links (store.db -> l1 -> l2 -> a.db, all beside
    the databases), its last link pointed at another database (``ln -sfn b.db l2``): the
    follower wakes, and wakes for each change then committed in that database."""
    first, second = _store_at(tmp_path / "a.db"), _store_at(tmp_path / "b.db")
    (tmp_path / "l2").symlink_to("a.db")
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "store.db").symlink_to(tmp_path / "l1")
    try:
        _follow_a_retarget(tmp_path / "store.db", lambda: _repoint(tmp_path / "l2", "b.db"), second)
    finally:
        first.dispose()
        second.dispose()


def test_sqlite_wakeups_follow_an_ancestor_directory_link_pointed_elsewhere(
    tmp_path: Path,
) -> None:
    """The store's directory reached through a link (srv/cur -> v1, the path
    srv/cur/store.db), that link pointed at another directory (``ln -sfn v2 srv/cur``):
    the follower wakes, and wakes for each change then committed in the store there."""
    srv = tmp_path / "srv"
    first, second = _store_at(srv / "v1" / "store.db"), _store_at(srv / "v2" / "store.db")
    (srv / "cur").symlink_to("v1")
    try:
        _follow_a_retarget(srv / "cur" / "store.db", lambda: _repoint(srv / "cur", "v2"), second)
    finally:
        first.dispose()
        second.dispose()


def test_sqlite_wakeups_follow_an_ancestor_directory_replaced_by_a_rename(
    tmp_path: Path,
) -> None:
    """The store's directory replaced by another renamed over its name (``mv srv/cur
    srv/old; mv srv/v2 srv/cur``: the same path, another directory): the follower wakes,
    and wakes for each change then committed in the store of the new directory."""
    srv = tmp_path / "srv"
    first, second = _store_at(srv / "cur" / "store.db"), _store_at(srv / "v2" / "store.db")

    def swap() -> None:
        os.rename(srv / "cur", srv / "old")
        os.rename(srv / "v2", srv / "cur")

    try:
        _follow_a_retarget(srv / "cur" / "store.db", swap, second)
    finally:
        first.dispose()
        second.dispose()


def test_the_way_to_the_store_names_every_component_and_link_met(tmp_path: Path) -> None:
    """The way to a store reached through an ancestor link and a chain of links (one
    relative, one absolute) names each component of the path and of every link's target,
    each link's own name too, in the resolved directory it is looked up in, and ends at
    the file ``Path.resolve`` gives."""
    srv = tmp_path / "srv"
    (srv / "v1").mkdir(parents=True)
    (srv / "data").mkdir()
    (srv / "data" / "a.db").write_bytes(b"")
    (srv / "cur").symlink_to("v1")
    (srv / "v1" / "l1").symlink_to(srv / "data" / "a.db")
    (srv / "v1" / "store.db").symlink_to("l1")
    path = srv / "cur" / "store.db"
    way = watch_module._names_on_the_way(path)
    real, planned = watch_module._store_plan(path)
    assert real == path.resolve() == srv / "data" / "a.db"
    assert way[srv] == {"cur", "v1", "data"}
    assert way[srv / "v1"] == {"store.db", "l1"}
    assert way[srv / "data"] == {"a.db"}
    assert way[tmp_path] == {"srv"}
    assert {directory for directory, _identity, _names in planned} == set(way)


def _event_names(fd: int) -> list[bytes]:
    """The names of the inotify events pending on ``fd`` (waiting up to 0.2 s for one)."""
    names: list[bytes] = []
    if select.select([fd], [], [], 0.2)[0]:
        data, offset = os.read(fd, 65536), 0
        while offset < len(data):
            *_head, length = watch_module._EVENT.unpack_from(data, offset)
            offset += watch_module._EVENT.size
            names.append(data[offset : offset + length].rstrip(b"\0"))
            offset += length
    return names


def test_a_write_to_an_unrelated_file_on_the_way_to_the_store_does_not_wake(
    tmp_path: Path,
) -> None:
    """Writes to other files of the directories on the way to the store (not its own
    directory) raise no inotify event: the watch's fd stays quiet, the loop asleep."""
    srv = tmp_path / "srv"
    engine = _store_at(srv / "v1" / "store.db")
    (srv / "cur").symlink_to("v1")
    unrelated = [tmp_path / "notes.txt", srv / "notes.txt"]
    for path in unrelated:
        path.write_text("")
    files, _plan = watch_module._store_watch(srv / "cur" / "store.db")
    try:
        for path in unrelated:
            with path.open("a") as out:
                out.write("written\n")
        # The raw events, not written_names() (which leaves unwatched names out anyway);
        # other programs may create files in /tmp meanwhile: only these names count.
        assert b"notes.txt" not in _event_names(files.fd)
    finally:
        files.close()
        engine.dispose()


def _save_cursor(engine: Engine) -> None:
    with engine.begin() as conn:
        save_cursor(conn, 12345)


def test_sqlite_wakeups_read_busy_files_at_most_once_per_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store's files are written again and again (the daemon's own commits, as in
    a registration storm) the feed is read, and the loop woken by the watch, at most about
    once per busy gap, not on each write; a change committed among those writes still
    wakes at once."""
    path, engine = _store(tmp_path)
    reads: list[float] = []
    check = NewestChange.check

    def counted(feed: NewestChange, wake: asyncio.Event) -> bool:
        reads.append(time.monotonic())
        return check(feed, wake)

    monkeypatch.setattr(NewestChange, "check", counted)
    wakes: list[float] = []
    drain = DirectoryWatch.written_names

    def woken(watch: DirectoryWatch) -> dict[bytes, int]:
        wakes.append(time.monotonic())
        return drain(watch)

    monkeypatch.setattr(DirectoryWatch, "written_names", woken)

    def write_for(seconds: float) -> int:
        """Commit large writes outside the change feed for ``seconds`` (each statement
        writes the WAL page after page with the GIL released, as the flusher's do); how
        many."""
        end, commits = time.monotonic() + seconds, 0
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS scratch (n INTEGER, pad TEXT)")
            while time.monotonic() < end:
                conn.execute(
                    "INSERT INTO scratch WITH RECURSIVE c(n) AS "
                    "(SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 20000) "
                    "SELECT n, printf('%0100d', n) FROM c"
                )
                conn.execute("DELETE FROM scratch")
                commits += 2
        finally:
            conn.close()
        return commits

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "no wake-up at start"
        wake.clear()
        await asyncio.sleep(1.2)  # past the follow-up reads of the start
        reads.clear()
        writing = asyncio.ensure_future(asyncio.to_thread(write_for, 1.0))
        await asyncio.sleep(0.5)
        assert not wake.is_set(), "woken by writes outside the change feed"
        await asyncio.to_thread(_add_profile, engine, "sales")
        assert await _set_within(wake, 0.2), "no wake-up for a change among busy writes"
        commits = await writing
        busy = [t for t in reads if t <= reads[0] + 1.0]
        woke = [t for t in wakes if reads[0] <= t <= reads[0] + 1.0]
        most = 1.0 / watch_module._BUSY_GAP * 1.2 + 10
        assert len(busy) <= most, (len(busy), commits)
        assert len(woke) <= most, (len(woke), commits)

    try:
        _follow(path, scenario)
    finally:
        engine.dispose()


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
        assert watch.written_names() == {}
        (tmp_path / "other.conf").write_text("x")
        assert watch.written_names() == {}
        (tmp_path / "store.db-wal").write_bytes(b"frame")
        assert list(watch.written_names()) == [b"store.db-wal"]
        assert watch.written_names() == {}  # drained
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


def _header_in(override: Path) -> Path:
    """Make the template override directory ``override`` holding ``header.j2`` (its text
    ``; v1``); that template's path."""
    override.mkdir()
    header = override / "header.j2"
    header.write_text("; v1\n")
    return header


def _watch_templates(
    dirs: list[Path], scenario: Scenario, since: TemplateStamp | None = None
) -> None:
    """Run ``template_wakeups`` on ``dirs`` while ``scenario(wake, stop)`` runs, then stop it."""

    async def main() -> None:
        wake, stop = asyncio.Event(), asyncio.Event()
        watcher = asyncio.ensure_future(template_wakeups(dirs, wake, stop, since=since))
        try:
            await scenario(wake, stop)
            assert not watcher.done(), "the template watcher ended"
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)

    asyncio.run(main())


def test_a_template_directory_deleted_and_made_again_is_watched_again(tmp_path: Path) -> None:
    """Templates written into an override directory that was deleted and made again wake
    the daemon, at once and at every later edit."""
    override = tmp_path / "override"
    header = _header_in(override)

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        await asyncio.sleep(0.5)  # the watch is up
        await asyncio.to_thread(shutil.rmtree, override)
        assert await _set_within(wake, 5), "no wake-up for the directory's removal"
        await asyncio.sleep(1.5)
        wake.clear()
        override.mkdir()
        header.write_text("; v2\n")
        assert await _set_within(wake, 5), "no wake-up for the directory made again"
        await asyncio.sleep(1.5)
        wake.clear()
        header.write_text("; v3, longer\n")
        assert await _set_within(wake, 5), "no wake-up for an edit in the directory made again"

    _watch_templates([override], scenario)


def test_a_dangling_symlink_in_the_template_directory_does_not_stop_the_watch(
    tmp_path: Path,
) -> None:
    """A dangling symlink among the templates (the lock file Emacs leaves, .#header.j2)
    does not hide the directory: each later template edit still wakes the daemon."""
    override = tmp_path / "override"
    header = _header_in(override)
    (override / ".#header.j2").symlink_to("root@host.4242:1700000000")

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)  # the watch is up
        wake.clear()
        header.write_text("; v2, longer\n")
        assert await _set_within(wake, 5), "no wake-up for an edit"
        await asyncio.sleep(1.5)
        wake.clear()
        header.write_text("; v3, longer still\n")
        assert await _set_within(wake, 5), "no wake-up for a second edit"

    _watch_templates([override], scenario)


def test_a_template_directory_made_after_the_start_is_watched(tmp_path: Path) -> None:
    """An override directory that did not exist when the watch began wakes the daemon once
    it is made with a template in it."""
    override = tmp_path / "override"

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert not await _set_within(wake, 1.5)
        override.mkdir()
        (override / "header.j2").write_text("; v1\n")
        assert await _set_within(wake, 5), "no wake-up for the new directory"

    _watch_templates([override], scenario)


def test_a_template_edit_made_before_the_watch_began_still_wakes(tmp_path: Path) -> None:
    """A template replaced after the caller took its stamp, before the watch began, wakes
    the daemon."""
    override = tmp_path / "override"
    _header_in(override)
    since = template_stamp([override])
    (override / "header.j2.tmp").write_text("; v2\n")
    os.replace(override / "header.j2.tmp", override / "header.j2")

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "the edit before the watch was missed"

    _watch_templates([override], scenario, since=since)


def test_a_template_edit_in_a_subdirectory_made_before_the_watch_began_still_wakes(
    tmp_path: Path,
) -> None:
    """A template in a subdirectory of the override directory (one an override includes as
    "sub/x.j2"), edited after the caller took its stamp and before the watch began, wakes
    the daemon."""
    override = tmp_path / "override"
    (override / "sub").mkdir(parents=True)
    note = override / "sub" / "note.j2"
    note.write_text("; v1\n")
    since = template_stamp([override])
    note.write_text("; v2, longer\n")

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        assert await _set_within(wake, 5), "the edit before the watch was missed"

    _watch_templates([override], scenario, since=since)


def test_editor_swap_and_backup_files_in_the_template_directory_do_not_wake(
    tmp_path: Path,
) -> None:
    """Files an editor writes beside a template it edits (vim's swap file and write probe,
    Emacs's autosave, lock and backup files), in the directory or a subdirectory, wake
    nothing; the save of the template itself does."""
    override = tmp_path / "override"
    (override / "sub").mkdir(parents=True)
    header = override / "header.j2"
    header.write_text("; v1\n")
    junk = [".header.j2.swp", "header.j2~", "#header.j2#", "4913", "sub/.note.j2.swx"]

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        await asyncio.sleep(1.5)  # the watch is up
        wake.clear()
        for name in junk:
            (override / name).write_text("junk\n")
        (override / ".#header.j2").symlink_to("root@host.4242:1700000000")
        assert not await _set_within(wake, 2.5), "an editor's own file woke the daemon"
        header.write_text("; v2, longer\n")
        assert await _set_within(wake, 5), "no wake-up for the save"

    _watch_templates([override], scenario)


def test_editor_files_leave_the_stamp_of_the_templates_as_it_was(tmp_path: Path) -> None:
    """Swap, backup and lock files beside the templates leave the stamp the daemon takes
    of the template directory unchanged (it wakes for none of them later)."""
    override = tmp_path / "override"
    _header_in(override)
    since = template_stamp([override])
    for name in (".header.j2.swp", "header.j2~", "#header.j2#", "4913"):
        (override / name).write_text("junk\n")
    assert template_stamp([override]) == since


def test_a_template_watch_that_cannot_start_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that fails to start (its directory gone in between) is logged and retried;
    the watcher keeps running and still sees the next edit."""
    import watchfiles

    real_awatch = watchfiles.awatch
    failures = [FileNotFoundError(2, "No path was found.")]

    def flaky_awatch(*paths: Path, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_awatch(*paths, **kwargs)

    monkeypatch.setattr(watchfiles, "awatch", flaky_awatch)
    override = tmp_path / "override"
    override.mkdir()

    async def scenario(wake: asyncio.Event, _stop: asyncio.Event) -> None:
        await asyncio.sleep(2.5)  # failed once, then watching
        assert not failures
        wake.clear()
        (override / "header.j2").write_text("; v1\n")
        assert await _set_within(wake, 5), "no wake-up after the failed start"

    _watch_templates([override], scenario)


def test_the_daemon_renders_template_edits_from_its_start_and_after_a_directory_is_remade(
    tmp_path: Path,
) -> None:
    """A real daemon renders a template replaced the moment it is ready, and one written
    into its override directory after the directory was deleted and made again."""
    override = tmp_path / "override"
    header = _header_in(override)
    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path, extra=[])
    config.write_text(
        config.read_text().replace("[target]\n", f'[target]\ntemplates = "{override}"\n')
    )
    conf = tmp_path / "pjsip_users.conf"

    def first_line() -> str:
        return conf.read_text().split("\n", 1)[0]

    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        (override / "header.tmp").write_text("; v2\n")
        os.replace(override / "header.tmp", header)  # an editor's save
        until(lambda: first_line() == "; v2", 10, "the edit made at start rendered")
        shutil.rmtree(override)
        until(lambda: first_line() != "; v2", 10, "the removal rendered")
        override.mkdir()
        header.write_text("; v3\n")
        until(lambda: first_line() == "; v3", 10, "the directory made again rendered")
        header.write_text("; v4\n")
        until(lambda: first_line() == "; v4", 10, "an edit in the new directory rendered")
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_postgresql_edits_go_live_within_a_second_while_listen_cannot_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While PostgreSQL's LISTEN connection cannot be made (its connects refused, the
    store's own connections fine), the watcher wakes every ``daemon.poll_interval``:
    an edit is applied within about that, not at the 5 s safety-net poll."""
    import psycopg
    from structlog.testing import capture_logs

    from provisioner.accounts import Accounts, Policy
    from provisioner.daemon import wake_sources

    from .dbs import temp_database
    from .faultkit import endpoints
    from .helpers import cheap_argon2, local_daemon

    async def refused(*_args: object, **_kwargs: object) -> NoReturn:
        raise psycopg.OperationalError("connection refused (by the test)")

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refused)  # the listener only
    cheap_argon2(monkeypatch)
    conf = tmp_path / "pjsip_users.conf"

    async def scenario(url: str) -> tuple[float, list[str]]:
        store = seed_store(url, 1)
        daemon = local_daemon(tmp_path, store={"url": url}, daemon={"poll_interval": 0.5})
        daemon.wake_sources = wake_sources(daemon.config)
        loop = asyncio.get_running_loop()
        try:
            with capture_logs() as logs:
                serving = asyncio.ensure_future(daemon.serve())
                try:
                    while not (daemon.health.ready and endpoints(conf)):
                        await asyncio.sleep(0.02)
                    before = len(endpoints(conf))
                    await asyncio.sleep(0.3)  # the listener has failed by now
                    await asyncio.to_thread(
                        Accounts(store, Policy(password_policy=False)).add_user,
                        {
                            "username": "late",
                            "full_name": "Late",
                            "email": "late@example.com",
                            "profile": "agents",
                        },
                    )
                    start = loop.time()
                    while len(endpoints(conf)) == before and loop.time() - start < 10:
                        await asyncio.sleep(0.02)
                    took = loop.time() - start
                finally:
                    daemon.handle_exit()
                    await serving
        finally:
            daemon.engine.dispose()
            store.dispose()
        return took, [e["event"] for e in logs if e["event"].startswith("store.listen")]

    with temp_database("postgresql", tmp_path) as url:
        took, events = asyncio.run(asyncio.wait_for(scenario(url), 60))
    assert "store.listen_failed" in events
    assert "store.listening" not in events
    assert took < 1.5, f"the edit went live after {took:.2f} s"


def test_postgresql_listen_connects_with_a_password_holding_spaces(tmp_path: Path) -> None:
    """A store URL whose password holds a space (percent-encoded in the URL) gets its LISTEN
    connection made, and no log line shows the password."""
    from structlog.testing import capture_logs

    from provisioner.watch import postgres_wakeups

    from .dbs import temp_database

    async def listen(url: str) -> list[MutableMapping[str, Any]]:
        wake, stop = asyncio.Event(), asyncio.Event()
        with capture_logs() as logs:
            source = asyncio.ensure_future(postgres_wakeups(url, wake, stop, poll=0.05))
            try:
                for _ in range(250):
                    if any(e["event"].startswith("store.listen") for e in logs):
                        break
                    await asyncio.sleep(0.02)
            finally:
                stop.set()
                await asyncio.wait_for(source, 5)
        return logs

    with temp_database("postgresql", tmp_path) as url:
        # Trust authentication: the server takes any password, so only its form matters.
        with_password = url.replace("postgres@", "postgres:my%20s3cret+pw@", 1)
        assert with_password != url
        logs = asyncio.run(listen(with_password))
    assert [e["event"] for e in logs if e["event"].startswith("store.listen")][:1] == [
        "store.listening"
    ]
    assert "s3cret" not in repr(logs)


def test_postgresql_listen_that_hears_nothing_is_said_once_and_polled_around(
    tmp_path: Path,
) -> None:
    """A LISTEN connection that does not hear the store's notifications (PgBouncer in
    transaction pooling: here the probe's NOTIFY goes to another channel) is named in one
    warning with its likely cause and fix, told to ``on_deaf``, and the watcher wakes
    every ``poll`` seconds as while it cannot connect; one that hears its probe says it
    listens, and no warning."""
    import psycopg
    from structlog.testing import capture_logs

    from provisioner.watch import listen_conninfo, postgres_wakeups

    from .dbs import temp_database

    told: list[bool] = []

    async def listen(url: str, channel: str) -> tuple[list[MutableMapping[str, Any]], int]:
        async def probe() -> None:
            async with await psycopg.AsyncConnection.connect(
                listen_conninfo(url), autocommit=True
            ) as conn:
                await conn.execute("SELECT pg_notify(%s, 'probe')", (channel,))

        wake, stop = asyncio.Event(), asyncio.Event()
        wakes = 0
        with capture_logs() as logs:
            source = asyncio.ensure_future(
                postgres_wakeups(
                    url, wake, stop, poll=0.05, probe=probe, probe_timeout=0.3, on_deaf=told.append
                )
            )
            try:
                for _ in range(60):
                    await asyncio.sleep(0.02)
                    wakes += wake.is_set()
                    wake.clear()
            finally:
                stop.set()
                await asyncio.wait_for(source, 5)
        return logs, wakes

    with temp_database("postgresql", tmp_path) as url:
        deaf, deaf_wakes = asyncio.run(listen(url, "not_" + NOTIFY_CHANNEL))
        assert told == [True]  # the daemon's health record is told, once per connection
        heard, _ = asyncio.run(listen(url, NOTIFY_CHANNEL))
        assert told == [True, False]
    said = [e for e in deaf if e["event"] == "store.listen_deaf"]
    assert len(said) == 1, deaf
    assert "PgBouncer" in said[0]["cause"]
    assert "session" in said[0]["fix"]
    assert "store.listening" not in [e["event"] for e in deaf]
    assert deaf_wakes >= 10  # polled every 0.05 s for 1.2 s, not only the 5 s safety net
    assert [e["event"] for e in heard if e["event"].startswith("store.listen")] == [
        "store.listening"
    ]


def test_postgresql_listen_stops_within_a_second_while_waiting_for_its_probe(
    tmp_path: Path,
) -> None:
    """A stop request while the LISTEN connection waits for a probe it will not hear ends
    the watcher within about a second, not after the probe's timeout, and says nothing of
    a deaf connection."""
    from structlog.testing import capture_logs

    from provisioner.watch import postgres_wakeups

    from .dbs import temp_database

    async def unheard() -> None:
        """A probe nobody sends."""

    async def listen(url: str) -> tuple[float, list[str]]:
        wake, stop = asyncio.Event(), asyncio.Event()
        with capture_logs() as logs:
            source = asyncio.ensure_future(
                postgres_wakeups(url, wake, stop, poll=0.05, probe=unheard, probe_timeout=30)
            )
            await asyncio.sleep(0.5)
            stop.set()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.wait_for(source, 10)
        return loop.time() - start, [e["event"] for e in logs]

    with temp_database("postgresql", tmp_path) as url:
        took, events = asyncio.run(listen(url))
    assert took < 1.5, f"stopped after {took:.2f} s"
    assert "store.listen_deaf" not in events


def test_postgresql_connections_notice_a_server_host_gone_silent(tmp_path: Path) -> None:
    """The LISTEN connection and the engine's pooled ones have TCP keepalive (10 s idle,
    then every 5 s, 3 probes) and a 30 s user timeout, unless the store URL sets its own:
    a server host gone without a FIN or RST (a half-open connection) ends them within
    about 30 s, not after the kernel's retransmissions (about 15 min) during which LISTEN
    looked alive and woke nobody."""
    import psycopg

    from provisioner.watch import listen_conninfo

    from .dbs import temp_database

    def options(url: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The TCP options of a LISTEN connection and of a pooled connection to ``url``."""
        with psycopg.connect(listen_conninfo(url)) as listen:
            listened = tcp_options(listen.fileno())
        engine = open_engine(url)
        try:
            with engine.connect() as conn:
                pooled = tcp_options(conn.connection.dbapi_connection.fileno())  # type: ignore[union-attr]
        finally:
            engine.dispose()
        return listened, pooled

    with temp_database("postgresql", tmp_path) as url:
        assert "127.0.0.1" in url  # over TCP, not a local socket
        defaults = options(url)
        own = options(f"{url}?keepalives_idle=42&tcp_user_timeout=7000")
    assert defaults == ((1, 10, 5, 3, 30_000),) * 2
    assert own == ((1, 42, 5, 3, 7_000),) * 2


def _add_agent(url: str, username: str) -> None:
    """Add an agent through a connection opened now (on whatever file the path names)."""
    engine = open_engine(url)
    try:
        Accounts(engine, Policy(password_policy=False)).add_user(
            {
                "username": username,
                "full_name": username,
                "email": f"{username}@example.com",
                "profile": "agents",
            }
        )
    finally:
        engine.dispose()


def _copy_sqlite(source: Path, target: Path) -> None:
    """Copy the SQLite database ``source`` into ``target`` with SQLite's online backup."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def _running_past_a_backup(tmp_path: Path, backup: Path) -> Daemon:
    """A daemon over a SQLite store of 10 users backed up to ``backup``, then 3 users
    more (changes the backup never saw) applied: 14 endpoints in the file."""
    url = store_url(tmp_path)
    seed_store(url, 10).dispose()
    _copy_sqlite(tmp_path / "store.db", backup)
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(write_config(tmp_path), tmp_path / "daemon.log").start()
    try:
        for name in ("late0", "late1", "late2"):
            _add_agent(url, name)
        until(lambda: len(endpoints(conf)) == 14, 10, "the edits after the backup applied")
    except BaseException:
        daemon.kill()
        raise
    return daemon


def test_a_store_file_replaced_under_the_daemon_is_read_anew(tmp_path: Path) -> None:
    """A backup moved over the SQLite store while the daemon runs (``mv backup.db
    store.db``) is applied as it stands, and edits made to it afterwards go live, those
    whose change ids the old file had already used too."""
    url, backup, conf = store_url(tmp_path), tmp_path / "backup.db", tmp_path / "pjsip_users.conf"
    daemon = _running_past_a_backup(tmp_path, backup)
    try:
        # Nothing left in the WAL: SQLite would lay the old file's WAL over the new file.
        with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.replace(backup, tmp_path / "store.db")  # the operator's restore
        until(lambda: len(endpoints(conf)) == 11, 10, "the restored file applied")
        _add_agent(url, "restored0")  # a change id the old file used already
        until(lambda: len(endpoints(conf)) == 12, 10, "an edit of the restored file applied")
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_a_backup_restored_into_the_live_store_is_applied_and_followed(tmp_path: Path) -> None:
    """A backup copied into the running daemon's SQLite store (``sqlite3 store.db
    ".restore backup.db"``: the same file, its change ids back below the daemon's cursor)
    is applied as it stands, and edits made to it afterwards go live at once."""
    url, backup, conf = store_url(tmp_path), tmp_path / "backup.db", tmp_path / "pjsip_users.conf"
    daemon = _running_past_a_backup(tmp_path, backup)
    try:
        _copy_sqlite(backup, tmp_path / "store.db")  # the operator's restore
        until(lambda: len(endpoints(conf)) == 11, 10, "the restored store applied")
        _add_agent(url, "restored0")  # a change id the store used before the restore
        until(lambda: len(endpoints(conf)) == 12, 10, "an edit of the restored store applied")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
