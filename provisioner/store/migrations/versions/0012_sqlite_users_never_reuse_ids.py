"""SQLite's users table is AUTOINCREMENT: a purged newest user's id is never given again

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 04:40:00

Without AUTOINCREMENT SQLite gives a new row ``max(id) + 1``, so the next user added
after the newest one was purged took its id, and memory keyed by user id (the applier's
last good endpoints) could take the new user for the purged one.  SQLite cannot alter a
primary key: the table is rebuilt (the rows copied with their ids, which also starts
the table's sequence at the highest), and the triggers on it, which its drop takes
with it, are made again as they were.  Migrations run with SQLite's foreign keys off
(:func:`provisioner.store.migrate._migrating`), so the drop deletes no attribute or
summary row by its cascade.  PostgreSQL's sequences, and MariaDB's AUTO_INCREMENT
(kept across restarts since 10.2.4), never give an id again: unchanged there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.store.schema import metadata, users

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def _rebuild(*, autoincrement: bool) -> None:
    """Rebuild SQLite's ``users`` (as this revision defines it), with or without
    AUTOINCREMENT, keeping its rows and the triggers on it."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    found = sa.text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'users'")
    triggers = list(bind.execute(found).scalars())
    table = users.to_metadata(sa.MetaData(naming_convention=metadata.naming_convention))
    table.dialect_kwargs["sqlite_autoincrement"] = autoincrement
    with op.batch_alter_table("users", recreate="always", copy_from=table):
        pass
    for statement in triggers:
        op.execute(statement)


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)
