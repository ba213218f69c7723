"""The realtime target: users as rows of Asterisk's ``ps_endpoints``, ``ps_auths`` and ``ps_aors``.

Each option of :class:`~provisioner.pjsip.UserObjects` is written to the column of the same
name; the object id goes in ``id``.  An apply finds the rows that differ from the desired
ones and, in one transaction, inserts, updates and deletes only those.

Ownership: provisioner records every row it creates in ``provisioner_objects`` (same
database).  Only recorded rows are ever updated or deleted.  A user whose endpoint, auth or
AOR id is taken by a row provisioner did not create (a trunk, a hand-made endpoint) is
skipped and reported in :attr:`Change.conflicts` and :attr:`Change.clashes`; the foreign row
is left exactly as it is, and a user moved there keeps the rows of ours its auth names
(its last good objects).  When the records are lost, :meth:`RealtimeTarget.adopt`
records again the rows that hold exactly what provisioner writes for a current user.
"Taken" is as the database compares ids: MariaDB/MySQL's usual
collations (``utf8mb4_general_ci``, ``utf8mb4_bin``, ...) ignore trailing spaces and most
ignore case, so a hand-made ``1001-AUTH`` or ``1001 `` takes ``1001-auth`` or ``1001``
(its unique key would refuse our row).  There, the ids of rows to be inserted are looked up
in the table itself when rows neither ours nor wanted were read (a chunked ``IN``, never a
query per row); PostgreSQL and SQLite compare ids byte for byte, as Python does.

Digests: each endpoint's ownership record also holds ``digest``, an MD5 of the user's three
objects as last written (everything that determines the managed values of its three rows;
the auth and AOR records leave it NULL).  A plain apply computes the desired digests and
reads only ``(id, digest)`` of the endpoint records: users whose digest matches are
unchanged and none of their rows is read, so an unchanged sync of 100k users reads 100k
short tuples and writes nothing.  Only users whose digest differs, is unknown (NULL, e.g.
records made before the column existed) or is missing (new users), and users provisioner
no longer wants, have their rows read and compared column by column, as a verifying apply
does (when they are more than half, whole tables are read instead); kept users (``keep``)
are neither, their rows are held unread.  The digests of the
last full apply are kept in memory with the objects they were computed from, by endpoint
id, so the next apply of the same (or equal) objects does not hash them again.

Drift: a managed column edited by hand, or a row deleted by hand, leaves the recorded
digest as it was, so a plain apply does not notice it.  ``apply(..., verify=True)``
compares the full contents of the managed columns of every row (those the mapping writes,
plus the SQLite defaults), puts drift back and refreshes stale digests; the daemon's
startup and periodic reconciles and ``provisioner sync --once`` verify.  Columns
provisioner never writes are left as they are.

SQLite (res_config_sqlite3) turns NULL into ``''`` in multi-row fetches and many options
reject ``''``, so on SQLite the columns Asterisk needs are filled with Asterisk's defaults
where the mapping gives no value (:data:`SQLITE_DEFAULTS`).

Registrations: a site that keeps contacts in this database (``contact =
realtime,ps_contacts`` in sorcery.conf) instead of astdb has a removed AOR's
``ps_contacts`` rows (ids ``<aor>;@<hash>``) deleted in the same transaction, as
Asterisk keeps a deleted endpoint's registrations; astdb contacts are deleted over AMI.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from functools import cache
from hashlib import md5
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    delete,
    func,
    inspect,
    literal,
    null,
    or_,
    select,
    type_coerce,
)
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ColumnElement, Select
from sqlalchemy.sql.dml import UpdateBase

from ..errors import InvalidInput, Problem
from ..gcpause import collector_paused
from ..logs import get_logger
from ..pjsip import (
    Options,
    RenderSettings,
    Skipped,
    UserObjects,
    auth_id,
    endpoint_order,
    sample_objects,
)
from ..store.bulk import (
    JSON_TABLE_CHUNK,
    Prepared,
    copy_rows,
    driver_rows,
    has_json_table,
    json_table_insert,
    json_text,
    prepare,
    run_many,
)
from ..store.engine import exclusive, open_store_engine, reading
from . import Change
from .asterisk_schema import OWNED_KINDS, add_missing_columns, metadata, provisioner_objects

if TYPE_CHECKING:
    from hashlib import _Hash

    from ..config import Config

__all__ = [
    "MAPPED_COLUMNS",
    "REDACTED_COLUMNS",
    "SQLITE_DEFAULTS",
    "Adopted",
    "Adoption",
    "LeftForeign",
    "RealtimeTarget",
    "lacking_columns",
]

log = get_logger(__name__)

#: The lock (:func:`~provisioner.store.engine.exclusive`) every writer of the realtime
#: rows holds for its transaction.
WRITER_LOCK = "provisioner_realtime"

Value = str | int | float | None
Row = tuple[Value, ...]

#: Columns the PJSIP mapping writes, per kind: always compared and written, so an option
#: the mapping stops giving (``md5_cred`` after switching to ``userpass``) is cleared.
MAPPED_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "endpoint": (
        "transport",
        "aors",
        "auth",
        "context",
        "disallow",
        "allow",
        "callerid",
        "call_group",
        "pickup_group",
        "direct_media",
        "force_rport",
        "rewrite_contact",
        "rtp_symmetric",
        "webrtc",
    ),
    "auth": (
        "auth_type",
        "username",
        "realm",
        "md5_cred",
        "password_digest",
        "supported_algorithms_uas",
        "supported_algorithms_uac",
    ),
    "aor": ("max_contacts", "remove_existing", "qualify_frequency"),
}

#: Asterisk's defaults for the columns res_config_sqlite3 cannot leave NULL (shared README,
#: "SQLite driver: NULL columns break list queries"); used on SQLite where the mapping is silent.
SQLITE_DEFAULTS: Mapping[str, Mapping[str, Value]] = {
    "endpoint": {
        "allow": "ulaw,alaw",
        "connected_line_method": "invite",
        "direct_media_method": "invite",
        "direct_media_glare_mitigation": "none",
        "dtmf_mode": "rfc4733",
        "timers_min_se": 90,
        "timers": "yes",
        "timers_sess_expires": 1800,
        "callerid_privacy": "allowed_not_screened",
        "100rel": "yes",
        "media_encryption": "no",
        "device_state_busy_at": 0,
        "t38_udptl_ec": "none",
        "t38_udptl_maxdatagram": 0,
        "tos_audio": "0",
        "tos_video": "0",
        "sub_min_expiry": 0,
        "dtls_verify": "no",
        "dtls_rekey": "0",
        "redirect_method": "user",
        "cos_audio": 0,
        "cos_video": 0,
        "rtp_keepalive": 0,
        "rtp_timeout": 0,
        "rtp_timeout_hold": 0,
        "fax_detect_timeout": 0,
        "max_audio_streams": 1,
        "max_video_streams": 1,
        "incoming_call_offer_pref": "local",
        "outgoing_call_offer_pref": "remote_merge",
        "security_negotiation": "no",
        "rtp_port_start": 0,
        "rtp_port_end": 0,
        # Not required for list queries, but NULL makes Asterisk warn on every call.
        "sdp_owner": "-",
        "sdp_session": "Asterisk",
    },
    "auth": {"auth_type": "userpass", "nonce_lifetime": 32},
    "aor": {
        "default_expiration": 3600,
        "max_contacts": 0,
        "minimum_expiration": 60,
        "qualify_frequency": 0,
        "maximum_expiration": 7200,
        "qualify_timeout": 3.0,
    },
}

#: Secrets: a diff shows ``[redacted]`` instead of their values.
REDACTED_COLUMNS = frozenset(
    {"password_digest", "md5_cred", "password", "oauth_secret", "refresh_token"}
)

#: Ids per ``IN (...)``: well under every driver's bound-parameter limit.
CHUNK = 500
#: Ids per ``IN (...)`` looking for rows the database holds equal to ids to be inserted
#: (MariaDB/MySQL only, whose driver sends parameters inline: no parameter limit).
PROBE_CHUNK = 5000

_KINDS = ("endpoint", "auth", "aor")
_AUTH_SUFFIX = auth_id("")


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _converter(table: Table, column: str) -> Callable[[Any], Value]:
    """How an option's text becomes the value the database returns for ``column``."""
    kind = table.c[column].type
    if isinstance(kind, Integer):
        return int
    if isinstance(kind, Float):
        return float
    return str


def _user_key(kind: str, object_id: str) -> str:
    """The endpoint id an object belongs to (auth ids are ``<endpoint>-auth``)."""
    if kind == "auth" and object_id.endswith(_AUTH_SUFFIX):
        return object_id[: -len(_AUTH_SUFFIX)]
    return object_id


_first = itemgetter(0)
_second = itemgetter(1)


def _ordered(ids: Iterable[str]) -> list[str]:
    """Extension order: by length, then text (``99`` before ``100``)."""
    # Two sorts without a Python key function (the second is stable): several times
    # faster than one by a (len, text) key at 100k ids.
    return sorted(sorted(ids), key=len)


def _shared_names(options: Sequence[Options]) -> tuple[tuple[str, ...], list[str]] | None:
    """The option names of every one of ``options`` when all have the same, in the same
    order (the mapping gives every user's in one order), and all their values, one
    options tuple after the other; None when they differ, or there are none.  In C."""
    if not options:
        return None
    width = len(options[0])
    if any(map(width.__ne__, map(len, options))):
        return None
    pairs = list(chain.from_iterable(options))
    names = list(map(_first, pairs))
    shared = tuple(names[:width])
    if names != list(shared) * len(options):
        return None
    return shared, list(map(_second, pairs))


#: The object id and the options of one kind, apart (no pair built per user).
_IDS_AND_OPTIONS: dict[
    str, tuple[Callable[[UserObjects], str], Callable[[UserObjects], Options]]
] = {kind: (attrgetter(f"{kind}_id"), attrgetter(kind)) for kind in ("endpoint", "auth", "aor")}


