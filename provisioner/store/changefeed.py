"""The change feed: database triggers note every change to a user, and the daemon follows.

Every insert, update and delete of a user, of its attributes or of a profile
appends a row to ``changes``, whoever made it: the CLI, another application or
a DBA in a SQL shell.  On PostgreSQL the trigger also sends
``NOTIFY provisioner_changes`` so the daemon wakes at once.

A ``TRUNCATE`` (PostgreSQL only: MariaDB and MySQL have no trigger for it) notes entity
``all``: every user is re-rendered (migration 0008).  PostgreSQL's trigger functions
run with their owner's rights (migration 0009), as MariaDB's triggers run with their
definer's: a writer needs no rights on ``changes``.  They fire in every
``session_replication_role``, ``replica`` included (migration 0010).

An update that changes a row's key (``UPDATE users SET id = 99 WHERE id = 5``, an
attribute moved to another user, a profile renumbered) notes the old id as well as
the new one, so the daemon also re-renders what the old id held (migration 0004).

The daemon keeps a durable cursor (``daemon_state``).  Ids come from a
sequence, and on PostgreSQL and MariaDB a transaction that took a lower id can
commit after one that took a higher id; :class:`CursorTracker` therefore only
moves the cursor over an id gap once the gap has stayed open for a grace
period (a rolled-back transaction leaves a gap forever), and still looks for the
gap's changes for an hour (a long transaction commits late); the cursor saved stays
below such a gap, so a restart does not end that hour.  Re-reading a change after a
restart is harmless: applying an unchanged user writes nothing.

The trigger DDL below is constant text (no input is ever formatted into it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Connection, delete, func, or_, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .schema import changes
from .state import load_state, put_state
from .triggers import TRIGGERS, absent_or_silent, is_mysql, orphaned

__all__ = [
    "NOTIFY_CHANNEL",
    "ChangeRow",
    "CursorTracker",
    "always_ddl",
    "definer_ddl",
    "direct_ddl",
    "drop_always_ddl",
    "drop_definer_ddl",
    "drop_direct_ddl",
    "drop_old_key_ddl",
    "drop_replaced_ddl",
    "drop_trigger_ddl",
    "drop_truncate_ddl",
    "load_cursor",
    "missing_definers",
    "newest_change_id",
    "old_key_ddl",
    "read_change_ids",
    "read_changes",
    "read_unapplied",
    "replaced_ddl",
    "save_cursor",
    "trigger_ddl",
    "trigger_problems",
    "truncate_ddl",
]

NOTIFY_CHANNEL = "provisioner_changes"
CURSOR_KEY = "change_cursor"

# (table, entity, id column) for every table whose rows render into PJSIP objects.
_WATCHED = (
    ("users", "user", "id"),
    ("user_attributes", "user", "user_id"),
    ("profiles", "profile", "id"),
)
_OPS = (("INSERT", "I"), ("UPDATE", "U"), ("DELETE", "D"))


def _sqlite_triggers() -> list[str]:
    out = []
    for table, entity, col in _WATCHED:
        for event, op in _OPS:
            row = "OLD" if event == "DELETE" else "NEW"
            out.append(
                f"CREATE TRIGGER trg_{table}_{event.lower()} AFTER {event} ON {table} "
                "FOR EACH ROW BEGIN INSERT INTO changes (entity, entity_id, op) "
                f"VALUES ('{entity}', {row}.{col}, '{op}'); END"
            )
    return out


def _mysql_triggers() -> list[str]:
    # One statement per trigger body: no DELIMITER games needed.
    out = []
    for table, entity, col in _WATCHED:
        for event, op in _OPS:
            row = "OLD" if event == "DELETE" else "NEW"
            out.append(
                f"CREATE TRIGGER trg_{table}_{event.lower()} AFTER {event} ON {table} "
                f"FOR EACH ROW INSERT INTO changes (entity, entity_id, op) "
                f"VALUES ('{entity}', {row}.{col}, '{op}')"
            )
    return out


def _sqlite_key_triggers() -> list[str]:
    """A trigger per table noting the old id of a row whose key an update changed."""
    return [
        f"CREATE TRIGGER trg_{table}_key_change AFTER UPDATE OF {col} ON {table} "
        f"FOR EACH ROW WHEN OLD.{col} <> NEW.{col} BEGIN "
        "INSERT INTO changes (entity, entity_id, op) "
        f"VALUES ('{entity}', OLD.{col}, 'U'); END"
        for table, entity, col in _WATCHED
    ]


def _mysql_key_triggers() -> list[str]:
    """A trigger per table noting the old id of a row whose key an update changed.

    A trigger of its own (MariaDB and MySQL run several per event), so adding it never
    leaves a moment without an update trigger: their DDL is not transactional.
    """
    return [
        f"CREATE TRIGGER trg_{table}_key_change AFTER UPDATE ON {table} "
        "FOR EACH ROW INSERT INTO changes (entity, entity_id, op) "
        f"SELECT '{entity}', OLD.{col}, 'U' FROM DUAL WHERE OLD.{col} <> NEW.{col}"
        for table, entity, col in _WATCHED
    ]


# The function as migration 0002 installed it: an update notes only the new id.
_PG_FUNCTION_0002 = f"""CREATE OR REPLACE FUNCTION provisioner_note_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    eid integer;
    opc char(1);
