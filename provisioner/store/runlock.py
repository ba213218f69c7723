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
daemon took it meanwhile).  A connection lost in a network cut the server has not
noticed yet leaves its session alive on the server, still holding the lock until the
server's keepalives (or an administrator) end it: ``retake`` then raises
:class:`PreviousSessionHolds`, to be tried again later, for that holder is this
daemon's own old session, not another daemon.  It is recognised

- on PostgreSQL by its backend pid, one this lock's connections had (each is noted
  before it asks for the lock: one whose answer was lost may hold it), together with
  its ``application_name``, this process's;
- on MariaDB/MySQL by a second ``GET_LOCK`` of a name drawn at random for this lock,
  which a connection takes before the daemon's lock: only a session of this lock holds
  it.  (Not by connection ids: a restarted server numbers its connections afresh, and
  another daemon's could get the number of this one's old session.)
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, Engine, column, func, select, table
from sqlalchemy.exc import DBAPIError

from ..errors import ConflictError, Problem, StoreUnavailable
from .engine import STORE_DOWN, mysql_lock_name, pg_lock_key, sqlite_file

__all__ = ["LOCK_NAME", "DaemonLock", "PreviousSessionHolds", "holder_name", "lock_file"]

#: The lock's name (PostgreSQL's key is its CRC-32, MariaDB's name starts with it).
LOCK_NAME = "provisioner.daemon"
_PG_KEY = pg_lock_key(LOCK_NAME)
#: The dialects whose lock is a session's (of a connection of its own), not a file's.
_MYSQL = ("mysql", "mariadb")

_pg_locks = table(
    "pg_locks",
    column("locktype"),
    column("classid"),
    column("objid"),
    column("objsubid"),
    column("pid"),
    column("granted"),
    column("database"),
)
_pg_activity = table("pg_stat_activity", column("pid"), column("application_name"))


