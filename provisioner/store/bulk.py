"""Bulk writes that skip SQLAlchemy's per-row parameter bookkeeping, on the caller's
connection and inside its transaction.

Statements are still Core statements compiled for the connection's dialect (never
string-built from values); only ``Connection.execute``'s per-row processing is
skipped, which cost as much as the inserts themselves at 100k rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase

__all__ = ["copy_rows", "executemany"]


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
    keys = list(column_keys) if column_keys is not None else None
    compiled = stmt.compile(dialect=conn.dialect, column_keys=keys)
    params: list[Any]
    if compiled.positional:
        order = [list(names).index(k) for k in compiled.positiontup or ()]
        if len(order) == 1:
            params = [(row[order[0]],) for row in rows]
        else:
            pick = itemgetter(*order)
            params = [tuple(pick(row)) for row in rows]
    else:
        escaped: dict[str, str] = dict(compiled.escaped_bind_names or {})
        bound = tuple(escaped.get(k, k) for k in names)
        params = [dict(zip(bound, row, strict=True)) for row in rows]
    conn.exec_driver_sql(str(compiled), params)


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
