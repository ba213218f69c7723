"""sql/store/*.sql, the migrations and provisioner.store.schema describe the same schema."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from provisioner.accounts import Accounts, Policy
from provisioner.store import queries as q
from provisioner.store.changefeed import read_changes
from provisioner.store.ddl import store_ddl
from provisioner.store.engine import open_engine
from provisioner.store.migrate import current_revision, downgrade, head_revision, upgrade
from provisioner.store.schema import SUMMARY_FILLFACTOR, metadata

from .dbs import maria_account, run_statement

SQL_DIR = Path(__file__).resolve().parent.parent / "sql" / "store"
FILE_FOR = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
def test_sql_files_equal_the_generated_ddl(dialect: str) -> None:
    """Each sql/store/<dialect>.sql is exactly what `provisioner db ddl` generates."""
    assert (SQL_DIR / f"{dialect}.sql").read_text(encoding="utf-8") == store_ddl(dialect)


def _differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": metadata}
        )
        return list(compare_metadata(ctx, metadata))


def _apply_file(url: str, backend: str) -> None:
    """Run the DDL file as a DBA would (one script), through the backend's own driver."""
    script = (SQL_DIR / f"{FILE_FOR[backend]}.sql").read_text(encoding="utf-8")
    if backend == "sqlite":
        import sqlite3

        db = make_url(url).database
        assert db is not None
        with sqlite3.connect(db) as con:
            con.executescript(script)
        return
    if backend == "postgresql":
        engine = create_engine(url)
        try:
            raw = engine.raw_connection()
            try:
                raw.cursor().execute(script)  # psycopg runs a parameterless multi-statement script
                raw.commit()
            finally:
                raw.close()
        finally:
            engine.dispose()
        return
    from pymysql.constants import CLIENT

    engine = create_engine(url, connect_args={"client_flag": CLIENT.MULTI_STATEMENTS})
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(script)
            while cur.nextset():
                pass
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()


def test_sql_file_builds_the_model_schema(db_url: str, backend: str) -> None:
    """Applying the backend's DDL file to an empty database gives exactly the model's schema."""
    _apply_file(db_url, backend)
    engine = open_engine(db_url)
    try:
        assert _differences(engine) == []
        # The file stamps the head revision, so `db upgrade` recognises it and does nothing.
        assert current_revision(engine) == head_revision()
        assert upgrade(engine) == (head_revision(), head_revision())
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_migrations_build_the_model_schema(engine: Engine) -> None:
    """`provisioner db upgrade` on an empty database gives exactly the model's schema."""
    assert current_revision(engine) == head_revision()
    assert _differences(engine) == []
    # The comparison is not vacuous: a stray column is found.
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE profiles ADD COLUMN stray INTEGER"))
    assert [d[0] for d in _differences(engine)] == ["remove_column"]


def test_migrations_and_file_agree_on_each_migration_step(db_url: str) -> None:
    """Upgrading step by step from the first revision reaches the same schema as one upgrade."""
    engine = open_engine(db_url)
    try:
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert _differences(engine) == []
    finally:
        engine.dispose()


def _fillfactor(engine: Engine, table: str) -> str | None:
    """The fill factor PostgreSQL stores for ``table`` (None: the default, 100)."""
    query = text("SELECT reloptions FROM pg_class WHERE relname = :t AND relkind = 'r'")
    with engine.connect() as conn:
        options = conn.execute(query, {"t": table}).scalar_one() or []
    return next((o.split("=", 1)[1] for o in options if o.startswith("fillfactor=")), None)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("source", ["migrations", "file"])
def test_summary_table_is_half_filled_on_postgresql(db_url: str, source: str) -> None:
    """On PostgreSQL both the migrations and the DDL file leave half of each page of the
    registration summary (rewritten by every registration event) free for in-place updates."""
    if source == "file":
        _apply_file(db_url, "postgresql")
    engine = open_engine(db_url)
    try:
        if source == "migrations":
            upgrade(engine, "0002")
            assert _fillfactor(engine, "registration_summary") is None
            upgrade(engine)
        assert _fillfactor(engine, "registration_summary") == str(SUMMARY_FILLFACTOR)
    finally:
        engine.dispose()


