"""A user another writer breaks keeps its last good endpoint, auth and AOR (issue 3).

Real SQLite stores (PostgreSQL once), a real config file and real realtime tables: the
daemon's one-edit path, a full reconcile with the applier's memory, and a full apply by a
process that has none (``sync --once``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from sqlalchemy import Engine, select, text, update
from structlog.testing import capture_logs

from provisioner.accounts import Accounts, Policy
from provisioner.applier import USER_DETAIL, Applier
from provisioner.asterisk_conf import parse
from provisioner.errors import MassRemovalRefused
from provisioner.model import UNDECODED_RULE, User
from provisioner.pjsip import RenderSettings, endpoint_order, render_user
from provisioner.store.engine import open_engine
from provisioner.store.schema import users
from provisioner.targets import Target
from provisioner.targets.asterisk_schema import ps_aors, ps_auths, ps_endpoints
from provisioner.targets.configfile import ConfigFileTarget
from provisioner.targets.realtime import RealtimeTarget
from provisioner.targets.sharded import ShardedConfigFileTarget

from .dbs import temp_database
from .faultkit import cheap_hasher, cli, delete_users_sql, sections, seed_store, write_config
from .helpers import insert_user_copy

DIGITS = "must be 1-20 digits"
#: Values another writer may leave in ``users.extension`` (SQL text), and the rule named.
BAD_EXTENSIONS = {
    "letters": ("'10a1'", DIGITS),
    "empty": ("''", DIGITS),
    "newline": ("'10' || char(10) || '01'", DIGITS),
    "not-utf8": ("CAST(X'3130E931' AS TEXT)", UNDECODED_RULE),
}
KINDS = ("config", "realtime")


@contextmanager
def _site(tmp_path: Path, kind: str, count: int = 4) -> Iterator[tuple[Engine, Accounts]]:
    """A seeded SQLite store (root and agents u0.. at extensions 1000, 1001, ...)."""
    cheap_hasher()
    engine = seed_store(f"sqlite:///{tmp_path / 'store.db'}", count)
    try:
        yield engine, Accounts(engine, Policy(password_policy=False))
    finally:
        engine.dispose()


def _target(tmp_path: Path, kind: str, engine: Engine) -> Target:
    """A new target object (no memory of earlier applies) on the site's file or tables."""
    if kind == "config":
        return ConfigFileTarget(tmp_path / "pjsip_users.conf")
    target = RealtimeTarget(engine)
    target.create_tables()
    return target


def _applier(tmp_path: Path, kind: str, engine: Engine) -> Applier:
    """A new applier (as a fresh process has) over a new target object."""
    return Applier(engine, _target(tmp_path, kind, engine), RenderSettings())


def _held(tmp_path: Path, kind: str, engine: Engine, endpoint_id: str) -> Any:
    """What the target holds for ``endpoint_id``: its endpoint, auth and AOR (None: nothing)."""
    if kind == "config":
        path = tmp_path / "pjsip_users.conf"
        mine = [s for s in sections(path) if s[0] in (endpoint_id, f"{endpoint_id}-auth")]
        return mine or None
    rows = []
    with engine.connect() as conn:
        for table, oid in (
            (ps_endpoints, endpoint_id),
            (ps_auths, f"{endpoint_id}-auth"),
            (ps_aors, endpoint_id),
        ):
            rows.append(conn.execute(select(table).where(table.c.id == oid)).first())
    return None if all(r is None for r in rows) else [tuple(r) if r else None for r in rows]


def _auth_username(tmp_path: Path, kind: str, engine: Engine, endpoint_id: str) -> str | None:
    held = _held(tmp_path, kind, engine, endpoint_id)
    if held is None:
        return None
    if kind == "config":
        auth = dict(next(o for n, o in held if n == f"{endpoint_id}-auth"))
        return str(auth["username"])
    with engine.connect() as conn:
        found = conn.execute(
            select(ps_auths.c.username).where(ps_auths.c.id == f"{endpoint_id}-auth")
        ).scalar()
    return None if found is None else str(found)


def _sql(engine: Engine, statement: str, **params: Any) -> None:
    """Another application writing the store directly (values the rules would refuse)."""
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def _break(engine: Engine, username: str, value: str) -> None:
    """Set ``username``'s extension to the SQL expression ``value``, as a bulk tool might."""
    _sql(engine, f"UPDATE users SET extension = {value} WHERE username = :u", u=username)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", BAD_EXTENSIONS, ids=str)
