"""Config loading: defaults < one TOML file < environment < flags, every problem at once."""

from __future__ import annotations

import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from provisioner import config as config_module
from provisioner.config import Config, StoreSettings, TargetSettings, load_config
from provisioner.errors import ConfigError, InvalidInput
from provisioner.model import TRANSPORT_NAME_RULE
from provisioner.pjsip import RenderSettings, render_user
from provisioner.store.engine import open_engine

from .dbs import temp_database
from .helpers import make_cli
from .test_configfile import make_user


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The machine's /etc/provisioner/provisioner.toml must not leak into these tests.
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")


def _write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_file() -> None:
    """With no file, no environment and no flags the embedded defaults apply."""
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.store.url == "sqlite:///var/provisioner.db"
    assert cfg.security.password_policy is True
    assert cfg.security.max_failed_logins == 5
    assert (cfg.extensions.first, cfg.extensions.last) == (1000, 9999)


def test_file_then_env_then_flags_win_in_order(tmp_path: Path) -> None:
    """A key set in the file is beaten by the environment, which is beaten by a flag."""
    path = _write(
        tmp_path,
        '[store]\nurl = "sqlite:///file.db"\n'
        "[extensions]\nfirst = 500\nlast = 599\n"
        "[security]\nmax_failed_logins = 7\n",
    )
    env = {"PROVISIONER_STORE__URL": "sqlite:///env.db", "PROVISIONER_EXTENSIONS__FIRST": "520"}
    cfg = load_config(path, env=env, overrides={"extensions": {"first": "530"}})
    assert cfg.store.url == "sqlite:///env.db"  # env beats file
    assert cfg.extensions.first == 530  # flag beats env and file
    assert cfg.extensions.last == 599  # file beats default
    assert cfg.security.max_failed_logins == 7
    assert cfg.source == str(path)


def test_config_path_from_environment(tmp_path: Path) -> None:
    """Without --config the file named by PROVISIONER_CONFIG is read."""
    path = _write(tmp_path, "[sip]\nrealm = 'pbx.example.com'\n")
    cfg = load_config(env={"PROVISIONER_CONFIG": str(path)})
    assert cfg.sip.realm == "pbx.example.com"
    assert cfg.source == str(path)


def test_acting_admin_in_the_environment_is_no_config_key() -> None:
    """PROVISIONER_AS (the CLI's --as) is not read as a config key, so it breaks no config."""
    assert load_config(env={"PROVISIONER_AS": "boss"}).sip.realm == "asterisk"


def test_explicit_path_beats_environment_path(tmp_path: Path) -> None:
    """--config wins over PROVISIONER_CONFIG."""
    a = _write(tmp_path, "[sip]\nrealm = 'a'\n", "a.toml")
    b = _write(tmp_path, "[sip]\nrealm = 'b'\n", "b.toml")
    assert load_config(a, env={"PROVISIONER_CONFIG": str(b)}).sip.realm == "a"


def test_an_empty_config_path_is_refused_not_taken_for_none(tmp_path: Path) -> None:
    """``--config ""`` (a script's unset variable) is a config problem naming the empty file
    name, not a silent fall back to PROVISIONER_CONFIG, the system file or the defaults."""
    other = _write(tmp_path, "[sip]\nrealm = 'other'\n")
    with pytest.raises(ConfigError) as info:
        load_config("", env={"PROVISIONER_CONFIG": str(other)})
    assert [str(p) for p in info.value.problems] == ["config: the file name is empty"]


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_config_variable_is_refused_not_taken_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """``PROVISIONER_CONFIG`` set but empty (a unit's ``Environment=`` whose variable was
    never expanded) is a config problem naming the variable, as an empty ``--config`` is,
    not a silent fall back to the system file or the defaults (a store and a target of
    their own under the working directory); ``--config`` still wins over it."""
    system = _write(tmp_path, "[sip]\nrealm = 'system'\n", "system.toml")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", system)
    with pytest.raises(ConfigError) as info:
        load_config(env={"PROVISIONER_CONFIG": value, "PROVISIONER_SIP__REALM": "x y"})
    assert [str(p) for p in info.value.problems] == [
        "PROVISIONER_CONFIG: is set but empty: name the file, or unset it to read "
        f"{config_module.DEFAULT_CONFIG_PATH} (if it exists)"
    ]
    named = _write(tmp_path, "[sip]\nrealm = 'named'\n")
    assert load_config(named, env={"PROVISIONER_CONFIG": value}).sip.realm == "named"


def test_default_system_path_is_used_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither --config nor PROVISIONER_CONFIG the system file is read when it exists."""
    system = _write(tmp_path, "[log]\nlevel = 'debug'\n", "system.toml")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", system)
    cfg = load_config(env={})
    assert cfg.log.level == "debug"
    assert cfg.source == str(system)


def test_a_system_path_that_cannot_be_looked_at_is_a_config_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When whether the system file exists cannot be told (its directory is not searchable
    by a monitoring user, EACCES; here a name too long, ENAMETOOLONG, as root may search
    every directory), that is a config problem naming the file, not a traceback."""
    system = tmp_path / ("x" * 300) / "provisioner.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", system)
    with pytest.raises(ConfigError) as info:
        load_config(env={})
    assert [str(p) for p in info.value.problems] == [
        f"config: cannot read {str(system)!r}: File name too long"
    ]


def test_env_values_are_typed_and_json_tables_decoded() -> None:
    """Env strings become booleans, numbers and tables as each key needs."""
    env = {
        "PROVISIONER_SECURITY__PASSWORD_POLICY": "false",
        "PROVISIONER_SECURITY__LOCK_MINUTES": "0",
        "PROVISIONER_TARGET__TRANSPORTS": '{"udp": "my-udp"}',
    }
    cfg = load_config(env=env)
    assert cfg.security.password_policy is False
    assert cfg.security.lock_minutes == 0
    assert cfg.target.transports["udp"] == "my-udp"
    assert cfg.target.transports["tls"] == "transport-tls"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Unknown keys, wrong types and broken rules from file, env and flags come in one error."""
    path = _write(
        tmp_path,
        "colour = 'blue'\n"
        "[store]\nurl = 'not a url'\nbusy_timeout = -1\n"
        "[security]\nmax_failed_logins = 'many'\n"
        "[extensions]\nfirst = -5\n",
    )
    env = {"PROVISIONER_SIP__REALM": "bad realm!", "PROVISIONER_STORE__POOL": "3"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, overrides={"log": {"level": "loud"}})
    found = {p.field: p.rule for p in info.value.problems}
    assert set(found) == {
        "colour",
        "store.url",
        "store.busy_timeout",
        "store.pool",
        "security.max_failed_logins",
        "extensions.first",
        "sip.realm",
        "log.level",
    }
    assert found["colour"] == "is not a known setting"
    assert found["store.pool"] == "is not a known setting (from PROVISIONER_STORE__POOL)"
    assert "SQLAlchemy database URL" in found["store.url"]
    assert "greater than 0" in found["store.busy_timeout"]
    assert "integer" in found["security.max_failed_logins"]
    assert "'debug', 'info', 'warning' or 'error'" in found["log.level"]
    assert info.value.exit_code == 2


def test_set_flag_problems_come_with_every_other_problem(tmp_path: Path) -> None:
    """Unreadable --set flags are listed in one error with the file's, env's and flags' problems."""
    path = _write(tmp_path, "colour = 'blue'\n[store]\nbusy_timeout = -1\n")
    env = {"PROVISIONER_SIP__REALM": "bad realm!"}
    sets = ["nokey", "target.transports={broken", "=x", "log.level=loud", "store.pool=3"]
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, sets=sets)
    fields = [p.field for p in info.value.problems]
    assert fields == [
        "--set",
        "--set",
        "--set",
        "store.busy_timeout",
        "store.pool",
        "sip.realm",
        "log.level",
        "colour",
    ]
    rules = [p.rule for p in info.value.problems]
    assert rules[0] == "'nokey' must look like section.key=value"
    assert rules[1].startswith("'target.transports=…': the value is not valid JSON")


