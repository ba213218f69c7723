"""PostgreSQL's change triggers fire in sessions with session_replication_role = replica

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 05:10:00

A trigger in PostgreSQL's default state (``ENABLE``) does not fire in a session whose
``session_replication_role`` is ``replica``: a logical replication subscriber's apply
worker, or a bulk load run that way to skip foreign-key checks, wrote users that the
feed never noted, so they went live only at the next full reconcile.  The change and
TRUNCATE triggers are now ``ENABLE ALWAYS``.  MariaDB, MySQL and SQLite have no such
role: unchanged.
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import always_ddl, drop_always_ddl

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in always_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_always_ddl(op.get_bind().dialect.name):
        op.execute(statement)
