"""One daemon per store: a second ``provisioner run`` on the same store is refused.

Two real daemon subprocesses on one store (SQLite, PostgreSQL): the second exits 4
with one line naming the first, and no traceback; the first keeps running and its
health record stays its own; ``run --burst`` beside it still works; once the first
stopped, a new daemon starts.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from .dbs import temp_database
from .faultkit import Daemon, cli_process, seed_store, until, write_config


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
            second.start(wait_ready=False)
            assert second.proc is not None
            code = second.proc.wait(timeout=30)
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
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'provisioner daemon pid %'"
                    )
                ).all()
            assert ended == [(True,)]
            until(lambda: bool(first.logged("daemon.lock_retaken")), 30, "lock retaken")
            assert first.logged("daemon.lock_lost")
            second.start(wait_ready=False)
            assert second.proc is not None
            code = second.proc.wait(timeout=30)
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
        waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
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