class _Shape:
    """One table's managed columns for one apply, and how options become comparable rows.

    ``variable`` columns (what the mapping writes, in the options' own order) are read and
    compared as tuples ``(id, *values)``; ``constant`` columns (SQLite fill-ins the mapping
    never sets) are the same for every row, so the database itself finds rows that differ.
    """

    def __init__(
        self,
        kind: str,
        fill: Mapping[str, Value],
        signatures: Iterable[tuple[str, ...]],
        absent: AbstractSet[str] = frozenset(),
    ) -> None:
        """``absent``: columns of Asterisk's newest schema the table lacks (made by an
        older Asterisk): left out where no option gives them a value."""
        self.kind = kind
        self.table = OWNED_KINDS[kind]
        order: dict[str, None] = {}
        for names in signatures:
            order.update(dict.fromkeys(names))
        unknown = [c for c in order if c not in self.table.c or c == "id"]
        if unknown:
            raise InvalidInput.one(
                kind, f"{', '.join(unknown)} is not a column of {self.table.name}"
            )
        # A column only to clear (password_digest under auth_type md5) or to fill with
        # Asterisk's default: an Asterisk whose table lacks it has no such option.
        order.update(dict.fromkeys(c for c in MAPPED_COLUMNS[kind] if c not in absent))
        fill = {c: v for c, v in fill.items() if c in order or c not in absent}
        self.variable: tuple[str, ...] = tuple(order)
        self._convert = {c: _converter(self.table, c) for c in (*order, *fill)}
        self._fill = {c: self._convert[c](v) for c, v in fill.items()}
        self.constant: dict[str, Value] = {c: v for c, v in self._fill.items() if c not in order}
        self.columns: tuple[str, ...] = (*self.variable, *self.constant)
        self._builders: dict[tuple[str, ...], Callable[[str, Options], Row]] = {}

    def rows(
        self,
        object_ids: Iterable[str],
        options: Iterable[Options],
        signatures: Iterable[tuple[str, ...]],
    ) -> dict[str, Row]:
        """``{id: (id, *variable values)}`` of the objects ``object_ids`` with ``options``
        whose names are ``signatures`` (one each); unset columns get Asterisk's default
        or NULL."""
        builders = self._builders
        out: dict[str, Row] = {}
        last: tuple[str, ...] | None = None
        build: Callable[[str, Options], Row] | None = None
        for object_id, values, names in zip(object_ids, options, signatures, strict=True):
            # Nearly every user has the previous one's option names (the same strings:
            # compared by identity), so the builder is rarely looked up.
            if names != last or build is None:
                build = builders.get(names)
                if build is None:
                    build = builders[names] = self._builder(names)
                last = names
            out[object_id] = build(object_id, values)
        return out

    def column_rows(
        self, object_ids: list[str], names: tuple[str, ...], values: list[str]
    ) -> dict[str, Row] | None:
        """:meth:`rows` of objects that all have the options ``names``, in that order:
        ``values`` holds their values, object after object.  Each column is sliced out
        of ``values`` and the rows zipped from the columns, in C: no Python code runs per
        object.  None when a value does not convert to its column's number (:meth:`rows`
        then says which, as it always has)."""
        if names not in self._builders:
            # Made now for what it refuses (an option given twice), and kept for reuse.
            self._builders[names] = self._builder(names)
        width = len(names)
        columns: dict[str, Iterable[Value]] = {
            name: values[at::width] for at, name in enumerate(names)
        }
        for name in names:
            convert = self._convert[name]
            if convert is not str:
                try:
                    columns[name] = list(map(convert, columns[name]))
                except (TypeError, ValueError):
                    return None
        fill = self._fill
        ordered = [
            columns[c] if c in columns else repeat(fill.get(c), len(object_ids))
            for c in self.variable
        ]
        return dict(zip(object_ids, zip(object_ids, *ordered, strict=True), strict=True))

    def full(self, row: Row) -> Row:
        """Every managed column's value (``columns`` order), without the id."""
        return (*row[1:], *self.constant.values())

    def bound(self, rows: Iterable[Row]) -> list[Row]:
        """``(id, *every managed column's value)`` of ``rows``, as written."""
        constant = tuple(self.constant.values())
        if not constant:
            return list(rows)
        return [row + constant for row in rows]

    def _builder(self, names: tuple[str, ...]) -> Callable[[str, Options], Row]:
        if len(set(names)) != len(names):
            raise InvalidInput.one(self.kind, f"an option is given twice: {', '.join(names)}")
        rest = [c for c in self.variable if c not in names]
        tail = tuple(self._fill.get(c) for c in rest)
        converts = [
            (i, self._convert[n]) for i, n in enumerate(names) if self._convert[n] is not str
        ]
        if names == self.variable[: len(names)] and not converts:
            # The common case: options already in column order, all text.
            def fast(object_id: str, options: Options) -> Row:
                return (object_id, *map(_second, options), *tail)

            return fast
        source = {name: i for i, name in enumerate((*names, *rest))}
        pick = itemgetter(*(source[c] for c in self.variable))
        kind = self.kind

        def general(object_id: str, options: Options) -> Row:
            values: list[Value] = list(map(_second, options))
            for i, convert in converts:
                try:
                    values[i] = convert(values[i])
                except (TypeError, ValueError):
                    raise InvalidInput.one(f"{kind}.{names[i]}", "must be a number") from None
            return (object_id, *pick((*values, *tail)))

        return general


@dataclass
class _KindPlan:
    """One table's difference, before anything is written."""

    shape: _Shape
    inserts: list[Row] = field(default_factory=list)
    #: Ids of inserted rows that are already recorded as provisioner's (deleted by hand).
    reowned: set[str] = field(default_factory=set)
    #: New rows; the old ones are read only when a diff is wanted.
    updates: list[Row] = field(default_factory=list)
    #: Ids of provisioner's rows no longer wanted: their records are deleted, and their
    #: rows but for those in ``unread``.
    deletes: list[str] = field(default_factory=list)
    #: Ids of ``deletes`` whose row the read did not return under that very id (deleted
    #: by hand): only their records go, as a DELETE by that id could hit a foreign row
    #: the database holds equal to it (MariaDB/MySQL: another case, trailing spaces).
    unread: set[str] = field(default_factory=set)

    def row_deletes(self) -> list[str]:
        """The ids of the rows to delete: ``deletes`` read as they are."""
        return [oid for oid in self.deletes if oid not in self.unread]


@dataclass(frozen=True)
class _Clash:
    """A desired object whose id is taken by a row provisioner did not create."""

    kind: str
    object_id: str
    #: The taken row's id: ``object_id`` itself, or one the database holds equal to it
    #: (on MariaDB/MySQL: in another case, or with trailing spaces).
    row_id: str

    @property
    def endpoint_id(self) -> str:
        return _user_key(self.kind, self.object_id)

    def problem(self) -> Problem:
        """The user's problem: the extension its ids come from, and the foreign row."""
        table = OWNED_KINDS[self.kind].name
        if self.row_id == self.object_id:
            rule = f"{table} row {self.object_id!r} exists and was not made by provisioner"
        else:
            rule = (
                f"{table} row {self.row_id!r} was not made by provisioner and the database "
                f"compares it equal to {self.object_id!r}"
            )
        return Problem("extension", rule)


@dataclass
class _Plan:
    kinds: dict[str, _KindPlan]
    #: Desired objects whose id is someone else's row (their users are skipped).
    conflicts: list[_Clash]
    change: Change
    #: Endpoint id -> digest, for the users compared whose recorded digest is not the
    #: desired one (to record with their rows); None without a ``digest`` column.
    digests: dict[str, str] | None
    #: Endpoint id -> why a value of its objects does not fit its column's character
    #: set (their users are skipped).
    unfit: dict[str, list[Problem]] = field(default_factory=dict)


@dataclass
class _Seen:
    """What the database holds for one kind (all of it, or the ids asked for)."""

    rows: list[Row]
    ids: set[str]
    #: Rows whose constant columns differ from Asterisk's defaults.
    off_constant: set[str]


@dataclass(frozen=True)
class Adopted:
    """A current user whose rows :meth:`RealtimeTarget.adopt` records (or would) as
    provisioner's."""

    endpoint_id: str
    username: str
    #: ``(table, id)`` of each row recorded, endpoint, auth, AOR order.
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LeftForeign:
    """A current user with a row provisioner has no record of that is not exactly what it
    writes: all its rows stay foreign, and it stays a conflict."""

    endpoint_id: str
    username: str
    #: Per such row: the table, its id and each column that differs (secrets redacted).
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Adoption:
    """What :meth:`RealtimeTarget.adopt` recorded (or, in a dry run, would record)."""

    adopted: tuple[Adopted, ...] = ()
    left: tuple[LeftForeign, ...] = ()
    dry_run: bool = False


