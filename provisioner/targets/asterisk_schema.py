"""Asterisk's own PJSIP realtime tables (``ps_endpoints``, ``ps_auths``, ``ps_aors``) and
provisioner's ownership table, as SQLAlchemy Core tables in their own :data:`metadata`.

Column names, order, types, lengths and nullability are exactly those of Asterisk 22's
alembic schema (head ``e89e30cee53f``, as in the shared ``schema/ps_tables.sqlite3.sql``); a test
reflects that file and compares.  As upstream, there is no primary key: ``id`` is
``NOT NULL`` with a unique constraint ``<table>_id_key`` and a plain index ``<table>_id``.

Enumerated columns use :class:`sqlalchemy.Enum` with the type names Asterisk's own scripts use
(``ast_bool_values``, ``pjsip_auth_type_values_v2``, ...), which gives what each driver expects:

* PostgreSQL: a native ``CREATE TYPE ... AS ENUM``, as ``postgresql_config.sql`` and Asterisk's
  alembic create; res_config_pgsql writes quoted literals, which PostgreSQL casts to the enum.
  SQLAlchemy sends enum parameters untyped (no ``::VARCHAR`` cast), so provisioner can also
  write into tables that Asterisk's alembic created.
* MySQL/MariaDB: inline ``ENUM(...)``, as ``mysql_config.sql``; res_config_mysql and ODBC see
  strings.
* SQLite: ``VARCHAR(n)`` (n = the longest label) + ``CHECK (col IS NULL OR col IN (...))``,
  the shipped SQLite schema's rule written so SQLite checks it fast; res_config_sqlite3
  reads them as text.

The ownership table ``provisioner_objects`` (``kind``, ``id``, ``digest``) lives in the same
database and records which rows provisioner created: rows without an entry (trunks, hand-made
endpoints) are never touched.  ``digest``, on endpoint records, is a hash of the user's three
objects as last written (see :mod:`provisioner.targets.realtime`); NULL means unknown.
Tables created before it existed get it from :func:`add_missing_columns`.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Enum,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    or_,
    text,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

__all__ = [
    "DIALECTS",
    "ENUM_LABELS",
    "OWNED_KINDS",
    "add_missing_columns",
    "asterisk_ddl",
    "metadata",
    "provisioner_objects",
    "ps_aors",
    "ps_auths",
    "ps_endpoints",
]

#: Separate from the user store's metadata: these tables may live in another database.
metadata = MetaData()

#: The character set of the tables made on MySQL/MariaDB, whatever the database's default:
#: under a ``latin1`` default, a full name outside it (an emoji, a CJK character) was
#: stored in ``callerid`` as ``?`` with only a warning, and the digest compare never saw it.
MYSQL_CHARSET = "utf8mb4"

_BOOL = ("0", "1", "off", "on", "false", "true", "no", "yes")

#: Asterisk's enum type names and labels, as its alembic scripts define them.
ENUM_LABELS: dict[str, tuple[str, ...]] = {
    "ast_bool_values": _BOOL,
    "pjsip_connected_line_method_values": ("invite", "reinvite", "update"),
    "pjsip_direct_media_glare_mitigation_values": ("none", "outgoing", "incoming"),
    "pjsip_dtmf_mode_values_v3": ("rfc4733", "inband", "info", "auto", "auto_info"),
    "pjsip_timer_values": ("forced", "no", "required", "yes"),
    "pjsip_cid_privacy_values": (
        "allowed_not_screened",
        "allowed_passed_screened",
        "allowed_failed_screened",
        "allowed",
        "prohib_not_screened",
        "prohib_passed_screened",
        "prohib_failed_screened",
        "prohib",
        "unavailable",
    ),
    "pjsip_100rel_values_v2": ("no", "required", "peer_supported", "yes"),
    "pjsip_media_encryption_values": ("no", "sdes", "dtls"),
    "pjsip_t38udptl_ec_values": ("none", "fec", "redundancy"),
    "pjsip_dtls_setup_values": ("active", "passive", "actpass"),
    "pjsip_redirect_method_values": ("user", "uri_core", "uri_pjsip"),
    "sha_hash_values": ("SHA-1", "SHA-256"),
    "pjsip_incoming_call_offer_pref_values": ("local", "local_first", "remote", "remote_first"),
    "pjsip_outgoing_call_offer_pref_values": (
        "local",
        "local_merge",
        "local_first",
        "remote",
        "remote_merge",
        "remote_first",
    ),
    "security_negotiation_values": ("no", "mediasec"),
    "pjsip_auth_type_values_v2": ("md5", "userpass", "google_oauth"),
}


def _enum(name: str) -> Enum:
    """A fresh column type for Asterisk enum ``name`` (native where the database has enums)."""
    # validate_strings stays off: a bad value must fail in the database, inside the
    # transaction, exactly as it would for any other writer.  The type is not bound to
    # the metadata, so a PostgreSQL type is created only with a table that needs it.
    # Its own CHECK is off: see _sqlite_checks.
    return Enum(*ENUM_LABELS[name], name=name, create_constraint=False)


def _sqlite_checks(table: Table) -> Table:
    """Add ``CHECK (col IS NULL OR col IN (...))`` for each enum column, on SQLite only.

    Equivalent to the shipped schema's ``CHECK (col IN (...))`` (NULL passes both), but
    SQLite evaluates a bare ``IN`` list by building a temporary index for every row and
    every column: with ps_endpoints' 68 enum columns an insert costs about 0.5 ms, 50 times
    more than with the ``IS NULL`` short-circuit.
    """
    for column in list(table.c):
        if isinstance(column.type, Enum):
            check = CheckConstraint(
                or_(column.is_(None), column.in_(column.type.enums)),
                name=f"{table.name}_{column.name}_check",
            )
            table.append_constraint(check.ddl_if(dialect="sqlite"))
    return table


def _id_constraints(table: str) -> tuple[UniqueConstraint, Index]:
    """Upstream's ``UNIQUE (id)`` (named as PostgreSQL names it) and index ``<table>_id``."""
    return UniqueConstraint("id", name=f"{table}_id_key"), Index(f"{table}_id", "id")