BEGIN
    opc := CASE TG_OP WHEN 'INSERT' THEN 'I' WHEN 'UPDATE' THEN 'U' ELSE 'D' END;
    -- The id column's name is a trigger argument; jsonb reads it from any table's row.
    IF TG_OP = 'DELETE' THEN
        eid := (to_jsonb(OLD) ->> TG_ARGV[1])::integer;
    ELSE
        eid := (to_jsonb(NEW) ->> TG_ARGV[1])::integer;
    END IF;
    INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], eid, opc);
    PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0] || ':' || eid);
    RETURN NULL;
END
$$"""

# Since migration 0004: an update that changes the key notes the old id first.
_PG_FUNCTION = f"""CREATE OR REPLACE FUNCTION provisioner_note_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    eid integer;
    old_eid integer;
    opc char(1);
BEGIN
    opc := CASE TG_OP WHEN 'INSERT' THEN 'I' WHEN 'UPDATE' THEN 'U' ELSE 'D' END;
    -- The id column's name is a trigger argument; jsonb reads it from any table's row.
    IF TG_OP = 'DELETE' THEN
        eid := (to_jsonb(OLD) ->> TG_ARGV[1])::integer;
    ELSE
        eid := (to_jsonb(NEW) ->> TG_ARGV[1])::integer;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        -- A changed key: what the old id held must be re-rendered too.
        old_eid := (to_jsonb(OLD) ->> TG_ARGV[1])::integer;
        IF old_eid <> eid THEN
            INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], old_eid, opc);
            PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0] || ':' || old_eid);
        END IF;
    END IF;
    INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], eid, opc);
    PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0] || ':' || eid);
    RETURN NULL;
END
$$"""

# Since migration 0013: the id columns read directly, not through to_jsonb(row), which
# copied every column of the row, a user's avatar too (up to 8 MB, hex-encoded), at each
# write of it: an update of a user with such an avatar took 54 ms instead of 1.5 ms.
# PL/pgSQL looks a field up only when its statement first runs: the branch of another
# table's column is never run for this one.
_PG_FUNCTION_DIRECT = f"""CREATE OR REPLACE FUNCTION provisioner_note_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    eid integer;
    old_eid integer;
    opc char(1);
BEGIN
    opc := CASE TG_OP WHEN 'INSERT' THEN 'I' WHEN 'UPDATE' THEN 'U' ELSE 'D' END;
    -- The id column's name is a trigger argument: 'id' or 'user_id'.
    IF TG_OP <> 'INSERT' THEN
        IF TG_ARGV[1] = 'user_id' THEN
            old_eid := OLD.user_id;
        ELSE
            old_eid := OLD.id;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        eid := old_eid;
    ELSIF TG_ARGV[1] = 'user_id' THEN
        eid := NEW.user_id;
    ELSE
        eid := NEW.id;
    END IF;
    IF TG_OP = 'UPDATE' AND old_eid <> eid THEN
        -- A changed key: what the old id held must be re-rendered too.
        INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], old_eid, opc);
        PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0] || ':' || old_eid);
    END IF;
    INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], eid, opc);
    PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0] || ':' || eid);
    RETURN NULL;
