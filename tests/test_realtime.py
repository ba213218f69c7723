"""The realtime target on real SQLite, PostgreSQL and MariaDB databases."""

from __future__ import annotations

import gc
import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError

from provisioner.config import Config, StoreSettings, TargetSettings
from provisioner.errors import InvalidInput
from provisioner.model import User, Voice
from provisioner.pjsip import RenderSettings, UserObjects, render_all
from provisioner.store.engine import open_engine
from provisioner.targets import Change
from provisioner.targets.asterisk_schema import (
    DIALECTS,
    asterisk_ddl,
    metadata,
    provisioner_objects,
    ps_aors,
    ps_auths,
    ps_endpoints,
)
from provisioner.targets.realtime import RealtimeTarget

from .helpers import collections_seen

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCHEMA = (
    Path(__file__).resolve().parents[2] / "shared" / "asterisk" / "schema" / "ps_tables.sqlite3.sql"
)
SETTINGS = RenderSettings()
KINDS = (("endpoint", ""), ("auth", "-auth"), ("aor", ""))


def make_user(ext: str, **voice: Any) -> User:
    """A valid user with extension ``ext``, its digests computed for the default realm."""
    name = f"user{ext}"
    secret = f"{name}:asterisk:secret-{ext}".encode()
    return User(
        id=int(ext),
        role="user",
        username=name,
        full_name=f"User {ext}",
        email=f"{name}@example.com",
        extension=ext,
        voice=Voice(**voice),
        sip_md5=hashlib.md5(secret).hexdigest(),
        sip_sha256=hashlib.sha256(secret).hexdigest(),
    )


def render(*users: User, settings: RenderSettings = SETTINGS) -> list[UserObjects]:
    objects, skipped = render_all(users, settings)
    assert not skipped
    return objects


@pytest.fixture
def rt_engine(db_url: str) -> Iterator[Engine]:
    """An engine on an empty database holding the realtime tables."""
    engine = open_engine(db_url)
    RealtimeTarget(engine).create_tables()
    yield engine
    engine.dispose()


@pytest.fixture
def target(rt_engine: Engine) -> RealtimeTarget:
    return RealtimeTarget(rt_engine)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four tables, sorted, for before/after comparisons."""
    out = {}
    with engine.connect() as conn:
        for table in (ps_endpoints, ps_auths, ps_aors, provisioner_objects):
            rows = [tuple(r) for r in conn.execute(select(table))]
            out[table.name] = sorted(rows, key=repr)
    return out


def row_of(engine: Engine, table: Any, object_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        found = conn.execute(select(table).where(table.c.id == object_id)).first()
    return None if found is None else dict(found._mapping)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement ``engine`` sends to the database inside the block."""
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(str(args[2]))  # (conn, cursor, statement, parameters, context, many)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def assert_read_only_ownership(sent: list[str]) -> None:
    """Only SELECTs of the ownership table (and transaction control, and the writers'
    lock) were sent: none on Asterisk's three tables."""
    lock = ("advisory_xact_lock", "get_lock", "release_lock")
    queries = [
        s
        for s in sent
        if not s.lstrip().upper().startswith(("BEGIN", "COMMIT"))
        and not any(name in s.lower() for name in lock)
    ]
    assert queries
    for statement in queries:
        assert statement.lstrip().upper().startswith("SELECT"), statement
        assert "provisioner_objects" in statement, statement
        for name in ("ps_endpoints", "ps_auths", "ps_aors"):
            assert name not in statement, statement


# -- schema ----------------------------------------------------------------------------


def _reflect(conn: Any, name: str) -> list[tuple[str, str, int | None, bool]]:
    cols = inspect(conn).get_columns(name)
    return [
        (c["name"], type(c["type"]).__name__, getattr(c["type"], "length", None), c["nullable"])
        for c in cols
    ]


def _checks(conn: Any, name: str) -> dict[str, set[str]]:
    """Column -> allowed labels, from the table's CHECK constraints."""
    out: dict[str, set[str]] = {}
    for check in inspect(conn).get_check_constraints(name):
        text = check["sqltext"]
        column = text.split(" IN ")[0].split(" OR ")[-1].strip().strip('"')
        labels = text[text.rindex("(") + 1 : text.rindex(")")]
        out[column] = {label.strip().strip("'") for label in labels.split(",")}
    return out