class RealtimeTarget:
    """Writes users' PJSIP objects as Asterisk realtime rows, touching only provisioner's rows."""

    def __init__(self, engine: Engine, *, sqlite_defaults: bool | None = None) -> None:
        """``sqlite_defaults`` (default: on for a SQLite engine) fills the columns
        res_config_sqlite3 needs with Asterisk's defaults."""
        self.engine = engine
        if sqlite_defaults is None:
            sqlite_defaults = engine.dialect.name == "sqlite"
        self.sqlite_defaults = sqlite_defaults
        #: Whether ``provisioner_objects.digest`` exists; looked up on first use.
        self._has_digest: bool | None = None
        #: The tables were made sure of (:meth:`create_tables`) by this object: the first
        #: write does it, not the construction, so a database down or locked when the
        #: daemon starts fails an apply (retried), not the start.
        self._tables_ready = False
        #: Endpoint id -> objects, and endpoint id -> digest, of the last full apply (a
        #: digest is a pure function of the objects): the same or equal objects are not
        #: hashed again.
        self._digest_cache: tuple[dict[str, UserObjects], dict[str, str]] = ({}, {})
        self._cache_prefix = b""
        #: The connection of the write in progress while an apply's ``guard`` runs (its
        #: transaction holds the writer lock): what else a guard writes into this
        #: database goes in it, committed with the rows or not at all (see
        #: :func:`provisioner.daemon.removal_noter`); None otherwise.
        self.writing: Connection | None = None
        #: Shapes by (kind, defaults on, distinct option names), with their row builders.
        self._shape_cache: dict[
            tuple[str, bool, tuple[tuple[str, ...], ...], frozenset[str]], _Shape
        ] = {}
        #: MD5 state after the prefix: each digest copies it instead of hashing ~1 KB again.
        self._digest_base = md5(usedforsecurity=False)
        #: Kind -> {column: character set} of text columns that are not utf8mb4
        #: (MariaDB/MySQL); read at the first write and again by every verifying apply
        #: (a table converted meanwhile is seen at the next reconcile).
        self._narrow: dict[str, dict[str, str]] | None = None
        #: Kind -> columns of Asterisk's newest schema its table lacks (an older
        #: Asterisk's); read when ``_narrow`` is.
        self._absent: dict[str, frozenset[str]] | None = None

    @classmethod
    def from_config(cls, config: Config) -> RealtimeTarget:
        """The target on ``target.url``, or on the user store's database when that is empty."""
        if config.target.url:
            return cls(open_store_engine(config.target.url, config.store, field="target.url"))
        return cls(open_store_engine(config.store.url, config.store))

    def create_tables(self) -> None:
        """Create the three PJSIP tables and the ownership table where missing, and add the
        ownership table's ``digest`` column where an older provisioner made it without one;
        never drops anything."""
        with self.engine.begin() as conn:
            _create_tables(conn)
        self._tables_made()

    def _tables_made(self) -> None:
        """The tables were made sure of, and that is committed: no need to look again."""
        self._has_digest = True  # there now: no need to look at the columns again
        self._tables_ready = True

    def plan(
        self, objects: Sequence[UserObjects], *, keep: Collection[str] = (), verify: bool = False
    ) -> Change:
        """What :meth:`apply` (with the same ``verify``) would change, with a per-row diff;
        writes nothing (a table not created yet is taken as empty)."""
        with reading(self.engine) as conn:
            missing = _missing_tables(conn)
            narrow = _narrow_columns(conn)
            absent = _absent_columns(conn, missing)
            computed = self._compute(
                conn,
                objects,
                keep,
                None,
                verify=verify,
                missing=missing,
                narrow=narrow,
                absent=absent,
            )
            diff = "".join(line + "\n" for line in _diff_lines(conn, computed))
            conn.rollback()
        return replace(computed.change, diff=diff)

    def apply(
        self,
        objects: Sequence[UserObjects],
        *,
        keep: Collection[str] = (),
        guard: Callable[[Change], None] | None = None,
        verify: bool = False,
    ) -> Change:
        """Make provisioner's rows hold exactly ``objects``, in one transaction.

        Rows of endpoint ids in ``keep`` stay as they are; ``guard`` sees the change
        before anything is written and may raise to abort (nothing is written then).

        Without ``verify`` only the recorded digests are read: a user whose digest is the
        one recorded when provisioner last wrote its rows is taken as unchanged, so a row
        edited or deleted by hand since then is not noticed.  With ``verify`` every managed
        column of every row is read and compared, such drift is put back and stale digests
        are recorded again.  Either way, users with no recorded digest (NULL) are compared
        column by column.
        """
        return self._run(objects, keep, None, guard, verify=verify)

    def adopt(self, objects: Sequence[UserObjects], *, dry_run: bool = False) -> Adoption:
        """Record as provisioner's the rows of ``objects``' ids that it has no record of
        and that hold exactly what it writes for them: every managed column (those the
        mapping writes, and on SQLite Asterisk's defaults) equal as an apply compares them,
        so the next apply finds them unchanged.  The way back when ``provisioner_objects``
        was emptied or dropped (every user a conflict then).

        A user is adopted whole or not at all: one of its rows that differs in a column,
        or whose id the database holds only as a look-alike (MariaDB/MySQL: another case,
        trailing spaces), leaves every row of that user foreign, listed with the columns
        that differ.  Only the endpoint, auth and AOR ids of ``objects`` are looked at:
        any other row (a trunk, a user no longer in the store) is never recorded.  A user
        adopted with all three rows gets its digest recorded, others none (compared
        column by column at the next apply).  One transaction under the writers' lock,
        which makes the ownership table when it is missing; with ``dry_run`` nothing is
        written (missing tables read as empty)."""
        if dry_run:
            with reading(self.engine) as conn:
                found, _records = self._adoption(conn, objects, _missing_tables(conn))
                conn.rollback()
            return replace(found, dry_run=True)
        with self.engine.connect() as conn, exclusive(conn, WRITER_LOCK):
            _create_tables(conn)
            found, records = self._adoption(conn, objects, ())
            whole = [a.endpoint_id for a in found.adopted if len(a.rows) == len(_KINDS)]
            by_id = {obj.endpoint_id: obj for obj in objects}
            digests = self._digests([by_id[e] for e in whole], remember=False)
            for kind in _KINDS:
                _record(conn, kind, records[kind], digests if kind == "endpoint" else None)
        self._tables_made()
        if found.adopted:
            log.info("realtime.adopted", users=len(found.adopted), left=len(found.left))
        return found

    def _adoption(
        self, conn: Connection, objects: Sequence[UserObjects], missing: Collection[str]
    ) -> tuple[Adoption, dict[str, list[str]]]:
        """:meth:`adopt`'s finding on ``conn`` (tables in ``missing`` read as empty), and
        the ids to record per kind."""
        absent = _absent_columns(conn, missing)
        shapes: dict[str, _Shape] = {}
        desired: dict[str, dict[str, Row]] = {}
        seen: dict[str, _Seen] = {}
        for kind in _KINDS:
            shape, desired[kind] = self._desired(kind, objects, absent.get(kind, _NONE))
            shapes[kind] = shape
            if shape.table.name in missing:
                seen[kind] = _Seen(rows=[], ids=set(), off_constant=set())
            else:
                # Many users: one read of the whole table (as a verifying apply does) is
                # much cheaper than chunked IN lists (a dry run of 10k users on
                # PostgreSQL: 0.28-0.32 s against 2.5-4.7 s).
                few = len(desired[kind]) <= CHUNK
                seen[kind] = _read(conn, shape, _ordered(desired[kind]) if few else None)
        if provisioner_objects.name in missing:
            owned: dict[str, dict[str, str | None]] = {kind: {} for kind in _KINDS}
        else:
            owned = _owned_kinds(conn, dict.fromkeys(_KINDS), False)
        by_user: dict[str, list[_Clash]] = {}
        for kind in _KINDS:
            mine = owned[kind].keys()
            for clash in _clashes(conn, kind, desired[kind].keys(), seen[kind], mine):
                by_user.setdefault(clash.endpoint_id, []).append(clash)
        reasons = {
            kind: _differences(conn, shapes[kind], desired[kind], seen[kind]) for kind in _KINDS
        }
        names = {obj.endpoint_id: obj.username for obj in objects}
        adopted: list[Adopted] = []
        left: list[LeftForeign] = []
        records: dict[str, list[str]] = {kind: [] for kind in _KINDS}
        for key in _ordered(by_user):
            clashes = sorted(by_user[key], key=lambda c: _KINDS.index(c.kind))
            why = [_why_foreign(clash, reasons[clash.kind]) for clash in clashes]
            if any(why):
                left.append(LeftForeign(key, names[key], tuple(filter(None, why))))
                continue
            for clash in clashes:
                records[clash.kind].append(clash.object_id)
            rows = tuple((OWNED_KINDS[c.kind].name, c.object_id) for c in clashes)
            adopted.append(Adopted(key, names[key], rows))
        return Adoption(tuple(adopted), tuple(left)), records

    def endpoints_of(self, usernames: Collection[str]) -> dict[str, list[str]]:
        """Provisioner's endpoint ids whose auth row's ``username`` is one of ``usernames``,
        by username, in endpoint order (no tables yet: none)."""
        names = sorted(set(usernames))
        if not names:
            return {}
        with reading(self.engine) as conn:
            if _missing_tables(conn):
                return {}
            return _endpoints_of(conn, names)

    def apply_partial(self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]) -> Change:
        """Write ``upserts`` and remove the objects of endpoint ids ``removed_ids``, reading
        and touching no other row (the daemon's one-user path).  An id in both is upserted.
        These users' rows are always compared column by column (a few rows: cheap)."""
        return self._run(upserts, (), _scope(upserts, removed_ids), None, verify=True)

    def _run(
        self,
        objects: Sequence[UserObjects],
        keep: Collection[str],
        scope: Mapping[str, set[str]] | None,
        guard: Callable[[Change], None] | None,
        *,
        verify: bool,
    ) -> Change:
        # One writer at a time (the daemon and `sync --once`, two daemons by mistake): the
        # second reads what the first committed, instead of inserting the same rows again
        # and failing on a duplicate key, or a deadlock.
        making = not self._tables_ready
        with self.engine.connect() as conn, exclusive(conn, WRITER_LOCK):
            if making:
                # Taken for made only once committed: PostgreSQL and SQLite roll DDL back
                # with a failed apply, and the next one must make them again.
                _create_tables(conn)
            # The collector paused while the rows are read, made and compared (not while
            # they are written): its collections walked the users' objects again and again.
            with collector_paused():
                if self._narrow is None or self._absent is None or (verify and scope is None):
                    self._narrow, self._absent = _column_facts(conn)
                computed = self._compute(
                    conn,
                    objects,
                    keep,
                    scope,
                    verify=verify,
                    narrow=self._narrow,
                    absent=self._absent,
                )
            if guard is not None:
                self.writing = conn
                try:
                    guard(computed.change)
                finally:
                    self.writing = None
            wrote = _write(conn, computed)
        if making:
            self._tables_made()
        return replace(computed.change, wrote=True) if wrote else computed.change

    # -- reading and comparing -------------------------------------------------

    def _digest_column(self, conn: Connection) -> bool:
        if self._has_digest is None:
            columns = inspect(conn).get_columns(provisioner_objects.name)
            self._has_digest = any(c["name"] == "digest" for c in columns)
        return self._has_digest

    def _compute(
        self,
        conn: Connection,
        objects: Sequence[UserObjects],
        keep: Collection[str],
        scope: Mapping[str, set[str]] | None,
        *,
        verify: bool,
        missing: Collection[str] = (),
        narrow: Mapping[str, Mapping[str, str]] | None = None,
        absent: Mapping[str, frozenset[str]] | None = None,
    ) -> _Plan:
        """``missing``: names of tables not created yet, read as empty (only a plan);
        ``narrow``: kind -> {column: character set} of columns that cannot hold every
        character (see :func:`_unfit`); ``absent``: kind -> the columns its table lacks
        (see :func:`_absent_columns`)."""
        unowned = provisioner_objects.name in missing
        has_digest = not unowned and self._digest_column(conn)
        digests = self._digests(objects, remember=scope is None)
        #: Every endpoint's ownership record, when they were all read for the scope.
        stored: dict[str, str | None] | None = None
        if scope is None and not verify and has_digest:
            scope, stored = _stale_scope(conn, objects, digests, keep)
        compared = objects
        if scope is not None:
            compared = [obj for obj in objects if obj.endpoint_id in scope["endpoint"]]
        shapes: dict[str, _Shape] = {}
        desired: dict[str, dict[str, Row]] = {}
        seen: dict[str, _Seen] = {}
        ids = {kind: None if scope is None else _ordered(scope[kind]) for kind in _KINDS}
        for kind in _KINDS:
            lacks = _NONE if absent is None else absent.get(kind, _NONE)
            shape, desired[kind] = self._desired(kind, compared, lacks)
            shapes[kind] = shape
            if shape.table.name in missing:
                seen[kind] = _Seen(rows=[], ids=set(), off_constant=set())
            else:
                seen[kind] = _read(conn, shape, ids[kind])
        if unowned:
            owned: dict[str, dict[str, str | None]] = {kind: {} for kind in _KINDS}
        else:
            # Every endpoint record read for the scope, and all wanted now: not read again.
            known = {"endpoint": stored} if stored is not None and scope is None else {}
            owned = _owned_kinds(conn, ids, has_digest, known)
        conflicts = [
            clash
            for kind in _KINDS
            for clash in _clashes(conn, kind, desired[kind].keys(), seen[kind], owned[kind].keys())
        ]
        unfit = _unfit(shapes, desired, narrow) if narrow else {}
        blocked = {clash.endpoint_id for clash in conflicts} | unfit.keys()
        # A blocked user moved from an endpoint of ours keeps it: skipped, it keeps its
        # last good objects, as a user that cannot be rendered does.
        kept_for = _last_good(compared, blocked, shapes["auth"], seen["auth"], owned["endpoint"])
        for endpoint_id in kept_for.keys() & desired["endpoint"].keys():
            del kept_for[endpoint_id]  # wanted by a user now: not a last good one
        last_good = kept_for.keys()
        hold = set(keep) | blocked | last_good
        kinds = {
            kind: _compare(shapes[kind], desired[kind], seen[kind], owned[kind].keys(), hold)
            for kind in _KINDS
        }
        endpoints = owned["endpoint"]
        stale = {
            ext: digests[ext]
            for ext in desired["endpoint"]
            if ext not in hold and endpoints.get(ext) != digests[ext]
        }
        change = _summarise(objects, kinds, blocked)
        recorded: AbstractSet[str] = (stored if stored is not None else endpoints).keys()
        if kept := ((set(keep) - desired["endpoint"].keys() - blocked) | last_good) & recorded:
            # Kept users' rows are held, unchanged (as a config file counts them): the
            # mass-removal guard weighs what is removed against every user held.
            change = replace(change, unchanged=change.unchanged + len(kept))
        renamed = _renamed(shapes["auth"], seen["auth"], kinds["auth"].updates)
        if renamed:
            change = replace(change, reowned=tuple(renamed))
        if blocked:
            change = replace(change, clashes=_reported(compared, conflicts, unfit))
        if kept_for:
            pairs = sorted(
                ((b, k) for k, b in kept_for.items()), key=lambda p: endpoint_order(p[0])
            )
            change = replace(change, kept_for=tuple(pairs))
        return _Plan(kinds, conflicts, change, stale if has_digest else None, unfit)

    def _digests(self, objects: Sequence[UserObjects], *, remember: bool) -> dict[str, str]:
        """``{endpoint id: digest}``; with ``remember`` the cache then holds just these."""
        prefix = _digest_prefix(self.sqlite_defaults)
        if prefix != self._cache_prefix:
            self._digest_cache, self._cache_prefix = ({}, {}), prefix
            self._digest_base = md5(prefix, usedforsecurity=False)
        objs, digests = self._digest_cache
        base = self._digest_base
        found: dict[str, str] = {}
        kept: dict[str, UserObjects] = {}
        misses = 0
        for obj in objects:
            key = obj.endpoint_id
            old = objs.get(key)
            # The same object (the applier keeps them) or an equal one: no hashing.
            if old is not None and (old is obj or old == obj):
                found[key] = digests[key]
            else:
                found[key] = _digest(base, obj)
                misses += 1
            kept[key] = obj
        if remember and (misses or len(objs) != len(kept)):
            # Two flat dicts, no tuple per user: fewer objects for the cyclic GC to track.
            self._digest_cache = (kept, found)
        return found

    def _desired(
        self, kind: str, objects: Sequence[UserObjects], absent: frozenset[str]
    ) -> tuple[_Shape, dict[str, Row]]:
        """The shape of ``kind`` for ``objects`` in a table lacking the columns ``absent``,
        and their desired rows by id (:meth:`_Shape.rows`): made column by column, in C,
        when every object has the same option names in the same order (the usual case),
        else object by object."""
        id_of, options_of = _IDS_AND_OPTIONS[kind]
        options = list(map(options_of, objects))
        shared = _shared_names(options)
        if shared is not None:
            names, values = shared
            shape = self._shape(kind, (names,), absent)
            rows = shape.column_rows(list(map(id_of, objects)), names, values)
            if rows is not None:
                return shape, rows
        signatures = [tuple(map(_first, values)) for values in options]
        shape = self._shape(kind, signatures, absent)
        return shape, shape.rows(map(id_of, objects), options, signatures)

    def _shape(
        self, kind: str, signatures: Iterable[tuple[str, ...]], absent: frozenset[str]
    ) -> _Shape:
        """The shape of ``kind`` for objects with option names ``signatures``, in a table
        lacking the columns ``absent``."""
        # Options come in the mapping's order, nearly always the same: few distinct ones.
        distinct = tuple(dict.fromkeys(signatures))
        key = (kind, self.sqlite_defaults, distinct, absent)
        shape = self._shape_cache.get(key)
        if shape is None:
            fill = SQLITE_DEFAULTS[kind] if self.sqlite_defaults else {}
            if len(self._shape_cache) >= 64:
                self._shape_cache.clear()
            # Kept: a one-user apply reuses the shape and its row builders.
            shape = self._shape_cache[key] = _Shape(kind, fill, distinct, absent)
        return shape


