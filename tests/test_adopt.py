"""Lost ownership records: conflicts logged as a summary, once, and ``provisioner adopt``.

Real stores and realtime tables (SQLite, PostgreSQL and MariaDB where the backend
matters), structlog's captured events, the CLI run in-process.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from provisioner.accounts import Accounts, Policy
from provisioner.applier import CONFLICT_DETAIL, Applier
from provisioner.pjsip import RenderSettings
from provisioner.targets.asterisk_schema import ps_endpoints
from provisioner.targets.realtime import RealtimeTarget

from .faultkit import cheap_hasher, seed_store

AGENTS = 30
#: Every user with an endpoint: root (an admin, extension 1000) and the agents.
USERS = AGENTS + 1


@contextmanager
def _site(url: str, count: int = AGENTS) -> Iterator[tuple[Engine, Accounts]]:
    """A seeded store (root and agents u0.. at extensions 1000, 1001, ...) whose database
    also holds the realtime tables."""
    cheap_hasher()
    engine = seed_store(url, count)
    try:
        yield engine, Accounts(engine, Policy(password_policy=False))
    finally:
        engine.dispose()


def _applier(engine: Engine) -> Applier:
    """A new applier over a new realtime target (a fresh process)."""
    return Applier(engine, RealtimeTarget(engine), RenderSettings())


def _lose_records(engine: Engine) -> None:
    """An operator (or a restore of the Asterisk tables only) empties the ownership table."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM provisioner_objects"))


def _conflict_events(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] in ("sync.conflict", "sync.conflicts")]


def test_many_conflicts_are_one_summary_and_are_not_repeated(tmp_path: Path) -> None:
    """Every user a conflict (records lost) logs one summary with the count, the first
    endpoint ids and what to do, per-user detail for a few, and nothing at warning level
    again while the set stays the same; a new conflict is logged alone, and the
    applies' count stays exact."""
    with _site(f"sqlite:///{tmp_path / 'store.db'}") as (engine, _accounts):
        _applier(engine).full()
        _lose_records(engine)
        daemon = _applier(engine)
        with capture_logs() as logs:
            first = daemon.full()
        assert len(first.change.clashes) == USERS  # the CLI still lists every one
        events = _conflict_events(logs)
        [summary] = [e for e in events if e["event"] == "sync.conflicts"]
        assert summary["log_level"] == "warning"
        assert summary["count"] == USERS
        assert summary["new"] == USERS
        assert summary["endpoints"] == ["1000", "1001", "1002", "1003", "1004"]
        assert "provisioner adopt" in summary["hint"]
        detail = [e for e in events if e["event"] == "sync.conflict"]
        assert len(detail) == CONFLICT_DETAIL < USERS
        assert daemon.conflicted == USERS

        with capture_logs() as logs:
            again = daemon.full()
        assert len(again.change.clashes) == USERS
        assert [e for e in logs if e["log_level"] == "warning"] == []
        [applied] = [e for e in logs if e["event"] == "sync.applied"]
        assert applied["conflicts"] == USERS
        assert daemon.conflicted == USERS

        with engine.begin() as conn:
            conn.execute(ps_endpoints.insert().values(id="1031", context="by-hand"))
        _accounts.add_user(
            {
                "username": "late",
                "full_name": "Late",
                "email": "late@example.com",
                "profile": "agents",
            }
        )
        with capture_logs() as logs:
            daemon.full()
        events = _conflict_events(logs)
        assert [(e["event"], e["username"]) for e in events] == [("sync.conflict", "late")]
        assert daemon.conflicted == USERS + 1


def test_a_conflict_cleared_is_said_and_counted(tmp_path: Path) -> None:
    """A conflict that goes (the foreign row deleted) is logged once at info level and no
    longer counted, in the one-user path as in a full apply."""
    with _site(f"sqlite:///{tmp_path / 'store.db'}", count=3) as (engine, accounts):
        RealtimeTarget(engine).create_tables()
        with engine.begin() as conn:
            conn.execute(ps_endpoints.insert().values(id="1002", context="by-hand"))
            conn.execute(ps_endpoints.insert().values(id="1003", context="by-hand"))
        daemon = _applier(engine)
        with capture_logs() as logs:
            daemon.full()
        assert [e["username"] for e in _conflict_events(logs)] == ["u1", "u2"]
        assert daemon.conflicted == 2
        with engine.begin() as conn:
            conn.execute(ps_endpoints.delete().where(ps_endpoints.c.id == "1002"))
        with capture_logs() as logs:
            daemon.users_changed([accounts.get_user("u1").id])
        assert _conflict_events(logs) == []
        [cleared] = [e for e in logs if e["event"] == "sync.conflicts_cleared"]
        assert (cleared["log_level"], cleared["count"]) == ("info", 1)
        assert daemon.conflicted == 1
        with capture_logs() as logs:
            daemon.full()
        assert [e for e in logs if e["log_level"] == "warning"] == []
        assert daemon.conflicted == 1