def test_tables_match_asterisk_sqlite_schema() -> None:
    """Our three tables have Asterisk's column names, order, types, lengths, nullability and
    enum labels, as in the shared ps_tables.sqlite3.sql."""
    if not SHARED_SCHEMA.parent.is_dir():
        pytest.skip("the shared Asterisk schema directory is absent")
    theirs = create_engine("sqlite://")
    with theirs.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        raw.executescript(SHARED_SCHEMA.read_text())
    ours = create_engine("sqlite://")
    metadata.create_all(ours)
    with theirs.connect() as a, ours.connect() as b:
        for table in (ps_endpoints, ps_auths, ps_aors):
            assert _reflect(b, table.name) == _reflect(a, table.name), table.name
            assert _checks(b, table.name) == _checks(a, table.name), table.name
            unique = {
                tuple(u["column_names"]) for u in inspect(b).get_unique_constraints(table.name)
            }
            assert ("id",) in unique


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_sql_files_match_tables(dialect: str) -> None:
    """sql/asterisk/<dialect>.sql is exactly what asterisk_ddl() generates from the Tables."""
    path = ROOT / "sql" / "asterisk" / f"{dialect}.sql"
    assert path.read_text() == asterisk_ddl(dialect), f"regenerate {path}"


def test_create_tables_is_idempotent(rt_engine: Engine) -> None:
    """create_tables on existing tables changes nothing and keeps their rows."""
    target = RealtimeTarget(rt_engine)
    target.apply(render(make_user("1001")))
    before = snapshot(rt_engine)
    target.create_tables()
    assert snapshot(rt_engine) == before


# -- apply -----------------------------------------------------------------------------


def _assert_in_columns(rt_engine: Engine, objects: Sequence[UserObjects]) -> None:
    """Each option of each object is in its column of the object's row, as text."""
    for obj in objects:
        for table, oid, options in (
            (ps_endpoints, obj.endpoint_id, obj.endpoint),
            (ps_auths, obj.auth_id, obj.auth),
            (ps_aors, obj.aor_id, obj.aor),
        ):
            row = row_of(rt_engine, table, oid)
            assert row is not None
            assert {column: str(row[column]) for column, _ in options} == dict(options), table


def test_rows_written_exactly(target: RealtimeTarget, rt_engine: Engine, backend: str) -> None:
    """Each option lands in its column, ids in ``id``, ownership is recorded, and SQLite rows
    carry Asterisk's defaults while other databases leave unmapped columns NULL."""
    objects = render(make_user("1001"), make_user("1002", transport="wss", video="yes"))
    change = target.apply(objects)
    assert change.added == ("1001", "1002")
    assert change.wrote
    _assert_in_columns(rt_engine, objects)
    endpoint = row_of(rt_engine, ps_endpoints, "1001")
    aor = row_of(rt_engine, ps_aors, "1001")
    auth = row_of(rt_engine, ps_auths, "1001-auth")
    assert endpoint is not None
    assert aor is not None
    assert auth is not None
    assert aor["max_contacts"] == 1
    if backend == "sqlite":
        assert endpoint["dtmf_mode"] == "rfc4733"
        assert endpoint["100rel"] == "yes"
        assert endpoint["timers_sess_expires"] == 1800
        assert aor["default_expiration"] == 3600
        assert aor["qualify_timeout"] == 3.0
        assert auth["nonce_lifetime"] == 32
    else:
        assert endpoint["dtmf_mode"] is None
        assert aor["default_expiration"] is None
        assert auth["nonce_lifetime"] is None
    assert auth["md5_cred"] is None
    owned = snapshot(rt_engine)["provisioner_objects"]
    expected = [(kind, f"{ext}{suffix}") for ext in ("1001", "1002") for kind, suffix in KINDS]
    assert sorted(row[:2] for row in owned) == sorted(expected)
    assert sorted(len(str(row[2])) for row in owned if row[0] == "endpoint") == [32, 32]
    assert [row[2] for row in owned if row[0] != "endpoint"] == [None] * 4