def test_a_user_given_a_bad_extension_keeps_its_last_good_objects(
    tmp_path: Path, kind: str, bad: str
) -> None:
    """A user whose extension another writer makes invalid is skipped naming the field and
    the rule, and its last good endpoint, auth and AOR stay exactly as they were, in a full
    apply by a process with no memory, in the daemon's one-edit path and in its full apply."""
    value, rule = BAD_EXTENSIONS[bad]
    with _site(tmp_path, kind) as (engine, accounts):
        daemon = _applier(tmp_path, kind, engine)
        daemon.full()
        u1 = accounts.get_user("u1")
        before = _held(tmp_path, kind, engine, u1.extension)
        assert before is not None
        _break(engine, "u1", value)

        fresh = _applier(tmp_path, kind, engine).full()
        assert [str(s) for s in fresh.skipped] == [f"u1: extension: {rule}"]
        assert (fresh.change.removed, fresh.change.unchanged) == ((), 5)
        assert _held(tmp_path, kind, engine, u1.extension) == before

        for applied in (daemon.users_changed([u1.id]), daemon.full()):
            assert [str(s) for s in applied.skipped] == [f"u1: extension: {rule}"]
            assert applied.change.removed == ()
            assert _held(tmp_path, kind, engine, u1.extension) == before


@pytest.mark.parametrize("kind", KINDS)
def test_sync_once_keeps_the_endpoint_of_a_user_given_a_bad_extension(
    tmp_path: Path, kind: str
) -> None:
    """`sync --once`, run after another writer broke a user's extension, exits 0, names the
    user, the field and the rule, and leaves that user's endpoint in place."""
    with _site(tmp_path, kind) as (engine, accounts):
        config = write_config(tmp_path, kind=kind)
        cli(config, "sync", "--once")
        ext = accounts.get_user("u1").extension
        before = _held(tmp_path, kind, engine, ext)
        _break(engine, "u1", "'10a1'")
        synced = cli(config, "sync", "--once")
        assert f"skipped u1: extension: {DIGITS}" in synced.err
        assert "removed 0, unchanged 5, skipped 1" in synced.out
        assert _held(tmp_path, kind, engine, ext) == before


def _old_extension_given_to_u2(
    tmp_path: Path, kind: str, engine: Engine, accounts: Accounts, broken_to: str
) -> tuple[Applier, User, User]:
    """An applier that applied everyone, then noted u1 broken (its extension set to the
    SQL ``broken_to``); u2 is then edited to u1's old extension, not applied yet. The
    applier and u1, u2 as they were before."""
    applier = _applier(tmp_path, kind, engine)
    applier.full()
    u1, u2 = accounts.get_user("u1"), accounts.get_user("u2")
    _break(engine, "u1", broken_to)
    applier.users_changed([u1.id])
    accounts.edit_user("u2", {"extension": u1.extension})
    return applier, u1, u2


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_user_given_the_old_extension_takes_it_in_the_one_edit_path(
    tmp_path: Path, kind: str
) -> None:
    """Once another live user validly holds a broken user's old extension, the endpoint is
    that user's (credentials and all), and it goes when that user moves on: the broken user
    holds it no more."""
    with _site(tmp_path, kind) as (engine, accounts):
        applier, u1, u2 = _old_extension_given_to_u2(tmp_path, kind, engine, accounts, "'10a1'")
        change = applier.users_changed([u2.id]).change
        assert (change.updated, change.removed) == ((u1.extension,), (u2.extension,))
        assert _auth_username(tmp_path, kind, engine, u1.extension) == "u2"

        accounts.edit_user("u2", {"extension": "1050"})
        change = applier.users_changed([u2.id]).change
        assert (change.added, change.removed) == (("1050",), (u1.extension,))
        assert _held(tmp_path, kind, engine, u1.extension) is None
        # u1, still broken, claims nothing again; a full apply agrees.
        assert applier.users_changed([u1.id]).change.empty
        assert applier.full().change.empty
        assert _applier(tmp_path, kind, engine).full().change.empty


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_user_given_the_old_extension_takes_it_in_a_full_apply(
    tmp_path: Path, kind: str
) -> None:
    """A full apply (with memory or without, or one edit of both users at once) gives a
    broken user's old extension to the live user that now validly holds it."""
    with _site(tmp_path, kind) as (engine, accounts):
        daemon, u1, u2 = _old_extension_given_to_u2(tmp_path, kind, engine, accounts, "''")
        fresh = _applier(tmp_path, kind, engine).full()
        assert (fresh.change.updated, fresh.change.removed) == ((u1.extension,), (u2.extension,))
        assert _auth_username(tmp_path, kind, engine, u1.extension) == "u2"
        assert daemon.full().change.empty  # its memory of u1 yields to the store


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_user_and_the_user_taking_its_extension_in_one_edit(
    tmp_path: Path, kind: str
) -> None:
    """One edit of a user whose extension breaks and of the user given its old extension
    gives the endpoint to the valid user."""
    with _site(tmp_path, kind) as (engine, accounts):
        applier = _applier(tmp_path, kind, engine)
        applier.full()
        u1, u2 = accounts.get_user("u1"), accounts.get_user("u2")
        _break(engine, "u1", "'x'")
        _sql(engine, "UPDATE users SET extension = :e WHERE username = 'u2'", e=u1.extension)
        change = applier.users_changed([u1.id, u2.id]).change
        assert (change.updated, change.removed) == ((u1.extension,), (u2.extension,))
        assert _auth_username(tmp_path, kind, engine, u1.extension) == "u2"
        accounts.edit_user("u2", {"extension": "1050"})
        assert applier.users_changed([u2.id]).change.removed == (u1.extension,)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["disable", "delete"])