class PreviousSessionHolds(StoreUnavailable):
    """The lock is held by this daemon's own session of before a connection was lost
    (see the module): not refused, for no other daemon holds it; try again later, once
    the server has ended that session."""

    def __init__(self, session: str) -> None:
        super().__init__(
            f"the lock is still held by this daemon's previous session ({session}), whose "
            "connection was lost without the server noticing yet: taken again once the "
            "server ends it"
        )


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
    _held: bool = False
    #: PostgreSQL: the backend pids of this lock's connections that may hold the lock.
    _sessions: set[int] = field(default_factory=set)
    #: MariaDB/MySQL: the name of the lock only this lock's sessions take (see the module).
    _marker: str = field(default_factory=lambda: "provisioner.self:" + secrets.token_hex(16))

    def take(self) -> None:
        """Take the lock, or raise :class:`ConflictError` naming its holder when another
        daemon holds it, :class:`PreviousSessionHolds` when this one's old session does
        (only after a lost connection: see :meth:`retake`).  A store that cannot be
        reached raises the driver's error.  Blocking."""
        path = lock_file(self.url)
        if path is not None:
            self._take_file(path)
        elif self.engine.dialect.name == "postgresql":
            self._take_pg()
        elif self.engine.dialect.name in _MYSQL:
            self._take_mysql()
        self._held = True

    @property
    def can_be_lost(self) -> bool:
        """Whether the lock lives on a connection (PostgreSQL, MariaDB/MySQL), which a
        store restart or a network cut loses: only such a lock needs :meth:`check` and
        :meth:`retake`.  A SQLite file lock (or none: a store in memory) never is."""
        return self.engine.dialect.name == "postgresql" or self.engine.dialect.name in _MYSQL

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
        """:meth:`take` again after :meth:`check` found the lock lost: raises
        :class:`PreviousSessionHolds` while the lost connection's session lives on the
        server, holding the lock (try again later), :class:`ConflictError` when another
        daemon took it."""
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
        except DBAPIError:
            # The driver failing to end a connection already lost (invalidate() logs its
            # own close's errors): nothing is left to end on this side, and the server
            # ends the session, with the lock, once it notices.
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
        for _ in range(_TRIES):
            if self._try_pg():
                return
        raise _refused(_pg_describe(None))

    def _try_pg(self) -> bool:
        """One attempt at the PostgreSQL lock: True when taken, False when its holder
        ended between the refusal and the look at who held it (the lock is free: try
        again), else :class:`PreviousSessionHolds` or :class:`ConflictError`."""
        conn = self._connect()
        name = holder_name()[:63]
        session: int = conn.execute(
            select(func.pg_backend_pid(), func.set_config("application_name", name, False))
        ).one()[0]
        # Noted before asking: a session whose answer is lost may hold the lock.
        self._sessions.add(session)
        if conn.execute(select(func.pg_try_advisory_lock(_PG_KEY))).scalar():
            conn.commit()
            self._sessions = {session}  # no other session can hold it now
            return True
        self._sessions.discard(session)  # refused: it holds nothing
        holder = _pg_holder(conn)
        self._drop_conn()
        if holder is None:
            return False
        if holder.pid in self._sessions and holder.name == name:
            raise PreviousSessionHolds(f"PostgreSQL backend pid {holder.pid}")
        raise _refused(_pg_describe(holder))

    def _take_mysql(self) -> None:
        for _ in range(_TRIES):
            if self._try_mysql():
                return
        raise _refused("a session that just ended")

    def _try_mysql(self) -> bool:
        """One attempt at the MariaDB/MySQL lock, as :meth:`_try_pg`."""
        conn = self._connect()
        lock = mysql_lock_name(LOCK_NAME)
        # The marker first: the session holding the daemon's lock holds it too.
        if not conn.execute(select(func.get_lock(self._marker, 0))).scalar():
            ours, holder = _mysql_holders(conn, self._marker, lock)
            self._drop_conn()
            if holder is not None and holder != ours:
                raise _refused(f"the database connection id {holder}")
            # Our old session holds the lock, or only the marker (lost between the two):
            # either way, the lock is taken once it ended.
            raise PreviousSessionHolds(
                "a session that just ended" if ours is None else f"database connection id {ours}"
            )
        if not conn.execute(select(func.get_lock(lock, 0))).scalar():
            _, holder = _mysql_holders(conn, self._marker, lock)
            self._drop_conn()
            if holder is None:
                return False
            raise _refused(f"the database connection id {holder}")
        conn.rollback()
        return True

    def _connect(self) -> Connection:
        self._conn = self.engine.connect()
        return self._conn


#: Attempts at a lock whose holder keeps ending between our refusal and the look at who
#: held it (a daemon stopping as another starts): each such look finds the lock free.
_TRIES = 3


def _mysql_holders(
    conn: Connection, marker: str, lock: ColumnElement[str]
) -> tuple[int | None, int | None]:
    """The connection ids holding ``marker`` and ``lock`` (None for one not held)."""
    row: Any = conn.execute(select(func.is_used_lock(marker), func.is_used_lock(lock))).one()
    return row[0], row[1]


class _PgHolder(NamedTuple):
    """The session holding the daemon's advisory lock: its backend pid and its
    ``application_name``."""

    pid: int
    name: str | None


def _pg_describe(holder: _PgHolder | None) -> str:
    """``holder`` for a message: its ``application_name`` (``provisioner daemon pid N
    on HOST``), else its backend pid."""
    if holder is None:
        return "a session that just ended"
    return holder.name or f"PostgreSQL backend pid {holder.pid}"


def _pg_holder(conn: Connection) -> _PgHolder | None:
    """The session holding the daemon's advisory lock, or None (it just ended)."""
    query = (
        select(_pg_activity.c.pid, _pg_activity.c.application_name)
        .select_from(_pg_locks.join(_pg_activity, _pg_locks.c.pid == _pg_activity.c.pid))
        .where(
            # One bigint key below 2**32 (see pg_lock_key): classid 0, objid the key.
            _pg_locks.c.locktype == "advisory",
            _pg_locks.c.classid == 0,
            _pg_locks.c.objid == _PG_KEY,
            _pg_locks.c.objsubid == 1,
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
    return None if row is None else _PgHolder(row.pid, row.application_name)
