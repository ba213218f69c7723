"""The daemon notes a removed endpoint's contact removals before it writes the target.

A kill -9 between the target's write and the AMI side's own note (written in the
registration flusher's turn, which can wait behind a storm) used to lose the removal
for good: the disabled user's phone stayed registered (found by the kill -9 end-to-end
test). These tests run the daemon's real applier on a real SQLite store and config file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from provisioner import daemon as daemon_module
from provisioner.accounts import Accounts, Policy
from provisioner.ami.changes import owed_removal_key, owed_removals_prefix
from provisioner.config import load_config
from provisioner.daemon import Daemon
from provisioner.store.engine import reading
from provisioner.store.migrate import upgrade
from provisioner.store.schema import users
from provisioner.store.state import load_states
from provisioner.targets.asterisk_schema import ps_endpoints
from tests.faultkit import cli

_SERVERS = [
    {"name": name, "host": "127.0.0.1", "port": 1, "username": "u", "secret": "s"}
    for name in ("pbx1", "pbx2")
]


def _daemon_with_two_agents(tmp_path: Path, kind: str = "config") -> tuple[Daemon, Path]:
    """A daemon on a config file (or ``kind`` ``realtime``: rows in its SQLite store), two
    Asterisk servers configured (never connected: only the applier runs), its store
    holding agents ``a0`` and ``a1`` (1001 and 1002), both applied."""
    config = load_config(
        None,
        env={},
        overrides={
            "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
            "target": {"kind": kind, "path": str(tmp_path / "pjsip_users.conf")},
            "daemon": {"state_dir": str(tmp_path / "state")},
            "asterisk": _SERVERS,
        },
    )
    daemon = Daemon.from_config(config)
    upgrade(daemon.engine)
    acc = Accounts(daemon.engine, Policy(password_policy=False))
    acc.add_profile("agents", "Agents")
    acc.add_user(
        {"username": "root", "role": "admin", "full_name": "Root", "email": "root@example.com"}
    )
    for i in range(2):
        acc.add_user(
            {
                "username": f"a{i}",
                "full_name": f"A {i}",
                "email": f"a{i}@example.com",
                "profile": "agents",
                "extension": f"100{i + 1}",
            }
        )
    daemon.applier.full()
    conf = Path(daemon.config.target.path)
    if kind == "config":
        assert "[1001]" in conf.read_text()
        assert "[1002]" in conf.read_text()
    return daemon, conf


def _noted(daemon: Daemon) -> dict[str, dict[str, str]]:
    """The removal notes of each configured server, by key."""
    with reading(daemon.engine) as conn:
        return {s: load_states(conn, owed_removals_prefix(s)) for s in ("pbx1", "pbx2")}


def _spy(daemon: Daemon, conf: Path) -> list[tuple[Sequence[str], str, dict[str, dict[str, str]]]]:
    """Record, at each call of the applier's ``before_removing``, the endpoints, the
    target's text then and (after the real hook ran) the store's removal notes."""
    calls: list[tuple[Sequence[str], str, dict[str, dict[str, str]]]] = []
    hook = daemon.applier.before_removing
    assert hook is not None

    def spy(endpoints: Sequence[str], in_write: bool) -> None:
        text = conf.read_text()
        hook(endpoints, in_write)
        calls.append((list(endpoints), text, _noted(daemon)))

    daemon.applier.before_removing = spy
    return calls


def _disable(daemon: Daemon, username: str) -> int:
    with daemon.engine.begin() as conn:
        row = conn.execute(
            update(users)
            .where(users.c.username == username)
            .values(disabled=True)
            .returning(users.c.id)
        ).scalar_one()
    return int(row)


def test_a_disable_notes_its_removal_for_every_server_before_the_file_loses_it(
    tmp_path: Path,
) -> None:
    """An edit's apply that removes an endpoint notes its contact removal owed to each
    configured server while the file still holds the endpoint; nothing for the others."""
    daemon, conf = _daemon_with_two_agents(tmp_path)
    try:
        calls = _spy(daemon, conf)
        daemon.applier.users_changed([_disable(daemon, "a0")])
        ((endpoints, text_then, noted),) = calls
        assert endpoints == ["1001"]
        assert "[1001]" in text_then  # not written yet
        assert noted == {s: {owed_removal_key(s, "1001"): "1001"} for s in ("pbx1", "pbx2")}
        assert "[1001]" not in conf.read_text()
        assert "[1002]" in conf.read_text()
    finally:
        daemon.engine.dispose()


def test_a_full_reconcile_notes_its_removals_before_writing_an_update_or_plan_none(
    tmp_path: Path,
) -> None:
    """A full reconcile that removes an endpoint notes its removal before the file is
    written; one that only updates (and a plan, a dry run) notes nothing."""
    daemon, conf = _daemon_with_two_agents(tmp_path)
    try:
        calls = _spy(daemon, conf)
        with daemon.engine.begin() as conn:
            conn.execute(update(users).where(users.c.username == "a1").values(context="other"))
        daemon.applier.full()
        assert calls == []
        _disable(daemon, "a1")
        daemon.applier.plan()
        assert calls == []
        daemon.applier.full()
        ((endpoints, text_then, noted),) = calls
        assert endpoints == ["1002"]
        assert "[1002]" in text_then
        assert noted["pbx1"] == {owed_removal_key("pbx1", "1002"): "1002"}
        assert "[1002]" not in conf.read_text()
    finally:
        daemon.engine.dispose()


def _endpoint_rows(daemon: Daemon) -> list[str]:
    with reading(daemon.engine) as conn:
        return sorted(conn.execute(select(ps_endpoints.c.id)).scalars())


def test_a_full_apply_of_realtime_rows_in_the_store_notes_its_removals_in_the_same_write(
    tmp_path: Path,
) -> None:
    """A full apply removing realtime rows from the store's own SQLite database notes the
    contact removals within that write's transaction (a transaction of its own would
    wait for the write's lock in vain), committed with the rows."""
    daemon, _conf = _daemon_with_two_agents(tmp_path, kind="realtime")
    try:
        assert _endpoint_rows(daemon) == ["1000", "1001", "1002"]
        target = daemon.applier.target
        hook = daemon.applier.before_removing
        assert hook is not None
        seen: list[tuple[Sequence[str], bool, bool]] = []

        def spy(endpoints: Sequence[str], in_write: bool) -> None:
            seen.append((list(endpoints), in_write, getattr(target, "writing", None) is not None))
            hook(endpoints, in_write)

        daemon.applier.before_removing = spy
        _disable(daemon, "a1")
        daemon.applier.full()
        assert seen == [(["1002"], True, True)]
        assert _endpoint_rows(daemon) == ["1000", "1001"]
        assert _noted(daemon)["pbx2"] == {owed_removal_key("pbx2", "1002"): "1002"}
    finally:
        daemon.engine.dispose()


