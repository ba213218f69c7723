"""Bulk writes that skip SQLAlchemy's per-row parameter bookkeeping, on the caller's
connection and inside its transaction.

Statements are still Core statements compiled for the connection's dialect (never
string-built from values); only ``Connection.execute``'s per-row processing is
skipped, which cost as much as the inserts themselves at 100k rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase

__all__ = ["Prepared", "copy_rows", "executemany", "prepare", "run_many"]


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