def test_a_true_or_false_for_a_number_is_refused_not_read_as_1_or_0(tmp_path: Path) -> None:
    """A TOML boolean where a number belongs (``max_failed_logins = true``) is refused naming
    each such key, not taken as 1 or 0 (a lock after one failed login)."""
    path = _write(
        tmp_path,
        "[security]\nmax_failed_logins = true\n[daemon]\nquiet = false\n"
        '[[asterisk]]\nname = "a"\nhost = "h"\nusername = "u"\nsecret = "s"\nport = true\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [p.field for p in info.value.problems] == [
        "security.max_failed_logins",
        "daemon.quiet",
        "asterisk.0.port",
    ]


def test_set_flags_are_applied_over_overrides() -> None:
    """A --set flag beats the same key in the environment and in ``overrides``."""
    cfg = load_config(
        env={"PROVISIONER_EXTENSIONS__FIRST": "510"},
        overrides={"extensions": {"first": 520}},
        sets=["extensions.first=530", 'target.transports={"udp": "u"}'],
    )
    assert cfg.extensions.first == 530
    assert cfg.target.transports["udp"] == "u"


def test_set_flag_problems_come_with_a_file_problem(tmp_path: Path) -> None:
    """A file that is not TOML is reported together with the unreadable --set flags."""
    path = _write(tmp_path, "[store\nurl=")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, sets=["nokey"])
    assert [p.field for p in info.value.problems] == ["--set", "config"]


def test_extension_range_must_be_ordered() -> None:
    """extensions.last below extensions.first is reported with both keys named."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"extensions": {"first": 200, "last": 100}})
    (problem,) = info.value.problems
    assert problem.field == "extensions.last"
    assert problem.rule == "must be at least extensions.first (200)"


def test_extension_order_is_reported_beside_other_extension_errors() -> None:
    """An unordered extension range is reported even when another extensions key fails."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"extensions": {"first": 200, "last": 100, "step": 1}})
    assert [(p.field, p.rule) for p in info.value.problems] == [
        ("extensions.step", "is not a known setting"),
        ("extensions.last", "must be at least extensions.first (200)"),
    ]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    """A named config file that does not exist is a clear config error."""
    with pytest.raises(ConfigError, match=r"config: file .* does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    """A file that is not TOML is a clear config error naming the file."""
    path = _write(tmp_path, "[store\nurl=")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(path, env={})


def test_a_file_saved_with_a_byte_order_mark_and_crlf_lines_loads(tmp_path: Path) -> None:
    """A config file an editor saved with a UTF-8 byte order mark and CRLF line ends loads
    as the same file without them does."""
    path = tmp_path / "p.toml"
    path.write_bytes(b'\xef\xbb\xbf[log]\r\nlevel = "debug"\r\n')
    assert load_config(path, env={}).log.level == "debug"


def test_source_is_not_a_settable_key(tmp_path: Path) -> None:
    """``source`` is bookkeeping, not a TOML key: setting it is reported as unknown."""
    path = _write(tmp_path, "source = '/elsewhere'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [(p.field, p.rule) for p in info.value.problems] == [
        ("source", "is not a known setting")
    ]


def test_bad_transport_name_is_reported() -> None:
    """A target transport table naming an unknown protocol is refused with the rule."""
    with pytest.raises(ConfigError, match=r"'sctp' is not a transport"):
        load_config(env={}, overrides={"target": {"transports": {"sctp": "t"}}})


def test_every_bad_transport_is_reported() -> None:
    """Each bad entry of the transport table is reported, not just the first."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"target": {"transports": {"sctp": "t", "udp": "a b"}}})
    assert [(p.field, p.rule) for p in info.value.problems] == [
        ("target.transports", "transport name for udp must be " + TRANSPORT_NAME_RULE),
        ("target.transports", "'sctp' is not a transport (udp, tcp, tls, ws, wss)"),
    ]


def test_transport_names_fit_the_realtime_column() -> None:
    """A transport name longer than ps_endpoints.transport (40 characters) is refused by the
    config naming the field and the rule, and by the render check of a user it would name."""
    ok = "t" * 40
    assert (
        load_config(env={}, overrides={"target": {"transports": {"tcp": ok}}}).target.transports[
            "tcp"
        ]
        == ok
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"target": {"transports": {"tcp": ok + "x"}}})
    [problem] = info.value.problems
    assert problem.field == "target.transports"
    assert "transport name for tcp must be 1-40 letters" in problem.rule
    user = make_user("1001", "u1", "U 1", transport="tcp")
    settings = RenderSettings(transports={"tcp": ok})
    assert dict(render_user(user, settings).endpoint)["transport"] == ok
    with pytest.raises(InvalidInput) as refused:
        render_user(user, RenderSettings(transports={"tcp": ok + "x"}))
    assert [(p.field, p.rule) for p in refused.value.problems] == [
        ("transport", "the configured transport name must be 1-40 letters, digits, '_', '.' or '-'")
    ]


def test_target_shards_is_validated_and_overridable() -> None:
    """target.shards defaults to 0 (one file), takes 1-4096 from the environment, and a
    value out of range is refused naming the field."""
    assert load_config(env={}).target.shards == 0
    assert load_config(env={"PROVISIONER_TARGET__SHARDS": "256"}).target.shards == 256
    assert load_config(env={}, overrides={"target": {"shards": "4096"}}).target.shards == 4096
    for bad in ("4097", "-1", "many"):
        with pytest.raises(ConfigError) as info:
            load_config(env={"PROVISIONER_TARGET__SHARDS": bad})
        ((field, rule),) = [(p.field, p.rule) for p in info.value.problems]
        assert field == "target.shards"
        assert rule, bad
    with pytest.raises(ConfigError, match="less than or equal to 4096"):
        load_config(env={}, overrides={"target": {"shards": 4097}})


