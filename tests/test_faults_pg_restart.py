"""The store's PostgreSQL server really restarts under a running daemon.

``test_daemon_e2e`` cuts the shared server's connections to one database; this test
stops and starts a whole PostgreSQL server (a private one, ``tests/pgcluster.py``), as
a package upgrade or a failover does: every session dies, the port refuses connections
for a while, and the server comes back empty of sessions and of ``LISTEN``\\ers.
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


def test_a_postgresql_restart_mid_run_is_survived(tmp_path: Path, cluster: PrivatePostgres) -> None:
    """An edit committed just before the server stops is applied once it is back, the
    daemon stays up through the outage, and later edits go live within 3 s."""
    cheap_hasher()
    seed_store(cluster.url, 1).dispose()
    config = write_config(tmp_path, store_url=cluster.url)
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: len(endpoints(conf)) >= 1, 10, "first reconcile")
        before = len(endpoints(conf))

        _add(config, "bob")
        cluster.stop()
        time.sleep(1.5)
        assert daemon.alive, "the daemon exited while its store was down"
        cluster.start()

        until(lambda: len(endpoints(conf)) == before + 1, 20, "bob applied after the restart")
        _add(config, "carol")
        # Live within seconds: by LISTEN, or by the poll while it is still reconnecting.
        until(lambda: len(endpoints(conf)) == before + 2, 3, "carol applied")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    log = daemon.log.read_text()
    assert "Traceback" not in log
