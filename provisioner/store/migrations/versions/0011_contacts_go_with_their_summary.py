"""registrations has no foreign key to users: triggers delete contacts with their summary

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 01:40:00

The foreign key's check ran once per inserted contact: on PostgreSQL a fifth of the
server's time for a storm's write.  Its ``ON DELETE CASCADE`` is kept by triggers:
deleting a summary row (as deleting its user does, through the summary's foreign key,
which stays) deletes that user's contacts on that server; on MariaDB and MySQL, whose
cascades fire no trigger, deleting a user does too; on PostgreSQL a ``TRUNCATE`` of the
summaries empties the contacts (``provisioner/store/contact_rule.py``).  The triggers
are made before the foreign key goes, so the rule never lapses, and a contact whose
summary is gone (deleted in plain SQL) is deleted first; on MariaDB and MySQL,
whose DDL is not transactional, a run that failed half-way makes only what is missing.
Downgrading deletes contacts of no user, then adds the foreign key back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.store.contact_rule import contact_rule_ddl, drop_contact_rule_ddl

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_FK = "fk_registrations_user_id_users"


def _has_foreign_key() -> bool:
    names = [fk["name"] for fk in sa.inspect(op.get_bind()).get_foreign_keys("registrations")]
    return _FK in names


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


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # The table is rebuilt first: SQLite checks triggers that name it when the rebuilt
        # copy is renamed.  Its DDL is transactional: no other connection sees a lapse.
        with op.batch_alter_table("registrations", recreate="always") as batch:
            batch.drop_constraint(_FK, type_="foreignkey")
    # No contact outlives its summary from now on (the writers rely on it: a new summary
    # means no contact to delete); one left by a summary deleted in plain SQL goes.
    op.execute(
        "DELETE FROM registrations WHERE NOT EXISTS (SELECT 1 FROM registration_summary s "
        "WHERE s.user_id = registrations.user_id AND s.server = registrations.server)"
    )
    there = _triggers_there()
    for statement in contact_rule_ddl(dialect):
        if not any(f"TRIGGER {name} " in statement for name in there):
            op.execute(statement)
    if dialect != "sqlite" and _has_foreign_key():
        op.drop_constraint(_FK, "registrations", type_="foreignkey")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DELETE FROM registrations WHERE user_id NOT IN (SELECT id FROM users)")
    if dialect == "sqlite":
        for statement in drop_contact_rule_ddl(dialect):
            op.execute(statement)
        with op.batch_alter_table("registrations", recreate="always") as batch:
            batch.create_foreign_key(_FK, "users", ["user_id"], ["id"], ondelete="CASCADE")
        return
    op.create_foreign_key(_FK, "registrations", "users", ["user_id"], ["id"], ondelete="CASCADE")
    for statement in drop_contact_rule_ddl(dialect):
        op.execute(statement)