def _create_tables(conn: Connection) -> None:
    """Make the missing tables and ownership columns on ``conn`` (in its transaction)."""
    metadata.create_all(conn, checkfirst=True)
    add_missing_columns(conn)


def _missing_tables(conn: Connection) -> set[str]:
    """The names of the PJSIP and ownership tables not in the database yet."""
    tables = [*(OWNED_KINDS[kind] for kind in _KINDS), provisioner_objects]
    found = inspect(conn)
    return {table.name for table in tables if not found.has_table(table.name)}


_NONE: frozenset[str] = frozenset()


def _absent_columns(conn: Connection, missing: Collection[str] = ()) -> dict[str, frozenset[str]]:
    """Kind -> the columns of Asterisk's newest schema (:mod:`.asterisk_schema`) that the
    kind's table lacks: made by an older Asterisk's scripts, it has no column for an
    option that Asterisk does not have.  A table in ``missing`` (not made yet) lacks none."""
    found = inspect(conn)
    absent: dict[str, frozenset[str]] = {}
    for kind in _KINDS:
        table = OWNED_KINDS[kind]
        if table.name in missing:
            continue
        present = {column["name"] for column in found.get_columns(table.name)}
        if gone := frozenset(table.c.keys()) - present:
            absent[kind] = gone
    return absent


def lacking_columns(conn: Connection, settings: RenderSettings) -> list[str]:
    """``table.column`` of each column the mapping gives a value under ``settings`` (the
    plain sample user's options, :func:`~provisioner.pjsip.sample_objects`) that its
    table lacks (made by an older Asterisk): every apply of a user would fail on it.
    Tables not made yet lack none (the first write makes them whole)."""
    objects = sample_objects(settings)[0]  # the plain user: no WebRTC-only option
    absent = _absent_columns(conn, _missing_tables(conn))
    lacking = []
    for kind in _KINDS:
        given = {name for name, _value in _IDS_AND_OPTIONS[kind][1](objects)}
        table = OWNED_KINDS[kind].name
        lacking += [f"{table}.{c}" for c in sorted(given & absent.get(kind, _NONE))]
    return lacking


def _endpoints_of(conn: Connection, usernames: Sequence[str]) -> dict[str, list[str]]:
    """:meth:`RealtimeTarget.endpoints_of` on ``conn``."""
    endpoints, auths, po = OWNED_KINDS["endpoint"], OWNED_KINDS["auth"], provisioner_objects
    joined = endpoints.join(auths, auths.c.id == endpoints.c.auth).join(
        po, and_(po.c.kind == "endpoint", po.c.id == endpoints.c.id)
    )
    wanted = set(usernames)
    found: dict[str, list[str]] = {}
    for chunk in _chunks(usernames):
        stmt = select(endpoints.c.id, auths.c.username).select_from(joined)
        for endpoint_id, username in conn.execute(stmt.where(auths.c.username.in_(chunk))):
            # Exactly: a case-insensitive collation (MariaDB's) also finds a lookalike.
            if username in wanted:
                found.setdefault(username, []).append(str(endpoint_id))
    return {name: sorted(ids, key=endpoint_order) for name, ids in found.items()}


