"""on MySQL/MariaDB every store table holds utf8mb4, whatever the database's default

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 00:20:00

Tables made in a database whose default character set is ``latin1`` (an older
MariaDB's) refused a full name holding an emoji or a CJK character.  Each store table
not already in utf8mb4 is converted (``CONVERT TO CHARACTER SET``: its text columns
too); one already in utf8mb4 is not touched, so an up-to-date store is not rebuilt.
The downgrade changes nothing: converting back could not hold the names stored since.
Other databases are unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

#: The store's tables at this revision, parents first (constants: never from input).
TABLES = (
    "profiles",
    "users",
    "user_attributes",
    "changes",
    "daemon_state",
    "registrations",
    "registration_summary",
)

_COLLATION = sa.text(
    "SELECT TABLE_COLLATION FROM information_schema.TABLES"
    " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :name"
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "mysql":
        return
    quote = bind.dialect.identifier_preparer.quote
    for name in TABLES:
        collation = bind.execute(_COLLATION, {"name": name}).scalar_one_or_none()
        if collation is not None and not collation.startswith("utf8mb4"):
            op.execute(f"ALTER TABLE {quote(name)} CONVERT TO CHARACTER SET utf8mb4")


def downgrade() -> None:
    pass