def _config_file(daemon: Daemon, tmp_path: Path) -> Path:
    """A config file for the CLI: ``daemon``'s store and file, and its two servers."""
    lines = [
        "[store]",
        f'url = "{daemon.config.store.url}"',
        "[security]",
        "password_policy = false",
        "[target]",
        f'path = "{daemon.config.target.path}"',
    ]
    for server in _SERVERS:
        # JSON's strings and numbers are TOML's too.
        lines += ["[[asterisk]]", *(f"{k} = {json.dumps(v)}" for k, v in server.items())]
    path = tmp_path / "provisioner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sync_once_notes_its_removals_before_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``provisioner sync --once`` removing a disabled user's endpoint notes its contact
    removals for every configured server while the file still holds the endpoint (its
    real noter, seen at each call), and they stay noted for the next daemon."""
    daemon, conf = _daemon_with_two_agents(tmp_path)
    config = _config_file(daemon, tmp_path)
    seen: list[tuple[str, dict[str, dict[str, str]]]] = []
    real = daemon_module.removal_noter

    def watched(*args: Any) -> Callable[[Sequence[str], bool], None]:
        noter = real(*args)

        def note(endpoints: Sequence[str], in_write: bool) -> None:
            noter(endpoints, in_write)
            seen.append((conf.read_text(), _noted(daemon)))

        return note

    monkeypatch.setattr(daemon_module, "removal_noter", watched)
    try:
        _disable(daemon, "a0")
        cli(config, "sync", "--once")
        ((text_then, noted),) = seen
        assert "[1001]" in text_then
        assert noted == {s: {owed_removal_key(s, "1001"): "1001"} for s in ("pbx1", "pbx2")}
        assert "[1001]" not in conf.read_text()
        assert _noted(daemon)["pbx2"] == {owed_removal_key("pbx2", "1001"): "1001"}
    finally:
        daemon.engine.dispose()
