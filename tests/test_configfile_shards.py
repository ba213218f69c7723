"""The config-file target's sharded layout (``target.shards`` >= 1): real files, read back."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from provisioner.asterisk_conf import parse
from provisioner.config import load_config
from provisioner.errors import (
    ConfigError,
    ForeignTargetFile,
    RenderCheckFailed,
    TargetWriteFailed,
)
from provisioner.pjsip import RenderSettings, UserObjects, render_user
from provisioner.targets import Change
from provisioner.targets import files as files_module
from provisioner.targets import sharded as sharded_module
from provisioner.targets.configfile import (
    SHIPPED_TEMPLATES,
    ConfigFileTarget,
    check_rendered,
)
from provisioner.targets.files import STALE_TEMP_SECONDS, lock_file
from provisioner.targets.sharded import (
    PARALLEL_FILES,
    ShardedConfigFileTarget,
    config_file_target,
)
from provisioner.targets.shards import (
    INCLUDE_PATH_MAX,
    check_main,
    shard_directory,
    shard_name,
    shard_of,
)

from .test_configfile import (
    REPRESENTATIVE,
    check_golden,
    make_target,
    make_user,
    rendered,
    write_override,
)


def _order(user: UserObjects) -> tuple[int, str]:
    return (len(user.endpoint_id), user.endpoint_id)


def many(count: int, first: int = 3000) -> list[UserObjects]:
    """``count`` plain users (extensions from ``first``) and the representative ones, in
    render_all's order."""
    plain = [make_user(str(first + i), f"u{first + i}", f"User {i}") for i in range(count)]
    return sorted(rendered(users=[*REPRESENTATIVE, *plain]), key=_order)


def in_shard(users: Sequence[UserObjects], index: int, count: int) -> list[UserObjects]:
    return [u for u in users if shard_of(u.endpoint_id, count) == index]


def snapshot(root: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Every file under ``root``: inode, mtime and bytes."""
    out: dict[Path, tuple[int, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            out[path] = (info.st_ino, info.st_mtime_ns, path.read_bytes())
    return out


def changed_files(
    before: dict[Path, tuple[int, int, bytes]], after: dict[Path, tuple[int, int, bytes]]
) -> set[Path]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def check_shards(target: ShardedConfigFileTarget, users: Sequence[UserObjects]) -> None:
    """Each shard file parses back to exactly its users; the main file includes them all."""
    check_main(target.path.read_bytes(), target.files)
    for index, path in enumerate(target.files):
        check_rendered(path.read_bytes(), in_shard(users, index, target.shards))


#: (event, path, writing) of the file operations audited while recording; None: not recording.
_audited: list[tuple[str, str, bool]] | None = None
_hooked = False
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Record file opens, renames, links and removals (the interpreter's audit events)."""
    if _audited is None or event not in ("open", "os.rename", "os.link", "os.remove"):
        return
    path = args[1] if event in ("os.rename", "os.link") else args[0]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # an open of a file descriptor
    writing = True
    if event == "open":
        mode, flags = args[1], args[2]
        writing = bool(set(mode or "") & set("wax+")) or bool((flags or 0) & _WRITING)
    _audited.append((event, os.fsdecode(path), writing))


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str, bool]]]:
    """The file operations this process makes inside the block (audit hooks cannot be
    removed: one is added once and records only meanwhile)."""
    global _audited, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    seen: list[tuple[str, str, bool]] = []
    _audited = seen
    try:
        yield seen
    finally:
        _audited = None


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "asterisk" / "pjsip_users.conf"


# --- layout ------------------------------------------------------------------------------


def test_golden_main_file() -> None:
    """The main file is the shipped header, a blank line and one #include per shard file,
    by its absolute path, in shard order."""
    target = ShardedConfigFileTarget(Path("/etc/asterisk/provisioner/pjsip_users.conf"), shards=4)
    texts = target.render_files(rendered())
    main = texts[target.path]
    check_golden("pjsip_users_main_4.conf", main)
    assert list(texts) == [target.path, *target.files]
    check_main(main.encode(), target.files)


def test_a_shard_file_header_says_the_main_file_includes_it() -> None:
    """A shard file's header says the main file includes it and not to include it from
    pjsip.conf (the main file's header keeps saying to include that one)."""
    target = ShardedConfigFileTarget(Path("/etc/asterisk/provisioner/pjsip_users.conf"), shards=4)
    texts = target.render_files(rendered())
    shard = texts[target.files[0]]
    assert "Include this file from pjsip.conf" not in shard
    assert "; Do not include it from pjsip.conf: the main users file #includes it." in shard
    assert "Include this file from pjsip.conf" in texts[target.path]
    check_golden("pjsip_users_shard_0000_of_0004.conf", shard)


def test_main_file_includes_every_shard_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative target.path still gives absolute includes (Asterisk resolves a relative
    #include against its own config directory), of <stem>.d/NNNN-of-NNNN.conf, in order."""
    monkeypatch.chdir(tmp_path)
    target = ShardedConfigFileTarget(Path("var/pjsip_users.conf"), shards=16)
    target.apply(many(40))
    directives = parse((tmp_path / "var" / "pjsip_users.conf").read_bytes()).directives
    assert [(d.name, d.argument) for d in directives] == [
        ("include", str(tmp_path / "var" / "pjsip_users.d" / f"{i:04d}-of-0016.conf"))
        for i in range(16)
    ]
    assert target.directory == shard_directory(Path("var/pjsip_users.conf"))
    assert target.directory.is_absolute()
    assert all(Path(d.argument or "").is_file() for d in directives)


def test_shard_of_is_crc32_and_takes_any_id() -> None:
    """A user's shard is CRC-32 of its endpoint id modulo the count (the same in every
    process); an id that is not even valid UTF-8 still has one."""
    assert shard_of("1001", 256) == zlib.crc32(b"1001") % 256
    assert shard_name(7, 256) == "0007-of-0256.conf"
    assert 0 <= shard_of("\ud800\n[x]", 4) < 4


def test_shards_hold_exactly_what_the_single_file_holds(path: Path) -> None:
    """Together the shard files hold exactly the single file's sections, each once; each
    shard is the single layout's text for its own users under a shard's header."""
    users = many(300)
    single = ConfigFileTarget(path.with_name("single.conf"))
    single.apply(users)
    target = ShardedConfigFileTarget(path, shards=7)
    change = target.apply(users)
    assert change.added == tuple(u.endpoint_id for u in users)
    assert change.wrote
    want = [(s.name, s.options) for s in parse(single.path.read_bytes()).sections]
    got = [(s.name, s.options) for f in target.files for s in parse(f.read_bytes()).sections]
    assert len(got) == len(want) == 3 * len(users)
    assert sorted(got) == sorted(want)
    header = single.render_text([])
    shard_header = ConfigFileTarget(path.with_name("shard.conf"), shard=True).render_text([])
    for index, shard in enumerate(target.files):
        group = in_shard(users, index, 7)
        assert group, "each shard holds someone"
        body = single.render_text(group)[len(header) :]
        assert shard.read_text(encoding="utf-8") == shard_header + body
        assert shard.stat().st_mode & 0o777 == 0o640
    check_shards(target, users)


def test_a_second_apply_writes_nothing(path: Path) -> None:
    """Unchanged users change no file: every inode and mtime stays; nothing is reported."""
    users = many(50)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    before = snapshot(path.parent)
    for target in (ShardedConfigFileTarget(path, shards=4),) * 2:  # cold, then warm
        change = target.apply(users)
        assert change.empty
        assert not change.wrote
        assert change.unchanged == len(users)
    assert snapshot(path.parent) == before


def test_a_full_apply_writes_only_the_changed_shards(path: Path) -> None:
    """A full apply with one user changed rewrites that user's shard file only."""
    users = many(50)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    before = snapshot(path.parent)
    victim = users[10]
    moved = [
        replace(u, endpoint=(*u.endpoint[:-1], ("webrtc", "yes"))) if u is victim else u
        for u in users
    ]
    change = target.apply(moved)
    assert (change.updated, change.unchanged, change.wrote) == (
        (victim.endpoint_id,),
        len(users) - 1,
        True,
    )
    shard = target.file_of(victim.endpoint_id)
    assert changed_files(before, snapshot(path.parent)) == {
        shard,
        shard.with_name(shard.name + ".bak"),
    }


# --- a new target's full apply into shard files found in place -----------------------------


def _cold_apply(path: Path, users: list[UserObjects], shards: int = 4) -> Change:
    """A new sharded target's full apply of ``users`` (a restart, ``sync --once``)."""
    return ShardedConfigFileTarget(path, shards=shards).apply(users)


def _parsed_texts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bytes]]:
    """Each text the target modules give Asterisk's config parser from now on, by module
    (``configfile``, ``holdings``, ``shards``, ``site``); each still parsed."""
    from provisioner.targets import configfile, holdings, shards, site

    texts: dict[str, list[bytes]] = {}
    for module in (configfile, holdings, shards, site):
        seen = texts.setdefault(module.__name__.rsplit(".", 1)[1], [])

        def recorded(data: bytes, *args: Any, _seen: list[bytes] = seen, **kw: Any) -> Any:
            _seen.append(bytes(data))
            return parse(data, *args, **kw)

        monkeypatch.setattr(module, "parse", recorded)
    return texts