def _scope(upserts: Sequence[UserObjects], removed_ids: Iterable[str]) -> dict[str, set[str]]:
    """The object ids, per kind, of users ``upserts`` and of endpoint ids ``removed_ids``."""
    scope: dict[str, set[str]] = {kind: set() for kind in _KINDS}
    for obj in upserts:
        for kind, (id_of, _options_of) in _IDS_AND_OPTIONS.items():
            scope[kind].add(id_of(obj))
    for ext in removed_ids:
        scope["endpoint"].add(ext)
        scope["auth"].add(auth_id(ext))
        scope["aor"].add(ext)
    return scope


def _stale_scope(
    conn: Connection,
    objects: Sequence[UserObjects],
    digests: Mapping[str, str],
    keep: Collection[str],
) -> tuple[dict[str, set[str]] | None, dict[str, str | None]]:
    """The object ids of the users whose recorded digest is not the desired one (changed,
    new, unknown) and of the users provisioner has rows of but no longer wants (None when
    they are so many that reading whole tables is cheaper), and every endpoint's ownership
    record (``{endpoint id: digest}``, as :func:`_owned` reads them).

    Kept users (``keep``) are neither: their rows are held as they are, so reading them
    is wasted, and counting them as gone would read whole tables whenever many are kept
    (a realm change can keep everyone)."""
    stored = _owned(conn, "endpoint", None, True)
    stale = [obj for obj in objects if stored.get(obj.endpoint_id) != digests[obj.endpoint_id]]
    gone = stored.keys() - digests.keys() - set(keep)
    if 2 * (len(stale) + len(gone)) > len(stored):
        return None, stored
    return _scope(stale, gone), stored


#: Bump when what a digest covers changes: every recorded digest then differs once, and
#: the next apply compares (and where needed rewrites) every user's rows.
_DIGEST_VERSION = "1"


@cache
def _digest_prefix(sqlite_defaults: bool) -> bytes:
    """What every digest starts with: the columns the mapping owns and the defaults filled
    in, so a change of either makes every digest differ."""
    parts = [_DIGEST_VERSION]
    for kind in _KINDS:
        fill = SQLITE_DEFAULTS[kind] if sqlite_defaults else {}
        parts += [kind, *MAPPED_COLUMNS[kind]]
        parts += [f"{column}={value!r}" for column, value in sorted(fill.items())]
    return "\x1f".join((*parts, "")).encode()


def _digest(base: _Hash, obj: UserObjects) -> str:
    """Hex MD5 of the prefix ``base`` has hashed and one user's three objects (ids, option
    names and values).

    The options determine every managed value the rows are written with (columns the
    mapping gives no value get the defaults in ``prefix`` or NULL).  Option values are
    checked to hold no control characters (:func:`provisioner.pjsip.check_value`), so the
    separators cannot appear inside one.
    """
    text = "\x1e".join(
        (
            "\x1f".join(chain.from_iterable(obj.endpoint)),
            obj.auth_id,
            "\x1f".join(chain.from_iterable(obj.auth)),
            obj.aor_id,
            "\x1f".join(chain.from_iterable(obj.aor)),
        )
    )
    state = base.copy()
    state.update(text.encode())
    return state.hexdigest()


def _owned(
    conn: Connection, kind: str, ids: Sequence[str] | None, with_digest: bool
) -> dict[str, str | None]:
    """``{id: recorded digest or None}`` of provisioner's rows of ``kind``: all, or ``ids``."""
    po = provisioner_objects
    found: dict[str, str | None] = {}
    for chunk in [None] if ids is None else list(_chunks(ids)):
        if chunk is not None and not chunk:
            continue
        where = [po.c.kind == kind] + ([] if chunk is None else [po.c.id.in_(chunk)])
        if with_digest:
            found.update(driver_rows(conn.execute(select(po.c.id, po.c.digest).where(*where))))
        else:
            found.update(dict.fromkeys(conn.execute(select(po.c.id).where(*where)).scalars()))
    return found


def _owned_kinds(
    conn: Connection,
    ids: Mapping[str, Sequence[str] | None],
    has_digest: bool,
    known: Mapping[str, dict[str, str | None]] | None = None,
) -> dict[str, dict[str, str | None]]:
    """:func:`_owned` of every kind (digests of endpoint records when ``has_digest``): one
    query for all kinds when they are a few ids (the one-user path) or all records of
    each (a full apply), else one per kind.  ``known``: the records of a kind already read
    in this transaction (all of them, as ``ids`` asks), taken as they are."""
    if known:
        rest = {kind: kind_ids for kind, kind_ids in ids.items() if kind not in known}
        return dict(known) | (_owned_kinds(conn, rest, has_digest) if rest else {})
    scoped = [kind_ids for kind_ids in ids.values() if kind_ids is not None]
    if not scoped and len(ids) > 1:
        return _all_owned(conn, list(ids), has_digest)
    if len(scoped) < len(ids) or sum(map(len, scoped)) > CHUNK:
        return {
            kind: _owned(conn, kind, kind_ids, has_digest and kind == "endpoint")
            for kind, kind_ids in ids.items()
        }
    po = provisioner_objects
    found: dict[str, dict[str, str | None]] = {kind: {} for kind in ids}
    conditions = [
        and_(
            po.c.kind == kind,
            po.c.id == kind_ids[0] if len(kind_ids) == 1 else po.c.id.in_(kind_ids),
        )
        for kind, kind_ids in ids.items()
        if kind_ids
    ]
    if not conditions:
        return found
    digest = po.c.digest if has_digest else null()
    for kind, oid, value in conn.execute(
        select(po.c.kind, po.c.id, digest).where(or_(*conditions))
    ):
        found[kind][oid] = value if kind == "endpoint" else None
    return found


def _all_owned(
    conn: Connection, kinds: Sequence[str], has_digest: bool
) -> dict[str, dict[str, str | None]]:
    """Every ownership record of ``kinds``, by kind (:func:`_owned` of each with no ids, the
    endpoints' digests when ``has_digest``) in one query: a round trip per kind fewer."""
    po = provisioner_objects
    digest = po.c.digest if has_digest else null()
    found: dict[str, dict[str, str | None]] = {kind: {} for kind in kinds}
    stmt = select(po.c.kind, po.c.id, digest).where(po.c.kind.in_(kinds))
    for kind, oid, value in driver_rows(conn.execute(stmt)):
        if kind not in found:
            # Matched as the database compares (MariaDB/MySQL: case and trailing spaces
            # aside), as the query per kind would have.
            kind = next(k for k in kinds if k == str(kind).rstrip(" ").lower())
        found[kind][oid] = value if kind == "endpoint" else None
    return found


def _read(conn: Connection, shape: _Shape, ids: Sequence[str] | None) -> _Seen:
    """The rows (variable columns) and ids of one kind: the whole table, or rows ``ids``."""
    table = shape.table
    stmt, checks = _read_statement(shape)
    seen = _Seen(rows=[], ids=set(), off_constant=set())
    for chunk in [None] if ids is None else list(_chunks(ids)):
        if chunk is None:
            found = conn.execute(stmt).all()
        elif len(chunk) == 1:
            # No expanding IN for the one-user path: nothing to render per execution.
            found = conn.execute(stmt.where(table.c.id == chunk[0])).all()
        elif chunk:
            found = conn.execute(stmt.where(table.c.id.in_(chunk))).all()
        else:
            continue
        if checks:
            # The last column says whether the constant columns hold the defaults.
            seen.off_constant.update(str(row[0]) for row in found if not row[-1])
            # Plain tuples: they hash and compare in C, unlike result rows.
            seen.rows += [tuple(row[:-1]) for row in found]
        else:
            seen.rows += map(tuple, found)
    seen.ids = {str(row[0]) for row in seen.rows}
    return seen


#: Read statements by (kind, variable columns, constant columns and values): building one
#: costs more than running it for one user.
_READS: dict[tuple[str, tuple[str, ...], tuple[tuple[str, Value], ...]], Select[Any]] = {}


def _read_statement(shape: _Shape) -> tuple[Select[Any], bool]:
    """``SELECT id, <variable columns>[, <constant columns hold the defaults>]`` of one
    kind (no WHERE), and whether it has that last column."""
    key = (shape.kind, shape.variable, tuple(shape.constant.items()))
    stmt = _READS.get(key)
    if stmt is None:
        table = shape.table
        # Enum columns read as plain text: no per-value result processing.
        columns: list[ColumnElement[Any]] = [
            type_coerce(table.c[c], String) for c in shape.variable
        ]
        constants = [table.c[c].is_not_distinct_from(v) for c, v in shape.constant.items()]
        if constants:
            # One boolean per row, computed by the database: 1/true when every constant
            # column holds its default.
            columns.append(and_(*constants).label("defaults_ok"))
        stmt = _READS[key] = select(table.c.id, *columns)
    return stmt, bool(shape.constant)


def _clashes(
    conn: Connection,
    kind: str,
    desired: AbstractSet[str],
    seen: _Seen,
    owned: AbstractSet[str],
) -> list[_Clash]:
    """The desired ids of ``kind`` taken by rows provisioner did not create: read ones of
    the same id, and (where the database compares ids loosely) rows it holds equal to an
    id about to be inserted."""
    found = [_Clash(kind, oid, oid) for oid in _ordered((seen.ids & desired) - owned)]
    if _exact_ids(conn.dialect):
        return found
    strangers = seen.ids - desired - owned
    if not strangers:
        # Every row read is ours or wanted: none can be equal to an id we insert (a
        # scoped read has already returned the rows the database holds equal to its ids).
        return found
    new = _ordered(set(desired) - seen.ids)
    taken: dict[str, str] = {}
    for chunk in _chunks(new, PROBE_CHUNK):
        _probe(conn, OWNED_KINDS[kind], chunk, taken)
    return found + [_Clash(kind, oid, taken[oid]) for oid in _ordered(taken)]


