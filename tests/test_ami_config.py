"""The [[asterisk]] and [ami] configuration sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.config import load_config
from provisioner.errors import ConfigError


def _load(tmp_path: Path, body: str) -> object:
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
    assert second.sorcery_caches == ("ep_cache",)
    assert config.ami.ping_interval == 3
    assert "t0p-s3cret" not in repr(config)
    assert "other" not in repr(config.asterisk[1])


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
    assert len(found["asterisk.0.sorcery_caches"]) == 2
