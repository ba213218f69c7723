"""Never empty the PBX: a store that suddenly reads as (nearly) empty is refused everywhere.

``provisioner sync --once``, ``render`` and the daemon (full and incremental paths) refuse
a change removing more than ``daemon.max_removal_fraction`` of the provisioned users; the
target stays byte-for-byte (row-for-row) as it was until an operator says
``--allow-mass-removal``.  A store that cannot be reached at start leaves the file alone
while the daemon retries.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from provisioner.errors import MassRemovalRefused, StoreUnavailable
from provisioner.store.engine import open_engine
from provisioner.targets.asterisk_schema import OWNED_KINDS

from .dbs import PG_ADMIN, temp_database
from .faultkit import (
    PROVISIONER,
    Daemon,
    cli,
    cli_process,
    delete_users_sql,
    endpoints,
    env,
    seed_store,
    store_url,
    until,
    write_config,
)

USERS = 20  # agents; with root the target holds 21 endpoints
TOTAL = USERS + 1


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _rows(url: str) -> dict[str, int]:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return {
                kind: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for kind, table in OWNED_KINDS.items()
            }
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["truncate", "most", "wrong_url"])
def test_sync_once_refuses_a_store_that_lost_its_users(tmp_path: Path, how: str) -> None:
    """An emptied, 80%-deleted or wrong store is refused (exit 8, counts and flag named),
    the file is unchanged; --allow-mass-removal then applies it."""
    engine = seed_store(store_url(tmp_path), USERS)
    config = write_config(tmp_path)
    cli(config, "sync", "--once")
    conf = tmp_path / "pjsip_users.conf"
    before = conf.read_bytes()
    assert len(endpoints(conf)) == TOTAL
    remaining = 0
    if how == "truncate":
        delete_users_sql(engine)
    elif how == "most":
        remaining = 4  # 17 of 21 gone: 81%
        delete_users_sql(engine, keep=remaining)
    else:
        empty = tmp_path / "other"
        empty.mkdir()
        seed_store(store_url(empty), 0).dispose()
        delete_users_sql(open_engine(store_url(empty)))
        config = write_config(tmp_path, store_url=store_url(empty), name="wrong.toml")
    engine.dispose()

    for command in (["sync", "--once"], ["render"], ["render", "--dry-run"]):
        ran = cli(config, *command, check=False)
        assert ran.code == MassRemovalRefused.exit_code, (command, ran)
        assert f"refusing to remove {TOTAL - remaining} of {TOTAL}" in ran.err
        assert "--allow-mass-removal" in ran.err
        assert "Traceback" not in ran.err
        assert conf.read_bytes() == before
    assert _leftovers(tmp_path) == []

    ran = cli(config, "sync", "--once", "--allow-mass-removal")
    assert f"removed {TOTAL - remaining}" in ran.out
    assert len(endpoints(conf)) == remaining
    assert "would be removed 0" in cli(config, "render", "--dry-run").out


def test_realtime_rows_survive_a_truncated_store(tmp_path: Path) -> None:
    """On the realtime target an emptied store is refused too and no row changes."""
    url = store_url(tmp_path)
    engine = seed_store(url, USERS)
    config = write_config(tmp_path, kind="realtime")
    cli(config, "sync", "--once")
    assert _rows(url) == {"endpoint": TOTAL, "auth": TOTAL, "aor": TOTAL}
    delete_users_sql(engine)
    engine.dispose()
    ran = cli(config, "sync", "--once", check=False)
    assert ran.code == MassRemovalRefused.exit_code
    assert f"refusing to remove {TOTAL} of {TOTAL}" in ran.err
    assert _rows(url) == {"endpoint": TOTAL, "auth": TOTAL, "aor": TOTAL}
    cli(config, "sync", "--once", "--allow-mass-removal")
    assert _rows(url) == {"endpoint": 0, "auth": 0, "aor": 0}


def test_run_burst_exits_with_the_refusal_when_its_apply_is_refused(tmp_path: Path) -> None:
    """``run --burst`` on a store that lost its users refuses the apply, leaves the file as
    it was and exits 8 with the refusal on stderr, as ``sync --once`` does: a one-shot run
    that did nothing must not look like one that applied everything."""
    engine = seed_store(store_url(tmp_path), USERS)
    config = write_config(tmp_path)
    cli(config, "sync", "--once")
    conf = tmp_path / "pjsip_users.conf"
    before = conf.read_bytes()
    delete_users_sql(engine)
    engine.dispose()
    ran = cli_process(config, "run", "--burst", check=False)
    assert ran.code == MassRemovalRefused.exit_code, ran
    assert f"refusing to remove {TOTAL} of {TOTAL}" in ran.err
    assert "Traceback" not in ran.err
    assert conf.read_bytes() == before


def test_run_burst_on_an_unreachable_store_exits_7_instead_of_retrying_for_ever(
    tmp_path: Path,
) -> None:
    """``run --burst`` with a PostgreSQL store that does not exist exits 7 (store
    unavailable) at its first failed apply; the daemon would retry, a one-shot run ends."""
    url = PG_ADMIN.rstrip("/") + "/prov_test_no_such_database"
    config = write_config(tmp_path, store_url=url)
    started = time.monotonic()
    child = subprocess.Popen(
        [PROVISIONER, "--config", str(config), "run", "--burst"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        out, err = child.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise AssertionError("run --burst still retrying after 15 s") from None
    assert child.returncode == StoreUnavailable.exit_code, (out, err)
    assert "store unavailable" in err or "database error" in err, err
    assert "Traceback" not in err
    assert time.monotonic() - started < 15


def _refused(daemon: Daemon) -> bool:
    return any("refusing to remove" in e.get("error", "") for e in daemon.logged("sync.failed"))


def _sync_failed_in_health(daemon: Daemon) -> bool:
    health = daemon.health()
    return health is not None and health["last_sync_ok"] is False


def test_daemon_refuses_truncation_keeps_running_and_reports(tmp_path: Path) -> None:
    """The daemon refuses an emptied store (change feed burst), keeps running, logs
    sync.failed with the reason, its health says so and 'provisioner check' fails;
    after an operator's forced sync it follows edits again."""
    engine = seed_store(store_url(tmp_path), USERS)
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: len(endpoints(conf)) == TOTAL, 10, "first sync")
        before = conf.read_bytes()
        delete_users_sql(engine)
        until(lambda: _refused(daemon), 10, "sync.failed logged")
        # The health record is written shortly after the log line (at most one write per
        # HEALTH_DELAY), not with it.
        until(lambda: _sync_failed_in_health(daemon), 10, "health records the failure")
        health = daemon.health()
        assert health is not None
        assert health["last_sync_ok"] is False
        assert f"refusing to remove {TOTAL} of {TOTAL}" in health["last_error"]
        check = cli(config, "check", check=False)
        assert check.code == 1
        assert "FAIL  daemon: last sync failed: refusing to remove" in check.out
        assert daemon.alive
        assert conf.read_bytes() == before

        # The operator confirms; the daemon then follows new edits as usual.
        cli(config, "sync", "--once", "--allow-mass-removal")
        assert endpoints(conf) == []
        cli(
            config,
            "user",
            "add",
            "newboss",
            "--role",
            "admin",
            "--full-name",
            "N B",
            "--email",
            "n@e.com",
        )
        until(lambda: len(endpoints(conf)) == 1, 10, "new user applied")
        until(lambda: bool((daemon.health() or {}).get("last_sync_ok")), 5, "healthy again")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        engine.dispose()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_daemon_guards_a_burst_of_cli_deletes(tmp_path: Path) -> None:
    """Deleting most users in one CLI command reaches the daemon through the change feed
    (its incremental path) and is refused there as well; a small delete still applies."""
    engine = seed_store(store_url(tmp_path), USERS)
    engine.dispose()
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: len(endpoints(conf)) == TOTAL, 10, "first sync")
        cli(config, "user", "delete", "u0")
        until(lambda: len(endpoints(conf)) == TOTAL - 1, 10, "one delete applied")
        before = conf.read_bytes()
        cli(config, "user", "delete", *[f"u{i}" for i in range(1, 16)])
        until(lambda: _refused(daemon), 10, "burst refused")
        assert conf.read_bytes() == before
        assert daemon.alive
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_daemon_started_on_a_lost_store_never_writes_a_partial_file(tmp_path: Path) -> None:
    """A daemon whose first reconcile is refused does not write a file holding only the
    users edited afterwards (that would empty the PBX through the incremental path)."""
    engine = seed_store(store_url(tmp_path), USERS)
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    first = Daemon(config, tmp_path / "daemon.log").start()  # its cursor: all applied
    until(lambda: len(endpoints(conf)) == TOTAL, 10, "first sync")
    assert first.stop() == 0
    before = conf.read_bytes()
    delete_users_sql(engine, keep=3)  # root, u0, u1 remain
    engine.dispose()
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: _refused(daemon), 10, "first reconcile refused")
        failures = len(daemon.logged("sync.failed"))
        cli(config, "user", "edit", "u0", "--nat", "yes")
        until(lambda: len(daemon.logged("sync.failed")) > failures, 10, "edit refused too")
        assert conf.read_bytes() == before
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_store_unreachable_at_start_daemon_retries_and_file_untouched(tmp_path: Path) -> None:
    """A PostgreSQL store that is missing at start: the daemon logs and retries, never
    touches the file, and converges (no change) once the database is back."""
    with temp_database("postgresql", tmp_path) as url:
        seed_store(url, 5).dispose()
        config = write_config(tmp_path, store_url=url)
        cli(config, "sync", "--once")
        conf = tmp_path / "pjsip_users.conf"
        before = conf.read_bytes()
        stat = conf.stat()
        name = url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
                conn.execute(text(f'ALTER DATABASE "{name}" RENAME TO "{name}_away"'))
            daemon = Daemon(config, tmp_path / "daemon.log").start(wait_ready=False)
            try:
                until(lambda: daemon.failed_tries() >= 2, 15, "retries")
                assert daemon.alive
                assert not daemon.ready()
                assert "store unavailable" in daemon.logged("sync.failed")[0]["error"]
                assert conf.read_bytes() == before
                with admin.connect() as conn:
                    conn.execute(text(f'ALTER DATABASE "{name}_away" RENAME TO "{name}"'))
                until(daemon.ready, 40, "ready after the store came back")
                assert conf.read_bytes() == before
                assert conf.stat().st_mtime_ns == stat.st_mtime_ns
                assert daemon.stop() == 0
            finally:
                daemon.kill()
                with admin.connect() as conn:  # so temp_database can drop it either way
                    away = conn.execute(
                        text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                        {"n": f"{name}_away"},
                    ).scalar_one()
                    if away:
                        conn.execute(text(f'ALTER DATABASE "{name}_away" RENAME TO "{name}"'))
        finally:
            admin.dispose()