def test_an_empty_target_path_is_refused_naming_the_field() -> None:
    """An empty target.path (``--set target.path=``) is a config problem on target.path,
    not a target that fails every apply with "cannot read '.'"."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, sets=["target.path="])
    assert [p.field for p in info.value.problems] == ["target.path"]


@pytest.mark.parametrize(
    ("sets", "env", "text"),
    [
        (["daemon.state_dir="], {}, ""),
        ([], {"PROVISIONER_DAEMON__STATE_DIR": ""}, ""),
        ([], {}, "[daemon]\nstate_dir = ''\n"),
    ],
    ids=["set", "environment", "file"],
)
def test_an_empty_state_dir_is_refused_naming_the_field(
    tmp_path: Path, sets: list[str], env: dict[str, str], text: str
) -> None:
    """An empty daemon.state_dir (from a flag, the environment or the file) is a config
    problem on daemon.state_dir, as an empty target.path is, not the working directory
    taken quietly for the health record."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), env=env, sets=sets)
    (problem,) = info.value.problems
    assert problem.field == "daemon.state_dir"
    assert problem.rule.startswith("String should have at least 1 character"), problem.rule


def test_repr_hides_database_passwords() -> None:
    """The store and target URLs' passwords never show in a Config's repr or str."""
    config = Config(
        store=StoreSettings(url="postgresql+psycopg://u:s3cret-a@db/users"),
        target=TargetSettings(url="mysql+pymysql://u:s3cret-b@db/asterisk"),
    )
    for shown in (repr(config), str(config), repr(config.store), repr(config.target)):
        assert "s3cret" not in shown
    assert "postgresql+psycopg://u:***@db/users" in repr(config)
    assert config.store.url == "postgresql+psycopg://u:s3cret-a@db/users"


def test_repr_hides_passwords_given_as_url_query_parameters() -> None:
    """A password given as a URL query parameter (``?password=``, ``?passwd=``), which the
    driver connects with, never shows in a Config's repr; the other parameters do."""
    config = Config(
        store=StoreSettings(
            url="postgresql+psycopg://u@db/users?password=s3cret-a&sslmode=require"
        ),
        target=TargetSettings(url="mysql+pymysql://u@db/asterisk?passwd=s3cret-b"),
    )
    for shown in (repr(config), str(config)):
        assert "s3cret" not in shown
    assert "postgresql+psycopg://u@db/users?password=***&sslmode=require" in repr(config)
    assert "mysql+pymysql://u@db/asterisk?passwd=***" in repr(config)


def test_check_never_shows_a_password_given_as_a_url_query_parameter(tmp_path: Path) -> None:
    """``provisioner check`` names the store it opened without the ``?password=`` that
    PostgreSQL was given."""
    with temp_database("postgresql", tmp_path) as url:
        cli = make_cli(
            f"{url}?password=hunter2", tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n'
        )
        assert cli("db", "upgrade").code == 0
        result = cli("check")
    assert "hunter2" not in result.out + result.err
    assert f"ok    store: {url}?password=***: 0 users" in result.out.splitlines()


def test_check_says_a_store_it_cannot_reach_on_one_line(tmp_path: Path) -> None:
    """``provisioner check`` on a PostgreSQL store whose port refuses the connection prints
    one line per check: the driver's multi-line message is cut to its first line."""
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql+psycopg://app:pw@127.0.0.1:{port}/users"
    cli = make_cli(url, tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')
    result = cli("check")
    assert result.code == 1
    lines = result.out.splitlines()
    assert [line[:6] for line in lines] == ["ok    ", "FAIL  ", "ok    ", "ok    ", "ok    "], lines
    assert lines[1].startswith("FAIL  store: cannot open: OperationalError: ")
    assert "Connection refused" in lines[1]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("security", "lock_minutes", 10_000_000_000),
        ("security", "lock_minutes", config_module.MAX_LOCK_MINUTES + 1),
        ("extensions", "last", 10**20),
        ("extensions", "first", 10**20),
    ],
)
def test_out_of_range_numbers_name_their_key(section: str, key: str, value: int) -> None:
    """A lock over ten years or an extension bound over 20 digits is an error naming the key."""
    overrides = {section: {key: value}}
    if (section, key) == ("extensions", "first"):
        overrides[section]["last"] = 10**20 - 1
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    fields = [problem.field for problem in info.value.problems]
    assert f"{section}.{key}" in fields
    assert "less than or equal to" in str(info.value)


def test_largest_allowed_numbers_load() -> None:
    """Ten years of lock and a 20-digit last extension are accepted."""
    cfg = load_config(
        env={},
        overrides={
            "security": {"lock_minutes": config_module.MAX_LOCK_MINUTES},
            "extensions": {"last": 10**20 - 1},
        },
    )
    assert cfg.security.lock_minutes == config_module.MAX_LOCK_MINUTES
    assert cfg.extensions.last == 10**20 - 1


@pytest.mark.parametrize(
    ("toml", "env", "rule"),
    [
        ("[store]\nbusy_timeout = inf\n", {}, "a finite number"),
        (
            "",
            {"PROVISIONER_STORE__BUSY_TIMEOUT": "3000000"},
            f"less than or equal to {2**31 // 1000} (from PROVISIONER_STORE__BUSY_TIMEOUT)",
        ),
    ],
)
def test_a_busy_timeout_sqlite_cannot_hold_is_refused(
    tmp_path: Path, toml: str, env: dict[str, str], rule: str
) -> None:
    """A SQLite busy timeout over 2^31-1 ms (inf included) is a config problem naming the
    key: SQLite would take it as no wait at all, or fail the first connect."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, toml), env=env)
    assert [str(p) for p in info.value.problems] == [f"store.busy_timeout: Input should be {rule}"]


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        ("", {"PROVISIONER_AMI__PING_INTERVAL": "inf"}, "ami.ping_interval"),
        ("[daemon]\nreconcile_interval = inf\n", {}, "daemon.reconcile_interval"),
        ("[daemon]\nstuck_after = inf\n", {}, "daemon.stuck_after"),
        ("", {"PROVISIONER_AMI__RELOAD_MIN_GAP": "nan"}, "ami.reload_min_gap"),
        ("[[asterisk]]\nname='a'\nhost='h'\nusername='u'\nsecret='s'\ntimeout=nan\n", {}, ""),
    ],
)
def test_an_infinite_or_nan_number_is_refused_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], field: str
) -> None:
    """``inf`` and ``nan`` (TOML literals, or text from the environment) are no setting: an
    infinite interval would never fire and NaN compares false with every bound."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, toml), env=env)
    assert [p.field for p in info.value.problems] == [field or "asterisk.0.timeout"]
    assert info.value.problems[0].rule.startswith("Input should be a finite number")


def test_an_ami_secret_is_taken_without_blanks_at_its_ends_as_asterisk_takes_it(
    tmp_path: Path,
) -> None:
    """An [[asterisk]] secret given in TOML, in the environment or in a secret_file loses
    the blanks at its ends (and the file its line end), keeping those inside: Asterisk
    strips them from manager.conf's ``secret =``, so a kept one could never log in."""
    (tmp_path / "ami.secret").write_text(" \tS3 cr3t\t \r\n", encoding="utf-8")
    entry = 'name = "a"\nhost = "h"\nusername = "u"\n'
    by_file = f"[[asterisk]]\n{entry}secret_file = {str(tmp_path / 'ami.secret')!r}\n"
    inline = f'[[asterisk]]\n{entry}secret = "  S3 cr3t \\t"\n'
    env = {
        "PROVISIONER_ASTERISK": '[{"name": "a", "host": "h", "username": "u", '
        '"secret": "S3 cr3t  "}]'
    }
    for text, variables in ((by_file, {}), (inline, {}), ("", env)):
        (server,) = load_config(_write(tmp_path, text), env=variables).asterisk
        assert server.secret is not None
        assert server.secret.get_secret_value() == "S3 cr3t"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, f'[[asterisk]]\n{entry}secret = " \\t "\n'), env={})
    assert [str(p) for p in info.value.problems] == [
        "asterisk.0.secret: the secret must be 1-200 characters without control characters"
    ]


