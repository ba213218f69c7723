"""Service hygiene: the unit's sandbox, systemd's notify protocol, SIGTERM under load.

The daemon runs as a subprocess with a fake ``NOTIFY_SOCKET`` (a datagram socket this test
binds): READY=1 comes only after the first reconcile, WATCHDOG=1 repeats at half of
``WATCHDOG_USEC``, STOPPING=1 comes on SIGTERM.  Under a stream of edits SIGTERM drains
and the daemon exits 0 within ``daemon.shutdown_timeout``.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from provisioner.accounts import Accounts, Policy
from provisioner.health import read_health

from .faultkit import Daemon, cli, endpoints, seed_store, store_url, until, write_config

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "provisioner.service"


def test_unit_exposure_is_at_most_2() -> None:
    """systemd-analyze rates the shipped unit's exposure at 2.0 or better."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    ran = subprocess.run(
        [tool, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", ran.stdout)
    assert found, ran.stdout[-500:] + ran.stderr
    assert float(found.group(1)) <= 2.0


def test_unit_needs_no_directory_but_its_state_directory() -> None:
    """Every ``ReadWritePaths`` entry of the shipped unit but its state directory is
    optional (``-``): systemd fails a start (226/NAMESPACE) on one that does not exist,
    such as a config-file target's directory on a host provisioning realtime rows."""
    entries = [
        path
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith("ReadWritePaths=")
        for path in line.removeprefix("ReadWritePaths=").split()
    ]
    assert "/var/lib/provisioner" in entries
    others = [path for path in entries if path != "/var/lib/provisioner"]
    assert others, "the target file's directory is writable too"
    assert all(path.startswith("-") for path in others), others


class NotifySocket:
    """A datagram socket standing in for systemd's; keeps each message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _notified_daemon(
    config: Path, tmp_path: Path, notify: NotifySocket, watchdog_usec: str | None = None
) -> Daemon:
    """A daemon (not started) logging to ``daemon.log`` that notifies ``notify``, with
    ``WATCHDOG_USEC`` set when ``watchdog_usec`` is given."""
    extra_env = {"NOTIFY_SOCKET": str(notify.path)}
    if watchdog_usec is not None:
        extra_env["WATCHDOG_USEC"] = watchdog_usec
    return Daemon(config, tmp_path / "daemon.log", extra_env=extra_env)


def _health_problems(state_dir: Path) -> list[str]:
    """The problems the health record under ``state_dir`` states now (it must exist)."""
    health = read_health(state_dir)
    assert health is not None
    return health.problems(time.time(), 60)


def _assert_pings_stop(notify: NotifySocket, stuck_at: float, what: str) -> None:
    """Wait 2.5 s, then check that no WATCHDOG=1 came later than 1.5 s after ``stuck_at``
    (when ``what`` got stuck)."""
    time.sleep(2.5)
    late = [t for t in notify.times("WATCHDOG") if t > stuck_at + 1.5]
    assert late == [], f"{len(late)} pings after {what} was stuck"


def _release_and_recover(
    locker: Connection, notify: NotifySocket, state: Path, healthy_within: float
) -> None:
    """Release ``locker``'s lock, then wait (5 s at most) for a WATCHDOG=1 sent after the
    release and (``healthy_within`` seconds at most) for a health record with no problem."""
    locker.rollback()
    released_at = time.monotonic()
    until(lambda: any(t > released_at for t in notify.times("WATCHDOG")), 5, "pings resume")
    until(lambda: _health_problems(state) == [], healthy_within, "a healthy record")


def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    """READY=1 arrives once the first reconcile wrote the file, WATCHDOG=1 repeats every
    ~0.25 s (WATCHDOG_USEC=500000), STOPPING=1 on SIGTERM, then exit 0."""
    seed_store(store_url(tmp_path), 30).dispose()
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(config, tmp_path, notify, "500000")
    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(notify.times("READY")), 20, "READY=1")
        # The reconcile came first: the file already holds everyone when READY is sent.
        assert len(endpoints(conf)) == 31
        ready_at = notify.times("READY")[0]
        time.sleep(1.6)
        pings = [t for t in notify.times("WATCHDOG") if t >= ready_at - 0.5]
        assert len(pings) >= 5, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.5, gaps
        assert daemon.stop() == 0
        until(lambda: bool(notify.times("STOPPING")), 2, "STOPPING=1")
        assert len(notify.times("READY")) == 1
    finally:
        daemon.kill()
        notify.close()


@pytest.mark.parametrize("usec", ["0", "30s"])
def test_a_watchdog_usec_that_is_no_positive_number_leaves_the_watchdog_off(
    tmp_path: Path, usec: str
) -> None:
    """WATCHDOG_USEC of 0 or not a number turns the watchdog off, as sd_watchdog_enabled
    reads it: the daemon starts, sends READY=1 and no WATCHDOG=1, and stops with exit 0."""
    seed_store(store_url(tmp_path), 3).dispose()
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(write_config(tmp_path), tmp_path, notify, usec)
    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(notify.times("READY")) or not daemon.alive, 20, "READY=1")
        assert daemon.alive, daemon.log.read_text()
        time.sleep(0.5)
        assert notify.times("WATCHDOG") == []
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_sigterm_under_a_stream_of_edits_drains_in_time(tmp_path: Path) -> None:
    """SIGTERM while edits keep coming: exit 0 within shutdown_timeout, no traceback, and a
    restart converges the file to the store."""
    engine = seed_store(store_url(tmp_path), 20)
    config = write_config(tmp_path)  # shutdown_timeout = 5
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    acc = Accounts(engine, Policy(password_policy=False))
    stop = threading.Event()
    edits = [0]

    def writer() -> None:
        nat = ("yes", "no")
        while not stop.is_set():
            acc.edit_user(f"u{edits[0] % 20}", {"nat": nat[edits[0] % 2]})
            edits[0] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # A count of edits, not a time: on a loaded machine 1.5 s once held only 50.
        until(lambda: edits[0] > 50, 30, "a stream of edits under way")
        assert daemon.proc is not None
        code, took = daemon.timed_stop(timeout=10)
    finally:
        stop.set()
        thread.join()
        daemon.kill()
    assert code == 0
    assert took < 5.0, f"shutdown took {took:.2f} s"
    assert edits[0] > 50
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log
    assert daemon.logged("daemon.stopped")

    again = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: len(endpoints(conf)) == 21, 10, "converged")
        assert again.stop() == 0
    finally:
        again.kill()
        engine.dispose()

    assert "would be updated 0" in cli(config, "render", "--dry-run").out


def test_sigterm_while_an_apply_waits_on_a_store_lock_exits_in_time(tmp_path: Path) -> None:
    """SIGTERM while the apply in progress waits on a PostgreSQL lock nobody releases:
    the daemon exits within shutdown_timeout (the stuck call is left behind), logging
    daemon.shutdown_timeout."""
    from .dbs import temp_database

    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        config = write_config(tmp_path, store_url=url, extra=["shutdown_timeout = 1"])
        config.write_text(config.read_text().replace("shutdown_timeout = 5\n", ""))
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        locker = engine.connect()
        try:
            _stick_an_apply_on_the_cursor(engine, locker, tmp_path / "pjsip_users.conf")
            time.sleep(0.3)
            assert daemon.alive
            code, took = daemon.timed_stop(timeout=20)
        finally:
            daemon.kill()
            locker.rollback()
            locker.close()
            engine.dispose()
    assert code == 0
    assert took < 4.0, f"shutdown took {took:.2f} s"
    assert daemon.logged("daemon.shutdown_timeout")
    assert daemon.logged("daemon.stopped")


def test_a_second_sigterm_during_the_drain_ends_it_at_once(tmp_path: Path) -> None:
    """A second SIGTERM while the daemon drains an apply stuck on a PostgreSQL lock (with
    a 30 s shutdown_timeout) cancels what is left at once: exit 0 within about a second,
    logging daemon.shutdown_forced and daemon.stopped."""
    import subprocess

    from .dbs import temp_database

    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        config = write_config(tmp_path, store_url=url, extra=["shutdown_timeout = 30"])
        config.write_text(config.read_text().replace("shutdown_timeout = 5\n", ""))
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        locker = engine.connect()
        try:
            _stick_an_apply_on_the_cursor(engine, locker, tmp_path / "pjsip_users.conf")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.alive, "the first SIGTERM drains"
            again = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                code = daemon.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - again
        finally:
            daemon.kill()
            locker.rollback()
            locker.close()
            engine.dispose()
    assert code == 0, f"still draining {took:.1f} s after the second SIGTERM"
    assert took < 2.0, f"exit {took:.2f} s after the second SIGTERM"
    assert daemon.logged("daemon.shutdown_forced")
    assert daemon.logged("daemon.stopped")


def test_an_apply_stuck_on_a_store_lock_starves_the_watchdog_and_fails_the_health_check(
    tmp_path: Path,
) -> None:
    """An apply waiting on a PostgreSQL lock nobody releases for longer than
    daemon.stuck_after: WATCHDOG=1 is no longer sent (systemd restarts the daemon), the
    health record says the apply is stuck, and daemon.apply_stuck is logged; once the lock
    is released the apply ends and the pings resume."""
    from .dbs import temp_database

    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        config = write_config(tmp_path, store_url=url, extra=["stuck_after = 1"])
        notify = NotifySocket(tmp_path / "notify")
        daemon = _notified_daemon(config, tmp_path, notify, "200000")
        locker = engine.connect()
        state = tmp_path / "state"
        try:
            daemon.start()
            _stick_an_apply_on_the_cursor(engine, locker, tmp_path / "pjsip_users.conf")
            edited_at = time.monotonic()
            _assert_pings_stop(notify, edited_at, "the apply")
            problems = _health_problems(state)
            assert any("stuck" in p for p in problems), problems
            assert daemon.logged("daemon.apply_stuck")
            _release_and_recover(locker, notify, state, healthy_within=5)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
            locker.rollback()
            locker.close()
            notify.close()
            engine.dispose()


def _stick_an_apply_on_the_cursor(engine: Engine, locker: Connection, conf: Path) -> None:
    """Lock ``daemon_state`` from ``locker``, then edit user u0: the daemon's apply writes
    ``conf``, then waits on the lock for ever (its cursor save, after each apply); return
    once the edit is in ``conf``."""
    locker.execute(text("LOCK TABLE daemon_state IN ACCESS EXCLUSIVE MODE"))
    Accounts(engine, Policy(password_policy=False)).edit_user("u0", {"nat": "yes"})
    until(lambda: "rtp_symmetric=yes" in conf.read_text(), 10, "the edit applied")


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its ``SigCgt`` mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(mask & (1 << (sig - 1)))


def _signal_while_starting(daemon: Daemon, sig: signal.Signals, after: list[float]) -> None:
    """Start ``daemon`` and send it ``sig`` at each of ``after`` seconds past the moment
    its console script deferred the signals (it catches SIGTERM, which Python alone never
    does; Python's own SIGINT handler is there earlier, and on a loaded machine a signal
    sent 0.15 s after that could still meet the default action): while it imports, reads
    its configuration and opens the store, before its event loop runs."""
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    until(lambda: not daemon.alive or _catches(pid, signal.SIGTERM), 10, "signals deferred")
    up = time.monotonic()
    for at in after:
        time.sleep(max(0.0, up + at - time.monotonic()))
        if daemon.alive:
            daemon.proc.send_signal(sig)


def test_a_sighup_while_the_daemon_starts_is_a_reload_once_it_is_up(tmp_path: Path) -> None:
    """SIGHUPs that arrive while the daemon is still starting (``systemctl reload`` or a
    ``kill -HUP`` right after the start) do not kill it: it comes up, READY=1, and then
    re-reads its configuration (config.reloaded)."""
    seed_store(store_url(tmp_path), 3).dispose()
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(write_config(tmp_path), tmp_path, notify)
    try:
        _signal_while_starting(daemon, signal.SIGHUP, [0.15, 0.3, 0.5, 0.8])
        until(lambda: bool(notify.times("READY")) or not daemon.alive, 20, "READY=1")
        assert daemon.alive, f"exit {daemon.proc.returncode if daemon.proc else None}"
        until(lambda: bool(daemon.logged("config.reloaded")), 5, "the reload")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_a_sighup_while_a_daemon_with_a_bad_config_starts_leaves_its_exit_2(
    tmp_path: Path,
) -> None:
    """A daemon whose configuration is invalid exits 2 (which the unit does not restart),
    even when a SIGHUP came while it started: the signal noted then does not turn the exit
    into a death by SIGHUP."""
    config = write_config(tmp_path, extra=["poll_interval = -1"])
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        _signal_while_starting(daemon, signal.SIGHUP, [0.15])
        assert daemon.proc is not None
        code = daemon.proc.wait(timeout=20)
    finally:
        daemon.kill()
    assert code == 2, daemon.log.read_text()[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_daemon_starts_stops_it_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT while the daemon is still starting ends it as a stop after the
    start would: exit 0, daemon.stopped logged, no traceback."""
    seed_store(store_url(tmp_path), 3).dispose()
    daemon = Daemon(write_config(tmp_path), tmp_path / "daemon.log")
    try:
        _signal_while_starting(daemon, sig, [0.15])
        assert daemon.proc is not None
        code = daemon.proc.wait(timeout=20)
    finally:
        daemon.kill()
    assert code == 0, daemon.log.read_text()[-2000:]
    assert daemon.logged("daemon.stopped")
    assert "Traceback" not in daemon.log.read_text()


def test_a_daemon_stopped_before_its_first_reconcile_ends_never_says_ready(
    tmp_path: Path,
) -> None:
    """SIGTERM while the first reconcile cannot reach the store (its PostgreSQL database is
    missing): STOPPING=1, and no READY=1 after it, no daemon.ready, no record saying ready;
    the exit is 0."""
    from .dbs import PG_ADMIN

    url = PG_ADMIN.rstrip("/") + "/prov_test_no_such_database"
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(write_config(tmp_path, store_url=url), tmp_path, notify)
    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(daemon.logged("sync.failed")), 20, "the first reconcile failing")
        assert daemon.stop() == 0
        until(lambda: bool(notify.times("STOPPING")), 2, "STOPPING=1")
        time.sleep(0.2)
    finally:
        daemon.kill()
        notify.close()
    assert notify.times("READY") == []
    assert daemon.logged("daemon.ready") == []
    record = json.loads(daemon.health_path.read_text())
    assert record["ready"] is False
    assert record["stopped_at"] is not None


