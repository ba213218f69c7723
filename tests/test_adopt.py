"""Lost ownership records: conflicts logged as a summary, once, and ``provisioner adopt``.

Real stores and realtime tables (SQLite, PostgreSQL and MariaDB where the backend
matters), structlog's captured events, the CLI run in-process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select, text
from structlog.testing import capture_logs

from provisioner.accounts import Accounts, Policy
from provisioner.applier import USER_DETAIL, Applier
from provisioner.pjsip import RenderSettings, UserObjects
from provisioner.targets import realtime
from provisioner.targets.asterisk_schema import provisioner_objects, ps_aors, ps_auths, ps_endpoints
from provisioner.targets.realtime import RealtimeTarget

from .dbs import temp_database
from .faultkit import cheap_hasher, cli, seed_store, write_config

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
        assert len(detail) == USER_DETAIL < USERS
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


# -- provisioner adopt ------------------------------------------------------------------


def _rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three PJSIP tables and of the ownership table, sorted."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in (ps_endpoints, ps_auths, ps_aors, provisioner_objects):
            out[table.name] = sorted((tuple(r) for r in conn.execute(select(table))), key=repr)
    return out


def _records(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(select(provisioner_objects.c.kind, provisioner_objects.c.id))
        return {(str(kind), str(oid)) for kind, oid in rows}


def _three(endpoint_id: str) -> set[tuple[str, str]]:
    return {("endpoint", endpoint_id), ("auth", f"{endpoint_id}-auth"), ("aor", endpoint_id)}


def _lost_site(engine: Engine, accounts: Accounts) -> list[UserObjects]:
    """Users 1000-1003 applied, then: trunk rows made by hand, the ownership records lost,
    1002's endpoint context edited by hand, u2 (1003) deleted from the store while its rows
    stay (no record to remove them by).  The current users' objects."""
    _applier(engine).full()
    with engine.begin() as conn:
        conn.execute(ps_endpoints.insert().values(id="trunk-out", context="trunk", aors="trunk"))
        conn.execute(ps_aors.insert().values(id="trunk", max_contacts=3))
        conn.execute(ps_auths.insert().values(id="trunk-auth", username="trunk"))
    _lose_records(engine)
    with engine.begin() as conn:
        hand = ps_endpoints.update().where(ps_endpoints.c.id == "1002")
        conn.execute(hand.values(context="by-hand"))
    accounts.delete(["u2"])
    objects, kept, skipped = _applier(engine).desired()
    assert (kept, skipped) == ({}, {})
    return sorted(objects.values(), key=lambda o: o.endpoint_id)


