"""The daemon's lock of its store: one ``provisioner run`` per store.

Two daemons on one store share its cursor (``daemon_state``), prune changes the other
has not read, and forget each other's registration state: the second one is refused.
The lock is held for the daemon's lifetime, on its own connection (or file):

- PostgreSQL: a session advisory lock; the connection's ``application_name`` names
  the holder (``provisioner daemon pid N on HOST``), so a refused daemon can say who.
- MariaDB/MySQL: ``GET_LOCK`` (named after the database, as :func:`~.engine.exclusive`
  does); a refused daemon names the holder's connection id.
- SQLite: ``fcntl.flock`` on ``<database file>.daemon-lock``, beside the database
  (not in ``daemon.state_dir``: two daemons with different state directories on one
  store must still meet); the file names the holder.  A SQLite store in memory or
  opened by a ``file:`` URI has no lock.

On PostgreSQL and MariaDB a lost connection loses the lock: :meth:`DaemonLock.check`
says whether it is still held, and :meth:`DaemonLock.retake` takes it again on a new
connection (refused, with :class:`~provisioner.errors.ConflictError`, when another
daemon took it meanwhile).
"""

from __future__ import annotations

import fcntl
import os
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine, column, func, select, table

from ..errors import ConflictError, Problem
from .engine import STORE_DOWN, sqlite_file

__all__ = ["LOCK_NAME", "DaemonLock", "holder_name", "lock_file"]

#: The lock's name (PostgreSQL's key is its CRC-32, MariaDB's name starts with it).
LOCK_NAME = "provisioner.daemon"
_PG_KEY = zlib.crc32(LOCK_NAME.encode())

_pg_locks = table(
    "pg_locks",
    column("locktype"),
    column("objid"),
    column("pid"),
    column("granted"),
    column("database"),
)
_pg_activity = table("pg_stat_activity", column("pid"), column("application_name"))


def holder_name() -> str:
    """This process as a lock's holder: ``provisioner daemon pid N on HOST``."""
    return f"provisioner daemon pid {os.getpid()} on {socket.gethostname()}"


def lock_file(url: str) -> Path | None:
    """The lock file of a SQLite store ``url`` (beside its database file), or None."""
    db = sqlite_file(url)
    return None if db is None else db.with_name(db.name + ".daemon-lock")


def _refused(holder: str) -> ConflictError:
    rule = (
        f"another provisioner daemon runs on this store ({holder}): one daemon per "
        "store; stop it first ('provisioner run --burst' may run beside it)"
    )
    return ConflictError([Problem("store", rule)])


@dataclass
class DaemonLock:
    """The daemon's lock of the store at ``url`` (see the module); :meth:`take` it."""

    engine: Engine
    url: str
    _conn: Connection | None = None
    _file: IO[str] | None = None
    _held: bool = field(default=False)

    def take(self) -> None:
        """Take the lock, or raise :class:`ConflictError` naming its holder when another
        daemon holds it.  A store that cannot be reached raises the driver's error.
        Blocking."""
        path = lock_file(self.url)
        if path is not None:
            self._take_file(path)
        elif self.engine.dialect.name == "postgresql":
            self._take_pg()
        elif self.engine.dialect.name in ("mysql", "mariadb"):
            self._take_mysql()
        self._held = True

    def check(self) -> bool:
        """Whether the lock is still held: False once its connection was lost (it is
        then closed; :meth:`retake` takes the lock again).  A file lock is never lost.
        Blocking (one query)."""
        conn = self._conn
        if conn is None:
            return self._held
        try:
            conn.execute(select(1)).scalar()
            conn.rollback()
        except STORE_DOWN:  # the connection (and its session's lock) is gone
            self._drop_conn()
            self._held = False
        return self._held

    def retake(self) -> None:
        """:meth:`take` again after :meth:`check` found the lock lost."""
        self._drop_conn()
        self.take()

    def release(self) -> None:
        """Let the lock go (closing its connection or file ends it)."""
        self._held = False
        self._drop_conn()
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.invalidate()  # never back to the pool: its session (and lock) must end
            conn.close()
        except Exception:  # noqa: S110 (closing a lost connection: nothing to do)
            pass

    def _take_file(self, path: Path) -> None:
        fh = path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or f"the holder of {str(path)!r}"
            fh.close()
            raise _refused(holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(holder_name() + "\n")
        fh.flush()
        self._file = fh

    def _take_pg(self) -> None:
        conn = self._connect()
        conn.execute(select(func.set_config("application_name", holder_name()[:63], False)))
        if not conn.execute(select(func.pg_try_advisory_lock(_PG_KEY))).scalar():
            holder = _pg_holder(conn)
            self._drop_conn()
            raise _refused(holder)
        conn.commit()

    def _take_mysql(self) -> None:
        conn = self._connect()
        lock = func.concat(LOCK_NAME[:24], ":", func.md5(func.database()))
        if not conn.execute(select(func.get_lock(lock, 0))).scalar():
            holder = conn.execute(select(func.is_used_lock(lock))).scalar()
            self._drop_conn()
            raise _refused(f"the database connection id {holder}")
        conn.rollback()

    def _connect(self) -> Connection:
        self._conn = self.engine.connect()
        return self._conn


def _pg_holder(conn: Connection) -> str:
    """Who holds the daemon's advisory lock: the ``application_name`` of its session
    (``provisioner daemon pid N on HOST``), else its backend pid."""
    query = (
        select(_pg_activity.c.pid, _pg_activity.c.application_name)
        .select_from(_pg_locks.join(_pg_activity, _pg_locks.c.pid == _pg_activity.c.pid))
        .where(
            _pg_locks.c.locktype == "advisory",
            _pg_locks.c.objid == _pg_objid(),
            _pg_locks.c.granted.is_(True),
            _pg_locks.c.database
            == select(column("oid"))
            .select_from(table("pg_database", column("oid"), column("datname")))
            .where(column("datname") == func.current_database())
            .scalar_subquery(),
        )
    )
    row: Any = conn.execute(query).first()
    conn.rollback()
    if row is None:
        return "a session that just ended"
    return str(row.application_name or f"PostgreSQL backend pid {row.pid}")


def _pg_objid() -> int:
    """``pg_locks.objid`` of a one-bigint advisory key: its low 32 bits."""
    return _PG_KEY & 0xFFFFFFFF
