"""PostgreSQL's change trigger runs with its owner's rights, as MariaDB's run with their definer's

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 03:10:00

The trigger function ran with the rights of whoever wrote the row: an application whose
role may write ``users`` but not ``changes`` (nor use its sequence) had every write
refused ("permission denied for table changes").  The function is now ``SECURITY
DEFINER`` with the ``search_path`` it is made with.  MariaDB and MySQL triggers already
run as their definer; SQLite has no rights: unchanged.
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import definer_ddl, drop_definer_ddl

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in definer_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_definer_ddl(op.get_bind().dialect.name):
        op.execute(statement)
