"""an update that changes a row's key notes its old id in the change feed too

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 10:00:00

``UPDATE users SET id = 99 WHERE id = 5`` used to note only id 99: the daemon
re-rendered user 99 and never learnt that user 5 was gone, so user 5's PJSIP
objects stayed until the next full reconcile.  The same held for an attribute
moved to another user and for a renumbered profile.  SQLite and MariaDB/MySQL get
one more update trigger per table (added beside the old ones, so there is never a
moment without an update trigger: MariaDB's DDL is not transactional);
PostgreSQL's trigger function is replaced in place (its NOTIFY is kept, and sent
for the old id too).
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import drop_old_key_ddl, old_key_ddl

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in old_key_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_old_key_ddl(op.get_bind().dialect.name):
        op.execute(statement)
