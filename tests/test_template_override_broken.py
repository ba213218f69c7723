"""A broken operator template override, with the daemon as a real subprocess on a SQLite
store and a real config file: every user edit is held back (``sync.failed``), the last
good file stays, and ``check`` and the health record say why, until the template is fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .faultkit import (
    Daemon,
    agent_args,
    cli,
    endpoints,
    seed_store,
    store_url,
    until,
    write_config,
)

#: (what the override header.j2 is broken to, the error every apply and check then gives).
_BROKEN = [
    pytest.param(
        "{{ no_such_name }}\n",
        "templates failed to render (UndefinedError) at header.j2 line 1",
        id="fails-to-render",
    ),
    pytest.param(
        '#include "other.conf"\n',
        "the rendered file does not hold exactly the intended objects:"
        " line 1 holds a #include directive",
        id="fails-the-parse-back-check",
    ),
]


def _configured(tmp: Path, overrides: Path) -> Path:
    """A config file as :func:`write_config` writes it, ``target.templates`` ``overrides``."""
    config = write_config(tmp)
    setting = f'[target]\ntemplates = "{overrides}"\n'
    config.write_text(config.read_text().replace("[target]\n", setting))
    return config


def _failed(daemon: Daemon) -> list[str]:
    """The ``error`` of each ``sync.failed`` logged so far."""
    return [e["error"] for e in daemon.logged("sync.failed")]


def _retried(daemon: Daemon) -> list[tuple[str, int]]:
    """The ``error`` and ``failures`` of each ``sync.still_failing`` logged so far."""
    return [(e["error"], e["failures"]) for e in daemon.logged("sync.still_failing")]


@pytest.mark.parametrize(("broken", "error"), _BROKEN)
def test_a_broken_override_holds_back_every_edit_until_it_is_fixed(
    tmp_path: Path, broken: str, error: str
) -> None:
    """An override header.j2 edited so it fails to render (or renders a file that fails the
    parse-back check) fails the re-render and every later apply: a user added meanwhile
    is not written, each apply of new work that meets it (the re-render's, the edit's)
    logs sync.failed with the error, a poll's retry of the same work only
    sync.still_failing (at the 2nd, 4th, 8th... try: not an error every poll), the last
    good file stays byte for byte, the health record and check's target and daemon lines
    say the error; once the template is fixed, the held user is written at once,
    sync.recovered is said and check passes."""
    seed_store(store_url(tmp_path), 1).dispose()
    overrides = tmp_path / "templates"
    overrides.mkdir()
    header = overrides / "header.j2"
    header.write_text("; site header v1\n")
    config = _configured(tmp_path, overrides)
    conf = tmp_path / "pjsip_users.conf"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: conf.exists() and conf.read_text().startswith("; site header v1"), 10)
        good, held = conf.read_bytes(), len(endpoints(conf))
        header.write_text(broken)
        until(lambda: bool(_failed(daemon)), 10, "the re-render failed")
        cli(config, *agent_args("alice"))
        until(lambda: len(_failed(daemon)) >= 2, 10, "the edit's apply failed")
        until(lambda: bool(_retried(daemon)), 10, "the held edit tried again at a poll")
        # The poll's retry of the same work is no news: one line, not another error.
        assert _failed(daemon) == [error, error]
        assert _retried(daemon)[0] == (error, 2)
        assert {e["level"] for e in daemon.logged("sync.failed")} == {"error"}
        assert conf.read_bytes() == good
        health = daemon.health()
        assert health is not None
        assert (health["last_sync_ok"], health["last_error"]) == (False, error)
        checked = cli(config, "check", check=False)
        assert checked.code == 1
        lines = checked.out.splitlines()
        assert f"FAIL  target: {error}" in lines
        assert f"FAIL  daemon: last sync failed: {error}" in lines
        header.write_text("; site header v2\n")
        until(lambda: len(endpoints(conf)) == held + 1, 10, "the held user written")
        assert conf.read_text().startswith("; site header v2")
        until(lambda: bool((daemon.health() or {}).get("last_sync_ok")), 10, "record says ok")
        assert daemon.logged("sync.recovered")
        fixed = cli(config, "check", check=False)
        assert fixed.code == 0, fixed.out
    finally:
        assert daemon.stop() == 0