def test_a_cold_unchanged_apply_parses_no_shard_file_and_edits_next(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new target's apply of the users its shard files hold writes and parses none of
    them, counts every user unchanged, and its next one-user edit rewrites that user's
    shard only, counting every other user unchanged."""
    users = many(40)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    before = snapshot(path.parent)
    parsed = _parsed_texts(monkeypatch)
    target = ShardedConfigFileTarget(path, shards=4)
    change = target.apply(users)
    assert (change.empty, change.wrote, change.unchanged) == (True, False, len(users))
    assert parsed["holdings"] == []
    shard_texts = {shard.read_bytes() for shard in target.files}
    assert not shard_texts & {text for texts in parsed.values() for text in texts}
    assert snapshot(path.parent) == before
    victim = users[7]
    moved = replace(victim, endpoint=(*victim.endpoint[:-1], ("webrtc", "yes")))
    change = target.apply_partial([moved], [])
    assert (change.updated, change.unchanged) == ((victim.endpoint_id,), len(users) - 1)
    shard = target.file_of(victim.endpoint_id)
    assert changed_files(before, snapshot(path.parent)) == {
        shard,
        shard.with_name(shard.name + ".bak"),
    }
    check_shards(target, [moved if u is victim else u for u in users])


def test_a_cold_apply_rewrites_a_shard_file_edited_by_hand(path: Path) -> None:
    """A new target's apply of unchanged users rewrites exactly the shard file whose value
    was edited by hand (that user counted updated) and the one given a comment (its users
    counted unchanged: Asterisk reads the same objects), and no other file."""
    users = many(40)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    victim = users[5]
    edited = target.file_of(victim.endpoint_id)
    commented = next(f for f in target.files if f != edited)
    text = edited.read_text(encoding="utf-8")
    marker = f"[{victim.endpoint_id}]\ntype=endpoint\n"
    assert marker in text
    edited.write_text(text.replace(marker, marker + "context=hacked\n", 1), encoding="utf-8")
    commented.write_text(commented.read_text(encoding="utf-8") + "; by hand\n", encoding="utf-8")
    before = snapshot(path.parent)
    change = _cold_apply(path, users)
    assert change.updated == (victim.endpoint_id,)
    assert change.unchanged == len(users) - 1
    assert change.wrote
    changed = changed_files(before, snapshot(path.parent))
    assert changed == {edited, commented} | {
        f.with_name(f.name + ".bak") for f in (edited, commented)
    }
    check_shards(target, users)
    assert ShardedConfigFileTarget(path, shards=4).render_files(users) == {
        p: p.read_text(encoding="utf-8") for p in [path, *target.files]
    }


def test_a_cold_apply_rewrites_a_truncated_shard_file(path: Path) -> None:
    """A new target's apply of unchanged users rewrites a shard file cut short (its users
    past the cut counted added) and no other file."""
    users = many(40)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    shard = target.files[2]
    data = shard.read_bytes()
    held = in_shard(users, 2, 4)
    cut = data.index(f"\n[{held[len(held) // 2].endpoint_id}]".encode())
    shard.write_bytes(data[:cut])
    before = snapshot(path.parent)
    change = _cold_apply(path, users)
    assert change.added == tuple(u.endpoint_id for u in held[len(held) // 2 :])
    assert change.unchanged == len(users) - len(change.added)
    assert changed_files(before, snapshot(path.parent)) == {
        shard,
        shard.with_name(shard.name + ".bak"),
    }
    assert shard.read_bytes() == data
    check_shards(target, users)


def test_a_cold_apply_with_a_value_left_to_the_parser_writes_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new target's apply of unchanged users, one holding a value the canonical checks
    leave to the parser, checks every shard the general way (the shard holding that user
    parsed back) and writes nothing."""
    users = many(40)
    users[3] = replace(users[3], endpoint=(*users[3].endpoint, ("x", "a=>b")))
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    before = snapshot(path.parent)
    parsed = _parsed_texts(monkeypatch)
    change = _cold_apply(path, users)
    assert target.file_of(users[3].endpoint_id).read_bytes() in parsed["configfile"]
    assert (change.empty, change.wrote, change.unchanged) == (True, False, len(users))
    assert snapshot(path.parent) == before


def test_a_cold_apply_refuses_a_shard_file_holding_a_foreign_section(path: Path) -> None:
    """A new target's apply into shard files one of which holds a section provisioner never
    writes (a transport) raises :class:`ForeignTargetFile` naming that file and writes
    nothing."""
    users = many(40)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    shard = target.files[1]
    shard.write_text(
        shard.read_text(encoding="utf-8") + "\n[transport-udp]\ntype=transport\nprotocol=udp\n",
        encoding="utf-8",
    )
    before = snapshot(path.parent)
    with pytest.raises(ForeignTargetFile, match=shard.name):
        _cold_apply(path, users)
    assert snapshot(path.parent) == before


def test_a_cold_apply_refuses_a_foreign_main_file(path: Path) -> None:
    """A new sharded target whose main file is Asterisk's own pjsip.conf (a transport and
    an include) raises :class:`ForeignTargetFile` and writes nothing."""
    path.parent.mkdir(parents=True)
    path.write_text(
        "[transport-udp]\ntype=transport\nprotocol=udp\nbind=0.0.0.0\n\n#include other.conf\n"
    )
    before = snapshot(path.parent)
    with pytest.raises(ForeignTargetFile):
        _cold_apply(path, many(20))
    # Only the writers' lock file is new.
    assert {p: v for p, v in snapshot(path.parent).items() if p.suffix != ".lock"} == before


# --- one edit ----------------------------------------------------------------------------


