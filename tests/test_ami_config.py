"""The [[asterisk]] and [ami] configuration sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.cli import _parse_sets
from provisioner.config import CACHE_KINDS, Config, load_config
from provisioner.errors import ConfigError


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


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"secret": "x", "secret_file": "/nonexistent"}, "exactly one of secret and secret_file"),
        ({}, "exactly one of secret and secret_file"),
        ({"secret_file": "/nonexistent/ami.secret"}, "cannot read secret_file"),
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


def test_server_names_are_unique(tmp_path: Path) -> None:
    """Two [[asterisk]] entries with one name are refused."""
    body = '[[asterisk]]\nname = "a"\nhost = "h"\nusername = "u"\nsecret = "s"\n' * 2
    with pytest.raises(ConfigError, match="own name"):
        _load(tmp_path, body)


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
        config = load_config(None, env={}, overrides=_parse_sets([f"asterisk={servers}"]))
    assert config.asterisk[0].sorcery_caches == {
        "endpoint": ("ep_cache",),
        "aor": ("aor_cache",),
    }
