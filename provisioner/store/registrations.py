"""Registration state in the store: a summary per user and server, holding its contacts.

Written in batches (one transaction per batch, however many events it holds),
so a storm of re-registrations after an Asterisk restart costs a few
transactions, not thousands.  Endpoints are matched to users by extension;
events for endpoints that are no user (trunks) are ignored.  A user's contacts on a
server are one JSON text column of its summary row (``contacts``, migration 0014): every
write replaces the whole set, so an event writes one row.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from operator import itemgetter
from typing import Any, Literal, TypeVar, cast, overload

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Select,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    case,
    column,
    delete,
    extract,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect

from .bulk import (
    JSON_TABLE_BYTES,
    JSON_TABLE_CHUNK,
    executemany,
    has_json_table,
    json_table_insert,
    json_table_payload,
    json_table_source,
    json_text,
)
from .engine import escaping_bytes_not_utf8
from .queries import is_sendable, username_key
from .schema import CONTACT_LENGTHS, daemon_state, registration_summary, users
from .state import write_states

__all__ = [
    "BATCH_DIALECTS",
    "CONTACT_FIELDS",
    "EXPIRED_AFTER",
    "LIVE_BEAT",
    "LIVE_FOR",
    "BatchEntry",
    "ContactRow",
    "EndpointRows",
    "RowBatch",
    "SummaryRow",
    "clock_key",
    "contact_text",
    "contacts_text",
    "database_epoch",
    "endpoint_writer",
    "epoch_text",
    "forget_other_servers",
    "forget_servers",
    "live_key",
    "live_mark",
    "mark_live",
    "replace_server_snapshot",
    "set_problems",
    "status_rows",
    "summarize",
    "time_text",
    "user_problems",
    "write_batch",
    "write_endpoint_rows",
]

_CHUNK = 500
_T = TypeVar("_T")


def _user_ids(conn: Connection, endpoints: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(endpoints))
    out: dict[str, int] = {}
    for chunk in _chunks(conn, wanted):
        query = select(users.c.extension, users.c.id).where(_member(conn, users.c.extension, chunk))
        out.update(conn.execute(query).all())
    return out


def _chunks(conn: Connection, values: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``values`` in pieces small enough for an IN list; all at once on PostgreSQL and
    SQLite, where :func:`_member` binds them as one array (one JSON text on SQLite)."""
    if conn.dialect.name in _ONE_PARAMETER:
        if values:
            yield values
        return
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


#: Dialects where :func:`_member` binds any number of values as one parameter.
_ONE_PARAMETER = frozenset({"postgresql", "sqlite"})
#: Dialects whose endpoint writes go as one :class:`RowBatch` (:func:`write_batch`).
BATCH_DIALECTS = _ONE_PARAMETER


