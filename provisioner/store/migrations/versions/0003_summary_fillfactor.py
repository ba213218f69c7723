"""registration_summary leaves half of each PostgreSQL page free (HOT updates)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:40:00

Every registration event rewrites its user's summary row; with free room in the
page PostgreSQL updates it in place of the old version (a heap-only tuple), without
a new index entry.  Pages already written keep their fill until rewritten (by
VACUUM FULL or the table's normal churn); other databases have no such setting.
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A constant, as at the time of this revision (schema.SUMMARY_FILLFACTOR).
        op.execute("ALTER TABLE registration_summary SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE registration_summary RESET (fillfactor)")