def test_one_user_edit_rewrites_exactly_its_shard(path: Path) -> None:
    """apply_partial of one user writes that user's shard file (old bytes kept as .bak) and
    opens, renames or links no other file but the writers' lock: neither the other shards
    nor the main file."""
    users = many(200)
    target = ShardedConfigFileTarget(path, shards=8)
    target.apply(users)
    victim = next(u for u in REPRESENTATIVE if u.extension == "1003")
    edited = render_user(
        replace(victim, voice=replace(victim.voice, context="sales")), RenderSettings()
    )
    shard = target.file_of("1003")
    before = snapshot(path.parent)
    with recording() as touched:
        change = target.apply_partial([edited], [])
    after = snapshot(path.parent)
    assert (change.updated, change.added, change.removed) == (("1003",), (), ())
    assert change.unchanged == len(users) - 1
    assert change.wrote
    assert changed_files(before, after) == {shard, shard.with_name(shard.name + ".bak")}
    assert after[shard.with_name(shard.name + ".bak")][2] == before[shard][2]
    assert touched, "the audit hook saw the write"
    for _event, name, _writing in touched:
        where = Path(name)
        if where == lock_file(path):
            continue  # the writers' lock, opened to be taken
        assert where == shard.parent or where.name.lstrip(".").startswith(shard.name), touched
    expected = sorted([edited, *(u for u in users if u.endpoint_id != "1003")], key=_order)
    check_shards(target, expected)
    assert ShardedConfigFileTarget(path, shards=8).apply(expected).empty


def test_an_edit_after_shard_files_were_deleted_writes_them_again(path: Path) -> None:
    """An edit made once shard files the main file includes were deleted by hand (the
    shard directory removed) writes them again, as last written, beside the edited one:
    a reload it asks for never finds the main file including a missing file, for which
    Asterisk drops the whole configuration."""
    import shutil

    users = many(40)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    shutil.rmtree(target.directory)
    victim = next(u for u in REPRESENTATIVE if u.extension == "1003")
    edited = render_user(
        replace(victim, voice=replace(victim.voice, context="sales")), RenderSettings()
    )
    with capture_logs() as logs:
        change = target.apply_partial([edited], [])
    assert (change.updated, change.added, change.removed) == (("1003",), (), ())
    assert change.wrote
    (missing,) = [e for e in logs if e["event"] == "target.shards_missing"]
    assert missing["files"] == [p.name for p in target.files]
    expected = sorted([edited, *(u for u in users if u.endpoint_id != "1003")], key=_order)
    check_shards(target, expected)
    shutil.rmtree(target.directory)
    same = target.apply_partial([edited], [])  # no change, the files gone again
    assert same.wrote
    check_shards(target, expected)


def test_an_edit_after_the_main_file_was_deleted_writes_it_again(path: Path) -> None:
    """An edit made once the main file was deleted by hand (alone, or with the shard
    directory) writes it again, including every shard file, beside the edited shard,
    logging ``target.main_missing``: Asterisk would otherwise lose every endpoint at the
    next reload until the next full reconcile."""
    import shutil

    users = many(40)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    main = path.read_bytes()
    victim = next(u for u in REPRESENTATIVE if u.extension == "1003")
    edited = render_user(
        replace(victim, voice=replace(victim.voice, context="sales")), RenderSettings()
    )
    expected = sorted([edited, *(u for u in users if u.endpoint_id != "1003")], key=_order)
    path.unlink()
    with capture_logs() as logs:
        change = target.apply_partial([edited], [])
    assert (change.updated, change.added, change.removed, change.wrote) == (
        ("1003",),
        (),
        (),
        True,
    )
    (missing,) = [e for e in logs if e["event"] == "target.main_missing"]
    assert (missing["log_level"], missing["path"]) == ("warning", str(path))
    assert path.read_bytes() == main
    check_shards(target, expected)
    path.unlink()
    shutil.rmtree(target.directory)
    assert target.apply_partial([edited], []).wrote  # no change, every file gone
    assert path.read_bytes() == main
    check_shards(target, expected)
    assert not target.apply_partial([edited], []).wrote  # all in place: nothing written


def test_an_edit_across_two_shards_writes_those_two(path: Path) -> None:
    """Removing a user from one shard and adding one to another rewrites those two files
    only, and a new target object (after a restart) edits from the files as they are."""
    users = many(60)
    removed = users[3]
    added = render_user(make_user("99999", "newbie", "New Bie"), RenderSettings())
    assert shard_of(removed.endpoint_id, 8) != shard_of("99999", 8)
    ShardedConfigFileTarget(path, shards=8).apply(users)
    before = snapshot(path.parent)
    target = ShardedConfigFileTarget(path, shards=8)  # knows nothing yet
    with recording() as touched:
        change = target.apply_partial([added], [removed.endpoint_id])
    assert (change.added, change.removed) == (("99999",), (removed.endpoint_id,))
    files = {target.file_of(e) for e in ("99999", removed.endpoint_id)}
    assert changed_files(before, snapshot(path.parent)) == files | {
        f.with_name(f.name + ".bak") for f in files
    }
    assert {Path(p) for e, p, w in touched if e == "os.rename"} == files | {
        f.with_name(f.name + ".bak") for f in files
    }
    expected = sorted([added, *(u for u in users if u is not removed)], key=_order)
    check_shards(target, expected)


def test_an_unchanged_edit_writes_nothing(path: Path) -> None:
    """Putting users as they are writes no file."""
    users = many(20)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    before = snapshot(path.parent)
    change = target.apply_partial(users[:3], [])
    assert change.empty
    assert not change.wrote
    assert change.unchanged == len(users)
    assert snapshot(path.parent) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file another owner")
@pytest.mark.parametrize("given", ["main file", "shard directory"])
def test_a_new_shard_file_takes_the_owner_and_group_the_operator_gave(
    path: Path, given: str
) -> None:
    """Shard files written for the first time take the owner and group of the main file an
    operator gave to Asterisk (chown asterisk:asterisk), or of the shard directory when
    there is no main file yet, as a rewritten file keeps its own: Asterisk can read them."""
    target = ShardedConfigFileTarget(path, shards=4)
    chowned = path if given == "main file" else target.directory
    if given == "main file":
        path.parent.mkdir()
        path.write_bytes(b"; the file before\n")
    else:
        target.directory.mkdir(parents=True)
    os.chown(chowned, 4242, 4343)
    target.apply(many(40))
    for shard in target.files:
        info = shard.stat()
        assert (shard.name, info.st_uid, info.st_gid) == (shard.name, 4242, 4343)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file another owner")
@pytest.mark.parametrize("given", ["main file", "target directory"])
def test_a_shard_directory_the_first_apply_makes_is_readable_as_the_main_file_is(
    path: Path, given: str
) -> None:
    """The shard directory a first apply makes takes the owner and group of the main file
    an operator gave to Asterisk (else of the target directory), mode 0750 whatever the
    writer's umask: Asterisk can reach the shard files the main file includes."""
    path.parent.mkdir()
    chowned = path.parent
    if given == "main file":
        path.write_bytes(b"; the file before\n")
        chowned = path
    os.chown(chowned, 4242, 4343)
    target = ShardedConfigFileTarget(path, shards=4)
    was = os.umask(0o077)
    try:
        target.apply(many(40))
    finally:
        os.umask(was)
    info = target.directory.stat()
    assert (info.st_uid, info.st_gid, oct(info.st_mode & 0o7777)) == (4242, 4343, oct(0o750))
    check_shards(target, many(40))


# --- changing the layout -----------------------------------------------------------------