ps_endpoints = _sqlite_checks(
    Table(
        "ps_endpoints",
        metadata,
        Column("id", String(255), nullable=False),
        Column("transport", String(40)),
        Column("aors", String(2048)),
        Column("auth", String(255)),
        Column("context", String(40)),
        Column("disallow", String(200)),
        Column("allow", String(200)),
        Column("direct_media", _enum("ast_bool_values")),
        Column("connected_line_method", _enum("pjsip_connected_line_method_values")),
        Column("direct_media_method", _enum("pjsip_connected_line_method_values")),
        Column(
            "direct_media_glare_mitigation", _enum("pjsip_direct_media_glare_mitigation_values")
        ),
        Column("disable_direct_media_on_nat", _enum("ast_bool_values")),
        Column("dtmf_mode", _enum("pjsip_dtmf_mode_values_v3")),
        Column("external_media_address", String(40)),
        Column("force_rport", _enum("ast_bool_values")),
        Column("ice_support", _enum("ast_bool_values")),
        Column("identify_by", String(80)),
        Column("mailboxes", String(40)),
        Column("moh_suggest", String(40)),
        Column("outbound_auth", String(255)),
        Column("outbound_proxy", String(255)),
        Column("rewrite_contact", _enum("ast_bool_values")),
        Column("rtp_ipv6", _enum("ast_bool_values")),
        Column("rtp_symmetric", _enum("ast_bool_values")),
        Column("send_diversion", _enum("ast_bool_values")),
        Column("send_pai", _enum("ast_bool_values")),
        Column("send_rpid", _enum("ast_bool_values")),
        Column("timers_min_se", Integer),
        Column("timers", _enum("pjsip_timer_values")),
        Column("timers_sess_expires", Integer),
        Column("callerid", String(40)),
        Column("callerid_privacy", _enum("pjsip_cid_privacy_values")),
        Column("callerid_tag", String(40)),
        Column("100rel", _enum("pjsip_100rel_values_v2")),
        Column("aggregate_mwi", _enum("ast_bool_values")),
        Column("trust_id_inbound", _enum("ast_bool_values")),
        Column("trust_id_outbound", _enum("ast_bool_values")),
        Column("use_ptime", _enum("ast_bool_values")),
        Column("use_avpf", _enum("ast_bool_values")),
        Column("media_encryption", _enum("pjsip_media_encryption_values")),
        Column("inband_progress", _enum("ast_bool_values")),
        Column("call_group", String(40)),
        Column("pickup_group", String(40)),
        Column("named_call_group", String(40)),
        Column("named_pickup_group", String(40)),
        Column("device_state_busy_at", Integer),
        Column("fax_detect", _enum("ast_bool_values")),
        Column("t38_udptl", _enum("ast_bool_values")),
        Column("t38_udptl_ec", _enum("pjsip_t38udptl_ec_values")),
        Column("t38_udptl_maxdatagram", Integer),
        Column("t38_udptl_nat", _enum("ast_bool_values")),
        Column("t38_udptl_ipv6", _enum("ast_bool_values")),
        Column("tone_zone", String(40)),
        Column("language", String(40)),
        Column("one_touch_recording", _enum("ast_bool_values")),
        Column("record_on_feature", String(40)),
        Column("record_off_feature", String(40)),
        Column("rtp_engine", String(40)),
        Column("allow_transfer", _enum("ast_bool_values")),
        Column("allow_subscribe", _enum("ast_bool_values")),
        Column("sdp_owner", String(40)),
        Column("sdp_session", String(40)),
        Column("tos_audio", String(10)),
        Column("tos_video", String(10)),
        Column("sub_min_expiry", Integer),
        Column("from_domain", String(40)),
        Column("from_user", String(40)),
        Column("mwi_from_user", String(40)),
        Column("dtls_verify", String(40)),
        Column("dtls_rekey", String(40)),
        Column("dtls_cert_file", String(200)),
        Column("dtls_private_key", String(200)),
        Column("dtls_cipher", String(200)),
        Column("dtls_ca_file", String(200)),
        Column("dtls_ca_path", String(200)),
        Column("dtls_setup", _enum("pjsip_dtls_setup_values")),
        Column("srtp_tag_32", _enum("ast_bool_values")),
        Column("media_address", String(40)),
        Column("redirect_method", _enum("pjsip_redirect_method_values")),
        Column("set_var", Text),
        Column("cos_audio", Integer),
        Column("cos_video", Integer),
        Column("message_context", String(40)),
        Column("force_avp", _enum("ast_bool_values")),
        Column("media_use_received_transport", _enum("ast_bool_values")),
        Column("accountcode", String(80)),
        Column("user_eq_phone", _enum("ast_bool_values")),
        Column("moh_passthrough", _enum("ast_bool_values")),
        Column("media_encryption_optimistic", _enum("ast_bool_values")),
        Column("rpid_immediate", _enum("ast_bool_values")),
        Column("g726_non_standard", _enum("ast_bool_values")),
        Column("rtp_keepalive", Integer),
        Column("rtp_timeout", Integer),
        Column("rtp_timeout_hold", Integer),
        Column("bind_rtp_to_media_address", _enum("ast_bool_values")),
        Column("voicemail_extension", String(40)),
        Column("mwi_subscribe_replaces_unsolicited", _enum("ast_bool_values")),
        Column("deny", String(95)),
        Column("permit", String(95)),
        Column("acl", String(40)),
        Column("contact_deny", String(95)),
        Column("contact_permit", String(95)),
        Column("contact_acl", String(40)),
        Column("subscribe_context", String(40)),
        Column("fax_detect_timeout", Integer),
        Column("contact_user", String(80)),
        Column("preferred_codec_only", _enum("ast_bool_values")),
        Column("asymmetric_rtp_codec", _enum("ast_bool_values")),
        Column("rtcp_mux", _enum("ast_bool_values")),
        Column("allow_overlap", _enum("ast_bool_values")),
        Column("refer_blind_progress", _enum("ast_bool_values")),
        Column("notify_early_inuse_ringing", _enum("ast_bool_values")),
        Column("max_audio_streams", Integer),
        Column("max_video_streams", Integer),
        Column("webrtc", _enum("ast_bool_values")),
        Column("dtls_fingerprint", _enum("sha_hash_values")),
        Column("incoming_mwi_mailbox", String(40)),
        Column("bundle", _enum("ast_bool_values")),
        Column("dtls_auto_generate_cert", _enum("ast_bool_values")),
        Column("follow_early_media_fork", _enum("ast_bool_values")),
        Column("accept_multiple_sdp_answers", _enum("ast_bool_values")),
        Column("suppress_q850_reason_headers", _enum("ast_bool_values")),
        Column("trust_connected_line", _enum("ast_bool_values")),
        Column("send_connected_line", _enum("ast_bool_values")),
        Column("ignore_183_without_sdp", _enum("ast_bool_values")),
        Column("codec_prefs_incoming_offer", String(128)),
        Column("codec_prefs_outgoing_offer", String(128)),
        Column("codec_prefs_incoming_answer", String(128)),
        Column("codec_prefs_outgoing_answer", String(128)),
        Column("stir_shaken", _enum("ast_bool_values")),
        Column("send_history_info", _enum("ast_bool_values")),
        Column("allow_unauthenticated_options", _enum("ast_bool_values")),
        Column("t38_bind_udptl_to_media_address", _enum("ast_bool_values")),
        Column("geoloc_incoming_call_profile", String(80)),
        Column("geoloc_outgoing_call_profile", String(80)),
        Column("incoming_call_offer_pref", _enum("pjsip_incoming_call_offer_pref_values")),
        Column("outgoing_call_offer_pref", _enum("pjsip_outgoing_call_offer_pref_values")),
        Column("stir_shaken_profile", String(80)),
        Column("security_negotiation", _enum("security_negotiation_values")),
        Column("security_mechanisms", String(512)),
        Column("send_aoc", _enum("ast_bool_values")),
        Column("overlap_context", String(80)),
        Column("tenantid", String(80)),
        Column("suppress_moh_on_sendonly", _enum("ast_bool_values")),
        Column("follow_redirect_methods", String(95)),
        Column("rtp_port_start", Integer),
        Column("rtp_port_end", Integer),
        *_id_constraints("ps_endpoints"),
        mysql_charset=MYSQL_CHARSET,
    )
)

