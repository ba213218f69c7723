"""Helpers for the user-store and CLI tests: running the CLI in-process, reading rows back."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, insert, select
from structlog.testing import capture_logs

from provisioner import credentials
from provisioner.accounts import Accounts
from provisioner.cli import main
from provisioner.config import Config, load_config
from provisioner.daemon import Daemon
from provisioner.store.migrate import upgrade
from provisioner.store.schema import users

# Passwords that meet the security suite's policy (argon2 hashing is slow: reuse them).
GOOD_PASSWORD = "Correct-Horse7"
OTHER_PASSWORD = "Battery#Staple9"


@dataclass
class Result:
    """What one in-process CLI run printed and returned."""

    code: int
    out: str
    err: str


@dataclass
class Cli:
    """The ``provisioner`` command line bound to one store, with every run's output kept."""

    url: str
    config: Path
    env: dict[str, str | None] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, input: str | bytes | None = None, verbose: bool = True
    ) -> Result:
        argv = ["--config", str(self.config), "--store-url", self.url]
        if verbose:
            argv.append("-v")
        clean_env: dict[str, str | None] = {
            k: None for k in os.environ if k.startswith("PROVISIONER_")
        }
        clean_env.update(self.env)
        with CliRunner().isolation(input=input, env=clean_env) as (out, err, _mixed):
            code = main([*argv, *args])
            stdout = out.getvalue().decode()
            stderr = err.getvalue().decode()
        self.transcript += [stdout, stderr]
        return Result(code, stdout, stderr)

    def ok(self, *args: str, input: str | None = None) -> str:
        """Run and require exit code 0; return stdout."""
        result = self(*args, input=input)
        assert result.code == 0, (args, result)
        return result.out


def make_cli(url: str, tmp_path: Path, config_text: str = "") -> Cli:
    config = tmp_path / "provisioner.toml"
    config.write_text(config_text, encoding="utf-8")
    return Cli(url, config)


def user_row(engine: Engine, username: str) -> Any:
    """The user's raw row as the database holds it (hashes included)."""
    with engine.connect() as conn:
        return conn.execute(select(users).where(users.c.username_key == username.lower())).one()


def secret_after(text: str, marker: str = "(shown once): ") -> str:
    """The secret printed after ``marker`` on its line."""
    for line in text.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    raise AssertionError(f"no {marker!r} in {text!r}")


def problem_fields(exc: Any) -> Sequence[tuple[str, int | None]]:
    return [(p.field, p.line) for p in exc.problems]


def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real argon2id, with small cost parameters so tests that log in many times stay fast."""
    monkeypatch.setattr(
        credentials, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


def local_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config for a SQLite store, a config-file target and a state directory, all under
    ``tmp_path``; each of ``sections`` adds its keys to (or over) that section's."""
    base: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "target": {"path": str(tmp_path / "pjsip_users.conf")},
        "daemon": {"state_dir": str(tmp_path / "state")},
    }
    for name, keys in sections.items():
        base[name] = {**base.get(name, {}), **keys}
    return load_config(None, env={}, overrides=base)


def local_daemon(tmp_path: Path, **sections: dict[str, Any]) -> Daemon:
    """An in-process daemon of :func:`local_config`, its store migrated, with no wake-up
    source (a test adds the ones it wants)."""
    daemon = Daemon.from_config(local_config(tmp_path, **sections))
    upgrade(daemon.engine)
    daemon.wake_sources = []
    return daemon


def sighup_refused(tmp_path: Path, target_lines: str) -> tuple[str, list[MutableMapping[str, Any]]]:
    """Start an in-process daemon on a config file (SQLite store, config-file target),
    append ``target_lines`` to its ``[target]`` section and reload it as a SIGHUP does;
    assert the reload was refused (one ``config.reload_failed``, no ``config.reloaded``)
    and the daemon kept its configuration and target. The refusal's error and the logs."""
    path = tmp_path / "provisioner.toml"
    base = (
        f"[store]\nurl = 'sqlite:///{tmp_path / 'store.db'}'\n"
        f"[target]\npath = '{tmp_path / 'pjsip_users.conf'}'\n"
    )
    path.write_text(base, encoding="utf-8")
    config = load_config(path, env={})
    daemon = Daemon.from_config(config, config_path=str(path))
    target = daemon.applier.target
    try:
        path.write_text(base + target_lines, encoding="utf-8")
        with capture_logs() as logs:
            asyncio.run(daemon._reload_config())
        (failed,) = [entry for entry in logs if entry["event"] == "config.reload_failed"]
        assert "config.reloaded" not in [entry["event"] for entry in logs]
        assert (daemon.config, daemon.applier.target) == (config, target)
    finally:
        daemon.engine.dispose()
    return str(failed["error"]), logs


def while_another_writer_holds(
    accounts: Accounts, hold: Callable[[Connection], None], act: Callable[[], Any]
) -> BaseException | None:
    """Run ``act`` in a thread while another transaction has written ``hold`` and not yet
    committed; commit it once ``act`` had time to block on it; return what ``act`` raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            act()
        except BaseException as exc:
            raised.append(exc)

    with accounts.engine.connect() as conn:
        tx = conn.begin()
        hold(conn)
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.7)  # the act reads before the commit and writes into its lock
        tx.commit()
    worker.join(timeout=30)
    assert not worker.is_alive()
    return raised[0] if raised else None


def insert_user_copy(conn: Connection, of: str, username: str, extension: str) -> None:
    """Insert, as another writer would by hand, a copy of user ``of``'s row under
    ``username`` and ``extension``."""
    source = conn.execute(select(users).where(users.c.username == of)).mappings().one()
    row = {**source, "username": username, "username_key": username.lower()}
    row["extension"] = extension
    del row["id"]
    conn.execute(insert(users).values(**row))


@contextmanager
def collections_seen(until: Callable[[], bool] = lambda: False) -> Iterator[list[int]]:
    """The generation of each cyclic garbage collection that starts within the block,
    until ``until()`` says so: the collector enabled for the block, after a collection so
    that nothing allocated before counts, and left as it was found."""
    generations: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and not until():
            generations.append(info["generation"])

    was = gc.isenabled()
    gc.enable()
    gc.collect()
    gc.callbacks.append(seen)
    try:
        yield generations
    finally:
        gc.callbacks.remove(seen)
        if not was:
            gc.disable()
