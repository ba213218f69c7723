"""The [[asterisk]] and [ami] configuration sections."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from provisioner.checks import run_checks
from provisioner.config import CACHE_KINDS, Config, load_config
from provisioner.daemon import Daemon
from provisioner.errors import ConfigError
from provisioner.store.migrate import upgrade

from .amipeer import FakeAsterisk, fast_settings, in_a_thread, run


def _load(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "provisioner.toml"
    path.write_text(body)
    return load_config(path, env={})


def test_secret_file_is_read_and_never_shown(tmp_path: Path) -> None:
    """secret_file is read at load time; repr and str of the config never show the secret."""
    (tmp_path / "ami.secret").write_text("t0p-s3cret\n")
    config = load_config(
        None,
        env={},
        overrides={
            "asterisk": [
                {
                    "name": "a",
                    "host": "pbx1",
                    "username": "prov",
                    "secret_file": str(tmp_path / "ami.secret"),
                },
                {
                    "name": "b",
                    "host": "pbx2",
                    "username": "prov",
                    "secret": "other",
                    "sorcery_caches": ["ep_cache"],
                },
            ],
            "ami": {"ping_interval": 3},
        },
    )
    first, second = config.asterisk
    assert first.secret is not None
    assert first.secret.get_secret_value() == "t0p-s3cret"
    assert first.port == 5038
    assert second.sorcery_caches == dict.fromkeys(CACHE_KINDS, ("ep_cache",))
    assert config.ami.ping_interval == 3
    assert "t0p-s3cret" not in repr(config)
    assert "other" not in repr(config.asterisk[1])


def test_a_secret_file_saved_with_a_byte_order_mark_holds_the_secret_without_it(
    tmp_path: Path,
) -> None:
    """A secret_file an editor saved with a UTF-8 byte order mark and a CRLF line end gives
    the secret alone, as Asterisk's manager.conf holds it."""
    (tmp_path / "ami.secret").write_bytes(b"\xef\xbb\xbft0p-s3cret\r\n")
    entry = {"name": "a", "host": "h", "username": "u"}
    config = load_config(
        None,
        env={},
        overrides={"asterisk": [{**entry, "secret_file": str(tmp_path / "ami.secret")}]},
    )
    secret = config.asterisk[0].secret
    assert secret is not None
    assert secret.get_secret_value() == "t0p-s3cret"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"secret": "x", "secret_file": "/nonexistent"}, "exactly one of secret and secret_file"),
        ({}, "exactly one of secret and secret_file"),
        ({"secret_file": "/nonexistent/ami.secret"}, "secret_file: cannot read"),
        ({"secret": "a\r\nAction: Originate"}, "without control characters"),
    ],
)
def test_bad_secrets_are_refused(entry: dict[str, str], expected: str) -> None:
    """A missing, doubled, unreadable or header-injecting secret is a ConfigError."""
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(
            None,
            env={},
            overrides={"asterisk": [{"name": "a", "host": "h", "username": "u", **entry}]},
        )
    assert "Originate" not in str(caught.value)


@pytest.mark.parametrize("host", ["[::1]", "pbx1:5038", "10.0.0.10:5038"])
def test_a_host_in_brackets_or_with_a_port_is_refused_naming_the_field(host: str) -> None:
    """An [[asterisk]] host no connect can resolve (an IPv6 address in brackets, a
    ``host:port``) is refused on its field; a bare IPv6 address, IPv4 address or name loads."""
    entry = {"name": "a", "username": "u", "secret": "s"}
    found = _problems({"asterisk": [{**entry, "host": host}]})
    assert list(found) == ["asterisk.0.host"]
    assert "without brackets" in found["asterisk.0.host"][0]
    for good in ("::1", "10.0.0.10", "pbx1.example.com"):
        config = load_config(None, env={}, overrides={"asterisk": [{**entry, "host": good}]})
        assert config.asterisk[0].host == good


def test_server_names_are_unique(tmp_path: Path) -> None:
    """Two [[asterisk]] entries with one name are refused."""
    body = '[[asterisk]]\nname = "a"\nhost = "h"\nusername = "u"\nsecret = "s"\n' * 2
    with pytest.raises(ConfigError, match="own name"):
        _load(tmp_path, body)