def test_sighup_is_announced_as_a_reload_to_systemd(tmp_path: Path) -> None:
    """A SIGHUP sends RELOADING=1 (with MONOTONIC_USEC) and, once the configuration is
    re-read, READY=1 again, so ``systemctl reload`` waits for the reload and sees it end."""
    seed_store(store_url(tmp_path), 3).dispose()
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(write_config(tmp_path), tmp_path, notify)
    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(notify.times("READY")), 20, "READY=1")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: len(notify.times("READY")) == 2, 5, "READY=1 after the reload")
        reloading = notify.times("RELOADING")
        assert len(reloading) == 1
        assert notify.times("READY")[0] < reloading[0] <= notify.times("READY")[1]
        usec = [m["MONOTONIC_USEC"] for _t, m in notify.messages if "RELOADING" in m]
        assert usec[0].isdigit()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_a_configuration_refused_on_sighup_is_said_in_systemds_status(tmp_path: Path) -> None:
    """A SIGHUP with an invalid file still ends the reload (READY=1), with a STATUS that
    says the file was refused, why, and that the previous configuration runs on; a SIGHUP
    once the file is mended sets it back to ``provisioning``."""
    seed_store(store_url(tmp_path), 3).dispose()
    notify = NotifySocket(tmp_path / "notify")
    config = write_config(tmp_path)
    daemon = _notified_daemon(config, tmp_path, notify)

    def statuses() -> list[str]:
        return [m["STATUS"] for _t, m in list(notify.messages) if "READY" in m and "STATUS" in m]

    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(notify.times("READY")), 20, "READY=1")
        assert daemon.proc is not None
        write_config(tmp_path, extra=["poll_interval = -1"])
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: len(statuses()) == 2, 5, "READY=1 after the refused reload")
        assert statuses()[1] == (
            "configuration refused, the previous one runs on: "
            "daemon.poll_interval: Input should be greater than 0"
        )
        write_config(tmp_path)
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: len(statuses()) == 3, 5, "READY=1 after the mended reload")
        assert statuses()[2] == "provisioning"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_the_units_reload_validates_the_file_before_it_signals() -> None:
    """The unit's ExecReload first runs ``check --config-only`` with ExecStart's program and
    configuration file (an invalid file fails ``systemctl reload``, and is never sent), then
    sends SIGHUP."""
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    start = next(line for line in lines if line.startswith("ExecStart=")).split()
    reload = [line.removeprefix("ExecReload=").split() for line in lines if "ExecReload=" in line]
    assert start[0].removeprefix("ExecStart=") == reload[0][0]
    assert start[1:3] == reload[0][1:3] == ["--config", "/etc/provisioner/provisioner.toml"]
    assert reload[0][3:] == ["check", "--config-only"]
    assert reload[1] == ["/bin/kill", "-HUP", "$MAINPID"]
    assert len(reload) == 2