END
$$"""


def direct_ddl(dialect: str) -> list[str]:
    """The statements that make PostgreSQL's change trigger read the id column alone
    (migration 0013), its owner's rights kept (``CREATE OR REPLACE`` resets them); none
    on other databases, whose triggers always did."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return [_PG_FUNCTION_DIRECT, *definer_ddl(dialect)]


def drop_direct_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`direct_ddl`."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return [_PG_FUNCTION, *definer_ddl(dialect)]


# SQLite's REPLACE conflict resolution (INSERT OR REPLACE, UPDATE OR REPLACE, REPLACE INTO)
# deletes the rows in the way without firing their delete triggers (unless the writer's
# own connection turned recursive_triggers on): before a user row is written, note the
# other users sharing one of its unique keys (those of schema.users).  Noting a user that
# stays is harmless (it renders the same); a statement that fails instead takes its notes
# with it.  MariaDB's REPLACE fires the delete triggers; PostgreSQL has no REPLACE.
_NOTE_USERS_IN_THE_WAY = (
    "INSERT INTO changes (entity, entity_id, op) SELECT 'user', id, 'D' FROM users "
    "WHERE (id = NEW.id OR username_key = NEW.username_key OR extension = NEW.extension "
    "OR apikey_hash = NEW.apikey_hash)"
)


def _sqlite_replace_triggers() -> list[str]:
    """Triggers noting the users a REPLACE would delete (migration 0005)."""
    return [
        "CREATE TRIGGER trg_users_replace_insert BEFORE INSERT ON users FOR EACH ROW "
        f"BEGIN {_NOTE_USERS_IN_THE_WAY}; END",
        "CREATE TRIGGER trg_users_replace_update "
        "BEFORE UPDATE OF id, username_key, extension, apikey_hash ON users FOR EACH ROW "
        f"BEGIN {_NOTE_USERS_IN_THE_WAY} AND id <> OLD.id; END",
    ]


# A TRUNCATE fires no row trigger: PostgreSQL's statement trigger notes that every row of
# a table may have gone, as entity ``all`` (the daemon re-renders everyone).  MariaDB and
# MySQL have no TRUNCATE triggers; SQLite has no TRUNCATE.
_PG_TRUNCATE_FUNCTION = f"""CREATE OR REPLACE FUNCTION provisioner_note_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO changes (entity, entity_id, op) VALUES ('all', 0, 'D');
    PERFORM pg_notify('{NOTIFY_CHANNEL}', 'all:0');
    RETURN NULL;
END
$$"""


def truncate_ddl(dialect: str) -> list[str]:
    """The statements that make a ``TRUNCATE`` of a watched table noted on PostgreSQL
    (migration 0008); none on other databases."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return [_PG_TRUNCATE_FUNCTION] + [
        f"CREATE TRIGGER trg_{table}_truncate AFTER TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION provisioner_note_truncate()"
        for table, _, _ in _WATCHED
    ]


def drop_truncate_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`truncate_ddl`."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    out = [f"DROP TRIGGER IF EXISTS trg_{t}_truncate ON {t}" for t, _, _ in _WATCHED]
    return [*out, "DROP FUNCTION IF EXISTS provisioner_note_truncate()"]


def definer_ddl(dialect: str) -> list[str]:
    """The statements that make PostgreSQL's change trigger run with its owner's rights,
    as MariaDB's and MySQL's triggers run with their definer's (migration 0009): an
    application granted only the user tables still writes them, and is noted.  Its
    ``search_path`` is the one it was made with, so no caller's path can redirect it."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return [
        "ALTER FUNCTION provisioner_note_change() SECURITY DEFINER SET search_path FROM CURRENT"
    ]


def drop_definer_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`definer_ddl`."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return ["ALTER FUNCTION provisioner_note_change() SECURITY INVOKER RESET search_path"]


def always_ddl(dialect: str) -> list[str]:
    """The statements that make PostgreSQL's change and TRUNCATE triggers fire in every
    ``session_replication_role`` (migration 0010): a trigger left at ``ENABLE`` is skipped
    in a session set to ``replica`` (a logical replication subscriber's apply worker, a
    bulk load that skips foreign-key checks), and such writes were seen only at the next
    full reconcile.  ``ALTER TABLE … DISABLE TRIGGER`` still silences them; none on other
    databases (MariaDB and MySQL have no such role)."""
    return _enable_triggers(dialect, "ENABLE ALWAYS")


