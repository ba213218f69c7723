"""The store's MariaDB server really restarts under a running daemon.

As ``test_faults_pg_restart`` does for PostgreSQL: a whole MariaDB server (a private one,
``tests/mariacluster.py``) is stopped and started again on its port and data directory,
as a package upgrade or a failover does: every session dies (its ``GET_LOCK`` locks
with it), the port refuses connections for a while, and the server comes back with
none.  The daemon's store, its realtime target (the same database) and its
registration state are all on that server; a fake Asterisk sends registration events
while it is down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import column, select, table
from sqlalchemy.exc import DBAPIError

from provisioner.health import read_health
from provisioner.store.engine import open_engine
from provisioner.store.schema import registration_summary, users

from .amipeer import FakeAsterisk
from .faultkit import (
    Daemon,
    agent_args,
    endpoints,
    fake_pbx_lines,
    seed_store,
    until_async,
    write_config,
)
from .faultkit import cli_async as _cli
from .faultkit import until as sync_until
from .mariacluster import PrivateMariaDB, private_mariadb, unavailable_reason

#: The endpoint of the seeded agent ``u0``, whose registration the recorded events tell.
U0 = "1001"
#: Seconds the server stays down.
DOWNTIME = 1.5
#: At most this many warnings and errors in the daemon's log for one outage: each failed
#: attempt is logged, but at most about one per poll (0.2 s here), not in a tight loop.
MAX_OUTAGE_LINES = 60


@pytest.fixture
def server() -> Iterator[PrivateMariaDB]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with private_mariadb() as running:
        yield running


def _config(tmp_path: Path, server: PrivateMariaDB, kind: str, ami_port: int) -> Path:
    return write_config(
        tmp_path,
        store_url=server.url,
        kind=kind,
        extra=("poll_interval = 0.2", *fake_pbx_lines(ami_port)),
    )


async def _add(config: Path, username: str) -> None:
    await _cli(config, *agent_args(username))


#: Polling every 0.05 s, as these tests always have.
_until = partial(until_async, interval=0.05)


_ps_endpoints = table("ps_endpoints", column("id"))


def _live_endpoints(kind: str, tmp_path: Path, url: str) -> set[str]:
    """The endpoint ids the target holds now: the config file's sections or the realtime
    rows (none while the server is down or the table is not made yet)."""
    if kind == "config":
        return set(endpoints(tmp_path / "pjsip_users.conf"))
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(_ps_endpoints.c.id)).scalars())
    except DBAPIError:
        return set()
    finally:
        engine.dispose()


async def _logged_in_and_applied(peer: FakeAsterisk, kind: str, tmp_path: Path, url: str) -> None:
    """Wait (10 s each) until the daemon has logged in to ``peer`` and its first
    reconcile has put u0 in the target."""
    await _until(lambda: peer.logins_ok >= 1, 10, "logged in to Asterisk")
    await _until(lambda: U0 in _live_endpoints(kind, tmp_path, url), 10, "u0 applied")


def _stored_state(url: str, username: str) -> str | None:
    """The registration state the store holds for ``username`` (None: none, or the
    server is down), read directly: no CLI process start in the measured time."""
    engine = open_engine(url)
    query = (
        select(registration_summary.c.state)
        .join(users, users.c.id == registration_summary.c.user_id)
        .where(users.c.username == username)
    )
    try:
        with engine.connect() as conn:
            return conn.execute(query).scalar()
    except DBAPIError:
        return None
    finally:
        engine.dispose()


async def _state(config: Path, username: str) -> str:
    out = json.loads(await _cli(config, "status", username, "--json"))
    return str(out[0]["state"])


def _problems(daemon: Daemon) -> list[str]:
    health = read_health(daemon.config.parent / "state")
    assert health is not None
    return health.problems(time.time(), max_age=60)


@pytest.mark.parametrize(("kind", "end"), [("realtime", "stop"), ("config", "kill")])
def test_a_mariadb_restart_mid_run_is_survived(
    tmp_path: Path, server: PrivateMariaDB, kind: str, end: str
) -> None:
    """Across a MariaDB restart (stopped, or killed and recovered) the daemon stays up,
    applies the edit committed just before the stop and the one made right after the
    start, writes the registration events Asterisk sent meanwhile, and is healthy again,
    logging a bounded number of retries."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _config(tmp_path, server, kind, peer.port)
        daemon = Daemon(config, tmp_path / "daemon.log")
        await asyncio.to_thread(lambda: seed_store(server.url, 1).dispose())
        await asyncio.to_thread(daemon.start)
        try:
            await _logged_in_and_applied(peer, kind, tmp_path, server.url)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def online() -> bool:
                return await _state(config, "u0") == "online"

            await _until(online, 10, "u0's registration written")
            lines_before = len(_trouble(daemon))

            await _add(config, "bob")  # committed just before the stop
            await asyncio.to_thread(server.stop if end == "stop" else server.kill)
            # While the store is down, the phone un-registers and registers again, then
            # leaves: the last word (offline) must reach the store once it is back.
            await peer.send_recorded("Event: ContactStatus\r\n", "ContactStatus: Removed")
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await peer.send_recorded("Event: ContactStatus\r\n", "ContactStatus: Removed")
            await asyncio.sleep(DOWNTIME)
            assert daemon.alive, "the daemon exited while its store was down"
            await asyncio.to_thread(server.start)
            await _add(config, "carol")  # right after the server is back

            store_users = {"1001", "1002", "1003"}
            await _until(
                lambda: _live_endpoints(kind, tmp_path, server.url) >= store_users,
                20,
                "bob and carol applied after the restart",
            )

            async def offline() -> bool:
                return await _state(config, "u0") == "offline"

            await _until(offline, 20, "u0's un-registration written")
            await _until(lambda: not _problems(daemon), 20, "healthy again")
            dry = await _cli(config, "render", "--dry-run")
            assert "would be added 0, would be updated 0, would be removed 0" in dry, dry
            assert daemon.alive
            assert await asyncio.to_thread(daemon.stop) == 0
        finally:
            await asyncio.to_thread(daemon.kill)
            await peer.stop()
        log = daemon.log.read_text()
        assert "Traceback" not in log
        outage = _trouble(daemon)[lines_before:]
        assert outage, "the outage went unlogged"
        assert len(outage) <= MAX_OUTAGE_LINES, [e.get("event") for e in outage]

    asyncio.run(scenario())


