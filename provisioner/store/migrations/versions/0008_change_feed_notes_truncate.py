"""a TRUNCATE of users, attributes or profiles is noted in the change feed on PostgreSQL

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 03:00:00

``TRUNCATE users CASCADE`` (or of ``user_attributes``, ``profiles``) fires no row
trigger: the feed noted nothing and every removed user's PJSIP objects stayed live
until the next full reconcile.  A statement trigger per table notes entity ``all`` (and
NOTIFYs), and the daemon re-renders everyone.  MariaDB and MySQL have no TRUNCATE
triggers, SQLite no TRUNCATE: unchanged.
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import drop_truncate_ddl, truncate_ddl

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in truncate_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_truncate_ddl(op.get_bind().dialect.name):
        op.execute(statement)