def test_changing_the_shard_count_switches_to_a_whole_new_set(path: Path) -> None:
    """From 4 to 8 shards: the 8 files are written first, then the main file switched, then
    the 4 old files (and their .bak) deleted, and the main file's .bak, which includes
    them (restored, it would break Asterisk's load); every user is in exactly one file."""
    users = many(100)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    old = set(ShardedConfigFileTarget(path, shards=4).files)
    target = ShardedConfigFileTarget(path, shards=8)
    with recording() as touched:
        change = target.apply(users)
    assert (change.added, change.updated, change.removed) == ((), (), ())
    assert change.unchanged == len(users)
    assert change.wrote
    assert sorted(target.directory.iterdir()) == list(target.files)
    assert set(path.parent.iterdir()) == {target.directory, path, lock_file(path)}
    sections = [s.name for f in target.files for s in parse(f.read_bytes()).sections]
    assert sorted(sections) == sorted(
        s for u in users for s in (u.endpoint_id, u.auth_id, u.aor_id)
    )
    check_shards(target, users)
    # The order: every new shard in place, then the main file, then the old set removed.
    renamed = [Path(p) for e, p, _ in touched if e == "os.rename"]
    main_at = renamed.index(path)
    assert set(target.files) <= set(renamed[:main_at])
    removed = [i for i, (e, p, _) in enumerate(touched) if e == "os.remove" and Path(p) in old]
    assert len(removed) == 4
    assert min(removed) > [i for i, (e, p, _) in enumerate(touched) if e == "os.rename"][main_at]


def test_from_one_file_to_shards_and_back(path: Path) -> None:
    """Switching a single file to shards and back counts every user unchanged (the change is
    counted against what Asterisk loads now) and leaves no shard file behind, nor a .bak
    including them; the single file's .bak, which includes none, is kept."""
    users = many(30)
    ConfigFileTarget(path).apply(users)
    single = path.read_bytes()
    change = ShardedConfigFileTarget(path, shards=4).apply(users)
    assert (change.unchanged, change.empty, change.wrote) == (len(users), True, True)
    assert path.with_name(path.name + ".bak").read_bytes() == single
    back = ConfigFileTarget(path)
    edited = sorted([*users[1:], *rendered(users=[make_user("777", "seven", "Seven")])], key=_order)
    change = back.apply(edited)
    assert (change.added, change.removed) == (("777",), (users[0].endpoint_id,))
    assert change.unchanged == len(users) - 1
    assert not shard_directory(path).exists()
    assert not path.with_name(path.name + ".bak").exists()
    assert (
        path.read_bytes() == ConfigFileTarget(path.with_name("x.conf")).render_text(edited).encode()
    )


def test_one_file_target_edits_the_users_a_sharded_main_file_holds(path: Path) -> None:
    """Before any apply, a one-file target's edit starts from the users of the shard files
    the current main file includes, not from an empty file."""
    users = many(20)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    newcomer = rendered(users=[make_user("778", "eight", "Eight")])
    change = ConfigFileTarget(path).apply_partial(newcomer, [])
    assert change.added == ("778",)
    check_rendered(path.read_bytes(), sorted([*users, *newcomer], key=_order))
    assert not shard_directory(path).exists()


def test_a_switch_cut_short_is_finished_by_the_next_apply(path: Path) -> None:
    """A crash during a switch (some new shard files written with other content, a stale
    temporary file, the main file still on the old set) is repaired by the next full
    apply: the change is counted against the old set, and only the new set remains."""
    users = many(40)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    directory = shard_directory(path)
    (directory / shard_name(0, 8)).write_text("[junk]\ntype=aor\n")
    stale = directory / f".{shard_name(1, 8)}.abc123.tmp"
    stale.write_text("half")
    aged = stale.stat().st_mtime - STALE_TEMP_SECONDS - 10
    os.utime(stale, (aged, aged))
    target = ShardedConfigFileTarget(path, shards=8)
    assert not stale.exists()
    change = target.apply(users[1:])
    assert (change.added, change.updated, change.removed) == ((), (), (users[0].endpoint_id,))
    assert ("aor", "junk") not in change.changed_objects
    assert {p.name for p in directory.iterdir()} == {f.name for f in target.files} | {
        shard_name(0, 8) + ".bak"
    }
    check_shards(target, users[1:])


