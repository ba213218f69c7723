"""The digest of the config files a reload loaded (:mod:`provisioner.ami.loaded`)."""

from __future__ import annotations

import os
from pathlib import Path

from provisioner.ami.loaded import config_files, files_digest, open_files, owes_reload


def test_owes_a_reload_only_when_a_noted_digest_differs(tmp_path: Path) -> None:
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text("[1001]\n")
    loaded = files_digest([conf])
    assert not owes_reload(loaded, files_digest([conf]))  # equal: Asterisk has it
    conf.write_text("[1001]\nnat=yes\n")
    assert owes_reload(loaded, files_digest([conf]))  # written after the reload
    assert not owes_reload(None, files_digest([conf]))  # no note (first run): nothing forced


def test_an_absent_file_and_an_empty_one_differ(tmp_path: Path) -> None:
    conf = tmp_path / "pjsip_users.conf"
    absent = files_digest([conf])
    conf.write_text("")
    assert owes_reload(absent, files_digest([conf]))


def test_opened_files_hash_the_bytes_they_had_when_opened(tmp_path: Path) -> None:
    """A write replaces the file by a rename: files opened before the reload keep the
    bytes Asterisk was sent the reload for, whatever is written meanwhile."""
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text("[1001]\n")
    before = files_digest([conf])
    opened = open_files(config_files(conf, 0))
    new = tmp_path / "new.conf"
    new.write_text("[1002]\n")
    os.replace(new, conf)
    assert opened.digest() == before
    assert files_digest([conf]) != before
