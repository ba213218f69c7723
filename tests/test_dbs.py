"""The tests' own databases: a copy of the migrated template is the store a migration makes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, inspect, text

from provisioner.store.engine import open_engine
from provisioner.store.migrate import current_revision, head_revision, upgrade

from .dbs import migrated_database, temp_database


def _shape(engine: Engine) -> dict[str, object]:
    """Tables with their columns, keys, indexes and foreign keys; triggers where the
    backend lists them; the rows of ``alembic_version``."""
    found = inspect(engine)
    shape: dict[str, object] = {}
    for table in sorted(found.get_table_names()):
        shape[table] = (
            [(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)],
            found.get_pk_constraint(table)["constrained_columns"],
            sorted((i["name"] or "", tuple(i["column_names"])) for i in found.get_indexes(table)),
            sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], str(f.get("options")))
                for f in found.get_foreign_keys(table)
            ),
        )
    with engine.connect() as conn:
        shape["alembic_version"] = conn.execute(text("SELECT * FROM alembic_version")).all()
        shape["triggers"] = _triggers(engine, conn)
    return shape


def _triggers(engine: Engine, conn: Connection) -> list[tuple[str, ...]]:
    """Each trigger's name, table, event, timing and body (SQLite: its SQL)."""
    name = engine.dialect.name
    if name == "sqlite":
        query = "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    elif name == "postgresql":
        query = (
            "SELECT tgname, tgrelid::regclass::text, pg_get_triggerdef(oid) FROM pg_trigger"
            " WHERE NOT tgisinternal ORDER BY tgname"
        )
    else:
        query = (
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE, EVENT_MANIPULATION, ACTION_TIMING,"
            " CAST(ACTION_ORDER AS CHAR), ACTION_STATEMENT, SQL_MODE"
            " FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
            " ORDER BY TRIGGER_NAME"
        )
    return [tuple(str(v) for v in row) for row in conn.execute(text(query))]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_a_copied_store_is_the_store_a_migration_makes(backend: str, tmp_path: Path) -> None:
    """A database made by ``migrated_database`` holds the same tables, keys, indexes,
    foreign keys, triggers and revision as one migrated by ``upgrade``."""
    with temp_database(backend, tmp_path) as fresh, migrated_database(backend, tmp_path) as copy:
        made, copied = open_engine(fresh), open_engine(copy)
        try:
            upgrade(made)
            assert current_revision(copied) == head_revision()
            assert _shape(copied) == _shape(made)
        finally:
            made.dispose()
            copied.dispose()