def test_a_broken_user_disabled_or_deleted_loses_its_objects(
    tmp_path: Path, kind: str, how: str
) -> None:
    """A user kept as it was because its extension broke loses its endpoint, auth and AOR
    once it is disabled or deleted, in the one-edit path and in a fresh full apply."""
    column = "disabled = 1" if how == "disable" else "deleted_at = CURRENT_TIMESTAMP"
    with _site(tmp_path, kind) as (engine, accounts):
        daemon = _applier(tmp_path, kind, engine)
        daemon.full()
        u1, u2 = accounts.get_user("u1"), accounts.get_user("u2")
        for name in ("u1", "u2"):
            _break(engine, name, f"'bad-{name}'")
        daemon.users_changed([u1.id, u2.id])
        _sql(engine, f"UPDATE users SET {column} WHERE username IN ('u1', 'u2')")
        assert daemon.users_changed([u1.id]).change.removed == (u1.extension,)
        assert _applier(tmp_path, kind, engine).full().change.removed == (u2.extension,)
        assert _held(tmp_path, kind, engine, u2.extension) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("broken", "deleted", "refused"), [(2, 2, False), (1, 3, True)], ids=["2of5", "3of5"]
)
def test_the_mass_removal_guard_counts_kept_users_as_held(
    tmp_path: Path, kind: str, broken: int, deleted: int, refused: bool
) -> None:
    """Users kept as they were count among the users the target holds, on both targets
    alike: removing 2 of 5 endpoints (2 kept) is applied, 3 of 5 (1 kept) is refused."""
    with _site(tmp_path, kind) as (engine, _accounts):
        _applier(tmp_path, kind, engine).full()
        for i in range(broken):
            _break(engine, f"u{i}", f"'bad{i}'")
        delete_users_sql(engine, keep=5 - deleted)  # the last ``deleted`` by id
        apply: Callable[[], Any] = _applier(tmp_path, kind, engine).full
        if refused:
            with pytest.raises(MassRemovalRefused):
                apply()
        else:
            change = apply().change
            assert (len(change.removed), change.unchanged) == (deleted, 5 - deleted)


def test_postgresql_keeps_the_last_good_rows_and_gives_them_to_a_valid_user(
    tmp_path: Path,
) -> None:
    """On PostgreSQL (store and realtime tables in one database) a fresh full apply keeps
    the rows of a user whose extension broke, and gives them to a user validly holding
    that extension later."""
    cheap_hasher()
    with temp_database("postgresql", tmp_path) as url:
        engine = open_engine(url)
        try:
            engine.dispose()
            engine = seed_store(url, 3)
            accounts = Accounts(engine, Policy(password_policy=False))
            _applier(tmp_path, "realtime", engine).full()
            ext = accounts.get_user("u1").extension
            before = _held(tmp_path, "realtime", engine, ext)
            _break(engine, "u1", "'10a1'")
            applied = _applier(tmp_path, "realtime", engine).full()
            assert [str(s) for s in applied.skipped] == [f"u1: extension: {DIGITS}"]
            assert _held(tmp_path, "realtime", engine, ext) == before
            accounts.edit_user("u2", {"extension": ext})
            applied = _applier(tmp_path, "realtime", engine).full()
            assert applied.change.updated == (ext,)
            assert _auth_username(tmp_path, "realtime", engine, ext) == "u2"
        finally:
            engine.dispose()


