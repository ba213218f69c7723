"""Schema migrations (alembic), run programmatically: ``provisioner db upgrade``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, Table, column, func, inspect, select
from sqlalchemy import table as table_clause
from sqlalchemy.exc import DBAPIError

from ..errors import StoreUnavailable
from ..logs import get_logger
from .changefeed import drop_replaced_ddl, drop_trigger_ddl
from .engine import driver_error
from .schema import metadata

__all__ = ["current_revision", "downgrade", "head_revision", "known_revision", "upgrade"]

_HERE = Path(__file__).parent / "migrations"


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_HERE))
    return cfg


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revision(revision: str) -> bool:
    """Whether this version has the migration ``revision`` (a newer one may have migrated
    the store past every migration this version knows)."""
    try:
        ScriptDirectory.from_config(_alembic_config()).get_revision(revision)
    except CommandError:
        return False
    return True


def _from_known(before: str | None) -> None:
    """Raise :class:`StoreUnavailable` when the store is at a revision this version does
    not know: alembic would end in a traceback, and no migration of ours can apply."""
    if before is not None and not known_revision(before):
        raise StoreUnavailable(
            f"the store's schema is at revision {before!r}, which this provisioner does not "
            f"know (its newest is {head_revision()!r}): a newer provisioner migrated it; "
            "run that version"
        )


def current_revision(engine: Engine) -> str | None:
    """The revision the store is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Create or migrate the schema to ``revision``; return (before, after).

    On MariaDB/MySQL, whose DDL is not transactional (each statement commits), the
    migrations run one at a time, and one that fails half-way has the tables and change
    triggers it made dropped again (``store.migration_undone``) before its error is
    raised: the store is left at the last migration that ended, and the same command
    runs again once the cause (a missing privilege, say) is fixed.  Elsewhere a failure
    rolls everything back by itself."""
    before = current_revision(engine)
    _from_known(before)
    if engine.dialect.name not in _NOT_TRANSACTIONAL:
        _run_upgrade(engine, revision)
    else:
        for step in _steps(before, revision):
            _upgrade_or_undo(engine, step)
    return before, head_revision() if revision == "head" else revision


#: Dialects whose DDL commits by itself: a failed migration keeps what it had done.
_NOT_TRANSACTIONAL = ("mysql", "mariadb")

log = get_logger(__name__)


def _run_upgrade(engine: Engine, revision: str) -> None:
    cfg = _alembic_config()
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for migrations.  On SQLite its foreign keys are
    off meanwhile (a pragma SQLite takes only outside a transaction): a table rebuilt by
    a migration is dropped and renamed, and with them on, the drop of a parent table
    would delete its children's rows (``ON DELETE CASCADE``).  The rows are checked
    against every foreign key before the commit instead: a violation rolls it all back."""
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection if engine.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if raw is not None and (
                    bad := conn.exec_driver_sql("PRAGMA foreign_key_check").first()
                ):
                    raise StoreUnavailable(
                        f"a migration left a row of {bad[0]} that breaks a foreign key to {bad[2]}"
                    )
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def _steps(before: str | None, revision: str) -> list[str]:
    """The revisions from just after ``before`` up to ``revision``, oldest first."""
    script = ScriptDirectory.from_config(_alembic_config())
    found = script.iterate_revisions(revision, before or "base")
    return [s.revision for s in reversed(list(found))]


_TRIGGERS = table_clause(
    "TRIGGERS", column("TRIGGER_NAME"), column("TRIGGER_SCHEMA"), schema="information_schema"
)


def _made(conn: Connection) -> tuple[set[str], set[str]]:
    """The store's tables and triggers there now (of this schema)."""
    triggers = conn.execute(
        select(_TRIGGERS.c.TRIGGER_NAME).where(func.database() == _TRIGGERS.c.TRIGGER_SCHEMA)
    )
    return set(inspect(conn).get_table_names()), set(triggers.scalars())


def _upgrade_or_undo(engine: Engine, step: str) -> None:
    """Migrate to ``step``; if that fails, drop what it made, then raise its error."""
    with engine.connect() as conn:
        tables, triggers = _made(conn)
    try:
        _run_upgrade(engine, step)
    except DBAPIError:
        try:
            _undo(engine, step, tables, triggers)
        except DBAPIError as exc:  # the migration's own error is the one to show
            log.error("store.migration_undo_failed", revision=step, error=driver_error(exc))
        raise


#: Tables the migrations made that the newest one no longer has (``registrations``: its
#: contacts moved into their summaries in 0014).
_RETIRED = frozenset({"registrations"})


def _undo(engine: Engine, step: str, tables: set[str], triggers: set[str]) -> None:
    """Drop the store's tables and change triggers not in ``tables`` and ``triggers``
    (what the failed migration to ``step`` made before it failed)."""
    with engine.begin() as conn:
        tables_now, triggers_now = _made(conn)
        new_tables, new_triggers = tables_now - tables, triggers_now - triggers
        dialect = conn.dialect.name
        # Only the feed's own triggers, by their constant DDL: nothing else is dropped.
        for statement in drop_trigger_ddl(dialect) + drop_replaced_ddl(dialect):
            if statement.rsplit(" ", 1)[-1] in new_triggers:
                conn.exec_driver_sql(statement)
        # A table an older migration made and a newer one dropped first: it refers to
        # the model's tables, not they to it.
        for name in sorted(new_tables & _RETIRED):
            Table(name, MetaData()).drop(conn)
        ours = [metadata.tables[name] for name in sorted(new_tables) if name in metadata.tables]
        metadata.drop_all(conn, tables=ours)
    log.warning(
        "store.migration_undone",
        revision=step,
        tables=sorted(new_tables),
        triggers=sorted(new_triggers),
    )


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str]:
    """Migrate the schema back to ``revision``; return (before, after)."""
    before = current_revision(engine)
    _from_known(before)
    cfg = _alembic_config()
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return before, revision