def _problems(overrides: dict[str, object]) -> dict[str, list[str]]:
    """The rules broken by ``overrides``, by field."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={}, overrides=overrides)
    found: dict[str, list[str]] = {}
    for problem in caught.value.problems:
        found.setdefault(problem.field, []).append(problem.rule)
    return found


def test_an_entry_reports_its_secret_problem_beside_its_field_errors() -> None:
    """An [[asterisk]] entry with bad fields and no secret lists the secret problem too."""
    found = _problems(
        {"asterisk": [{"name": "bad name!", "host": "h", "username": "u", "port": 0}]}
    )
    assert set(found) == {"asterisk.0.name", "asterisk.0.port", "asterisk.0.secret"}
    assert found["asterisk.0.secret"] == ["give exactly one of secret and secret_file"]


def test_a_bad_secret_is_reported_beside_field_errors_and_never_shown() -> None:
    """A header-injecting secret is named with the entry's other errors, its value never shown."""
    entry = {"name": "a", "host": "bad host!", "username": "u", "secret": "s3cret\r\nAction: X"}
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={}, overrides={"asterisk": [entry]})
    assert [p.field for p in caught.value.problems] == ["asterisk.0.host", "asterisk.0.secret"]
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(caught.value.problems)


def test_an_unreadable_secret_file_is_reported_beside_field_errors(tmp_path: Path) -> None:
    """An unreadable secret_file is named with the entry's other errors."""
    entry = {"name": "a", "host": "h", "username": "u", "secret_file": str(tmp_path / "none")}
    found = _problems({"asterisk": [{**entry, "timeout": 0}]})
    assert set(found) == {"asterisk.0.timeout", "asterisk.0.secret_file"}
    assert found["asterisk.0.secret_file"][0].startswith("cannot read ")


def test_duplicate_names_are_reported_beside_entry_errors() -> None:
    """Two entries sharing a name are reported even when one of them has another error."""
    entry = {"name": "a", "host": "h", "username": "u", "secret": "s"}
    found = _problems({"asterisk": [entry, {**entry, "port": 0}]})
    assert set(found) == {"asterisk.1.port", "asterisk.1.name"}
    assert "every [[asterisk]] needs its own name" in found["asterisk.1.name"][0]


def test_every_bad_cache_name_is_reported() -> None:
    """Each bad sorcery cache name of an entry is reported, not just the first."""
    entry = {"name": "a", "host": "h", "username": "u", "secret": "s"}
    found = _problems({"asterisk": [{**entry, "sorcery_caches": ["ok", "b d", "c!"]}]})
    [rule] = found["asterisk.0.sorcery_caches"]
    assert "'b d'" in rule
    assert "'c!'" in rule
    assert "'ok'" not in rule


_SERVER = '[[asterisk]]\nname = "a"\nhost = "h"\nusername = "u"\nsecret = "s"\n'


def _caches(tmp_path: Path, value: str) -> dict[str, tuple[str, ...]]:
    """The sorcery_caches of a config file's one server whose entry sets it to ``value``."""
    return _load(tmp_path, f"{_SERVER}sorcery_caches = {value}\n").asterisk[0].sorcery_caches


def test_a_table_of_caches_maps_each_kind_to_its_own_names(tmp_path: Path) -> None:
    """A sorcery_caches table maps each kind to a name or a list of names (each kept once);
    a kind left out, or given no name, has no cache."""
    value = '{ endpoint = "ep_cache", auth = ["auth_cache", "auth_cache"], aor = [] }'
    assert _caches(tmp_path, value) == {"endpoint": ("ep_cache",), "auth": ("auth_cache",)}


def test_a_list_of_caches_fronts_every_kind(tmp_path: Path) -> None:
    """A sorcery_caches list names caches that each front every kind; an empty one, none."""
    assert _caches(tmp_path, '["c1", "c2"]') == dict.fromkeys(CACHE_KINDS, ("c1", "c2"))
    assert _caches(tmp_path, "[]") == {}


def test_a_bad_cache_kind_and_a_bad_cache_name_are_reported_together(tmp_path: Path) -> None:
    """An unknown kind and a badly formed name in a sorcery_caches table are both
    reported, in one error naming the field."""
    body = f'{_SERVER}sorcery_caches = {{ contact = "c", aor = "bad name\\r\\nX: y" }}\n'
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, body)
    [problem] = caught.value.problems
    assert problem.field == "asterisk.0.sorcery_caches"
    assert "'contact' is not a kind a cache fronts (endpoint, auth, aor)" in problem.rule
    assert "cache name 'bad name\\r\\nX: y' (aor) must be" in problem.rule


