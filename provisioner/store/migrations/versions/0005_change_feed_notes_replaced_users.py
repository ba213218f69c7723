"""a user that SQLite's REPLACE conflict resolution deletes is noted in the change feed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 22:20:00

``UPDATE OR REPLACE users SET extension = '1002' WHERE id = 2`` (or an ``INSERT OR
REPLACE``) deletes the user holding extension 1002 without firing SQLite's delete
triggers: the feed noted only user 2, and the deleted user's PJSIP objects stayed live
until the next full reconcile.  Two SQLite triggers note, before a user row is written,
the other users sharing one of its unique keys.  Other databases are unchanged.
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import drop_replaced_ddl, replaced_ddl

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in replaced_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_replaced_ddl(op.get_bind().dialect.name):
        op.execute(statement)