def test_check_config_only_validates_the_file_and_opens_nothing(tmp_path: Path) -> None:
    """``check --config-only`` prints one ok line and exits 0 for a valid file, even with its
    store unreachable (nothing is opened); an invalid one gets a FAIL line per problem, each
    naming its field, and exit 1."""
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, store_url=f"postgresql+psycopg://u@127.0.0.1:{port}/db")
    ran = cli(config, "check", "--config-only")
    assert ran.out.splitlines() == [f"ok    config: {config}"]
    write_config(tmp_path, extra=["poll_interval = -1", "stuck_after = -2"])
    ran = cli(config, "check", "--config-only", check=False)
    assert ran.code == 1
    assert ran.out.splitlines() == [
        "FAIL  config: daemon.poll_interval: Input should be greater than 0",
        "FAIL  config: daemon.stuck_after: Input should be greater than or equal to 0",
    ]


class _TargetBrokenAfterStart:
    """A target whose applies after the first raise an unexpected error (a bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.applies = 0

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.plan(*args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        self.applies += 1
        if self.applies > 1:
            raise RuntimeError("target bug")
        return self.inner.apply(*args, **kwargs)


def test_an_unexpected_error_in_the_main_loop_stops_the_daemon_with_exit_code_10(
    tmp_path: Path,
) -> None:
    """An apply of the main loop that dies of an unexpected error is logged
    (daemon.task_failed) and stops the daemon with ServiceFailed (exit code 10), as a
    failed task does, not with the bare error (exit 1 and a traceback)."""
    import asyncio

    from structlog.testing import capture_logs

    from provisioner.daemon import WakeSource
    from provisioner.errors import ServiceFailed

    from .helpers import local_daemon

    daemon = local_daemon(tmp_path)
    daemon.applier.target = _TargetBrokenAfterStart(daemon.applier.target)  # type: ignore[assignment]

    async def templates_edited(wake: asyncio.Event, stop: asyncio.Event) -> None:
        daemon.templates_changed.set()  # a full reconcile: its apply fails
        await stop.wait()

    daemon.wake_sources = [WakeSource(templates_edited)]
    with capture_logs() as logs, pytest.raises(ServiceFailed, match="target bug") as caught:
        asyncio.run(asyncio.wait_for(daemon.serve(), 10))
    assert caught.value.exit_code == 10
    [failed] = [e for e in logs if e["event"] == "daemon.task_failed"]
    assert failed["error"] == "RuntimeError: target bug"
    assert any(e["event"] == "daemon.stopped" for e in logs)


def test_a_registration_write_stuck_on_a_store_lock_starves_the_watchdog_and_fails_the_check(
    tmp_path: Path,
) -> None:
    """A registration write waiting on a PostgreSQL lock nobody releases for longer than
    daemon.stuck_after is treated as a stuck apply: WATCHDOG=1 is no longer sent, the
    health record says so and registration.write_stuck is logged; once the lock is
    released the write ends, the pings resume and the record is healthy again."""
    import asyncio

    from .amipeer import FakeAsterisk
    from .dbs import temp_database

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_peer(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    peer = FakeAsterisk()
    on_peer(peer.start())
    with temp_database("postgresql", tmp_path) as url:
        engine = seed_store(url, 2)
        asterisk = [
            "stuck_after = 1",
            "[[asterisk]]",
            'name = "pbx1"',
            'host = "127.0.0.1"',
            f"port = {peer.port}",
            'username = "provisioner"',
            'secret = "lab-secret"',
        ]
        config = write_config(tmp_path, store_url=url, extra=asterisk)
        notify = NotifySocket(tmp_path / "notify")
        daemon = _notified_daemon(config, tmp_path, notify, "200000")
        locker = engine.connect()
        state = tmp_path / "state"
        try:
            daemon.start()
            until(lambda: bool(daemon.logged("registration.snapshot")), 10, "the snapshot")
            locker.execute(text("LOCK TABLE registration_summary IN ACCESS EXCLUSIVE MODE"))
            on_peer(peer.send_recorded("Event: ContactStatus\r\n", "NonQualified"))
            sent_at = time.monotonic()
            _assert_pings_stop(notify, sent_at, "the write")
            until(
                lambda: any("stuck" in p for p in _health_problems(state)),
                20,
                "the record says stuck",
            )
            assert daemon.logged("registration.write_stuck")
            _release_and_recover(locker, notify, state, healthy_within=20)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
            locker.rollback()
            locker.close()
            notify.close()
            engine.dispose()
            on_peer(peer.stop())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def test_a_separate_realtime_database_failing_is_not_logged_as_the_store(tmp_path: Path) -> None:
    """A realtime target's own database failing while the user store reads fine (its
    file no database) is logged and recorded as the realtime database's, not as the
    store unavailable (an operator would look at the wrong database)."""
    seed_store(store_url(tmp_path), 2).dispose()
    realtime = tmp_path / "realtime.db"
    realtime.write_bytes(b"not a database, but for its length " * 200)
    config = write_config(tmp_path, kind="realtime")
    text_ = config.read_text().replace("[daemon]", f'url = "sqlite:///{realtime}"\n[daemon]')
    config.write_text(text_)
    daemon = Daemon(config, tmp_path / "daemon.log").start(wait_ready=False)
    try:
        until(lambda: bool(daemon.logged("sync.failed")), 20, "sync.failed")
        error = daemon.logged("sync.failed")[0]["error"]
        assert error.startswith("realtime database unavailable (target.url "), error
        assert "DatabaseError: " in error
        assert "store unavailable" not in error
        until(lambda: bool(daemon.health()), 10, "health record")
        health = daemon.health()
        assert health is not None
        assert health["last_error"] == error
    finally:
        daemon.stop()


#: Asterisk's own pjsip.conf, as a mistyped ``target.path`` would name it.
_ASTERISKS_PJSIP_CONF = (
    "[global]\ntype=global\nuser_agent=PBX\n\n"
    "[transport-udp]\ntype=transport\nprotocol=udp\nbind=0.0.0.0\n\n"
    "#include pjsip_users.conf\n"
)


def test_a_foreign_target_file_at_start_is_said_once_and_the_daemon_gets_ready(
    tmp_path: Path,
) -> None:
    """A daemon whose ``target.path`` is a file provisioner never wrote (Asterisk's own
    pjsip.conf) says so once at start, with what to do, and still sends READY=1 (with the
    refusal as its STATUS) rather than die of systemd's start timeout; the health record
    and ``check`` keep saying it, the file stays as it was, and once it is moved away the
    next try writes the users."""
    seed_store(store_url(tmp_path), 3).dispose()
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text(_ASTERISKS_PJSIP_CONF)
    notify = NotifySocket(tmp_path / "notify")
    daemon = _notified_daemon(config, tmp_path, notify)
    try:
        daemon.start(wait_ready=False)
        until(lambda: bool(notify.times("READY")), 20, "READY=1")
        (status,) = [m["STATUS"] for _, m in notify.messages if "READY" in m]
        assert status.startswith(f"not provisioning: refusing to replace {str(conf)!r}"), status
        time.sleep(2)  # a few retries
        (failed,) = daemon.logged("sync.failed")
        assert failed["error"].startswith(f"refusing to replace {str(conf)!r}")
        assert "point target.path at a file of its own" in failed["error"]
        assert conf.read_text() == _ASTERISKS_PJSIP_CONF
        health = daemon.health()
        assert health is not None
        assert health["ready"]
        assert health["last_sync_ok"] is False
        checked = cli(config, "check", check=False)
        (line,) = [line for line in checked.out.splitlines() if "daemon:" in line]
        assert line.startswith("FAIL  daemon: last sync failed: refusing to replace "), line
        conf.rename(tmp_path / "asterisk-pjsip.conf")
        until(lambda: conf.exists() and len(endpoints(conf)) == 4, 40, "the users written")
        until(lambda: bool((daemon.health() or {}).get("last_sync_ok")), 10, "a good sync")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()
