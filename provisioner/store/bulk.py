"""Bulk writes that skip SQLAlchemy's per-row parameter bookkeeping, on the caller's
connection and inside its transaction.

Statements are still Core statements compiled for the connection's dialect (never
string-built from values); only ``Connection.execute``'s per-row processing is
skipped, which cost as much as the inserts themselves at 100k rows.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    String,
    Table,
    TextClause,
    bindparam,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import UpdateBase

__all__ = [
    "JSON_TABLE_BYTES",
    "JSON_TABLE_CHUNK",
    "Prepared",
    "copy_rows",
    "driver_rows",
    "executemany",
    "has_json_table",
    "json_table_insert",
    "json_table_payload",
    "json_table_source",
    "json_text",
    "prepare",
    "run_many",
]

#: Rows per ``INSERT ... SELECT FROM JSON_TABLE``, at most.
JSON_TABLE_CHUNK = 2000
#: Bytes of one such statement's document, at most: pymysql's own cap on the statements
#: of an ``executemany`` (``max_stmt_length``), so a server that takes the driver's
#: statements (``max_allowed_packet``) takes these too.
JSON_TABLE_BYTES = 1024000


@dataclass(frozen=True)
class Prepared:
    """A Core statement compiled once for one dialect, and how a row of values (in the
    caller's ``names`` order) becomes the driver's parameters; reusable on any connection
    of that dialect."""

    sql: str
    #: Positional drivers (sqlite3): the indexes of the row's values, in statement order.
    order: tuple[int, ...] | None
    #: Named drivers (psycopg, pymysql): the parameter name of each value, in row order.
    bound: tuple[str, ...]

    def params(self, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """The driver's parameters for ``rows``."""
        order = self.order
        if order is None:
            bound = self.bound
            return [dict(zip(bound, row, strict=True)) for row in rows]
        if len(order) == 1:
            first = order[0]
            return [(row[first],) for row in rows]
        width = len(order)
        if order == tuple(range(width)) and all(
            type(row) is tuple and len(row) == width for row in rows
        ):
            # Tuples already in statement order: the rows themselves, no copy of each.
            return list(rows)
        pick = itemgetter(*order)
        return [tuple(pick(row)) for row in rows]


def prepare(
    dialect: Dialect,
    stmt: UpdateBase,
    names: Sequence[str],
    *,
    column_keys: Sequence[str] | None = None,
    literals: bool = False,
) -> Prepared:
    """Compile ``stmt`` for ``dialect``; rows will give values in ``names`` order.
    ``column_keys`` limits a bare ``insert(table)`` to those columns.  With ``literals``
    the statement's ``literal(..., literal_execute=True)`` values are rendered into it by
    SQLAlchemy's literal processors (every bind parameter then needs a value, unused)."""
    keys = list(column_keys) if column_keys is not None else None
    kwargs = {"render_postcompile": True} if literals else {}
    compiled = stmt.compile(dialect=dialect, column_keys=keys, compile_kwargs=kwargs)
    if compiled.positional:
        order = tuple(list(names).index(k) for k in compiled.positiontup or ())
        return Prepared(str(compiled), order, ())
    escaped: dict[str, str] = dict(compiled.escaped_bind_names or {})
    return Prepared(str(compiled), None, tuple(escaped.get(k, k) for k in names))


def run_many(conn: Connection, prepared: Prepared, rows: Sequence[Sequence[Any]]) -> None:
    """The driver's ``executemany`` of a prepared statement over ``rows`` (values in its
    ``names`` order, already what the driver takes), on ``conn`` and in its transaction."""
    if rows:
        conn.exec_driver_sql(prepared.sql, prepared.params(rows))


def executemany(
    conn: Connection,
    stmt: UpdateBase,
    names: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    column_keys: Sequence[str] | None = None,
) -> None:
    """The driver's ``executemany`` of ``stmt`` over ``rows`` (values in ``names`` order).

    Values must already be what the driver takes (callers apply bind processors).
    ``column_keys`` limits a bare ``insert(table)`` to those columns.
    """
    if not rows:
        return
    run_many(conn, prepare(conn.dialect, stmt, names, column_keys=column_keys), rows)


def driver_rows(result: CursorResult[Any]) -> list[tuple[Any, ...]]:
    """Every row of ``result`` as the driver's own tuples, the result then closed.

    SQLAlchemy's Row objects cost more than the fetch itself: a third of an unchanged sync
    of 100k users went into the ``(id, digest)`` rows.  Only for columns whose type has
    no result processor on the dialect (plain strings, integers): values are the driver's.
    """
    try:
        return list(result.cursor.fetchall())
    finally:
        result.close()


def copy_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """PostgreSQL ``COPY table (columns) FROM STDIN`` of ``rows`` through psycopg, on
    ``conn``'s own connection and inside its transaction: one statement, rows streamed.

    The statement names only the Table's own (quoted) identifiers; driver errors come
    out as SQLAlchemy's :class:`~sqlalchemy.exc.DBAPIError`, as from ``Connection.execute``.
    """
    quote = conn.dialect.identifier_preparer
    names = ", ".join(quote.format_column(table.c[c]) for c in columns)
    sql = f"COPY {quote.format_table(table)} ({names}) FROM STDIN"
    driver: Any = conn.connection.driver_connection
    error: type[Exception] = conn.dialect.loaded_dbapi.Error
    try:
        with driver.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)
    except error as exc:
        raise DBAPIError.instance(sql, None, exc, error) from exc


