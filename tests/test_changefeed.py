"""The change feed: triggers note every change to a user, whoever made it."""

from __future__ import annotations

import asyncio
import select as pyselect
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from provisioner import daemon as daemon_module
from provisioner.accounts import Accounts
from provisioner.ami.pbx import AmiPbx
from provisioner.applier import Applied, Applier
from provisioner.checks import Check, run_checks
from provisioner.config import Config, load_config
from provisioner.daemon import Daemon
from provisioner.model import AVATAR_MAX_BYTES
from provisioner.pjsip import RenderSettings
from provisioner.store import changefeed
from provisioner.store.changefeed import (
    NOTIFY_CHANNEL,
    ChangeRow,
    CursorTracker,
    _gaps,
    load_cursor,
    prune_changes,
    read_change_ids,
    read_changes,
    read_unapplied,
    save_cursor,
)
from provisioner.store.schema import changes, user_attributes
from provisioner.targets.configfile import ConfigFileTarget

from .amipeer import FakeAsterisk, eventually
from .conftest import FakeClock
from .dbs import maria_account, run_statement
from .test_realtime import statements


def _changes(engine: Engine, after: int = 0) -> list[tuple[str, int, str]]:
    with engine.connect() as conn:
        return [(c.entity, c.entity_id, c.op) for c in read_changes(conn, after)]


def test_cli_and_plain_sql_changes_are_noted(accounts: Accounts, engine: Engine) -> None:
    """An insert, an update, an attribute edit and a delete by hand in SQL each add a change row."""
    created = accounts.add_user(
        {"username": "alice", "full_name": "A", "email": "a@example.com", "profile": "agents"}
    )
    uid = created.user.id
    with engine.connect() as conn:
        start = max(c.id for c in read_changes(conn, 0))
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET context = 'other' WHERE id = :i"), {"i": uid})
        conn.execute(user_attributes.insert().values(user_id=uid, key="agent", value="x"))
        conn.execute(text("DELETE FROM user_attributes WHERE user_id = :i"), {"i": uid})
        conn.execute(text("DELETE FROM users WHERE id = :i"), {"i": uid})
    assert _changes(engine, start) == [
        ("user", uid, "U"),
        ("user", uid, "I"),
        ("user", uid, "D"),
        ("user", uid, "D"),
    ]