def _renumbered(engine: Engine, old: int, new: int) -> list[int]:
    """Change a user's id from ``old`` to ``new`` in plain SQL; the user ids the feed noted."""
    with engine.connect() as conn:
        start = max((c.id for c in read_changes(conn, 0)), default=0)
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET id = :n WHERE id = :o"), {"n": new, "o": old})
    with engine.connect() as conn:
        return sorted(c.entity_id for c in read_changes(conn, start) if c.entity == "user")


def _insert_user_at_0003(engine: Engine, values: dict[str, str]) -> int:
    """Insert a user into a store at revision 0003 with the columns it had (today's code
    reads columns added since), as a writer of that time did; its id."""
    now = datetime(2026, 1, 1)
    row = {
        **values,
        "username_key": values["username"].lower(),
        "extension": "1000",
        "sip_realm": "asterisk",
        "sip_md5": "0" * 32,
        "sip_sha256": "0" * 64,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        return q.insert_user(conn, row)


def test_0004_makes_a_store_at_0003_note_the_old_id_of_a_changed_key(db_url: str) -> None:
    """Upgrading a populated store from 0003 makes a changed user id note the old id as well,
    and downgrading back to 0003 (or to nothing, then up again) works."""
    engine = open_engine(db_url)
    try:
        upgrade(engine, "0003")
        accounts = Accounts(engine, Policy(password_policy=False))
        values = {"role": "admin", "full_name": "A", "email": "a@example.com"}
        uid = _insert_user_at_0003(engine, {**values, "username": "alice"})
        assert _renumbered(engine, uid, 500) == [500]

        assert upgrade(engine) == ("0003", head_revision())
        assert _differences(engine) == []
        assert _renumbered(engine, 500, 501) == [500, 501]
        assert accounts.get_user("alice").id == 501

        assert downgrade(engine, "0003") == (head_revision(), "0003")
        assert _renumbered(engine, 501, 502) == [502]

        downgrade(engine, "base")
        assert current_revision(engine) is None
        upgrade(engine)
        uid = accounts.add_user({**values, "username": "alice"}).user.id
        assert _renumbered(engine, uid, 600) == [uid, 600]
    finally:
        engine.dispose()


def _noted_users(engine: Engine, statement: str) -> list[int]:
    """Run ``statement`` as a DBA would; the user ids the feed noted for it."""
    with engine.connect() as conn:
        start = max((c.id for c in read_changes(conn, 0)), default=0)
    with engine.begin() as conn:
        conn.execute(text(statement))
    with engine.connect() as conn:
        return sorted({c.entity_id for c in read_changes(conn, start) if c.entity == "user"})


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("source", ["migrations", "file"])
def test_a_user_deleted_by_sqlite_replace_is_noted(db_url: str, source: str) -> None:
    """On SQLite a user that an UPDATE OR REPLACE or an INSERT OR REPLACE deletes (another
    row took its extension or username) is noted in the change feed, with the migrations
    and with the DDL file."""
    if source == "file":
        _apply_file(db_url, "sqlite")
    engine = open_engine(db_url)
    try:
        upgrade(engine)
        accounts = Accounts(engine, Policy(password_policy=False))
        values = {"role": "admin", "full_name": "A", "email": "a@example.com"}
        ids = {n: accounts.add_user({**values, "username": n}).user.id for n in ("a", "b", "c")}
        b = accounts.get_user("b")
        took = f"UPDATE OR REPLACE users SET extension = '{b.extension}' WHERE id = {ids['a']}"
        assert _noted_users(engine, took) == [ids["a"], ids["b"]]
        columns = ", ".join(c.name for c in metadata.tables["users"].columns if c.name != "id")
        again = columns.replace("username_key", "'c'").replace("extension", "'999'")
        copy = f"INSERT OR REPLACE INTO users ({columns}) SELECT {again} FROM users WHERE id = 1"
        assert ids["c"] in _noted_users(engine, copy)  # a copy of user 1 took c's username
        assert accounts.get_user("c").extension == "999"
    finally:
        engine.dispose()


def _latin1_database(db_url: str) -> None:
    """Make the (empty) MariaDB database's default character set ``latin1``."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER DATABASE CHARACTER SET latin1 COLLATE latin1_swedish_ci"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
@pytest.mark.parametrize("source", ["migrations", "file", "store at 0005"])
def test_a_latin1_database_holds_any_full_name(db_url: str, source: str) -> None:
    """A store made in a MariaDB database whose default character set is ``latin1``, by the
    migrations, by the DDL file, or before 0006 and then upgraded, holds a full name with an
    emoji and CJK characters exactly."""
    _latin1_database(db_url)
    if source == "file":
        _apply_file(db_url, "mariadb")
    engine = open_engine(db_url)
    try:
        if source == "store at 0005":
            upgrade(engine, "0005")
        upgrade(engine)
        accounts = Accounts(engine, Policy(password_policy=False))
        accounts.add_user(
            {
                "username": "zoe",
                "role": "admin",
                "full_name": "Zoë 😀 王",
                "email": "zoe@example.com",
            }
        )
        assert accounts.get_user("zoe").full_name == "Zoë 😀 王"
        assert _differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_migration_that_failed_half_way_on_mariadb_runs_again(db_url: str) -> None:
    """On MariaDB, whose DDL is not transactional, a ``db upgrade`` that fails in the
    middle of a migration (here: an account without the TRIGGER privilege, after the
    change table was made) can be run again once the cause is fixed, and reaches exactly
    the model's schema."""

    from provisioner.store.changefeed import trigger_problems

    grant = "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, REFERENCES"
    database = make_url(db_url).database
    with maria_account(db_url, grant) as (account, url):
        engine = open_engine(url)
        with pytest.raises(Exception, match="TRIGGER command denied"):
            upgrade(engine)
        engine.dispose()
        run_statement(db_url, f"GRANT TRIGGER ON `{database}`.* TO '{account}'@'%'")
        engine = open_engine(url)
        try:
            assert upgrade(engine)[1] == head_revision()
            assert _differences(engine) == []
            with engine.connect() as conn:
                assert trigger_problems(conn) == []
        finally:
            engine.dispose()


_SEEN = "2026-05-01 11:59:58.654321"


def _has_contact_table(engine: Engine) -> bool:
    """Whether the store is below migration 0014 (its contacts in ``registrations``)."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        return inspect(conn).has_table("registrations")


def _seed_registered(engine: Engine, count: int, *, ids: bool = True) -> None:
    """``count`` users (bench's generated ones) with a contact and a summary each on
    "pbx1", into a store at any revision from 0002: written as the daemon writes them
    from 0014, in plain SQL into ``registrations`` before; without ``ids`` the database
    gives the users theirs (1, 2, ... in a new store)."""
    from bench.common import make_users, user_rows
    from provisioner.store.registrations import write_endpoint_rows
    from provisioner.store.schema import users

    now = datetime(2026, 1, 1)
    old = _has_contact_table(engine)
    with engine.begin() as conn:
        profile = q.insert_profile(conn, "agents", "", now)
        people = user_rows(make_users(count), profile.id, now)
        for row in people if not ids else ():
            del row["id"]
        for row in people:  # one by one: a multi-row insert may not give ids in order
            conn.execute(users.insert(), row)
        extensions = [str(100000 + i) for i in range(count)]
        if old:
            for ep in extensions:
                uid = conn.execute(
                    text("SELECT id FROM users WHERE extension = :ep"), {"ep": ep}
                ).scalar_one()
                seen = datetime.fromisoformat(_SEEN)
                values = {
                    "uid": uid,
                    "cid": f"{ep};@abc",
                    "uri": f"sip:{ep}@10.0.0.1",
                    "seen": seen,
                }
                conn.execute(
                    text(
                        "INSERT INTO registration_summary (user_id, server, state, "
                        "device_state, problem, changed_at) VALUES (:uid, 'pbx1', 'online', "
                        "'NOT_INUSE', '', :seen)"
                    ),
                    values,
                )
                conn.execute(
                    text(
                        "INSERT INTO registrations (user_id, server, contact_id, uri, status, "
                        "user_agent, source, rtt_usec, expires_at, changed_at) VALUES (:uid, "
                        "'pbx1', :cid, :uri, 'Reachable', '', '', 1, :seen, :seen)"
                    ),
                    values,
                )
            return
        rows = {
            ep: (
                ((f"{ep};@abc", f"sip:{ep}@10.0.0.1", "Reachable", "", "", 1, _SEEN, _SEEN),),
                ("online", "NOT_INUSE", "", _SEEN),
            )
            for ep in extensions
        }
        write_endpoint_rows(conn, "pbx1", rows, now)


def _contact_users(engine: Engine) -> list[int]:
    """The users with a contact on "pbx1", from the contacts' table or summary column."""
    query = (
        "SELECT user_id FROM registrations ORDER BY 1"
        if _has_contact_table(engine)
        else "SELECT user_id FROM registration_summary WHERE contacts IS NOT NULL ORDER BY 1"
    )
    with engine.connect() as conn:
        return list(conn.execute(text(query)).scalars())


def _contact_foreign_keys(engine: Engine) -> list[Any]:
    from sqlalchemy import inspect

    with engine.connect() as conn:
        return inspect(conn).get_foreign_keys("registrations")


def test_0011_keeps_contacts_and_deletes_them_with_their_user(db_url: str, backend: str) -> None:
    """A store upgraded from 0010 to 0013 with registration state keeps every contact that
    has its summary (one whose summary was deleted in plain SQL goes), checks no foreign
    key on them, and still deletes a user's contacts with the user; downgraded to 0010 it
    has the foreign key back and the contacts kept."""
    engine = open_engine(db_url)
    try:
        upgrade(engine, "0010")
        _seed_registered(engine, 4)
        with engine.begin() as conn:  # a contact whose summary was deleted in plain SQL
            conn.execute(text("DELETE FROM registration_summary WHERE user_id = 4"))
        assert _contact_users(engine) == [1, 2, 3, 4]
        assert len(_contact_foreign_keys(engine)) == 1
        assert upgrade(engine, "0013") == ("0010", "0013")
        assert _contact_users(engine) == [1, 2, 3]
        assert _contact_foreign_keys(engine) == []
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE id = 2"))
        assert _contact_users(engine) == [1, 3]
        downgrade(engine, "0010")
        assert len(_contact_foreign_keys(engine)) == 1
        assert _contact_users(engine) == [1, 3]
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE id = 3"))
        assert _contact_users(engine) == [1]
        upgrade(engine)
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_0014_moves_contacts_into_their_summary_and_back(db_url: str, backend: str) -> None:
    """A store upgraded from 0013 with registration state holds each user's contacts in its
    summary row, as ``status`` reads them (fields, times), and no ``registrations`` table
    or contact trigger; a user deleted takes its contacts with it; downgraded to 0013 it
    has the table, the contacts and their triggers back."""
    from provisioner.store.registrations import status_rows

    engine = open_engine(db_url)
    try:
        upgrade(engine, "0013")
        _seed_registered(engine, 3)
        assert upgrade(engine) == ("0013", head_revision())
        assert _differences(engine) == []
        assert not _has_contact_table(engine)
        with engine.connect() as conn:
            (row,) = status_rows(conn, ["user1"], now=datetime(2026, 5, 1, 12))
        (contact,) = row["contacts"]
        seen = datetime.fromisoformat(_SEEN)
        assert contact == {
            "user_id": 2,
            "server": "pbx1",
            "contact_id": "100001;@abc",
            "uri": "sip:100001@10.0.0.1",
            "status": "Reachable",
            "user_agent": "",
            "source": "",
            "rtt_usec": 1,
            "expires_at": seen,
            "changed_at": seen,
            "expired": False,
            "stale": False,
        }
        assert row["state"] == "online"
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE id = 2"))
        assert _contact_users(engine) == [1, 3]
        downgrade(engine, "0013")
        assert _contact_users(engine) == [1, 3]
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE id = 3"))
        assert _contact_users(engine) == [1]
        upgrade(engine)
        assert _contact_users(engine) == [1]
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_0014_downgraded_again_after_failing_past_its_insert_keeps_each_contact_once(
    db_url: str, backend: str
) -> None:
    """A downgrade from 0014 run again after one that failed past its insert of the
    contacts (on MariaDB/MySQL the DDL that follows commits it: the table and its rows
    stay, the summaries' column too) ends at 0013 with each contact once, as the
    summaries' column holds it (not as the failed run left it), not with a duplicate
    key."""
    import importlib

    engine = open_engine(db_url)
    try:
        upgrade(engine, "0013")
        _seed_registered(engine, 3)
        upgrade(engine)
        step = importlib.import_module(
            "provisioner.store.migrations.versions.0014_contacts_in_their_summary_row"
        )
        with engine.begin() as conn:  # what the failed run left
            table = step._registrations(sa.MetaData())
            table.create(conn)
            rows = [
                {"user_id": uid, "server": "pbx1", "contact_id": f"{ep};@abc", "uri": "u",
                 "status": "Reachable", "user_agent": "", "source": "", "rtt_usec": 1,
                 "expires_at": None, "changed_at": datetime(2026, 1, 1)}
                for uid, ep in ((1, "100000"), (2, "100001"), (3, "100002"))
            ]  # fmt: skip
            conn.execute(table.insert(), rows)
        downgrade(engine, "0013")
        assert _contact_users(engine) == [1, 2, 3]
        with engine.connect() as conn:
            uris = conn.execute(text("SELECT uri FROM registrations ORDER BY user_id")).scalars()
            assert list(uris) == [f"sip:{ep}@10.0.0.1" for ep in ("100000", "100001", "100002")]
        upgrade(engine)
        assert _contact_users(engine) == [1, 2, 3]
        assert _differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("source", ["migrations", "file"])
def test_a_purged_newest_users_id_is_never_given_to_another_user(
    db_url: str, backend: str, source: str
) -> None:
    """The id of the newest user, purged, is never given to the next user added, on every
    backend (SQLite's ``users`` is AUTOINCREMENT from 0012): memory keyed by user id
    never takes the new user for the purged one.  A store upgraded from 0011 keeps its
    users, attributes, summaries and contacts, its change triggers and its cascades."""
    from bench.common import make_users, user_rows
    from provisioner.store.schema import user_attributes, users

    if source == "file":
        _apply_file(db_url, backend)
    engine = open_engine(db_url)
    try:
        if source == "migrations":
            upgrade(engine, "0011")
        _seed_registered(engine, 3, ids=False)
        with engine.begin() as conn:
            conn.execute(user_attributes.insert(), {"user_id": 3, "key": "k", "value": "v"})
        if source == "migrations":
            assert upgrade(engine) == ("0011", head_revision())
            assert _differences(engine) == []
        assert _contact_users(engine) == [1, 2, 3]
        with engine.begin() as conn:
            mark = int(conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM changes")).scalar_one())
            conn.execute(text("DELETE FROM users WHERE id = 3"))
            row = user_rows(make_users(4)[3:], 1, datetime(2026, 1, 2))[0]
            del row["id"]
            added = conn.execute(users.insert(), row).inserted_primary_key
        assert added is not None
        assert added[0] == 4
        assert _contact_users(engine) == [1, 2]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM user_attributes")).scalar_one() == 0
            seen = [(c.entity_id, c.op) for c in read_changes(conn, mark)]
        assert {(3, "D"), (4, "I")} <= set(seen)
    finally:
        engine.dispose()