def test_the_longest_busy_timeout_is_the_one_sqlite_waits(tmp_path: Path) -> None:
    """The largest busy timeout accepted reaches SQLite whole (it reads back, not as 0)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(env={"PROVISIONER_STORE__BUSY_TIMEOUT": str(2**31 // 1000)})
    engine = open_engine(url, busy_timeout=cfg.store.busy_timeout)
    try:
        with engine.connect() as conn:
            waits = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    finally:
        engine.dispose()
    assert waits == cfg.store.busy_timeout * 1000 == 2147483000


def test_pool_settings_out_of_bounds_are_reported_with_every_other_problem(
    tmp_path: Path,
) -> None:
    """``store.pool_size`` below 1 or above its bound, and ``store.pool_timeout`` not above 0
    or above an hour, are problems naming the key, listed with the file's other problems."""
    path = _write(
        tmp_path,
        "[store]\npool_size = 0\npool_timeout = 0\n[security]\nmax_failed_logins = 0\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"PROVISIONER_STORE__POOL_SIZE": "0"})
    assert [str(p) for p in info.value.problems] == [
        "store.pool_size: Input should be greater than or equal to 1"
        " (from PROVISIONER_STORE__POOL_SIZE)",
        "store.pool_timeout: Input should be greater than 0",
        "security.max_failed_logins: Input should be greater than or equal to 1",
    ]
    too_many = config_module.MAX_POOL_SIZE + 1
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"store": {"pool_size": too_many, "pool_timeout": 3601}})
    assert [str(p) for p in info.value.problems] == [
        f"store.pool_size: Input should be less than or equal to {too_many - 1}",
        "store.pool_timeout: Input should be less than or equal to 3600",
    ]


def test_the_store_engine_keeps_pool_size_connections_and_waits_pool_timeout(
    tmp_path: Path,
) -> None:
    """The CLI's store engine keeps ``store.pool_size`` idle connections, and a checkout past
    that many plus SQLAlchemy's 10 overflow ones waits ``store.pool_timeout``, then fails."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout
    from sqlalchemy.pool import QueuePool

    from provisioner.cli import App

    # The CLI opens a store only where there is one (only db upgrade makes it).
    sqlite3.connect(tmp_path / "store.db").close()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    sets = [f"store.url={url}", "store.pool_size=2", "store.pool_timeout=0.3"]
    engine = App(None, sets, verbose=False).accounts.engine
    held = [engine.connect() for _ in range(2 + 10)]
    try:
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            engine.connect()
        waited = time.monotonic() - started
    finally:
        for conn in held:
            conn.close()
    assert 0.3 <= waited < 5
    assert isinstance(engine.pool, QueuePool)
    assert engine.pool.checkedin() == 2
    engine.dispose()


CLI_BAD_CONFIG = """\
colour = "blue"
[extensions]
first = 200
last = 100
step = 1
[[asterisk]]
name = "bad name!"
host = "pbx1"
username = "prov"
"""


_CLI_BAD_CONFIG_PROBLEMS = [
    "--set: 'nokey' must look like section.key=value",
    "extensions.step: is not a known setting",
    "extensions.last: must be at least extensions.first (200)",
    "sip.realm: String should match pattern '^[A-Za-z0-9._-]{1,64}$' (from PROVISIONER_SIP__REALM)",
    "log.level: Input should be 'debug', 'info', 'warning' or 'error' (from the command line)",
    "asterisk.0.name: String should match pattern '^[A-Za-z0-9_.-]{1,64}$'",
    "asterisk.0.secret: give exactly one of secret and secret_file",
    "colour: is not a known setting",
]


def test_cli_lists_every_problem_of_file_env_and_flags_at_once(tmp_path: Path) -> None:
    """A command prints every config problem (flags, file, env, each [[asterisk]] field
    and its secret) in one error and exits 2."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, CLI_BAD_CONFIG)
    cli.env["PROVISIONER_SIP__REALM"] = "bad realm!"
    result = cli("--set", "nokey", "--set", "log.level=loud", "user", "list")
    assert result.code == 2
    assert result.out == ""
    assert result.err.splitlines() == [
        "error: invalid configuration",
        *(f"  {problem}" for problem in _CLI_BAD_CONFIG_PROBLEMS),
    ]


def test_check_fails_its_config_line_per_problem_and_exits_1(tmp_path: Path) -> None:
    """``provisioner check`` with a configuration that does not load prints one failed
    config line per problem and exits 1, as for any failed check."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, CLI_BAD_CONFIG)
    cli.env["PROVISIONER_SIP__REALM"] = "bad realm!"
    result = cli("--set", "nokey", "--set", "log.level=loud", "check")
    assert result.code == 1
    assert result.out.splitlines() == [f"FAIL  config: {p}" for p in _CLI_BAD_CONFIG_PROBLEMS]


def test_check_fails_its_config_line_for_a_config_path_that_is_a_directory(
    tmp_path: Path,
) -> None:
    """``provisioner check --config DIR`` fails the config check (exit 1) as for any file
    that cannot be read, not with a usage error (exit 2)."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    cli.config = tmp_path
    result = cli("check")
    assert (result.code, result.err) == (1, "")
    assert result.out.splitlines() == [
        f"FAIL  config: config: cannot read '{tmp_path}': Is a directory"
    ]


