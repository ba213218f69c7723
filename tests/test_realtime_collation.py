"""Foreign realtime rows whose ids the database holds equal to a user's (MariaDB's
case-insensitive, PAD SPACE collations), and names outside a database's default character
set, on real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from sqlalchemy import Engine, Table, select, text

from provisioner.errors import Problem
from provisioner.pjsip import Skipped, UserObjects
from provisioner.store.engine import open_engine
from provisioner.targets.asterisk_schema import ps_aors, ps_auths, ps_endpoints
from provisioner.targets.realtime import RealtimeTarget

from .test_realtime import make_user, render, row_of, snapshot


@pytest.fixture
def ci_engine(db_url: str, backend: str) -> Iterator[Engine]:
    """An engine on an empty database holding the realtime tables, made in MariaDB's
    default collation (``utf8mb4_general_ci``: case-insensitive, PAD SPACE) on MariaDB."""
    engine = open_engine(db_url)
    if backend == "mariadb":
        with engine.begin() as conn:
            conn.execute(text("ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"))
    RealtimeTarget(engine).create_tables()
    yield engine
    engine.dispose()


def _insert(engine: Engine, table: Table, object_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=object_id))


# (table, hand-made id, the desired id it is written like)
LOOKALIKES = [
    pytest.param(ps_auths, "1001-AUTH", "1001-auth", id="auth-upper-case"),
    pytest.param(ps_endpoints, "1001 ", "1001", id="endpoint-trailing-space"),
    pytest.param(ps_aors, "1001  ", "1001", id="aor-trailing-spaces"),
]


def _blocked(backend: str) -> bool:
    """MariaDB holds the look-alike equal to the user's id; SQLite and PostgreSQL do not."""
    return backend == "mariadb"


@pytest.mark.parametrize(("table", "theirs", "ours"), LOOKALIKES)
def test_lookalike_foreign_row_skips_only_its_user(
    ci_engine: Engine, backend: str, table: Table, theirs: str, ours: str
) -> None:
    """A hand-made row the database holds equal to a user's id blocks and reports that user
    only, is left untouched, and every other user is applied."""
    _insert(ci_engine, table, theirs)
    target = RealtimeTarget(ci_engine)
    change = target.apply(render(make_user("1001"), make_user("1002")))
    if _blocked(backend):
        assert change.added == ("1002",)
        assert change.conflicts == ("1001",)
        rule = (
            f"{table.name} row {theirs!r} was not made by provisioner and the database "
            f"compares it equal to {ours!r}"
        )
        assert change.clashes == (Skipped("user1001", (Problem("extension", rule),)),)
        for other in {ps_endpoints, ps_auths, ps_aors} - {table}:
            assert row_of(ci_engine, other, "1001-auth" if other is ps_auths else "1001") is None
    else:
        assert change.added == ("1001", "1002")
        assert change.conflicts == ()
        assert change.clashes == ()
    after = snapshot(ci_engine)
    assert (theirs, None) in [row[:2] for row in after[table.name]]
    assert theirs not in {row[1] for row in after["provisioner_objects"]}


@pytest.mark.parametrize("verify", [False, True])
def test_lookalike_found_by_later_applies(ci_engine: Engine, backend: str, verify: bool) -> None:
    """A look-alike row made after a first sync blocks a user added later, through a plain or
    verifying full apply and through the one-user path, without failing the apply."""
    target = RealtimeTarget(ci_engine)
    target.apply(render(make_user("1001")))
    _insert(ci_engine, ps_auths, "1002-Auth")
    _insert(ci_engine, ps_auths, "1003-AUTH")
    users = [make_user("1001"), make_user("1002"), make_user("1004")]
    change = target.apply(render(*users), verify=verify)
    partial = target.apply_partial(render(make_user("1003")), [])
    if _blocked(backend):
        assert (change.added, change.conflicts) == (("1004",), ("1002",))
        assert (partial.added, partial.conflicts) == ((), ("1003",))
        assert [s.username for s in partial.clashes] == ["user1003"]
    else:
        assert (change.added, change.conflicts) == (("1002", "1004"), ())
        assert (partial.added, partial.conflicts) == (("1003",), ())
    assert row_of(ci_engine, ps_auths, "1001-auth") is not None


def test_plan_names_the_lookalike(ci_engine: Engine, backend: str) -> None:
    """plan's diff names the look-alike row that blocks a user where the database holds it
    equal to the user's id."""
    _insert(ci_engine, ps_auths, "1001-AUTH")
    plan = RealtimeTarget(ci_engine).plan(render(make_user("1001")))
    line = (
        "! ps_auths 1001-auth is taken by '1001-AUTH', which the database compares equal "
        "and is not provisioner's: user 1001 skipped"
    )
    assert (line in plan.diff.splitlines()) == _blocked(backend)


