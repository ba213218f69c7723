"""Real throwaway databases for tests: each one created for a test and dropped after it.

PostgreSQL (127.0.0.1:5432, trust auth) and MariaDB (127.0.0.1:3306, root
without password) must be running; ``.ci/run`` starts them when they are not.
A missing server fails the test instead of skipping it, so CI can never pass
without having exercised every backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MY_ADMIN = os.environ.get("TEST_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/")

BACKENDS = ("sqlite", "postgresql", "mariadb")


@contextmanager
def temp_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of a brand-new empty database of ``backend``, dropped afterwards."""
    name = "prov_test_" + uuid.uuid4().hex[:12]
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    admin_url = PG_ADMIN if backend == "postgresql" else MY_ADMIN
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(
                    text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                )
        base = admin_url.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


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