def test_a_new_target_is_asked_whose_endpoints_it_holds_not_memory(tmp_path: Path) -> None:
    """After the target is replaced (a SIGHUP to another path), a broken user keeps only an
    endpoint the new target holds for it: one there under another user's auth goes."""
    with _site(tmp_path, "config") as (engine, accounts):
        applier = _applier(tmp_path, "config", engine)
        applier.full()
        u1 = accounts.get_user("u1")
        _break(engine, "u1", "'10a1'")
        applier.users_changed([u1.id])
        stranger = replace(u1, username="zed", extension=u1.extension)
        other = ConfigFileTarget(tmp_path / "other" / "pjsip_users.conf")
        held = [*applier.objects.values(), render_user(stranger, RenderSettings())]
        other.apply(sorted(held, key=lambda o: endpoint_order(o.endpoint_id)))
        applier.target, applier.synced = other, False
        assert applier.full().change.removed == (u1.extension,)
        assert f"[{u1.extension}]" not in other.path.read_text()


def test_a_sharded_target_tells_whose_endpoints_it_holds(tmp_path: Path) -> None:
    """A fresh full apply to shard files keeps a broken user's endpoint where its shard
    file holds it, and a valid user later given that extension takes it."""
    with _site(tmp_path, "config") as (engine, accounts):
        path = tmp_path / "pjsip_users.conf"
        Applier(engine, ShardedConfigFileTarget(path, shards=4), RenderSettings()).full()
        ext = accounts.get_user("u1").extension
        _break(engine, "u1", "'10a1'")
        fresh = Applier(engine, ShardedConfigFileTarget(path, shards=4), RenderSettings())
        assert fresh.full().change.removed == ()
        accounts.edit_user("u2", {"extension": ext})
        fresh = Applier(engine, ShardedConfigFileTarget(path, shards=4), RenderSettings())
        assert fresh.full().change.updated == (ext,)


@pytest.mark.parametrize("shards", [0, 4])
def test_a_fresh_full_apply_reads_only_files_naming_a_broken_user_and_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int
) -> None:
    """A fresh full apply with a broken user reads the one file (or the one shard file)
    that names it once (by the canonical reader or the parser), for the look-up and the
    apply together, and no other."""
    from provisioner.targets import canonical, holdings

    with _site(tmp_path, "config", count=8) as (engine, _accounts):
        path = tmp_path / "pjsip_users.conf"

        def target() -> Target:
            if shards:
                return ShardedConfigFileTarget(path, shards=shards)
            return ConfigFileTarget(path)

        Applier(engine, target(), RenderSettings()).full()
        _break(engine, "u1", "'10a1'")
        parsed: list[bytes] = []
        real = parse
        real_canonical = canonical.read_canonical

        def counted(data: bytes) -> Any:
            parsed.append(data)
            return real(data)

        def counted_canonical(data: bytes, known: Any = None) -> Any:
            read = real_canonical(data, known)
            if read is not None:  # else the parser reads it, and counts it
                parsed.append(data)
            return read

        monkeypatch.setattr(holdings, "parse", counted)
        monkeypatch.setattr(holdings, "read_canonical", counted_canonical)
        assert Applier(engine, target(), RenderSettings()).full().change.empty
        assert len(parsed) == 1
        assert b"username=u1\n" in parsed[0]


@pytest.mark.parametrize("path", ["one-edit", "full"])
def test_a_user_moved_onto_a_foreign_row_then_deleted_loses_its_kept_endpoint(
    tmp_path: Path, path: str
) -> None:
    """A user moved to an extension a hand-made realtime row holds keeps its old endpoint
    while skipped, and loses it in the daemon's one-edit path once it is deleted (not only
    at the next full reconcile: a deleted user's phone must stop working at once)."""
    with _site(tmp_path, "realtime") as (engine, accounts):
        daemon = _applier(tmp_path, "realtime", engine)
        daemon.full()
        u1 = accounts.get_user("u1")
        with engine.begin() as conn:
            conn.execute(ps_endpoints.insert().values(id="1999", context="trunk"))
        _sql(engine, "UPDATE users SET extension = '1999' WHERE username = 'u1'")
        moved = daemon.users_changed([u1.id]) if path == "one-edit" else daemon.full()
        assert (moved.change.conflicts, moved.change.removed) == (("1999",), ())
        assert _held(tmp_path, "realtime", engine, u1.extension) is not None
        _sql(engine, "UPDATE users SET deleted_at = CURRENT_TIMESTAMP WHERE username = 'u1'")
        assert daemon.users_changed([u1.id]).change.removed == (u1.extension,)
        assert _held(tmp_path, "realtime", engine, u1.extension) is None
        assert _held(tmp_path, "realtime", engine, "1999") is not None