def test_check_fails_its_target_line_when_the_target_cannot_be_looked_at(
    tmp_path: Path,
) -> None:
    """``provisioner check`` whose target directory cannot be looked at (not searchable by
    a monitoring user, EACCES; here a name too long, ENAMETOOLONG, as root may search every
    directory) fails the target line and exits 1, with no traceback."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    assert cli("db", "upgrade").code == 0
    target = tmp_path / ("x" * 300) / "p.conf"
    result = cli("--set", f"target.path={target}", "check")
    assert result.code == 1
    # The file or its directory, whichever is looked at first (a link at the path is
    # followed to its file).
    line = result.out.splitlines()[2]
    assert line.startswith(f"FAIL  target: cannot look at '{target.parent}"), line
    assert line.endswith("': File name too long"), line


def test_check_fails_its_store_line_when_the_sqlite_file_cannot_be_looked_at(
    tmp_path: Path,
) -> None:
    """``provisioner check`` whose SQLite store's directory cannot be looked at fails the
    store line and goes on to the target, exit 1, with no traceback."""
    store = tmp_path / ("x" * 300) / "store.db"
    cli = make_cli(f"sqlite:///{store}", tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')
    result = cli("check")
    assert result.code == 1
    assert result.out.splitlines()[1:] == [
        f"FAIL  store: cannot look at {str(store)!r}: File name too long",
        f"ok    target: config file {tmp_path}/p.conf (directory writable)",
        "ok    asterisk: no [[asterisk]] server configured (no login to check; no Asterisk "
        "is told of changes)",
        "ok    daemon: no health record in var: no daemon has run with this state_dir "
        "(nothing to check)",
    ]


@pytest.mark.parametrize("section", ["store", "target"])
def test_a_url_that_does_not_parse_never_shows_its_password(section: str) -> None:
    """A database URL whose unescaped password splits it wrongly is refused without quoting
    any part of the password."""
    url = "postgresql+psycopg://app:Pa@ss:w0rd-zz@db/users"
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {"url": url}})
    assert [p.field for p in info.value.problems] == [f"{section}.url"]
    assert "must be a SQLAlchemy database URL" in info.value.problems[0].rule
    assert "w0rd" not in str(info.value)


@pytest.mark.parametrize("section", ["store", "target"])
def test_a_password_with_an_unescaped_at_sign_is_refused_not_shown_as_the_host(
    section: str,
) -> None:
    """A database URL whose password holds an unescaped '@' (no ':' after it to break the
    port) is refused, not read as a host made of the password's tail, which every display
    of the URL and every connect error would show."""
    url = "postgresql+psycopg://app:Pa@ssw0rd@db/users"
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {"url": url}})
    assert [p.field for p in info.value.problems] == [f"{section}.url"]
    assert "percent-encode" in info.value.problems[0].rule
    assert "w0rd" not in str(info.value)


@pytest.mark.parametrize("section", ["store", "target"])
@pytest.mark.parametrize(
    "url",
    [
        "mysql+pymysql://app:Geheim%E2%82%ACWort@db/users",
        "mysql+pymysql://app@db/users?password=Geheim%E2%82%ACWort",
        "mysql+pymysql://app@db/users?passwd=Geheim%E2%82%ACWort",
    ],
)
def test_a_pymysql_password_latin1_cannot_hold_is_refused_without_showing_it(
    section: str, url: str, tmp_path: Path
) -> None:
    """A MariaDB/MySQL password pymysql cannot send (it encodes it as Latin-1: a '€' has no
    byte there) is a config problem naming the rule, not a traceback at the first connect
    quoting the character and its place (nor a daemon restarted forever for it)."""
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {"url": url}})
    assert [p.field for p in info.value.problems] == [f"{section}.url"]
    assert "Latin-1" in info.value.problems[0].rule
    for shown in ("Geheim", "Wort", "\u20ac", "\\u20ac", "position"):
        assert shown not in str(info.value)
    result = make_cli(url, tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')("user", "list")
    if section == "store":
        assert result.code == 2, result
        assert "Traceback" not in result.err
        assert "Geheim" not in result.out + result.err


def test_a_pymysql_password_of_latin1_characters_is_taken() -> None:
    """A password of Latin-1 characters beyond ASCII ('ö', '§') is one pymysql sends: kept."""
    url = "mysql+pymysql://app:Geheimw%C3%B6rt%C2%A7@db/users"
    assert load_config(env={}, overrides={"store": {"url": url}}).store.url == url


def test_a_url_of_an_unknown_database_is_a_config_problem(tmp_path: Path) -> None:
    """A store URL naming no database SQLAlchemy knows is a config problem (exit 2), listed
    with the others, not a traceback."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    result = cli(
        "--store-url", "foo://x", "--set", "target.url=postgresql+nodriver://h/d", "user", "list"
    )
    assert result.code == 2
    assert result.err.splitlines() == [
        "error: invalid configuration",
        "  store.url: names no database SQLAlchemy knows ('foo') (from the command line)",
        "  target.url: names no database SQLAlchemy knows ('postgresql+nodriver')"
        " (from the command line)",
    ]


def _skip_if_installed(*modules: str) -> None:
    """Skip the test when one of ``modules`` (drivers it takes to be missing) is installed."""
    for module in modules:
        if importlib.util.find_spec(module) is not None:
            pytest.skip(f"{module} is installed here")


def test_a_url_whose_driver_is_not_installed_is_a_config_problem(tmp_path: Path) -> None:
    """A URL of a known database whose driver is not installed (``mysql://`` means MySQLdb)
    is a config problem naming the driver (exit 2), never a traceback or the password."""
    _skip_if_installed("MySQLdb", "pyodbc")
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    result = cli(
        "--store-url",
        "mysql://app:hunter2@db/users",
        "--set",
        "target.url=mssql+pyodbc://app:hunter3@db/asterisk",
        "user",
        "list",
    )
    assert result.code == 2
    assert "hunter" not in result.out + result.err
    hint = "install it or name one that is, e.g. postgresql+psycopg, mysql+pymysql"
    assert result.err.splitlines() == [
        "error: invalid configuration",
        "  store.url: its driver is not installed"
        f" (mysql+mysqldb: No module named 'MySQLdb'); {hint} (from the command line)",
        "  target.url: its driver is not installed"
        f" (mssql+pyodbc: No module named 'pyodbc'); {hint} (from the command line)",
    ]


def test_check_fails_its_config_line_for_a_driver_that_is_not_installed(tmp_path: Path) -> None:
    """``provisioner check`` with a store URL whose driver is not installed prints a failed
    config line and exits 1 instead of a traceback."""
    _skip_if_installed("MySQLdb")
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    result = cli("--store-url", "mysql://app:hunter2@db/users", "check")
    assert result.code == 1
    assert "hunter" not in result.out + result.err
    assert result.out.splitlines() == [
        "FAIL  config: store.url: its driver is not installed (mysql+mysqldb: No module named"
        " 'MySQLdb'); install it or name one that is, e.g. postgresql+psycopg, mysql+pymysql"
        " (from the command line)"
    ]


def test_an_unreadable_set_flag_never_shows_its_value(tmp_path: Path) -> None:
    """A --set flag that cannot be read is named by its key alone: its value may hold a
    secret (an [[asterisk]] entry given whole as JSON)."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    broken = 'asterisk=[{"name": "a", "host": "h", "username": "u", "secret": "hunter2"'
    result = cli("--set", broken, "--set", "=hunter3", "user", "list")
    assert result.code == 2
    assert "hunter" not in result.out + result.err
    assert result.err.splitlines() == [
        "error: invalid configuration",
        "  --set: 'asterisk=…': the value is not valid JSON"
        " (Expecting ',' delimiter: line 1 column 65 (char 64))",
        "  --set: '=…' must look like section.key=value",
    ]


def test_a_set_flag_with_a_colon_for_its_equals_sign_never_shows_its_value(
    tmp_path: Path,
) -> None:
    """A --set flag whose '=' was typed as ':' (so the value seems part of the key) is
    refused as no section.key=value, shown only up to the first character no key has."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    typo = "store.url:postgresql+psycopg://app:hunter2@db/users"
    result = cli("--set", typo, "--set", f"{typo}?sslmode=require", "user", "list")
    assert result.code == 2
    assert "hunter" not in result.out + result.err
    assert result.err.splitlines() == [
        "error: invalid configuration",
        "  --set: 'store.url…' must look like section.key=value",
        "  --set: 'store.url…=…' must look like section.key=value",
    ]