def _trouble(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's warnings and errors logged so far."""
    return [e for e in daemon.events() if e.get("level") in ("warning", "error", "critical")]


#: Registration writes refused in a row before the long outage ends: the writer's
#: pause (0.5 s doubling) has reached 4 s.
LONG_FAILURES = 4


def test_registrations_are_written_soon_after_a_long_mariadb_outage(
    tmp_path: Path, server: PrivateMariaDB
) -> None:
    """A registration event received during an outage long enough for the registration
    writer to pause 4 s between attempts reaches the store, and the health record is
    healthy again, within 1 s of the server's return, as the edits do."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _config(tmp_path, server, "realtime", peer.port)
        daemon = Daemon(config, tmp_path / "daemon.log")
        await asyncio.to_thread(lambda: seed_store(server.url, 1).dispose())
        await asyncio.to_thread(daemon.start)
        try:
            await _logged_in_and_applied(peer, "realtime", tmp_path, server.url)

            def state_is(state: str) -> Callable[[], bool]:
                return lambda: _stored_state(server.url, "u0") == state

            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await _until(state_is("online"), 10, "u0's registration written")
            await asyncio.to_thread(server.stop)
            await peer.send_recorded("Event: ContactStatus\r\n", "ContactStatus: Removed")
            await _until(lambda: _store_failures(daemon) >= LONG_FAILURES, 20, "writes refused")
            assert daemon.alive, "the daemon exited while its store was down"
            await asyncio.to_thread(server.start)
            back = time.monotonic()
            await _until(state_is("offline"), 30, "u0's un-registration written")
            written = time.monotonic() - back
            await _until(lambda: not _problems(daemon), 20, "healthy again")
            healthy = time.monotonic() - back
            await _add(config, "bob")
            await _until(
                lambda: "1002" in _live_endpoints("realtime", tmp_path, server.url), 3, "bob"
            )
            assert await _state(config, "u0") == "offline"
            assert written < 1.0, f"registration written {written:.1f} s after the return"
            assert healthy < 1.0, f"healthy {healthy:.1f} s after the return"
            assert await asyncio.to_thread(daemon.stop) == 0
        finally:
            await asyncio.to_thread(daemon.kill)
            await peer.stop()
        assert "Traceback" not in daemon.log.read_text()

    asyncio.run(scenario())


def _store_failures(daemon: Daemon) -> int:
    """The registration writes refused in a row, as the daemon last logged them."""
    retries = daemon.logged("registration.store_retry")
    return int(retries[-1]["failures"]) if retries else 0


def test_the_daemon_holds_its_lock_again_as_soon_as_mariadb_is_back(
    tmp_path: Path, server: PrivateMariaDB
) -> None:
    """A daemon whose lock (a GET_LOCK of a session the restart ended) could not be taken
    again while the server was down takes it within 1 s of the server's return, not at
    its next 5 s look, so a second daemon started then is refused (exit 4)."""
    seed_store(server.url, 1).dispose()
    config = write_config(tmp_path, store_url=server.url, extra=("poll_interval = 0.2",))
    first = Daemon(config, tmp_path / "first.log").start()
    second = Daemon(config, tmp_path / "second.log")
    try:
        server.stop()
        sync_until(lambda: bool(first.logged("daemon.lock_waits")), 10, "retake refused")
        server.start()
        back = time.monotonic()
        sync_until(lambda: bool(first.logged("daemon.lock_retaken")), 10, "lock retaken")
        retaken = time.monotonic() - back
        code = second.run_to_exit()
        assert first.alive
        assert first.stop() == 0
    finally:
        first.kill()
        second.kill()
    assert retaken < 1.0, f"lock taken again {retaken:.1f} s after the return"
    assert code == 4, second.log.read_text()
    assert "Traceback" not in first.log.read_text()


#: First reconciles failed before the server starts: the pause before the next has
#: reached 4 s (0.5 s doubling up to 5 s); logged as such (sync.still_failing).
BOOT_FAILURES = 4


def test_a_daemon_started_before_mariadb_is_ready_soon_after_it(
    tmp_path: Path, server: PrivateMariaDB
) -> None:
    """A daemon started while its MariaDB is down (a boot where the database comes up
    later) is ready within 6.5 s of the server's start, however long it waited."""
    seed_store(server.url, 1).dispose()
    config = write_config(tmp_path, store_url=server.url)
    server.stop()
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.start(wait_ready=False)
        sync_until(lambda: daemon.failed_tries() >= BOOT_FAILURES, 30, "reconciles failed")
        server.start()
        ready = sync_until(daemon.ready, 30, "daemon ready")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert ready < 6.5, f"ready {ready:.1f} s after the server started"
    assert "Traceback" not in daemon.log.read_text()


def test_a_mariadb_outage_is_logged_once_then_at_a_bounded_rate(
    tmp_path: Path, server: PrivateMariaDB
) -> None:
    """A store outage under a daemon polling every 0.2 s logs one sync.failed, then its
    count of failed tries at the 2nd, 4th, 8th… (sync.still_failing), and one
    sync.recovered with the total once the store is back, not one error per try."""
    seed_store(server.url, 1).dispose()
    config = write_config(tmp_path, store_url=server.url, extra=("poll_interval = 0.2",))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        server.stop()
        time.sleep(3.0)  # about 15 polls, each a failed try
        server.start()
        sync_until(lambda: bool(daemon.logged("sync.recovered")), 10, "sync.recovered")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    failed = daemon.logged("sync.failed")
    still = [e["failures"] for e in daemon.logged("sync.still_failing")]
    recovered = daemon.logged("sync.recovered")
    assert len(failed) == 1, [e["error"] for e in failed]
    assert len(recovered) == 1
    total = recovered[0]["failures"]
    assert total >= 8, total  # tried at the polls, not only after a backoff
    assert still == [n for n in (2, 4, 8, 16, 32) if n <= total]
    assert len(daemon.logged("sync.retry")) <= 1
    assert "Traceback" not in daemon.log.read_text()
