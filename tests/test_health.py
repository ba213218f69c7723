"""The daemon's health record and what ``provisioner check`` reads from it."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

from provisioner.health import Health, read_health, write_health

from .faultkit import Daemon, cli, seed_store, store_url, write_config


def _healthy(**asterisk: dict[str, object]) -> Health:
    return Health(ready=True, last_sync_ok=True, asterisk=dict(asterisk))


def test_a_fresh_ready_record_has_no_problem(tmp_path: Path) -> None:
    """A ready daemon whose last sync worked, written just now and read back, is healthy."""
    write_health(tmp_path, _healthy(pbx1={"connected": True, "store_failures": 0}))
    health = read_health(tmp_path)
    assert health is not None
    assert health.problems(health.updated_at, max_age=60.0) == []


def test_registration_writes_refused_in_a_row_make_it_unhealthy() -> None:
    """Three registration writes refused in a row are an outage, named with its server;
    fewer are a blip."""
    blip = _healthy(pbx1={"store_failures": 2})
    outage = _healthy(pbx1={"store_failures": 0}, pbx2={"store_failures": 5})
    assert blip.problems(blip.updated_at, max_age=60.0) == []
    (problem,) = outage.problems(outage.updated_at, max_age=60.0)
    assert problem.startswith("pbx2: the store refused the last 5 registration writes")


def test_an_old_record_means_a_stuck_or_stopped_daemon() -> None:
    """A record not rewritten for longer than max_age says so."""
    health = _healthy()
    assert health.problems(health.updated_at + 120, max_age=60.0) == [
        "record is 120 s old (daemon stuck or stopped?)"
    ]


def test_check_fails_at_once_for_a_daemon_that_stopped(tmp_path: Path) -> None:
    """After the daemon stops on SIGTERM, 'provisioner check' fails its daemon line at once
    instead of calling the last record healthy until it is 60 s old."""
    seed_store(store_url(tmp_path), 2).dispose()
    config = write_config(tmp_path)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        assert cli(config, "check").code == 0
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    result = cli(config, "check", check=False)
    assert result.code == 1
    (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
    assert line.startswith("FAIL  daemon: stopped")


def test_a_deaf_listen_is_noted_on_the_check_daemon_line_which_still_passes(
    tmp_path: Path,
) -> None:
    """A daemon whose store LISTEN hears no NOTIFY (edits found by polling, still within
    ``poll_interval``) is healthy, and check's daemon line says the LISTEN is deaf; a
    stopped daemon's line says only that it stopped."""
    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path)
    record = _healthy()
    record.listen_deaf = True
    assert record.problems(record.updated_at, max_age=60.0) == []
    write_health(tmp_path / "state", record)
    assert read_health(tmp_path / "state") == record
    result = cli(config, "check", check=False)
    (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
    assert line.startswith(f"ok    daemon: pid {record.pid}, healthy; the store's LISTEN hears no")
    assert "store.listen_deaf" in line
    record.stopped_at = record.updated_at
    assert record.notes() == []


def test_a_stopped_record_names_only_that() -> None:
    """A record marked stopped says so, whatever its age, and nothing else."""
    health = _healthy()
    health.stopped_at = health.updated_at = 1000.0
    assert health.problems(5000.0, max_age=60.0) == [
        f"stopped: pid {health.pid} shut down 4000 s ago"
    ]


def test_check_fails_its_daemon_line_for_an_unreadable_record(tmp_path: Path) -> None:
    """A health record that is not a JSON object of a record's fields fails the daemon
    check with one line saying so, instead of ending 'provisioner check' with a traceback."""
    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path)
    record = tmp_path / "state" / "health.json"
    record.parent.mkdir()
    for body in [
        "",
        "{",
        "[1]",
        '{"ready": true, "updated_at": "soon"}',
        '{"pid": 1, "proc_start": null, "asterisk": {"pbx1": {"store_failures": null}}}',
        '{"pid": 1, "proc_start": null, "asterisk": {"pbx1": {"store_failures": "3"}}}',
    ]:
        record.write_text(body)
        result = cli(config, "check", check=False)
        assert result.code == 1, body
        (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
        assert line.startswith("FAIL  daemon: health record unreadable"), (body, line)


def test_a_record_with_fields_this_version_does_not_know_is_read(tmp_path: Path) -> None:
    """Fields a record has that this version does not know are left out; the rest is read."""
    write_health(tmp_path, _healthy())
    path = tmp_path / "health.json"
    path.write_text(path.read_text().replace('{"pid"', '{"from_a_later_version": 1, "pid"'))
    health = read_health(tmp_path)
    assert health is not None
    assert health.problems(health.updated_at, max_age=60.0) == []


def test_check_fails_at_once_for_a_daemon_that_was_killed(tmp_path: Path) -> None:
    """After the daemon is killed (SIGKILL: no last record), 'provisioner check' on the same
    host fails its daemon line at once, naming the pid that is gone, instead of calling the
    fresh record healthy for up to 60 s."""
    seed_store(store_url(tmp_path), 2).dispose()
    config = write_config(tmp_path)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        assert cli(config, "check").code == 0
        assert daemon.proc is not None
        pid = daemon.proc.pid
    finally:
        daemon.kill()
    result = cli(config, "check", check=False)
    assert result.code == 1
    (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
    assert line.startswith(f"FAIL  daemon: pid {pid} is not running"), line


def test_a_record_from_another_host_is_not_judged_by_its_pid() -> None:
    """The pid of a record written on another host says nothing here: it is not looked up."""
    health = _healthy()
    health.host, health.pid = "elsewhere.invalid", 2**22 + 1
    assert health.problems(health.updated_at, max_age=60.0) == []


def test_check_creates_no_store_where_there_is_none(tmp_path: Path) -> None:
    """``provisioner check`` against a SQLite store that does not exist fails its store
    line and leaves no file or directory behind (a check has no side effects)."""
    from .helpers import make_cli

    store = tmp_path / "var" / "store.db"
    cli = make_cli(f"sqlite:///{store}", tmp_path, f'[target]\npath = "{tmp_path / "p.conf"}"\n')
    result = cli("check")
    assert result.code == 1
    assert f"FAIL  store: no database at {store}: run 'provisioner db upgrade'" in result.out
    assert not store.parent.exists()


def test_a_record_whose_pid_now_names_another_process_is_not_running(tmp_path: Path) -> None:
    """A record whose pid was reused on this host by another process (one started at
    another moment than the daemon that wrote it) reads as a daemon no longer running."""
    import subprocess
    import sys
    import time

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # Written by this process, then "reused": the record names the sleeper's pid.
        write_health(tmp_path, Health(pid=sleeper.pid, ready=True, last_sync_ok=True))
        health = read_health(tmp_path)
        assert health is not None
        problems = health.problems(time.time(), max_age=60.0)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert problems == [f"pid {sleeper.pid} is not running (it ended without a last record)"]


def test_a_stopping_daemon_leaves_the_record_of_a_daemon_started_after_it(
    tmp_path: Path,
) -> None:
    """The last record of a daemon stopping while a newer one (another pid, started later)
    runs on the same state directory leaves the newer one's record in place."""
    import asyncio
    import os
    import time

    from .helpers import local_daemon

    state = tmp_path / "state"
    old = local_daemon(tmp_path)
    newer = Health(pid=os.getpid() + 1, started_at=time.time() + 1, ready=True)

    async def scenario() -> None:
        serving = asyncio.ensure_future(old.serve())
        while not old.health.ready:
            await asyncio.sleep(0.02)
        write_health(state, newer)  # the newer daemon started meanwhile
        old.handle_exit()
        await serving

    asyncio.run(asyncio.wait_for(scenario(), 30))
    record = read_health(state)
    assert record is not None
    assert (record.pid, record.stopped_at) == (newer.pid, None)


def test_a_running_daemon_takes_its_record_back_from_a_later_run_that_stopped(
    tmp_path: Path,
) -> None:
    """Once a run started after the daemon on the same state directory (``run --burst``
    beside the service) has stopped and left its last record, the daemon's next write
    replaces that record, so ``check`` does not report the running daemon as stopped."""
    import asyncio
    import os
    import time

    from .helpers import local_daemon

    state = tmp_path / "state"
    daemon = local_daemon(tmp_path)

    async def scenario() -> Health | None:
        serving = asyncio.ensure_future(daemon.serve())
        while not daemon.health.ready:
            await asyncio.sleep(0.02)
        later = Health(pid=os.getpid() + 1, started_at=time.time() + 1)
        later.stopped_at = time.time() + 2
        write_health(state, later)  # the burst's last record
        daemon._write_health()  # the daemon's next heartbeat
        record = read_health(state)
        daemon.handle_exit()
        await serving
        return record

    record = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert record is not None
    assert (record.pid, record.stopped_at) == (os.getpid(), None)
    assert record.problems(time.time(), 60) == []


def test_the_record_is_readable_by_its_group(tmp_path: Path) -> None:
    """The health record is written mode 0640 (mkstemp's 0600 would keep a monitoring
    user of the daemon's group, running ``provisioner check``, from reading it)."""
    write_health(tmp_path, _healthy())
    assert stat.S_IMODE((tmp_path / "health.json").stat().st_mode) == 0o640


def test_a_symbolic_link_at_the_records_lock_is_never_followed(tmp_path: Path) -> None:
    """A symbolic link planted at the record's lock (``.health.lock``) is not followed: no
    file is made where it leads; the write fails as an OS error (which the daemon logs as
    ``health.write_failed``), and no record is written."""
    import pytest

    victim = tmp_path / "elsewhere" / "nologin"
    victim.parent.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / ".health.lock").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        write_health(state, _healthy())
    assert not victim.exists()
    assert not (state / "health.json").exists()


def test_check_passes_a_realtime_target_whose_tables_the_first_write_makes(
    tmp_path: Path,
) -> None:
    """A realtime target whose tables do not exist yet passes its check line, saying the
    first write makes them (sync and run do)."""
    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path, kind="realtime")
    result = cli(config, "check", check=False)
    (line,) = [line for line in result.out.splitlines() if "target:" in line]
    assert line.startswith("ok    target: realtime tables"), line
    assert "the first write makes them" in line