ps_auths = _sqlite_checks(
    Table(
        "ps_auths",
        metadata,
        Column("id", String(255), nullable=False),
        Column("auth_type", _enum("pjsip_auth_type_values_v2")),
        Column("nonce_lifetime", Integer),
        Column("md5_cred", String(40)),
        Column("password", String(80)),
        Column("realm", String(255)),
        Column("username", String(40)),
        Column("refresh_token", String(255)),
        Column("oauth_clientid", String(255)),
        Column("oauth_secret", String(255)),
        Column("password_digest", String(1024)),
        Column("supported_algorithms_uas", String(1024)),
        Column("supported_algorithms_uac", String(1024)),
        *_id_constraints("ps_auths"),
        mysql_charset=MYSQL_CHARSET,
    )
)

ps_aors = _sqlite_checks(
    Table(
        "ps_aors",
        metadata,
        Column("id", String(255), nullable=False),
        Column("contact", String(255)),
        Column("default_expiration", Integer),
        Column("mailboxes", String(80)),
        Column("max_contacts", Integer),
        Column("minimum_expiration", Integer),
        Column("remove_existing", _enum("ast_bool_values")),
        Column("qualify_frequency", Integer),
        Column("authenticate_qualify", _enum("ast_bool_values")),
        Column("maximum_expiration", Integer),
        Column("outbound_proxy", String(255)),
        Column("support_path", _enum("ast_bool_values")),
        Column("qualify_timeout", Float),
        Column("voicemail_extension", String(40)),
        Column("remove_unavailable", _enum("ast_bool_values")),
        Column("qualify_2xx_only", _enum("ast_bool_values")),
        *_id_constraints("ps_aors"),
        Index("ps_aors_qualifyfreq_contact", "qualify_frequency", "contact"),
        mysql_charset=MYSQL_CHARSET,
    )
)