def has_json_table(dialect: Dialect) -> bool:
    """Whether ``dialect``'s server has ``JSON_TABLE``: MariaDB 10.6 and MySQL 8.0.4 on."""
    if dialect.name not in ("mysql", "mariadb"):
        return False
    version = tuple(dialect.server_version_info or ())
    minimum = (10, 6) if getattr(dialect, "is_mariadb", False) else (8, 0, 4)
    return version >= minimum


def json_text(rows: Sequence[Any]) -> str:
    """``rows`` (str, int, float, None, or lists or tuples of them) as compact JSON text, for a
    statement that unpacks them in the database (``json_each``, ``jsonb_array_elements``,
    ``JSON_TABLE``).  orjson makes it in a third of ``json.dumps``'s time: on the paths of
    a full sync and of a registration storm, that was a tenth of the event loop's work."""
    return orjson.dumps(rows).decode()


def json_table_insert(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    update: Sequence[str] = (),
    chunk: int = JSON_TABLE_CHUNK,
    limit: int = JSON_TABLE_BYTES,
) -> None:
    """MariaDB/MySQL ``INSERT INTO table (columns) SELECT ... FROM JSON_TABLE(:rows ...)``
    of ``rows`` (values in ``columns`` order: str, int, float or None), on ``conn`` and in
    its transaction; a statement per ``chunk`` rows, or fewer where their document would
    pass ``limit`` bytes.

    Why: pymysql escapes and formats every value of an ``executemany`` in Python, which is
    most of a bulk insert's cost; here each chunk is one JSON string (made by orjson)
    that the server unpacks.  It travels base64-encoded: pymysql's escaping (``str.translate``)
    runs in C only while no character needs escaping, and JSON is full of ``"``.

    JSON ``null`` becomes NULL; the server converts the text of the other values to each
    column's type, as it does for a quoted literal, and refuses a value too long for its
    column as an ``executemany`` would.  With ``update`` (column names), a row whose key
    exists has those columns updated instead (``ON DUPLICATE KEY UPDATE``).  Needs
    :func:`has_json_table`.
    """
    if not rows:
        return
    dialect = conn.dialect
    key = (type(dialect), dialect.paramstyle, table, tuple(columns), tuple(update))
    prepared = _JSON_TABLE_SQL.get(key)
    if prepared is None:
        prepared = _JSON_TABLE_SQL[key] = _json_table_sql(dialect, table, *key[3:])
    for start in range(0, len(rows), chunk):
        for payload in _payloads(rows[start : start + chunk], limit):
            conn.exec_driver_sql(prepared.sql, prepared.params([(payload,)])[0])


def json_table_payload(document: str | bytes) -> str:
    """A JSON document as it travels to a ``JSON_TABLE`` statement: base64 (see
    :func:`json_table_insert` for why)."""
    raw = document.encode() if isinstance(document, str) else document
    return base64.b64encode(raw).decode("ascii")


def json_table_source(
    width: int, nested: frozenset[int] = frozenset()
) -> tuple[TextClause, list[ColumnElement[Any]]]:
    """The ``rows`` parameter (a :func:`json_table_payload` of an array of arrays) as a
    ``JSON_TABLE`` FROM item ``j``, and its columns ``j.c0`` ... ``j.c<width-1>`` (the
    values at each position, as text; at a position in ``nested``, the JSON text of the
    value there, an array or object, and ``'null'`` for JSON null)."""
    # Only our own names reach the JSON_TABLE clause (c0, c1, ...: JSON paths by position).
    # LONGTEXT: a JSON_TABLE column narrower than a value truncates it without an error,
    # even in strict mode; the table's own column must be the one that refuses it.
    # utf8mb4: a JSON_TABLE column takes the database's default character set, and under a
    # latin1 default each character outside it became "?" with only a warning.
    # JSON: a LONGTEXT column of JSON_TABLE gives NULL for an array; a JSON one gives its
    # text, in utf8mb4 whatever the database's default (it takes no CHARACTER SET).
    spec = ", ".join(
        f"c{i} {'JSON' if i in nested else 'LONGTEXT CHARACTER SET utf8mb4'} PATH '$[{i}]'"
        for i in range(width)
    )
    document = "CONVERT(FROM_BASE64(:rows) USING utf8mb4)"
    source = text(f"JSON_TABLE({document}, '$[*]' COLUMNS ({spec})) AS j").bindparams(
        bindparam("rows", type_=String)
    )
    return source, [literal_column(f"j.c{i}") for i in range(width)]


def _payloads(rows: Sequence[Sequence[Any]], limit: int) -> Iterator[str]:
    """``rows`` as base64 JSON documents of at most ``limit`` bytes each (halved until
    they fit; a single row too large is sent alone, for the server to refuse)."""
    payload = json_table_payload(orjson.dumps(rows))
    if len(payload) <= limit or len(rows) == 1:
        yield payload
        return
    half = len(rows) // 2
    yield from _payloads(rows[:half], limit)
    yield from _payloads(rows[half:], limit)


#: Compiled JSON_TABLE inserts, by (dialect class, paramstyle, table, columns, updated
#: columns).
_JSON_TABLE_SQL: dict[tuple[Any, ...], Prepared] = {}


def _json_table_sql(
    dialect: Dialect, table: Table, columns: tuple[str, ...], update: tuple[str, ...]
) -> Prepared:
    # The insert's column list is the Table's own, quoted by SQLAlchemy.
    source, picked = json_table_source(len(columns))
    pick = select(*picked).select_from(source)
    stmt = mysql_insert(table).from_select(list(columns), pick)
    if update:
        stmt = stmt.on_duplicate_key_update({table.c[c]: stmt.inserted[c] for c in update})
    return prepare(dialect, stmt, ("rows",))