def test_a_switch_to_shard_files_already_in_place_syncs_their_directory_first(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch whose shard files are all in place already (a writer killed after renaming
    them and before fsyncing their directory) fsyncs the shard directory before the main
    file names them, so a power loss cannot leave it including files that are gone."""
    users = many(40)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    old_main = path.read_bytes()
    ShardedConfigFileTarget(path, shards=8).apply(users)
    # The 8 files as the killed writer left them, the main file still on the 4-set.
    path.write_bytes(old_main)
    fsync_directory = files_module.fsync_directory

    def recorded(directory: Path) -> None:
        if _audited is not None:
            _audited.append(("fsync", os.fsdecode(directory), True))
        fsync_directory(directory)

    monkeypatch.setattr(files_module, "fsync_directory", recorded)
    target = ShardedConfigFileTarget(path, shards=8)
    with recording() as touched:
        assert target.apply(users).wrote
    events = [(event, Path(p)) for event, p, _ in touched if event in ("fsync", "os.rename")]
    assert ("fsync", target.directory) in events
    assert events.index(("fsync", target.directory)) < events.index(("os.rename", path))
    check_shards(target, users)


def test_old_shard_files_are_deleted_only_once_the_main_file_is_durable(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard files the main file no longer names, left by a writer killed before its last
    fsync, are deleted only after the main file's directory is fsynced (by the sharded
    target and by the one-file target taking over), so a power loss cannot bring back a
    main file naming deleted files."""
    users = many(40)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    four = {shard: shard.read_bytes() for shard in ShardedConfigFileTarget(path, shards=4).files}
    ShardedConfigFileTarget(path, shards=8).apply(users)
    fsync_directory = files_module.fsync_directory

    def recorded(directory: Path) -> None:
        if _audited is not None:
            _audited.append(("fsync", os.fsdecode(directory), True))
        fsync_directory(directory)

    monkeypatch.setattr(files_module, "fsync_directory", recorded)
    for target in (ShardedConfigFileTarget(path, shards=8), ConfigFileTarget(path)):
        target.apply(users)  # the main file as this target writes it
        for shard, data in four.items():  # as the killed writer left them
            shard.parent.mkdir(exist_ok=True)
            shard.write_bytes(data)
        with recording() as touched:
            assert not target.apply(users).wrote
        events = [(event, Path(p)) for event, p, _ in touched if event in ("fsync", "os.remove")]
        removed = [i for i, (event, p) in enumerate(events) if p in four]
        assert len(removed) == len(four)
        assert ("fsync", path.parent) in events[: min(removed)]
        assert not any(shard.exists() for shard in four)


def test_old_shard_files_are_deleted_only_once_a_linked_main_file_is_durable(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With target.path a symbolic link to a file in another directory, shard files a
    killed writer left are deleted only after the directory of the main file itself (where
    its replacement was renamed) is fsynced, not only the link's."""
    real = path.parent.parent / "real" / path.name
    real.parent.mkdir(parents=True)
    real.write_bytes(b"")
    path.parent.mkdir()
    path.symlink_to(real)
    users = many(40)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    four = {shard: shard.read_bytes() for shard in ShardedConfigFileTarget(path, shards=4).files}
    ShardedConfigFileTarget(path, shards=8).apply(users)
    fsync_directory = files_module.fsync_directory

    def recorded(directory: Path) -> None:
        if _audited is not None:
            _audited.append(("fsync", os.fsdecode(directory), True))
        fsync_directory(directory)

    monkeypatch.setattr(files_module, "fsync_directory", recorded)
    for target in (ShardedConfigFileTarget(path, shards=8), ConfigFileTarget(path)):
        target.apply(users)
        for shard, data in four.items():  # as the killed writer left them
            shard.parent.mkdir(exist_ok=True)
            shard.write_bytes(data)
        with recording() as touched:
            assert not target.apply(users).wrote
        events = [(event, Path(p)) for event, p, _ in touched if event in ("fsync", "os.remove")]
        removed = [i for i, (event, p) in enumerate(events) if p in four]
        assert len(removed) == len(four)
        assert ("fsync", real.parent) in events[: min(removed)]
        assert path.is_symlink()


def test_a_new_shard_directory_beside_a_linked_main_file_is_durable_before_it_is_named(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With target.path a symbolic link to a file in another directory, the shard directory
    (beside the link) is made durable in the link's directory before the main file names
    its files: a power loss cannot leave a main file including a directory that is gone."""
    real = path.parent.parent / "real" / path.name
    real.parent.mkdir(parents=True)
    real.write_bytes(b"")
    path.parent.mkdir()
    path.symlink_to(real)
    fsync_directory = files_module.fsync_directory

    def recorded(directory: Path) -> None:
        if _audited is not None:
            _audited.append(("fsync", os.fsdecode(directory), True))
        fsync_directory(directory)

    monkeypatch.setattr(files_module, "fsync_directory", recorded)
    with recording() as touched:
        ShardedConfigFileTarget(path, shards=4).apply(many(40))
    events = [(event, Path(p)) for event, p, _ in touched if event in ("fsync", "os.rename")]
    named = events.index(("os.rename", real))
    assert ("fsync", path.parent) in events[:named]
    check_main(real.read_bytes(), ShardedConfigFileTarget(path, shards=4).files)


@pytest.mark.parametrize("shards", [0, 4])
def test_directories_a_first_write_makes_are_durable_before_it_ends(
    tmp_path: Path, shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each directory a first write makes (the target directory and its missing parents,
    the shard directory) has its entry fsynced in its parent directory before the apply
    returns: a power loss cannot take away a file reported written."""
    path = tmp_path / "not" / "yet" / "pjsip_users.conf"
    fsynced: list[Path] = []
    fsync_directory = files_module.fsync_directory

    def recorded(directory: Path) -> None:
        fsynced.append(Path(directory))
        fsync_directory(directory)

    monkeypatch.setattr(files_module, "fsync_directory", recorded)
    target = make_target(path, shards)
    target.apply(many(10))
    made = [tmp_path / "not", tmp_path / "not" / "yet"]
    if shards:
        made.append(shard_directory(path))
    assert {directory.parent for directory in made} <= set(fsynced)


def test_an_edit_before_the_switch_applies_everyone(path: Path) -> None:
    """An edit through a target whose count the main file does not include yet is a full
    apply of the current users, edited: the switch happens and nobody is lost."""
    users = many(30)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    target = ShardedConfigFileTarget(path, shards=2)
    change = target.apply_partial([], [users[0].endpoint_id])
    assert change.removed == (users[0].endpoint_id,)
    check_shards(target, users[1:])
    assert sorted(target.directory.iterdir()) == list(target.files)


# --- what a full apply keeps, guards and plans -------------------------------------------


def test_kept_users_stay_in_their_shards(path: Path) -> None:
    """Endpoint ids in ``keep`` keep their current objects, with the same count and across a
    change of count."""
    users = many(30)
    kept = [users[2].endpoint_id, users[7].endpoint_id]
    without = [u for u in users if u.endpoint_id not in kept]
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    change = target.apply(without, keep=kept)
    assert (change.removed, change.wrote, change.unchanged) == ((), False, len(users))
    change = ShardedConfigFileTarget(path, shards=3).apply(without, keep=kept)
    assert (change.removed, change.unchanged) == ((), len(users))
    check_shards(ShardedConfigFileTarget(path, shards=3), users)


def test_guard_sees_every_shard_and_can_abort(path: Path) -> None:
    """The guard sees the change of all shard files together; raising writes nothing."""
    users = many(30)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    before = snapshot(path.parent)
    seen: list[Change] = []

    def guard(change: Change) -> None:
        seen.append(change)
        raise RuntimeError("too many removals")

    with pytest.raises(RuntimeError):
        target.apply(users[:2], guard=guard)
    (change,) = seen
    assert change.removed == tuple(u.endpoint_id for u in users[2:])
    assert snapshot(path.parent) == before
    with pytest.raises(RuntimeError):
        ShardedConfigFileTarget(path, shards=5).apply(users[:2], guard=guard)
    assert seen[1].removed == change.removed
    assert snapshot(path.parent) == before


def test_plan_shows_only_the_files_that_would_change(path: Path) -> None:
    """plan's diff names the one shard a change touches (not the main file), and on a new
    count the main file and every new shard; credentials redacted; nothing written."""
    users = many(30)
    target = ShardedConfigFileTarget(path, shards=4)
    target.apply(users)
    before = snapshot(path.parent)
    victim = REPRESENTATIVE[1]
    rotated = render_user(replace(victim, sip_md5="0" * 32, sip_sha256="1" * 64), RenderSettings())
    plan = target.plan(
        sorted([rotated, *(u for u in users if u.endpoint_id != "1002")], key=_order)
    )
    assert plan.updated == ("1002",)
    shard = target.file_of("1002")
    assert [line for line in plan.diff.splitlines() if line.startswith("+++")] == [f"+++ {shard}"]
    assert "+password_digest=<redacted> <changed>" in plan.diff
    assert "0" * 32 not in plan.diff
    switch = ShardedConfigFileTarget(path, shards=2).plan(users)
    assert switch.empty
    heads = [line for line in switch.diff.splitlines() if line.startswith("+++")]
    assert heads[0] == f"+++ {path}"
    assert len(heads) == 3
    assert snapshot(path.parent) == before


@pytest.mark.parametrize(("before", "after"), [(4, 2), (0, 3), (3, 0)])
def test_plan_across_a_change_of_layout_marks_only_changed_secrets(
    path: Path, before: int, after: int
) -> None:
    """plan's diff on a new shard count (or to or from one file) shows each credential as
    '<redacted>', marked '<changed>' only for the one that differs from what Asterisk
    holds now, wherever the old layout kept it."""
    users = many(30)
    make_target(path, before).apply(users)
    victim = REPRESENTATIVE[1]
    rotated = render_user(replace(victim, sip_md5="0" * 32, sip_sha256="1" * 64), RenderSettings())
    edited = sorted([rotated, *(u for u in users if u.endpoint_id != "1002")], key=_order)
    plan = make_target(path, after).plan(edited)
    assert plan.updated == ("1002",)
    added = [line for line in plan.diff.splitlines() if line.startswith("+password_digest=")]
    assert len(added) == len(users)
    assert [line for line in added if line.endswith("<changed>")] == [
        "+password_digest=<redacted> <changed>"
    ]
    assert "0" * 32 not in plan.diff


# --- checks ------------------------------------------------------------------------------

#: The shipped section macro, with an injected section after the auth of 1003 only.
BAD_FOR_1003 = (
    (SHIPPED_TEMPLATES / "section.j2")
    .read_text()
    .replace(
        "{% endfor -%}\n", "{% endfor -%}\n{% if id == '1003-auth' %}[evil]\nx=1\n{% endif -%}\n"
    )
)


def test_a_shard_failing_its_check_is_not_written(path: Path, tmp_path: Path) -> None:
    """A template that breaks one user's shard fails that shard's check: a full apply
    raises naming the shard and writes no file (as one file: a failed check writes
    nothing); edits of users in other shards still apply; an edit of that user does not."""
    users = many(30)
    ShardedConfigFileTarget(path, shards=4).apply(users)
    bad = shard_name(shard_of("1003", 4), 4)
    other = next(u for u in users if shard_of(u.endpoint_id, 4) != shard_of("1003", 4))
    moved = render_user(
        make_user(other.endpoint_id, other.username, "Moved Name"), RenderSettings()
    )
    edited = sorted([moved, *(u for u in users if u is not other)], key=_order)
    before = snapshot(path.parent)
    overrides = write_override(tmp_path / "tpl", "section.j2", BAD_FOR_1003)
    target = ShardedConfigFileTarget(path, overrides, shards=4)
    with pytest.raises(RenderCheckFailed, match=rf"^{bad}: .*sections came out") as info:
        target.apply(edited)
    # The injected name is not quoted: an override may print any value there.
    assert "section 6 [1003] came out as [<other>]" in str(info.value)
    assert snapshot(path.parent) == before
    change = target.apply_partial([moved], [])
    assert change.updated == (other.endpoint_id,)
    shard = target.file_of(other.endpoint_id)
    assert changed_files(before, snapshot(path.parent)) == {
        shard,
        shard.with_name(shard.name + ".bak"),
    }
    after_edit = snapshot(path.parent)
    one = render_user(make_user("1003", "carol", "Carol Renamed"), RenderSettings())
    with pytest.raises(RenderCheckFailed, match=bad):
        target.apply_partial([one], [])
    assert snapshot(path.parent) == after_edit


#: A header.j2 that is not plain (it opens a section) in the shard holding user 1003 only.
BAD_HEADER_FOR_1003 = (
    "{% if users | selectattr('endpoint_id', 'equalto', '1003') | list %}[evil]\nx=1\n"
    "{% endif %}; generated\n"
)


def _conf_files(root: Path) -> list[Path]:
    """Every config file, backup or temporary file under ``root`` (not the writers' lock)."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and ".conf" in p.name and p.suffix != ".lock"
    )


def test_a_first_apply_with_one_shard_header_failing_writes_nothing(
    path: Path, tmp_path: Path
) -> None:
    """A new target's first apply whose header breaks one shard (the others' checked and
    ready) raises naming that shard and leaves no shard file, main file or temporary."""
    overrides = write_override(tmp_path / "tpl", "header.j2", BAD_HEADER_FOR_1003)
    target = ShardedConfigFileTarget(path, overrides, shards=4)
    bad = shard_name(shard_of("1003", 4), 4)
    with pytest.raises(RenderCheckFailed, match=rf"^{bad}: .*sections came out"):
        target.apply(many(30))
    assert _conf_files(path.parent) == []


def test_a_switch_with_one_shard_header_failing_leaves_the_old_set_untouched(
    path: Path, tmp_path: Path
) -> None:
    """A switch to a new shard count whose header breaks one new shard raises and leaves
    every file of the old set as it was (inodes, mtimes, bytes), and no new file."""
    users = many(30)
    ShardedConfigFileTarget(path, shards=2).apply(users)
    before = snapshot(path.parent)
    overrides = write_override(tmp_path / "tpl", "header.j2", BAD_HEADER_FOR_1003)
    target = ShardedConfigFileTarget(path, overrides, shards=4)
    with pytest.raises(RenderCheckFailed, match=shard_name(shard_of("1003", 4), 4)):
        target.apply(users)
    assert snapshot(path.parent) == before


def test_a_switch_failing_after_its_files_were_staged_leaves_no_temporary(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch to a new shard count that fails while counting its change, once every new
    shard file is staged, leaves every file as it was and no temporary file."""
    users = many(30)
    ShardedConfigFileTarget(path, shards=2).apply(users)
    before = snapshot(path.parent)

    def failing(*args: Any) -> Change:
        raise RuntimeError("counting failed")

    monkeypatch.setattr(sharded_module, "compare", failing)
    with pytest.raises(RuntimeError, match="counting failed"):
        ShardedConfigFileTarget(path, shards=4).apply(users)
    assert snapshot(path.parent) == before


def test_a_first_apply_with_a_value_left_to_the_parser_checks_every_shard(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new target's first apply holding a value the canonical checks leave to the parser
    checks every shard the general way (the shard holding that user parsed back before
    it is written), writes every shard file parsing back to exactly its users, counts
    every user added, and leaves no temporary file."""
    users = many(40)
    odd = replace(users[3], endpoint=(*users[3].endpoint, ("x", "a=>b")))
    users[3] = odd
    target = ShardedConfigFileTarget(path, shards=4)
    parsed = _parsed_texts(monkeypatch)
    change = target.apply(users)
    assert target.file_of(odd.endpoint_id).read_bytes() in parsed["configfile"]
    assert change.added == tuple(u.endpoint_id for u in users)
    assert len(change.changed_objects) == 3 * len(users)
    check_shards(target, users)
    assert [p for p in _conf_files(path.parent) if p.name.endswith(".tmp")] == []


def test_a_first_apply_counts_every_object_once_in_render_order(path: Path) -> None:
    """A new target's first apply reports every user added and each of their objects once,
    in the users' order, as the one-file target does."""
    users = many(60)
    sharded = ShardedConfigFileTarget(path, shards=8).apply(users)
    single = ConfigFileTarget(path.with_name("single.conf")).apply(users)
    assert sharded.added == single.added
    assert sharded.changed_objects == single.changed_objects
    assert len(sharded.changed_objects) == 3 * len(users)


def test_a_path_asterisk_cannot_include_is_refused(tmp_path: Path) -> None:
    """A shard directory whose path an #include would not keep literally (a comment mark,
    a quote, a glob character) is a config error naming target.path."""
    for name in ("a;b", 'a"b', "a*b", "a[1]"):
        with pytest.raises(ConfigError) as info:
            ShardedConfigFileTarget(tmp_path / name / "pjsip_users.conf", shards=2)
        assert info.value.problems[0].field == "target.path"
    with pytest.raises(ConfigError) as info:
        ShardedConfigFileTarget(tmp_path / "x.conf", shards=0)
    assert info.value.problems[0].field == "target.shards"


def test_a_shard_path_longer_than_asterisk_opens_is_refused(tmp_path: Path) -> None:
    """A main file whose shard files' absolute paths exceed the 255 bytes Asterisk's
    #include opens is a config error naming target.path and the rule; 255 bytes is taken."""

    def main_file(shard_path_bytes: int) -> Path:
        # The shard file is <dir>/p.d/0000-of-0002.conf: pad <dir> to the length asked.
        fixed = len(str(tmp_path)) + len("/") + len("/p.d/0000-of-0002.conf")
        return tmp_path / ("d" * (shard_path_bytes - fixed)) / "p.conf"

    longest = main_file(INCLUDE_PATH_MAX)
    target = ShardedConfigFileTarget(longest, shards=2)
    assert len(str(target.files[0])) == INCLUDE_PATH_MAX
    target.apply(many(5))
    check_main(longest.read_bytes(), target.files)
    with pytest.raises(ConfigError) as info:
        ShardedConfigFileTarget(main_file(INCLUDE_PATH_MAX + 1), shards=2)
    (problem,) = info.value.problems
    assert problem.field == "target.path"
    assert f"would be {INCLUDE_PATH_MAX + 1} bytes" in problem.rule
    assert f"opens at most {INCLUDE_PATH_MAX}" in problem.rule


def test_from_config_builds_the_sharded_target(tmp_path: Path) -> None:
    """target.shards >= 1 gives the sharded target; 0 the single file."""
    main = tmp_path / "p.conf"
    sharded = config_file_target(
        load_config(env={}, overrides={"target": {"path": str(main), "shards": 64}})
    )
    assert isinstance(sharded, ShardedConfigFileTarget)
    assert (sharded.shards, sharded.path, sharded.directory) == (64, main, tmp_path / "p.d")
    single = config_file_target(load_config(env={}, overrides={"target": {"path": str(main)}}))
    assert type(single) is ConfigFileTarget


# --- through the applier and the command line ---------------------------------------------


def test_render_dry_run_and_check_in_sharded_mode(tmp_path: Path) -> None:
    """'render --dry-run' prints the main file's and the shards' diffs and writes nothing;
    'render' writes them; 'check' names the shard directory."""
    from .faultkit import cheap_hasher, cli, seed_store, store_url, write_config

    cheap_hasher()
    seed_store(store_url(tmp_path), 5).dispose()
    config = write_config(tmp_path)
    shards = ("--set", "target.shards=4")
    dry = cli(config, *shards, "render", "--dry-run").out
    main = tmp_path / "pjsip_users.conf"
    assert f"+++ {main}" in dry
    assert f'+#include "{tmp_path / "pjsip_users.d" / "0000-of-0004.conf"}"' in dry
    assert "would be added 6" in dry  # the five agents and root
    assert not main.exists()
    assert "added 6" in cli(config, *shards, "render").out
    assert len(list((tmp_path / "pjsip_users.d").iterdir())) == 4
    assert "would be added 0" in cli(config, *shards, "render", "--dry-run").out
    checked = cli(config, *shards, "check", check=False).out
    assert f"including 4 shard files in {tmp_path / 'pjsip_users.d'}" in checked


def test_check_refuses_a_path_asterisk_cannot_include(tmp_path: Path) -> None:
    """'check' fails the target line for a sharded main file whose shard directory an
    #include would not keep literally, naming target.path, as the daemon would refuse it."""
    from .faultkit import cli, write_config

    odd = tmp_path / "a*b"
    odd.mkdir()
    config = write_config(tmp_path)
    main = ("--set", f"target.path={odd / 'pjsip_users.conf'}", "--set", "target.shards=4")
    checked = cli(config, *main, "check", check=False)
    assert checked.code == 1
    (line,) = [line for line in checked.out.splitlines() if "target" in line and "#include" in line]
    assert "target.path" in line


def _check_target(tmp_path: Path, **target: str) -> tuple[Path, tuple[str, ...], int, str]:
    """'check' on a seeded store, each of ``target`` given as ``--set target.<key>=<value>``:
    the config, those flags, the exit code and the one target line."""
    from .faultkit import cli, seed_store, store_url, write_config

    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path)
    flags = tuple(f for key, value in target.items() for f in ("--set", f"target.{key}={value}"))
    checked = cli(config, *flags, "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    return config, flags, checked.code, line


@pytest.mark.parametrize("shards", ["0", "4"])
def test_check_fails_its_target_line_when_the_target_path_is_a_directory(
    tmp_path: Path, shards: str
) -> None:
    """'check' fails the target line (exit 1) when target.path names a directory, which
    every apply fails to read and replace (exit 9), with one file or in shards."""
    from .faultkit import cli

    out = tmp_path / "out"
    out.mkdir()
    config, flags, code, line = _check_target(tmp_path, path=str(out), shards=shards)
    assert code == 1
    assert line == f"FAIL  target: {out} is not a regular file"
    assert cli(config, *flags, "sync", "--once", check=False).code == 9  # as check foretold


@pytest.mark.parametrize("shards", ["0", "4"])
def test_check_fails_its_target_line_for_a_templates_directory_that_is_not_one(
    tmp_path: Path, shards: str
) -> None:
    """'check' fails the target line (exit 1) when target.templates names no directory,
    which the daemon refuses at its start (exit 2), with one file or in shards."""
    from .faultkit import cli

    absent = tmp_path / "absent"
    config, flags, code, line = _check_target(tmp_path, templates=str(absent), shards=shards)
    assert code == 1
    assert line == f"FAIL  target: target.templates: {str(absent)!r} is not a directory"
    assert cli(config, *flags, "run", "--burst", check=False).code == 2  # as check foretold


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"; Site ACME\n{% if %}\n", "header.j2 line 2: Expected an expression"),
        ("; Soci\u00e9t\u00e9 ACME\n".encode("latin-1"), "'header.j2' is not UTF-8 (line 1)"),
    ],
)
@pytest.mark.parametrize("shards", ["0", "4"])
def test_check_fails_its_target_line_for_an_override_template_that_does_not_compile(
    tmp_path: Path, shards: str, text: bytes, reason: str
) -> None:
    """'check' fails the target line (exit 1), naming the template and line, for an
    override that does not compile (a syntax error, bytes that are not UTF-8), which
    every apply refuses (exit 8), with one file or in shards."""
    from .faultkit import cli

    overrides = tmp_path / "tpl"
    overrides.mkdir()
    (overrides / "header.j2").write_bytes(text)
    config, flags, code, line = _check_target(tmp_path, templates=str(overrides), shards=shards)
    assert code == 1
    assert line.startswith("FAIL  target: template ")
    assert reason in line
    assert cli(config, *flags, "render", check=False).code == 8  # as check foretold


