"""One daemon per store: a second ``provisioner run`` on the same store is refused.

Two real daemon subprocesses on one store (SQLite, PostgreSQL): the second exits 4
with one line naming the first, and no traceback; the first keeps running and its
health record stays its own; ``run --burst`` beside it still works; once the first
stopped, a new daemon starts.  The lock lost in a network cut the server has not
noticed (a :class:`~.faultkit.CutProxy` between them) is waited for while the daemon's
own old session still holds it, and refused when another's took it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import subprocess
import zlib
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from provisioner import daemon as daemon_module
from provisioner.errors import ConflictError
from provisioner.store import runlock
from provisioner.store.engine import exclusive, mysql_lock_name, open_engine, pg_lock_key
from provisioner.store.runlock import LOCK_NAME, DaemonLock, PreviousSessionHolds, holder_name

from .dbs import temp_database
from .faultkit import CutProxy, Daemon, cli_process, seed_store, until, write_config
from .helpers import local_daemon


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_a_second_daemon_on_one_store_is_refused(backend: str, tmp_path: Path) -> None:
    """A second daemon started on a store a daemon runs on exits 4 naming the first
    (no traceback), and the first keeps running, healthy; a burst beside it still works."""
    with temp_database(backend, tmp_path) as url:
        engine = seed_store(url, 3)
        config = write_config(tmp_path, store_url=url)
        first = Daemon(config, tmp_path / "first.log").start()
        second = Daemon(config, tmp_path / "second.log")
        try:
            code = second.run_to_exit()
            assert first.proc is not None
            assert first.alive
            assert first.ready()  # its health record, not the refused one's
            burst = cli_process(config, "run", "--burst", check=False)
            assert first.alive
            assert first.stop() == 0
            third = Daemon(config, tmp_path / "third.log").start()
            assert third.stop() == 0
        finally:
            first.kill()
            second.kill()
            engine.dispose()
    log = (tmp_path / "second.log").read_text()
    assert code == 4, log
    assert "another provisioner daemon" in log
    if backend == "mariadb":  # GET_LOCK names the holder's connection, not its process
        assert "the database connection id" in log
    else:
        assert f"provisioner daemon pid {first.proc.pid} on {socket.gethostname()}" in log
    assert "Traceback" not in log
    assert burst.code == 0, burst


def test_a_daemon_whose_lock_connection_is_killed_takes_the_lock_again(tmp_path: Path) -> None:
    """On PostgreSQL, the lock's session ended by the server (pg_terminate_backend) is
    noticed and the lock taken again on a new connection: a second daemon is still refused."""
    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        config = write_config(tmp_path, store_url=url)
        first = Daemon(config, tmp_path / "first.log").start()
        second = Daemon(config, tmp_path / "second.log")
        try:
            with engine.begin() as conn:
                ended = conn.execute(
                    text(
                        # This test's database only: other tests' daemons share the server.
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'provisioner daemon pid %'"
                        " AND datname = current_database()"
                    )
                ).all()
            assert ended == [(True,)]
            until(lambda: bool(first.logged("daemon.lock_retaken")), 30, "lock retaken")
            assert first.logged("daemon.lock_lost")
            code = second.run_to_exit()
            assert first.alive
            assert first.stop() == 0
        finally:
            first.kill()
            second.kill()
            engine.dispose()
    assert code == 4


def test_sync_once_writes_the_rows_of_an_edit_committed_while_it_waited_for_the_lock(
    tmp_path: Path,
) -> None:
    """A ``sync --once`` kept waiting for the writers' lock while a user is edited
    writes that user's rows as edited, not as it found them before the wait."""
    from provisioner.accounts import Accounts, Policy
    from provisioner.store.engine import exclusive
    from provisioner.targets.realtime import WRITER_LOCK

    from .faultkit import PROVISIONER, cli, env

    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        config = write_config(tmp_path, store_url=url, kind="realtime")
        cli(config, "sync", "--once")
        waiting = text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        try:
            with engine.connect() as holder, exclusive(holder, WRITER_LOCK):
                sync = subprocess.Popen(
                    [PROVISIONER, "--config", str(config), "sync", "--once"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env(),
                )
                with engine.connect() as conn:
                    until(lambda: bool(conn.execute(waiting).scalar()), 30, "sync waits")
                Accounts(engine, Policy(password_policy=False)).edit_user("u0", {"nat": "yes"})
            out, _ = sync.communicate(timeout=60)
            assert sync.returncode == 0, out
            assert "would be updated 0" in cli(config, "render", "--dry-run").out
        finally:
            engine.dispose()


@contextmanager
def _through_proxy(backend: str, tmp_path: Path) -> Iterator[tuple[str, Engine, CutProxy]]:
    """A new database of ``backend``: its URL through a :class:`CutProxy`, an engine on
    it straight (for looking at, and ending, sessions), and the proxy."""
    with temp_database(backend, tmp_path) as url:
        direct = make_url(url)
        admin = create_engine(direct)
        try:
            with CutProxy(direct.port or 0) as proxy:
                proxied = direct.set(port=proxy.port).render_as_string(hide_password=False)
                yield proxied, admin, proxy
        finally:
            admin.dispose()


def _holder(admin: Engine) -> int | None:
    """The session holding the daemon's lock (a PostgreSQL backend pid, a MariaDB
    connection id), or None."""
    with admin.connect() as conn:
        if admin.dialect.name == "postgresql":
            query = text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = 0 AND objid = :key AND objsubid = 1"
                " AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            )
            return conn.execute(query, {"key": zlib.crc32(LOCK_NAME.encode())}).scalar()
        query = text("SELECT IS_USED_LOCK(CONCAT(:name, ':', MD5(DATABASE())))")
        return conn.execute(query, {"name": LOCK_NAME[:24]}).scalar()


def _end_session(admin: Engine, session: int) -> None:
    """End the server session ``session`` (as an administrator would), and wait until
    the lock it held is free."""
    with admin.connect() as conn:
        if admin.dialect.name == "postgresql":
            assert conn.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": session}
            ).scalar()
        else:
            conn.execute(text("KILL :id"), {"id": session})
    until(lambda: _holder(admin) is None, 30, "the ended session's lock freed")


