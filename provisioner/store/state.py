"""Small named values the daemon keeps in the store (``daemon_state``) across restarts."""

from __future__ import annotations

from sqlalchemy import Connection, delete, select

from .schema import daemon_state

__all__ = ["drop_state", "load_state", "put_state"]


def load_state(conn: Connection, key: str) -> str | None:
    """The value kept under ``key``, or None."""
    query = select(daemon_state.c.value).where(daemon_state.c.key == key)
    return conn.execute(query).scalar_one_or_none()


def put_state(conn: Connection, key: str, value: str) -> None:
    """Keep ``value`` under ``key`` (delete + insert: a portable upsert in the caller's
    transaction)."""
    drop_state(conn, key)
    conn.execute(daemon_state.insert().values(key=key, value=value))


def drop_state(conn: Connection, key: str) -> None:
    """Forget ``key`` (nothing when it is not kept)."""
    conn.execute(delete(daemon_state).where(daemon_state.c.key == key))