@pytest.mark.parametrize("value", ['"ep_cache"', "{ endpoint = 5 }", '["ok", "no/slash"]'])
def test_malformed_sorcery_caches_are_refused(tmp_path: Path, value: str) -> None:
    """A sorcery_caches that is neither a list nor a table of valid names is refused."""
    with pytest.raises(ConfigError, match=r"asterisk\.0\.sorcery_caches: "):
        _caches(tmp_path, value)


@pytest.mark.parametrize("source", ["env", "--set"])
def test_a_table_of_caches_can_come_from_the_environment_or_a_flag(source: str) -> None:
    """PROVISIONER_ASTERISK or --set asterisk=... (JSON, as for any table) may give
    sorcery_caches as a table."""
    caches = {"endpoint": "ep_cache", "aor": ["aor_cache"]}
    server = {"name": "a", "host": "h", "username": "u", "secret": "s", "sorcery_caches": caches}
    servers = json.dumps([server])
    if source == "env":
        config = load_config(None, env={"PROVISIONER_ASTERISK": servers})
    else:
        config = load_config(None, env={}, sets=[f"asterisk={servers}"])
    assert config.asterisk[0].sorcery_caches == {
        "endpoint": ("ep_cache",),
        "aor": ("aor_cache",),
    }


def test_server_names_differing_only_in_case_are_refused() -> None:
    """Two [[asterisk]] names that differ only in case are refused: MariaDB's default
    collation holds them equal in the store's keys (registrations, daemon_state)."""
    entry = {"host": "h", "username": "u", "secret": "s"}
    found = _problems({"asterisk": [{**entry, "name": "pbx1"}, {**entry, "name": "PBX1"}]})
    assert found == {
        "asterisk.1.name": [
            "every [[asterisk]] needs its own name (case ignored): asterisk.0 is 'pbx1'"
        ]
    }


@pytest.mark.parametrize("timeout", [0.5, 1.0, 1.9])
def test_a_server_timeout_a_refused_login_would_outlast_is_refused(timeout: float) -> None:
    """A server timeout under 2 s is refused: Asterisk answers a wrong secret only after a
    deliberate 1 s delay, so the login timed out and was retried after the short
    connect-failure backoff instead of login_failure_backoff."""
    entry = {"name": "a", "host": "h", "username": "u", "secret": "s", "timeout": timeout}
    found = _problems({"asterisk": [entry]})
    assert set(found) == {"asterisk.0.timeout"}
    assert "2" in found["asterisk.0.timeout"][0]


def _with_secret_file(tmp_path: Path, peer: FakeAsterisk, mode: int) -> Config:
    """A config whose one server is ``peer``, its secret in a file of ``mode``."""
    secret_file = tmp_path / "ami.secret"
    secret_file.write_text(peer.secret + "\n")
    secret_file.chmod(mode)
    server = {
        "name": "lab",
        "host": "127.0.0.1",
        "port": peer.port,
        "username": peer.username,
        "secret_file": str(secret_file),
        "timeout": 2.0,
    }
    return load_config(
        None,
        env={},
        overrides={
            "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
            "target": {"path": str(tmp_path / "pjsip_users.conf")},
            "daemon": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 2},
            "ami": fast_settings().model_dump(),
            "asterisk": [server],
        },
    )


@pytest.mark.parametrize(
    ("mode", "rule"),
    [
        (0o600, None),
        (0o640, None),
        (0o644, "is readable by others"),
        (0o660, "is writable by group or others"),
    ],
)
def test_check_fails_a_secret_file_others_may_read_or_group_may_write(
    tmp_path: Path, mode: int, rule: str | None
) -> None:
    """`provisioner check` fails a config line naming a secret_file others may read, or
    group or others may write, and the chmod that fixes it (as ssh judges a private key);
    a 0600 or 0640 file passes, and the file is still used (the login succeeds)."""
    with in_a_thread(FakeAsterisk()) as peer:
        config = _with_secret_file(tmp_path, peer, mode)
        checks = run_checks(config)
    path = tmp_path / "ami.secret"
    failed = [detail for name, ok, detail in checks if name == "config" and not ok]
    if rule is None:
        assert failed == []
    else:
        assert failed == [f"secret_file {path} {rule}: chmod 600 (or 640 with a group)"]
    assert ("asterisk lab", True) in [(name, ok) for name, ok, _ in checks]