def test_check_fails_realtime_tables_lacking_a_column_the_mapping_writes(
    tmp_path: Path,
) -> None:
    """Realtime tables an older Asterisk made, without ps_auths.password_digest, fail the
    check under auth_type userpass (every apply would fail), naming the column and the
    way out, and pass under md5, which does not need it."""
    from sqlalchemy import text

    from provisioner.store.engine import open_engine
    from provisioner.targets.realtime import RealtimeTarget

    seed_store(store_url(tmp_path), 1).dispose()
    engine = open_engine(store_url(tmp_path))
    RealtimeTarget(engine).create_tables()
    with engine.begin() as conn:
        for column in ("password_digest", "supported_algorithms_uas", "supported_algorithms_uac"):
            conn.execute(text(f"ALTER TABLE ps_auths DROP COLUMN {column}"))
    engine.dispose()
    config = write_config(tmp_path, kind="realtime")
    lines = {}
    for auth_type in ("userpass", "md5"):
        result = cli(config, "--set", f"target.auth_type={auth_type}", "check", check=False)
        (lines[auth_type],) = [ln for ln in result.out.splitlines() if "target:" in ln]
    assert lines["userpass"].startswith("FAIL  target: realtime tables lack "), lines
    assert "ps_auths.password_digest" in lines["userpass"]
    assert "auth_type" in lines["userpass"]
    assert lines["md5"].startswith("ok    target: realtime tables present"), lines