def test_check_fails_its_target_line_for_a_subdirectory_template_that_does_not_compile(
    tmp_path: Path,
) -> None:
    """'check' fails the target line (exit 1), naming the template by its path, for a
    template in a subdirectory of the override directory that does not compile, which
    the apply including it refuses (exit 8)."""
    from .faultkit import cli

    overrides = tmp_path / "tpl"
    (overrides / "sub").mkdir(parents=True)
    (overrides / "header.j2").write_text('{% include "sub/note.j2" %}')
    (overrides / "sub" / "note.j2").write_text("; {% if %}\n")
    config, flags, code, line = _check_target(tmp_path, templates=str(overrides))
    assert code == 1
    assert line.startswith("FAIL  target: template sub/note.j2 line 1"), line
    assert cli(config, *flags, "render", check=False).code == 8  # as check foretold


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (
            {"header.j2": '; x\n{% include "gone.j2" %}'},
            "template 'gone.j2' not found (in header.j2)",
        ),
        (
            {"header.j2": '{% include "sub/note.j2" %}', "sub/note.j2": '{% include "gone.j2" %}'},
            "template 'gone.j2' not found (in sub/note.j2)",
        ),
        (
            {"header.j2": '{% from "sub/m.j2" import m %}{{ m() }}'},
            "template 'sub/m.j2' not found (in header.j2)",
        ),
        (
            {"header.j2": '{% include ["gone.j2", "lost.j2"] %}'},
            "none of templates 'gone.j2', 'lost.j2' found (in header.j2)",
        ),
    ],
)
def test_check_fails_its_target_line_for_a_template_an_override_includes_that_does_not_exist(
    tmp_path: Path, files: dict[str, str], reason: str
) -> None:
    """'check' fails the target line (exit 1), naming the missing template and the one
    including or importing it, which every apply refuses (exit 8)."""
    from .faultkit import cli

    overrides = tmp_path / "tpl"
    for name, text in files.items():
        (overrides / name).parent.mkdir(parents=True, exist_ok=True)
        (overrides / name).write_text(text)
    config, flags, code, line = _check_target(tmp_path, templates=str(overrides))
    assert (code, line) == (1, f"FAIL  target: {reason}")
    assert cli(config, *flags, "render", check=False).code == 8  # as check foretold


