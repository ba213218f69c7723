"""The store's DDL per database, generated from :mod:`provisioner.store.schema`.

``sql/store/<dialect>.sql`` holds this text for DBAs; a test fails when the
files and the model disagree.  Each file ends by stamping alembic's version
table, so ``provisioner db upgrade`` recognises a hand-applied schema.
"""

from __future__ import annotations

from sqlalchemy import Column, MetaData, String, Table
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateTable

from .changefeed import always_ddl, definer_ddl, replaced_ddl, trigger_ddl, truncate_ddl
from .migrate import head_revision
from .schema import metadata

__all__ = ["DIALECTS", "store_ddl"]

DIALECTS: dict[str, Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),
}

_version = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), primary_key=True),
)


def store_ddl(dialect: str) -> str:
    """``CREATE TABLE`` statements for every table, then the alembic version stamp."""
    d = DIALECTS[dialect]
    parts = [
        f"-- provisioner user store schema for {dialect}.\n"
        "-- Generated from provisioner/store/schema.py by `provisioner db ddl`; do not edit.\n"
    ]
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=d)).strip() + ";\n")
    parts.append("-- The change feed: every change to a user reaches the daemon.\n")
    feed = [
        *trigger_ddl(d.name),
        *replaced_ddl(d.name),
        *truncate_ddl(d.name),
        *definer_ddl(d.name),
        *always_ddl(d.name),
    ]
    parts.extend(statement + ";\n" for statement in feed)
    parts.append(str(CreateTable(_version).compile(dialect=d)).strip() + ";\n")
    parts.append(f"INSERT INTO alembic_version (version_num) VALUES ('{head_revision()}');\n")
    return "\n".join(parts)