def _target_line(tmp_path: Path, realtime_url: str) -> str:
    """The target line of ``check`` on a seeded SQLite store with a realtime target there."""
    from .helpers import make_cli

    text = f'[target]\nkind = "realtime"\nurl = "{realtime_url}"\n'
    result = make_cli(store_url(tmp_path), tmp_path, text)("check")
    (line,) = [line for line in result.out.splitlines() if "target:" in line]
    return line


def test_check_passes_a_realtime_sqlite_file_the_first_write_makes_and_makes_none(
    tmp_path: Path,
) -> None:
    """A realtime ``target.url`` naming a SQLite file that does not exist, under a writable
    directory, passes the target line saying the first write makes it (sync and run do, and
    its directories), and the check makes neither the file nor its directory."""
    seed_store(store_url(tmp_path), 1).dispose()
    target = tmp_path / "rt" / "asterisk.db"
    assert _target_line(tmp_path, f"sqlite:///{target}") == (
        f"ok    target: no realtime database at {target} yet: the first write makes it"
        f" (directory {tmp_path} writable)"
    )
    assert not (tmp_path / "rt").exists()


def test_check_fails_a_realtime_sqlite_file_the_first_write_cannot_make(tmp_path: Path) -> None:
    """A realtime SQLite file that does not exist under a path a file is in the way of fails
    the target line naming what is in the way, and nothing is made."""
    seed_store(store_url(tmp_path), 1).dispose()
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "rt" / "asterisk.db"
    assert _target_line(tmp_path, f"sqlite:///{target}") == (
        f"FAIL  target: no realtime database at {target}, and the first write cannot make it:"
        f" {tmp_path / 'file'} is not a directory"
    )


