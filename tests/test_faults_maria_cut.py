"""A MariaDB server host that vanishes without closing its connections (a network cut,
a frozen VM) is noticed within seconds, as PostgreSQL's is.

The real cut: a private MariaDB server (``tests/mariacluster.py``) and a client run in a
network namespace of their own (``unshare --net``), whose loopback is then taken down:
from that moment every packet between them is lost, no FIN or RST arrives, and a read
blocked on the server's answer waits for the kernel (2 h of idle before its first
keepalive probe) unless the socket says otherwise.  The namespace is the test's own:
nothing another test uses is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from provisioner.store import engine as store_engine
from provisioner.store.engine import open_engine

from .dbs import temp_database
from .faultkit import tcp_options
from .mariacluster import unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
#: Seconds the cut may take to end the blocked read with the probe's short settings
#: (1 s idle, 1 s apart, 2 probes: about 3 s), with room for a loaded machine.
CUT_NOTICED = 10.0


def test_mariadb_connections_have_tcp_keepalive_and_a_user_timeout(tmp_path: Path) -> None:
    """The engine's MariaDB connections have TCP keepalive (10 s idle, then every 5 s,
    3 probes) and a 30 s user timeout, as PostgreSQL's have."""
    with temp_database("mariadb", tmp_path) as url:
        assert "127.0.0.1" in url  # over TCP, not a local socket
        engine = open_engine(url)
        try:
            with engine.connect() as conn:
                raw: object = conn.connection.dbapi_connection
                options = tcp_options(raw._sock.fileno())  # type: ignore[attr-defined]
        finally:
            engine.dispose()
    assert options == (1, 10, 5, 3, 30_000)


def _probe() -> None:
    """Run inside a network namespace of its own (see the module): start a private
    server, and print as JSON what a query sleeping longer than the keepalive's idle
    time returned, then how long a query blocked when the loopback goes down took to
    fail, and with what."""
    from .mariacluster import private_mariadb

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Short settings so the test takes seconds; the real ones are checked above.
    store_engine.MYSQL_KEEPALIVE.update(idle=1, interval=1, count=2, user_timeout=3.0)
    result: dict[str, object] = {}
    with private_mariadb() as server:
        engine = open_engine(server.url)
        try:
            with engine.connect() as conn:
                # A server that is there answers the probes: a wait longer than the
                # keepalive's idle time (as GET_LOCK's, up to 120 s) is not cut short.
                result["slept"] = conn.execute(text("SELECT SLEEP(4)")).scalar()
                _link_at(0.5, "down")
                # Without keepalive the read would wait for hours: the loopback comes
                # back after a while, so the server's answer ends it and the server
                # can be stopped (a probe killed instead would leave it running).
                back = _link_at(CUT_NOTICED + 5, "up")
                start = time.monotonic()
                try:
                    conn.execute(text(f"SELECT SLEEP({CUT_NOTICED + 10})"))
                    result["error"] = None
                except DBAPIError as exc:
                    result["error"] = f"{type(exc.orig).__name__}: {exc.orig}"
                result["seconds"] = time.monotonic() - start
                back.cancel()
        finally:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            engine.dispose()
    print(json.dumps(result), flush=True)


def _link_at(delay: float, state: str) -> threading.Timer:
    """Set the loopback ``state`` (up, down) in ``delay`` seconds (cancellable)."""
    command = ["ip", "link", "set", "lo", state]
    timer = threading.Timer(delay, subprocess.run, (command,), {"check": True})
    timer.start()
    return timer


def _can_unshare() -> str | None:
    """Why no network namespace can be made here, or None when one can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "no unshare or ip command"
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return None if done.returncode == 0 else "cannot make a network namespace (not root?)"


def test_a_mariadb_read_ends_soon_after_the_server_host_goes_silent() -> None:
    """A MariaDB query blocked on its answer when every packet to and from the server
    starts being lost fails (a driver error, the store unavailable) within the
    keepalive's time, while a long statement of a server still there completes."""
    reason = unavailable_reason() or _can_unshare()
    if reason is not None:
        pytest.skip(reason)
    code = "from tests.test_faults_maria_cut import _probe; _probe()"
    try:
        done = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the probe did not end within 2 min")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["slept"] == 0
    assert result["error"] is not None, result
    assert "Lost connection" in result["error"], result
    assert result["seconds"] < CUT_NOTICED, result
