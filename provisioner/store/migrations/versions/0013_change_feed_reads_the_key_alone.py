"""PostgreSQL's change trigger reads the id column alone, not the whole row

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 04:40:00

The trigger function read a row's id through ``to_jsonb(row)``, which copied every
column, a user's avatar too (up to 8 MB, hex-encoded), at each write of that user: an
update of a user holding such an avatar took 54 ms instead of 1.5 ms, and a row whose
avatar passed ~128 MB could not be written at all (jsonb's size limit).  It now reads
``id`` or ``user_id`` directly, and keeps running with its owner's rights (migration
0009; ``CREATE OR REPLACE`` resets them).  MariaDB, MySQL and SQLite: unchanged.
"""

from __future__ import annotations

from alembic import op

from provisioner.store.changefeed import direct_ddl, drop_direct_ddl

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in direct_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_direct_ddl(op.get_bind().dialect.name):
        op.execute(statement)