def _cut_lock(lock: DaemonLock, admin: Engine, proxy: CutProxy) -> int:
    """Take ``lock``, cut its connection where the server does not notice, and let the
    lock see it lost; the session still holding the lock on the server is returned."""
    lock.take()
    session = _holder(admin)
    assert session is not None
    proxy.cut()
    assert not lock.check()
    assert _holder(admin) == session  # the server's session lives on, holding the lock
    return session


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_lock_still_held_by_our_cut_session_is_waited_for(backend: str, tmp_path: Path) -> None:
    """A lock still held by this daemon's own session of before a network cut the server
    has not noticed makes ``retake`` wait (no ConflictError), and taken once it ended."""
    with _through_proxy(backend, tmp_path) as (url, admin, proxy):
        engine = open_engine(url)
        lock = DaemonLock(engine, url)
        try:
            old = _cut_lock(lock, admin, proxy)
            for _ in range(2):  # each LOCK_CHECK alike while the old session lives
                with pytest.raises(PreviousSessionHolds, match="previous session") as waits:
                    lock.retake()
                assert not isinstance(waits.value, ConflictError)
                assert not lock.check()
                assert _holder(admin) == old
            _end_session(admin, old)
            lock.retake()
            assert lock.check()
            new = _holder(admin)
            assert new not in (None, old)
            other = DaemonLock(admin, url)  # the lock is really this daemon's again
            with pytest.raises(ConflictError, match="another provisioner daemon"):
                other.take()
        finally:
            lock.release()
            engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_lock_another_daemon_took_after_our_cut_is_refused(
    backend: str, tmp_path: Path
) -> None:
    """A lock another daemon took once this daemon's cut session ended is refused to
    ``retake`` (ConflictError), even when that daemon runs in this very process."""
    with _through_proxy(backend, tmp_path) as (url, admin, proxy):
        engine = open_engine(url)
        lock = DaemonLock(engine, url)
        other = DaemonLock(admin, url)
        try:
            _end_session(admin, _cut_lock(lock, admin, proxy))
            other.take()
            taken = _holder(admin)
            with pytest.raises(ConflictError, match="another provisioner daemon"):
                lock.retake()
            assert not lock.check()
            assert _holder(admin) == taken
        finally:
            other.release()
            lock.release()
            engine.dispose()


