"""A database URL whose parameters its driver refuses (a bad value, an unknown argument)
is a configuration problem naming its key, never a traceback or a daemon restarted for it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from provisioner import config as config_module
from provisioner.config import load_config
from provisioner.errors import ConfigError

from .faultkit import PROVISIONER, cli, env, write_config
from .helpers import make_cli, sighup_refused

#: URLs whose driver refuses them at the first connect, before any byte reaches a server
#: (pymysql: an unknown charset, an unknown argument; libpq: an unknown option), with the
#: driver's words each refusal shows.  Each holds a password that must never be shown.
REFUSED_AT_CONNECT = {
    "pymysql-charset": (
        "mysql+pymysql://root:hunter2@127.0.0.1:3306/mysql?charset=bogus",
        "AttributeError: 'NoneType' object has no attribute 'encoding'",
    ),
    "pymysql-argument": (
        "mysql+pymysql://root:hunter2@127.0.0.1:3306/mysql?bogusarg=1",
        "TypeError: Connection.__init__() got an unexpected keyword argument 'bogusarg'",
    ),
    "psycopg-argument": (
        "postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/postgres?bogusarg=1",
        'ProgrammingError: invalid connection option "bogusarg"',
    ),
}


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")


@pytest.mark.parametrize("section", ["store", "target"])
@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("sqlite:///x.db?timeout=abc", "ValueError: could not convert string to float: 'abc'"),
        (
            "mysql+pymysql://app:hunter2@db/users?connect_timeout=abc",
            "ValueError: invalid literal for int() with base 10: 'abc'",
        ),
    ],
)
def test_a_parameter_the_driver_cannot_read_is_refused_at_load(
    section: str, url: str, said: str
) -> None:
    """A URL parameter SQLAlchemy cannot convert for its driver is a config problem on that
    key at load, in the driver's words, never showing the password."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {"url": url}})
    (problem,) = info.value.problems
    assert problem.field == f"{section}.url"
    assert problem.rule.startswith("its driver cannot take its parameters: "), problem.rule
    assert said in problem.rule
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("url", "said"), REFUSED_AT_CONNECT.values(), ids=REFUSED_AT_CONNECT)
def test_a_store_url_the_driver_refuses_at_connect_exits_as_bad_configuration(
    tmp_path: Path, url: str, said: str
) -> None:
    """A store URL whose driver refuses its parameters at the first connect ends a command
    with exit 2 and the store.url problem in the driver's words, no traceback, no
    password."""
    result = make_cli(url, tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')("user", "list")
    assert result.code == 2, result
    assert "hunter2" not in result.out + result.err
    # The password on the command line is warned of first (config.secret_on_command_line).
    warning, *lines = result.err.splitlines()
    assert '"config.secret_on_command_line"' in warning, result
    assert lines[0] == "error: invalid configuration", result
    assert lines[1].startswith("  store.url: its driver refused its parameters ("), result
    assert lines[1].endswith(said), result
    assert "Traceback" not in result.err


@pytest.mark.parametrize(("url", "said"), REFUSED_AT_CONNECT.values(), ids=REFUSED_AT_CONNECT)
def test_check_fails_the_store_line_for_a_url_the_driver_refuses(
    tmp_path: Path, url: str, said: str
) -> None:
    """``provisioner check`` fails its store line naming store.url and the driver's words
    (exit 1, every other line still printed), not a traceback."""
    result = make_cli(url, tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')("check")
    assert result.code == 1, result
    assert "hunter2" not in result.out + result.err
    (store,) = [line for line in result.out.splitlines() if " store: " in line]
    assert store.startswith("FAIL  store: store.url: its driver refused its parameters ("), store
    assert store.endswith(said), store
    assert [line.split(":")[0] for line in result.out.splitlines()] == [
        "ok    config",
        "FAIL  store",
        "ok    target",
        "ok    asterisk",
        "ok    daemon",
    ], result
    # Only the warning of the password given on the command line.
    (warning,) = result.err.splitlines()
    assert '"config.secret_on_command_line"' in warning, result


def test_check_fails_the_target_line_for_a_target_url_the_driver_refuses(tmp_path: Path) -> None:
    """``provisioner check`` with a realtime ``target.url`` its driver refuses fails the
    target line naming target.url."""
    url, said = REFUSED_AT_CONNECT["pymysql-charset"]
    config = write_config(tmp_path, kind="realtime")
    cli(config, "db", "upgrade")
    ran = cli(config, "--set", f"target.url={url}", "check", check=False)
    assert ran.code == 1, ran
    (target,) = [line for line in ran.out.splitlines() if " target: " in line]
    assert target.startswith("FAIL  target: target.url: its driver refused its parameters ("), ran
    assert target.endswith(said), target


def _run_daemon(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``provisioner run`` as systemd starts it (a real process), given 30 s to end."""
    return subprocess.run(
        [PROVISIONER, "--config", str(config), *flags, "run"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )


@pytest.mark.parametrize("key", ["store.url", "target.url"])
def test_run_exits_2_for_a_url_the_driver_refuses(tmp_path: Path, key: str) -> None:
    """The daemon whose store.url (or realtime target.url) its driver refuses exits at once
    with 2, which the unit's RestartPreventExitStatus keeps from being restarted, and says
    the key and the driver's words; not exit 10 (restarted forever) nor running unhealthy."""
    url, said = REFUSED_AT_CONNECT["pymysql-charset"]
    config = write_config(tmp_path, kind="realtime")
    cli(config, "db", "upgrade")
    started = time.monotonic()
    ran = _run_daemon(config, "--set", f"{key}={url}")
    took = time.monotonic() - started
    assert ran.returncode == 2, ran
    assert took < 15, took
    assert "hunter2" not in ran.stdout + ran.stderr
    errors = [line for line in ran.stderr.splitlines() if not line.startswith("{")]
    assert errors[0] == "error: invalid configuration", ran.stderr
    assert errors[1].startswith(f"  {key}: its driver refused its parameters ("), ran.stderr
    assert errors[1].endswith(said), ran.stderr


def test_a_refusal_never_quotes_a_password_of_the_url() -> None:
    """A driver's message that quotes a password of the URL (before the '@' or a
    ``?password=`` parameter) shows it as ``***``; a character it cannot encode is not
    quoted at all."""
    url = "mysql+pymysql://app:hunter2@db/users?password=hunter3"
    said = config_module.driver_refusal(ValueError("bad 'hunter2' or 'hunter3'\nmore"), url)
    assert said == "ValueError: bad '***' or '***'"
    encode = UnicodeEncodeError("latin-1", "pass\u20acword", 4, 5, "ordinal not in range(256)")
    said = config_module.driver_refusal(encode, url)
    assert said == "UnicodeEncodeError: the latin-1 codec: ordinal not in range(256)"


def test_a_sighup_naming_a_target_url_the_driver_refuses_keeps_the_old_target(
    tmp_path: Path,
) -> None:
    """A SIGHUP switching to a realtime ``target.url`` whose driver refuses its parameters
    is refused as a bad configuration (``config.reload_failed`` naming target.url and the
    driver's words), and the daemon keeps its target and configuration."""
    url, said = REFUSED_AT_CONNECT["pymysql-argument"]
    error, logs = sighup_refused(tmp_path, f"kind = 'realtime'\nurl = '{url}'\n")
    assert error.startswith("target.url: its driver refused its parameters ("), error
    assert error.endswith(said), error
    assert "hunter2" not in repr(logs)