def _exact_ids(dialect: Dialect) -> bool:
    """Whether ``dialect``'s ids compare byte for byte, as Python's do: PostgreSQL
    (deterministic collations) and SQLite (BINARY) do; MariaDB/MySQL collations pad
    with spaces and most ignore case."""
    return dialect.name not in ("mysql", "mariadb")


def _probe(conn: Connection, table: Table, ids: Sequence[str], taken: dict[str, str]) -> None:
    """Add to ``taken`` each of ``ids`` (none of them a row's exact id) that the table holds
    a row equal to, in the column's own collation, with that row's id.  A chunk with such
    rows is halved until each is one id: a query per chunk, and a few per taken id."""
    stmt = select(table.c.id).where(table.c.id.in_(ids))
    wanted = set(ids)
    rows = sorted(rid for rid in conn.execute(stmt).scalars() if rid not in wanted)
    if not rows:
        return
    if len(ids) == 1:
        taken[ids[0]] = rows[0]
        return
    half = len(ids) // 2
    _probe(conn, table, ids[:half], taken)
    _probe(conn, table, ids[half:], taken)


#: MariaDB/MySQL's ``information_schema.COLUMNS``: the character set of each text column.
_COLUMNS = sql_table(
    "COLUMNS",
    *(sql_column(name, String) for name in ("TABLE_SCHEMA", "TABLE_NAME", "COLUMN_NAME")),
    sql_column("CHARACTER_SET_NAME", String),
    schema="information_schema",
)
#: Character sets that hold every character of the Basic Multilingual Plane and none
#: beyond it (an emoji).
_BMP_ONLY = frozenset({"utf8", "utf8mb3", "ucs2"})
#: Single-byte character sets and the Python codec holding the same characters
#: (MariaDB/MySQL's ``latin1`` is Windows-1252).  Any other set is left to the database.
_CODECS = {"latin1": "cp1252", "ascii": "ascii"}
#: The user's field a column's text comes from, where it is not the column itself.
_FIELDS = {"callerid": "full_name"}


def _narrow_columns(conn: Connection) -> dict[str, dict[str, str]]:
    """Kind -> {column: character set} of the PJSIP tables' text columns whose character
    set is not utf8mb4, on MariaDB/MySQL (tables made by hand or by Asterisk's own
    scripts in the database's default, ``latin1`` or ``utf8mb3``); elsewhere none: every
    PostgreSQL and SQLite text column holds any character."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return {}
    kinds = {OWNED_KINDS[kind].name: kind for kind in _KINDS}
    c = _COLUMNS.c
    stmt = select(c.TABLE_NAME, c.COLUMN_NAME, c.CHARACTER_SET_NAME).where(
        func.database() == c.TABLE_SCHEMA,
        c.TABLE_NAME.in_(sorted(kinds)),
        c.CHARACTER_SET_NAME != "utf8mb4",
    )
    found: dict[str, dict[str, str]] = {}
    for table, column, charset in conn.execute(stmt):
        found.setdefault(kinds[str(table)], {})[str(column)] = str(charset)
    return found


def _column_facts(
    conn: Connection,
) -> tuple[dict[str, dict[str, str]], dict[str, frozenset[str]]]:
    """:func:`_narrow_columns` and :func:`_absent_columns` of the made tables, together.

    On MariaDB/MySQL both come from one ``information_schema.COLUMNS`` query (every column
    of the three tables, with its character set), where SQLAlchemy's inspector would
    send a ``SHOW CREATE TABLE`` per table: three round trips fewer at each first write
    and verifying apply.  A table that query does not find (dropped meanwhile) is left
    to the inspector, which fails as it did.  Elsewhere: the two functions."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return _narrow_columns(conn), _absent_columns(conn)
    kinds = {OWNED_KINDS[kind].name: kind for kind in _KINDS}
    c = _COLUMNS.c
    stmt = select(c.TABLE_NAME, c.COLUMN_NAME, c.CHARACTER_SET_NAME).where(
        func.database() == c.TABLE_SCHEMA, c.TABLE_NAME.in_(sorted(kinds))
    )
    narrow: dict[str, dict[str, str]] = {}
    present: dict[str, set[str]] = {}
    for table, column, charset in conn.execute(stmt):
        kind = kinds[str(table)]
        present.setdefault(kind, set()).add(str(column))
        if charset is not None and charset != "utf8mb4":
            narrow.setdefault(kind, {})[str(column)] = str(charset)
    if present.keys() != set(_KINDS):
        return narrow, _absent_columns(conn)
    absent: dict[str, frozenset[str]] = {}
    for kind in _KINDS:
        if gone := frozenset(OWNED_KINDS[kind].c.keys()) - present[kind]:
            absent[kind] = gone
    return narrow, absent


def _unheld(value: str, charset: str) -> str | None:
    """The first character of ``value`` that a column of ``charset`` cannot hold (None:
    every one fits, or the set is not one this module knows: the database decides)."""
    if charset in _BMP_ONLY:
        return next((ch for ch in value if ord(ch) > 0xFFFF), None)
    codec = _CODECS.get(charset)
    if codec is None:
        return None
    for ch in value:
        try:
            ch.encode(codec)
        except UnicodeEncodeError:
            return ch
    return None


def _unfit(
    shapes: Mapping[str, _Shape],
    desired: Mapping[str, Mapping[str, Row]],
    narrow: Mapping[str, Mapping[str, str]],
) -> dict[str, list[Problem]]:
    """Endpoint id -> a problem per value of its desired rows that its column's character
    set (``narrow``) cannot hold.  MariaDB/MySQL in strict mode refuses such a row (error
    1366) and with it the whole apply, every other user's change included; outside strict
    mode it stores ``?``.  Such a user is skipped instead, the others applied."""
    found: dict[str, list[Problem]] = {}
    for kind, columns in narrow.items():
        shape = shapes[kind]
        rows = desired[kind].values()
        for column, charset in columns.items():
            if column not in shape.variable:
                continue
            value_of = itemgetter(1 + shape.variable.index(column))
            # Text columns hold text or NULL: one C-speed look at the whole column first.
            if "".join(filter(None, map(value_of, rows))).isascii():
                continue
            for row in rows:
                value = value_of(row)
                if not isinstance(value, str) or value.isascii():
                    continue
                bad = _unheld(value, charset)
                if bad is None:
                    continue
                rule = (
                    f"{shape.table.name}.{column} is {charset} and cannot hold {bad!r}: "
                    f"convert the realtime tables to utf8mb4 (as sql/asterisk/mysql.sql makes them)"
                )
                field_name = _FIELDS.get(column, f"{kind}.{column}")
                found.setdefault(_user_key(kind, str(row[0])), []).append(Problem(field_name, rule))
    return found


def _reported(
    objects: Iterable[UserObjects],
    conflicts: Sequence[_Clash],
    unfit: Mapping[str, Sequence[Problem]],
) -> tuple[Skipped, ...]:
    """One :class:`Skipped` per user blocked by ``conflicts`` or by values its columns'
    character sets cannot hold (``unfit``), in extension order."""
    problems: dict[str, list[Problem]] = {key: list(found) for key, found in unfit.items()}
    for clash in conflicts:
        problems.setdefault(clash.endpoint_id, []).append(clash.problem())
    names = {obj.endpoint_id: obj.username for obj in objects if obj.endpoint_id in problems}
    return tuple(Skipped(names.get(key, key), tuple(problems[key])) for key in _ordered(problems))


def _compare(
    shape: _Shape,
    desired: Mapping[str, Row],
    seen: _Seen,
    owned: Collection[str],
    hold: set[str],
) -> _KindPlan:
    """Sort one kind into inserts, updates and deletes of provisioner's rows.

    Whole rows are compared as tuples in sets (C speed); only the few that differ are
    looked at one by one.  Objects of endpoint ids in ``hold`` are left as they are.
    """
    plan = _KindPlan(shape)
    kind = shape.kind
    if seen.rows:
        current = set(seen.rows)
        differ = {str(row[0]): row for row in desired.values() if row not in current}
    else:
        # Empty tables (a first sync): every row differs, no row needs hashing.
        differ = dict(desired)
    for oid in seen.off_constant & set(owned) & desired.keys():
        differ.setdefault(oid, desired[oid])
    order = _ordered(differ)
    if hold:
        order = [oid for oid in order if _user_key(kind, oid) not in hold]
    if not seen.ids and not owned:
        # Nothing there and nothing recorded: all inserts, none reowned.
        plan.inserts = [differ[oid] for oid in order]
        return plan
    for oid in order:
        row = differ[oid]
        if oid not in seen.ids:
            plan.inserts.append(row)
            if oid in owned:
                plan.reowned.add(oid)
        elif oid in owned:
            plan.updates.append(row)
    plan.deletes = _ordered(
        oid for oid in set(owned) - desired.keys() if _user_key(kind, oid) not in hold
    )
    plan.unread = set(plan.deletes) - seen.ids
    return plan


def _summarise(
    objects: Sequence[UserObjects], kinds: Mapping[str, _KindPlan], blocked: set[str]
) -> Change:
    """Per-user counts: added (its endpoint or AOR row inserted: new, or put back after a
    deletion by hand), updated, removed, unchanged.

    A row put back is added for Asterisk's sake: it reports registration state only for
    the endpoints and AORs it loaded at its last res_pjsip reload, which may have come
    while the row was gone (../shared/asterisk/README.md), so it needs the reload an
    added endpoint gets (:func:`~provisioner.ami.changes.apply_changes`)."""
    touched: set[str] = set()
    inserted_ids: dict[str, set[str]] = {}
    changed: list[tuple[str, str]] = []
    # Kind order (endpoint, auth, aor), then inserted, updated, deleted within a kind.
    for kind in sorted(kinds, key=_KINDS.index):
        plan = kinds[kind]
        inserted = [str(row[0]) for row in plan.inserts]
        updated_ids = [str(row[0]) for row in plan.updates]
        inserted_ids[kind] = set(inserted)
        for oids in (inserted, updated_ids, plan.deletes):
            touched.update(oids if kind != "auth" else [_user_key(kind, i) for i in oids])
            changed.extend(zip(repeat(kind), oids))
    added: list[str] = []
    updated: list[str] = []
    unchanged = 0
    endpoints, aors = inserted_ids["endpoint"], inserted_ids["aor"]
    for obj in objects:
        key = obj.endpoint_id
        if key in blocked:
            continue
        if key not in touched:
            unchanged += 1
        elif key in endpoints or obj.aor_id in aors:
            added.append(key)
        else:
            updated.append(key)
    wanted = {obj.endpoint_id for obj in objects}
    return Change(
        added=tuple(added),
        updated=tuple(updated),
        removed=tuple(_ordered(touched - wanted)),
        unchanged=unchanged,
        changed_objects=tuple(changed),
        conflicts=tuple(_ordered(blocked)),
    )


