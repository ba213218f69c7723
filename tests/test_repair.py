"""``provisioner db repair``: the store's lost triggers made again, and only those."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from structlog.testing import capture_logs

from provisioner.accounts import Accounts
from provisioner.checks import Check, run_checks
from provisioner.config import load_config
from provisioner.health import read_health
from provisioner.store.schema import changes

from .dbs import maria_account, run_statement
from .helpers import Cli, local_daemon, make_cli

#: Per backend: a DBA's statements that lose two change triggers, and how ``db repair``
#: names them.
_LOSSES = {
    "sqlite": (
        ["DROP TRIGGER trg_users_update", "DROP TRIGGER trg_users_delete"],
        ["trg_users_update (missing)", "trg_users_delete (missing)"],
    ),
    "postgresql": (
        [
            "ALTER TABLE users DISABLE TRIGGER trg_users_change",
            "DROP TRIGGER trg_users_truncate ON users",
        ],
        ["trg_users_change (disabled)", "trg_users_truncate (missing)"],
    ),
    "mariadb": (
        ["DROP TRIGGER trg_users_update", "DROP TRIGGER trg_users_delete"],
        ["trg_users_update (missing)", "trg_users_delete (missing)"],
    ),
}


def _sql(engine: Engine, statement: str) -> None:
    """A DBA's statement in a SQL shell."""
    with engine.begin() as conn:
        conn.execute(text(statement))


def _cli(db_url: str, tmp_path: Path) -> Cli:
    return make_cli(
        db_url,
        tmp_path,
        f'[target]\npath = "{tmp_path / "pjsip.conf"}"\n'
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n',
    )


def _store_check(db_url: str, tmp_path: Path) -> Check:
    """``provisioner check``'s store line for the store at ``db_url``."""
    config = load_config(
        env={},
        overrides={
            "store": {"url": db_url},
            "target": {"path": str(tmp_path / "pjsip.conf")},
            "daemon": {"state_dir": str(tmp_path / "state")},
        },
    )
    (line,) = [c for c in run_checks(config) if c[0] == "store"]
    return line


