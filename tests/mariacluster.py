"""A private MariaDB server for one test, so the test can really stop and restart it.

The shared server on 127.0.0.1:3306 serves every other test running beside this one;
restarting it would break them.  This module makes a throwaway server
(``mariadb-install-db``) in a directory of its own, listening on a free TCP port of
127.0.0.1, with grants as the shared server has them (``root`` without a password,
no ``--skip-grant-tables``: the daemon logs in as it would anywhere), and removes it
afterwards.  ``mariadbd`` refuses to run as root unless told a user: as root it runs
as the ``mysql`` system user (``--user=mysql``), which the Debian package creates.

Only durability is traded for speed: the data is thrown away, so InnoDB never calls
fsync (``innodb_flush_method=nosync``), but each commit still reaches the operating
system (``innodb_flush_log_at_trx_commit=2``), so a committed edit survives a stop or
a kill of the server as it would in production.  Made and started in 0.8-1.9 s here
(about 4 s while other tests load the machine).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pymysql

from .privatecluster import PrivateServer, free_port, server_directory

__all__ = ["DATABASE", "PrivateMariaDB", "private_mariadb", "unavailable_reason"]

_SERVER_USER = "mysql"
#: The database the tests' store lives in (made at the first start).
DATABASE = "provisioner"
#: Server options besides the paths and the port: the character set the Debian package
#: configures (as on the shared server), and InnoDB without fsync (see the module).
_OPTIONS = (
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--skip-name-resolve",
    "--skip-log-bin",
    "--innodb-flush-method=nosync",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
)
#: Seconds a start or a stop may take before the test fails.
_TIMEOUT = 60.0


def _binary(name: str) -> str | None:
    """The path of the MariaDB program ``name`` (``/usr/sbin`` is not always in PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def unavailable_reason() -> str | None:
    """Why no private server can be made here, or None when one can."""
    for name in ("mariadb-install-db", "mariadbd"):
        if _binary(name) is None:
            return f"no MariaDB server binaries ({name}) installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return "running as root and no 'mysql' user to run the server as"
    return None


def _as_server_user() -> list[str]:
    """The option that has ``mariadbd`` run as a user other than root (it refuses root)."""
    return [f"--user={_SERVER_USER}"] if os.geteuid() == 0 else []


@dataclass
class PrivateMariaDB(PrivateServer):
    """A private server: its URL, and stop/kill/start that really end the server."""

    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server on its port and data directory; return once it accepts
        connections (failing with the end of its error log if it exits first)."""
        mariadbd = _binary("mariadbd")
        assert mariadbd is not None, unavailable_reason()
        with (self.base / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    mariadbd,
                    "--no-defaults",
                    *_as_server_user(),
                    f"--datadir={self.data}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.base / 'sock'}",
                    f"--pid-file={self.base / 'server.pid'}",
                    f"--log-error={self.base / 'server.log'}",
                    # Its own: a starting server deletes every "#sql*" file in its tmpdir,
                    # which in /tmp are the shared server's temporary tables in use (its
                    # MariaDB tests then failed with "Error on delete of '/tmp/#sql-...'").
                    f"--tmpdir={self.base}",
                    *_OPTIONS,
                ],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + _TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"private MariaDB did not start:\n{self.log_tail()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1)
        except pymysql.err.OperationalError:
            return False
        conn.close()
        return True

    def stop(self) -> None:
        """Stop the server as ``systemctl stop`` does (SIGTERM): it refuses new
        connections, ends every session and exits once InnoDB is shut down."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash or an OOM kill does: the next
        start recovers InnoDB from its log."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"private MariaDB did not stop:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's error log (for a failure's message)."""
        try:
            text = (self.base / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A new server with an empty database :data:`DATABASE`, started; stopped and
    removed afterwards."""
    install = _binary("mariadb-install-db")
    assert install is not None, unavailable_reason()
    with server_directory("prov-maria-", _SERVER_USER) as base:
        server = PrivateMariaDB(base=base, port=free_port())
        subprocess.run(
            [
                install,
                "--no-defaults",
                *_as_server_user(),
                f"--datadir={server.data}",
                # root without a password over TCP, as on the shared server (not the
                # unix_socket plugin, which only a local root's socket login passes).
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                f"--tmpdir={base}",  # as start()'s: /tmp holds the shared server's files
                *_OPTIONS,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.start()
        try:
            conn = pymysql.connect(host="127.0.0.1", port=server.port, user="root")
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")  # a constant name
            conn.close()
            yield server
        finally:
            server.stop()
