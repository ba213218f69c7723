"""Small named values the daemon keeps in the store (``daemon_state``) across restarts."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sqlalchemy import Column, Connection, delete, select

from .schema import daemon_state

__all__ = [
    "KEY_MAX",
    "VALUE_MAX",
    "drop_state",
    "load_state",
    "load_states",
    "put_state",
    "write_states",
]


def _length(column: Column[str]) -> int:
    length = getattr(column.type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"daemon_state.{column.name} has no length")
    return length


#: The longest key and value ``daemon_state`` holds (its columns' lengths): longer
#: ones fail on PostgreSQL and MariaDB (SQLite would keep them).
KEY_MAX = _length(daemon_state.c.key)
VALUE_MAX = _length(daemon_state.c.value)

#: Keys per ``DELETE ... IN``: well under every backend's bound-parameter limit
#: (SQLite's was 999 before 3.32).
_KEYS_PER_STATEMENT = 500


def load_state(conn: Connection, key: str) -> str | None:
    """The value kept under ``key``, or None."""
    query = select(daemon_state.c.value).where(daemon_state.c.key == key)
    return conn.execute(query).scalar_one_or_none()


def load_states(conn: Connection, prefix: str) -> dict[str, str]:
    """Every value kept under a key starting with ``prefix`` (``%`` and ``_`` in it
    match only themselves), by key."""
    query = select(daemon_state.c.key, daemon_state.c.value).where(
        daemon_state.c.key.startswith(prefix, autoescape=True)
    )
    return {key: value for key, value in conn.execute(query)}


def put_state(conn: Connection, key: str, value: str) -> None:
    """Keep ``value`` under ``key`` (delete + insert: a portable upsert in the caller's
    transaction)."""
    drop_state(conn, key)
    conn.execute(daemon_state.insert().values(key=key, value=value))


def drop_state(conn: Connection, key: str) -> None:
    """Forget ``key`` (nothing when it is not kept)."""
    conn.execute(delete(daemon_state).where(daemon_state.c.key == key))


def write_states(conn: Connection, put: Mapping[str, str], drop: Collection[str] = ()) -> None:
    """Forget the keys of ``drop`` and keep each value of ``put`` under its key, in the
    caller's transaction: a few statements however many keys (deletes in chunks, one
    multi-row insert), so a batch's notes cost one round of writes, not one per key."""
    keys = [*drop, *put]
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        chunk = keys[start : start + _KEYS_PER_STATEMENT]
        conn.execute(delete(daemon_state).where(daemon_state.c.key.in_(chunk)))
    if put:
        conn.execute(daemon_state.insert(), [{"key": k, "value": v} for k, v in put.items()])
