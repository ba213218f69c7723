"""The digest of the config files a reload loaded (:mod:`provisioner.ami.loaded`)."""

from __future__ import annotations

import os
from pathlib import Path

from provisioner.ami.loaded import (
    FileDigests,
    config_files,
    files_digest,
    open_files,
    owes_reload,
)


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


def _replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` as the target does: a new file renamed over it."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def test_kept_digests_give_the_digest_of_the_bytes_alone(tmp_path: Path) -> None:
    """With each file's digest kept from an earlier reload, the digest of files some of
    which were replaced, written in place, removed or made since is the one read from
    their bytes alone (what a start compares a noted digest with)."""
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text("main\n")
    paths = config_files(conf, 4)
    for i, shard in enumerate(paths[1:]):
        shard.parent.mkdir(exist_ok=True)
        shard.write_text(f"[{1000 + i}]\n")
    digests = FileDigests()
    assert files_digest(paths, digests) == files_digest(paths)
    _replace(paths[1], "[1000]\nnat=yes\n")
    with paths[2].open("a") as appended:  # in place: same inode, new size and times
        appended.write("context=x\n")
    paths[3].unlink()
    assert files_digest(paths, digests) == files_digest(paths)
    paths[3].write_text("")
    assert files_digest(paths, digests) == files_digest(paths)


def test_a_file_written_in_place_to_the_same_size_is_read_again(tmp_path: Path) -> None:
    """A write in place that keeps the size still changes the file's times (here set
    apart, as a later clock tick does): its kept digest is not taken for it."""
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text("[1001]\n")
    digests = FileDigests()
    before = files_digest([conf], digests)
    found = conf.stat()
    conf.write_text("[1002]\n")
    os.utime(conf, ns=(found.st_atime_ns, found.st_mtime_ns + 10_000_000))
    assert files_digest([conf], digests) == files_digest([conf]) != before


def test_only_files_changed_since_their_digest_was_kept_are_opened(tmp_path: Path) -> None:
    """Before a reload of 64 shard files of which one was rewritten since the last, one
    file is opened (the others are only looked at), and its digest is of the bytes it
    had when opened, whatever is written after."""
    conf = tmp_path / "pjsip_users.conf"
    conf.write_text("main\n")
    paths = config_files(conf, 64)
    paths[1].parent.mkdir()
    for shard in paths[1:]:
        shard.write_text("[shard]\n")
    digests = FileDigests()
    files_digest(paths, digests)
    _replace(paths[5], "[shard]\nnat=yes\n")
    expected = files_digest(paths)
    held = len(os.listdir("/proc/self/fd"))
    opened = open_files(paths, digests)
    assert len(os.listdir("/proc/self/fd")) == held + 1
    _replace(paths[5], "[shard]\nnat=no\n")  # written after the reload was sent
    assert opened.digest() == expected
    assert len(os.listdir("/proc/self/fd")) == held