def _last_good(
    objects: Iterable[UserObjects],
    blocked: AbstractSet[str],
    shape: _Shape,
    auths: _Seen,
    owned: Collection[str],
) -> dict[str, str]:
    """The endpoint ids of ours (``owned``) whose auth row read (``auths``) names the user
    of a blocked endpoint id (``blocked``: its new extension is a foreign row's), each
    with that blocked id: the endpoint that user had before the move, which it keeps
    while it is skipped."""
    names = {obj.username: obj.endpoint_id for obj in objects if obj.endpoint_id in blocked}
    if not names:
        return {}
    at = 1 + shape.variable.index("username")
    found: dict[str, str] = {}
    for row in auths.rows:
        oid = str(row[0])
        name = row[at]
        if isinstance(name, str) and name in names and oid.endswith(_AUTH_SUFFIX):
            key = _user_key("auth", oid)
            if key in owned:
                found[key] = names[name]
    return found


def _differences(
    conn: Connection, shape: _Shape, desired: Mapping[str, Row], seen: _Seen
) -> dict[str, str]:
    """Row id -> what differs between each row read (``seen``) and the row ``desired``
    holds for its id (``column differs: <read> here, <written> as provisioner writes it``,
    secrets redacted), compared as :func:`_compare` compares them: variable columns as
    read, constant ones (Asterisk's defaults on SQLite) by the database."""
    found: dict[str, list[str]] = {}
    for row in seen.rows:
        oid = str(row[0])
        want = desired.get(oid)
        if want is None or row == want:
            continue
        for column, have, value in zip(shape.variable, row[1:], want[1:], strict=True):
            if have != value:
                found.setdefault(oid, []).append(_differs(column, have, value))
    off = sorted(seen.off_constant & desired.keys())
    if off and shape.constant:
        table = shape.table
        pairs = list(shape.constant.items())
        stmt = select(
            table.c.id,
            *(type_coerce(table.c[c], String) for c, _v in pairs),
            *(table.c[c].is_not_distinct_from(v) for c, v in pairs),
        )
        for chunk in _chunks(off):
            for row in conn.execute(stmt.where(table.c.id.in_(chunk))):
                values, same = row[1 : 1 + len(pairs)], row[1 + len(pairs) :]
                for (column, value), have, ok in zip(pairs, values, same, strict=True):
                    if not ok:
                        found.setdefault(str(row[0]), []).append(_differs(column, have, value))
    return {oid: "; ".join(lines) for oid, lines in found.items()}


def _differs(column: str, have: Value, value: Value) -> str:
    shown = f"{_shown(column, have)} here, {_shown(column, value)} as provisioner writes it"
    return f"{column} differs: {shown}"


def _why_foreign(clash: _Clash, differences: Mapping[str, str]) -> str:
    """Why ``clash``'s row is not adopted ("" when it is exactly provisioner's)."""
    table = OWNED_KINDS[clash.kind].name
    if clash.row_id != clash.object_id:
        return f"{table} {clash.row_id!r}: its id is not exactly {clash.object_id!r}"
    found = differences.get(clash.object_id)
    return f"{table} {clash.object_id}: {found}" if found else ""


def _renamed(shape: _Shape, seen: _Seen, updates: Sequence[Row]) -> list[str]:
    """The endpoint ids whose auth row ``updates`` gives another ``username`` than the row
    read (``seen``) holds: the extension went to another user, or its user was renamed,
    and the contacts registered under the previous credentials are owed removal."""
    if "username" not in shape.variable:
        return []
    at = 1 + shape.variable.index("username")
    before = {str(row[0]): row[at] for row in seen.rows}
    return [
        _user_key("auth", oid)
        for row in updates
        if (oid := str(row[0])) in before and before[oid] != row[at]
    ]


# -- writing -------------------------------------------------------------------------


def _write(conn: Connection, plan: _Plan) -> bool:
    """Deletes (with the removed and reowned AORs' contacts), then updates, then inserts
    (rows and ownership records), then digests, all on ``conn``; True when a row of
    Asterisk's tables was written (recording a digest in ``provisioner_objects`` is
    bookkeeping and does not count)."""
    po = provisioner_objects
    wrote = False
    for kind, kp in plan.kinds.items():
        table = kp.shape.table
        rows = kp.row_deletes()
        for chunk in _chunks(rows):
            conn.execute(table.delete().where(table.c.id.in_(chunk)))
        for chunk in _chunks(kp.deletes):
            conn.execute(po.delete().where(po.c.kind == kind, po.c.id.in_(chunk)))
        wrote |= bool(kp.deletes)
        if kind == "aor" and kp.deletes:
            _remove_contacts(conn, kp.deletes)
    if plan.change.reowned:
        # The previous owner's phone's contacts (each endpoint is its own AOR).
        _remove_contacts(conn, plan.change.reowned)
    for kp in plan.kinds.values():
        if kp.updates:
            _update(conn, kp.shape, kp.updates)
            wrote = True
    digests = plan.digests
    recorded: set[str] = set()
    records: list[tuple[str, list[str], Mapping[str, str] | None]] = []
    for kind, kp in plan.kinds.items():
        if kp.inserts:
            _insert(conn, kp.shape, kp.inserts)
            new = [str(r[0]) for r in kp.inserts if r[0] not in kp.reowned]
            if kind == "endpoint" and digests is not None:
                records.append((kind, new, digests))
                recorded.update(new)
            else:
                records.append((kind, new, None))
            wrote = True
    _record_kinds(conn, records)
    if digests:
        _set_digests(conn, [(e, d) for e, d in digests.items() if e not in recorded])
    return wrote


#: Asterisk's table of contacts, where a site keeps them in the realtime database.
_PS_CONTACTS = sql_table("ps_contacts", sql_column("id", String))


def _remove_contacts(conn: Connection, aors: Sequence[str]) -> None:
    """Delete the ``ps_contacts`` rows of the removed or reowned ``aors`` when this
    database has that table: Asterisk keeps a deleted endpoint's registrations
    (../shared/asterisk: "with contacts in a PostgreSQL realtime table, delete the
    ps_contacts rows"), and a reowned one's are the previous owner's phone's."""
    if not inspect(conn).has_table(_PS_CONTACTS.name):
        return
    ids = _PS_CONTACTS.c.id
    removed = 0
    for chunk in _chunks(aors):
        # A LIKE per AOR, its own % and _ escaped: "1001;@..." and never "10011;@...".
        wanted = or_(*(ids.startswith(f"{aor};@", autoescape=True) for aor in chunk))
        removed += conn.execute(delete(_PS_CONTACTS).where(wanted)).rowcount
    if removed:
        log.info("realtime.contacts_removed", aors=len(aors), rows=removed)


#: Compiled statements by (dialect class, paramstyle, what): compiling an UPDATE of ~50
#: columns costs more than running it for one user.
_PREPARED: dict[tuple[Any, ...], Prepared] = {}


def _prepared_once(
    dialect: Dialect,
    key: tuple[Any, ...],
    build: Callable[[], tuple[UpdateBase, Sequence[str]]],
    *,
    literals: bool = False,
) -> Prepared:
    # The server version too: MySQL 8 and MariaDB spell ON DUPLICATE KEY UPDATE apart.
    full_key = (type(dialect), dialect.paramstyle, dialect.server_version_info, *key)
    found = _PREPARED.get(full_key)
    if found is None:
        stmt, names = build()
        found = _PREPARED[full_key] = prepare(dialect, stmt, names, literals=literals)
    return found


def _record(
    conn: Connection, kind: str, ids: Sequence[str], digests: Mapping[str, str] | None
) -> None:
    """Record ``ids`` as provisioner's, with their ``digests`` (NULL without them): COPY on
    PostgreSQL, where psycopg's executemany would send one statement per record; JSON on
    SQLite and MariaDB/MySQL (:func:`_record_sqlite`, ``JSON_TABLE``); the driver's own
    executemany elsewhere (through ``Connection.execute`` SQLAlchemy's per-row bookkeeping
    cost as much as the insert)."""
    if not ids:
        return
    po = provisioner_objects
    names = ("kind", "id", "digest") if digests is not None else ("kind", "id")
    if conn.dialect.name == "sqlite" and len(ids) > 1:
        _record_sqlite(conn, kind, ids, digests)
        return
    if digests is not None:
        get = digests.get
        rows: list[tuple[str, ...] | tuple[str, str, str | None]] = [
            (kind, oid, get(oid)) for oid in ids
        ]
    else:
        rows = [(kind, oid) for oid in ids]
    if conn.dialect.name == "postgresql":
        copy_rows(conn, po, names, rows)
        return
    if has_json_table(conn.dialect):
        json_table_insert(conn, po, names, rows)
        return

    def build() -> tuple[UpdateBase, Sequence[str]]:
        return po.insert().values({po.c[n]: bindparam(n) for n in names}), names

    run_many(conn, _prepared_once(conn.dialect, ("record", names), build), rows)


