"""Real throwaway databases for tests: each one created for a test and dropped after it.

PostgreSQL (127.0.0.1:5432, trust auth) and MariaDB (127.0.0.1:3306, root
without password) must be running; ``.ci/run`` starts them when they are not.
A missing server fails the test instead of skipping it, so CI can never pass
without having exercised every backend.
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade

PG_ADMIN = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MY_ADMIN = os.environ.get("TEST_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/")

BACKENDS = ("sqlite", "postgresql", "mariadb")


@contextmanager
def temp_database(backend: str, tmp_path: Path, template: str | None = None) -> Iterator[str]:
    """A SQLAlchemy URL of a brand-new database of ``backend``, dropped afterwards: empty,
    or a copy of database ``template`` (not for SQLite)."""
    name = "prov_test_" + uuid.uuid4().hex[:12]
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    admin_url = PG_ADMIN if backend == "postgresql" else MY_ADMIN
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                copied = f' TEMPLATE "{template}"' if template else ""
                conn.execute(text(f'CREATE DATABASE "{name}"{copied}'))
            else:
                conn.execute(
                    text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                )
                if template:
                    _copy_mariadb_schema(conn, template, name)
        base = admin_url.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


#: backend -> (name, URL) of the database migrated once in this process that
#: :func:`migrated_database` copies.
_TEMPLATES: dict[str, tuple[str, str]] = {}


@contextmanager
def migrated_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of a brand-new database of ``backend`` already at the newest
    schema, dropped afterwards: a copy of one migrated once in this process (migrating
    each test's own took MariaDB 0.5-1.4 s, its DDL one statement at a time).  What the
    copy holds is checked against a migrated store by ``test_dbs``."""
    name, url = _TEMPLATES.get(backend) or _template(backend)
    if backend == "sqlite":
        copy = tmp_path / ("prov_test_" + uuid.uuid4().hex[:12] + ".db")
        template = Path(make_url(url).database or "")
        source, target = sqlite3.connect(template), sqlite3.connect(copy)
        with closing(source), closing(target):
            source.backup(target)
        copy.chmod(template.stat().st_mode & 0o777)
        yield f"sqlite:///{copy}"
        return
    with temp_database(backend, tmp_path, template=name) as copy_url:
        yield copy_url


def _template(backend: str) -> tuple[str, str]:
    """Make, migrate and remember ``backend``'s template; it is dropped at exit."""
    scratch = Path(tempfile.mkdtemp(prefix="prov-template-"))
    made = temp_database(backend, scratch)
    url = made.__enter__()
    atexit.register(made.__exit__, None, None, None)
    engine = open_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()  # PostgreSQL copies a template only while no one is connected
    _TEMPLATES[backend] = (make_url(url).database or "", url)
    return _TEMPLATES[backend]


def _copy_mariadb_schema(conn: Connection, template: str, name: str) -> None:
    """Make database ``name`` hold ``template``'s tables, rows and triggers (MariaDB has
    no ``CREATE DATABASE ... TEMPLATE``).  Tables are made as ``SHOW CREATE TABLE`` gives
    them, foreign keys included (``CREATE TABLE ... LIKE`` drops those), with the checks
    off so their order does not matter; triggers in their order of action, each under
    the SQL mode it was made with."""
    conn.execute(text(f"USE `{name}`"))
    conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
    tables = conn.execute(
        text(
            "SELECT TABLE_NAME FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = :db AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME"
        ),
        {"db": template},
    ).scalars()
    for table in list(tables):
        ddl = conn.execute(text(f"SHOW CREATE TABLE `{template}`.`{table}`")).one()[1]
        conn.exec_driver_sql(ddl.replace("%", "%%"))
        conn.execute(text(f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{template}`.`{table}`"))
    conn.execute(text("SET FOREIGN_KEY_CHECKS = 1"))
    triggers = conn.execute(
        text(
            "SELECT TRIGGER_NAME, SQL_MODE FROM information_schema.TRIGGERS"
            " WHERE TRIGGER_SCHEMA = :db ORDER BY EVENT_OBJECT_TABLE, EVENT_MANIPULATION,"
            " ACTION_TIMING, ACTION_ORDER"
        ),
        {"db": template},
    ).all()
    for trigger, sql_mode in triggers:
        made = conn.execute(text(f"SHOW CREATE TRIGGER `{template}`.`{trigger}`")).one()
        conn.execute(text("SET SESSION sql_mode = :mode"), {"mode": sql_mode})
        conn.exec_driver_sql(made[2].replace("%", "%%"))


def run_statement(url: str, statement: str) -> None:
    """Run one statement, committed, on a connection of its own to ``url`` (as whatever
    account ``url`` names: root for the tests' own servers)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


@contextmanager
def maria_account(root_url: str, privileges: str = "ALL") -> Iterator[tuple[str, str]]:
    """A new MariaDB account (password ``pw``) granted ``privileges`` on the database of
    ``root_url`` (a root URL): its name and that URL logged in as it; the account is
    dropped afterwards if still there (accounts are the server's, not the database's)."""
    account = "prov_mig_" + uuid.uuid4().hex[:8]
    database = make_url(root_url).database
    run_statement(root_url, f"CREATE USER '{account}'@'%' IDENTIFIED BY 'pw'")
    try:
        run_statement(root_url, f"GRANT {privileges} ON `{database}`.* TO '{account}'@'%'")
        yield account, root_url.replace("root@", f"{account}:pw@")
    finally:
        run_statement(root_url, f"DROP USER IF EXISTS '{account}'@'%'")