def test_cursor_is_durable(engine: Engine) -> None:
    """The saved cursor reads back after a reconnect, and starts at 0."""
    with engine.connect() as conn:
        assert load_cursor(conn) == 0
    with engine.begin() as conn:
        save_cursor(conn, 41)
    with engine.begin() as conn:
        save_cursor(conn, 42)
    with engine.connect() as conn:
        assert load_cursor(conn) == 42


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_trigger_notifies(engine: Engine, accounts: Accounts, db_url: str) -> None:
    """On PostgreSQL a change also sends NOTIFY on the change channel."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        accounts.edit_user("root", {"description": "hello"})
        pyselect.select([listener.fileno()], [], [], 5)
        got = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    assert got == ["user:1"]


def test_tracker_moves_over_contiguous_ids() -> None:
    """Applied ids without gaps move the cursor to the highest one."""
    t = CursorTracker(cursor=10)
    assert t.mark([11, 12, 13], now=0.0) == 13


def test_tracker_waits_on_a_gap_then_abandons_it() -> None:
    """A gap holds the cursor until the grace period passes, then is skipped."""
    t = CursorTracker(cursor=10, grace=5.0)
    assert t.mark([12, 13], now=0.0) == 10
    assert t.mark([], now=4.0) == 10
    assert t.mark([], now=5.5) == 13


def test_tracker_moves_past_every_gap_open_for_the_grace_at_once() -> None:
    """Gaps that have all stayed open for the grace period are all moved past at once
    (not one more per grace period), and a gap younger than the grace still holds."""
    t = CursorTracker(cursor=10, grace=5.0)
    assert t.mark([12, 14, 16], now=0.0) == 10
    assert t.mark([18], now=4.0) == 10
    assert t.mark([], now=5.5) == 16
    assert t.hole_ranges() == [(11, 11), (13, 13), (15, 15)]
    assert t.mark([], now=9.5) == 18


def test_tracker_late_commit_is_not_missed() -> None:
    """A change that commits late inside a gap is still fresh and then closes the gap."""
    t = CursorTracker(cursor=10, grace=5.0)
    t.mark([12], now=0.0)
    late = [ChangeRow(11, "user", 1, "U"), ChangeRow(12, "user", 2, "U")]
    assert [r.id for r in t.fresh(late)] == [11]
    assert t.mark([11], now=1.0) == 12


def test_tracker_keeps_a_skipped_gap_as_a_hole_for_its_life() -> None:
    """A gap the cursor moved past is still fresh, once, and unprunable for ``hole_life``
    seconds; then it is forgotten."""
    t = CursorTracker(cursor=10, grace=5.0, hole_life=60.0)
    t.mark([12], now=0.0)
    assert t.mark([], now=6.0) == 12
    late = [ChangeRow(11, "user", 1, "U")]
    assert t.fresh(late) == late
    assert t.prune_limit() == 10
    t.mark([11], now=7.0)
    assert t.fresh(late) == []
    t.mark([], now=70.0)
    assert (t.hole_ranges(), t.prune_limit()) == ([], 12)


def test_a_full_reconcile_reads_the_ids_it_marks_and_only_those_not_applied(
    accounts: Accounts, engine: Engine
) -> None:
    """The ids a full reconcile marks applied are those of the changes above the cursor,
    oldest first and at most the limit; the tracker leaves out those already applied."""
    accounts.edit_user("root", {"description": "one"})
    accounts.edit_user("root", {"description": "two"})
    with engine.connect() as conn:
        ids = [c.id for c in read_changes(conn, 0)]
        assert read_change_ids(conn, 0, limit=len(ids)) == ids
        assert read_change_ids(conn, ids[0], limit=1) == ids[1:2]
    tracker = CursorTracker(cursor=ids[0], grace=5.0)
    tracker.mark([ids[2]], now=0.0)
    assert tracker.fresh_ids(ids) == [i for i in ids if i not in (ids[0], ids[2])]


def test_prune_drops_only_applied_changes(accounts: Accounts, engine: Engine) -> None:
    """Pruning up to the cursor deletes those changes and keeps every later one."""
    accounts.edit_user("root", {"description": "one"})
    accounts.edit_user("root", {"description": "two"})
    with engine.connect() as conn:
        ids = [c.id for c in read_changes(conn, 0)]
    middle = ids[-3]
    with engine.begin() as conn:
        assert prune_changes(conn, middle) == len([i for i in ids if i <= middle])
    with engine.connect() as conn:
        assert [c.id for c in read_changes(conn, 0)] == [i for i in ids if i > middle]


def test_prune_keeps_the_newest_change_so_ids_never_go_back(
    accounts: Accounts, engine: Engine
) -> None:
    """Pruning everything keeps the newest row, so the next change gets a higher id."""
    with engine.connect() as conn:
        newest = max(c.id for c in read_changes(conn, 0))
    with engine.begin() as conn:
        prune_changes(conn, newest)
    accounts.edit_user("root", {"description": "again"})
    with engine.connect() as conn:
        assert [c.id for c in read_changes(conn, 0)][-1] > newest


def test_prune_deletes_more_changes_than_one_statement_takes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning more changes than one statement deletes removes every one up to the cursor."""
    monkeypatch.setattr(changefeed, "_PRUNE_BATCH", 3)
    base = _newest(engine)
    _add_changes(engine, list(range(base + 1, base + 12)))
    with engine.begin() as conn:
        held = len(read_changes(conn, 0))
        assert prune_changes(conn, base + 10) == held - 1
    with engine.connect() as conn:
        assert [c.id for c in read_changes(conn, 0)] == [base + 11]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_pruning_a_long_backlog_never_keeps_another_writer_waiting_long(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """Pruning a long backlog of applied changes (a daemon back after a long stop) commits
    as it goes, and lets others in: a writer allowed to wait 1 s for the store's lock is
    never refused."""
    uid = _add(accounts, "alice")
    with engine.begin() as conn:
        for _ in range(30):
            conn.execute(
                changes.insert(), [{"entity": "user", "entity_id": uid, "op": "U"}] * 10_000
            )
    daemon = _daemon(engine, db_url, tmp_path)
    impatient = create_engine(db_url, connect_args={"timeout": 1.0})
    refused: list[str] = []
    pruning = threading.Thread(target=daemon._prune)
    try:
        pruning.start()
        while pruning.is_alive():
            try:
                with impatient.begin() as conn:
                    conn.execute(text("UPDATE users SET context = 'x' WHERE id = :i"), {"i": uid})
            except OperationalError as exc:
                refused.append(str(exc.orig))
            time.sleep(0.01)
        pruning.join()
        assert refused == []
        assert len(_changes(engine)) < 1_000
    finally:
        impatient.dispose()
        daemon.engine.dispose()


#: How long a test lets a statement wait for another transaction's lock, per backend.
_SHORT_LOCK_WAIT = {
    "postgresql": "SET lock_timeout = 2000",
    "mariadb": "SET SESSION innodb_lock_wait_timeout = 2",
}


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_prune_never_waits_for_an_open_transaction_above_the_cursor(
    accounts: Accounts, engine: Engine, backend: str
) -> None:
    """Pruning up to the cursor, while a writer's uncommitted change holds the id right above
    it and newer changes are committed, neither waits for that writer nor removes its change."""
    alice, root = _add(accounts, "alice"), accounts.get_user("root").id
    cursor = _newest(engine)
    with engine.connect() as writer:
        writer.execute(text("UPDATE users SET context = 'slow' WHERE id = :i"), {"i": alice})
        _sql(engine, "UPDATE users SET context = 'fast' WHERE id = :i", i=root)
        with engine.begin() as conn:
            conn.execute(text(_SHORT_LOCK_WAIT[backend]))
            assert prune_changes(conn, cursor) > 0
        writer.commit()
    with engine.connect() as conn:
        assert read_changes(conn, cursor)[0] == ChangeRow(cursor + 1, "user", alice, "U")


def _add_changes(engine: Engine, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            changes.insert(), [{"id": i, "entity": "user", "entity_id": i, "op": "U"} for i in ids]
        )


def test_applied_ids_above_a_gap_do_not_hide_new_changes(engine: Engine) -> None:
    """A gap with a full read of applied ids above it hides neither a new change nor its own."""
    with engine.connect() as conn:
        base = conn.execute(select(func.max(changes.c.id))).scalar_one_or_none() or 0
    # base + 1 is an open transaction's id; base + 2 .. base + 11 committed meanwhile.
    _add_changes(engine, list(range(base + 2, base + 12)))
    t = CursorTracker(cursor=base, grace=30.0)
    with engine.connect() as conn:
        rows = read_unapplied(conn, t, limit=5)
    assert [r.id for r in rows] == list(range(base + 2, base + 7))
    t.mark([r.id for r in rows], now=0.0)
    with engine.connect() as conn:
        rows = read_unapplied(conn, t, limit=5)
    assert [r.id for r in rows] == list(range(base + 7, base + 12))
    t.mark([r.id for r in rows], now=0.5)
    assert t.cursor == base

    _add_changes(engine, [base + 12])  # a new edit, well inside the grace period
    with engine.connect() as conn:
        rows = read_unapplied(conn, t, limit=5)
    assert [r.id for r in rows] == [base + 12]
    t.mark([r.id for r in rows], now=1.0)

    _add_changes(engine, [base + 1])  # the open transaction commits at last
    with engine.connect() as conn:
        rows = read_unapplied(conn, t, limit=5)
    assert [r.id for r in rows] == [base + 1]
    assert t.mark([r.id for r in rows], now=2.0) == base + 12


def test_many_narrow_holes_are_reread_in_few_statements_of_constant_form(engine: Engine) -> None:
    """An hour of one-id holes (MariaDB Galera's interleaved ids) is re-read in a handful
    of statements without a BETWEEN per hole, and a late change in any hole, narrow or
    wide, is still found, oldest first and within the row limit."""
    with engine.connect() as conn:
        base = conn.execute(select(func.max(changes.c.id))).scalar_one_or_none() or 0
    count = 3_000
    narrow = [(base + 100 + 2 * k, base + 100 + 2 * k, 0.0) for k in range(count)]
    top = base + 100 + 2 * count
    t = CursorTracker(cursor=top, holes=[(base + 1, base + 50, 0.0), *narrow])
    late = [base + 7, base + 100, base + 100 + 2 * (count // 2), top - 2]
    _add_changes(engine, [*late, top + 1])
    with statements(engine) as sent, engine.connect() as conn:
        rows = read_unapplied(conn, t)
    assert [r.id for r in rows] == [*late, top + 1]
    reads = [s for s in sent if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) <= 2 + count // 500
    assert sum(s.upper().count("BETWEEN") for s in reads) <= 1
    with engine.connect() as conn:
        assert [r.id for r in read_unapplied(conn, t, limit=2)] == [*late[:2], top + 1]


def test_read_unapplied_rereads_every_gap_between_applied_ids() -> None:
    """Each run of missing ids between the cursor and the highest applied id is a gap to re-read."""
    assert _gaps(10, set()) == []
    assert _gaps(10, {11, 12}) == []
    assert _gaps(10, {12, 13, 17, 18, 20}) == [(11, 11), (14, 16), (19, 19)]


# -- a changed key: the old id is noted too ----------------------------------------------


def _add(accounts: Accounts, username: str) -> int:
    """Add a user of profile ``agents``; return its id."""
    created = accounts.add_user(
        {
            "username": username,
            "full_name": username.title(),
            "email": f"{username}@example.com",
            "profile": "agents",
        }
    )
    return created.user.id


def _newest(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.max(changes.c.id))).scalar_one_or_none() or 0


def _sql(engine: Engine, statement: str, **params: object) -> None:
    """A DBA's statement in a SQL shell."""
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def test_a_changed_user_id_notes_the_old_and_the_new_id(accounts: Accounts, engine: Engine) -> None:
    """An update that changes a user's id notes both the old and the new id."""
    uid = _add(accounts, "alice")
    start = _newest(engine)
    _sql(engine, "UPDATE users SET id = 999 WHERE id = :i", i=uid)
    assert sorted(_changes(engine, start)) == [("user", uid, "U"), ("user", 999, "U")]


def test_an_attribute_moved_to_another_user_notes_both_users(
    accounts: Accounts, engine: Engine
) -> None:
    """An update that moves an attribute to another user notes both users' ids."""
    alice, bob = _add(accounts, "alice"), _add(accounts, "bob")
    with engine.begin() as conn:
        conn.execute(user_attributes.insert().values(user_id=alice, key="agent", value="x"))
    start = _newest(engine)
    _sql(engine, "UPDATE user_attributes SET user_id = :b WHERE user_id = :a", a=alice, b=bob)
    assert sorted(_changes(engine, start)) == [("user", alice, "U"), ("user", bob, "U")]


def test_a_changed_profile_id_notes_the_old_and_the_new_id(
    accounts: Accounts, engine: Engine
) -> None:
    """An update that changes a profile's id notes both the old and the new id."""
    pid = accounts.add_profile("spare").id
    start = _newest(engine)
    _sql(engine, "UPDATE profiles SET id = 999 WHERE id = :i", i=pid)
    assert sorted(_changes(engine, start)) == [("profile", pid, "U"), ("profile", 999, "U")]


def _update_seconds(engine: Engine, uid: int, times: int = 5) -> float:
    """The quickest of ``times`` one-row updates of a column of user ``uid`` that is not
    its avatar, each its own transaction."""
    took = []
    for n in range(times):
        started = time.perf_counter()
        _sql(engine, "UPDATE users SET context = :c WHERE id = :i", c=f"c{n}", i=uid)
        took.append(time.perf_counter() - started)
    return min(took)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_the_change_trigger_does_not_read_a_users_avatar_on_postgresql(
    accounts: Accounts, engine: Engine
) -> None:
    """A write to a user holding the largest avatar costs about what one to a user without
    one does: the PostgreSQL trigger reads the key column alone, not the whole row."""
    plain, pictured = _add(accounts, "plain"), _add(accounts, "pictured")
    avatar = bytes(range(256)) * (AVATAR_MAX_BYTES // 256)
    _sql(engine, "UPDATE users SET avatar = :a WHERE id = :i", a=avatar, i=pictured)
    start = _newest(engine)
    assert _update_seconds(engine, pictured) < 3 * _update_seconds(engine, plain) + 0.01
    assert ("user", pictured, "U") in _changes(engine, start)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_notifies_the_old_and_the_new_id(
    engine: Engine, accounts: Accounts, db_url: str
) -> None:
    """On PostgreSQL a changed user id sends NOTIFY for the old and the new id."""
    uid = _add(accounts, "alice")
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        _sql(engine, "UPDATE users SET id = 999 WHERE id = :i", i=uid)
        pyselect.select([listener.fileno()], [], [], 5)
        got = [n.payload for n in listener.notifies(timeout=1, stop_after=2)]
    assert sorted(got) == sorted([f"user:{uid}", "user:999"])


def _daemon(engine: Engine, db_url: str, tmp_path: Path) -> Daemon:
    """A daemon over the store, writing a config file, fully applied and caught up with the feed."""
    config = load_config(
        env={},
        overrides={"store": {"url": db_url}, "target": {"path": str(tmp_path / "pjsip.conf")}},
    )
    daemon = Daemon.from_config(config)
    daemon.applier.full()
    daemon.tracker = CursorTracker(cursor=_newest(engine))
    return daemon


def _sections(path: Path) -> set[str]:
    """The section names of a config file."""
    text = path.read_text(encoding="utf-8")
    return {line[1:].split("]", 1)[0] for line in text.splitlines() if line.startswith("[")}


def _apply_changes(daemon: Daemon) -> Applied:
    """Apply the unread changes as the daemon does on a wake-up between full reconciles
    (incrementally), then move its cursor past them."""
    applied = daemon._incremental()
    assert applied is not None
    daemon._advance(daemon._unsaved or [])
    daemon._unsaved = None
    return applied


def _same_as_a_full_apply(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon's config file holds exactly what a full apply of the store writes."""
    fresh = ConfigFileTarget(tmp_path / "fresh.conf")
    Applier(daemon.engine, fresh, daemon.applier.settings).full()
    assert Path(daemon.config.target.path).read_bytes() == fresh.path.read_bytes()


def test_the_incremental_apply_moves_a_user_whose_id_and_extension_changed(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A user whose id and extension change in one statement loses its old PJSIP objects and
    gets the new ones through the daemon's incremental apply."""
    uids = [_add(accounts, name) for name in ("alice", "bob", "carol")]
    old = accounts.get_user("alice")
    daemon = _daemon(engine, db_url, tmp_path)
    conf = Path(daemon.config.target.path)
    try:
        assert old.extension in _sections(conf)
        _sql(engine, "UPDATE users SET id = 999, extension = '150' WHERE id = :i", i=uids[0])
        assert not _apply_changes(daemon).full
        assert old.extension not in _sections(conf)
        assert "150" in _sections(conf)
        _same_as_a_full_apply(daemon, tmp_path)
    finally:
        daemon.engine.dispose()


def test_the_incremental_apply_forgets_the_old_id_of_a_renumbered_user(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """After a user's id changes, deleting that user removes its PJSIP objects through the
    daemon's incremental apply."""
    uids = [_add(accounts, name) for name in ("alice", "bob", "carol")]
    old = accounts.get_user("alice")
    daemon = _daemon(engine, db_url, tmp_path)
    conf = Path(daemon.config.target.path)
    try:
        _sql(engine, "UPDATE users SET id = 999 WHERE id = :i", i=uids[0])
        _apply_changes(daemon)
        assert old.extension in _sections(conf)
        _sql(engine, "DELETE FROM users WHERE id = 999")
        assert not _apply_changes(daemon).full
        assert old.extension not in _sections(conf)
        _same_as_a_full_apply(daemon, tmp_path)
    finally:
        daemon.engine.dispose()


def test_an_extension_given_to_another_user_is_named_reowned(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """An extension taken from one user and given to another, in one incremental apply or
    in two, is named in the change's ``reowned`` (the previous owner's phone must lose
    it); an extension given to a user where nobody had it is not."""
    for name in ("alice", "bob", "carol"):
        _add(accounts, name)
    alice, carol = accounts.get_user("alice").extension, accounts.get_user("carol").extension
    daemon = _daemon(engine, db_url, tmp_path)
    try:
        _sql(engine, "UPDATE users SET extension = '150' WHERE username = 'alice'")
        _sql(engine, "UPDATE users SET extension = :e WHERE username = 'bob'", e=alice)
        assert _apply_changes(daemon).change.reowned == (alice,)
        _sql(engine, "UPDATE users SET extension = '151' WHERE username = 'carol'")
        moved = _apply_changes(daemon).change
        assert moved.removed == (carol,)
        assert moved.reowned == ()
        _sql(engine, "UPDATE users SET extension = :e WHERE username = 'alice'", e=carol)
        assert _apply_changes(daemon).change.reowned == (carol,)
    finally:
        daemon.engine.dispose()


def test_a_user_purged_and_added_again_under_its_username_is_a_new_owner_of_its_extension(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """A user deleted, purged and added again under the same username, landing on the
    same extension, is another user (another id, or on SQLite the purged newest user's
    id again but created later): its endpoint is named in ``reowned``, whether the purge
    was applied before the new user or in the same apply, so the removal owed for the
    old user's phone is not cancelled by the new user's endpoint."""
    _add(accounts, "alice")
    _add(accounts, "bob")
    alice = accounts.get_user("alice").extension
    daemon = _daemon(engine, db_url, tmp_path)
    try:
        for apart in (True, False):
            accounts.delete(["alice"])
            accounts.purge(["alice"])
            if apart:
                assert _apply_changes(daemon).change.removed == (alice,)
            clock.advance(minutes=5)
            accounts.add_user(
                {
                    "username": "alice",
                    "full_name": "Alice Again",
                    "email": "alice@example.com",
                    "profile": "agents",
                    "extension": alice,
                }
            )
            change = _apply_changes(daemon).change
            assert alice in (*change.added, *change.updated)
            assert change.reowned == (alice,)
    finally:
        daemon.engine.dispose()


def test_a_renamed_user_names_its_endpoint_reowned_and_a_new_sip_secret_does_not(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A user whose username changes (its auth username with it) has its endpoint named
    in ``reowned``, by an incremental and by a full apply; a new SIP secret alone does not
    (a phone registered with the old one is its user's own)."""
    _add(accounts, "alice")
    _add(accounts, "bob")
    alice, bob = accounts.get_user("alice").extension, accounts.get_user("bob").extension
    daemon = _daemon(engine, db_url, tmp_path)
    try:
        accounts.rotate_sip_secret("alice")
        changed = _apply_changes(daemon).change
        assert changed.updated == (alice,)
        assert changed.reowned == ()
        _sql(engine, "UPDATE users SET username = 'alice2' WHERE username = 'alice'")
        assert _apply_changes(daemon).change.reowned == (alice,)
        _sql(engine, "UPDATE users SET username = 'bob2' WHERE username = 'bob'")
        assert daemon.applier.full().change.reowned == (bob,)
    finally:
        daemon.engine.dispose()


@pytest.mark.parametrize("target", ["config", "shards", "realtime"])
def test_a_user_renamed_while_no_daemon_ran_has_its_endpoint_named_reowned_at_the_next_start(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path, target: str
) -> None:
    """A username changed while no daemon ran is found by the next daemon's first full
    apply in what the target holds (the auth's old username): its endpoint is named in
    ``reowned``, though that daemon never applied it before."""
    _add(accounts, "alice")
    _add(accounts, "bob")
    alice = accounts.get_user("alice").extension
    where: dict[str, Any] = {"path": str(tmp_path / "pjsip.conf")}
    if target == "shards":
        where["shards"] = 4
    elif target == "realtime":
        where = {"kind": "realtime", "url": db_url}
    config = load_config(env={}, overrides={"store": {"url": db_url}, "target": where})
    first = Daemon.from_config(config)
    try:
        first.applier.full()
    finally:
        first.engine.dispose()
    _sql(engine, "UPDATE users SET username = 'alice2' WHERE username = 'alice'")
    second = Daemon.from_config(config)
    try:
        change = second.applier.full().change
        assert change.updated == (alice,)
        assert change.reowned == (alice,)
    finally:
        second.engine.dispose()


def test_a_backlog_longer_than_one_read_is_applied_at_once(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes past one incremental read (a bulk import) go live without waiting for a poll."""
    monkeypatch.setattr(daemon_module, "FEED_BATCH", 5)
    uids = [_add(accounts, name) for name in ("alice", "bob", "carol")]
    daemon = _daemon(engine, db_url, tmp_path)
    conf = Path(daemon.config.target.path)
    # One transaction, as an import: one commit, one wake-up.  Carol's edit comes after
    # two reads' worth of Alice's and Bob's.
    edits = [(uids[n % 2], f"c{n}") for n in range(10)] + [(uids[2], "late")]
    with engine.begin() as conn:
        for uid, context in edits:
            conn.execute(
                text("UPDATE users SET context = :c WHERE id = :i"), {"c": context, "i": uid}
            )

    async def run() -> None:
        loop = asyncio.ensure_future(daemon.main_loop())
        daemon.wake.set()
        try:
            for _ in range(100):
                if "context=late" in conf.read_text(encoding="utf-8"):
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the last change of the backlog is not live")
        finally:
            daemon.handle_exit()
            await asyncio.wait_for(loop, 5)

    try:
        asyncio.run(run())
    finally:
        daemon.engine.dispose()


def _config_with_peer(
    peer: FakeAsterisk, store: dict[str, Any], target: dict[str, Any], state_dir: Path
) -> Config:
    """A daemon's config over ``store`` and ``target`` whose one Asterisk, "lab", is the
    started ``peer``; reloads are not spaced and reconnects come fast."""
    server = {"name": "lab", "host": "127.0.0.1", "port": peer.port}
    server |= {"username": peer.username, "secret": peer.secret}
    return load_config(
        env={},
        overrides={
            "store": store,
            "target": target,
            "ami": {"reload_min_gap": 0, "reload_gap_factor": 0, "backoff_base": 0.02},
            "asterisk": [server],
            "daemon": {"state_dir": str(state_dir)},
        },
    )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_full_apply_is_told_to_asterisk_when_saving_its_cursor_fails(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A full reconcile whose target write succeeded has Asterisk reload the file (the
    daemon's real AMI side, a fake Asterisk over a socket) even when the store then
    refuses the cursor's write."""
    conf = tmp_path / "pjsip.conf"

    async def run() -> tuple[int, bool]:
        peer = FakeAsterisk()
        await peer.start()
        store = {"url": db_url, "busy_timeout": 0.2}
        config = _config_with_peer(peer, store, {"path": str(conf)}, tmp_path)
        daemon = Daemon.from_config(config)
        daemon.health.ready = True
        ami = asyncio.ensure_future(daemon.pbx.run(daemon.ami_stop))  # type: ignore[union-attr]
        try:
            await daemon._run(daemon._full)
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            _add(accounts, "alice")
            alice = accounts.get_user("alice").extension
            with engine.begin():  # another writer holds the write lock (BEGIN IMMEDIATE) a while
                await daemon._run(daemon._full)
            ok = bool(daemon.health.last_sync_ok)
            await eventually(lambda: len(peer.actions("Reload")) == 2)
            assert f"[{alice}]" in conf.read_text()
            return len(peer.actions("Reload")), ok
        finally:
            daemon.ami_stop.set()
            await ami
            daemon.engine.dispose()
            await peer.stop()

    reloads, ok = asyncio.run(run())
    assert reloads == 2
    assert not ok  # the failed write is reported, and retried


@pytest.mark.parametrize("target", ["config", "realtime"])
def test_a_phone_loses_its_registration_when_its_extension_passes_to_another_user(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path, target: str
) -> None:
    """Through the daemon's incremental apply and its real AMI side (a fake Asterisk over
    a socket whose phone is registered on AOR 1001): alice moved off extension 1001 and
    bob given it has alice's phone's contact deleted from astdb (DBDel), after the reload
    for a config file, and the registration book no longer holds it."""
    contact = "contact/1001;@4647304968688045788916f1ea15a2ae"  # the peer's phone
    _add(accounts, "alice")
    _add(accounts, "bob")
    _sql(engine, "UPDATE users SET extension = '1001' WHERE username = 'alice'")
    conf = tmp_path / "pjsip.conf"
    where = {"path": str(conf)} if target == "config" else {"kind": "realtime", "url": db_url}

    async def run() -> tuple[list[str], bool, int]:
        peer = FakeAsterisk()
        await peer.start()
        config = _config_with_peer(peer, {"url": db_url}, where, tmp_path)
        daemon = Daemon.from_config(config)
        daemon.health.ready = True
        pbx = daemon.pbx
        assert isinstance(pbx, AmiPbx)
        ami = asyncio.ensure_future(pbx.run(daemon.ami_stop))
        try:
            link = pbx.links[0]
            await daemon._run(daemon._full)
            await eventually(link.book_complete)
            await eventually(lambda: not link.reloads.pending and not link.reloads.in_flight)
            reloads = len(peer.actions("Reload"))
            _sql(engine, "UPDATE users SET extension = '150' WHERE username = 'alice'")
            _sql(engine, "UPDATE users SET extension = '1001' WHERE username = 'bob'")
            applied = await daemon._run(daemon._incremental)
            assert applied is not None
            assert applied.change.reowned == ("1001",)
            # Both targets reload (a config file for the edit; realtime for endpoint 150,
            # added): a realtime removal is sent at once, maybe before that reload.
            await eventually(
                lambda: (
                    bool(peer.actions("DBDel"))
                    and not link.owed
                    and len(peer.actions("Reload")) > reloads
                )
            )
            reg = link.book.get("1001")
            keys = [a.get("Key") for a in peer.actions("DBDel")]
            return keys, bool(reg and reg.contacts), len(peer.actions("Reload")) - reloads
        finally:
            daemon.ami_stop.set()
            await ami
            daemon.engine.dispose()
            await peer.stop()

    keys, held, reloads = asyncio.run(run())
    assert keys == [contact]
    assert not held
    assert reloads >= 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_sighup_that_only_rewrites_the_files_has_asterisk_reload_them(
    accounts: Accounts, db_url: str, tmp_path: Path
) -> None:
    """A SIGHUP that moves the users into shard files (target.shards), changing no object,
    has Asterisk reload the files it wrote (the daemon's real AMI side, a fake Asterisk
    over a socket): the loaded files' digest is then theirs, and the next start owes no
    reload."""
    conf = tmp_path / "pjsip.conf"
    _add(accounts, "alice")

    async def run() -> None:
        peer = FakeAsterisk()
        await peer.start()
        server = {"name": "lab", "host": "127.0.0.1", "port": peer.port}
        server |= {"username": peer.username, "secret": peer.secret}
        overrides: dict[str, Any] = {
            "store": {"url": db_url},
            "target": {"path": str(conf)},
            "ami": {"reload_min_gap": 0, "reload_gap_factor": 0, "backoff_base": 0.02},
            "asterisk": [server],
            "daemon": {"state_dir": str(tmp_path)},
        }
        daemon = Daemon.from_config(load_config(env={}, overrides=overrides))
        daemon.health.ready = True
        ami = asyncio.ensure_future(daemon.pbx.run(daemon.ami_stop))  # type: ignore[union-attr]
        try:
            await daemon._run(daemon._full)
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            daemon.config_overrides = {**overrides, "target": {"path": str(conf), "shards": 2}}
            await daemon._reload_config()
            applied = await daemon._run(daemon._full)
            assert applied is not None
            assert (applied.change.wrote, applied.change.empty) == (True, True)  # no object
            assert "#include" in conf.read_text()
            await eventually(lambda: len(peer.actions("Reload")) == 2)
        finally:
            daemon.ami_stop.set()
            await ami
            daemon.engine.dispose()
            await peer.stop()

    asyncio.run(run())


def test_an_apply_that_waits_in_vain_for_a_pooled_connection_is_retried(
    accounts: Accounts, db_url: str, tmp_path: Path
) -> None:
    """An apply that finds every pooled connection taken (stuck elsewhere) until the pool's
    timeout fails as a store outage: recorded, retried with the backoff, and the daemon
    runs on; the retry applies the edit once a connection is free."""
    config = load_config(
        env={},
        overrides={
            "store": {"url": db_url},
            "target": {"path": str(tmp_path / "pjsip.conf")},
            "daemon": {"state_dir": str(tmp_path)},
        },
    )
    pool = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    target = ConfigFileTarget(tmp_path / "pjsip.conf")
    daemon = Daemon(config, pool, Applier(pool, target, RenderSettings.from_config(config)), [])
    daemon.applier.full()
    daemon.tracker = CursorTracker(cursor=_newest(accounts.engine))
    _add(accounts, "alice")

    async def run() -> None:
        with pool.connect():  # the only connection, held by a stuck transaction
            await daemon._run(daemon._incremental)
        assert not daemon.health.last_sync_ok
        assert "TimeoutError" in daemon.health.last_error
        daemon._retry_if_failed(full=False)
        assert daemon._retry_due is not None  # the retry is scheduled
        daemon._cancel_retry()
        await daemon._run(daemon._incremental)
        assert daemon.health.last_sync_ok

    try:
        asyncio.run(run())
        assert f"[{accounts.get_user('alice').extension}]" in target.path.read_text()
    finally:
        pool.dispose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_shutdown_whose_last_write_waits_in_vain_for_a_pooled_connection_keeps_the_marker(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """The shutdown's last store write (dropping this run's marker of untold writes) that
    finds every pooled connection taken until the pool's timeout keeps the marker, as a
    refused write does: the shutdown ends, with no error raised out of it."""
    config = load_config(
        env={},
        overrides={"store": {"url": db_url}, "target": {"path": str(tmp_path / "pjsip.conf")}},
    )
    pool = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    target = ConfigFileTarget(tmp_path / "pjsip.conf")
    applier = Applier(pool, target, RenderSettings.from_config(config))
    daemon = Daemon(config, pool, applier, [], pbx=AmiPbx([], pool))
    daemon._untold_found, daemon._untold_handed = [], True  # Asterisk told everything

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with pool.connect():  # the only connection, held by a stuck transaction
            await daemon._end_untold(None, loop.time() + 5)

    try:
        with capture_logs() as logs:
            asyncio.run(run())
    finally:
        pool.dispose()
    kept = [e for e in logs if e["event"] == "daemon.untold_kept"]
    assert [e["reason"] for e in kept] == ["store write failed"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_truncate_on_postgresql_reaches_the_daemon_at_once(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A DBA's ``TRUNCATE users CASCADE`` (which fires no row trigger) is noted, with a
    NOTIFY, and the daemon's next incremental apply removes every user's objects."""
    _add(accounts, "alice")
    config = load_config(
        env={},
        overrides={
            "store": {"url": db_url},
            "target": {"path": str(tmp_path / "pjsip.conf")},
            "daemon": {"max_removal_fraction": 1},
        },
    )
    daemon = Daemon.from_config(config)
    daemon.applier.full()
    daemon.tracker = CursorTracker(cursor=_newest(engine))
    conf = Path(config.target.path)
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        assert accounts.get_user("alice").extension in _sections(conf)
        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            _sql(engine, "TRUNCATE users CASCADE")
            pyselect.select([listener.fileno()], [], [], 5)
            assert list(listener.notifies(timeout=1, stop_after=1))
        assert _apply_changes(daemon).full
        assert _sections(conf) == set()
    finally:
        daemon.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_another_application_granted_only_the_user_tables_can_write_them_on_postgresql(
    accounts: Accounts, engine: Engine
) -> None:
    """On PostgreSQL an application whose role may write users, attributes and profiles but
    not the change feed still writes them, and each write is noted (as on MariaDB, whose
    triggers run with their definer's rights)."""
    uid = _add(accounts, "alice")
    role = "prov_test_app_" + uuid.uuid4().hex[:8]  # roles are the server's, not the database's
    _sql(engine, f"CREATE ROLE {role}")
    try:
        _sql(
            engine,
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON users, user_attributes, profiles TO {role}",
        )
        start = _newest(engine)
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL ROLE {role}"))
            conn.execute(text("UPDATE users SET full_name = 'Alice A.' WHERE id = :i"), {"i": uid})
            conn.execute(text("UPDATE profiles SET description = 'Agents' WHERE name = 'agents'"))
        assert ("user", uid, "U") in _changes(engine, start)
        assert any(entity == "profile" for entity, _id, _op in _changes(engine, start))
    finally:
        _sql(engine, f"DROP OWNED BY {role}")
        _sql(engine, f"DROP ROLE {role}")


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_writes_of_a_session_in_replica_mode_are_noted_on_postgresql(
    accounts: Accounts, engine: Engine, db_url: str
) -> None:
    """On PostgreSQL a session with ``session_replication_role = replica`` (a logical
    replication subscriber's apply, a bulk load skipping foreign-key checks) still notes
    each write of a user, an attribute, a profile and a TRUNCATE, with a NOTIFY."""
    uid = _add(accounts, "alice")
    start = _newest(engine)
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text("UPDATE users SET full_name = 'Alice A.' WHERE id = :i"), {"i": uid})
            conn.execute(user_attributes.insert().values(user_id=uid, key="agent", value="x"))
            conn.execute(text("UPDATE profiles SET description = 'Agents'"))
            conn.execute(text("TRUNCATE users CASCADE"))
        pyselect.select([listener.fileno()], [], [], 5)
        assert list(listener.notifies(timeout=1, stop_after=1))
    noted = _changes(engine, start)
    assert noted[:2] == [("user", uid, "U"), ("user", uid, "I")]
    assert {entity for entity, _id, _op in noted[2:]} == {"profile", "all"}


def _apply_if_any(daemon: Daemon) -> None:
    """One incremental apply as the daemon runs it on a wake-up, cursor moved after it."""
    daemon._incremental()
    daemon._advance(daemon._unsaved or [])
    daemon._unsaved = None


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_a_change_committing_after_its_gap_was_given_up_still_goes_live(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A transaction that holds a low change id longer than ``daemon.cursor_grace`` (a big
    import) while others commit higher ones is applied by the first incremental apply
    after it commits, not at the next full reconcile."""
    alice, bob = _add(accounts, "alice"), _add(accounts, "bob")
    daemon = _daemon(engine, db_url, tmp_path)
    daemon.tracker.grace = 0.2
    conf = Path(daemon.config.target.path)
    try:
        with engine.connect() as slow:
            slow.execute(text("UPDATE users SET extension = '150' WHERE id = :i"), {"i": alice})
            _sql(engine, "UPDATE users SET full_name = 'Bob B.' WHERE id = :i", i=bob)
            _apply_if_any(daemon)  # bob's change; alice's lower id is a gap
            time.sleep(0.3)
            _apply_if_any(daemon)  # the gap outlived the grace: the cursor moves past it
            slow.commit()
        _apply_if_any(daemon)
        assert "150" in _sections(conf)
        _same_as_a_full_apply(daemon, tmp_path)
    finally:
        daemon.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_a_change_committing_after_a_restart_past_its_given_up_gap_still_goes_live(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A daemon restarted while a transaction still holds a change id whose gap the
    cursor moved past applies that change when it commits: the saved cursor never
    passes a gap still looked for."""
    alice, bob = _add(accounts, "alice"), _add(accounts, "bob")
    daemon = _daemon(engine, db_url, tmp_path)
    daemon.tracker.grace = 0.2
    with engine.connect() as slow:
        slow.execute(text("UPDATE users SET extension = '150' WHERE id = :i"), {"i": alice})
        _sql(engine, "UPDATE users SET full_name = 'Bob B.' WHERE id = :i", i=bob)
        _apply_if_any(daemon)  # bob's change; alice's lower id is a gap
        time.sleep(0.3)
        _apply_if_any(daemon)  # the gap outlived the grace: the cursor moves past it
        daemon.engine.dispose()
        restarted = Daemon.from_config(daemon.config)  # its start: a full apply
        try:
            restarted._full()
            restarted._advance(restarted._unsaved or [])
            restarted._unsaved = None
            slow.commit()
            _apply_if_any(restarted)
            assert "150" in _sections(Path(restarted.config.target.path))
            _same_as_a_full_apply(restarted, tmp_path)
        finally:
            restarted.engine.dispose()


def _checked_config(db_url: str, tmp_path: Path) -> Config:
    """The config ``provisioner check`` is given here: the store at ``db_url``, the file
    target and the state directory under ``tmp_path``."""
    return load_config(
        env={},
        overrides={
            "store": {"url": db_url},
            "target": {"path": str(tmp_path / "pjsip.conf")},
            "daemon": {"state_dir": str(tmp_path / "state")},
        },
    )


def _store_check(config: Config) -> Check:
    """The store line of ``provisioner check`` on ``config``: (name, ok, detail)."""
    (line,) = [c for c in run_checks(config) if c[0] == "store"]
    return line


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_check_names_change_triggers_whose_definer_was_dropped_on_mariadb(
    db_url: str, tmp_path: Path
) -> None:
    """On MariaDB, once the account that ran the migrations (the triggers' definer) is
    dropped, every write to the user tables is refused, and ``provisioner check`` fails
    its store line naming that definer and the fix."""
    from provisioner.store.engine import open_engine
    from provisioner.store.migrate import upgrade

    with maria_account(db_url) as (account, as_account):
        migrator = open_engine(as_account)
        upgrade(migrator)
        migrator.dispose()
        config = _checked_config(db_url, tmp_path)
        before = _store_check(config)
        assert before[1], before
        run_statement(db_url, f"DROP USER '{account}'@'%'")
        after = _store_check(config)
    assert not after[1]
    assert f"{account}@%" in after[2]
    assert "every write to users" in after[2]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_check_names_a_change_trigger_dropped_or_disabled(
    accounts: Accounts, engine: Engine, db_url: str, backend: str, tmp_path: Path
) -> None:
    """A change trigger dropped (a restore that left it out) or, on PostgreSQL, disabled
    (``ALTER TABLE … DISABLE TRIGGER``, left so by an interrupted ``pg_restore
    --disable-triggers``) fails ``provisioner check``'s store line, naming it: edits
    through that table would reach the daemon only at its next full reconcile."""
    config = _checked_config(db_url, tmp_path)
    before = _store_check(config)
    assert before[1], before
    if backend == "postgresql":
        _sql(engine, "ALTER TABLE users DISABLE TRIGGER trg_users_change")
        gone = "trg_users_change (disabled)"
    else:
        _sql(engine, "DROP TRIGGER trg_user_attributes_update")
        gone = "trg_user_attributes_update (missing)"
    after = _store_check(config)
    assert not after[1]
    assert gone in after[2]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_applied_changes_are_pruned_without_a_full_reconcile(
    accounts: Accounts, engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no periodic full reconcile (``reconcile_interval = 0``) the change table still
    shrinks: once enough changes were applied incrementally, they are pruned (all but the
    newest row)."""
    monkeypatch.setattr(daemon_module, "PRUNE_EVERY", 5)
    uid = _add(accounts, "alice")
    daemon = _daemon(engine, db_url, tmp_path)
    for n in range(12):
        _sql(engine, "UPDATE users SET context = :c WHERE id = :i", c=f"c{n}", i=uid)
    try:
        asyncio.run(daemon._run(daemon._incremental))
        assert "context=c11" in Path(daemon.config.target.path).read_text(encoding="utf-8")
        with engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(changes)).scalar_one()
        assert left == 1
    finally:
        daemon.engine.dispose()