@pytest.mark.parametrize("read", ["by-id", "whole-tables"])
def test_adopt_records_exactly_provisioners_rows(
    db_url: str, read: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the ownership records are lost, adopt records the rows that are exactly what
    provisioner writes for a current user (a dry run only lists them), leaves a row that
    differs in one column foreign naming that column, and never records a trunk's rows or
    those of a user no longer in the store; the next verifying apply then changes nothing
    and reports only the user whose row differs.  The same whether the rows are read by
    id (a few users) or as whole tables (many)."""
    if read == "whole-tables":
        monkeypatch.setattr(realtime, "CHUNK", 1)
    with _site(db_url, count=3) as (engine, accounts):
        objects = _lost_site(engine, accounts)
        target = RealtimeTarget(engine)
        before = _rows(engine)

        dry = target.adopt(objects, dry_run=True)
        assert [a.endpoint_id for a in dry.adopted] == ["1000", "1001"]
        assert dry.adopted[1].username == "u0"
        assert dry.adopted[1].rows == (
            ("ps_endpoints", "1001"),
            ("ps_auths", "1001-auth"),
            ("ps_aors", "1001"),
        )
        [refused] = dry.left
        assert (refused.endpoint_id, refused.username) == ("1002", "u1")
        [reason] = refused.reasons
        assert reason.startswith("ps_endpoints 1002: context differs: by-hand here,")
        assert _rows(engine) == before

        done = target.adopt(objects)
        assert (done.adopted, done.left) == (dry.adopted, dry.left)
        assert _records(engine) == _three("1000") | _three("1001")
        after = _rows(engine)
        for table in ("ps_endpoints", "ps_auths", "ps_aors"):
            assert after[table] == before[table]

        with capture_logs() as logs:
            applied = _applier(engine).full()
        assert applied.change.conflicts == ("1002",)
        assert (applied.change.unchanged, applied.change.wrote) == (2, False)
        assert [e["username"] for e in _conflict_events(logs)] == ["u1"]
        again = target.adopt(objects)
        assert (again.adopted, again.left) == ((), dry.left)


def test_adopt_makes_a_dropped_ownership_table_again(tmp_path: Path) -> None:
    """With the ownership table dropped, a dry run lists the users it would adopt (making
    nothing), and adopt makes the table and records their rows, with their digests: the
    next plain apply reads no row."""
    with _site(f"sqlite:///{tmp_path / 'store.db'}", count=2) as (engine, _accounts):
        _applier(engine).full()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE provisioner_objects"))
        objects, _kept, _skipped = _applier(engine).desired()
        target = RealtimeTarget(engine)
        dry = target.adopt(list(objects.values()), dry_run=True)
        assert [a.endpoint_id for a in dry.adopted] == ["1000", "1001", "1002"]
        assert not inspect(engine).has_table("provisioner_objects")
        target.adopt(list(objects.values()))
        assert _records(engine) == _three("1000") | _three("1001") | _three("1002")
        applied = Applier(engine, target, RenderSettings()).full(verify=False)
        assert (applied.change.unchanged, applied.change.conflicts) == (3, ())


def test_sync_once_counts_many_conflicts_and_names_adopt(tmp_path: Path) -> None:
    """With the ownership records lost, ``sync --once`` prints every conflicting user and
    one line counting them that names ``provisioner adopt --dry-run``."""
    config = write_config(tmp_path, kind="realtime")
    with _site(f"sqlite:///{tmp_path / 'store.db'}") as (engine, _accounts):
        _applier(engine).full()
        _lose_records(engine)
        ran = cli(config, "sync", "--once")
    assert len([line for line in ran.err.splitlines() if line.startswith("conflict: ")]) == USERS
    [summary] = [line for line in ran.err.splitlines() if line.startswith(f"{USERS} users ")]
    assert summary.startswith(f"{USERS} users conflict with rows provisioner has no record of")
    assert "`provisioner adopt --dry-run`" in summary


def test_adopt_command(tmp_path: Path) -> None:
    """`provisioner adopt --dry-run` lists what it would adopt and what stays foreign and
    why, writing nothing; `provisioner adopt` records them; with a config-file target the
    command is refused on target.kind (exit 2)."""
    config = write_config(tmp_path, kind="realtime")
    with _site(f"sqlite:///{tmp_path / 'store.db'}", count=3) as (engine, accounts):
        _lost_site(engine, accounts)
        dry = cli(config, "adopt", "--dry-run")
        lines = dry.out.splitlines()
        assert (
            lines[0]
            == "would adopt 1000 (root): ps_endpoints 1000, ps_auths 1000-auth, ps_aors 1000"
        )
        assert lines[2].startswith("left foreign 1002 (u1): ps_endpoints 1002: context differs")
        assert lines[-1] == "would adopt 2 users (6 rows); 1 user left foreign"
        assert _records(engine) == set()
        done = cli(config, "adopt")
        assert done.out.splitlines()[-1] == "adopted 2 users (6 rows); 1 user left foreign"
        assert _records(engine) == _three("1000") | _three("1001")
    refused = cli(write_config(tmp_path, name="config.toml"), "adopt", check=False)
    assert refused.code == 2
    assert "target.kind" in refused.err


def test_adopt_leaves_a_look_alike_id_foreign(tmp_path: Path) -> None:
    """On MariaDB, whose collation ignores trailing spaces, a row ``'1001 '`` holding what
    provisioner writes for AOR ``1001`` is not adopted: its id is not exactly the user's,
    and that user's other rows stay foreign with it."""
    with temp_database("mariadb", tmp_path) as url, _site(url, count=1) as (engine, _acc):
        _applier(engine).full()
        _lose_records(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE ps_aors SET id = '1001 ' WHERE id = '1001'"))
        objects, _kept, _skipped = _applier(engine).desired()
        found = RealtimeTarget(engine).adopt(list(objects.values()))
        assert [a.endpoint_id for a in found.adopted] == ["1000"]
        [left] = found.left
        assert left.reasons == ("ps_aors '1001 ': its id is not exactly '1001'",)
        assert _records(engine) == _three("1000")


def test_adopt_takes_the_one_row_whose_record_is_lost(tmp_path: Path) -> None:
    """A user whose endpoint and AOR are still recorded and whose auth record alone was
    lost gets that auth adopted (no digest: the next apply compares its rows)."""
    with _site(f"sqlite:///{tmp_path / 'store.db'}", count=1) as (engine, _acc):
        _applier(engine).full()
        with engine.begin() as conn:
            lost = provisioner_objects.delete().where(provisioner_objects.c.id == "1001-auth")
            conn.execute(lost)
        objects, _kept, _skipped = _applier(engine).desired()
        found = RealtimeTarget(engine).adopt(list(objects.values()))
        assert [(a.endpoint_id, a.rows) for a in found.adopted] == [
            ("1001", (("ps_auths", "1001-auth"),))
        ]
        assert _records(engine) == _three("1000") | _three("1001")
        assert _applier(engine).full(verify=False).change.unchanged == 2


def test_the_daemon_logs_a_lost_ownership_table_once(tmp_path: Path) -> None:
    """A daemon over realtime rows whose ownership records were lost logs the conflicts
    of its first reconcile as one summary and a few lines, then nothing more at warning
    level through later reconciles; its health record counts every conflicting user."""
    from .faultkit import until_async as _until
    from .test_daemon_e2e import _start_daemon, _stop, _write_config

    config = _write_config(tmp_path, None, kind="realtime")
    config.write_text(config.read_text().replace("[daemon]", "[daemon]\nreconcile_interval = 0.3"))
    with _site(f"sqlite:///{tmp_path / 'store.db'}") as (engine, _accounts):
        _applier(engine).full()
        _lose_records(engine)
    log = tmp_path / "daemon.log"
    health = tmp_path / "state" / "health.json"

    def reconciles() -> int:
        return sum(
            1
            for line in log.read_text().splitlines()
            if '"sync.applied"' in line and '"full": true' in line
        )

    async def scenario() -> None:
        daemon = await _start_daemon(config, log)
        try:
            await _until(lambda: reconciles() >= 4, 20)
            assert json.loads(health.read_text())["conflicts"] == USERS
        finally:
            assert await _stop(daemon) == 0

    asyncio.run(scenario())
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warned = [e["event"] for e in events if e.get("level") == "warning"]
    assert warned == ["sync.conflict"] * USER_DETAIL + ["sync.conflicts"]
    applied = [e for e in events if e["event"] == "sync.applied" and e["full"]]
    assert {e["conflicts"] for e in applied} == {USERS}


def test_adopt_names_a_default_or_a_secret_that_differs(tmp_path: Path) -> None:
    """On SQLite, an Asterisk default provisioner fills in (``dtmf_mode``) edited by hand
    leaves that user's rows foreign naming the column and both values; a digest edited by
    hand is named with its values redacted."""
    with _site(f"sqlite:///{tmp_path / 'store.db'}", count=2) as (engine, _acc):
        _applier(engine).full()
        _lose_records(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE ps_endpoints SET dtmf_mode = 'inband' WHERE id = '1001'"))
            conn.execute(text("UPDATE ps_auths SET password_digest = 'x' WHERE id = '1002-auth'"))
        objects, _kept, _skipped = _applier(engine).desired()
        found = RealtimeTarget(engine).adopt(list(objects.values()))
        assert [a.endpoint_id for a in found.adopted] == ["1000"]
        assert [(f.endpoint_id, f.reasons) for f in found.left] == [
            (
                "1001",
                (
                    "ps_endpoints 1001: dtmf_mode differs: "
                    "inband here, rfc4733 as provisioner writes it",
                ),
            ),
            (
                "1002",
                (
                    "ps_auths 1002-auth: password_digest differs: "
                    "[redacted] here, [redacted] as provisioner writes it",
                ),
            ),
        ]
        assert _records(engine) == _three("1000")