def _replace(engine: Engine, table: Table, ours: str, theirs: str) -> None:
    """Delete provisioner's row ``ours`` by hand and make a foreign row ``theirs``."""
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.id == ours))
        conn.execute(table.insert().values(id=theirs))


def _ids(engine: Engine, table: Table) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(table.c.id)).scalars())


@pytest.mark.parametrize(("table", "theirs", "ours"), LOOKALIKES)
@pytest.mark.parametrize("path", ["full", "verify", "partial"])
def test_removing_a_user_keeps_a_lookalike_foreign_row(
    ci_engine: Engine, table: Table, theirs: str, ours: str, path: str
) -> None:
    """Removing a user whose row was replaced by hand with a look-alike foreign row deletes
    the user's other rows and its records, and leaves the foreign row as it is."""
    target = RealtimeTarget(ci_engine)
    target.apply(render(make_user("1001"), make_user("1002")))
    _replace(ci_engine, table, ours, theirs)
    if path == "partial":
        change = target.apply_partial([], ["1001"])
    else:
        change = target.apply(render(make_user("1002")), verify=path == "verify")
    assert change.removed == ("1001",)
    assert theirs in _ids(ci_engine, table)
    for other in {ps_endpoints, ps_auths, ps_aors} - {table}:
        assert _ids(ci_engine, other) == ["1002-auth" if other is ps_auths else "1002"]
    owned = {row[1] for row in snapshot(ci_engine)["provisioner_objects"]}
    assert owned == {"1002", "1002-auth"}


def test_a_name_outside_the_databases_default_character_set_is_stored_exactly(
    db_url: str, backend: str
) -> None:
    """Realtime tables made in a database whose default character set is ``latin1`` (an old
    MariaDB's) still hold an emoji or CJK caller ID name exactly, not as ``?``."""
    engine = open_engine(db_url)
    try:
        if backend == "mariadb":
            with engine.begin() as conn:
                conn.execute(text("ALTER DATABASE CHARACTER SET latin1 COLLATE latin1_swedish_ci"))
        target = RealtimeTarget(engine)
        objects = render(make_user("1001"), replace(make_user("1002"), full_name="Zoë 😀 王"))
        assert target.apply(objects).added == ("1001", "1002")
        stored = row_of(engine, ps_endpoints, "1002")
        assert stored is not None
        assert stored["callerid"] == '"Zoë 😀 王" <1002>'
        assert RealtimeTarget(engine).apply(objects, verify=True).unchanged == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("charset", "fits", "unfit"),
    [("utf8mb3", "Zoë 王", "Zoë 😀"), ("latin1", "Zoë Müller", "Zoë 王")],
)
def test_a_name_a_narrow_realtime_table_cannot_hold_skips_only_its_user(
    ci_engine: Engine, backend: str, charset: str, fits: str, unfit: str
) -> None:
    """Realtime tables made by hand (or by Asterisk's alembic) in ``utf8mb3`` or
    ``latin1`` cannot hold some names: that user is skipped and reported (its last
    rows kept), every other user is applied, where the database refused the whole apply."""
    if backend == "mariadb":
        with ci_engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE ps_endpoints CONVERT TO CHARACTER SET {charset}"))
    target = RealtimeTarget(ci_engine)

    def users(name: str) -> list[UserObjects]:
        alice = replace(make_user("1002"), full_name=name)
        return render(make_user("1001"), alice, replace(make_user("1003"), full_name=fits))

    change = target.apply(users(unfit))
    if backend != "mariadb":
        assert change.added == ("1001", "1002", "1003")
        return
    assert change.added == ("1001", "1003")
    assert change.conflicts == ("1002",)
    [skipped] = change.clashes
    assert skipped.username == "user1002"
    [problem] = skipped.problems
    assert problem.field == "full_name"
    assert f"ps_endpoints.callerid is {charset}" in problem.rule
    assert row_of(ci_engine, ps_auths, "1002-auth") is None
    assert target.apply(users("Alice")).added == ("1002",)
    before = snapshot(ci_engine)
    for again in (
        target.apply(users(unfit), verify=True),
        target.apply(users(unfit)),
        target.apply_partial(users(unfit)[1:2], []),
    ):
        assert (again.conflicts, again.empty) == (("1002",), True)
        assert snapshot(ci_engine) == before
