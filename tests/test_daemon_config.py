"""How the daemon takes its settings: at start-up, and again on SIGHUP."""

from __future__ import annotations

import asyncio
import itertools
import socket
import sqlite3
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from provisioner.config import load_config, parse_sets
from provisioner.daemon import Daemon, _needs_restart
from provisioner.store.engine import open_engine

from .helpers import local_config, local_daemon, sighup_refused


def test_cursor_grace_comes_from_the_config(tmp_path: Path) -> None:
    """The change-feed tracker waits daemon.cursor_grace over a gap from the first run on."""
    config = local_config(tmp_path, daemon={"cursor_grace": 600})
    daemon = Daemon.from_config(config, overrides={"daemon": {"cursor_grace": 600}})
    try:
        assert daemon.tracker.grace == 600
        assert daemon.config_overrides == {"daemon": {"cursor_grace": 600}}
    finally:
        daemon.engine.dispose()


def test_restart_needed_names_the_sections_a_sighup_cannot_apply(tmp_path: Path) -> None:
    """A new store or [ami] is reported as needing a restart; other sections are not
    ([[asterisk]] servers are taken up and let go of by the SIGHUP itself)."""
    base = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "target": {"path": str(tmp_path / "pjsip_users.conf")},
    }
    old = load_config(None, env={}, overrides=base)
    elsewhere = load_config(
        None, env={}, overrides={**base, "target": {**base["target"], "shards": 2}}
    )
    moved = load_config(
        None,
        env={},
        overrides={
            **base,
            "store": {"url": f"sqlite:///{tmp_path / 'other.db'}"},
            "ami": {"ping_interval": 7},
        },
    )
    assert _needs_restart(elsewhere, old) == []
    assert _needs_restart(moved, old) == ["store", "ami"]


def test_restart_needed_names_the_daemon_keys_built_once(tmp_path: Path) -> None:
    """A new metrics port or poll interval is reported as needing a restart; a new
    quiescence window is not (the loop reads it each time)."""
    base = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "target": {"path": str(tmp_path / "pjsip_users.conf")},
    }
    old = load_config(None, env={}, overrides=base)
    new = load_config(
        None,
        env={},
        overrides={**base, "daemon": {"metrics_port": 9999, "poll_interval": 2, "quiet": 0.1}},
    )
    assert _needs_restart(new, old) == ["daemon.metrics_port", "daemon.poll_interval"]