#: Agents another writer breaks at once: more than the applier logs one by one.
BROKEN = 30


def _break_agents(engine: Engine) -> None:
    """Another writer gives every agent (u0..) an extension the rules refuse."""
    _sql(engine, "UPDATE users SET extension = 'x' || id WHERE username LIKE 'u%'")


def _warned(logs: list[Any]) -> list[str]:
    return [e["event"] for e in logs if e["log_level"] == "warning"]


def test_many_skipped_users_are_one_summary_logged_once(tmp_path: Path) -> None:
    """Users another writer broke log ``sync.skipped`` for the first few new ones and then
    one ``sync.skipped_users`` summary with the count and what to do, nothing at warning
    level again while they stay broken (a reconcile, another user's edit), a mended
    one at info level (``sync.skipped_cleared``), and the count stays exact."""
    with _site(tmp_path, "config", count=BROKEN) as (engine, accounts):
        daemon = _applier(tmp_path, "config", engine)
        daemon.full()
        u0 = accounts.get_user("u0")
        _break_agents(engine)
        with capture_logs() as logs:
            first = daemon.full()
        assert len(first.skipped) == BROKEN  # sync --once still prints every one
        assert _warned(logs) == ["sync.skipped"] * USER_DETAIL + ["sync.skipped_users"]
        [summary] = [e for e in logs if e["event"] == "sync.skipped_users"]
        assert (summary["count"], summary["new"]) == (BROKEN, BROKEN)
        assert summary["not_detailed"] == BROKEN - USER_DETAIL
        assert summary["usernames"] == ["u0", "u1", "u2", "u3", "u4"]
        assert "provisioner user edit" in summary["hint"]
        assert daemon.skipped_now == BROKEN

        with capture_logs() as logs:
            daemon.full()
            daemon.users_changed([accounts.get_user("root").id])
        assert _warned(logs) == []
        applied = [e for e in logs if e["event"] == "sync.applied"]
        assert [e["skipped"] for e in applied] == [BROKEN, BROKEN]
        assert daemon.skipped_now == BROKEN

        _sql(engine, "UPDATE users SET extension = :e WHERE id = :i", e=u0.extension, i=u0.id)
        with capture_logs() as logs:
            daemon.users_changed([u0.id])
        assert _warned(logs) == []
        [cleared] = [e for e in logs if e["event"] == "sync.skipped_cleared"]
        assert (cleared["log_level"], cleared["count"], cleared["usernames"]) == (
            "info",
            1,
            ["u0"],
        )
        assert daemon.skipped_now == BROKEN - 1


def _summaries(err: str) -> list[str]:
    """The lines of ``err`` after the per-user ones: those counting many troubled users."""
    return [line for line in err.splitlines() if line.split(" ", 1)[0].isdigit()]


def test_sync_once_and_render_count_many_skipped_users_and_say_what_to_do(
    tmp_path: Path,
) -> None:
    """``sync --once`` and ``render --dry-run`` print every skipped user and, past
    USER_DETAIL of them, one line counting them by field and naming ``user show`` and
    ``user edit``; with a few skipped, no such line."""
    config = write_config(tmp_path)
    with _site(tmp_path, "config", count=BROKEN) as (engine, _accounts):
        cli(config, "sync", "--once")
        _break(engine, "u0", "'10a1'")
        few = cli(config, "sync", "--once")
        assert "skipped u0: extension: " in few.err
        assert _summaries(few.err) == []
        _break_agents(engine)
        for args in (("sync", "--once"), ("render", "--dry-run")):
            ran = cli(config, *args)
            assert ran.err.count("\nskipped u") + ran.err.startswith("skipped u") == BROKEN
            [summary] = _summaries(ran.err)
            assert summary.startswith(f"{BROKEN} users skipped (extension: {BROKEN})"), summary
            assert "`provisioner user show USERNAME`" in summary
            assert "`provisioner user edit USERNAME`" in summary


