"""Concurrent writers: extension allocation under concurrent adds from separate processes,
on every backend, and two writers of one target (realtime rows, a config file) at once."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from bench.common import seed_store
from provisioner.accounts import Accounts
from provisioner.store.engine import open_engine, reading
from provisioner.store.schema import users

ADDS_PER_PROCESS = 8


def _adder(
    url: str, config: str, prefix: str, barrier: Any, log_path: str
) -> None:  # pragma: no cover - runs in a child process
    """Child process: wait for the other one, then add users through the CLI's main()."""
    for name in [k for k in os.environ if k.startswith("PROVISIONER_")]:
        del os.environ[name]
    from provisioner.cli import main

    failures = 0
    with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        sys.stderr = log
        barrier.wait(timeout=30)
        for i in range(ADDS_PER_PROCESS):
            code = main(
                [
                    "--config",
                    config,
                    "--store-url",
                    url,
                    "--set",
                    "extensions.first=100",
                    "--set",
                    "extensions.last=199",
                    "user",
                    "add",
                    f"{prefix}{i}",
                    "--full-name",
                    f"User {prefix}{i}",
                    "--email",
                    f"{prefix}{i}@example.com",
                    "--profile",
                    "agents",
                ]
            )
            print(f"exit {code}", flush=True)
            failures += code != 0
    os._exit(1 if failures else 0)


def test_concurrent_adds_never_share_an_extension(
    accounts: Accounts, db_url: str, tmp_path: Path
) -> None:
    """Two processes adding users at once all succeed with distinct, lowest-free extensions."""
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    # A fresh interpreter per child: forking this multi-threaded test process (the
    # engine's and pytest's threads) may copy a lock some thread holds, and hang the child
    # (Python 3.12+ warns of it).
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        ctx.Process(target=_adder, args=(db_url, str(config), prefix, barrier, str(log)))
        for prefix, log in zip(("a", "b"), logs, strict=True)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    outputs = [log.read_text(encoding="utf-8") for log in logs]
    assert [p.exitcode for p in procs] == [0, 0], outputs

    users = [u for u in accounts.list_users() if u.username != "root"]
    assert len(users) == 2 * ADDS_PER_PROCESS
    extensions = [u.extension for u in users]
    assert len(set(extensions)) == len(extensions)
    assert sorted(int(e) for e in extensions) == list(range(101, 101 + 2 * ADDS_PER_PROCESS))
    # Each process saw its own adds succeed with the extension the store now holds.
    for output in outputs:
        assert output.count("exit 0") == ADDS_PER_PROCESS
    for u in users:
        assert f"added {u.username} (id {u.id}, extension {u.extension})" in "".join(outputs)


def test_an_open_read_never_makes_a_sqlite_writer_wait(tmp_path: Path) -> None:
    """A transaction opened by ``reading`` takes no lock: a writer commits at once, and the
    reader keeps its snapshot until it ends."""
    engine = open_engine(f"sqlite:///{tmp_path / 'store.db'}", busy_timeout=0.05)
    people = seed_store(engine, 1)
    try:
        with reading(engine) as reader:
            before = reader.execute(select(func.count()).select_from(users)).scalar_one()
            with engine.begin() as writer:  # a lock held by the reader: "database is locked"
                writer.execute(update(users).values(full_name="Renamed"))
            during = reader.execute(select(users.c.full_name)).scalar_one()
        with reading(engine) as reader:
            after = reader.execute(select(users.c.full_name)).scalar_one()
    finally:
        engine.dispose()
    assert (before, during, after) == (1, people[0].full_name, "Renamed")


