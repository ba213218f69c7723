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
