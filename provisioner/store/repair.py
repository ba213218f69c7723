"""Mend the store's lost triggers (``provisioner db repair``), and name them for the daemon.

The triggers are the change feed's (:mod:`.changefeed`), at the newest migration (the
contacts' cascade of migrations 0011-0013, :mod:`.contact_rule`, went with their table
in 0014).  A trigger is lost when it is missing,
on PostgreSQL disabled (or firing only in replica sessions, or left at plain
``ENABLE``: skipping replica sessions' writes), or on MariaDB/MySQL when
its definer is no longer an account.  :func:`lost_triggers` only reads the catalog (the
daemon may lack the right to create triggers); :func:`plan_repair` says, per lost
trigger, the statements that make it as a fresh ``db upgrade`` would, run as the
connecting account (on MariaDB/MySQL it becomes the definer).  Every statement is
constant text from those modules: no input is formatted into DDL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, text
from sqlalchemy.dialects import postgresql

from .changefeed import definer_ddl, replaced_ddl, trigger_ddl, truncate_ddl
from .triggers import TRIGGERS, absent_or_silent, is_mysql, orphaned

__all__ = ["REPAIR_COMMAND", "Fix", "apply_repair", "lost_triggers", "plan_repair"]

#: The command that re-creates lost triggers, as messages name it.
REPAIR_COMMAND = "provisioner db repair"

_CREATE_TRIGGER = re.compile(r"CREATE TRIGGER (\w+) .*? ON (\w+) ")
_PG_FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION (\w+)\(")
_EXECUTES = re.compile(r"EXECUTE FUNCTION (\w+)\(")
#: PostgreSQL's mode of the change feed's triggers (migration 0010).
_ALWAYS = "ENABLE ALWAYS"


@dataclass(frozen=True)
class Fix:
    """One lost trigger: its name, what is wrong (``missing``, ``disabled``, ``not always:
    writes from replica sessions are missed``, ``definer user@host gone``), and the
    statements that mend it, in order."""

    trigger: str
    problem: str
    statements: tuple[str, ...]


@dataclass(frozen=True)
class _Trigger:
    name: str
    table: str
    create: str
    #: The function it executes (PostgreSQL), else "".
    function: str


def _expected(dialect: str) -> list[_Trigger]:
    """Every trigger of the newest migration on ``dialect``, in the order it makes them.
    The change feed's fire in every ``session_replication_role`` on PostgreSQL
    (migration 0010)."""
    feed = trigger_ddl(dialect) + truncate_ddl(dialect) + replaced_ddl(dialect)
    out = []
    for statement in feed:
        if (made := _CREATE_TRIGGER.match(statement)) is None:
            continue  # a function of PostgreSQL's: see _functions
        executes = _EXECUTES.search(statement)
        function = executes.group(1) if executes else ""
        out.append(_Trigger(made.group(1), made.group(2), statement, function))
    return out


def _functions(dialect: str) -> dict[str, list[str]]:
    """PostgreSQL: each trigger function's name to the statements that make it as the
    newest migration left it (the change feed's runs with its owner's rights since 0009)."""
    if dialect != postgresql.dialect.name:
        return {}
    out: dict[str, list[str]] = {}
    for statement in trigger_ddl(dialect) + truncate_ddl(dialect):
        if (made := _PG_FUNCTION.match(statement)) is not None:
            out[made.group(1)] = [statement]
    out["provisioner_note_change"] += definer_ddl(dialect)
    return out


def _problems(
    conn: Connection, expected: Sequence[_Trigger], *, unseen_missing: bool
) -> dict[str, str] | None:
    """Each lost trigger of ``expected`` to what is wrong with it, in ``expected``'s order.

    On MariaDB/MySQL an account may be shown no trigger at all (all dropped, or it lacks
    the TRIGGER privilege): with ``unseen_missing`` every one is then taken for missing
    (creating them either mends the store or fails for want of that privilege, which is
    said), else None (it cannot be told)."""
    names = [t.name for t in expected]
    lost = absent_or_silent(conn, names, always=set(names))
    if lost is None and not unseen_missing:
        return None
    found: dict[str, str] = {}
    for entry in names if lost is None else lost:
        if lost is None:
            found[entry] = "missing"
        else:
            name, _, problem = entry.partition(" (")
            found[name] = problem.rstrip(")")
    if is_mysql(conn.dialect.name):
        gone = orphaned(conn, TRIGGERS.c.TRIGGER_NAME.in_(names)) or {}
        for name, definer in gone.items():
            found.setdefault(name, f"definer {definer} gone")
    return {name: found[name] for name in names if name in found}


def lost_triggers(conn: Connection) -> list[str]:
    """The store's lost triggers, each as ``"<name> (<problem>)"``, sorted; [] when none
    is lost or it cannot be told (an account shown no trigger on MariaDB/MySQL).
    Read-only: cheap catalog queries (a few of PostgreSQL's 0.4-0.6 ms, SQLite's
    0.1-0.2 ms, MariaDB's 3.5-4.5 ms, measured on a fresh store)."""
    problems = _problems(conn, _expected(conn.dialect.name), unseen_missing=False) or {}
    return sorted(f"{name} ({problem})" for name, problem in problems.items())


def plan_repair(conn: Connection) -> list[Fix]:
    """What mends each lost trigger of the store ``conn`` reads; [] when none is lost.
    Read-only."""
    dialect = conn.dialect.name
    expected = _expected(dialect)
    problems = _problems(conn, expected, unseen_missing=True) or {}
    functions = _functions(dialect)
    made: set[str] = set()
    out = []
    for trigger in expected:
        if (problem := problems.get(trigger.name)) is None:
            continue
        statements: list[str] = []
        if dialect == postgresql.dialect.name:
            if problem == "missing":
                if trigger.function not in made and not _has_function(conn, trigger.function):
                    statements += functions[trigger.function]
                made.add(trigger.function)
                statements.append(trigger.create)
            statements.append(f"ALTER TABLE {trigger.table} {_ALWAYS} TRIGGER {trigger.name}")
        else:
            if problem != "missing":  # a definer gone: made again by this account
                statements.append(f"DROP TRIGGER IF EXISTS {trigger.name}")
            statements.append(trigger.create)
        out.append(Fix(trigger.name, problem, tuple(statements)))
    return out


def _has_function(conn: Connection, name: str) -> bool:
    """PostgreSQL: whether function ``name()`` exists on the search path."""
    found = conn.execute(select(func.to_regprocedure(f"{name}()"))).scalar_one()
    return found is not None


def apply_repair(conn: Connection, fixes: Sequence[Fix]) -> None:
    """Run ``fixes``' statements on ``conn`` (inside the caller's transaction: one on
    PostgreSQL and SQLite; MariaDB/MySQL commit each DDL statement on its own)."""
    for fix in fixes:
        for statement in fix.statements:
            conn.execute(text(statement))