def test_a_bad_config_on_sighup_logs_every_problem_at_once(tmp_path: Path) -> None:
    """A SIGHUP re-read of a file with several problems logs them all in one record and keeps
    the old config."""
    path = tmp_path / "provisioner.toml"
    path.write_text(
        f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
        f"[target]\npath = '{tmp_path / 'pjsip_users.conf'}'\n",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    daemon = Daemon.from_config(config, config_path=str(path))
    try:
        with path.open("a", encoding="utf-8") as file:
            file.write("[[asterisk]]\nname = 'bad name!'\nhost = 'h'\nusername = 'u'\n")
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
        (failed,) = [entry for entry in logs if entry["event"] == "config.reload_failed"]
        assert "asterisk.0.name: " in failed["error"]
        assert "asterisk.0.secret: give exactly one of secret and secret_file" in failed["error"]
        assert daemon.config is config
    finally:
        daemon.engine.dispose()


def test_a_task_that_fails_stops_the_daemon_with_an_error(tmp_path: Path) -> None:
    """A wake-up source that dies of an unexpected error is logged at once
    (daemon.task_failed) and stops the daemon with ServiceFailed (exit code 10), instead
    of leaving it running without that source."""
    import pytest

    from provisioner.daemon import WakeSource
    from provisioner.errors import ServiceFailed

    async def broken(wake: asyncio.Event, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("watcher bug")

    daemon = local_daemon(tmp_path)
    daemon.wake_sources = [WakeSource(broken)]
    with capture_logs() as logs, pytest.raises(ServiceFailed, match="watcher bug") as caught:
        asyncio.run(asyncio.wait_for(daemon.serve(), 10))
    assert caught.value.exit_code == 10
    [failed] = [e for e in logs if e["event"] == "daemon.task_failed"]
    assert failed["error"] == "RuntimeError: watcher bug"
    assert any(e["event"] == "daemon.stopped" for e in logs)


def test_a_task_failing_inside_a_task_group_is_reported_by_its_own_error(tmp_path: Path) -> None:
    """A task whose error comes wrapped in an exception group (the AMI side runs its
    links in a task group) is reported, in daemon.task_failed and the exit's message,
    by the error inside, not as "unhandled errors in a TaskGroup"."""
    import pytest

    from provisioner.daemon import WakeSource
    from provisioner.errors import ServiceFailed

    async def fails() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("link bug")

    async def grouped(wake: asyncio.Event, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fails())
            group.create_task(stop.wait())

    daemon = local_daemon(tmp_path)
    daemon.wake_sources = [WakeSource(grouped)]
    with capture_logs() as logs, pytest.raises(ServiceFailed) as caught:
        asyncio.run(asyncio.wait_for(daemon.serve(), 10))
    assert caught.value.message == "stopped: a task failed (RuntimeError: link bug)"
    [failed] = [e for e in logs if e["event"] == "daemon.task_failed"]
    assert failed["error"] == "RuntimeError: link bug"


def _config_file(tmp_path: Path, extra: str = "") -> Path:
    """A config file with the store and target under ``tmp_path``, then ``extra``."""
    path = tmp_path / "provisioner.toml"
    path.write_text(
        f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
        f"[target]\npath = '{tmp_path / 'from-file.conf'}'\n{extra}",
        encoding="utf-8",
    )
    return path


def test_a_sighup_reload_logs_the_file_without_hiding_the_logger(tmp_path: Path) -> None:
    """config.reloaded names the file it read under ``file``; ``source`` stays the module
    that logged it, as in every other event."""
    path = _config_file(tmp_path)
    daemon = Daemon.from_config(load_config(path, env={}), config_path=str(path))
    try:
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
        (reloaded,) = [entry for entry in logs if entry["event"] == "config.reloaded"]
        assert reloaded["source"] == "provisioner.daemon"
        assert reloaded["file"] == str(path)
    finally:
        daemon.engine.dispose()


def test_set_flags_still_apply_over_the_file_after_a_sighup(tmp_path: Path) -> None:
    """The command line's --set flags, kept by the daemon, beat the re-read file on SIGHUP."""
    path = _config_file(tmp_path)
    flag = f"target.path={tmp_path / 'from-flag.conf'}"
    overrides, problems = parse_sets([flag])
    assert problems == []
    config = load_config(path, env={}, sets=[flag])
    daemon = Daemon.from_config(config, config_path=str(path), overrides=overrides)
    try:
        _config_file(tmp_path, "[log]\nlevel = 'debug'\n")
        asyncio.run(daemon._reload_config())
        assert daemon.config.log.level == "debug"
        assert daemon.config.target.path == str(tmp_path / "from-flag.conf")
    finally:
        daemon.engine.dispose()


def test_a_database_error_anywhere_in_a_failure_keeps_its_traceback_out() -> None:
    """A failure holding a database error (as its cause or inside an exception group)
    is logged without its traceback, whose text would quote SQL parameters."""
    from sqlalchemy.exc import OperationalError

    from provisioner.daemon import _holds_db_error

    db = OperationalError("UPDATE users SET sip_md5=%s", {"sip_md5": "d1g3st"}, Exception("x"))
    try:
        try:
            raise db
        except OperationalError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert _holds_db_error(wrapped)
    assert _holds_db_error(ExceptionGroup("tasks", [ValueError("v"), db]))
    assert not _holds_db_error(RuntimeError("plain"))


def test_an_apply_that_failed_on_the_store_runs_again_without_a_wake_up(tmp_path: Path) -> None:
    """An incremental apply that failed because the store was locked runs again after a
    pause (sync.retry), with no edit or poll to wake it, and then succeeds."""
    import sqlite3

    from provisioner.accounts import Accounts, Policy

    db = tmp_path / "store.db"
    # No watcher, no poll: only a retry can run the apply again.
    daemon = local_daemon(tmp_path, store={"busy_timeout": 0.2})
    acc = Accounts(daemon.engine, Policy(password_policy=False))
    acc.add_user({"username": "root", "role": "admin", "full_name": "Root", "email": "r@x.io"})

    async def scenario() -> tuple[bool, bool, list[str]]:
        with capture_logs() as logs:
            serving = asyncio.ensure_future(daemon.serve())
            while not daemon.health.ready:
                await asyncio.sleep(0.02)
            acc.edit_user("root", {"full_name": "Root Again"})
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # the cursor save waits, then fails
            daemon.wake.set()
            while daemon.health.last_sync_ok:
                await asyncio.sleep(0.02)
            failed = not daemon.health.last_sync_ok
            locker.execute("COMMIT")
            locker.close()
            for _ in range(250):
                if daemon.health.last_sync_ok:
                    break
                await asyncio.sleep(0.02)
            recovered = bool(daemon.health.last_sync_ok)
            daemon.handle_exit()
            await serving
        return failed, recovered, [e["event"] for e in logs]

    failed, recovered, events = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert failed
    assert recovered
    assert "sync.retry" in events


def test_a_failing_full_reconcile_backs_off_though_incremental_applies_succeed(
    tmp_path: Path,
) -> None:
    """A full reconcile that keeps failing is retried after 0.5 s, then 1 s, then 2 s:
    the incremental applies that succeed meanwhile (the poll's) do not restart its
    backoff at 0.5 s."""
    from provisioner.daemon import WakeSource
    from provisioner.watch import poll_wakeups

    daemon = local_daemon(tmp_path)
    daemon.wake_sources = [
        WakeSource(lambda wake, stop: poll_wakeups(0.05, wake, stop), timer=True)
    ]
    full = daemon.applier.full
    tried: list[float] = []  # when each full reconcile after the first began

    def disk_gone(*, verify: bool = True) -> object:
        if daemon.health.ready:
            tried.append(time.monotonic())
            raise OSError(5, "Input/output error")
        return full(verify=verify)

    daemon.applier.full = disk_gone  # type: ignore[method-assign,assignment]

    async def scenario() -> None:
        serving = asyncio.ensure_future(daemon.serve())
        while not daemon.health.ready:
            await asyncio.sleep(0.02)
        daemon.templates_changed.set()
        for _ in range(400):
            if len(tried) >= 4:
                break
            await asyncio.sleep(0.02)
        daemon.handle_exit()
        await serving

    asyncio.run(asyncio.wait_for(scenario(), 30))
    pauses = [later - earlier for earlier, later in itertools.pairwise(tried)][:3]
    assert len(pauses) == 3, pauses
    # Each at least its backoff; at most one poll (0.05 s) and a loaded machine later.
    for pause, backoff in zip(pauses, (0.5, 1.0, 2.0), strict=True):
        assert backoff <= pause < backoff + 0.4, pauses


def test_no_apply_retry_fires_after_the_daemon_stopped(tmp_path: Path) -> None:
    """An apply retry pending when the daemon stops is cancelled: it never wakes the
    main loop after the shutdown."""
    daemon = local_daemon(tmp_path)

    def store_gone() -> None:
        raise OSError(5, "Input/output error")

    daemon._incremental = store_gone  # type: ignore[method-assign]

    async def scenario() -> bool:
        serving = asyncio.ensure_future(daemon.serve())
        while not daemon.health.ready:
            await asyncio.sleep(0.02)
        daemon.wake.set()
        while daemon.health.last_sync_ok:
            await asyncio.sleep(0.02)
        daemon.handle_exit()
        await serving
        daemon.tick.clear()
        await asyncio.sleep(1.0)  # past the first retry's 0.5 s
        return daemon.tick.is_set()

    assert not asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_task_spawned_while_the_shutdown_waits_is_ended_with_the_rest(tmp_path: Path) -> None:
    """A task the work still under way starts after the shutdown began waiting (as a
    startup whose reconcile ends after the stop starts its tasks) is awaited or cancelled
    with the rest: the shutdown leaves no task pending, and one spawned later is refused."""
    daemon = local_daemon(tmp_path, daemon={"shutdown_timeout": 0.5})

    async def late_starter() -> None:
        await daemon.ami_stop.wait()  # the shutdown has taken stock of the tasks
        await asyncio.sleep(0.05)
        daemon._spawn(_forever())

    async def scenario() -> list[asyncio.Task[Any]]:
        work = asyncio.create_task(late_starter())
        await asyncio.sleep(0)
        daemon.handle_exit()
        async with asyncio.timeout(30):
            await daemon.shutdown(work)
        daemon._spawn(_forever())  # refused: nothing would end it
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    assert asyncio.run(scenario()) == []


async def _forever() -> None:
    """Wait for what never comes."""
    await asyncio.Event().wait()


def test_a_realtime_daemon_starts_while_the_store_is_locked(tmp_path: Path) -> None:
    """A realtime daemon built while its SQLite store is locked by another process does not
    fail: the realtime tables are created by its first apply, retried until the lock is
    gone, and it then becomes ready."""
    import sqlite3

    from provisioner.store.migrate import upgrade

    config = local_config(tmp_path, store={"busy_timeout": 0.2}, target={"kind": "realtime"})
    engine = open_engine(config.store.url)
    upgrade(engine)
    engine.dispose()
    locker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        daemon = Daemon.from_config(config)
    finally:
        locker.execute("COMMIT")
        locker.close()
    daemon.wake_sources = []

    async def scenario() -> bool:
        locker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        serving = asyncio.ensure_future(daemon.serve())
        await asyncio.sleep(0.8)  # the first reconcile fails, and is retried
        locked_ready = daemon.health.ready
        locker.execute("COMMIT")
        locker.close()
        for _ in range(250):
            if daemon.health.ready:
                break
            await asyncio.sleep(0.02)
        ready = daemon.health.ready
        daemon.handle_exit()
        await serving
        return ready and not locked_ready

    assert asyncio.run(asyncio.wait_for(scenario(), 30))
    with sqlite3.connect(tmp_path / "store.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"ps_endpoints", "ps_auths", "ps_aors"} <= tables


def test_a_restart_is_asked_for_at_each_sighup_until_one_applies_it(tmp_path: Path) -> None:
    """A SIGHUP that finds a new store, [ami] section or metrics port says a restart is
    needed and keeps running with the old ones, so the next SIGHUP says it again."""
    path = tmp_path / "provisioner.toml"
    first = (
        f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
        f"[target]\npath = '{tmp_path / 'pjsip_users.conf'}'\n"
    )
    path.write_text(first, encoding="utf-8")
    config = load_config(path, env={})
    daemon = Daemon.from_config(config, config_path=str(path))
    try:
        path.write_text(
            first.replace("store.db", "other.db")
            + "[ami]\nping_interval = 7\n[daemon]\nmetrics_port = 9999\nquiet = 0.1\n",
            encoding="utf-8",
        )
        said: list[Any] = []
        for _ in range(2):
            with capture_logs() as logs:
                asyncio.run(daemon._reload_config())
            said += [e["settings"] for e in logs if e["event"] == "config.restart_needed"]
        assert said == [["store", "ami", "daemon.metrics_port"]] * 2
        assert daemon.config.store == config.store
        assert daemon.config.ami == config.ami
        assert daemon.config.daemon.metrics_port == config.daemon.metrics_port
        assert daemon.config.daemon.quiet == 0.1  # read by the loop each time: taken
    finally:
        daemon.engine.dispose()


def test_asterisk_added_by_sighup_to_a_daemon_started_without_any_needs_a_restart(
    tmp_path: Path,
) -> None:
    """A daemon started with no [[asterisk]] runs no AMI side, so a SIGHUP adding a server
    says a restart is needed and keeps none; with servers at the start it would not."""
    path = tmp_path / "provisioner.toml"
    first = (
        f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
        f"[target]\npath = '{tmp_path / 'pjsip_users.conf'}'\n"
    )
    path.write_text(first, encoding="utf-8")
    daemon = Daemon.from_config(load_config(path, env={}), config_path=str(path))
    try:
        entry = "[[asterisk]]\nname = 'pbx1'\nhost = 'h'\nusername = 'u'\nsecret = 's'\n"
        path.write_text(first + entry, encoding="utf-8")
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
        said = [e["settings"] for e in logs if e["event"] == "config.restart_needed"]
        assert said == [["asterisk"]]
        assert not daemon.config.asterisk
        assert daemon.pbx is None
    finally:
        daemon.engine.dispose()


def test_a_set_flag_found_bad_on_sighup_is_said_to_come_from_the_command_line(
    tmp_path: Path,
) -> None:
    """A SIGHUP re-read names a --set flag's problem "(from the command line)", as a start does."""
    secret = tmp_path / "pbx1.secret"
    secret.write_text("s3cret\n", encoding="utf-8")
    path = _config_file(tmp_path)
    entry = f'[{{"name": "pbx1", "host": "h", "username": "u", "secret_file": "{secret}"}}]'
    flags = [f"asterisk={entry}"]
    config = load_config(path, env={}, sets=flags)
    daemon = Daemon.from_config(config, config_path=str(path), sets=flags)
    try:
        secret.unlink()
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
        (failed,) = [entry for entry in logs if entry["event"] == "config.reload_failed"]
        assert "asterisk.0.secret_file: cannot read" in failed["error"]
        assert "(from the command line)" in failed["error"]
    finally:
        daemon.engine.dispose()


def test_a_burst_whose_apply_finds_the_pool_exhausted_raises_store_unavailable(
    tmp_path: Path,
) -> None:
    """``run --burst`` whose one apply waits in vain for a pooled connection ends with
    StoreUnavailable (exit code 7, named), not SQLAlchemy's TimeoutError that the command
    line would print as a traceback with exit code 1."""
    import pytest

    from provisioner.errors import StoreUnavailable

    daemon = local_daemon(tmp_path)
    # SQLAlchemy's own pool: wait half a second, not its default 30 s, for a connection.
    daemon.engine.pool._timeout = 0.5  # type: ignore[attr-defined]
    held = []
    try:
        while True:  # every connection the pool may hand out, its overflow included
            try:
                held.append(daemon.engine.connect())
            except Exception:
                break
        with capture_logs() as logs, pytest.raises(StoreUnavailable) as caught:
            asyncio.run(asyncio.wait_for(daemon.serve(burst=True), 30))
    finally:
        for conn in held:
            conn.close()
    assert caught.value.exit_code == 7
    assert "store unavailable" in caught.value.message
    assert any(e["event"] == "daemon.stopped" for e in logs)


def test_a_target_that_cannot_be_written_is_retried_without_a_wake_up(tmp_path: Path) -> None:
    """A first reconcile that cannot write the config file (its directory's name taken by
    a file: an OS error, as a full disk or a read-only mount give) is retried after a
    pause, with no edit or poll to wake it, and writes the file once the directory can be
    made."""
    from provisioner.accounts import Accounts, Policy

    blocker = tmp_path / "out"
    blocker.write_text("not a directory\n")
    conf = blocker / "pjsip_users.conf"
    # No watcher, no poll: only a retry can run the apply again.
    daemon = local_daemon(tmp_path, target={"path": str(conf)})
    acc = Accounts(daemon.engine, Policy(password_policy=False))
    acc.add_user({"username": "root", "role": "admin", "full_name": "Root", "email": "r@x.io"})

    async def scenario() -> tuple[bool, list[str]]:
        with capture_logs() as logs:
            serving = asyncio.ensure_future(daemon.serve())
            while not any(e["event"] == "sync.failed" for e in logs):
                await asyncio.sleep(0.02)
            blocker.unlink()
            for _ in range(250):
                if conf.exists() and daemon.health.ready:
                    break
                await asyncio.sleep(0.02)
            written = conf.exists() and bool(daemon.health.last_sync_ok)
            daemon.handle_exit()
            await serving
        return written, [e["error"] for e in logs if e["event"] == "sync.failed"]

    written, failures = asyncio.run(asyncio.wait_for(scenario(), 30))
    lock = conf.with_name(f".{conf.name}.lock")
    assert failures[0] == f"cannot lock {str(lock)!r}: Not a directory"
    assert written


SCHEMA_HINT = "(is the schema missing or old? run `provisioner db upgrade`)"


def test_a_daemon_on_a_store_never_upgraded_says_so_as_every_command_does(
    tmp_path: Path,
) -> None:
    """The daemon started on a store whose schema was never made logs each failed try as
    'user store unavailable: <the database's words> (is the schema missing or old? run
    `provisioner db upgrade`)', as the other commands say it, and keeps trying (its
    second failed try logged as sync.still_failing, with the same error)."""
    daemon = Daemon.from_config(local_config(tmp_path))
    daemon.wake_sources = []

    async def scenario() -> list[str]:
        with capture_logs() as logs:
            serving = asyncio.ensure_future(daemon.serve())
            while not any(e["event"] == "sync.still_failing" for e in logs):
                await asyncio.sleep(0.02)
            daemon.handle_exit()
            await serving
        failed = ("sync.failed", "sync.still_failing")
        return [e["error"] for e in logs if e["event"] in failed]

    errors = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(errors) == 2, errors
    assert errors[0] == errors[1]
    assert errors[0].startswith("user store unavailable: no such table: ")
    assert errors[0].endswith(SCHEMA_HINT)


def test_run_burst_on_a_store_never_upgraded_exits_7_naming_the_fix(tmp_path: Path) -> None:
    """``run --burst`` on a store whose schema was never made exits 7 with the one line
    every other command reading the store prints, the fix included."""
    from .faultkit import cli_process, write_config

    config = write_config(tmp_path)
    sqlite3.connect(tmp_path / "store.db").close()  # a file, never upgraded
    ran = cli_process(config, "run", "--burst", check=False)
    assert ran.code == 7
    (line,) = [line for line in ran.err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: user store unavailable: no such table: ")
    assert line.endswith(SCHEMA_HINT)


def _switched(tmp_path: Path, before: str, after: str) -> list[MutableMapping[str, Any]]:
    """The ``target.switched`` events of a SIGHUP re-reading the config file from
    ``[target]`` settings ``before`` to ``after`` (the store under ``tmp_path``)."""
    path = tmp_path / "provisioner.toml"
    store = f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
    path.write_text(f"{store}[target]\n{before}", encoding="utf-8")
    daemon = Daemon.from_config(load_config(path, env={}), config_path=str(path))
    try:
        path.write_text(f"{store}[target]\n{after}", encoding="utf-8")
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
    finally:
        daemon.engine.dispose()
    assert any(entry["event"] == "config.reloaded" for entry in logs)
    return [entry for entry in logs if entry["event"] == "target.switched"]


def test_a_sighup_naming_templates_that_render_no_good_file_keeps_the_old_target(
    tmp_path: Path,
) -> None:
    """A SIGHUP naming an override directory whose templates compile but render no file
    Asterisk would load as intended (a ``user.j2`` without the ``user`` macro) is refused
    as a bad configuration is (``config.reload_failed`` naming why): the daemon keeps its
    target and configuration, so edits still go live, instead of failing every apply."""
    overrides = tmp_path / "overrides"
    overrides.mkdir()
    (overrides / "user.j2").write_text("{% macro usr(user) %}{% endmacro %}\n")
    error, _ = sighup_refused(tmp_path, f"templates = '{overrides}'\n")
    assert "templates failed to render (UndefinedError)" in error


@pytest.mark.parametrize("away", ["closed port", "no database file"])
def test_a_sighup_naming_a_realtime_database_that_cannot_be_opened_keeps_the_old_target(
    tmp_path: Path, away: str
) -> None:
    """A SIGHUP switching to a realtime ``target.url`` that cannot be opened (a server
    away, a file that is no database) is refused as a bad configuration is
    (``config.reload_failed`` naming ``target.url`` and the driver's words, not the user
    store): the daemon keeps its target and configuration, so edits still go live,
    instead of taking a target every apply fails on."""
    if away == "closed port":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/asterisk"
    else:
        (tmp_path / "rt.db").write_bytes(b"not a database " * 100)
        url = f"sqlite:///{tmp_path / 'rt.db'}"
    error, logs = sighup_refused(tmp_path, f"kind = 'realtime'\nurl = '{url}'\n")
    assert error.startswith("target.url: cannot open the realtime database"), error
    assert "DatabaseError" in error or "OperationalError" in error
    assert "store unavailable" not in error
    assert "target.switched" not in [entry["event"] for entry in logs]


def test_a_sighup_leaving_a_config_file_behind_warns_naming_it_and_keeps_it(
    tmp_path: Path,
) -> None:
    """A SIGHUP switching a config-file target to realtime, or to another path, logs the
    warning ``target.switched`` naming the old and new target and the files left, which
    stay (Asterisk may still include them); none when no file was left, or the old path
    links to the new file."""
    old = tmp_path / "old.conf"
    shards = tmp_path / "old.d"
    old.write_text("; generated\n", encoding="utf-8")
    shards.mkdir()
    (shard,) = _switched(tmp_path, f"path = '{old}'\nshards = 2\n", "kind = 'realtime'\n")
    assert (shard["log_level"], shard["old_kind"], shard["new_kind"]) == (
        "warning",
        "config",
        "realtime",
    )
    assert (shard["old_where"], shard["left"]) == (str(old), [str(old), str(shards)])
    (moved,) = _switched(tmp_path, f"path = '{old}'\n", f"path = '{tmp_path / 'new.conf'}'\n")
    assert (moved["old_where"], moved["new_where"]) == (str(old), str(tmp_path / "new.conf"))
    assert moved["left"] == [str(old)]
    assert (old.read_text(encoding="utf-8"), shards.is_dir()) == ("; generated\n", True)
    link = tmp_path / "link.conf"
    link.symlink_to(old)
    assert _switched(tmp_path, f"path = '{link}'\n", f"path = '{old}'\n") == []
    old.unlink()
    assert _switched(tmp_path, f"path = '{old}'\n", "kind = 'realtime'\n") == []


def test_a_sighup_switching_from_realtime_warns_that_its_rows_are_left(tmp_path: Path) -> None:
    """A SIGHUP switching a realtime target to a config file logs ``target.switched``
    naming the database whose rows are left, its password hidden."""
    url = "postgresql+psycopg://pbx:s3cret@127.0.0.1:1/asterisk"
    (event,) = _switched(tmp_path, f"kind = 'realtime'\nurl = '{url}'\n", "kind = 'config'\n")
    assert (event["old_kind"], event["new_kind"]) == ("realtime", "config")
    assert event["left"] == ["ps_endpoints, ps_auths, ps_aors rows in "
                             "postgresql+psycopg://pbx:***@127.0.0.1:1/asterisk"]  # fmt: skip
    assert "s3cret" not in str(event)


def _closed_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "store",
    ["postgresql-closed-port", "mariadb-closed-port", "sqlite-directory", "sqlite-not-a-database"],
)
@pytest.mark.parametrize(
    "args",
    [
        ("render",),
        ("render", "--dry-run"),
        ("sync", "--once"),
        ("run", "--burst"),
        ("user", "list"),
        ("status",),
    ],
    ids=" ".join,
)
def test_a_store_that_cannot_be_read_is_the_user_store_unavailable(
    tmp_path: Path, store: str, args: tuple[str, ...]
) -> None:
    """``render``, ``sync --once``, ``run --burst``, ``user list`` and ``status`` on a user
    store that cannot be read exit 7 saying ``user store unavailable:``."""
    from .faultkit import cli, write_config

    path = tmp_path / "store.db"
    if store == "postgresql-closed-port":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/provisioner"
    elif store == "mariadb-closed-port":
        url = f"mysql+pymysql://root@127.0.0.1:{_closed_port()}/provisioner"
    elif store == "sqlite-directory":
        path.mkdir()  # no file SQLite can open (chmod 000 is no bar to root)
        url = f"sqlite:///{path}"
    else:
        path.write_bytes(b"not a database " * 100)
        url = f"sqlite:///{path}"
    ran = cli(write_config(tmp_path, store_url=url), *args, check=False)
    assert ran.code == 7, ran
    (line,) = [line for line in ran.err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: user store unavailable: "), line


@pytest.mark.parametrize(
    "args", [("render",), ("sync", "--once"), ("run", "--burst")], ids=" ".join
)
def test_a_realtime_target_that_cannot_be_reached_is_named_as_the_realtime_database(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A realtime target on another database that is away, the user store readable, exits
    7 naming that database as the daemon does (``realtime database unavailable (target.url
    URL): ...``, its password hidden), not as a bare database error or the user store."""
    from .faultkit import cli, write_config

    port = _closed_port()
    target = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/asterisk"
    config = write_config(tmp_path, kind="realtime")
    cli(config, "db", "upgrade")
    ran = cli(config, "--set", f"target.url={target}", *args, check=False)
    assert ran.code == 7, ran
    (line,) = [line for line in ran.err.splitlines() if line.startswith("error:")]
    shown = f"postgresql+psycopg://postgres:***@127.0.0.1:{port}/asterisk"
    assert line.startswith(
        f"error: realtime database unavailable (target.url {shown}): OperationalError: "
    ), line
    assert "hunter2" not in ran.err + ran.out


def test_blame_names_the_store_first_then_the_realtime_database() -> None:
    """The one rule of whose a database error is: the user store's when it cannot be read,
    else a realtime target's own database's (its password hidden), else nobody's."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from provisioner.errors import RealtimeUnavailable, StoreUnavailable
    from provisioner.store.engine import blame

    exc = OperationalError("SELECT 1", {}, sqlite3.OperationalError("gone\nhint"))
    store = StoreUnavailable("user store unavailable: gone")
    url = "postgresql+psycopg://rt:s3cret@db.example/asterisk"
    assert blame(exc, store, url) is store
    fault = blame(exc, None, url)
    assert isinstance(fault, RealtimeUnavailable)
    assert fault.field == "target.url"
    assert fault.message == (
        "realtime database unavailable (target.url "
        "postgresql+psycopg://rt:***@db.example/asterisk): OperationalError: gone"
    )
    assert blame(exc, None, None) is None


def test_a_realtime_database_away_is_not_said_to_be_the_user_store(tmp_path: Path) -> None:
    """An apply failing on a realtime target's own database (``target.url`` away) while
    the user store reads is logged and recorded as that database's failure, naming its
    URL, not as 'store unavailable', which would send the operator to the user store."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/asterisk"
    daemon = local_daemon(tmp_path, target={"kind": "realtime", "url": url})
    try:
        with capture_logs() as logs:
            asyncio.run(daemon._run(daemon._full))
        (failed,) = [entry for entry in logs if entry["event"] == "sync.failed"]
        assert failed["error"].startswith(
            f"realtime database unavailable (target.url {url}): OperationalError: "
        ), failed
        assert daemon.health.last_error == failed["error"]
    finally:
        daemon.engine.dispose()