def drop_always_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`always_ddl` (the triggers fire in origin and local
    sessions only, PostgreSQL's default)."""
    return _enable_triggers(dialect, "ENABLE")


def _enable_triggers(dialect: str, mode: str) -> list[str]:
    """``ALTER TABLE … <mode> TRIGGER`` for each change and TRUNCATE trigger (PostgreSQL;
    none elsewhere).  Names from :data:`_WATCHED`, never from input."""
    if _known(dialect) != postgresql.dialect.name:
        return []
    return [
        f"ALTER TABLE {table} {mode} TRIGGER trg_{table}_{kind}"
        for table, _, _ in _WATCHED
        for kind in ("change", "truncate")
    ]


def _pg_triggers(function: str) -> list[str]:
    out = [function]
    for table, entity, col in _WATCHED:
        out.append(
            f"CREATE TRIGGER trg_{table}_change AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION provisioner_note_change('{entity}', '{col}')"
        )
    return out


def _known(dialect: str) -> str:
    """``dialect``, or ValueError when it has no change triggers."""
    if dialect in (sqlite_dialect.dialect.name, postgresql.dialect.name) or is_mysql(dialect):
        return dialect
    raise ValueError(f"no change triggers for {dialect}")


def trigger_ddl(dialect: str, *, old_keys: bool = True) -> list[str]:
    """The statements that install the change triggers on ``dialect``.

    ``old_keys=False``: the triggers as migration 0002 installed them, which note only
    the new id of an update that changes a row's key (migration 0004 adds the old id).
    """
    if _known(dialect) == postgresql.dialect.name:
        return _pg_triggers(_PG_FUNCTION_DIRECT if old_keys else _PG_FUNCTION_0002)
    if is_mysql(dialect):
        return _mysql_triggers() + (_mysql_key_triggers() if old_keys else [])
    return _sqlite_triggers() + (_sqlite_key_triggers() if old_keys else [])


def old_key_ddl(dialect: str) -> list[str]:
    """The statements that make 0002's triggers also note the old id of an update that
    changes a row's key (migration 0004)."""
    if _known(dialect) == postgresql.dialect.name:
        return [_PG_FUNCTION]
    return _mysql_key_triggers() if is_mysql(dialect) else _sqlite_key_triggers()


def drop_old_key_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`old_key_ddl`, leaving 0002's triggers."""
    if _known(dialect) == postgresql.dialect.name:
        return [_PG_FUNCTION_0002]
    return [f"DROP TRIGGER IF EXISTS trg_{t}_key_change" for t, _, _ in _WATCHED]


def replaced_ddl(dialect: str) -> list[str]:
    """The statements that make a user deleted by SQLite's REPLACE conflict resolution
    noted too (migration 0005); none on other databases."""
    if _known(dialect) == sqlite_dialect.dialect.name:
        return _sqlite_replace_triggers()
    return []


def drop_replaced_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`replaced_ddl`."""
    if _known(dialect) == sqlite_dialect.dialect.name:
        return [f"DROP TRIGGER IF EXISTS trg_users_replace_{e}" for e in ("insert", "update")]
    return []


def drop_trigger_ddl(dialect: str) -> list[str]:
    """The statements that remove what :func:`trigger_ddl` installs (either generation)."""
    if _known(dialect) == postgresql.dialect.name:
        out = [f"DROP TRIGGER IF EXISTS trg_{t}_change ON {t}" for t, _, _ in _WATCHED]
        return [*out, "DROP FUNCTION IF EXISTS provisioner_note_change()"]
    return [
        f"DROP TRIGGER IF EXISTS trg_{t}_{event.lower()}"
        for t, _, _ in _WATCHED
        for event, _ in _OPS
    ] + drop_old_key_ddl(dialect)


def missing_definers(conn: Connection) -> list[str] | None:
    """MariaDB/MySQL: the definers (``user@host``) of the triggers on the watched tables
    that are no longer an account, sorted.  Such a trigger fails the statement that fires
    it ("The user specified as a definer does not exist"), so every write to a user, an
    attribute or a profile is refused until the account is made again or the triggers
    are re-created by an existing one (a trigger cannot run as its invoker).

    ``[]``: every definer exists.  None: it cannot be told (another database; triggers
    hidden from an account without the TRIGGER privilege; ``mysql.user`` not readable).
    Read-only (:mod:`.triggers`)."""
    watched = [name for name, _, _ in _WATCHED]
    gone = orphaned(conn, TRIGGERS.c.EVENT_OBJECT_TABLE.in_(watched))
    return None if gone is None else sorted(set(gone.values()))


def _trigger_names(dialect: str) -> list[str]:
    """The names of the change feed's triggers on ``dialect`` at the newest migration."""
    if _known(dialect) == postgresql.dialect.name:
        return [f"trg_{t}_{kind}" for t, _, _ in _WATCHED for kind in ("change", "truncate")]
    names = [f"trg_{t}_{event.lower()}" for t, _, _ in _WATCHED for event, _ in _OPS]
    names += [f"trg_{t}_key_change" for t, _, _ in _WATCHED]
    if dialect == sqlite_dialect.dialect.name:
        names += [f"trg_users_replace_{e}" for e in ("insert", "update")]
    return names


def trigger_problems(conn: Connection) -> list[str] | None:
    """The change feed's triggers that are missing (``"<name> (missing)"``) or, on
    PostgreSQL, disabled (``"<name> (disabled)"``) or left at plain ``ENABLE`` (``"<name>
    (not always: writes from replica sessions are missed)"``, see :func:`always_ddl`), in
    the store ``conn`` reads: writes through them are not noted, so they reach the daemon
    only at its next full reconcile.

    ``[]``: all there.  None: it cannot be told (MariaDB/MySQL show an account without
    the TRIGGER privilege no trigger at all)."""
    names = _trigger_names(conn.dialect.name)
    return absent_or_silent(conn, names, always=names)


@dataclass(frozen=True)
class ChangeRow:
    id: int
    entity: str
    entity_id: int
    op: str


def read_changes(conn: Connection, after: int, limit: int = 10_000) -> list[ChangeRow]:
    """Changes with an id above ``after``, oldest first."""
    return _read(conn, changes.c.id > after, limit)


def read_change_ids(conn: Connection, after: int, limit: int) -> list[int]:
    """The ids of the changes above ``after``, oldest first: what a full reconcile marks
    applied (it reads the users themselves).  Ids only: after a long outage a million
    whole rows took some 230 MB, their ids a sixth of that."""
    query = select(changes.c.id).where(changes.c.id > after).order_by(changes.c.id).limit(limit)
    return list(conn.execute(query).scalars())


def _read(conn: Connection, where: ColumnElement[bool], limit: int) -> list[ChangeRow]:
    """At most ``limit`` changes matching ``where``, oldest first."""
    rows = conn.execute(
        select(changes.c.id, changes.c.entity, changes.c.entity_id, changes.c.op)
        .where(where)
        .order_by(changes.c.id)
        .limit(limit)
    )
    return [ChangeRow(r.id, r.entity, r.entity_id, r.op) for r in rows]


# Wide gap intervals per query: keeps the OR chain well under SQLite's expression depth limit.
_GAPS_PER_QUERY = 200

#: A gap of at most this many ids is re-read by its ids (an ``IN`` list), not by a range.
_NARROW = 8

#: Ids per ``IN`` list: each a bound parameter (old SQLite builds allow 999 in a statement).
_IDS_PER_QUERY = 500


def _gaps(cursor: int, seen: set[int]) -> list[tuple[int, int]]:
    """The id ranges (inclusive) above ``cursor`` and below the highest seen id not applied yet."""
    out = []
    low = cursor
    for i in sorted(seen):
        if i > low + 1:
            out.append((low + 1, i - 1))
        low = max(low, i)
    return out


def _split(gaps: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of the narrow gaps, sorted, and the wide gaps."""
    ids: list[int] = []
    wide: list[tuple[int, int]] = []
    for lo, hi in gaps:
        if hi - lo < _NARROW:
            ids.extend(range(lo, hi + 1))
        else:
            wide.append((lo, hi))
    return sorted(ids), wide


def _gap_filters(gaps: Sequence[tuple[int, int]]) -> list[ColumnElement[bool]]:
    """One filter per statement that reads ``gaps``: the narrow ones by ``IN`` lists of
    their ids, the wide ones by ``BETWEEN`` chains.

    A multi-master MariaDB (Galera: ``auto_increment_increment`` is the node count) leaves
    a one-id hole beside every change, some 3,600 after an hour: as ``BETWEEN`` chains,
    building them took SQLAlchemy 240-470 ms a poll; an ``IN`` list is one expanding
    parameter, whatever its length."""
    ids, wide = _split(gaps)
    wide.sort()
    # (lowest id, filter): the statements run lowest first, so a read cut short by the
    # row limit has the oldest changes.
    out: list[tuple[int, ColumnElement[bool]]] = [
        (ids[start], changes.c.id.in_(ids[start : start + _IDS_PER_QUERY]))
        for start in range(0, len(ids), _IDS_PER_QUERY)
    ]
    for start in range(0, len(wide), _GAPS_PER_QUERY):
        chunk = wide[start : start + _GAPS_PER_QUERY]
        out.append((chunk[0][0], or_(*(changes.c.id.between(lo, hi) for lo, hi in chunk))))
    return [where for _, where in sorted(out, key=lambda pair: pair[0])]


def read_unapplied(
    conn: Connection, tracker: CursorTracker, limit: int = 10_000
) -> list[ChangeRow]:
    """The changes ``tracker`` has not applied yet, oldest first.

    New changes are read from above the highest applied id, so applied ids
    waiting above a gap never crowd them out of ``limit``; the gaps themselves
    and the holes (open transactions and rollbacks; on a multi-master MariaDB one
    beside every change) are re-read apart, at most ``limit`` rows of them too,
    the narrow ones by their ids (:func:`_gap_filters`).
    """
    top = max(tracker.seen, default=tracker.cursor)
    found: list[ChangeRow] = []
    for where in _gap_filters(tracker.hole_ranges() + _gaps(tracker.cursor, tracker.seen)):
        if len(found) >= limit:
            break
        found += _read(conn, where, limit - len(found))
    found.sort(key=lambda r: r.id)
    found += read_changes(conn, top, limit)
    return tracker.fresh(found)


def load_cursor(conn: Connection) -> int:
    """The durable cursor: every change up to it has been applied (0 at first start)."""
    value = load_state(conn, CURSOR_KEY)
    return int(value) if value is not None else 0


def newest_change_id(conn: Connection) -> int:
    """The highest change id in the table (0 when it is empty)."""
    return int(conn.execute(select(func.max(changes.c.id))).scalar_one_or_none() or 0)


def save_cursor(conn: Connection, cursor: int) -> None:
    """Persist the cursor, in the caller's transaction."""
    put_state(conn, CURSOR_KEY, str(cursor))


#: Changes one pruning statement deletes at most (each id a bound parameter: old SQLite
#: builds allow 999 in a statement).
_PRUNE_BATCH = 500


def prune_changes(conn: Connection, upto: int, most: int | None = None) -> int:
    """Delete applied changes at or below ``upto``, always keeping the newest row, the
    oldest first and at most about ``most`` of them (None: all; a statement's batch is
    not cut); return how many.

    The newest row stays because SQLite (without AUTOINCREMENT) hands out
    ``max(id) + 1`` next: an emptied table would reuse ids below the cursor, and
    those changes would be skipped.

    Rows go by the ids a plain read finds (committed ones), never by a range: InnoDB
    locks the first row past a range it deletes, and when that row is a change another
    transaction has not committed yet (the gap the cursor waits on, below newer
    changes), the prune, and the daemon's apply with it, would wait for that
    transaction, up to ``innodb_lock_wait_timeout`` (50 s), and then fail.
    """
    newest = conn.execute(select(func.max(changes.c.id))).scalar_one_or_none()
    if newest is None:
        return 0
    upto = min(upto, newest - 1)
    pruned, after = 0, None
    while True:
        query = select(changes.c.id).where(changes.c.id <= upto)
        if after is not None:
            query = query.where(changes.c.id > after)
        ids = list(conn.execute(query.order_by(changes.c.id).limit(_PRUNE_BATCH)).scalars())
        if not ids:
            return pruned
        pruned += conn.execute(delete(changes).where(changes.c.id.in_(ids))).rowcount or 0
        after = ids[-1]
        if most is not None and pruned >= most:
            return pruned


#: Seconds the changes of a gap the cursor moved past are still looked for: a transaction
#: that held its change ids that long (a big import) still goes live when it commits.
HOLE_LIFE = 3600.0


@dataclass
class CursorTracker:
    """Which change ids have been applied, and how far the durable cursor may move.

    ``cursor``: every id at or below it is applied or given up.  Ids above it
    that were applied wait in ``seen``; a gap below a seen id is skipped once it
    has been open for ``grace`` seconds (its transaction rolled back, or is
    long), counted from when an id above it was first applied: gaps that are all
    that old are skipped together, not one more per grace period.  A skipped gap
    becomes a hole, still read (:func:`read_unapplied`) for ``hole_life`` seconds, so
    a long transaction's changes are applied when it commits; the changes of holes
    are never pruned meanwhile (:meth:`prune_limit`).
    """

    cursor: int
    grace: float = 30.0
    seen: set[int] = field(default_factory=set)
    #: Per :meth:`mark` that applied ids above the cursor: the highest of them, and when
    #: (oldest first).  A gap has been open since the first of these above it.
    marks: list[tuple[int, float]] = field(default_factory=list)
    hole_life: float = HOLE_LIFE
    #: Skipped gaps: (first id, last id, when skipped).
    holes: list[tuple[int, int, float]] = field(default_factory=list)
    #: Ids of holes found and applied.
    hole_seen: set[int] = field(default_factory=set)

    def _in_hole(self, i: int) -> bool:
        return any(lo <= i <= hi for lo, hi, _ in self.holes)

    def _fresh(self, i: int) -> bool:
        if i > self.cursor:
            return i not in self.seen
        return i not in self.hole_seen and self._in_hole(i)

    def fresh(self, rows: Sequence[ChangeRow]) -> list[ChangeRow]:
        """The rows not applied yet."""
        return [r for r in rows if self._fresh(r.id)]

    def fresh_ids(self, ids: Sequence[int]) -> list[int]:
        """The ids of ``ids`` not applied yet."""
        return [i for i in ids if self._fresh(i)]

    def hole_ranges(self) -> list[tuple[int, int]]:
        """The id ranges (inclusive) of the holes still looked for."""
        return [(lo, hi) for lo, hi, _ in self.holes]

    def durable(self) -> int:
        """The cursor to save: every change at or below it is applied or given up for
        good, below every hole still looked for.  A daemon started from it looks for the
        holes' changes again (a restart must not end their hour), and re-reads the
        applied ones above it, which writes nothing."""
        return min([self.cursor, *(lo - 1 for lo, _, _ in self.holes)])

    def prune_limit(self) -> int:
        """The highest id whose change may be pruned: applied, and below every hole."""
        return self.durable()

    def mark(self, ids: Sequence[int], now: float) -> int:
        """Record ``ids`` as applied; return the new cursor."""
        above = [i for i in ids if i > self.cursor]
        self.seen.update(above)
        if above:
            self.marks.append((max(above), now))
        self.hole_seen.update(i for i in ids if i <= self.cursor and self._in_hole(i))
        while self.seen:
            nxt = self.cursor + 1
            if nxt in self.seen:
                self.seen.discard(nxt)
                self.cursor = nxt
                continue
            end = min(self.seen)
            if now - self._open_since(end) < self.grace:
                break
            # The gap stayed open for the whole grace period: move past it, and keep
            # looking for its changes a while.
            self.holes.append((self.cursor + 1, end - 1, now))
            self.cursor = end - 1
        self.marks = [m for m in self.marks if m[0] > self.cursor]
        self._forget_old_holes(now)
        return self.cursor

    def _open_since(self, end: int) -> float:
        """When the gap just below the applied id ``end`` was first open: when an id at or
        above ``end`` was first applied."""
        return next(when for top, when in self.marks if top >= end)

    def _forget_old_holes(self, now: float) -> None:
        if all(now - since < self.hole_life for _, _, since in self.holes):
            return
        self.holes = [h for h in self.holes if now - h[2] < self.hole_life]
        self.hole_seen = {i for i in self.hole_seen if self._in_hole(i)}