def test_a_daemon_waits_for_the_lock_its_cut_session_still_holds(tmp_path: Path) -> None:
    """On PostgreSQL, a daemon whose lock connection was cut without the server noticing
    runs on, waiting while its old session holds the lock, and takes it once it ended."""
    with _through_proxy("postgresql", tmp_path) as (url, admin, proxy):
        seed_store(url, 2).dispose()
        config = write_config(tmp_path, store_url=url)
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            old = _holder(admin)
            assert old is not None
            proxy.cut()

            def waits() -> bool:
                events = daemon.logged("daemon.lock_waits")
                return any("previous session" in e.get("error", "") for e in events)

            # ~10 s on a quiet machine (the cut is found by the lock check's timeout);
            # 30 s was once too short with the whole suite and two builds beside it.
            until(lambda: waits() or not daemon.alive, 90, "the daemon waits for its old session")
            assert daemon.alive, daemon.log.read_text()
            assert daemon.logged("daemon.lock_lost")
            assert _holder(admin) == old
            _end_session(admin, old)
            until(lambda: bool(daemon.logged("daemon.lock_retaken")), 30, "lock retaken")
            assert _holder(admin) not in (None, old)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    assert "Traceback" not in daemon.log.read_text()


def test_a_postgresql_lock_key_above_2_31_is_found_in_pg_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon lock key of 2**31 or more (pg_lock_key is an unsigned CRC-32) shows in
    pg_locks as classid 0 and objid the key, where a refused daemon finds its holder."""
    key = pg_lock_key("x0")
    assert 2**31 <= key < 2**32
    monkeypatch.setattr(runlock, "_PG_KEY", key)
    with temp_database("postgresql", tmp_path) as url:
        engine = open_engine(url)
        first, second = DaemonLock(engine, url), DaemonLock(engine, url)
        try:
            first.take()
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT classid, objid, objsubid FROM pg_locks"
                        " WHERE locktype = 'advisory' AND granted AND database ="
                        " (SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                ).all()
            assert rows == [(0, key, 1)]
            with pytest.raises(ConflictError, match=re.escape(f"({holder_name()})")):
                second.take()
        finally:
            first.release()
            engine.dispose()


def test_the_mariadb_lock_names_stay_those_of_earlier_versions(tmp_path: Path) -> None:
    """On MariaDB, the writers' lock and the daemon's are named by a name's first 24
    characters, ':' and the MD5 of the database's name, as every earlier version did."""
    with temp_database("mariadb", tmp_path) as url:
        engine = open_engine(url)
        database = make_url(url).database
        assert database is not None
        suffix = ":" + hashlib.md5(database.encode()).hexdigest()
        name = "provisioner.writers.of.one.store"
        used = text("SELECT IS_USED_LOCK(:name)")
        lock = DaemonLock(engine, url)
        try:
            with engine.connect() as conn:
                assert conn.execute(select(mysql_lock_name(name))).scalar() == name[:24] + suffix
                conn.rollback()
                with exclusive(conn, name):
                    me = conn.execute(select(func.connection_id())).scalar()
                    with engine.connect() as other:
                        assert other.execute(used, {"name": name[:24] + suffix}).scalar() == me
            lock.take()
            with engine.connect() as conn:
                assert conn.execute(used, {"name": LOCK_NAME[:24] + suffix}).scalar() is not None
        finally:
            lock.release()
            engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_only_a_lock_on_a_connection_is_watched(backend: str, tmp_path: Path) -> None:
    """The daemon watches its lock of the store only where a lost connection can lose it
    (PostgreSQL, MariaDB): a SQLite file lock, never lost, is not watched."""
    on_a_connection = backend != "sqlite"
    with temp_database(backend, tmp_path) as url:
        daemon = local_daemon(tmp_path, store={"url": url})

        async def tasks_after_taking_the_lock() -> list[str]:
            await daemon._take_lock()
            names = [getattr(task.get_coro(), "__qualname__", "") for task in daemon._tasks]
            daemon.stop.set()  # the watch, if any, ends at once
            await asyncio.wait_for(asyncio.gather(*daemon._tasks), 10)
            return names

        try:
            names = asyncio.run(tasks_after_taking_the_lock())
            assert daemon._lock is not None
            assert daemon._lock.check()
            assert daemon._lock.can_be_lost is on_a_connection
            assert DaemonLock(daemon.engine, url).can_be_lost is on_a_connection
        finally:
            if daemon._lock is not None:
                daemon._lock.release()
            daemon.engine.dispose()
    assert names == (["Daemon._keep_lock"] if on_a_connection else [])


