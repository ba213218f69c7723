"""Bulk writes through MariaDB's JSON_TABLE, on a real MariaDB database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Engine, Float, Integer, MetaData, String, Table, select
from sqlalchemy.exc import DBAPIError

from provisioner.store import bulk
from provisioner.store.bulk import has_json_table, json_table_insert
from provisioner.store.engine import open_engine
from tests.dbs import temp_database

meta = MetaData()
things = Table(
    "things",
    meta,
    Column("id", String(20), primary_key=True),
    Column("name", String(200)),
    Column("count", Integer),
    Column("weight", Float),
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new MariaDB database holding ``things``."""
    with temp_database("mariadb", tmp_path) as url:
        engine = open_engine(url)
        meta.create_all(engine)
        try:
            yield engine
        finally:
            engine.dispose()


def rows_of(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(select(things)))


def test_mariadb_has_json_table(engine: Engine) -> None:
    """The MariaDB the tests run on is recognised as having JSON_TABLE."""
    assert has_json_table(engine.dialect)


def test_values_arrive_exactly(engine: Engine) -> None:
    """NULL, empty text, quotes, backslashes, non-ASCII text, integers and floats are
    written as given, across several chunks."""
    rows = [
        ("a", 'Zoë "名" \\ \' ; [x]', 3, 1.5),
        ("b", None, None, None),
        ("c", "", 0, 0.0),
        *((f"n{i}", f"name {i}", i, i / 4) for i in range(10)),
    ]
    with engine.begin() as conn:
        json_table_insert(conn, things, ("id", "name", "count", "weight"), rows, chunk=4)
    assert rows_of(engine) == sorted(rows)


def test_documents_over_the_byte_limit_are_split(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows whose document would pass the byte limit go in several statements, each within
    it, and all arrive."""
    sent: list[int] = []
    real = bulk._payloads

    def recorded(rows: Any, limit: int) -> Any:
        for payload in real(rows, limit):
            sent.append(len(payload))
            yield payload

    monkeypatch.setattr(bulk, "_payloads", recorded)
    rows = [(f"k{i}", "x" * 150, i, None) for i in range(40)]
    with engine.begin() as conn:
        json_table_insert(conn, things, ("id", "name", "count", "weight"), rows, limit=1000)
    assert len(sent) > 1
    assert max(sent) <= 1000
    assert rows_of(engine) == sorted(rows)


def test_update_changes_only_the_named_columns(engine: Engine) -> None:
    """With ``update``, an existing key has the named columns updated and the others kept;
    a new key is inserted."""
    with engine.begin() as conn:
        json_table_insert(conn, things, ("id", "name", "count"), [("a", "old", 1)])
    with engine.begin() as conn:
        rows = [("a", "new", 2), ("b", "fresh", 3)]
        json_table_insert(conn, things, ("id", "name", "count"), rows, update=("name",))
    assert rows_of(engine) == [("a", "new", 1, None), ("b", "fresh", 3, None)]


def test_a_value_too_long_is_refused_not_truncated(engine: Engine) -> None:
    """A value longer than its column fails the statement (JSON_TABLE's own columns would
    truncate it silently) and the transaction writes nothing."""
    with engine.connect() as conn, conn.begin():
        json_table_insert(conn, things, ("id", "name"), [("ok", "fine")])
        with pytest.raises(DBAPIError, match="too long"):
            json_table_insert(conn, things, ("id", "name"), [("long", "x" * 201)])
        conn.rollback()
    assert rows_of(engine) == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_any_text_arrives_unchanged(engine: Engine, value: str) -> None:
    """Any text (control characters, quotes, SQL, JSON syntax) is stored exactly: values
    are data inside one JSON document, never part of the statement."""
    with engine.begin() as conn:
        conn.execute(things.delete())
        json_table_insert(conn, things, ("id", "name"), [("k", value)])
    with engine.connect() as conn:
        assert conn.execute(select(things.c.name)).scalar_one() == value