def test_check_of_a_realtime_target_in_a_missing_store_says_to_upgrade(tmp_path: Path) -> None:
    """A realtime target in the user store's database (no ``target.url``) whose SQLite file
    does not exist fails the target line naming the file and ``db upgrade``, and nothing is
    made."""
    from .helpers import make_cli

    store = tmp_path / "var" / "store.db"
    result = make_cli(f"sqlite:///{store}", tmp_path, '[target]\nkind = "realtime"\n')("check")
    (line,) = [line for line in result.out.splitlines() if "target:" in line]
    assert line == (
        f"FAIL  target: no realtime database at {store} (the user store's):"
        " run 'provisioner db upgrade'"
    )
    assert not store.parent.exists()


def test_check_of_an_unreachable_store_says_why_on_one_line(tmp_path: Path) -> None:
    """``provisioner check`` of a PostgreSQL store nothing listens for prints one failed
    store line (the driver's first line of why), and every line of its output is a check's
    line, exit 1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed on the way out: nothing listens there
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/store"
    result = cli(write_config(tmp_path, store_url=url), "check", check=False)
    assert result.code == 1
    lines = result.out.splitlines()
    assert all(line.startswith(("ok    ", "FAIL  ")) for line in lines), lines
    (store,) = [line for line in lines if line.startswith("FAIL  store: ")]
    assert "Connection refused" in store


def test_check_says_so_on_its_daemon_line_when_no_daemon_wrote_a_record(tmp_path: Path) -> None:
    """'provisioner check' where no daemon has written a health record (never run with this
    state_dir) prints a daemon line saying so, and does not fail for it."""
    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path)
    result = cli(config, "check", check=False)
    assert result.code == 0, result
    (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
    assert line == (
        f"ok    daemon: no health record in {tmp_path / 'state'}: "
        "no daemon has run with this state_dir (nothing to check)"
    )


def test_check_of_a_store_with_no_schema_says_so_in_words(tmp_path: Path) -> None:
    """'provisioner check' on an empty database fails its store line saying it has no schema
    yet and what to run, not "schema at None"."""
    from .helpers import make_cli

    store = tmp_path / "store.db"
    store.touch()
    cli = make_cli(f"sqlite:///{store}", tmp_path, f'[target]\npath = "{tmp_path / "p.conf"}"\n')
    result = cli("check")
    assert result.code == 1
    assert "FAIL  store: no schema yet: run 'provisioner db upgrade'" in result.out.splitlines()


def test_check_of_an_unreachable_realtime_database_says_why(tmp_path: Path) -> None:
    """'provisioner check' whose realtime database refuses the connection fails its target
    line with the driver's first line (as the store line does), not only an error type."""
    from .helpers import make_cli

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seed_store(store_url(tmp_path), 1).dispose()
    realtime = f"postgresql+psycopg://app:pw@127.0.0.1:{port}/asterisk"
    text = f'[target]\nkind = "realtime"\nurl = "{realtime}"\n'
    result = make_cli(store_url(tmp_path), tmp_path, text)("check")
    assert result.code == 1
    (line,) = [line for line in result.out.splitlines() if "target:" in line]
    assert line.startswith("FAIL  target: cannot open realtime database: OperationalError: "), line
    assert "Connection refused" in line


def test_check_says_so_on_an_asterisk_line_when_no_server_is_configured(tmp_path: Path) -> None:
    """'provisioner check' with no [[asterisk]] server prints an asterisk line saying none is
    configured (Asterisk is then never told of a change), and does not fail for it."""
    seed_store(store_url(tmp_path), 1).dispose()
    result = cli(write_config(tmp_path), "check", check=False)
    assert result.code == 0, result
    (line,) = [line for line in result.out.splitlines() if line[6:].startswith("asterisk")]
    assert line == (
        "ok    asterisk: no [[asterisk]] server configured "
        "(no login to check; no Asterisk is told of changes)"
    )