#: Object kinds (as in :attr:`provisioner.targets.Change.changed_objects`) and their tables.
OWNED_KINDS: dict[str, Table] = {"endpoint": ps_endpoints, "auth": ps_auths, "aor": ps_aors}

provisioner_objects = Table(
    "provisioner_objects",
    metadata,
    Column("kind", String(16), nullable=False),
    Column("id", String(255), nullable=False),
    Column("digest", String(32)),
    PrimaryKeyConstraint("kind", "id", name="provisioner_objects_pkey"),
    mysql_charset=MYSQL_CHARSET,
)


def add_missing_columns(conn: Connection) -> list[str]:
    """Add to an existing ``provisioner_objects`` the (nullable) columns it lacks, as made
    by an older provisioner; return their names.  Asterisk's own tables are never altered."""
    table = provisioner_objects
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    quote = conn.dialect.identifier_preparer
    added = []
    for column in table.c:
        if column.name in present:
            continue
        # Our own constant names and types, quoted by the dialect: no input is formatted in.
        kind = column.type.compile(dialect=conn.dialect)
        name = quote.format_column(column)
        conn.execute(text(f"ALTER TABLE {quote.format_table(table)} ADD COLUMN {name} {kind}"))
        added.append(column.name)
    return added


DIALECTS: dict[str, Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),
}


def _enum_types_ddl(dialect: Dialect) -> list[str]:
    """``CREATE TYPE`` for each enum, once, where the database has named enum types."""
    if dialect.name != "postgresql":
        return []
    return [
        str(postgresql.CreateEnumType(postgresql.ENUM(*labels, name=name)).compile(dialect=dialect))
        for name, labels in ENUM_LABELS.items()
    ]


def asterisk_ddl(dialect: str) -> str:
    """The realtime tables' DDL for ``dialect`` (``sqlite``, ``postgresql`` or ``mysql``):
    enum types (PostgreSQL), then each table and its indexes; what ``sql/asterisk/`` holds."""
    d = DIALECTS[dialect]
    parts = [
        f"-- Asterisk PJSIP realtime tables and provisioner's ownership table, for {dialect}.\n"
        "-- Generated from provisioner/targets/asterisk_schema.py by asterisk_ddl(); do not edit.\n"
    ]
    parts += [stmt.strip() + ";\n" for stmt in _enum_types_ddl(d)]
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=d)).strip() + ";\n")
        parts += [
            str(CreateIndex(index).compile(dialect=d)).strip() + ";\n"
            for index in sorted(table.indexes, key=lambda i: str(i.name))
        ]
    return "\n".join(parts)