def test_check_passes_a_missing_include_the_override_marks_ignore_missing_or_has_a_fallback(
    tmp_path: Path,
) -> None:
    """'check' passes an include of a missing template marked ``ignore missing``, or given
    as a list whose another template exists, which every apply renders."""
    from .faultkit import cli

    overrides = tmp_path / "tpl"
    overrides.mkdir()
    (overrides / "header.j2").write_text(
        '; x\n{% include "gone.j2" ignore missing %}{% include ["gone.j2", "note.j2"] %}'
    )
    (overrides / "note.j2").write_text("; note\n")
    config, flags, code, line = _check_target(tmp_path, templates=str(overrides))
    assert (code, line.startswith("ok")) == (0, True), line
    assert cli(config, *flags, "render", check=False).code == 0


@pytest.mark.parametrize("shards", ["0", "4"])
def test_check_fails_its_target_line_for_an_override_template_that_cannot_be_read(
    tmp_path: Path, shards: str
) -> None:
    """'check' fails the target line (exit 1), naming the file and why, for an override
    template that is a dangling symbolic link (never using the shipped one in its place),
    which every apply refuses (exit 8), with one file or in shards."""
    from .faultkit import cli

    overrides = tmp_path / "tpl"
    overrides.mkdir()
    (overrides / "header.j2").symlink_to(overrides / "gone.j2")
    config, flags, code, line = _check_target(tmp_path, templates=str(overrides), shards=shards)
    assert code == 1
    assert line == (
        f"FAIL  target: template 'header.j2' cannot be read: "
        f"{str(overrides / 'header.j2')!r} is a symbolic link to nothing"
    )
    assert cli(config, *flags, "render", check=False).code == 8  # as check foretold


