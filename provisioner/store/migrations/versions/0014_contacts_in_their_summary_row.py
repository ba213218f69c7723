"""A user's contacts live in its summary row (``contacts``): registrations is dropped

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 15:20:00

Every registration write replaced an endpoint's whole contact set: it deleted the
user's rows in ``registrations``, inserted the current ones and upserted its summary.
The set is now one JSON text column of ``registration_summary`` (an array of
``[contact_id, uri, status, user_agent, source, rtt_usec, expires_at, changed_at]``,
times as the store's timestamp text; NULL: no contact), written by the summary's own
upsert: one row an event, no contact row, index entry or delete (bench/README,
2026-12-07).  Each summary gets its contacts, ordered by URI and id; the triggers that
deleted contacts with their summary (migration 0011) go with the table, since a
summary's contacts now go with its row.  On MariaDB and MySQL, whose DDL is not
transactional, a run that failed half-way does only what is left.  Downgrading makes
the table, its contacts and its triggers again from the column, then drops it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from provisioner.store.contact_rule import contact_rule_ddl, drop_contact_rule_ddl

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_FIELDS = (
    "contact_id",
    "uri",
    "status",
    "user_agent",
    "source",
    "rtt_usec",
    "expires_at",
    "changed_at",
)


def _registrations(meta: sa.MetaData) -> sa.Table:
    """``registrations`` as migration 0011 left it (no foreign key)."""
    return sa.Table(
        "registrations",
        meta,
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("server", sa.String(length=64), nullable=False),
        sa.Column("contact_id", sa.String(length=255), nullable=False),
        sa.Column("uri", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("user_agent", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("rtt_usec", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", _Timestamp, nullable=True),
        sa.Column("changed_at", _Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "server", "contact_id", name="pk_registrations"),
        mysql_charset="utf8mb4",
    )


def _summary(meta: sa.MetaData) -> sa.Table:
    return sa.Table(
        "registration_summary",
        meta,
        sa.Column("user_id", sa.Integer()),
        sa.Column("server", sa.String(length=64)),
        sa.Column("contacts", sa.Text()),
    )


def _text(value: Any) -> Any:
    """A stored time as the store's timestamp text (other values as they are)."""
    return value.isoformat(" ", "microseconds") if isinstance(value, datetime) else value


def _time(value: Any) -> Any:
    """The store's timestamp text as a naive datetime (``None`` as it is)."""
    return None if value is None else datetime.fromisoformat(value)


def _triggers_there() -> set[str]:
    """The names of the triggers of this MariaDB/MySQL database (nothing elsewhere: the
    other databases' DDL is transactional, so a migration never ran half-way there)."""
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return set()
    query = sa.text(
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
    )
    return set(bind.execute(query).scalars())


def _columns() -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns("registration_summary")}


def upgrade() -> None:
    bind = op.get_bind()
    if "contacts" not in _columns():
        with op.batch_alter_table("registration_summary") as batch:
            batch.add_column(
                sa.Column(
                    "contacts",
                    sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"),
                    nullable=True,
                )
            )
    if not sa.inspect(bind).has_table("registrations"):
        return
    meta = sa.MetaData()
    contacts, summary = _registrations(meta), _summary(meta)
    c = contacts.c
    query = sa.select(c.user_id, c.server, *(c[name] for name in _FIELDS)).order_by(
        c.user_id, c.server, c.uri, c.contact_id
    )
    sets: dict[tuple[int, str], list[list[Any]]] = {}
    for row in bind.execute(query):
        sets.setdefault((row[0], row[1]), []).append([_text(v) for v in row[2:]])
    if sets:
        update = (
            sa.update(summary)
            .where(
                summary.c.user_id == sa.bindparam("uid"), summary.c.server == sa.bindparam("srv")
            )
            .values(contacts=sa.bindparam("set"))
        )
        params = [
            {"uid": uid, "srv": server, "set": json.dumps(found, separators=(",", ":"))}
            for (uid, server), found in sets.items()
        ]
        bind.execute(update, params)
    for statement in drop_contact_rule_ddl(bind.dialect.name):
        op.execute(statement)
    op.drop_table("registrations")


def downgrade() -> None:
    bind = op.get_bind()
    if "contacts" in _columns():
        _contacts_back(bind)
    there = _triggers_there()
    for statement in contact_rule_ddl(bind.dialect.name):
        if not any(f"TRIGGER {name} " in statement for name in there):
            op.execute(statement)


def _contacts_back(bind: sa.Connection) -> None:
    """The summaries' contacts as rows of ``registrations`` again (made when missing),
    then the column dropped.  A table already there is a downgrade's that failed after
    its insert (MariaDB/MySQL's DDL commits it): its rows are the column's, which still
    holds them all, so they are deleted and inserted anew, not inserted twice (a
    duplicate key).  Once the column is gone (a failed run's last steps were the
    triggers), the table holds them and this is not run."""
    meta = sa.MetaData()
    contacts, summary = _registrations(meta), _summary(meta)
    if sa.inspect(bind).has_table("registrations"):
        bind.execute(sa.delete(contacts))
    else:
        contacts.create(bind)
    rows = []
    query = sa.select(summary.c.user_id, summary.c.server, summary.c.contacts).where(
        summary.c.contacts.is_not(None)
    )
    for uid, server, text in bind.execute(query):
        for found in json.loads(text):
            row = dict(zip(_FIELDS, found, strict=True))
            row["expires_at"], row["changed_at"] = (
                _time(row["expires_at"]),
                _time(row["changed_at"]),
            )
            rows.append({"user_id": uid, "server": server, **row})
    if rows:
        bind.execute(sa.insert(contacts), rows)
    # Before the triggers: SQLite rebuilds the table, which would drop them.
    with op.batch_alter_table("registration_summary") as batch:
        batch.drop_column("contacts")