def test_an_unreadable_environment_variable_is_named_never_its_value(tmp_path: Path) -> None:
    """A PROVISIONER_ variable whose value starts as JSON but is not is reported as such,
    named by the variable and never showing its value, beside every other problem."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    cli.env["PROVISIONER_ASTERISK"] = (
        '[{"name": "a", "host": "h", "username": "u", "secret": "hunter2"'
    )
    cli.env["PROVISIONER_TARGET__VIDEO_CODECS"] = "[vp8]"
    cli.env["PROVISIONER_SIP__REALM"] = "bad realm!"
    result = cli("--set", "nokey", "user", "list")
    assert result.code == 2
    assert "hunter" not in result.out + result.err
    assert result.err.splitlines() == [
        "error: invalid configuration",
        "  --set: 'nokey' must look like section.key=value",
        "  PROVISIONER_ASTERISK: the value is not valid JSON"
        " (Expecting ',' delimiter: line 1 column 65 (char 64))",
        "  PROVISIONER_TARGET__VIDEO_CODECS: the value is not valid JSON"
        " (Expecting value: line 1 column 2 (char 1))",
        "  sip.realm: String should match pattern '^[A-Za-z0-9._-]{1,64}$'"
        " (from PROVISIONER_SIP__REALM)",
    ]


def test_a_problem_names_the_variable_or_flag_its_value_came_from(tmp_path: Path) -> None:
    """A bad value from the environment names its variable, one from --set the flag, one
    from a whole JSON table the variable that gave it; a value of the file names no source."""
    path = _write(tmp_path, "[extensions]\nfirst = -1\n[ami]\nping_timeout = 0\n")
    env = {
        "PROVISIONER_SIP__REALM": "bad realm!",
        "PROVISIONER_AMI": '{"backoff_cap": 0}',
        "PROVISIONER_STORE__URLX": "x",
    }
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, sets=["ami.ping_interval=inf", "log.level=loud"])
    assert sorted(str(p) for p in info.value.problems) == [
        "ami.backoff_cap: Input should be greater than 0 (from PROVISIONER_AMI)",
        "ami.ping_interval: Input should be a finite number (from the command line)",
        "ami.ping_timeout: Input should be greater than 0",
        "extensions.first: Input should be greater than or equal to 0",
        "log.level: Input should be 'debug', 'info', 'warning' or 'error' (from the command line)",
        "sip.realm: String should match pattern '^[A-Za-z0-9._-]{1,64}$'"
        " (from PROVISIONER_SIP__REALM)",
        "store.urlx: is not a known setting (from PROVISIONER_STORE__URLX)",
    ]


def test_a_quoted_value_of_a_set_flag_or_variable_is_read_as_a_json_string(
    tmp_path: Path,
) -> None:
    """``--set store.url="sqlite:///x.db"`` (quotes kept where no shell removes them, as in
    a systemd ExecStart=) sets the URL without its quotes, as the same variable does; a
    quoted value that is not one JSON string is refused naming the flag, not its value."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert load_config(env={}, sets=[f'store.url="{url}"']).store.url == url
    assert load_config(env={"PROVISIONER_STORE__URL": f'"{url}"'}).store.url == url
    with pytest.raises(ConfigError) as info:
        load_config(env={}, sets=['sip.realm="hunter2" x'])
    assert [str(p) for p in info.value.problems] == [
        "--set: 'sip.realm=…': the value is not valid JSON (Extra data: line 1 column 11 (char 10))"
    ]


def test_the_example_config_loads_and_holds_every_key() -> None:
    """systemd/provisioner.toml loads and names every key of every section."""
    path = Path(__file__).resolve().parent.parent / "systemd" / "provisioner.toml"
    load_config(path, env={})
    tables = tomllib.loads(path.read_text(encoding="utf-8"))
    for name, info in Config.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            assert set(tables[name]) == set(section.model_fields), name


#: Keys whose example value is a production path rather than the embedded default;
#: the example's comment on that line must name the default instead.
_PRODUCTION_PATHS = {("store", "url"), ("target", "path"), ("daemon", "state_dir")}


def _example_line(text: str, section: str, key: str) -> str:
    """The line of the example config that sets ``key`` under ``[section]``."""
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]")
        elif current == section and stripped.split("=")[0].strip() == key:
            return line
    raise AssertionError(f"{section}.{key} is not in the example")


def test_the_example_config_gives_every_key_its_true_default() -> None:
    """Each key of the example config holds its default, or, for a production path, names it."""
    path = Path(__file__).resolve().parent.parent / "systemd" / "provisioner.toml"
    text = path.read_text(encoding="utf-8")
    defaults = Config()
    for name, values in tomllib.loads(text).items():
        section = getattr(defaults, name)
        for key, value in values.items():
            default = getattr(section, key)
            default = list(default) if isinstance(default, tuple) else default
            if (name, key) in _PRODUCTION_PATHS:
                assert f'default: "{default}"' in _example_line(text, name, key), (name, key)
            else:
                assert value == default, (name, key)


def test_an_empty_or_repeated_video_codec_list_is_refused_naming_the_field() -> None:
    """target.video_codecs must list at least one codec, each once: an empty list would
    render video users with no video codec at all."""
    assert load_config(
        env={}, overrides={"target": {"video_codecs": ["vp9"]}}
    ).target.video_codecs == ("vp9",)
    for bad, rule in (
        ([], "must list at least one video codec"),
        (["vp8", "h264", "vp8"], "must not repeat a codec (vp8)"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(env={}, overrides={"target": {"video_codecs": bad}})
        assert [(p.field, p.rule) for p in info.value.problems] == [
            ("target.video_codecs", rule)
        ], bad


def test_blanks_around_a_set_flags_key_and_value_are_dropped_as_toml_drops_them() -> None:
    """``--set "log.level = debug"`` sets log.level to debug, as ``level = debug`` in TOML would."""
    config = load_config(env={}, sets=["log.level = debug", 'sip.realm =  "pbx" '])
    assert config.log.level == "debug"
    assert config.sip.realm == "pbx"


def test_blanks_around_a_variables_value_are_dropped_as_a_set_flags_are() -> None:
    """``PROVISIONER_TARGET__KIND=" config"`` (or a value ending in a CR from a Windows env
    file) sets target.kind to config, as ``--set`` would; a quoted value keeps its blanks."""
    config = load_config(
        env={
            "PROVISIONER_TARGET__KIND": " config",
            "PROVISIONER_LOG__LEVEL": "debug\r\n",
            "PROVISIONER_SIP__REALM": '  "pbx" ',
            "PROVISIONER_TARGET__PATH": '" var/x.conf "',
        }
    )
    assert (config.target.kind, config.log.level, config.sip.realm) == ("config", "debug", "pbx")
    assert config.target.path == " var/x.conf "


def _secret_file_problems(path: Path) -> list[str]:
    """The problems of a config whose one [[asterisk]] entry reads its secret from ``path``."""
    entry = {"name": "pbx1", "host": "h", "username": "u", "secret_file": str(path)}
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"asterisk": [entry]})
    return [str(problem) for problem in info.value.problems]


