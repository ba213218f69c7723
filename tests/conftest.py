"""Shared fixtures: real databases on every backend, a store at the newest schema, a clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog
from sqlalchemy import Engine

from provisioner.accounts import Accounts, Policy
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade

from .dbs import BACKENDS, migrated_database, temp_database


class FakeClock:
    """An injected clock: tests move time instead of sleeping."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, 12, 0, 0)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test ends by restoring structlog's defaults: one that configured logging (a
    CLI command run in-process at level warning) must not filter out the events a later
    test captures."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own working directory (its ``tmp_path``): what a test writes
    relative to it stays its own.  A daemon built with the default ``daemon.state_dir``
    (``var``) writes its health record there, and with a shared working directory a
    ``check`` test run later (or at once, in another xdist worker) read another test's
    daemon and failed."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database on each backend in turn; already at the newest schema (a copy of
    one migrated once) where the test also asks for ``engine``, which would migrate it."""
    made = migrated_database if "engine" in request.fixturenames else temp_database
    with made(backend, tmp_path) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a store migrated to the newest schema."""
    eng = open_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy() -> Policy:
    # The security suite on, a small lock limit, a small range that tests can fill.
    return Policy(
        password_policy=True, max_failed_logins=3, lock_minutes=15, ext_first=100, ext_last=199
    )


@pytest.fixture
def accounts(engine: Engine, policy: Policy, clock: FakeClock) -> Accounts:
    """Accounts over a fresh store holding the first admin and a profile ``agents``."""
    acc = Accounts(engine, policy, clock)
    acc.add_profile("agents", "Contact-center agents")
    acc.add_user(
        {
            "username": "root",
            "role": "admin",
            "full_name": "First Admin",
            "email": "root@example.com",
        }
    )
    return acc