def test_two_realtime_writers_at_once_are_serialised(db_url: str) -> None:
    """Two writers of the realtime rows at once (the daemon and ``sync --once``, each its
    own connection), the second having read the tables before the first wrote, both end
    without an error, and each row and ownership record is there exactly once."""
    import threading

    from provisioner.targets.asterisk_schema import (
        provisioner_objects,
        ps_aors,
        ps_auths,
        ps_endpoints,
    )
    from provisioner.targets.realtime import RealtimeTarget

    from .test_realtime import make_user, render

    objects = render(*(make_user(str(1000 + i)) for i in range(20)))
    first, second = open_engine(db_url), open_engine(db_url, busy_timeout=30)
    RealtimeTarget(first).create_tables()
    second_read, first_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        def guard(_change: object) -> None:
            second_read.set()
            first_done.wait(10)  # write only once the first has committed

        try:
            RealtimeTarget(second).apply(objects, guard=guard)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=second_writer)

    def first_guard(_change: object) -> None:
        thread.start()
        second_read.wait(3)  # the second reads first, unless it must wait for this one

    try:
        RealtimeTarget(first).apply(objects, guard=first_guard)
        first_done.set()
        thread.join(30)
        assert errors == []
        with first.connect() as conn:
            for table in (ps_endpoints, ps_auths, ps_aors):
                count = conn.execute(select(func.count()).select_from(table)).scalar_one()
                assert count == len(objects), table.name
            owned = conn.execute(select(func.count()).select_from(provisioner_objects))
            assert owned.scalar_one() == 3 * len(objects)
    finally:
        first_done.set()
        first.dispose()
        second.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_a_realtime_writer_held_up_too_long_by_another_is_refused_saying_why(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A realtime writer that waits longer than the bound for another writer's lock (a
    ``sync --once`` suspended in its transaction) gives up with a store error naming the
    other writer, and has written nothing."""
    import threading

    from provisioner.errors import StoreUnavailable
    from provisioner.store import engine as engine_module
    from provisioner.store.engine import exclusive
    from provisioner.targets.asterisk_schema import ps_endpoints
    from provisioner.targets.realtime import WRITER_LOCK, RealtimeTarget

    from .test_realtime import make_user, render

    monkeypatch.setattr(engine_module, "EXCLUSIVE_WAIT", 1)
    holder_engine, writer_engine = open_engine(db_url), open_engine(db_url)
    RealtimeTarget(holder_engine).create_tables()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            RealtimeTarget(writer_engine).apply(render(make_user("1001")))
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    try:
        with holder_engine.connect() as holder, exclusive(holder, WRITER_LOCK):
            thread.start()
            thread.join(20)
            still_waiting = thread.is_alive()
        thread.join(20)
        assert not still_waiting, "the writer still waits for the other one"
        (error,) = errors
        assert isinstance(error, StoreUnavailable)
        assert "another writer" in str(error)
        with holder_engine.connect() as conn:
            assert not conn.execute(select(func.count()).select_from(ps_endpoints)).scalar_one()
    finally:
        holder_engine.dispose()
        writer_engine.dispose()


class _HeldBeforeCommit:
    """A config-file target (one file or shards) that, once its apply has passed the guard
    and before it writes, runs ``before_write`` (another writer's apply, given up to a
    second): a ``sync --once`` slowed down between its check and its write."""

    before_write: Any = None

    def _run_before_write(self) -> None:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()


def _held_targets(path: Path, shards: int) -> Any:
    from provisioner.targets.configfile import ConfigFileTarget
    from provisioner.targets.sharded import ShardedConfigFileTarget

    if not shards:

        class HeldFile(_HeldBeforeCommit, ConfigFileTarget):
            def commit(self, pending: Any, **kwargs: Any) -> Any:
                self._run_before_write()
                return super().commit(pending, **kwargs)

        return HeldFile(path)

    class HeldShards(_HeldBeforeCommit, ShardedConfigFileTarget):
        def _commit(self, layout: Any) -> Any:
            self._run_before_write()
            return super()._commit(layout)

    return HeldShards(path, shards=shards)


@pytest.mark.parametrize("shards", [0, 4])
def test_two_config_file_writers_at_once_are_serialised(tmp_path: Path, shards: int) -> None:
    """A ``sync --once`` (restoring lost files) that read the store before an edit the
    daemon then writes does not replace the daemon's newer file with its older text: the
    daemon waits for it (``store.writer_waits``) and writes after it, so the files end
    holding the edit."""
    import threading

    from structlog.testing import capture_logs

    from provisioner.accounts import Accounts, Policy
    from provisioner.applier import Applier
    from provisioner.pjsip import RenderSettings

    from .faultkit import cheap_hasher, seed_store, store_url

    cheap_hasher()
    engine = seed_store(store_url(tmp_path), 6)
    path = tmp_path / "out" / "pjsip_users.conf"
    daemon = Applier(engine, _held_targets(path, shards), RenderSettings())
    daemon.full()
    accounts = Accounts(engine, Policy(password_policy=False))
    user_id = accounts.get_user("u3").id
    # The files lost (an operator's slip): the `sync --once` run to restore them writes.
    for written in [p for p in (tmp_path / "out").rglob("*") if p.is_file()]:
        written.unlink()
    cli_target = _held_targets(path, shards)
    errors: list[BaseException] = []
    daemon_done = threading.Event()

    def daemon_applies_the_edit() -> None:
        try:
            daemon.users_changed([user_id])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            daemon_done.set()

    thread = threading.Thread(target=daemon_applies_the_edit)

    def edit_and_let_the_daemon_write() -> None:
        accounts.edit_user("u3", {"full_name": "Renamed Later"})
        thread.start()
        daemon_done.wait(1.5)  # the daemon writes now, unless it must wait for this writer

    cli_target.before_write = edit_and_let_the_daemon_write
    try:
        with capture_logs() as logs:
            Applier(engine, cli_target, RenderSettings()).full(fresh=True)
            thread.join(30)
        assert errors == []
        files = [path, *sorted((tmp_path / "out" / "pjsip_users.d").glob("*.conf"))]
        text = b"".join(f.read_bytes() for f in files if f.exists())
        assert b'"Renamed Later"' in text
        assert any(e["event"] == "store.writer_waits" for e in logs)
    finally:
        thread.join(30)
        engine.dispose()


#: A child process holding the ``flock`` of the file ``argv[1]`` until its stdin closes.
_HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "ab") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("shards", [0, 4])
def test_a_config_file_writer_held_up_too_long_by_another_is_refused_saying_why(
    tmp_path: Path, shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config-file writer that waits longer than the bound for another writer's lock (a
    ``sync --once`` suspended mid-write) gives up with a target error naming the lock
    file, and has written nothing."""
    import subprocess

    from provisioner.errors import TargetWriteFailed
    from provisioner.store import engine as engine_module
    from provisioner.targets.files import lock_file

    from .test_realtime import make_user, render

    monkeypatch.setattr(engine_module, "EXCLUSIVE_WAIT", 1)
    path = tmp_path / "out" / "pjsip_users.conf"
    path.parent.mkdir()
    lock = lock_file(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        target = _held_targets(path, shards)
        with pytest.raises(TargetWriteFailed, match="another writer held the lock") as raised:
            target.apply(render(make_user("1001")))
        assert str(lock) in str(raised.value)
        assert sorted(p.name for p in path.parent.iterdir()) == [lock.name]
    finally:
        holder.communicate(timeout=10)  # its stdin closed: it ends, the lock with it