def test_a_secret_file_that_is_a_device_or_too_large_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    """A secret_file that is a device, or a regular file past the size cap, is refused by key."""
    large = tmp_path / "large.secret"
    large.write_bytes(b"x" * 5000)
    assert _secret_file_problems(Path("/dev/null")) == [
        "asterisk.0.secret_file: '/dev/null' is not a regular file"
    ]
    assert _secret_file_problems(large) == [
        f"asterisk.0.secret_file: {str(large)!r} is larger than 4096 bytes"
    ]


def test_a_secret_file_that_is_a_fifo_is_refused_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    """A secret_file that is a named pipe no one writes is refused, not waited on forever."""
    fifo = tmp_path / "ami.secret"
    os.mkfifo(fifo)
    script = (
        "import sys; from pathlib import Path; from provisioner import config;"
        " from tests.test_config import _secret_file_problems;"
        " config.DEFAULT_CONFIG_PATH = Path(sys.argv[1]).with_name('absent.toml');"
        " print(_secret_file_problems(Path(sys.argv[1])))"
    )
    root = Path(__file__).resolve().parent.parent
    # A child process: the old loading blocked in open() for good, which would hang the suite.
    done = subprocess.run(
        [sys.executable, "-c", script, str(fifo)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == str(
        [f"asterisk.0.secret_file: {str(fifo)!r} is not a regular file"]
    )


#: Each duration (and the reload gap's factor) with the largest value it takes.
_DURATION_BOUNDS = [
    ("ami", "backoff_base", 60),
    ("ami", "backoff_cap", 3600),
    ("ami", "login_failure_backoff", 86400),
    ("ami", "ping_interval", 86400),
    ("ami", "ping_timeout", 600),
    ("ami", "action_timeout", 3600),
    ("ami", "reload_timeout", 86400),
    ("ami", "reload_retry_delay", 3600),
    ("ami", "reload_min_gap", 86400),
    ("ami", "reload_gap_factor", 100),
    ("daemon", "reconcile_interval", 604800),
    ("daemon", "cursor_grace", 86400),
    ("daemon", "stuck_after", 86400),
]


@pytest.mark.parametrize(("section", "key", "bound"), _DURATION_BOUNDS)
def test_a_duration_past_its_bound_is_refused_naming_the_key(
    section: str, key: str, bound: float
) -> None:
    """A duration takes its documented bound, and 1e300 (which no timer holds) is refused by key."""
    assert (
        getattr(getattr(load_config(env={}, overrides={section: {key: bound}}), section), key)
        == bound
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {key: 1e300}})
    assert [str(p) for p in info.value.problems] == [
        f"{section}.{key}: Input should be less than or equal to {bound}"
    ]


def _one_server(tmp_path: Path) -> Path:
    """A config file with one [[asterisk]] entry, pbx1 on port 5038."""
    return _write(
        tmp_path,
        "[[asterisk]]\nname = 'pbx1'\nhost = 'h'\nusername = 'u'\nsecret = 's'\n",
    )


def test_a_list_index_in_a_set_flag_or_variable_changes_that_entry_only(tmp_path: Path) -> None:
    """``--set asterisk.0.port=5039`` and ``PROVISIONER_ASTERISK__0__SECRET`` change entry 0's
    key, keeping the rest of the entry and of the list."""
    env = {"PROVISIONER_ASTERISK__0__SECRET": "t0p"}
    config = load_config(_one_server(tmp_path), env=env, sets=["asterisk.0.port=5039"])
    (server,) = config.asterisk
    assert (server.name, server.host, server.port) == ("pbx1", "h", 5039)
    assert server.secret is not None
    assert server.secret.get_secret_value() == "t0p"


def test_a_list_index_with_no_entry_is_refused_naming_the_flag_or_variable(
    tmp_path: Path,
) -> None:
    """An index past the list's end is refused with a rule naming where it came from."""
    env = {"PROVISIONER_ASTERISK__3__PORT": "5039"}
    with pytest.raises(ConfigError) as info:
        load_config(_one_server(tmp_path), env=env, sets=["asterisk.1.port=5039"])
    assert sorted(str(p) for p in info.value.problems) == [
        "asterisk.1: there is no entry 1 to change (the list has 1): give the whole list as"
        " JSON (from the command line)",
        "asterisk.3: there is no entry 3 to change (the list has 1): give the whole list as"
        " JSON (from PROVISIONER_ASTERISK__3__PORT)",
    ]


def test_a_list_index_reaches_a_list_given_whole_in_the_same_layer() -> None:
    """An index after the whole list in the same layer (flags, or variables) changes that list."""
    entry = '[{"name": "pbx1", "host": "h", "username": "u", "secret": "s"}]'
    env = {"PROVISIONER_ASTERISK": entry, "PROVISIONER_ASTERISK__0__PORT": "5040"}
    by_env = load_config(env=env)
    by_flags = load_config(env={}, sets=[f"asterisk={entry}", "asterisk.0.port=5039"])
    assert [(s.name, s.port) for s in by_env.asterisk] == [("pbx1", 5040)]
    assert [(s.name, s.port) for s in by_flags.asterisk] == [("pbx1", 5039)]


@pytest.mark.parametrize(
    ("lines", "holds"),
    [
        (['[[asterisk]]', 'name = "pbx1"', 'host = "127.0.0.1"', 'port = 1',
          'username = "p"', 'secret = "Ami-Inline-1"'],
         "asterisk.0.secret"),
        (['[target]', 'kind = "realtime"', 'url = "postgresql+psycopg://u:Db-Pw-2@127.0.0.1:1/d"'],
         "the password of target.url"),
        (['[target]', 'kind = "realtime"', 'url = "postgresql+psycopg://u@127.0.0.1:1/d?password=Db-Pw-3"'],
         "the password of target.url"),
    ],
)  # fmt: skip
def test_check_fails_a_config_file_others_may_read_that_holds_a_secret(
    tmp_path: Path, lines: list[str], holds: str
) -> None:
    """'provisioner check' fails its config line for a config file others may read that holds
    a secret itself (an AMI secret, a database URL's password), naming the file, what it
    holds (never its value) and the fix; at 0640 it passes."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, "\n".join(lines) + "\n")
    cli("db", "upgrade")
    cli.config.chmod(0o644)
    result = cli("check")
    assert (
        f"FAIL  config: {cli.config} is readable by others and holds {holds}: chmod 640 it "
        "(or 600), or move the secret out of it (secret_file, the environment)"
    ) in result.out.splitlines(), result.out
    assert "Ami-Inline" not in result.out + result.err
    assert "Db-Pw" not in result.out + result.err
    cli.config.chmod(0o640)
    assert "readable by others" not in cli("check").out


def test_check_passes_a_config_file_others_may_read_that_holds_no_secret(tmp_path: Path) -> None:
    """A world-readable config file whose AMI secret is in a secret_file (0600) and whose
    store URL has no password is no check failure: it holds nothing to keep."""
    secret = tmp_path / "ami.secret"
    secret.write_text("Ami-In-File-4\n")
    secret.chmod(0o600)
    lines = ["[[asterisk]]", 'name = "pbx1"', 'host = "127.0.0.1"', "port = 1", 'username = "p"']
    lines.append(f'secret_file = "{secret}"')
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, "\n".join(lines) + "\n")
    cli("db", "upgrade")
    cli.config.chmod(0o644)
    assert "readable by others" not in cli("check").out


@pytest.mark.parametrize(
    ("env", "sets", "problem"),
    [
        (
            {"PROVISIONER_ASTERISK": '{"name": "pbx1", "host": "h"}'},
            [],
            "asterisk: must be a list, not a table (as JSON: [...], each entry {...})"
            " (from PROVISIONER_ASTERISK)",
        ),
        (
            {},
            ['target.video_codecs={"vp8": true}'],
            "target.video_codecs: must be a list, not a table (as JSON: [...], each entry {...})"
            " (from the command line)",
        ),
    ],
)
def test_a_table_given_where_a_list_belongs_names_where_it_came_from(
    env: dict[str, str], sets: list[str], problem: str
) -> None:
    """A JSON table given by a variable or flag where a list belongs (``[asterisk]``'s
    entries as one object) is said to come from there, as any other value of theirs is,
    not left to look like the file's."""
    with pytest.raises(ConfigError) as info:
        load_config(env=env, sets=sets, path=None)
    assert problem in [str(p) for p in info.value.problems]


def test_a_table_of_the_file_with_a_key_of_the_environment_names_no_single_source(
    tmp_path: Path,
) -> None:
    """A wrong table made of the file's keys and a variable's names no source: neither
    alone gave it."""
    path = _write(tmp_path, "[asterisk]\nname = 'pbx1'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"PROVISIONER_ASTERISK__HOST": "h"})
    assert [str(p) for p in info.value.problems] == [
        "asterisk: must be a list, not a table (in TOML, write each entry as [[asterisk]])"
    ]


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        (
            "[asterisk]\nname = 'pbx1'\n",
            {},
            "asterisk: must be a list, not a table (in TOML, write each entry as [[asterisk]])",
        ),
        (
            "",
            {"PROVISIONER_TARGET__VIDEO_CODECS": "vp8,h264"},
            "target.video_codecs: must be a list (from the environment or --set, as JSON: "
            '["a", "b"]) (from PROVISIONER_TARGET__VIDEO_CODECS)',
        ),
        (
            "",
            {"PROVISIONER_TARGET__TRANSPORTS": "udp=my-udp"},
            "target.transports: must be a table (from the environment or --set, as JSON: "
            '{"key": "value"}) (from PROVISIONER_TARGET__TRANSPORTS)',
        ),
        (
            "[target]\nvideo_codecs = 'vp8'\n",
            {},
            "target.video_codecs: must be a list",
        ),
    ],
)
def test_a_list_or_table_given_as_something_else_says_how_to_write_one(
    tmp_path: Path, text: str, env: dict[str, str], problem: str
) -> None:
    """A list or table key given a table (``[asterisk]`` for ``[[asterisk]]``) or plain
    text (``vp8,h264`` in a variable) says what it must be and how to write it, not
    pydantic's 'Input should be a valid tuple'."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), env=env)
    assert [str(p) for p in info.value.problems] == [problem]


def test_a_path_starting_with_a_tilde_is_refused_naming_every_key(tmp_path: Path) -> None:
    """A path or SQLite URL starting with ``~`` (which no shell expands in a TOML file,
    a unit's environment or a quoted flag) is refused on every key that takes one, all at
    once, rather than taken as a directory named ``~`` under the working directory, where
    Asterisk's #include would never look."""
    path = _write(
        tmp_path,
        "[store]\nurl = 'sqlite:///~/store.db'\n"
        "[target]\npath = '~/pjsip_users.conf'\ntemplates = '~/templates'\n"
        "url = 'sqlite:///~/asterisk.db'\n"
        "[daemon]\nstate_dir = '~/state'\n"
        "[[asterisk]]\nname = 'pbx'\nhost = 'h'\nusername = 'u'\nsecret_file = '~/ami.secret'\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    rule = "must not start with '~' (no shell expands it here): give the full path"
    assert sorted(str(p) for p in info.value.problems) == sorted(
        f"{key}: {rule}"
        for key in (
            "store.url",
            "target.path",
            "target.templates",
            "target.url",
            "daemon.state_dir",
            "asterisk.0.secret_file",
        )
    )


def test_a_tilde_inside_a_path_is_a_name_like_any_other(tmp_path: Path) -> None:
    """Only a leading ``~`` is refused: one inside a name (a backup's ``x~``) is kept."""
    cfg = load_config(
        env={}, overrides={"target": {"path": str(tmp_path / "a~" / "pjsip_users.conf~")}}
    )
    assert cfg.target.path.endswith("a~/pjsip_users.conf~")


@pytest.mark.parametrize(
    ("sets", "keys"),
    [
        (["asterisk.0.secret=TopSecret99"], ["asterisk.0.secret"]),
        (['asterisk=[{"name": "a"}, {"name": "b", "secret": "Top99"}]'], ["asterisk.1.secret"]),
        (["store.url=postgresql+psycopg://u:TopSecret99@h/db"], ["store.url"]),
        (["target.url=mysql+pymysql://u@h/db?password=TopSecret99"], ["target.url"]),
        (["store.url=sqlite:///x.db", "log.level=debug", 'asterisk=[{"name": "a"}]'], []),
    ],
)
def test_secrets_given_on_the_command_line_are_named(sets: list[str], keys: list[str]) -> None:
    """The ``--set`` flags that give a secret (an AMI secret, a database URL's password),
    which every local user sees in ``ps``, are named by key."""
    assert config_module.command_line_secrets(sets) == keys


def test_a_command_warns_of_a_secret_on_its_command_line(tmp_path: Path) -> None:
    """A command given an AMI secret by ``--set`` warns on stderr, naming the key and the
    places to put it instead, never the secret."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    cli.ok("db", "upgrade")
    servers = '[{"name": "pbx1", "host": "127.0.0.1", "username": "p", "secret": "TopSecret99"}]'
    ran = cli("--set", f"asterisk={servers}", "user", "list", verbose=False)
    assert ran.code == 0, ran
    assert "config.secret_on_command_line" in ran.err
    assert "asterisk.0.secret" in ran.err
    assert "secret_file" in ran.err
    assert "TopSecret99" not in ran.err + ran.out


def test_check_names_the_sharded_layout_when_the_one_file_is_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``provisioner check`` says, on its passing target line, how large a one-file target
    is and that target.shards splits it, once the file passes the size where every edit's
    whole rewrite gets costly; below that size the line is as before."""
    from provisioner import checks

    conf = tmp_path / "p.conf"
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, f'[target]\npath = "{conf}"\n')
    assert cli("db", "upgrade").code == 0
    assert cli("sync", "--once").code == 0
    plain = f"ok    target: config file {conf} (directory writable)"
    assert plain in cli("check").out.splitlines()
    monkeypatch.setattr(checks, "LARGE_FILE_BYTES", conf.stat().st_size)
    megabytes = conf.stat().st_size / (1024 * 1024)
    noted = (
        f"ok    target: config file {conf} (directory writable; its {megabytes:.1f} MB are "
        "rewritten whole at each edit: target.shards (64 at 100k users) splits it so that an "
        "edit writes one shard (README: Sharded layout))"
    )
    assert noted in cli("check").out.splitlines()