def test_a_daemon_started_with_a_secret_file_others_may_read_warns_without_the_secret(
    tmp_path: Path,
) -> None:
    """A daemon started with a world-readable secret_file still starts, and logs a warning
    naming the server, the file and the rule, never the secret."""

    async def scenario() -> list[MutableMapping[str, Any]]:
        peer = FakeAsterisk()
        await peer.start()
        daemon = Daemon.from_config(_with_secret_file(tmp_path, peer, 0o644))
        upgrade(daemon.engine)
        daemon.wake_sources = []
        try:
            with capture_logs() as logs:
                await asyncio.wait_for(daemon.serve(burst=True), 10)
        finally:
            await peer.stop()
        return logs

    logs = run(scenario())
    [warned] = [e for e in logs if e["event"] == "config.secret_file_open"]
    assert warned["server"] == "lab"
    assert warned["path"] == str(tmp_path / "ami.secret")
    assert "readable by others" in warned["rule"]
    assert FakeAsterisk().secret not in repr(logs)


def test_check_logs_in_to_every_server_at_once_and_reports_them_in_config_order(
    tmp_path: Path,
) -> None:
    """`provisioner check` with two servers that never answer (a socket that accepts and
    stays silent) and one that logs in takes about one login timeout, not one per
    server, and still reports the servers in the config's order."""
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        with in_a_thread(FakeAsterisk()) as peer:
            config = _with_secret_file(tmp_path, peer, 0o600)
            (lab,) = config.asterisk
            quiet = [
                lab.model_copy(update={"name": f"quiet{i}", "port": s.getsockname()[1]})
                for i, s in enumerate(silent)
            ]
            config = config.model_copy(update={"asterisk": [*quiet, lab]})
            start = time.monotonic()
            checks = run_checks(config)
            took = time.monotonic() - start
    finally:
        for s in silent:
            s.close()
    logins = [(name, ok) for name, ok, _ in checks if name.startswith("asterisk ")]
    assert logins == [
        ("asterisk quiet0", False),
        ("asterisk quiet1", False),
        ("asterisk lab", True),
    ]
    # One server's wait (timeout + 1 s) and some slack; one after another took 6 s.
    assert took < lab.timeout + 1.0 + 1.5, took


def _no_connection() -> Any:
    raise RuntimeError("no connection for this engine")


def test_an_unexpected_error_dropping_the_untold_marker_still_ends_the_shutdown(
    tmp_path: Path,
) -> None:
    """An error other than a store failure while the shutdown drops this run's untold
    marker still leaves the last health record (stopped) and ``daemon.stopped``, and ends
    the daemon as a failed task does (ServiceFailed, exit 10) instead of skipping both."""
    from sqlalchemy import create_engine

    from provisioner.errors import ServiceFailed
    from provisioner.health import read_health

    from .amipeer import eventually

    async def scenario() -> list[MutableMapping[str, Any]]:
        peer = FakeAsterisk()
        await peer.start()
        daemon = Daemon.from_config(_with_secret_file(tmp_path, peer, 0o600))
        upgrade(daemon.engine)
        daemon.wake_sources = []
        store = daemon.engine
        try:
            with capture_logs() as logs:
                serving = asyncio.ensure_future(daemon.serve())
                pbx = daemon.pbx
                assert pbx is not None
                await eventually(lambda: daemon.health.ready and pbx.idle())
                # An engine whose connections fail with an error that is no store failure.
                daemon.engine = create_engine("sqlite://", creator=_no_connection)
                daemon.handle_exit()
                with pytest.raises(ServiceFailed, match="no connection for this engine"):
                    await serving
        finally:
            store.dispose()
            await peer.stop()
        return logs

    logs = run(scenario())
    assert any(e["event"] == "daemon.stopped" for e in logs)
    assert any(e["event"] == "daemon.task_failed" for e in logs)
    health = read_health(tmp_path / "state")
    assert health is not None
    assert health.stopped_at is not None