def _an_edit_is_noted(engine: Engine) -> bool:
    """Whether a plain SQL edit of a user is noted in ``changes``."""
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(changes)).scalar_one()
    _sql(engine, "UPDATE users SET full_name = 'Renamed' WHERE username = 'root'")
    with engine.connect() as conn:
        return bool(conn.execute(select(func.count()).select_from(changes)).scalar_one() > before)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_repair_makes_exactly_the_lost_triggers_again(
    accounts: Accounts, engine: Engine, db_url: str, backend: str, tmp_path: Path
) -> None:
    """Triggers dropped or disabled are named by ``db repair --dry-run`` (which changes
    nothing), made again by ``db repair`` (check then passes, edits are noted again), and
    a second repair has nothing to do."""
    statements, named = _LOSSES[backend]
    for statement in statements:
        _sql(engine, statement)
    assert not _store_check(db_url, tmp_path)[1]
    assert "provisioner db repair" in _store_check(db_url, tmp_path)[2]
    cli = _cli(db_url, tmp_path)

    dry = cli.ok("db", "repair", "--dry-run")
    assert [f"would re-create {n}" for n in named] == [
        line for line in dry.splitlines() if line.startswith("would")
    ]
    assert not _store_check(db_url, tmp_path)[1]

    done = cli.ok("db", "repair")
    assert done.splitlines() == [f"re-created {n}" for n in named]
    line = _store_check(db_url, tmp_path)
    assert line[1], line
    assert _an_edit_is_noted(engine)
    assert cli.ok("db", "repair") == "no trigger lost: nothing to do\n"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_repair_makes_a_dropped_trigger_function_again_running_with_its_owners_rights(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL the change function dropped with its triggers is made again as the
    newest migration left it (SECURITY DEFINER), and its three triggers fire in every
    session_replication_role again."""
    _sql(engine, "DROP FUNCTION provisioner_note_change() CASCADE")
    out = _cli(db_url, tmp_path).ok("db", "repair")
    assert out.count("re-created") == 3
    with engine.connect() as conn:
        definer = conn.execute(
            text("SELECT prosecdef FROM pg_proc WHERE proname = 'provisioner_note_change'")
        ).scalar_one()
        modes = conn.execute(
            text("SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgname LIKE 'trg_%_change'")
        ).scalars()
        assert set(modes) == {"A"}
    assert definer is True
    assert _store_check(db_url, tmp_path)[1]
    assert _an_edit_is_noted(engine)


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_repair_remakes_triggers_whose_definer_is_gone_on_mariadb(
    db_url: str, tmp_path: Path
) -> None:
    """On MariaDB, once the account that ran the migrations is dropped (every write to
    users refused), ``db repair`` run by another account makes every trigger again as
    that account: check passes and edits are written and noted again."""
    from provisioner.store.engine import open_engine
    from provisioner.store.migrate import upgrade

    with maria_account(db_url) as (account, as_account):
        migrator = open_engine(as_account)
        upgrade(migrator)
        migrator.dispose()
        run_statement(db_url, f"DROP USER '{account}'@'%'")
        assert not _store_check(db_url, tmp_path)[1]
        out = _cli(db_url, tmp_path).ok("db", "repair")
    assert f"(definer {account}@% gone)" in out
    assert _store_check(db_url, tmp_path)[1]
    root = open_engine(db_url)
    try:
        _sql(
            root,
            "INSERT INTO profiles (name, description, created_at, updated_at) "
            "VALUES ('p', 'P', '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
        )
        with root.connect() as conn:
            noted = conn.execute(select(func.count()).select_from(changes)).scalar_one()
        assert noted > 0
    finally:
        root.dispose()


_Logs = list[MutableMapping[str, Any]]


def test_the_daemon_tells_lost_triggers_once_per_change_and_in_its_health(
    tmp_path: Path,
) -> None:
    """A full reconcile that finds a trigger lost logs ``store.triggers_missing`` (once
    while the set stays the same) naming it and ``provisioner db repair``, and puts it in
    the health record check reads; once repaired, the next one logs it mended and clears
    the record."""
    daemon = local_daemon(tmp_path)
    state = tmp_path / "state"

    async def run() -> tuple[_Logs, list[str], _Logs]:
        _sql(daemon.engine, "DROP TRIGGER trg_users_update")
        with capture_logs() as lost_logs:
            await daemon._run(daemon._full)
            await daemon._run(daemon._full)
        daemon.health.ready = True
        daemon._write_health()
        health = read_health(state)
        assert health is not None
        problems = health.problems(time.time(), max_age=60.0)
        _cli(str(daemon.engine.url), tmp_path).ok("db", "repair")
        with capture_logs() as mended_logs:
            await daemon._run(daemon._full)
        return lost_logs, problems, mended_logs

    try:
        lost_logs, problems, mended_logs = asyncio.run(run())
    finally:
        daemon.engine.dispose()
    told = [e for e in lost_logs if e["event"] == "store.triggers_missing"]
    assert len(told) == 1, told
    assert told[0]["log_level"] == "warning"
    assert told[0]["triggers"] == ["trg_users_update (missing)"]
    assert told[0]["repair"] == "provisioner db repair"
    assert [p for p in problems if "trg_users_update (missing)" in p and "db repair" in p]
    events = [e["event"] for e in mended_logs if e["event"].startswith("store.triggers")]
    assert events == ["store.triggers_restored"]
    assert daemon.health.triggers_lost == []


def _a_replica_write_is_noted(engine: Engine) -> bool:
    """Whether an edit of a user from a session with ``session_replication_role =
    replica`` (a logical replication subscriber's apply, pg_restore) is noted."""
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(changes)).scalar_one()
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("UPDATE users SET full_name = 'Replica' WHERE username = 'root'"))
    with engine.connect() as conn:
        return bool(conn.execute(select(func.count()).select_from(changes)).scalar_one() > before)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_change_trigger_set_back_to_plain_enable_is_lost_and_repaired(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL a change trigger set back to plain ``ENABLE`` (it skips replica
    sessions' writes) fails check, is named by the daemon's ``store.triggers_missing``,
    and ``db repair`` makes it ``ENABLE ALWAYS`` again."""
    named = "trg_users_change (not always: writes from replica sessions are missed)"
    assert _store_check(db_url, tmp_path)[1]
    _sql(engine, "ALTER TABLE users ENABLE TRIGGER ALL")
    line = _store_check(db_url, tmp_path)
    assert not line[1]
    assert named in line[2], line
    assert "provisioner db repair" in line[2], line
    assert not _a_replica_write_is_noted(engine)

    daemon = local_daemon(tmp_path, store={"url": db_url})
    try:
        with capture_logs() as logs:
            asyncio.run(daemon._check_triggers())
    finally:
        daemon.engine.dispose()
    told = [e for e in logs if e["event"] == "store.triggers_missing"]
    assert len(told) == 1, told
    assert named in told[0]["triggers"], told
    assert not [t for t in told[0]["triggers"] if "contacts" in t], told

    done = _cli(db_url, tmp_path).ok("db", "repair")
    assert f"re-created {named}" in done.splitlines(), done
    assert "contacts" not in done, done
    line = _store_check(db_url, tmp_path)
    assert line[1], line
    assert _a_replica_write_is_noted(engine)