def _member(conn: Connection, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN values`` with the values as one parameter where the dialect allows,
    so the statement is neither re-rendered nor re-parsed for each batch size and a
    storm's batch is one statement, not one per 500 values: ``= ANY(:array)`` on
    PostgreSQL, ``IN (SELECT value FROM json_each(:json))`` on SQLite."""
    if conn.dialect.name == "postgresql":
        array = bindparam("members", list(values), type_=ARRAY(column.type))
        return cast(ColumnElement[bool], column == any_(array))
    if conn.dialect.name == "sqlite":
        each = func.json_each(bindparam("members", json.dumps(list(values)))).table_valued("value")
        return cast(ColumnElement[bool], column.in_(select(each.c.value)))
    # MariaDB/MySQL: a list of values.  Not ``IN (SELECT ... FROM JSON_TABLE(...))``: in
    # a DELETE, MariaDB 10.11 runs that as a dependent subquery per row (9.6 ms an event
    # of a 50k batch, measured); a multi-table DELETE joining the document is the way.
    return cast(ColumnElement[bool], column.in_(values))


#: Column order of the summary rows the writers insert.
_SUMMARY_COLUMNS = (
    "user_id",
    "server",
    "state",
    "device_state",
    "problem",
    "changed_at",
    "contacts",
)
#: The fields of a contact in a summary's ``contacts`` (each an array in this order).
CONTACT_FIELDS = (
    "contact_id",
    "uri",
    "status",
    "user_agent",
    "source",
    "rtt_usec",
    "expires_at",
    "changed_at",
)


#: A contact without its user and server: ``contact_id``, ``uri``, ``status``,
#: ``user_agent``, ``source``, ``rtt_usec``, ``expires_at``, ``changed_at`` (``None``: now).
#: Times are the store's timestamp text (:func:`time_text`, :func:`epoch_text`): the
#: flusher makes them from AMI's epoch seconds, and every database takes the text.
ContactRow = tuple[str, str, str, str, str, int | None, str | None, str | None]
#: A summary without its user and server: ``state`` (``None``: offline),
#: ``device_state``, ``problem``, ``changed_at`` (``None``: now; text as above).
SummaryRow = tuple[str | None, str, str, str | None]
#: What the writers take: each endpoint's contacts and summary, by endpoint id.
EndpointRows = Mapping[str, tuple[Sequence[ContactRow], SummaryRow]]
#: One endpoint of a :class:`RowBatch`: ``(endpoint, state, device_state, problem,
#: changed_at, contacts)``, its summary as a :data:`SummaryRow` holds it and its contacts
#: as :func:`contacts_text` makes them.
BatchEntry = tuple[str, str | None, str, str, str | None, str | None]


def time_text(value: datetime) -> str:
    """A naive UTC datetime as the text the databases take for a timestamp: the ISO form
    with microseconds, as SQLite's own bind processor writes it (a test checks they agree)."""
    return value.isoformat(" ", "microseconds")


@lru_cache(maxsize=8192)
def _second_text(second: int) -> str:
    """``time_text`` of a whole UTC second, without the fraction (cached: a storm's events
    and expiries fall on a few thousand distinct seconds)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")


def epoch_text(epoch: float) -> str:
    """``time_text`` of the UTC time ``epoch`` seconds after 1970, rounded to the
    microsecond exactly as ``datetime.fromtimestamp`` rounds (half to even); a test
    checks they agree.  A quarter of the datetime route's cost, on the storm's path."""
    # ``epoch - second`` is exactly ``math.modf``'s fraction (both truncate toward zero,
    # and the difference of a float and its integer part is exact), without the call.
    second = int(epoch)
    micro = round((epoch - second) * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    return f"{_second_text(second)}.{micro:06d}"


def _length(table: Table, name: str) -> int:
    """The size of text column ``name`` of ``table``: the schema is the one source of the
    sizes values are cut to, here and in the JSON batch's statements (:func:`_fitted`)."""
    type_ = table.c[name].type
    assert isinstance(type_, String), name
    assert type_.length is not None, name
    return type_.length


_ID_LEN, _URI_LEN, _STATUS_LEN, _AGENT_LEN, _SOURCE_LEN = (
    CONTACT_LENGTHS[name] for name in ("contact_id", "uri", "status", "user_agent", "source")
)
_STATE_LEN, _DEVICE_LEN, _PROBLEM_LEN = (
    _length(registration_summary, name) for name in ("state", "device_state", "problem")
)


def _fitted_contact(row: ContactRow, stamp: str) -> ContactRow:
    """``row`` with each text cut to its size (:data:`~.schema.CONTACT_LENGTHS`) and a
    missing ``changed_at`` set to ``stamp``."""
    cid, uri, status, agent, source, rtt, expires_at, changed_at = row
    return (
        cid[:_ID_LEN],
        uri[:_URI_LEN],
        status[:_STATUS_LEN],
        agent[:_AGENT_LEN],
        source[:_SOURCE_LEN],
        rtt,
        expires_at,
        changed_at or stamp,
    )


def _fitted_contacts(contacts: Sequence[ContactRow], stamp: str) -> list[ContactRow] | None:
    """An endpoint's contacts fitted (:func:`_fitted_contact`), of two rows of one contact
    id (as cut) the later; ``None`` when there is none."""
    if not contacts:
        return None
    if len(contacts) == 1:  # the storm's case: nothing to merge
        return [_fitted_contact(contacts[0], stamp)]
    by_id = {c[0][:_ID_LEN]: _fitted_contact(c, stamp) for c in contacts}
    return list(by_id.values())


def contact_text(
    key: str,
    uri: str,
    status: str,
    agent: str,
    source: str,
    rtt: int | None,
    expires_at: str | None,
    changed_at: str,
) -> str:
    """:func:`contacts_text` of an endpoint's one contact, given the values of its
    :data:`ContactRow` (``changed_at`` already set): the same text, without the row's
    tuple and its fitted copy (a registration storm's endpoint has one contact)."""
    fitted = (
        key[:_ID_LEN],
        uri[:_URI_LEN],
        status[:_STATUS_LEN],
        agent[:_AGENT_LEN],
        source[:_SOURCE_LEN],
        rtt,
        expires_at,
        changed_at,
    )
    return json_text((fitted,))


def contacts_text(contacts: Sequence[ContactRow], stamp: str) -> str | None:
    """An endpoint's contacts as its summary's ``contacts`` value: JSON text of their
    fitted rows (:func:`_fitted_contacts`); ``None`` when there is none."""
    fitted = _fitted_contacts(contacts, stamp)
    return None if fitted is None else json_text(fitted)


def _fitted_summary(row: SummaryRow) -> tuple[str, str, str, str | None]:
    """``row`` with the state defaulted (offline) and each text cut to its column's size."""
    state, device_state, problem, changed_at = row
    state = (state or "offline")[:_STATE_LEN]
    return (state, device_state[:_DEVICE_LEN], problem[:_PROBLEM_LEN], changed_at)


def write_endpoint_rows(conn: Connection, server: str, rows: EndpointRows, now: datetime) -> int:
    """Replace, for ``server``, the contacts and summary of each endpoint in ``rows``.

    One call is one batch on the caller's transaction; endpoints that are no user are
    skipped; returns how many matched a user.  An empty ``problem`` means "not known"
    (events never say whether Asterisk holds the endpoint as rendered): the problem
    already recorded by :func:`set_problems` then stays.
    """
    if not rows:
        return 0
    return endpoint_writer(conn.dialect, server, rows, now)(conn)


@overload
def endpoint_writer(
    dialect: Dialect,
    server: str,
    rows: EndpointRows,
    now: datetime,
    *,
    counted: Literal[True] = True,
) -> Callable[[Connection], int]: ...


@overload
def endpoint_writer(
    dialect: Dialect,
    server: str,
    rows: EndpointRows,
    now: datetime,
    *,
    counted: bool,
) -> Callable[[Connection], int | None]: ...


def endpoint_writer(
    dialect: Dialect,
    server: str,
    rows: EndpointRows,
    now: datetime,
    *,
    counted: bool = True,
) -> Callable[[Connection], int | None]:
    """:func:`write_endpoint_rows` of ``rows`` as a function of the connection to write
    with.  Where the store takes JSON batches (SQLite, PostgreSQL: :func:`write_batch`) the
    batch is built now, so a caller on the event loop builds it while an earlier write
    still runs in its thread, which then only waits on the database.
    On MariaDB/MySQL the ``JSON_TABLE`` documents (:func:`_json_table_documents`) are
    built now too when ``dialect`` tells its server has ``JSON_TABLE`` (an older one's
    writer takes the general way, which needs none; a server not yet met: the writer
    builds them when it runs, if they are needed).
    ``counted=False``: the caller does not use how many endpoints matched (the
    flusher); where counting them is a statement of its own (MariaDB/MySQL's
    ``JSON_TABLE`` documents: :func:`_write_rows_json_table`) it is not run, and the
    function returns ``None`` there."""
    if dialect.name in _ONE_PARAMETER:
        batch = RowBatch.of(rows, now)
        return lambda conn: write_batch(conn, server, batch)
    documents = _json_table_documents(rows, now) if has_json_table(dialect) else None
    return lambda conn: _write_rows_general(
        conn, server, rows, now, counted=counted, documents=documents
    )


#: A part of a batch as :func:`_write_rows_json_table` sends it: the batch's
#: :func:`time_text` and its document (:func:`~.bulk.json_table_payload`).
_Document = tuple[str, str]


def _write_rows_general(
    conn: Connection,
    server: str,
    rows: EndpointRows,
    now: datetime,
    *,
    counted: bool = True,
    documents: Sequence[_Document] | None = None,
) -> int | None:
    """:func:`write_endpoint_rows` on MariaDB/MySQL: as JSON_TABLE documents where the
    server has them (:func:`_write_rows_json_table`: ``documents``, those of ``rows``
    built beforehand, or built now; ``None`` unless ``counted``); else user ids looked
    up, the endpoints' summaries deleted and inserted again (the problems recorded
    kept)."""
    if has_json_table(conn.dialect):
        if documents is None:
            documents = _json_table_documents(rows, now)
        return _write_rows_json_table(conn, server, documents, counted=counted)
    ids = _user_ids(conn, rows)
    matched = [(ep, ids[ep]) for ep in rows if ep in ids]
    uids = [uid for _, uid in matched]
    kept: dict[int, str] = {}
    for chunk in _chunks(conn, uids):
        kept.update(_problems(conn, server, chunk))
        member = _member(conn, registration_summary.c.user_id, chunk)
        conn.execute(
            delete(registration_summary).where(registration_summary.c.server == server, member)
        )
    stamp = time_text(now)
    summary_rows = []
    for ep, uid in matched:
        contacts, summary = rows[ep]
        state, device_state, problem, changed_at = _fitted_summary(summary)
        problem = problem or kept.get(uid, "")
        summary_rows.append(
            (
                uid,
                server,
                state,
                device_state,
                problem,
                changed_at or stamp,
                contacts_text(contacts, stamp),
            )
        )
    _insert_many(conn, registration_summary, _SUMMARY_COLUMNS, summary_rows)
    return len(matched)


def _write_rows_json_table(
    conn: Connection,
    server: str,
    documents: Sequence[_Document],
    *,
    counted: bool = True,
) -> int | None:
    """:func:`write_endpoint_rows` on MariaDB 10.6+ and MySQL 8.0.4+: what
    :func:`write_batch` does on SQLite and PostgreSQL, with ``JSON_TABLE`` documents.

    Per part of the batch (documents of at most ``JSON_TABLE_BYTES``), two statements:
    the matched endpoints counted (not when ``counted`` is false: ``None`` is returned;
    a 50k batch's count statements were 7 % of its write) and the summaries, with their
    contacts, upserted (``ON DUPLICATE KEY UPDATE``, the recorded problem kept).  The
    database matches endpoints to users; the event loop's thread only makes the
    documents.  Measured on a 50k batch (MariaDB 10.11, 2-core VM): the client's CPU
    went from 22-23 to 5.5-6 µs an event and the write's wall time from 57-66 to 33-46
    µs, against user ids looked up and IN lists of them (``bench_registration --backend
    mariadb``: 11-12k events/s to 21k, same hour); the contacts in the summary row
    (migration 0014) took the server's time of a storm's event from 25-30 to 13-22 µs.
    ``documents`` (:func:`_json_table_documents`) are made before, by the caller: the
    flusher's, on the event loop while the write before runs, so the server is not
    left waiting between two writes while this thread makes them."""
    count, upsert = _json_table_statements()
    matched = 0
    for stamp, document in documents:
        params = {"server": server, "stamp": stamp, "rows": document}
        if counted:
            matched += int(conn.execute(count, params).scalar_one())
        conn.execute(upsert, params)
    return matched if counted else None


def _json_table_documents(rows: EndpointRows, now: datetime) -> list[_Document]:
    """``rows`` as the parts :func:`_write_rows_json_table` sends (:func:`_json_table_parts`),
    each its stamp and its document as it travels."""
    return [
        (batch.stamp, json_table_payload(batch.summaries)) for batch in _json_table_parts(rows, now)
    ]


def _json_table_parts(rows: EndpointRows, now: datetime) -> Iterator[RowBatch]:
    """``rows`` as batches of at most ``JSON_TABLE_CHUNK`` endpoints whose documents
    stay under ``JSON_TABLE_BYTES`` (halved until they do; one endpoint goes alone)."""
    endpoints = sorted(rows)
    for start in range(0, len(endpoints), JSON_TABLE_CHUNK):
        yield from _fitting(rows, endpoints[start : start + JSON_TABLE_CHUNK], now)


def _fitting(rows: EndpointRows, endpoints: Sequence[str], now: datetime) -> Iterator[RowBatch]:
    batch = RowBatch.of({ep: rows[ep] for ep in endpoints}, now, nested=True)
    size = len(batch.summaries) * 4 // 3
    if size <= JSON_TABLE_BYTES or len(endpoints) == 1:
        yield batch
        return
    half = len(endpoints) // 2
    yield from _fitting(rows, endpoints[:half], now)
    yield from _fitting(rows, endpoints[half:], now)


def _json_table_rows(columns: Sequence[Any]) -> tuple[TextClause, list[ColumnElement[Any]]]:
    """The ``rows`` parameter (a :func:`~.bulk.json_table_payload` of an array of arrays)
    as a ``JSON_TABLE`` FROM item ``j`` and one expression per position, for ``columns``
    (``None``: the endpoint), fitted as :func:`_json_rows` fits them for SQLite and
    PostgreSQL (:func:`_fitted`: text cut by LEFT, in characters as Python's slices cut)."""
    nested = frozenset(i for i, col in enumerate(columns) if col is registration_summary.c.contacts)
    source, raw = json_table_source(len(columns), nested)
    return source, [_fitted("mariadb", item, col) for item, col in zip(raw, columns, strict=True)]


def _joined(source: TextClause, endpoint: ColumnElement[Any], *columns: Any) -> Select[Any]:
    """``SELECT STRAIGHT_JOIN columns FROM <document> AS j, users WHERE users.extension =
    <endpoint>``: the document first, each of its rows finding its user by the unique
    index (left to itself, the optimizer may scan users once per row of a document it
    estimates at 40 rows)."""
    return (
        select(*columns)
        .select_from(source, users)
        .where(users.c.extension == endpoint)
        .prefix_with("STRAIGHT_JOIN", dialect="mysql")
        .prefix_with("STRAIGHT_JOIN", dialect="mariadb")
    )


#: The summary columns a batch's document holds after the endpoint, in its order.
_BATCH_COLUMNS = ("state", "device_state", "problem", "changed_at", "contacts")


@cache
def _json_table_statements() -> tuple[Any, Any]:
    """The two statements of :func:`_write_rows_json_table` (built once)."""
    server = bindparam("server", type_=String)
    stamp = bindparam("stamp", type_=String)
    summary = registration_summary.c
    source, (ep, state, device, problem, changed, contacts) = _json_table_rows(
        (None, *(summary[name] for name in _BATCH_COLUMNS))
    )
    count = _joined(source, ep, func.count())
    picked = _joined(
        source,
        ep,
        users.c.id,
        server,
        # As the general path's ``state or "offline"`` and ``changed_at or stamp``.
        func.coalesce(func.nullif(state, ""), "offline"),
        device,
        problem,
        func.coalesce(changed, stamp),
        # The contacts go nested in the document (RowBatch.of's ``nested``): JSON_TABLE
        # gives their JSON text, 'null' for none.  Measured against a JSON string of
        # them: 1 µs an event less of the server's time, 0.75 less of the client's.
        func.nullif(contacts, "null"),
    )
    upsert = mysql_insert(registration_summary).from_select(_SUMMARY_COLUMNS, picked)
    upsert = upsert.on_duplicate_key_update(
        state=upsert.inserted.state,
        device_state=upsert.inserted.device_state,
        changed_at=upsert.inserted.changed_at,
        contacts=upsert.inserted.contacts,
        # An empty problem is "not known": the one recorded by set_problems stays.
        problem=case(
            (upsert.inserted.problem == "", registration_summary.c.problem),
            else_=upsert.inserted.problem,
        ),
    )
    return count, upsert


def _problems(conn: Connection, server: str, uids: Sequence[int]) -> dict[int, str]:
    """The recorded problems (non-empty) of users ``uids`` on ``server``."""
    summary = registration_summary.c
    query = select(summary.user_id, summary.problem).where(
        summary.server == server, _member(conn, summary.user_id, uids), summary.problem != ""
    )
    return {uid: problem for uid, problem in conn.execute(query)}


@dataclass(frozen=True)
class RowBatch:
    """Rows of endpoints ready for :func:`write_batch`, as one JSON text.

    Built apart from the write (pure, no connection) so that the registration flusher
    can build the next batch while the database is still writing the previous one.
    The summaries go as they are: the statement cuts each text to its column's size and
    puts in the defaults (offline, the batch's time) in the database, which on SQLite
    works beside the event loop (the GIL released) and on PostgreSQL in its own
    process; each endpoint's contacts are made here (:func:`contacts_text`).
    """

    #: ``[[endpoint, state, device_state, problem, changed_at, contacts], ...]``,
    #: endpoints sorted; ``contacts`` is :func:`contacts_text`'s, or with ``nested`` the
    #: array itself (:meth:`of`).
    summaries: str
    #: :func:`time_text` of the batch's ``now``: a row's missing ``changed_at``.
    stamp: str

    @classmethod
    def of(cls, rows: EndpointRows, now: datetime, *, nested: bool = False) -> RowBatch:
        """``rows`` (as :func:`write_endpoint_rows` takes them); ``now`` for missing times.
        ``nested``: each endpoint's contacts go as a JSON array in the document, not as
        a JSON string of one (MariaDB's ``JSON_TABLE`` takes an array's text as it is;
        PostgreSQL's ``jsonb`` would make it again, 2 µs an event more of its time).

        Of two rows of one contact of an endpoint the later wins, as in the general path."""
        stamp = time_text(now)
        contacts_of = _fitted_contacts if nested else contacts_text
        # Tuples, not lists: the collector stops tracking them after one pass (a batch of
        # lists alive through the flush was promoted and brought on full collections).
        # Made in ``rows``' own order, then sorted: the flusher's rows are in the order
        # they were made, so this walks them in memory order, where looking each up in
        # endpoint order jumped about (a 50k batch 4.2-4.6 to 1.6-1.7 µs an endpoint when
        # its events came in endpoint order, 3.4-3.6 when shuffled).
        summaries = [
            (ep, *summary, contacts_of(contacts, stamp)) for ep, (contacts, summary) in rows.items()
        ]
        summaries.sort(key=_first)
        return cls(json_text(summaries), stamp)

    @classmethod
    def of_entries(cls, entries: list[BatchEntry], stamp: str) -> RowBatch:
        """The batch of ``entries`` (each endpoint once; sorted here, in place), made
        with ``stamp`` (:func:`time_text` of the batch's time) for a missing
        ``changed_at``: what :meth:`of` makes of the same rows, for a caller that builds
        the entries itself (the registration flusher, without the rows between)."""
        entries.sort(key=_first)
        return cls(json_text(entries), stamp)


#: The endpoint of a :meth:`RowBatch.of` entry (its sort key: endpoints are unique).
_first = itemgetter(0)


def write_batch(conn: Connection, server: str, batch: RowBatch) -> int:
    """:func:`write_endpoint_rows` of a prepared batch, on SQLite and PostgreSQL: one
    statement, whatever the batch size, taking the summaries (with their contacts) as
    one JSON text.

    The database matches endpoints to users itself (a join on ``users.extension``), so no
    user id comes back to Python; the summary, its contacts in it, is an upsert (``ON
    CONFLICT DO UPDATE``).  Returns how many endpoints matched a user.
    """
    upsert = _json_statement(conn.dialect.name)
    params = {"server": server, "rows": batch.summaries, "stamp": batch.stamp}
    return int(conn.execute(upsert, params).rowcount)


def _json_rows(dialect: str, columns: Sequence[Any]) -> tuple[Any, list[ColumnElement[Any]]]:
    """The rows of the ``rows`` JSON parameter (an array of arrays) as a FROM item and one
    expression per position, for ``columns`` (``None``: the endpoint): text cut to its
    column's size (in characters, as Python's slices cut it in the general path), other
    values cast to their column's type."""
    if dialect == "sqlite":
        each = func.json_each(bindparam("rows", type_=String)).table_valued("value").alias("j")
        items = [func.json_extract(each.c.value, f"$[{i}]") for i in range(len(columns))]
    else:
        # jsonb: each element is parsed once; ``->>`` on json text parses it again per
        # column.  The parameter is JSON text (RowBatch), cast by the server.
        elements = func.jsonb_array_elements(sql_cast(bindparam("rows", type_=String), JSONB))
        each = elements.table_valued(column("value", JSONB)).alias("j")
        items = [each.c.value[i].astext for i in range(len(columns))]
    return each, [_fitted(dialect, item, col) for item, col in zip(items, columns, strict=True)]


def _fitted(dialect: str, item: ColumnElement[Any], col: Any) -> ColumnElement[Any]:
    """``item`` as a value of column ``col``: cut to its length when text of a length
    (as it is when of none: ``contacts``), else cast (``NULL`` for an empty text)."""
    if col is None:
        return item
    if isinstance(col.type, String):
        if col.type.length is None:
            return item
        cut = (
            func.substr(item, 1, col.type.length)
            if dialect == "sqlite"
            else func.left(item, col.type.length)
        )
        return cast(ColumnElement[Any], cut)
    # An empty text is no value (as the general path's ``changed_at or stamp``).
    value = func.nullif(item, "")
    if dialect in _STORES_TEXT:
        return value
    return sql_cast(value, col.type)


#: Dialects whose inserts take a value as text and convert it to the column's type:
#: SQLite stores what json_extract gives (times as text, integers), MariaDB and MySQL
#: convert as for a quoted literal (a CAST to DATETIME would drop the microseconds).
_STORES_TEXT = frozenset({"sqlite", "mariadb", "mysql"})


@cache
def _json_statement(dialect: str) -> Any:
    """The statement of :func:`write_batch` for ``dialect`` (built once)."""
    insert_of = sqlite_insert if dialect == "sqlite" else pg_insert
    server = bindparam("server", type_=String)
    stamp = bindparam("stamp", type_=String)
    summary = registration_summary.c
    each, (ep, state, device, problem, changed, contacts) = _json_rows(
        dialect, (None, *(summary[name] for name in _BATCH_COLUMNS))
    )
    source = (
        select(
            users.c.id,
            server,
            # As the general path's ``state or "offline"`` and ``changed_at or stamp``.
            func.coalesce(func.nullif(state, ""), "offline"),
            device,
            problem,
            func.coalesce(changed, _stamp_of(dialect, stamp)),
            contacts,
        )
        .select_from(each.join(users, users.c.extension == ep))
        # SQLite reads "ON CONFLICT" after a join's ON as part of it without a WHERE.
        .where(true())
    )
    upsert = insert_of(registration_summary).from_select(_SUMMARY_COLUMNS, source)
    upsert = upsert.on_conflict_do_update(
        index_elements=[registration_summary.c.user_id, registration_summary.c.server],
        set_={
            **{
                name: upsert.excluded[name]
                for name in ("state", "device_state", "changed_at", "contacts")
            },
            # An empty problem is "not known" (events never know it): the one recorded
            # by set_problems stays.
            "problem": case(
                (upsert.excluded.problem == "", registration_summary.c.problem),
                else_=upsert.excluded.problem,
            ),
        },
    )
    # The matched count is the upsert's rowcount, read before the cursor closes.
    return upsert.execution_options(preserve_rowcount=True)


def _stamp_of(dialect: str, stamp: Any) -> ColumnElement[Any]:
    """The batch's time parameter as a value of a timestamp column."""
    return stamp if dialect == "sqlite" else sql_cast(stamp, DateTime())


def _insert_many(
    conn: Connection, table: Table, names: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` (values in ``names`` order): as JSON_TABLE documents where the
    server has it (:func:`~provisioner.store.bulk.json_table_insert`), else by the
    driver's ``executemany``.

    The general path's dialects (MariaDB, MySQL) convert none of these columns' values
    (times are already the store's text), so the rows go as they are.  pymysql escapes
    and formats every value of an ``executemany`` in Python: 20 µs an event of a 50k
    storm's batch, against 1.5 µs for the documents (the server then does the work).
    """
    if not rows:
        return
    if has_json_table(conn.dialect):
        json_table_insert(conn, table, names, rows)
    else:
        executemany(conn, insert(table), names, rows, column_keys=names)


#: More endpoints than this in one :func:`set_problems`: written in a few set-based
#: statements (a large apply's check: every endpoint live, or many rejected at once).
CLEAR_IN_BULK = 500


def user_problems(conn: Connection, user_id: int) -> dict[str, str]:
    """Server -> why Asterisk does not hold the user's endpoint as rendered, as the check
    after an apply recorded it (:func:`set_problems`); servers with none left out."""
    summary = registration_summary.c
    query = (
        select(summary.server, summary.problem)
        .where(summary.user_id == user_id, summary.problem != "")
        .order_by(summary.server)
    )
    return {server: problem for server, problem in conn.execute(query)}


def set_problems(conn: Connection, server: str, problems: Mapping[str, str], now: datetime) -> int:
    """Record, next to each user, why Asterisk does not hold its endpoint as rendered
    (an empty string clears it).  Returns how many endpoints matched a user.

    Past ``CLEAR_IN_BULK`` endpoints the write is set-based (:func:`_set_in_bulk`): a
    check of 100k endpoints is a few statements, not 100k, on the registration
    writer's turn."""
    ids = _user_ids(conn, problems)
    if len(problems) > CLEAR_IN_BULK:
        by_user = {ids[ep]: problem for ep, problem in problems.items() if ep in ids}
        _set_in_bulk(conn, server, by_user, now)
        return len(ids)
    for ep, problem in problems.items():
        uid = ids.get(ep)
        if uid is None:
            continue
        updated = conn.execute(
            update(registration_summary)
            .where(registration_summary.c.user_id == uid, registration_summary.c.server == server)
            .values(problem=problem[:_PROBLEM_LEN])
        ).rowcount
        if not updated:
            new = {"user_id": uid, "server": server, "state": "offline", "device_state": ""}
            conn.execute(
                insert(registration_summary),
                [{**new, "problem": problem[:_PROBLEM_LEN], "changed_at": now}],
            )
    return len(ids)


def _set_in_bulk(conn: Connection, server: str, by_user: Mapping[int, str], now: datetime) -> None:
    """:func:`set_problems` of many users: the recorded problems of the live ones
    cleared, each other problem set with one UPDATE per distinct text (they are few:
    the verifier's own), and a summary row inserted for a user with a problem and none
    (a user with no row and no problem gets none: there is nothing to say)."""
    summary = registration_summary.c
    uids = sorted(by_user)
    held: set[int] = set()
    for chunk in _chunks(conn, uids):
        query = select(summary.user_id).where(
            summary.server == server, _member(conn, summary.user_id, chunk)
        )
        held.update(conn.execute(query).scalars())
    _clear_problems(conn, server, [uid for uid in uids if not by_user[uid] and uid in held])
    by_text: dict[str, list[int]] = {}
    for uid in uids:
        if by_user[uid] and uid in held:
            by_text.setdefault(by_user[uid][:_PROBLEM_LEN], []).append(uid)
    for problem, group in by_text.items():
        for chunk in _chunks(conn, group):
            conn.execute(
                update(registration_summary)
                .where(summary.server == server, _member(conn, summary.user_id, chunk))
                .values(problem=problem)
            )
    new = [
        {
            "user_id": uid,
            "server": server,
            "state": "offline",
            "device_state": "",
            "problem": by_user[uid][:_PROBLEM_LEN],
            "changed_at": now,
        }
        for uid in uids
        if by_user[uid] and uid not in held
    ]
    if new:
        conn.execute(insert(registration_summary), new)


def _clear_problems(conn: Connection, server: str, uids: Sequence[int]) -> None:
    """Empty the recorded problems of users ``uids`` on ``server``."""
    summary = registration_summary.c
    for chunk in _chunks(conn, uids):
        conn.execute(
            update(registration_summary)
            .where(
                summary.server == server,
                summary.problem != "",
                _member(conn, summary.user_id, chunk),
            )
            .values(problem="")
        )


def replace_server_snapshot(
    conn: Connection, server: str, rows: EndpointRows, now: datetime
) -> int:
    """Make the store's registration state for ``server`` exactly ``rows`` (a fresh AMI
    snapshot): every other summary of the server loses its contacts and is set offline
    (a phone Asterisk no longer knows is not "online" from before its restart; its
    recorded problem stays), then ``rows`` are written as by :func:`write_endpoint_rows`.
    One call is one batch on the caller's transaction, so a reader never sees the
    server's state gone and not yet written back.

    An endpoint of ``rows`` with no time (no event told one: a daemon's start) whose state
    is the one the store holds keeps the stored last change (:func:`_unchanged_times`):
    a restart is no change of the phones it finds as they were."""
    rows = _unchanged_times(conn, server, rows)
    _all_offline(conn, server, now)
    if not rows:
        return 0
    return endpoint_writer(conn.dialect, server, rows, now)(conn)


def _all_offline(conn: Connection, server: str, now: datetime) -> None:
    """Every summary of ``server`` without its contacts and offline, one not offline
    before changed as of ``now`` (one that was keeps its last change).

    One statement, each row rewritten once: as two (the contacts gone, then the state)
    the summaries of a server whose phones were online were each updated twice.  An
    empty snapshot of 50k online summaries (an Asterisk restart), wall a summary: MariaDB
    10.1 to 6.1 µs (its server's CPU 9.9 to 5.2), PostgreSQL 19.5 to 5.4, SQLite 4.7 to
    2.6 (bench/README, 2026-12-07 17:48)."""
    summary = registration_summary.c
    not_offline = summary.state != "offline"
    # ``changed_at`` first: MariaDB and MySQL evaluate SET items left to right, each
    # seeing the ones before it, so after ``state = 'offline'`` the test would be false.
    changes = update(registration_summary).ordered_values(
        (summary.changed_at, case((not_offline, now), else_=summary.changed_at)),
        (summary.state, "offline"),
        (summary.contacts, None),
    )
    touched = or_(summary.contacts.is_not(None), not_offline)
    conn.execute(changes.where(summary.server == server, touched))


def _unchanged_times(conn: Connection, server: str, rows: EndpointRows) -> EndpointRows:
    """``rows`` with the stored last change of ``server`` put in (summary and contacts)
    for each endpoint that has no time and whose state is the stored one."""
    untimed = sorted(ep for ep, (_, summary) in rows.items() if summary[3] is None)
    if not untimed:
        return rows
    summary = registration_summary.c
    stored: dict[str, tuple[str, datetime]] = {}
    for chunk in _chunks(conn, untimed):
        query = (
            select(users.c.extension, summary.state, summary.changed_at)
            .join(users, users.c.id == summary.user_id)
            .where(summary.server == server, _member(conn, users.c.extension, chunk))
        )
        stored.update((ep, (state, changed)) for ep, state, changed in conn.execute(query))
    out = dict(rows)
    for ep in untimed:
        contacts, (state, device_state, problem, _) = rows[ep]
        held = stored.get(ep)
        if held is None or held[0] != (state or "offline"):
            continue
        kept = time_text(held[1])
        out[ep] = (
            tuple((*c[:7], c[7] or kept) for c in contacts),
            (state, device_state, problem, kept),
        )
    return out


def forget_other_servers(conn: Connection, keep: Collection[str]) -> int:
    """Delete the registration state (summaries, their contacts in them) of every server
    but those named in ``keep`` (the configured ones), on the caller's transaction; how
    many summaries went.  A server taken out of the configuration, or renamed, is no
    longer read: its state would stay as last written for good, and a summary of it
    saying "online" keeps the user online in ``status`` (:func:`summarize`)."""
    statement = delete(registration_summary)
    if keep:
        statement = statement.where(registration_summary.c.server.not_in(sorted(keep)))
    return conn.execute(statement).rowcount or 0


def forget_servers(conn: Connection, names: Collection[str]) -> int:
    """Delete the registration state (summaries, their contacts in them) of the servers
    ``names``, on the caller's transaction; how many summaries went.  For a server a
    SIGHUP took out of the configuration, or pointed at another Asterisk (its state is
    that of the old one until the new one's snapshot)."""
    if not names:
        return 0
    statement = delete(registration_summary).where(registration_summary.c.server.in_(sorted(names)))
    return conn.execute(statement).rowcount or 0


#: Contact statuses of a phone that does not answer (or is gone); any other is usable.
_DOWN = ("Unreachable", "Removed")
#: How long past its stored expiry a contact is taken for gone by ``status``: the daemon
#: sees to each expiry seconds after it passes (``EXPIRY_GRACE`` in ``ami/pbx.py``:
#: looked up, or made unknown for a phone that refreshed), so one still past it by
#: this much was seen to by no one (the daemon or its AMI session down).
EXPIRED_AFTER = timedelta(seconds=60)


def summarize(contact_statuses: Sequence[str], server_states: Sequence[str]) -> str:
    """online when a contact is usable or a server holds the phone registered (its peer
    Reachable, no contact row); unreachable when contacts exist but none answers."""
    # A server's "online" is written with that server's contacts, from one record: it
    # is never stale beside them, so another server's silent contact does not outweigh it.
    if "online" in server_states:
        return "online"
    if any(st not in _DOWN for st in contact_statuses):
        return "online"
    if contact_statuses or "unreachable" in server_states:
        return "unreachable"
    return "offline"


def _user_agent(contacts: Sequence[Mapping[str, Any]]) -> str:
    """The user agent of the first usable contact (of the first contact when none is):
    the phone the user is online with, not an old one that no longer answers; one a live
    server holds before one last known of a server no one reads (``stale``)."""
    usable = [c for c in contacts if c["status"] not in _DOWN and not c["expired"]]
    for c in sorted(usable, key=lambda c: bool(c.get("stale"))):
        return str(c["user_agent"])
    return str(contacts[0]["user_agent"]) if contacts else ""


def _mark_expired(contacts: list[dict[str, Any]], now_of: Callable[[str], datetime]) -> None:
    """Set each contact's ``expired``: its stored expiry (Asterisk's) is ``EXPIRED_AFTER``
    before ``now_of(<its server>)``, that server's time now."""
    for c in contacts:
        expires_at = c["expires_at"]
        c["expired"] = expires_at is not None and expires_at < now_of(c["server"]) - EXPIRED_AFTER


def _live_states(
    sums: Sequence[Mapping[str, Any]], contacts: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Each server's summary state, but ``offline`` for an ``online`` one whose contacts
    (written with it) have all expired (:func:`_mark_expired`) or do not answer: the
    phone it was written for is gone, and no one saw to it."""
    states = []
    for s in sums:
        state = s["state"]
        mine = [c for c in contacts if c["server"] == s["server"]]
        if state == "online" and mine and all(c["expired"] or c["status"] in _DOWN for c in mine):
            state = "offline"
        states.append(state)
    return states


#: Seconds between two marks of a server's registration state as live (the daemon's AMI
#: session up, its snapshot stored, its writes going through): :func:`live_key`.
LIVE_BEAT = 15.0
#: How old a live mark may be before ``status`` takes the server's state for unknown:
#: no one marked it since (the daemon killed or hung, its store writes refused).
LIVE_FOR = timedelta(seconds=60)
_LIVE_PREFIX = "registration_live:"
_CLOCK_PREFIX = "registration_clock:"
#: The longest server name put whole in a live or clock mark's key (``daemon_state.key``
#: holds 64).
_LIVE_TAG_MAX = 40


def _server_key(prefix: str, server: str) -> str:
    """``prefix`` and ``server``, a name too long for the key column cut and digested."""
    if len(server) > _LIVE_TAG_MAX:
        digest = hashlib.sha256(server.encode()).hexdigest()[:8]
        server = server[: _LIVE_TAG_MAX - 9] + "~" + digest
    return prefix + server


def live_key(server: str) -> str:
    """The ``daemon_state`` key under which the daemon marks whether ``server``'s
    registration state in the store is live (:func:`live_mark`); a name too long for the
    key column cut and digested."""
    return _server_key(_LIVE_PREFIX, server)


def clock_key(server: str) -> str:
    """The ``daemon_state`` key under which the daemon notes, with each live mark, how
    many seconds ``server``'s clock (as the daemon knows it) is ahead of the database's
    (:func:`mark_live`): ``status`` judges its contact expiries by it (:func:`status_rows`)."""
    return _server_key(_CLOCK_PREFIX, server)


def live_mark(live: bool, at: float) -> str:
    """The value of a :func:`live_key`: ``live:<epoch>`` (the state is kept up to date,
    as of then: marked again every ``LIVE_BEAT``) or ``down:<epoch>`` (since then no one
    reads the server: its session lost, the daemon stopped).  ``at`` is the database's
    clock (:func:`database_epoch`), as ``status`` reads it: see :func:`mark_live`."""
    return f"{'live' if live else 'down'}:{at:.3f}"


def database_epoch(conn: Connection) -> float:
    """The database server's clock, in seconds since 1970 UTC: the one clock the daemon
    marking a server live and ``status`` judging the mark's age (often on another host,
    against PostgreSQL or MariaDB) share, so a skew between their hosts' clocks does not
    make every mark stale, or a dead daemon's look fresh.  SQLite's is the local clock
    (its ``julianday('now')``): the store is a file, its readers on its host."""
    name = conn.dialect.name
    now: ColumnElement[Any]
    if name == "postgresql":
        # ``clock_timestamp()``, not ``now()``: the time of the call, not of the
        # transaction's start (a mark written late in a long transaction is not older).
        now = extract("epoch", func.clock_timestamp())
    elif name in ("mysql", "mariadb"):
        # Without an argument: the epoch itself, whole seconds.  ``UNIX_TIMESTAMP(NOW(6))``
        # would go through the session's time zone, an hour off in a DST fall-back hour.
        now = func.unix_timestamp()
    else:
        now = (func.julianday("now") - _UNIX_JULIAN_DAY) * 86400.0
    return float(conn.execute(select(now)).scalar_one())


#: The Julian day of 1970-01-01 00:00 UTC, SQLite's ``julianday`` of the epoch.
_UNIX_JULIAN_DAY = 2440587.5


def mark_live(conn: Connection, server: str, live: bool, asterisk_ahead: float = 0.0) -> None:
    """Mark ``server``'s registration state ``live`` or ``down`` as of now on the
    database's clock (:func:`live_mark`, :func:`database_epoch`), and note under
    :func:`clock_key` how many seconds Asterisk's clock is ahead of the database's
    (``<seconds>``, negative when behind): this host's clock's offset from the
    database's plus ``asterisk_ahead``, Asterisk's from this host's (the daemon's
    estimate from the stamps Asterisk sends, :mod:`provisioner.ami.clock`; 0 when none
    was ever seen: this host's clock is taken for Asterisk's), in the caller's
    transaction (one upsert).

    The contact expiries the daemon stores are Asterisk's (``ExpirationTime``, epoch
    seconds on Asterisk's clock).  ``status`` judges an expiry against the database's
    clock plus this offset, i.e. against Asterisk's clock now, as the daemon does when
    it sees to each expiry (``EXPIRY_GRACE``), whatever the reader's clock says.  Noted
    every ``LIVE_BEAT`` (and when the estimate moves), the offset follows either clock
    being set right."""
    before = time.time()
    epoch = database_epoch(conn)
    # The middle of the round trip: the database's clock was read about then.
    ahead = (before + time.time()) / 2 - epoch + asterisk_ahead
    marks = {live_key(server): live_mark(live, epoch), clock_key(server): f"{ahead:.3f}"}
    write_states(conn, marks)


@dataclass
class _Marks:
    """What ``status`` reads of the daemon's marks (:func:`_read_marks`)."""

    #: The database's clock at the read (:func:`database_epoch`).
    epoch: float
    #: The servers asked about whose registration state is live now.
    live: set[str]
    #: :func:`clock_key` -> seconds the server's clock, as the daemon marking it knows
    #: it, is ahead of the database's.
    ahead: dict[str, float]
    #: Every server's time now, when the caller gives it (:func:`status_rows`' ``now``).
    fixed: datetime | None = None
    _now: dict[str, datetime] = field(default_factory=dict)

    def now_of(self, server: str) -> datetime:
        """``server``'s time now as the daemon reading it takes it (naive UTC): the
        database's clock plus the offset that daemon noted (:func:`mark_live`: Asterisk's
        clock as its stamps tell it, else that daemon's); the database's clock alone for
        a server with none noted (never marked, or by a provisioner before offsets were
        noted)."""
        if self.fixed is not None:
            return self.fixed
        now = self._now.get(server)
        if now is None:
            at = self.epoch + self.ahead.get(clock_key(server), 0.0)
            now = self._now[server] = datetime.fromtimestamp(at, UTC).replace(tzinfo=None)
        return now


def _read_marks(conn: Connection, servers: Sequence[str], now: datetime | None) -> _Marks:
    """The database's clock, those of ``servers`` whose registration state is live now,
    and every server's clock offset (one query for the marks); ``now``: every server's
    time, given (:attr:`_Marks.fixed`).

    Live: a ``live`` mark no older than ``LIVE_FOR`` on the database's clock
    (:func:`database_epoch`; a little younger, too: a mark committed after this
    transaction began, or written by a daemon before marks took the database's time,
    with its own clock a little ahead)."""
    keys = {live_key(server): server for server in servers}
    key, value = daemon_state.c.key, daemon_state.c.value
    query = select(key, value).where(
        or_(key.in_(sorted(keys)), key.startswith(_CLOCK_PREFIX, autoescape=True))
    )
    live = set()
    ahead: dict[str, float] = {}
    epoch = database_epoch(conn)
    window = LIVE_FOR.total_seconds()
    for found, text in conn.execute(query):
        if found.startswith(_CLOCK_PREFIX):
            try:
                seconds = float(text)
            except ValueError:
                continue  # not a note this code wrote: the database's clock stands
            if math.isfinite(seconds):
                ahead[found] = seconds
            continue
        kind, _, at = text.partition(":")
        try:
            age = epoch - float(at)
        except ValueError:
            continue  # not a mark this code wrote: nothing is known
        if kind == "live" and abs(age) <= window:
            live.add(keys[found])
    return _Marks(epoch, live, ahead, now)


def _contacts_of(user_id: int, server: str, stored: str | None) -> list[dict[str, Any]]:
    """A summary's ``contacts`` (:func:`contacts_text`) as one mapping per contact, with
    its user and server and its times as naive datetimes, ordered by URI, then id (as
    ``status`` lists them)."""
    out = []
    for values in json.loads(stored) if stored else ():
        contact = dict(zip(CONTACT_FIELDS, values, strict=True))
        for name in ("expires_at", "changed_at"):
            if contact[name] is not None:
                contact[name] = datetime.fromisoformat(contact[name])
        out.append({"user_id": user_id, "server": server, **contact})
    out.sort(key=lambda c: (c["uri"], c["contact_id"]))
    return out


def _dialled_order(extension: str) -> tuple[int, int, str]:
    """Sort key of an extension as a dialled number: all-digit extensions by numeric
    value (2001 before 10000), equal values by text (0101 before 101), then any other
    extension by text."""
    if extension.isascii() and extension.isdigit():
        return (0, int(extension), extension)
    return (1, 0, extension)


def status_rows(
    conn: Connection,
    usernames: Sequence[str] | None = None,
    *,
    now: datetime | None = None,
    servers: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per live user, ordered by extension as dialled numbers (:func:`_dialled_order`):
    extension, username, summary per server (by server name) and contacts (by server,
    then URI, each with ``expired``: past its stored expiry by ``EXPIRED_AFTER``), for
    ``status``; the user agent is a usable contact's (:func:`_user_agent`).  An expired
    contact counts for nothing in the state.  A deleted user is listed only when named
    (as ``user show`` finds it): state ``deleted``, no server, no contact (it is no
    longer provisioned).

    A stored expiry is Asterisk's, on Asterisk's clock; it is judged against that
    server's clock now as its daemon knows it (:meth:`_Marks.now_of`: the database's
    clock plus the offset the daemon noted, :func:`mark_live`), never the reader's: a
    reader whose clock is off would show live phones expired or gone ones live.  ``now``
    (naive UTC), when given, is every server's time instead (a test, or a look at an
    old record).

    ``servers``: the configured Asterisk servers.  One whose state is not live
    (:func:`_live_servers`: its AMI session down, the daemon stopped or killed) is not
    read now: its summaries say ``live: false`` and its contacts ``stale: true``, and
    they count for nothing.  A user that no live server holds online is then
    ``unknown``: its phone may be registered there, or gone, and nothing can tell."""
    configured = set(servers)
    marks = _read_marks(conn, sorted(configured), now)
    blind = configured - marks.live
    query = select(
        users.c.id, users.c.extension, users.c.username, users.c.username_key, users.c.deleted_at
    )
    keys = {username_key(u) for u in usernames or ()}
    if keys:
        query = query.where(users.c.username_key.in_(sorted(filter(is_sendable, keys))))
    else:
        query = query.where(users.c.deleted_at.is_(None))
    found = escaping_bytes_not_utf8(conn, lambda: conn.execute(query).all())
    people = sorted(found, key=lambda p: _dialled_order(p.extension))
    if keys:
        # Exact keys, not the database's collation: "alice " names no one on any database.
        people = [p for p in people if p.username_key in keys]
    ids = [p.id for p in people if p.deleted_at is None]
    summaries: dict[int, list[dict[str, Any]]] = {}
    contacts: dict[int, list[dict[str, Any]]] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        summary = registration_summary.c
        for r in conn.execute(
            select(registration_summary)
            .where(summary.user_id.in_(chunk))
            .order_by(summary.user_id, summary.server)
        ):
            row = dict(r._mapping)
            stored = row.pop("contacts")
            summaries.setdefault(r.user_id, []).append(row)
            contacts.setdefault(r.user_id, []).extend(_contacts_of(r.user_id, r.server, stored))
    out = []
    for p in people:
        sums = summaries.get(p.id, [])
        cons = contacts.get(p.id, [])
        _mark_expired(cons, marks.now_of)
        for s in sums:
            s["live"] = s["server"] not in blind
        for c in cons:
            c["stale"] = c["server"] in blind
        seen = [s for s in sums if s["live"]]
        statuses = [c["status"] for c in cons if not c["expired"] and not c["stale"]]
        state = summarize(statuses, _live_states(seen, cons))
        if state != "online" and blind:
            state = "unknown"
        if p.deleted_at is not None:
            state = "deleted"
        changed = [x["changed_at"] for x in sums + cons]
        out.append(
            {
                "extension": p.extension,
                "username": p.username,
                "state": state,
                "servers": sums,
                "contacts": cons,
                "user_agent": _user_agent(cons),
                "last_change": max(changed) if changed else None,
            }
        )
    return out