def _shard_writers(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the threads that write and fsync files from now on (the real
    ``write_synced`` still does each write), filled in as they do."""
    write_synced = files_module.write_synced
    writers: set[str] = set()

    def recorded(temp: Path, data: bytes) -> None:
        writers.add(threading.current_thread().name)
        write_synced(temp, data)

    monkeypatch.setattr(files_module, "write_synced", recorded)
    return writers


def test_a_full_apply_of_many_shards_writes_them_at_once_each_whole(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full apply changing at least PARALLEL_FILES shard files of the set in place
    writes them from several threads; each file holds exactly its users and the main
    file includes them all."""
    shards = 4 * PARALLEL_FILES
    target = ShardedConfigFileTarget(path, shards=shards)
    target.apply(many(600))
    users = [replace(u, endpoint=(*u.endpoint, ("language", "fr"))) for u in many(600)]
    writers = _shard_writers(monkeypatch)
    assert len(target.apply(users).updated) == len(users)
    assert len({name for name in writers if name.startswith("shard-write")}) > 1
    check_shards(target, users)
    assert ShardedConfigFileTarget(path, shards=shards).apply(users).empty


def test_a_first_apply_stages_the_shard_files_from_several_threads(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new set's first apply writes and fsyncs its shard files' temporaries from several
    threads (while the chunks are checked); each file holds exactly its users, no
    temporary file is left, and the main file includes them all."""
    shards = 4 * PARALLEL_FILES
    users = many(600)
    writers = _shard_writers(monkeypatch)
    target = ShardedConfigFileTarget(path, shards=shards)
    assert target.apply(users).wrote
    assert len({name for name in writers if name.startswith("stage-batch")}) > 1
    check_shards(target, users)
    assert not list(target.directory.glob(".*.tmp"))
    assert ShardedConfigFileTarget(path, shards=shards).apply(users).empty


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, blocked: Path) -> None:
    """Every write of a temporary file for ``blocked`` fails as on a full disk (ENOSPC);
    the other files are written as usual."""
    write_synced = files_module.write_synced

    def full_for_one(temp: Path, data: bytes) -> None:
        if temp.name.startswith(f".{blocked.name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_synced(temp, data)

    monkeypatch.setattr(files_module, "write_synced", full_for_one)


def test_a_shard_file_that_cannot_be_written_fails_the_apply_before_the_main_file(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one shard file of a first full apply cannot be written (here: the disk is
    full for it, in the thread that stages it), the apply raises TargetWriteFailed naming
    it, every other shard file is whole, no temporary file is left, and the main file is
    not written: Asterisk still reads nothing new."""
    shards = 4 * PARALLEL_FILES
    users = many(600)
    target = ShardedConfigFileTarget(path, shards=shards)
    blocked = target.files[5]
    _disk_full_for(monkeypatch, blocked)
    with pytest.raises(TargetWriteFailed, match=blocked.name):
        target.apply(users)
    assert not path.exists()
    assert not blocked.exists()
    assert not list(target.directory.glob(".*.tmp"))
    for index, shard in enumerate(target.files):
        if index != 5:
            check_rendered(shard.read_bytes(), in_shard(users, index, shards))


def test_a_shard_file_that_cannot_be_rewritten_fails_the_apply_the_others_whole(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one shard file of a parallel full apply of the set in place cannot be written
    (the disk full for it), the apply raises TargetWriteFailed naming it, that file keeps
    its old users, every other shard file holds its new ones, whole, and no temporary
    file is left."""
    shards = 4 * PARALLEL_FILES
    target = ShardedConfigFileTarget(path, shards=shards)
    old = many(600)
    target.apply(old)
    users = [replace(u, endpoint=(*u.endpoint, ("language", "fr"))) for u in old]
    blocked = target.files[5]
    _disk_full_for(monkeypatch, blocked)
    with pytest.raises(TargetWriteFailed, match=blocked.name):
        target.apply(users)
    assert not list(target.directory.glob(".*.tmp"))
    for index, shard in enumerate(target.files):
        held = old if index == 5 else users
        check_rendered(shard.read_bytes(), in_shard(held, index, shards))


@pytest.mark.parametrize("shards", ["0", "4"])
def test_check_passes_a_target_directory_the_first_write_makes(tmp_path: Path, shards: str) -> None:
    """'check' passes its target line when target.path's directory does not exist yet
    under a writable one, as the writer makes it (sync then writes the file there), with
    one file or in shards."""
    from .faultkit import cli

    path = tmp_path / "not" / "yet" / "pjsip_users.conf"
    config, flags, _code, line = _check_target(tmp_path, path=str(path), shards=shards)
    assert line.startswith("ok    target: config file"), line
    assert cli(config, *flags, "sync", "--once").code == 0
    assert path.is_file()


@pytest.mark.parametrize("shards", [4, 2])
def test_a_new_sharded_target_reads_the_shard_files_without_the_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int
) -> None:
    """A new sharded target applying users with one changed to shard files another process
    wrote (the same count, or another one) counts the change from them without the general
    parser: only the main file, all includes, is parsed."""
    from provisioner.targets import holdings

    users = many(20)
    ShardedConfigFileTarget(tmp_path / "u.conf", shards=4).apply(users)
    changed = replace(users[3], aor=(("max_contacts", "2"),))
    parsed: list[bytes] = []

    def counted(data: bytes) -> Any:
        parsed.append(data)
        return parse(data)

    monkeypatch.setattr(holdings, "parse", counted)
    fresh = ShardedConfigFileTarget(tmp_path / "u.conf", shards=shards)
    change = fresh.apply([*users[:3], changed, *users[4:]])
    assert change.updated == (changed.endpoint_id,)
    assert change.changed_objects == (("aor", changed.aor_id),)
    assert change.unchanged == len(users) - 1
    assert all(b"[" not in data for data in parsed)  # the main file only, if any
