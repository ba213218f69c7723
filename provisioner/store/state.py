"""Small named values the daemon keeps in the store (``daemon_state``) across restarts."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sqlalchemy import Column, Connection, Insert, delete, select
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
    """Keep ``value`` under ``key``, in the caller's transaction: one upsert (see
    :func:`_upsert`), so two writers putting one key at once both commit, in turn."""
    _upsert(conn, [{"key": key, "value": value}])


def _upsert(conn: Connection, rows: list[dict[str, str]]) -> None:
    """Insert ``rows`` (``key``, ``value``), a key already kept taking the new value, in
    one statement of the database's own upsert: PostgreSQL and SQLite ``INSERT … ON
    CONFLICT (key) DO UPDATE``, MariaDB/MySQL ``INSERT … ON DUPLICATE KEY UPDATE``.

    A delete then an insert was not one: two transactions putting one key at once (the
    daemon noting what a server loaded while ``sync --once`` notes it unknown) both found
    it missing, or both deleted the same row, and the second failed on the duplicate key
    (PostgreSQL), or the two deadlocked over the gap lock the deletes took (MariaDB).
    Rows go in key order, so two writers of several keys lock them in the same order."""
    rows = sorted(rows, key=lambda row: row["key"])
    statement: Insert
    if conn.dialect.name in ("mysql", "mariadb"):
        mysql = mysql_insert(daemon_state)
        statement = mysql.on_duplicate_key_update(value=mysql.inserted.value)
    elif conn.dialect.name == "postgresql":
        pg = pg_insert(daemon_state)
        statement = pg.on_conflict_do_update(
            index_elements=[daemon_state.c.key], set_={"value": pg.excluded.value}
        )
    else:  # SQLite, the third store
        lite = sqlite_insert(daemon_state)
        statement = lite.on_conflict_do_update(
            index_elements=[daemon_state.c.key], set_={"value": lite.excluded.value}
        )
    conn.execute(statement, rows)


def drop_state(conn: Connection, key: str) -> None:
    """Forget ``key`` (nothing when it is not kept)."""
    conn.execute(delete(daemon_state).where(daemon_state.c.key == key))


def write_states(conn: Connection, put: Mapping[str, str], drop: Collection[str] = ()) -> None:
    """Forget the keys of ``drop`` and keep each value of ``put`` under its key (a key in
    both is kept), in the caller's transaction: a few statements however many keys
    (deletes in chunks, one multi-row upsert as :func:`put_state`'s), so a batch's notes
    cost one round of writes, not one per key."""
    keys = [key for key in drop if key not in put]
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        chunk = keys[start : start + _KEYS_PER_STATEMENT]
        conn.execute(delete(daemon_state).where(daemon_state.c.key.in_(chunk)))
    if put:
        _upsert(conn, [{"key": k, "value": v} for k, v in put.items()])
