"""Crash safety: SIGKILL at each step of an apply, and a full disk.

A subprocess (``tests/crash_driver.py``) runs the real reconcile and kills itself at a
named step.  Afterwards the config file is always the whole old or the whole new file
(parsed as Asterisk parses it), realtime rows are the old or the new set, and the next
``sync --once`` converges (``render --dry-run`` shows no change).  A disk too small for the
new file gives a clear error, keeps the last good file and leaves no temporary file.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from provisioner.accounts import Accounts, Policy
from provisioner.errors import TargetWriteFailed
from provisioner.store.engine import open_engine
from provisioner.targets.asterisk_schema import OWNED_KINDS

from .dbs import temp_database
from .faultkit import PYTHON, cli, endpoints, env, sections, seed_store, store_url, write_config

DRIVER = str(Path(__file__).with_name("crash_driver.py"))
NO_CHANGE = "would be added 0, would be updated 0, would be removed 0"


def _drive(config: Path, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, DRIVER, str(config), step],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        cwd=str(Path(DRIVER).parent.parent),
    )


def _edit_store(engine: Engine) -> None:
    """The change the interrupted apply was making: edits, a disable, two new users."""
    acc = Accounts(engine, Policy(password_policy=False))
    for name in ("u0", "u1", "u2"):
        acc.edit_user(name, {"nat": "yes", "full_name": f"Edited {name}"})
    acc.disable(["u3"])
    for name in ("n0", "n1"):
        acc.add_user(
            {"username": name, "full_name": "New", "email": f"{name}@e.com", "profile": "agents"}
        )


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("step", ["temp_written", "backup_made", "renamed", "applied"])
def test_config_file_is_whole_old_or_whole_new_after_sigkill(tmp_path: Path, step: str) -> None:
    """SIGKILL at each step of a file apply leaves the whole old or the whole new file;
    the next sync converges and a dry run then shows no change."""
    engine = seed_store(store_url(tmp_path), 8)
    config = write_config(tmp_path)
    conf = tmp_path / "pjsip_users.conf"
    cli(config, "sync", "--once")
    old = sections(conf)
    _edit_store(engine)
    engine.dispose()

    ran = _drive(config, step)
    assert ran.returncode == -signal.SIGKILL, ran.stderr
    after_kill = sections(conf)
    leftovers = _temps(tmp_path)
    assert len(leftovers) <= 1
    for temp in leftovers:  # a killed writer's temporary file: never readable by others
        assert temp.stat().st_mode & 0o007 == 0

    cli(config, "sync", "--once")
    new = sections(conf)
    assert new != old
    assert after_kill in (old, new)
    if step in ("renamed", "applied"):
        assert after_kill == new
    else:
        assert after_kill == old
    assert NO_CHANGE in cli(config, "render", "--dry-run").out
    assert sections(conf.with_name(conf.name + ".bak")) in (old, new)


def _rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            kind: [tuple(r) for r in conn.execute(select(t).order_by(t.c.id))]
            for kind, t in OWNED_KINDS.items()
        }


@pytest.fixture(params=["sqlite", "postgresql"])
def rt_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield store_url(tmp_path)
        return
    with temp_database("postgresql", tmp_path) as url:
        yield url


@pytest.mark.parametrize("step", ["rows_written", "before_commit", "applied"])
def test_realtime_rows_are_old_or_new_set_after_sigkill(
    tmp_path: Path, rt_url: str, step: str
) -> None:
    """SIGKILL inside the realtime transaction leaves the old rows (before commit) or the
    new ones; the next sync converges."""
    engine = seed_store(rt_url, 8)
    config = write_config(tmp_path, store_url=rt_url, kind="realtime")
    cli(config, "sync", "--once")
    old = _rows(engine)
    _edit_store(engine)
    engine.dispose()

    ran = _drive(config, step)
    assert ran.returncode == -signal.SIGKILL, ran.stderr
    engine = open_engine(rt_url)
    try:
        after_kill = _rows(engine)
        cli(config, "sync", "--once")
        new = _rows(engine)
    finally:
        engine.dispose()
    assert new != old
    assert after_kill == (new if step == "applied" else old)
    assert NO_CHANGE in cli(config, "render", "--dry-run").out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_keeps_the_last_good_file(tmp_path: Path, small_disk: Path) -> None:
    """A file too big for the disk: exit 9 saying no space, the last good file intact,
    no temporary file left behind; once there is room the sync goes through."""
    engine = seed_store(store_url(tmp_path), 10)
    config = write_config(tmp_path)
    conf = small_disk / "p.conf"
    config.write_text(config.read_text().replace(str(tmp_path / "pjsip_users.conf"), str(conf)))
    cli(config, "sync", "--once")
    good = conf.read_bytes()
    assert len(endpoints(conf)) == 11
    acc = Accounts(engine, Policy(password_policy=False))
    for i in range(120):
        acc.add_user(
            {"username": f"big{i}", "full_name": "Big", "email": f"b{i}@e.com", "profile": "agents"}
        )
    engine.dispose()

    ran = cli(config, "sync", "--once", check=False)
    assert ran.code == TargetWriteFailed.exit_code, ran
    assert "No space left on device" in ran.err
    assert str(conf) in ran.err
    assert "Traceback" not in ran.err
    assert conf.read_bytes() == good
    assert _temps(small_disk) == []

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    cli(config, "sync", "--once")
    assert len(endpoints(conf)) == 131
