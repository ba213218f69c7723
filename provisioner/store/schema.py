"""The user store's tables: the single source of truth for its schema.

Migrations (``provisioner/store/migrations``) and the hand-readable DDL in
``sql/store/`` are both checked against this module by the tests.

Portability notes:
- usernames are unique case-insensitively through ``username_key`` (the
  lowercased username) because the three databases disagree on collations;
- timestamps are naive UTC with microseconds (``DATETIME(6)`` on MariaDB);
- enumerations are ``VARCHAR`` + ``CHECK`` so another writer cannot store a
  value the renderer does not know.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects import mysql

from ..model import LOG_LEVELS, NATS, ROLES, TOAST_POSITIONS, TRANSPORTS, VIDEOS

__all__ = [
    "CONTACT_LENGTHS",
    "SUMMARY_FILLFACTOR",
    "changes",
    "daemon_state",
    "metadata",
    "profiles",
    "registration_summary",
    "user_attributes",
    "users",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Blob = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def _in(column: str, values: tuple[str, ...]) -> str:
    # Built from constants of model.py only, never from input.
    quoted = ", ".join("'" + v + "'" for v in values)
    return f"{column} IN ({quoted})"


#: Every table's character set on MySQL/MariaDB, whatever the database's default (under
#: ``latin1``, an older MariaDB's, a full name with an emoji or a CJK character was refused);
#: stores made before it are converted by migration 0006.
MYSQL_CHARSET = "utf8mb4"

profiles = Table(
    "profiles",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("description", String(1024), nullable=False, default=""),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    mysql_charset=MYSQL_CHARSET,
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("role", String(8), nullable=False),
    Column("profile_id", Integer, ForeignKey("profiles.id", ondelete="RESTRICT"), nullable=True),
    Column("username", String(64), nullable=False),
    Column("username_key", String(64), nullable=False, unique=True),
    Column("full_name", String(128), nullable=False),
    Column("email", String(254), nullable=False),
    Column("description", String(1024), nullable=False, default=""),
    # Login password: argon2 hash only.
    Column("password_hash", String(255), nullable=True),
    Column("last_password_reset_at", Timestamp, nullable=True),
    # SIP identity: the extension names endpoint and AOR; digests of
    # "username:realm:secret", never the secret.
    Column("extension", String(20), nullable=False, unique=True),
    Column("sip_realm", String(64), nullable=False),
    Column("sip_md5", String(32), nullable=False),
    Column("sip_sha256", String(64), nullable=False),
    # Voice tab.
    Column("transport", String(8), nullable=False, default="udp"),
    Column("nat", String(16), nullable=False, default="no"),
    Column("codecs", String(64), nullable=False, default="ulaw,alaw"),
    Column("context", String(79), nullable=False, default="from-sip"),
    Column("call_group", String(255), nullable=False, default=""),
    Column("pickup_group", String(255), nullable=False, default=""),
    Column("video", String(8), nullable=False, default="no"),
    # State.
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_at", Timestamp, nullable=True),
    # When the last failed login was: one lock_minutes later starts the count afresh.
    Column("failed_login_at", Timestamp, nullable=True),
    Column("deleted_at", Timestamp, nullable=True),
    # Preferences kept for the platform's UI.
    Column("log_level", String(8), nullable=True),
    Column("messenger_sound", Boolean, nullable=False, default=True),
    Column("toast_position", String(16), nullable=False, default="top-right"),
    Column("avatar", Blob, nullable=True),
    Column("avatar_type", String(32), nullable=True),
    # API key: a SHA-256 of a 256-bit random token (high entropy needs no slow hash).
    Column("apikey_hash", String(64), nullable=True, unique=True),
    Column("apikey_created_at", Timestamp, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint(_in("role", ROLES), name="role"),
    CheckConstraint(_in("transport", TRANSPORTS), name="transport"),
    CheckConstraint(_in("nat", NATS), name="nat"),
    CheckConstraint(_in("video", VIDEOS), name="video"),
    CheckConstraint("log_level IS NULL OR " + _in("log_level", LOG_LEVELS), name="log_level"),
    CheckConstraint(_in("toast_position", TOAST_POSITIONS), name="toast_position"),
    CheckConstraint("role = 'admin' OR profile_id IS NOT NULL", name="user_has_profile"),
    mysql_charset=MYSQL_CHARSET,
    # SQLite would give a purged newest user's id to the next user added (migration 0012);
    # PostgreSQL's sequence and MariaDB's AUTO_INCREMENT (kept across restarts since
    # 10.2.4) never give one again.
    sqlite_autoincrement=True,
)

user_attributes = Table(
    "user_attributes",
    metadata,
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False, default=""),
    mysql_charset=MYSQL_CHARSET,
)


# -- the change feed: filled by triggers (store/changefeed.py), read by the daemon --

changes = Table(
    "changes",
    metadata,
    # BigInteger on servers; SQLite needs INTEGER PRIMARY KEY for its rowid alias.
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("entity", String(16), nullable=False),  # "user", "profile" or "all" (a TRUNCATE)
    Column("entity_id", Integer, nullable=False),
    Column("op", String(1), nullable=False),  # I, U or D
    Column("changed_at", DateTime, nullable=False, server_default=func.current_timestamp()),
    mysql_charset=MYSQL_CHARSET,
)

#: Small durable key/value state of the daemon (the change cursor).
daemon_state = Table(
    "daemon_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
    mysql_charset=MYSQL_CHARSET,
)

# -- registration state, read back from Asterisk over AMI ------------------------

#: The size each text of a contact (:data:`registration_summary`'s ``contacts``) is cut to,
#: as the ``registrations`` table's columns held them until migration 0014.
CONTACT_LENGTHS = {"contact_id": 255, "uri": 512, "status": 32, "user_agent": 255, "source": 128}

#: PostgreSQL's fill factor of ``registration_summary`` (percent of a page filled by
#: inserts), set by migration 0003.
SUMMARY_FILLFACTOR = 50

registration_summary = Table(
    "registration_summary",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("server", String(64), primary_key=True),
    Column("state", String(16), nullable=False),  # online, offline, unreachable
    Column("device_state", String(32), nullable=False, default=""),
    # Why Asterisk does not hold the endpoint as rendered (empty when it does).
    Column("problem", String(255), nullable=False, default=""),
    Column("changed_at", Timestamp, nullable=False),
    # The user's contacts on the server, as JSON text (an array of ``[contact_id, uri,
    # status, user_agent, source, rtt_usec, expires_at, changed_at]``); NULL: none.  One
    # row written an event, no contact row, index entry or delete (migration 0014:
    # measured, a third less server time a storm's event, bench/README).  The whole set
    # is written each time, so it needs no row of its own.
    Column("contacts", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=True),
    # Every registration event rewrites its user's row.  Half of each PostgreSQL page is
    # left free so the new version fits beside the old (a HOT update: no index entry,
    # no new page, no index bloat from a daemon running for months).  Measured: a third
    # less server time per upsert; in storms after an Asterisk restart, 23-27k events/s
    # against 16-25k (README, Benchmarks).
    postgresql_with={"fillfactor": SUMMARY_FILLFACTOR},
    mysql_charset=MYSQL_CHARSET,
)