def test_users_sharing_option_names_in_another_order_fill_the_same_columns(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """Users who all give the same option names, in an order not the mapping's, have each
    option in its column (numbers as numbers), as users whose names differ do."""
    alike = render(*(make_user(str(2000 + i)) for i in range(3)))
    turned = [replace(obj, endpoint=obj.endpoint[::-1], aor=obj.aor[::-1]) for obj in alike]
    mixed = [*turned, *render(make_user("2010", transport="wss", video="yes"))]
    assert target.apply(mixed).added == ("2000", "2001", "2002", "2010")
    _assert_in_columns(rt_engine, mixed)
    aor = row_of(rt_engine, ps_aors, "2001")
    assert aor is not None
    assert aor["max_contacts"] == 1


def test_a_number_column_given_no_number_is_refused_naming_its_field(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """A value that is no number for a number column refuses the apply, naming the first
    user's field that holds one, and writes nothing; so does an option given twice."""
    objects = render(*(make_user(str(3000 + i)) for i in range(3)))

    def aor_with(obj: UserObjects, **changed: str) -> UserObjects:
        return replace(obj, aor=tuple((k, changed.get(k, v)) for k, v in obj.aor))

    bad = [
        objects[0],
        aor_with(objects[1], qualify_frequency="often"),
        aor_with(objects[2], max_contacts="many"),
    ]
    with pytest.raises(InvalidInput) as refused:
        target.apply(bad)
    assert [p.field for p in refused.value.problems] == ["aor.qualify_frequency"]
    twice = [replace(obj, auth=(*obj.auth, obj.auth[0])) for obj in objects]
    with pytest.raises(InvalidInput) as refused:
        target.apply(twice)
    assert [p.field for p in refused.value.problems] == ["auth"]
    assert all(not rows for rows in snapshot(rt_engine).values())


def test_working_out_a_full_apply_of_thousands_of_users_runs_no_garbage_collection(
    target: RealtimeTarget,
) -> None:
    """Reading, making and comparing the rows of 2,000 users runs no cyclic garbage
    collection (what it allocates holds no cycles) but the one due when the collector,
    left enabled as it was found, resumes before anything is written."""
    objects = render(*(make_user(str(10000 + i)) for i in range(2000)))
    target.create_tables()
    at_guard: list[bool] = []
    with collections_seen(until=lambda: bool(at_guard)) as generations:
        change = target.apply(objects, guard=lambda _change: at_guard.append(gc.isenabled()))
    assert generations in ([], [0])
    assert at_guard == [True]
    assert len(change.added) == 2000


def test_unchanged_apply_writes_nothing(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A second apply of the same objects changes no row and reports everything unchanged."""
    objects = render(make_user("1001"), make_user("1002"))
    target.apply(objects)
    before = snapshot(rt_engine)
    change = target.apply(objects)
    assert change == Change(unchanged=2)
    assert not change.wrote
    assert snapshot(rt_engine) == before


def test_ownership_records_of_a_bulk_sync(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A sync of several users records every row's kind and id as text (digit-only ids
    too) and one digest per endpoint record, none on auth and AOR records."""
    objects = render(*(make_user(str(1000 + i)) for i in range(5)))
    target.apply(objects)
    po = provisioner_objects
    with rt_engine.connect() as conn:
        records = conn.execute(select(po.c.kind, po.c.id, po.c.digest)).all()
    by_kind: dict[str, dict[Any, Any]] = {}
    for kind, oid, digest in records:
        assert isinstance(oid, str)
        by_kind.setdefault(kind, {})[oid] = digest
    extensions = [str(1000 + i) for i in range(5)]
    assert set(by_kind["aor"]) == set(by_kind["endpoint"]) == set(extensions)
    assert set(by_kind["auth"]) == {f"{e}-auth" for e in extensions}
    assert set(by_kind["auth"].values()) == set(by_kind["aor"].values()) == {None}
    digests = list(by_kind["endpoint"].values())
    assert all(isinstance(d, str) and len(d) == 32 for d in digests)
    assert len(set(digests)) == 5
    if rt_engine.dialect.name == "sqlite":
        with rt_engine.connect() as conn:
            types = conn.execute(select(func.typeof(po.c.id)).distinct()).scalars().all()
        assert types == ["text"]


def test_unchanged_apply_reads_only_digests(target: RealtimeTarget, rt_engine: Engine) -> None:
    """An unchanged plain apply sends only SELECTs of the ownership records: no row of
    Asterisk's tables is read and nothing is written."""
    objects = render(*(make_user(str(1000 + i)) for i in range(20)))
    target.apply(objects)
    before = snapshot(rt_engine)
    with statements(rt_engine) as sent:
        change = target.apply(objects)
    assert change == Change(unchanged=20)
    assert_read_only_ownership(sent)
    assert snapshot(rt_engine) == before


def test_update_changes_only_differing_rows(target: RealtimeTarget, rt_engine: Engine) -> None:
    """Changing one user's context updates only that endpoint row."""
    target.apply(render(make_user("1001"), make_user("1002")))
    before = snapshot(rt_engine)
    change = target.apply(render(make_user("1001", context="sales"), make_user("1002")))
    assert change.updated == ("1001",)
    assert change.changed_objects == (("endpoint", "1001"),)
    assert change.unchanged == 1
    after = snapshot(rt_engine)
    assert after["ps_auths"] == before["ps_auths"]
    assert after["ps_aors"] == before["ps_aors"]
    row = row_of(rt_engine, ps_endpoints, "1001")
    assert row is not None
    assert row["context"] == "sales"


def test_updating_every_user_adds_no_row_and_records_new_digests(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """An apply that changes every user (MariaDB: upserts in multi-row statements) updates
    each row in place: the same ids in every table, new values, new digests."""
    names = [str(n) for n in range(1001, 1041)]
    target.apply(render(*(make_user(n) for n in names)))
    before = snapshot(rt_engine)
    old_digests = _digests(rt_engine)
    change = target.apply(render(*(make_user(n, context="sales") for n in names)))
    assert change.updated == tuple(names)
    after = snapshot(rt_engine)
    for table in ("ps_endpoints", "ps_auths", "ps_aors", "provisioner_objects"):
        assert len(after[table]) == len(before[table]), table
    rows = [row_of(rt_engine, ps_endpoints, n) for n in names]
    assert {row["context"] if row else None for row in rows} == {"sales"}
    assert set(_digests(rt_engine)).isdisjoint(old_digests)
    assert target.apply(render(*(make_user(n, context="sales") for n in names))).empty


def test_switching_auth_type_clears_unused_column(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """A credential column the new mapping no longer gives is set back to NULL."""
    target.apply(render(make_user("1001"), settings=RenderSettings(auth_type="md5")))
    target.apply(render(make_user("1001")))
    auth = row_of(rt_engine, ps_auths, "1001-auth")
    assert auth is not None
    assert auth["md5_cred"] is None
    assert auth["auth_type"] == "userpass"


def test_removed_user_rows_deleted(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A user missing from the desired set loses its three rows and ownership records."""
    target.apply(render(make_user("1001"), make_user("1002")))
    change = target.apply(render(make_user("1002")))
    assert change.removed == ("1001",)
    assert row_of(rt_engine, ps_endpoints, "1001") is None
    assert row_of(rt_engine, ps_auths, "1001-auth") is None
    assert row_of(rt_engine, ps_aors, "1001") is None
    assert ("endpoint", "1001") not in snapshot(rt_engine)["provisioner_objects"]


#: Asterisk's ps_contacts, as much of it as the test needs (a site keeping contacts in
#: the realtime database: ``contact = realtime,ps_contacts``).
_CONTACTS = Table(
    "ps_contacts",
    MetaData(),
    Column("id", String(255), primary_key=True),
    Column("uri", String(511)),
    Column("endpoint", String(255)),
)


def test_a_removed_aor_s_realtime_contacts_are_deleted(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """Where contacts live in ps_contacts, removing a user deletes its AOR's contacts in
    the same apply, and no other (not a longer id with the same start, not a trunk's)."""
    _CONTACTS.create(rt_engine)
    ids = ["1001;@aaa", "1001;@bbb", "10011;@ccc", "1002;@ddd", "trunk;@eee"]
    with rt_engine.begin() as conn:
        conn.execute(_CONTACTS.insert(), [{"id": i, "uri": "sip:x", "endpoint": "e"} for i in ids])
    target.apply(render(make_user("1001"), make_user("1002"), make_user("10011")))
    change = target.apply(render(make_user("1002"), make_user("10011")))
    assert change.removed == ("1001",)
    with rt_engine.connect() as conn:
        left = sorted(conn.execute(select(_CONTACTS.c.id)).scalars())
    assert left == ["10011;@ccc", "1002;@ddd", "trunk;@eee"]


def test_an_aor_given_to_another_user_loses_its_realtime_contacts(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """Where contacts live in ps_contacts, an extension whose user is renamed (its auth
    username changed: another phone's credentials) is named reowned, by a whole apply
    and by a one-user edit, and its AOR's contacts are deleted in the same apply, no
    other; a new SIP secret alone deletes none."""
    _CONTACTS.create(rt_engine)
    ids = ["1001;@aaa", "10011;@ccc", "1002;@ddd"]
    with rt_engine.begin() as conn:
        conn.execute(_CONTACTS.insert(), [{"id": i, "uri": "sip:x", "endpoint": "e"} for i in ids])
    target.apply(render(make_user("1001"), make_user("1002"), make_user("10011")))
    rekeyed = replace(make_user("1002"), sip_md5="0" * 32)
    assert target.apply_partial(render(rekeyed), ()).reowned == ()
    bob = replace(make_user("1001"), username="bob")
    change = target.apply(render(bob, rekeyed, make_user("10011")))
    assert change.updated == ("1001",)
    assert change.reowned == ("1001",)
    carol = replace(make_user("1002"), username="carol")
    assert target.apply_partial(render(carol), ()).reowned == ("1002",)
    with rt_engine.connect() as conn:
        left = sorted(conn.execute(select(_CONTACTS.c.id)).scalars())
    assert left == ["10011;@ccc"]


def test_without_a_ps_contacts_table_a_removal_needs_none(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """Contacts in astdb (the default): the realtime database has no ps_contacts, and a
    removal goes through all the same."""
    target.apply(render(make_user("1001"), make_user("1002")))
    assert target.apply(render(make_user("1002"))).removed == ("1001",)
    assert not inspect(rt_engine).has_table("ps_contacts")


def _tamper(engine: Engine) -> None:
    """Edit every endpoint's context and delete every AOR, by hand."""
    with engine.begin() as conn:
        conn.execute(ps_endpoints.update().values(context="tampered"))
        conn.execute(ps_aors.delete())


def _assert_healed(change: Change, engine: Engine) -> None:
    # Its AOR put back: added, for the reload Asterisk needs to track it again.
    assert change.added == ("1001",)
    assert change.updated == ()
    assert set(change.changed_objects) == {("endpoint", "1001"), ("aor", "1001")}
    row = row_of(engine, ps_endpoints, "1001")
    assert row is not None
    assert row["context"] == "from-sip"
    assert row_of(engine, ps_aors, "1001") is not None


def test_hand_edit_is_healed_by_verify(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A managed column edited by hand, or a row deleted by hand, is not noticed by a plain
    apply (the recorded digests still match) but is put back by a verifying apply."""
    objects = render(make_user("1001"))
    target.apply(objects)
    _tamper(rt_engine)
    tampered = snapshot(rt_engine)
    fast = target.apply(objects)
    assert fast == Change(unchanged=1)
    assert snapshot(rt_engine) == tampered
    assert target.plan(objects).diff == ""
    assert (
        "~ ps_endpoints 1001 context: tampered -> from-sip"
        in target.plan(objects, verify=True).diff.splitlines()
    )
    _assert_healed(target.apply(objects, verify=True), rt_engine)
    assert target.apply(objects, verify=True).wrote is False
    assert target.apply(objects).wrote is False


@pytest.mark.parametrize("table", [ps_endpoints, ps_aors], ids=lambda t: t.name)
def test_an_endpoint_or_aor_row_deleted_by_hand_and_put_back_is_added(
    target: RealtimeTarget, rt_engine: Engine, table: Table
) -> None:
    """An endpoint or AOR row deleted by hand and put back by a verifying apply counts the
    user as added, not updated: Asterisk reports registration state only for endpoints
    and AORs it loaded at its last res_pjsip reload, which may have come while the row
    was gone, so the put-back row needs the reload an added one gets."""
    objects = render(make_user("1001"), make_user("1002"))
    target.apply(objects)
    with rt_engine.begin() as conn:
        conn.execute(table.delete().where(table.c.id == "1001"))
    change = target.apply(objects, verify=True)
    assert change.added == ("1001",)
    assert change.updated == ()
    assert change.unchanged == 1
    assert row_of(rt_engine, table, "1001") is not None
    assert target.apply(objects, verify=True) == Change(unchanged=2)


def _digests(engine: Engine) -> list[str | None]:
    """The digests recorded on the endpoints' ownership records."""
    po = provisioner_objects
    with engine.connect() as conn:
        return list(conn.execute(select(po.c.digest).where(po.c.kind == "endpoint")).scalars())


def test_null_digest_falls_back_to_full_compare(target: RealtimeTarget, rt_engine: Engine) -> None:
    """Rows whose recorded digest is NULL are compared column by column by a plain apply:
    drift is put back, rows already right are not written, and the digests are recorded."""
    objects = render(make_user("1001"), make_user("1002"))
    target.apply(objects)
    with rt_engine.begin() as conn:
        conn.execute(provisioner_objects.update().values(digest=None))
    _tamper(rt_engine)
    before = snapshot(rt_engine)
    with statements(rt_engine) as sent:
        change = target.apply(objects)
    assert change.added == ("1001", "1002")  # their AORs put back
    assert set(change.changed_objects) == {
        ("endpoint", "1001"),
        ("endpoint", "1002"),
        ("aor", "1001"),
        ("aor", "1002"),
    }
    assert not any("UPDATE ps_auths" in s or "INSERT INTO ps_auths" in s for s in sent)
    assert snapshot(rt_engine)["ps_auths"] == before["ps_auths"]
    assert None not in _digests(rt_engine)
    with statements(rt_engine) as sent:
        assert target.apply(objects) == Change(unchanged=2)
    assert_read_only_ownership(sent)


def _old_ownership_table() -> Table:
    """``provisioner_objects`` as provisioner created it before the digest column."""
    return Table(
        "provisioner_objects",
        MetaData(),
        Column("kind", String(16), nullable=False),
        Column("id", String(255), nullable=False),
        PrimaryKeyConstraint("kind", "id", name="provisioner_objects_pkey"),
    )


def test_ownership_table_without_digest_column(db_url: str) -> None:
    """An ownership table an older provisioner made without ``digest`` gets the column at
    a target's first write (not at its construction); digests are recorded from then on,
    and a second apply reads only them (rows with no digest are compared column by
    column: test_null_digest_falls_back_to_full_compare)."""
    engine = open_engine(db_url)
    metadata.create_all(engine, tables=[ps_endpoints, ps_auths, ps_aors])
    _old_ownership_table().create(engine)
    target = RealtimeTarget(engine)
    columns = [c["name"] for c in inspect(engine).get_columns("provisioner_objects")]
    assert columns == ["kind", "id"]
    objects = render(make_user("1001"))
    assert target.apply(objects).added == ("1001",)
    columns = [c["name"] for c in inspect(engine).get_columns("provisioner_objects")]
    assert columns == ["kind", "id", "digest"]
    assert None not in _digests(engine)
    target.create_tables()
    with statements(engine) as sent:
        assert target.apply(objects) == Change(unchanged=1)
    assert_read_only_ownership(sent)
    engine.dispose()


def test_sqlite_default_edited_by_hand_is_healed(
    target: RealtimeTarget, rt_engine: Engine, backend: str
) -> None:
    """On SQLite a filled-in default changed by hand is restored by a verifying apply too."""
    if backend != "sqlite":
        pytest.skip("defaults are filled in on SQLite only")
    objects = render(make_user("1001"))
    target.apply(objects)
    with rt_engine.begin() as conn:
        conn.execute(ps_endpoints.update().values(dtmf_mode="inband"))
    assert target.apply(objects, verify=True).updated == ("1001",)
    row = row_of(rt_engine, ps_endpoints, "1001")
    assert row is not None
    assert row["dtmf_mode"] == "rfc4733"


def _insert_foreign(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(ps_endpoints.insert().values(id="trunk-out", context="trunk", aors="trunk"))
        conn.execute(ps_endpoints.insert().values(id="1002", context="by-hand"))
        conn.execute(ps_aors.insert().values(id="trunk", max_contacts=3))


#: Columns an older Asterisk's scripts did not make yet: the auth digests and their
#: algorithms (before 20.12, 21.7, 22.2) and the endpoint's RTP port range.
NEWER_COLUMNS = (
    ("ps_auths", "password_digest"),
    ("ps_auths", "supported_algorithms_uas"),
    ("ps_auths", "supported_algorithms_uac"),
    ("ps_endpoints", "rtp_port_start"),
    ("ps_endpoints", "rtp_port_end"),
)


def test_tables_of_an_older_asterisk_take_md5_users(db_url: str) -> None:
    """Tables an older Asterisk made, without its newer columns, take users with auth_type
    md5 (the form for those versions): the columns no user has a value for are left out,
    and a verifying apply then finds nothing to change."""
    engine = open_engine(db_url)
    try:
        RealtimeTarget(engine).create_tables()
        with engine.begin() as conn:
            for table, column in NEWER_COLUMNS:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        objects = render(
            make_user("1001"), make_user("1002"), settings=RenderSettings(auth_type="md5")
        )
        assert RealtimeTarget(engine).apply(objects).added == ("1001", "1002")
        with engine.connect() as conn:
            sql = "SELECT auth_type, md5_cred FROM ps_auths WHERE id = '1001-auth'"
            auth_type, md5_cred = conn.execute(text(sql)).one()
        assert (auth_type, len(md5_cred)) == ("md5", 32)
        again = RealtimeTarget(engine)
        assert again.apply(objects, verify=True).unchanged == 2
        assert again.apply_partial(objects[:1], ()).empty
    finally:
        engine.dispose()


def test_foreign_rows_never_touched(target: RealtimeTarget, rt_engine: Engine) -> None:
    """Rows provisioner did not create stay as they are, even when a user's extension
    collides with one: that user is skipped and reported."""
    _insert_foreign(rt_engine)
    foreign = snapshot(rt_engine)
    change = target.apply(render(make_user("1001"), make_user("1002")))
    assert change.added == ("1001",)
    assert change.conflicts == ("1002",)
    assert row_of(rt_engine, ps_auths, "1002-auth") is None
    assert row_of(rt_engine, ps_aors, "1002") is None
    after = snapshot(rt_engine)
    for row in foreign["ps_endpoints"] + foreign["ps_aors"]:
        assert row in after["ps_endpoints"] + after["ps_aors"]
    plan = target.plan(render(make_user("1001"), make_user("1002")))
    assert "! ps_endpoints 1002 exists and is not provisioner's" in plan.diff
    target.apply([])
    final = snapshot(rt_engine)
    assert final["ps_endpoints"] == foreign["ps_endpoints"]
    assert final["ps_aors"] == foreign["ps_aors"]
    assert final["provisioner_objects"] == []


def test_a_user_moved_onto_a_foreign_row_keeps_its_endpoint(
    target: RealtimeTarget, rt_engine: Engine
) -> None:
    """A user whose new extension a hand-made row holds is skipped and keeps the rows
    last written for it (full and one-user applies), until the move can be made."""
    user = make_user("1001")
    target.apply(render(user, make_user("1003")))
    _insert_foreign(rt_engine)  # holds ps_endpoints 1002
    before = snapshot(rt_engine)
    moved = replace(user, extension="1002")
    for change in (
        target.apply(render(moved, make_user("1003")), verify=True),
        target.apply(render(moved, make_user("1003"))),
        target.apply_partial(render(moved), ["1001"]),
    ):
        assert change.conflicts == ("1002",)
        assert change.kept_for == (("1002", "1001"),)
        assert change.removed == ()
        assert change.empty
        assert snapshot(rt_engine) == before
    with rt_engine.begin() as conn:
        conn.execute(ps_endpoints.delete().where(ps_endpoints.c.id == "1002"))
    change = target.apply(render(moved, make_user("1003")))
    assert (change.added, change.removed) == (("1002",), ("1001",))


def test_failure_mid_apply_changes_nothing(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A row the database refuses (a value outside an enum) rolls back the whole apply:
    the deletes and updates before it are undone too."""
    target.apply(render(make_user("1001"), make_user("1002")))
    before = snapshot(rt_engine)
    good = render(make_user("1002", context="other"))
    bad = render(make_user("1003"))[0]
    bad = replace(
        bad, endpoint=tuple((k, "maybe" if k == "direct_media" else v) for k, v in bad.endpoint)
    )
    with pytest.raises(DBAPIError):
        target.apply([*good, bad])
    assert snapshot(rt_engine) == before


def test_a_first_apply_that_fails_leaves_the_next_one_making_the_tables(db_url: str) -> None:
    """A first apply into an empty database that fails after making the tables (a guard
    refusing, a value refused, a connection lost) rolls them back where DDL is
    transactional (PostgreSQL, SQLite); the next apply of the same target makes them
    again instead of failing on a missing table until the process restarts."""
    engine = open_engine(db_url)
    try:
        target = RealtimeTarget(engine)

        def refuse(change: Change) -> None:
            raise RuntimeError("refused")

        with pytest.raises(RuntimeError):
            target.apply(render(make_user("1001")), guard=refuse)
        assert target.apply(render(make_user("1001"))).added == ("1001",)
        assert row_of(engine, ps_endpoints, "1001") is not None
    finally:
        engine.dispose()


def test_guard_can_abort(target: RealtimeTarget, rt_engine: Engine) -> None:
    """The guard sees the computed change before any write; raising aborts the apply."""
    target.apply(render(make_user("1001")))
    before = snapshot(rt_engine)
    seen: list[Change] = []

    def guard(change: Change) -> None:
        seen.append(change)
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        target.apply([], guard=guard)
    assert seen[0].removed == ("1001",)
    assert snapshot(rt_engine) == before


def test_keep_leaves_rows(target: RealtimeTarget, rt_engine: Engine) -> None:
    """Objects of a kept endpoint id are neither updated nor removed."""
    target.apply(render(make_user("1001"), make_user("1002")))
    change = target.apply(render(make_user("1002")), keep=["1001"])
    assert change.empty
    assert row_of(rt_engine, ps_endpoints, "1001") is not None


def test_plan_writes_nothing(target: RealtimeTarget, rt_engine: Engine) -> None:
    """plan reports the change with a per-row diff, secrets redacted, and writes nothing."""
    before = snapshot(rt_engine)
    plan = target.plan(render(make_user("1001")))
    assert plan.added == ("1001",)
    assert not plan.wrote
    assert snapshot(rt_engine) == before
    lines = plan.diff.splitlines()
    assert "+ ps_endpoints 1001 allow=ulaw,alaw" in lines
    assert "+ ps_auths 1001-auth password_digest=[redacted]" in lines
    assert "SHA-256:" not in plan.diff

    target.apply(render(make_user("1001"), make_user("1002")))
    wider = RenderSettings(max_contacts=5)
    plan = target.plan(render(make_user("1002"), settings=wider))
    lines = plan.diff.splitlines()
    assert "~ ps_aors 1002 max_contacts: 1 -> 5" in lines
    assert "- ps_auths 1001-auth" in lines
    assert plan.removed == ("1001",)


def test_apply_partial_touches_only_given_ids(target: RealtimeTarget, rt_engine: Engine) -> None:
    """apply_partial upserts and removes only the named users; others stay, even if stale."""
    target.apply(render(make_user("1001"), make_user("1002"), make_user("1003")))
    with rt_engine.begin() as conn:  # drift on 1003 must survive a partial apply
        conn.execute(ps_endpoints.update().where(ps_endpoints.c.id == "1003").values(context="x"))
    change = target.apply_partial(render(make_user("1001", context="sales")), ["1002"])
    assert change.updated == ("1001",)
    assert change.removed == ("1002",)
    assert row_of(rt_engine, ps_endpoints, "1002") is None
    row = row_of(rt_engine, ps_endpoints, "1003")
    assert row is not None
    assert row["context"] == "x"
    added = target.apply_partial(render(make_user("1004")), [])
    assert added.added == ("1004",)
    assert target.apply_partial(render(make_user("1004")), []).wrote is False


def test_from_config_defaults_to_the_store_database(tmp_path: Path) -> None:
    """from_config uses target.url, or the user store's URL when target.url is empty."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    other_url = f"sqlite:///{tmp_path / 'realtime.db'}"
    same = RealtimeTarget.from_config(Config(store=StoreSettings(url=store_url)))
    other = RealtimeTarget.from_config(
        Config(store=StoreSettings(url=store_url), target=TargetSettings(url=other_url))
    )
    assert str(same.engine.url) == store_url
    assert str(other.engine.url) == other_url
    assert same.sqlite_defaults
    same.engine.dispose()
    other.engine.dispose()


def test_kept_users_are_not_read_as_gone(target: RealtimeTarget, rt_engine: Engine) -> None:
    """A plain apply that keeps most users (a realm change skips everyone) reads only the
    rows of the users changed or really gone, leaves kept users' rows as they are and
    still counts them as unchanged."""
    objects = render(*(make_user(str(1000 + i)) for i in range(12)))
    target.apply(objects)
    kept = [o.endpoint_id for o in objects[3:]]
    with rt_engine.begin() as conn:  # a kept user's rows are held even when they differ
        conn.execute(ps_endpoints.update().where(ps_endpoints.c.id == kept[0]).values(context="x"))
    before = snapshot(rt_engine)
    wanted = render(make_user("1000", context="sales"), make_user("1001"))
    with statements(rt_engine) as sent:
        change = target.apply(wanted, keep=kept)
    assert change.updated == ("1000",)
    assert change.removed == ("1002",)
    assert change.unchanged == 1 + len(kept)
    reads = [s for s in sent if s.lstrip().upper().startswith("SELECT") and " ps_" in s]
    assert reads
    for statement in reads:
        assert "WHERE" in statement.upper(), statement
    after = snapshot(rt_engine)
    for table in ("ps_endpoints", "ps_auths", "ps_aors"):
        held = [r for r in before[table] if str(r[0]).removesuffix("-auth") in kept]
        assert [r for r in after[table] if str(r[0]).removesuffix("-auth") in kept] == held
