"""What the store's catalog says of provisioner's triggers: whether each is there and
fires, and on MariaDB/MySQL whether its definer is still an account.

Read-only: a write would tell only by failing, and one rolled back still leaves the
change ids it took as a gap the daemon waits on.  Shared by the change feed
(:mod:`.changefeed`) and, up to migration 0014, the contacts' cascade (:mod:`.contact_rule`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import ColumnElement, Connection, column, func, select, tuple_
from sqlalchemy import table as table_clause
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.exc import DBAPIError

__all__ = ["NOT_ALWAYS", "TRIGGERS", "absent_or_silent", "is_mysql", "orphaned"]

#: MariaDB's and MySQL's catalog of triggers.
TRIGGERS = table_clause(
    "TRIGGERS",
    column("TRIGGER_NAME"),
    column("TRIGGER_SCHEMA"),
    column("EVENT_OBJECT_TABLE"),
    column("DEFINER"),
    schema="information_schema",
)
_ACCOUNTS = table_clause("user", column("User"), column("Host"), schema="mysql")
_SQLITE_MASTER = table_clause("sqlite_master", column("type"), column("name"))
_PG_TRIGGER = table_clause(
    "pg_trigger", column("tgname"), column("tgenabled"), column("tgrelid"), schema="pg_catalog"
)
#: pg_trigger.tgenabled of a trigger that does not fire in ordinary sessions: disabled,
#: or firing only in replica ones.
_PG_SILENT = ("D", "R")
#: pg_trigger.tgenabled of a plain ``ENABLE``: it fires in origin and local sessions only.
_PG_ORIGIN = "O"
#: What a trigger meant ``ENABLE ALWAYS`` but left at plain ``ENABLE`` loses.
NOT_ALWAYS = "not always: writes from replica sessions are missed"


def is_mysql(dialect: str) -> bool:
    """True for MariaDB and MySQL (one trigger text serves both)."""
    return dialect in (mysql.dialect.name, "mariadb")


def orphaned(conn: Connection, which: ColumnElement[bool]) -> dict[str, str] | None:
    """MariaDB/MySQL: the triggers of this database matching ``which`` (a condition on
    :data:`TRIGGERS`) whose definer (``user@host``) is no longer an account, each to
    that definer.  Such a trigger fails every statement that fires it ("The user
    specified as a definer does not exist"), and a trigger cannot run as its invoker.

    ``{}``: every definer exists.  None: it cannot be told (another database; no such
    trigger visible, as to an account without the TRIGGER privilege; ``mysql.user`` not
    readable)."""
    if not is_mysql(conn.dialect.name):
        return None
    query = select(TRIGGERS.c.TRIGGER_NAME, TRIGGERS.c.DEFINER).where(
        func.database() == TRIGGERS.c.TRIGGER_SCHEMA, which
    )
    definers = {str(name): str(definer) for name, definer in conn.execute(query).all()}
    accounts = {tuple(d.rsplit("@", 1)) for d in definers.values() if "@" in d}
    if not accounts:
        return None
    try:
        found = conn.execute(
            select(_ACCOUNTS.c.User, _ACCOUNTS.c.Host).where(
                tuple_(_ACCOUNTS.c.User, _ACCOUNTS.c.Host).in_(sorted(accounts))
            )
        ).all()
    except DBAPIError:
        return None  # no right to read the accounts: the caller says it could not tell
    existing = {f"{user}@{host}" for user, host in found}
    return {
        name: definer
        for name, definer in sorted(definers.items())
        if "@" in definer and definer not in existing
    }


def absent_or_silent(
    conn: Connection, expected: Sequence[str], *, always: Collection[str] = ()
) -> list[str] | None:
    """Of the triggers named ``expected``, those missing (``"<name> (missing)"``) or, on
    PostgreSQL, disabled (``"<name> (disabled)"``: they fire in no ordinary session), in
    the store ``conn`` reads, in ``expected``'s order, missing ones first.  On PostgreSQL
    a trigger named in ``always`` (meant ``ENABLE ALWAYS``) left at plain ``ENABLE``, as
    ``ALTER TABLE … ENABLE TRIGGER ALL`` leaves it, is named too (``"<name> (not always:
    writes from replica sessions are missed)"``): it skips sessions whose
    ``session_replication_role`` is ``replica`` (logical replication apply, pg_restore).

    ``[]``: all there.  None: it cannot be told (MariaDB/MySQL show an account without
    the TRIGGER privilege no trigger at all)."""
    dialect = conn.dialect.name
    if dialect == postgresql.dialect.name:
        found = dict(
            conn.execute(
                select(_PG_TRIGGER.c.tgname, _PG_TRIGGER.c.tgenabled).where(
                    _PG_TRIGGER.c.tgname.in_(expected),
                    func.pg_table_is_visible(_PG_TRIGGER.c.tgrelid),
                )
            ).all()
        )
        silent = []
        for name in expected:
            if found.get(name) in _PG_SILENT:
                silent.append(f"{name} (disabled)")
            elif found.get(name) == _PG_ORIGIN and name in always:
                silent.append(f"{name} ({NOT_ALWAYS})")
        return [f"{name} (missing)" for name in expected if name not in found] + silent
    if is_mysql(dialect):
        query = select(TRIGGERS.c.TRIGGER_NAME).where(func.database() == TRIGGERS.c.TRIGGER_SCHEMA)
    else:
        query = select(_SQLITE_MASTER.c.name).where(_SQLITE_MASTER.c.type == "trigger")
    there = set(conn.execute(query).scalars())
    if not there and is_mysql(dialect):
        return None
    return [f"{name} (missing)" for name in expected if name not in there]
