"""A private PostgreSQL server for one test, so the test can really stop and restart it.

The shared server on 127.0.0.1:5432 serves every other test running beside this one;
restarting it would break them.  This module makes a throwaway cluster (``initdb``)
in a directory of its own, on a free TCP port of 127.0.0.1, trust authentication,
and removes it afterwards.  ``initdb`` and ``postgres`` refuse to run as root: as
root they run as the ``postgres`` system user (``runuser``), which the Debian package
creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .privatecluster import PrivateServer, free_port, server_directory

__all__ = ["PrivatePostgres", "private_postgres", "unavailable_reason"]

_SERVER_USER = "postgres"


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's ``bin`` directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _major(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def _as_server_user() -> list[str]:
    """The prefix that runs a command as a user PostgreSQL accepts (root is refused)."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", _SERVER_USER, "--"]


def unavailable_reason() -> str | None:
    """Why no private server can be made here, or None when one can."""
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (initdb) installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return "running as root and no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    return None


@dataclass
class PrivatePostgres(PrivateServer):
    """A running private cluster: its URL, and stop/start that really end the server."""

    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{_SERVER_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        """The URL of the server's Unix-domain socket (in ``base``): it answers there
        whether or not it listens on TCP (see :meth:`start`)."""
        return f"postgresql+psycopg://{_SERVER_USER}@/postgres?host={self.base}&port={self.port}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*_as_server_user(), str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self, *, tcp: bool = True) -> None:
        """Start the server and wait until it accepts connections: on 127.0.0.1 and its
        socket, or (``tcp`` False) on its socket only, so a client of :attr:`url` is
        refused as while the server is down and one of :attr:`socket_url` is served."""
        listen = "127.0.0.1" if tcp else "''"
        options = (
            f"-p {self.port} -c listen_addresses={listen} -k {self.base}"
            # Throwaway data: no flush to disk, so the test pays no fsync.
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._ctl("-w", "-l", str(self.base / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        """Stop the server the way a restart does: every session is ended (fast mode)."""
        self._ctl("-w", "-m", "fast", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A new cluster, started; stopped and removed afterwards."""
    bin_dir = _bin_dir()
    assert bin_dir is not None, unavailable_reason()
    with server_directory("prov-pg-", _SERVER_USER) as base:
        cluster = PrivatePostgres(base=base, port=free_port(), bin_dir=bin_dir)
        subprocess.run(
            [
                *_as_server_user(),
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data),
                "-A",
                "trust",
                "-U",
                _SERVER_USER,
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
        try:
            yield cluster
        finally:
            if (cluster.data / "postmaster.pid").exists():
                cluster.stop()