def _record_kinds(
    conn: Connection, records: Sequence[tuple[str, Sequence[str], Mapping[str, str] | None]]
) -> None:
    """:func:`_record` of each ``(kind, ids, digests)``; on PostgreSQL and on MariaDB/MySQL
    with ``JSON_TABLE`` all kinds in one COPY or one ``JSON_TABLE`` insert (a full sync's
    3 statements of records become 1 at 1k users: a round trip and a statement's fixed
    cost each fewer), the kinds without digests recorded with NULL, as :func:`_record`
    leaves them."""
    dialect = conn.dialect
    together = dialect.name == "postgresql" or has_json_table(dialect)
    if not together or sum(1 for _kind, ids, _digests in records if ids) < 2:
        for kind, ids, digests in records:
            _record(conn, kind, ids, digests)
        return
    po = provisioner_objects
    if any(digests is not None for _kind, _ids, digests in records):
        names: tuple[str, ...] = ("kind", "id", "digest")
        rows: list[tuple[str, ...] | tuple[str, str, str | None]] = []
        for kind, ids, digests in records:
            get = (digests or {}).get
            rows += [(kind, oid, get(oid)) for oid in ids]
    else:
        names = ("kind", "id")
        rows = [(kind, oid) for kind, ids, _digests in records for oid in ids]
    if dialect.name == "postgresql":
        copy_rows(conn, po, names, rows)
    else:
        # A user's three records as many rows a statement as one kind's were (their
        # documents stay under the byte limit, which splits them otherwise).
        json_table_insert(conn, po, names, rows, chunk=len(_KINDS) * JSON_TABLE_CHUNK)


def _record_sqlite(
    conn: Connection, kind: str, ids: Sequence[str], digests: Mapping[str, str] | None
) -> None:
    """:func:`_record` on SQLite: one ``INSERT ... SELECT`` from ``json_each`` of the ids
    (with their digests) as one JSON parameter, which SQLite unpacks in C: no parameter
    tuple per record (3 of every 4 statements of a full sync are records)."""
    po = provisioner_objects
    each = func.json_each(bindparam("rows", type_=String)).table_valued("value")
    kind_value = bindparam("kind", type_=String)
    if digests is None:
        stmt = po.insert().from_select(["kind", "id"], select(kind_value, each.c.value))
        rows = json_text(ids)
    else:
        pair = [func.json_extract(each.c.value, path) for path in ("$[0]", "$[1]")]
        stmt = po.insert().from_select(["kind", "id", "digest"], select(kind_value, *pair))
        get = digests.get
        rows = json_text([(oid, get(oid)) for oid in ids])
    conn.execute(stmt, {"kind": kind, "rows": rows})


def _set_digests(conn: Connection, pairs: Sequence[tuple[str, str]]) -> None:
    """Record new digests (endpoint id, digest) on endpoint records already there."""
    if not pairs:
        return
    po = provisioner_objects
    name = conn.dialect.name

    def build() -> tuple[UpdateBase, Sequence[str]]:
        stmt: UpdateBase
        if name in ("mysql", "mariadb"):
            # Multi-row statements instead of one UPDATE per record (see _statement): the
            # records were read in this transaction, so none is created here but by a
            # hand-deletion of that very record in the meantime.
            row: dict[Any, Any] = {
                po.c.kind: bindparam("k"),
                po.c.id: bindparam("oid"),
                po.c.digest: bindparam("d"),
            }
            upsert = mysql_insert(po).values(row)
            stmt = upsert.on_duplicate_key_update({po.c.digest: upsert.inserted.digest})
        else:
            stmt = (
                po.update()
                .where(po.c.kind == bindparam("k"), po.c.id == bindparam("oid"))
                .values({po.c.digest: bindparam("d")})
            )
        return stmt, ("k", "oid", "d")

    rows = [("endpoint", oid, d) for oid, d in pairs]
    if has_json_table(conn.dialect):
        json_table_insert(conn, po, ("kind", "id", "digest"), rows, update=("digest",))
        return
    run_many(conn, _prepared_once(conn.dialect, ("digests",), build), rows)


def _insert(conn: Connection, shape: _Shape, rows: Sequence[Row]) -> None:
    """Insert ``rows`` (every managed column): COPY on PostgreSQL, ``JSON_TABLE`` on
    MariaDB/MySQL that have it, executemany elsewhere."""
    name = conn.dialect.name
    if name == "postgresql":
        copy_rows(conn, shape.table, ("id", *shape.columns), shape.bound(rows))
    elif has_json_table(conn.dialect):
        json_table_insert(conn, shape.table, ("id", *shape.columns), shape.bound(rows))
    elif name == "sqlite" and shape.constant:
        run_many(conn, _prepared_inline(conn.dialect, shape), rows)
    else:
        run_many(conn, _prepared(conn.dialect, shape, update=False), shape.bound(rows))


def _update(conn: Connection, shape: _Shape, rows: Sequence[Row]) -> None:
    """Update every managed column of ``rows`` (known to exist): ``JSON_TABLE`` with ``ON
    DUPLICATE KEY UPDATE`` on MariaDB/MySQL that have it (see :func:`_statement`),
    executemany elsewhere."""
    if has_json_table(conn.dialect):
        columns = ("id", *shape.columns)
        json_table_insert(conn, shape.table, columns, shape.bound(rows), update=shape.columns)
    else:
        run_many(conn, _prepared(conn.dialect, shape, update=True), shape.bound(rows))


def _prepared_inline(dialect: Dialect, shape: _Shape) -> Prepared:
    """SQLite's INSERT of every managed column with the constant columns (Asterisk's
    defaults: our own values, rendered by SQLAlchemy's literal processors) written into
    the statement: rows are ``(id, *variable values)`` and an endpoint row binds 15
    values instead of 49."""
    key = ("insert-inline", shape.kind, shape.variable, tuple(shape.constant.items()))

    def build() -> tuple[UpdateBase, Sequence[str]]:
        table = shape.table
        keys = tuple(f"v{i}" for i in range(len(shape.variable)))
        # Bind parameters with a (unused) value: rendering the literals needs them all.
        values: dict[Any, Any] = {table.c.id: bindparam("oid", None, required=False)}
        for column, name in zip(shape.variable, keys, strict=True):
            values[table.c[column]] = bindparam(name, None, required=False)
        for column, value in shape.constant.items():
            values[table.c[column]] = literal(value, table.c[column].type, literal_execute=True)
        return table.insert().values(values), ("oid", *keys)

    return _prepared_once(dialect, key, build, literals=True)


def _prepared(dialect: Dialect, shape: _Shape, *, update: bool) -> Prepared:
    """The compiled INSERT or UPDATE of every managed column of ``shape``; rows are
    ``(id, *values in columns order)``."""
    key = ("update" if update else "insert", shape.kind, shape.columns)
    name = dialect.name
    return _prepared_once(dialect, key, lambda: _statement(shape, update=update, dialect=name))


def _statement(shape: _Shape, *, update: bool, dialect: str) -> tuple[UpdateBase, tuple[str, ...]]:
    """An INSERT or UPDATE of every managed column, and its parameter names in row order.

    On MariaDB/MySQL the update is ``INSERT ... ON DUPLICATE KEY UPDATE`` of rows known to
    exist: pymysql sends an ``executemany`` of an INSERT as a few multi-row statements,
    of an UPDATE as one statement per row (10,000 changed users took 3 s, 0.3 ms each).
    A row deleted by hand meanwhile is put back rather than silently not updated.
    """
    table = shape.table
    # Parameter names of our own: columns such as "100rel" are not valid parameter names
    # for every driver.
    keys = tuple(f"v{i}" for i in range(len(shape.columns)))
    values: dict[Any, Any] = {
        table.c[c]: bindparam(k) for c, k in zip(shape.columns, keys, strict=True)
    }
    row = {table.c.id: bindparam("oid"), **values}
    if update and dialect in ("mysql", "mariadb"):
        upsert = mysql_insert(table).values(row)
        changes = {c: upsert.inserted[c] for c in shape.columns}
        stmt: UpdateBase = upsert.on_duplicate_key_update(changes)
    elif update:
        stmt = table.update().where(table.c.id == bindparam("oid")).values(values)
    else:
        stmt = table.insert().values(row)
    return stmt, ("oid", *keys)


# -- the diff text -------------------------------------------------------------------


def _shown(column: str, value: Value) -> str:
    if value is not None and column in REDACTED_COLUMNS:
        return "[redacted]"
    return "NULL" if value is None else str(value)


def _old_rows(conn: Connection, shape: _Shape, ids: Sequence[str]) -> dict[str, Row]:
    """The current values of every managed column of rows ``ids`` (only a diff needs them)."""
    table = shape.table
    stmt = select(table.c.id, *(type_coerce(table.c[c], String) for c in shape.columns))
    found: dict[str, Row] = {}
    for chunk in _chunks(ids):
        for row in conn.execute(stmt.where(table.c.id.in_(chunk))):
            found[row[0]] = tuple(row[1:])
    return found


def _diff_lines(conn: Connection, plan: _Plan) -> Iterator[str]:
    """``!`` per foreign row blocking a user, ``-`` per deleted row, ``~`` per changed
    column, ``+`` per non-NULL column of a new row; secrets shown as ``[redacted]``."""
    for clash in plan.conflicts:
        name = OWNED_KINDS[clash.kind].name
        oid, key = clash.object_id, clash.endpoint_id
        if clash.row_id == oid:
            yield f"! {name} {oid} exists and is not provisioner's: user {key} skipped"
        else:
            yield (
                f"! {name} {oid} is taken by {clash.row_id!r}, which the database compares "
                f"equal and is not provisioner's: user {key} skipped"
            )
    for key in _ordered(plan.unfit):
        for problem in plan.unfit[key]:
            yield f"! {problem.field}: {problem.rule}: user {key} skipped"
    for kp in plan.kinds.values():
        shape = kp.shape
        name = shape.table.name
        for oid in kp.deletes:
            yield f"- {name} {oid}"
        old = _old_rows(conn, shape, [str(r[0]) for r in kp.updates])
        for row in kp.updates:
            oid = str(row[0])
            for column, before, after in zip(shape.columns, old[oid], shape.full(row), strict=True):
                if before != after:
                    shown = f"{_shown(column, before)} -> {_shown(column, after)}"
                    yield f"~ {name} {oid} {column}: {shown}"
        for row in kp.inserts:
            for column, value in zip(shape.columns, shape.full(row), strict=True):
                if value is not None:
                    yield f"+ {name} {row[0]} {column}={_shown(column, value)}"