def test_a_skipped_user_broken_another_way_is_logged_again(tmp_path: Path) -> None:
    """A skipped user whose row breaks another way (another rule) is logged again; one
    purged while skipped is no longer counted."""
    with _site(tmp_path, "config") as (engine, accounts):
        daemon = _applier(tmp_path, "config", engine)
        daemon.full()
        u1 = accounts.get_user("u1")
        _break(engine, "u1", "'10a1'")
        daemon.users_changed([u1.id])
        _break(engine, "u1", BAD_EXTENSIONS["not-utf8"][0])
        with capture_logs() as logs:
            daemon.users_changed([u1.id])
        [again] = [e for e in logs if e["event"] == "sync.skipped"]
        assert again["username"] == "u1"
        assert daemon.skipped_now == 1
        _sql(engine, "DELETE FROM users WHERE id = :i", i=u1.id)
        daemon.users_changed([u1.id])
        assert daemon.skipped_now == 0


def test_the_daemon_logs_skipped_users_once_and_counts_them_all(tmp_path: Path) -> None:
    """A daemon over many users another writer broke logs them as a few lines and one
    summary at its first reconcile, nothing more at warning level through later ones,
    and its health record and ``provisioner_users_skipped`` count every skipped user,
    after another user's edit too."""
    from .faultkit import until_async as _until
    from .test_daemon_e2e import _start_daemon, _stop, _write_config

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = _write_config(tmp_path, None)
    settings = f"[daemon]\nreconcile_interval = 1.5\nmetrics_port = {port}"
    config.write_text(config.read_text().replace("[daemon]", settings))
    with _site(tmp_path, "config", count=BROKEN) as (engine, _accounts):
        _applier(tmp_path, "config", engine).full()
        _break_agents(engine)
    log = tmp_path / "daemon.log"
    health = tmp_path / "state" / "health.json"

    def applied(full: bool) -> int:
        return sum(
            1
            for line in log.read_text().splitlines()
            if '"sync.applied"' in line and f'"full": {str(full).lower()}' in line
        )

    async def scenario() -> None:
        daemon = await _start_daemon(config, log)
        try:
            await _until(lambda: applied(True) >= 2, 20)
            synced = json.loads(health.read_text())["last_sync_at"]
            store = open_engine(f"sqlite:///{tmp_path / 'store.db'}")
            _sql(store, "UPDATE users SET full_name = 'Root R.' WHERE username = 'root'")
            store.dispose()
            await _until(lambda: json.loads(health.read_text())["last_sync_at"] != synced, 20)
            # The edit's apply, well before the next reconcile (1.5 s on) counts anew.
            assert applied(False) == 1
            assert json.loads(health.read_text())["skipped"] == BROKEN
            url = f"http://127.0.0.1:{port}/metrics"
            metrics = await asyncio.to_thread(lambda: urlopen(url, timeout=5).read())
            assert f"provisioner_users_skipped {BROKEN}.0" in metrics.decode()
            await _until(lambda: applied(True) >= 3, 20)
        finally:
            assert await _stop(daemon) == 0

    asyncio.run(scenario())
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warned = [e["event"] for e in events if e.get("level") == "warning"]
    assert warned == ["sync.skipped"] * USER_DETAIL + ["sync.skipped_users"]
    assert {e["skipped"] for e in events if e["event"] == "sync.applied"} == {BROKEN}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["one edit", "full"])
def test_a_broken_user_added_in_a_purged_users_place_keeps_nothing_of_its(
    tmp_path: Path, kind: str, path: str
) -> None:
    """A user another writer adds, broken, in the id of a user purged just before, both
    before the applier looked (as SQLite gave a purged newest user's id to the next user
    before migration 0012), is not taken for the purged user: the purged user's endpoint,
    auth and AOR go, and the new user keeps none of them, in the one-edit path and in a
    full apply with memory."""
    with _site(tmp_path, kind) as (engine, accounts):
        applier = _applier(tmp_path, kind, engine)
        applier.full()
        gone = accounts.get_user("u3")
        assert gone.created_at is not None
        accounts.delete(["u3"])
        accounts.purge(["u3"])
        with engine.begin() as conn:
            insert_user_copy(conn, "u2", "newbie", "10a1")
            conn.execute(
                update(users)
                .where(users.c.username == "newbie")
                .values(id=gone.id, created_at=gone.created_at + timedelta(seconds=1))
            )
        applied = applier.users_changed([gone.id]) if path == "one edit" else applier.full()
        assert [str(s) for s in applied.skipped] == [f"newbie: extension: {DIGITS}"]
        assert applied.change.removed == (gone.extension,)
        assert _held(tmp_path, kind, engine, gone.extension) is None
