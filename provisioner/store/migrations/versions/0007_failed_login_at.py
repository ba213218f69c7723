"""users.failed_login_at: failed logins further apart than lock_minutes do not add up

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 02:50:00

Failed logins were counted until a good login, an unlock or a lock, however long ago
they were: a few mistyped passwords, then one more a year later, locked the account.
The time of the last failed login is kept so that one ``lock_minutes`` or more later
counts afresh.  A count stored before this revision has no time and counts afresh at
the next failure.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = (
        sa.DateTime()
        .with_variant(mysql.DATETIME(fsp=6), 'mariadb')
        .with_variant(mysql.DATETIME(fsp=6), 'mysql')
    )
    op.add_column('users', sa.Column('failed_login_at', timestamp, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+ has one): a batch copy would lose the triggers.
    op.drop_column('users', 'failed_login_at')
