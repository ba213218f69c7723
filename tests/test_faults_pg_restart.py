"""The store's PostgreSQL server really restarts under a running daemon.

``test_daemon_e2e`` cuts the shared server's connections to one database; this test
stops and starts a whole PostgreSQL server (a private one, ``tests/pgcluster.py``), as
a package upgrade or a failover does: every session dies, the port refuses connections
for a while, and the server comes back empty of sessions and of ``LISTEN``\\ers.  In
between it serves its local socket only: an edit committed there is one the daemon, on
TCP, cannot have seen before the server is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .faultkit import (
    Daemon,
    agent_args,
    cheap_hasher,
    cli,
    endpoints,
    seed_store,
    until,
    write_config,
)
from .pgcluster import PrivatePostgres, private_postgres, unavailable_reason


@pytest.fixture
def cluster() -> Iterator[PrivatePostgres]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with private_postgres() as running:
        yield running


def _add(config: Path, username: str) -> None:
    cli(config, *agent_args(username))


def _listening(daemon: Daemon) -> int:
    """How many times the daemon logged its LISTEN connection up and heard (its probe's
    notification came back): once per (re)connect."""
    return len(daemon.logged("store.listening"))


def test_a_postgresql_restart_mid_run_is_survived(tmp_path: Path, cluster: PrivatePostgres) -> None:
    """An edit committed while the daemon cannot reach the server (restarted to serve its
    local socket only) is applied once the server is back on TCP, the daemon stays up
    through the outage, and with the poll 60 s apart its LISTEN is back: an edit then
    goes live within 1 s."""
    cheap_hasher()
    seed_store(cluster.url, 1).dispose()
    # Polled every 60 s (LISTEN down or not): only a notification makes an edit live
    # within seconds.
    config = write_config(tmp_path, store_url=cluster.url, extra=["poll_interval = 60"])
    # The same store through the server's socket: what an admin on its host can reach
    # while the daemon, on TCP, cannot.
    local = write_config(tmp_path, store_url=cluster.socket_url, name="local.toml")
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: len(endpoints(conf)) >= 1, 10, "first reconcile")
        until(lambda: _listening(daemon) == 1, 10, "LISTEN up")
        before = len(endpoints(conf))

        cluster.stop()
        cluster.start(tcp=False)
        _add(local, "bob")
        time.sleep(1.0)
        assert daemon.alive, "the daemon exited while its store was down"
        assert len(endpoints(conf)) == before, "bob applied while the store was unreachable"
        cluster.stop()
        cluster.start()

        until(lambda: len(endpoints(conf)) == before + 1, 20, "bob applied after the restart")
        until(lambda: _listening(daemon) >= 2, 20, "LISTEN back after the restart")
        # bob's apply succeeded, so no retry is pending either: a notification it is.
        _add(config, "carol")
        until(lambda: len(endpoints(conf)) == before + 2, 1, "carol live by LISTEN")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    log = daemon.log.read_text()
    assert "Traceback" not in log