def test_a_sqlite_store_in_memory_has_no_lock_to_lose() -> None:
    """A SQLite store in memory has no daemon lock, so none that can be lost."""
    engine = open_engine("sqlite://")
    lock = DaemonLock(engine, "sqlite://")
    try:
        lock.take()
        assert lock.check()
        assert not lock.can_be_lost
    finally:
        lock.release()
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_lock_whose_holder_ends_as_it_is_refused_is_taken(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock refused while its holder stops, the holder gone by the time the refused
    daemon looks who held it, is taken (it is free), not refused as held."""
    looker = "_pg_holder" if backend == "postgresql" else "_mysql_holders"
    real = getattr(runlock, looker)
    with temp_database(backend, tmp_path) as url:
        engine = open_engine(url)
        first, second = DaemonLock(engine, url), DaemonLock(engine, url)

        def holder_stops_meanwhile(*args: object) -> object:
            first.release()
            until(lambda: _holder(engine) is None, 30, "the stopped holder's lock freed")
            return real(*args)

        try:
            first.take()
            monkeypatch.setattr(runlock, looker, holder_stops_meanwhile)
            second.take()
            assert second.check()
            assert _holder(engine) is not None
        finally:
            second.release()
            first.release()
            engine.dispose()


def test_a_long_wait_for_the_lock_is_logged_once_then_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the lock cannot be taken again (the daemon's old session still holds it),
    daemon.lock_waits is logged at the first try only; the later tries are counted in
    daemon.lock_still_waits warnings at the 2nd, 4th, 8th... (debug lines between), and
    daemon.lock_retaken says how many tries it took."""
    monkeypatch.setattr(daemon_module, "LOCK_CHECK", 0.02)
    with _through_proxy("postgresql", tmp_path) as (url, admin, proxy):
        daemon = local_daemon(tmp_path, store={"url": url})
        lock = DaemonLock(daemon.engine, url)

        async def scenario() -> list[MutableMapping[str, Any]]:
            with capture_logs() as logs:
                old = _cut_lock(lock, admin, proxy)
                keeper = asyncio.create_task(daemon._keep_lock(lock))
                while sum(e["event"] == "daemon.lock_still_waits" for e in logs) < 3:
                    await asyncio.sleep(0.02)
                # Not _end_session, which waits to see the lock free: the keeper, trying
                # every 20 ms, may take it again before that poll sees it.
                await asyncio.to_thread(_terminate, admin, old)
                while not any(e["event"] == "daemon.lock_retaken" for e in logs):
                    await asyncio.sleep(0.02)
                daemon.stop.set()
                await keeper
            return logs

        try:
            logs = asyncio.run(asyncio.wait_for(scenario(), 60))
        finally:
            lock.release()
            daemon.engine.dispose()
    waits = [e for e in logs if e["event"] == "daemon.lock_waits"]
    assert len(waits) == 1, waits
    still = [e for e in logs if e["event"] == "daemon.lock_still_waits"]
    assert [e["tries"] for e in still[:3]] == [2, 4, 8]
    assert {e["log_level"] for e in still} == {"warning"}
    retaken = [e for e in logs if e["event"] == "daemon.lock_retaken"]
    assert retaken[0]["after_tries"] >= 8


def _terminate(admin: Engine, session: int) -> None:
    """End the PostgreSQL backend ``session`` (as an administrator would)."""
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
