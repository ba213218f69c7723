"""Opening the user store: one SQLAlchemy engine per URL, with each backend's needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["open_engine", "reading"]

#: Execution option that makes a SQLite connection's transactions plain (deferred)
#: ``BEGIN``s: see :func:`reading`.
_READ_ONLY = "provisioner_read_only"


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def open_engine(url: str, *, busy_timeout: float = 10.0) -> Engine:
    """An engine for ``url``.

    SQLite gets WAL (readers never block the writer), enforced foreign keys, a
    busy timeout, and ``BEGIN IMMEDIATE`` for every transaction but those of
    :func:`reading`, so two writers queue on the lock instead of deadlocking on a
    read-to-write upgrade.  Its
    parent directory is created, so ``sqlite:///var/provisioner.db`` works on a
    fresh checkout.
    """
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout, "isolation_level": None})
        _sqlite_events(engine, busy_timeout)
        return engine
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    return create_engine(url, **kwargs)


def _sqlite_events(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")  # an int from config
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def reading(engine: Engine) -> Connection:
    """A connection for transactions that only read.

    On SQLite they begin deferred: a snapshot of the WAL, taking no lock, so a long read
    (loading 100,000 users for a reconcile) never makes a writer (the CLI, the
    registration flusher) wait.  Nothing stops a write on it, but a write would risk the
    read-to-write deadlock that ``BEGIN IMMEDIATE`` avoids: only read through it.  Other
    databases are unaffected.
    """
    return engine.connect().execution_options(**{_READ_ONLY: True})