def test_a_failed_full_reconcile_stays_unhealthy_while_polls_find_nothing_new(
    tmp_path: Path,
) -> None:
    """A full reconcile that failed (an override template printing an undefined name) keeps
    the record unhealthy while the safety-net poll's applies find no change, until a full
    reconcile succeeds again (the template fixed), after which those applies keep it healthy."""
    import asyncio
    import time

    from provisioner.accounts import Accounts, Policy
    from provisioner.daemon import WakeSource
    from provisioner.watch import poll_wakeups

    from .helpers import local_daemon

    overrides = tmp_path / "templates"
    overrides.mkdir()
    daemon = local_daemon(tmp_path, target={"templates": str(overrides)})
    daemon.wake_sources = [
        WakeSource(lambda wake, stop: poll_wakeups(0.05, wake, stop), timer=True)
    ]
    acc = Accounts(daemon.engine, Policy(password_policy=False))
    acc.add_user({"username": "root", "role": "admin", "full_name": "Root", "email": "r@x.io"})
    state = tmp_path / "state"

    def problems() -> list[str]:
        record = read_health(state)
        assert record is not None
        return record.problems(time.time(), 60)

    async def polled(applies: int = 3) -> list[str]:
        """The record's problems once the poll has run ``applies`` more applies."""
        seen = 0
        while seen < applies:
            at = daemon.health.last_sync_at
            while daemon.health.last_sync_at == at:
                await asyncio.sleep(0.01)
            seen += 1
        daemon._write_health()  # what the next heartbeat would write
        return problems()

    async def scenario() -> tuple[list[str], list[str]]:
        serving = asyncio.ensure_future(daemon.serve())
        while not daemon.health.ready:
            await asyncio.sleep(0.02)
        (overrides / "header.j2").write_text("{{ no_such_name }}\n")
        daemon.templates_changed.set()
        while daemon.health.last_sync_ok:
            await asyncio.sleep(0.02)
        broken = await polled()
        (overrides / "header.j2").unlink()
        daemon.templates_changed.set()
        while not daemon.health.last_sync_ok:
            await asyncio.sleep(0.02)
        fixed = await polled()
        daemon.handle_exit()
        await serving
        return broken, fixed

    broken, fixed = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert broken == [
        "last sync failed: templates failed to render (UndefinedError) at header.j2 line 1"
    ]
    assert fixed == []


def test_a_burst_beside_the_running_daemon_leaves_its_record(tmp_path: Path) -> None:
    """``run --burst`` beside the service applies what is pending but leaves the running
    daemon's record as it is, so ``check`` run right after it still reports the daemon
    healthy rather than stopped (its own last record would say so until the daemon's next
    heartbeat, 15 s on)."""
    from .faultkit import cli_process

    seed_store(store_url(tmp_path), 2).dispose()
    config = write_config(tmp_path)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        cli_process(config, "run", "--burst")
        result = cli(config, "check", check=False)
        record = read_health(tmp_path / "state")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert record is not None
    assert daemon.proc is not None
    assert (record.pid, record.stopped_at) == (daemon.proc.pid, None)
    (line,) = [line for line in result.out.splitlines() if "daemon:" in line]
    assert line.startswith("ok    daemon:"), result.out


def test_check_fails_a_sqlite_store_others_may_read(tmp_path: Path) -> None:
    """'provisioner check' fails its store line for a SQLite store file others may read (one
    made before stores were made 0640: it holds the SIP digests), naming the file and the
    chmod that fixes it; once fixed, the line passes."""
    seed_store(store_url(tmp_path), 1).dispose()
    store = tmp_path / "store.db"
    store.chmod(0o644)
    config = write_config(tmp_path)
    result = cli(config, "check", check=False)
    assert result.code == 1
    assert (
        f"FAIL  store: {store} is readable by others, and it holds the SIP digests "
        "(with one, anyone registers as that phone): chmod 640 it, and its -wal and -shm "
        "files"
    ) in result.out.splitlines()
    store.chmod(0o640)
    fixed = cli(config, "check", check=False)
    assert "ok    store: " in fixed.out, fixed.out
