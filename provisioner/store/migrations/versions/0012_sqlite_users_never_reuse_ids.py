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

The table is written out as it is at this revision (SQLite's own DDL, frozen here), not
taken from :mod:`provisioner.store.schema`: a later revision that changes ``users``
must not change what this one builds, or an upgrade from 0011 past it would copy
columns the table does not have yet.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

#: ``users`` at this revision, with AUTOINCREMENT (upgrade) and without (downgrade, as
#: 0011 left it), column for column.
_WITH_AUTOINCREMENT = """CREATE TABLE users_rebuilt (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    role VARCHAR(8) NOT NULL,
    profile_id INTEGER,
    username VARCHAR(64) NOT NULL,
    username_key VARCHAR(64) NOT NULL,
    full_name VARCHAR(128) NOT NULL,
    email VARCHAR(254) NOT NULL,
    description VARCHAR(1024) NOT NULL,
    password_hash VARCHAR(255),
    last_password_reset_at DATETIME,
    extension VARCHAR(20) NOT NULL,
    sip_realm VARCHAR(64) NOT NULL,
    sip_md5 VARCHAR(32) NOT NULL,
    sip_sha256 VARCHAR(64) NOT NULL,
    transport VARCHAR(8) NOT NULL,
    nat VARCHAR(16) NOT NULL,
    codecs VARCHAR(64) NOT NULL,
    context VARCHAR(79) NOT NULL,
    call_group VARCHAR(255) NOT NULL,
    pickup_group VARCHAR(255) NOT NULL,
    video VARCHAR(8) NOT NULL,
    disabled BOOLEAN NOT NULL,
    failed_logins INTEGER NOT NULL,
    locked_at DATETIME,
    failed_login_at DATETIME,
    deleted_at DATETIME,
    log_level VARCHAR(8),
    messenger_sound BOOLEAN NOT NULL,
    toast_position VARCHAR(16) NOT NULL,
    avatar BLOB,
    avatar_type VARCHAR(32),
    apikey_hash VARCHAR(64),
    apikey_created_at DATETIME,
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    CONSTRAINT ck_users_role CHECK (role IN ('admin', 'user')),
    CONSTRAINT ck_users_transport CHECK (transport IN ('udp', 'tcp', 'tls', 'ws', 'wss')),
    CONSTRAINT ck_users_nat CHECK (nat IN ('yes', 'no', 'force_rport', 'comedia', 'never', 'route')),
    CONSTRAINT ck_users_video CHECK (video IN ('yes', 'no', 'always')),
    CONSTRAINT ck_users_log_level CHECK (log_level IS NULL OR log_level IN ('error', 'warning', 'info', 'debug')),
    CONSTRAINT ck_users_toast_position CHECK (toast_position IN ('top-right', 'top-left', 'top-center', 'bottom-right', 'bottom-left', 'bottom-center')),
    CONSTRAINT ck_users_user_has_profile CHECK (role = 'admin' OR profile_id IS NOT NULL),
    CONSTRAINT fk_users_profile_id_profiles FOREIGN KEY(profile_id) REFERENCES profiles (id) ON DELETE RESTRICT,
    CONSTRAINT uq_users_username_key UNIQUE (username_key),
    CONSTRAINT uq_users_extension UNIQUE (extension),
    CONSTRAINT uq_users_apikey_hash UNIQUE (apikey_hash)
)"""
_WITHOUT_AUTOINCREMENT = """CREATE TABLE users_rebuilt (
    id INTEGER NOT NULL,
    role VARCHAR(8) NOT NULL,
    profile_id INTEGER,
    username VARCHAR(64) NOT NULL,
    username_key VARCHAR(64) NOT NULL,
    full_name VARCHAR(128) NOT NULL,
    email VARCHAR(254) NOT NULL,
    description VARCHAR(1024) NOT NULL,
    password_hash VARCHAR(255),
    last_password_reset_at DATETIME,
    extension VARCHAR(20) NOT NULL,
    sip_realm VARCHAR(64) NOT NULL,
    sip_md5 VARCHAR(32) NOT NULL,
    sip_sha256 VARCHAR(64) NOT NULL,
    transport VARCHAR(8) NOT NULL,
    nat VARCHAR(16) NOT NULL,
    codecs VARCHAR(64) NOT NULL,
    context VARCHAR(79) NOT NULL,
    call_group VARCHAR(255) NOT NULL,
    pickup_group VARCHAR(255) NOT NULL,
    video VARCHAR(8) NOT NULL,
    disabled BOOLEAN NOT NULL,
    failed_logins INTEGER NOT NULL,
    locked_at DATETIME,
    failed_login_at DATETIME,
    deleted_at DATETIME,
    log_level VARCHAR(8),
    messenger_sound BOOLEAN NOT NULL,
    toast_position VARCHAR(16) NOT NULL,
    avatar BLOB,
    avatar_type VARCHAR(32),
    apikey_hash VARCHAR(64),
    apikey_created_at DATETIME,
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    CONSTRAINT pk_users PRIMARY KEY (id),
    CONSTRAINT ck_users_role CHECK (role IN ('admin', 'user')),
    CONSTRAINT ck_users_transport CHECK (transport IN ('udp', 'tcp', 'tls', 'ws', 'wss')),
    CONSTRAINT ck_users_nat CHECK (nat IN ('yes', 'no', 'force_rport', 'comedia', 'never', 'route')),
    CONSTRAINT ck_users_video CHECK (video IN ('yes', 'no', 'always')),
    CONSTRAINT ck_users_log_level CHECK (log_level IS NULL OR log_level IN ('error', 'warning', 'info', 'debug')),
    CONSTRAINT ck_users_toast_position CHECK (toast_position IN ('top-right', 'top-left', 'top-center', 'bottom-right', 'bottom-left', 'bottom-center')),
    CONSTRAINT ck_users_user_has_profile CHECK (role = 'admin' OR profile_id IS NOT NULL),
    CONSTRAINT fk_users_profile_id_profiles FOREIGN KEY(profile_id) REFERENCES profiles (id) ON DELETE RESTRICT,
    CONSTRAINT uq_users_username_key UNIQUE (username_key),
    CONSTRAINT uq_users_extension UNIQUE (extension),
    CONSTRAINT uq_users_apikey_hash UNIQUE (apikey_hash)
)"""
#: Every row, column for column, ids kept.
_COPY = """INSERT INTO users_rebuilt (
    id, role, profile_id, username, username_key, full_name, email, description,
    password_hash, last_password_reset_at, extension, sip_realm, sip_md5,
    sip_sha256, transport, nat, codecs, context, call_group, pickup_group, video,
    disabled, failed_logins, locked_at, failed_login_at, deleted_at, log_level,
    messenger_sound, toast_position, avatar, avatar_type, apikey_hash,
    apikey_created_at, created_at, updated_at
) SELECT
    id, role, profile_id, username, username_key, full_name, email, description,
    password_hash, last_password_reset_at, extension, sip_realm, sip_md5,
    sip_sha256, transport, nat, codecs, context, call_group, pickup_group, video,
    disabled, failed_logins, locked_at, failed_login_at, deleted_at, log_level,
    messenger_sound, toast_position, avatar, avatar_type, apikey_hash,
    apikey_created_at, created_at, updated_at
FROM users"""


def _rebuild(create: str) -> None:
    """Rebuild SQLite's ``users`` as ``create`` makes it, keeping its rows (ids included)
    and the triggers on it."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    found = sa.text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'users'")
    triggers = list(bind.execute(found).scalars())
    op.execute(create)
    op.execute(_COPY)
    op.execute("DROP TABLE users")
    op.execute("ALTER TABLE users_rebuilt RENAME TO users")
    for statement in triggers:
        op.execute(statement)


def upgrade() -> None:
    _rebuild(_WITH_AUTOINCREMENT)


def downgrade() -> None:
    _rebuild(_WITHOUT_AUTOINCREMENT)
