"""The config-file target: golden output, atomic writes, overrides, and hostile input."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from provisioner.asterisk_conf import parse
from provisioner.config import load_config
from provisioner.errors import (
    AsteriskSyntaxError,
    ConfigError,
    InvalidInput,
    RenderCheckFailed,
    TargetWriteFailed,
)
from provisioner.model import User, Voice
from provisioner.pjsip import RenderSettings, UserObjects, render_user
from provisioner.targets import Change, Target, pieces
from provisioner.targets import canonical as canonical_module
from provisioner.targets import configfile as configfile_module
from provisioner.targets import files as files_module
from provisioner.targets import holdings as holdings_module
from provisioner.targets.configfile import (
    MAIN_TEMPLATE,
    SHIPPED_TEMPLATES,
    ConfigFileTarget,
    canonical_chunk,
    check_rendered,
)
from provisioner.targets.holdings import Current, intended
from provisioner.targets.sharded import ShardedConfigFileTarget
from provisioner.targets.shards import check_main, shard_of

from .helpers import collections_seen

GOLDEN = Path(__file__).parent / "golden"
SECRET = "s3cret-Passw0rd"

settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def make_user(
    extension: str,
    username: str,
    full_name: str,
    *,
    realm: str = "asterisk",
    **voice: Any,
) -> User:
    """A user as a store row would hold it, digests computed from one test secret."""
    ha1 = f"{username}:{realm}:{SECRET}".encode("utf-8", "surrogatepass")
    return User(
        id=int(extension) if extension.isdigit() else 0,
        role="user",
        username=username,
        full_name=full_name,
        email=f"{username}@example.com",
        extension=extension,
        voice=Voice(**voice),
        sip_realm=realm,
        sip_md5=hashlib.md5(ha1).hexdigest(),
        sip_sha256=hashlib.sha256(ha1).hexdigest(),
    )


#: One user per NAT row; together they cover every transport and video setting.
REPRESENTATIVE = [
    make_user("1001", "alice", "Alice Archer", transport="udp", nat="yes", video="no"),
    make_user(
        "1002",
        "bob.b",
        "Bob Brown",
        transport="tcp",
        nat="force_rport",
        video="yes",
        codecs=("g722", "ulaw"),
    ),
    make_user("1003", "carol", "Carol Cruz", transport="tls", nat="comedia", video="always"),
    make_user(
        "1004",
        "dave_d",
        "Dave Dunn",
        transport="ws",
        nat="route",
        video="no",
        codecs=("opus",),
        context="webrtc-agents",
    ),
    make_user("1005", "erin", "Erin Ek", transport="wss", nat="no", video="yes", codecs=("opus",)),
    make_user(
        "20001",
        "zoe",
        "Zoë Ørsted-Ångström, Customer Success Team Lead (EMEA)",
        transport="udp",
        nat="never",
        video="no",
        codecs=("alaw", "ulaw", "gsm", "g729"),
        call_group="1,3-5",
        pickup_group="2",
    ),
]


def rendered(auth_type: str = "userpass", users: list[User] | None = None) -> list[UserObjects]:
    """The representative users rendered with the default settings and ``auth_type``."""
    render_settings = RenderSettings(auth_type=auth_type)
    return [render_user(u, render_settings) for u in users or REPRESENTATIVE]


def check_golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; UPDATE_GOLDEN=1 rewrites it instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_bytes(text.encode("utf-8"))
    assert text.encode("utf-8") == path.read_bytes()


@pytest.fixture
def target(tmp_path: Path) -> ConfigFileTarget:
    return ConfigFileTarget(tmp_path / "asterisk" / "pjsip_users.conf")


def make_target(
    path: Path, shards: int, templates: Path | None = None
) -> ConfigFileTarget | ShardedConfigFileTarget:
    """The one-file target (``shards`` 0) or the sharded one writing ``path``."""
    if shards:
        return ShardedConfigFileTarget(path, templates, shards=shards)
    return ConfigFileTarget(path, templates)


def written(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` (temporary files included) and its bytes."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_written(
    target: ConfigFileTarget | ShardedConfigFileTarget, objects: list[UserObjects]
) -> None:
    """The target's files parse back to exactly ``objects`` (each shard file its own)."""
    if isinstance(target, ConfigFileTarget):
        check_rendered(target.path.read_bytes(), objects)
        return
    check_main(target.path.read_bytes(), target.files)
    for index, shard in enumerate(target.files):
        mine = [u for u in objects if shard_of(u.endpoint_id, target.shards) == index]
        check_rendered(shard.read_bytes(), mine)


def write_override(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory


# --- golden output -----------------------------------------------------------------------


@pytest.mark.parametrize("auth_type", ["userpass", "md5"])
def test_golden_file(target: ConfigFileTarget, auth_type: str) -> None:
    """Every NAT row, transport, video setting and auth type renders exactly as the golden file."""
    check_golden(f"pjsip_users_{auth_type}.conf", target.render_text(rendered(auth_type)))


def test_golden_files_parse_back_exactly() -> None:
    """Both golden files hold exactly the intended objects by Asterisk's rules."""
    for auth_type in ("userpass", "md5"):
        data = (GOLDEN / f"pjsip_users_{auth_type}.conf").read_bytes()
        check_rendered(data, rendered(auth_type))


def test_webrtc_users_never_get_direct_media_whatever_their_nat() -> None:
    """A ws/wss user gets ``direct_media=no`` with every NAT setting (a browser's DTLS-SRTP
    media cannot flow straight to a SIP phone); other transports keep the NAT table's value."""
    for nat in ("yes", "force_rport", "comedia", "route", "no", "never"):
        for transport in ("ws", "wss", "udp"):
            user = make_user("1001", "alice", "Alice", transport=transport, nat=nat)
            got = dict(render_user(user, RenderSettings()).endpoint)["direct_media"]
            want = "yes" if transport == "udp" and nat in ("no", "never") else "no"
            assert got == want, (transport, nat)


def test_empty_user_list_renders_only_the_header(target: ConfigFileTarget) -> None:
    """No users gives a file with the do-not-edit header and no section."""
    text = target.render_text([])
    assert "generated by provisioner" in text
    assert "DO NOT EDIT" in text
    assert parse(text).sections == ()


def test_target_protocol() -> None:
    """ConfigFileTarget satisfies the Target protocol."""
    target: Target = ConfigFileTarget(Path("unused.conf"))
    assert callable(target.plan)
    assert callable(target.apply)


# --- writing -----------------------------------------------------------------------------


def test_apply_writes_the_file_and_it_reads_back(target: ConfigFileTarget) -> None:
    """apply creates the directory and a 0640 file that parses back to the objects (and the
    writers' lock file beside it)."""
    objects = rendered()
    change = target.apply(objects)
    assert change.wrote
    assert change.added == tuple(o.endpoint_id for o in objects)
    assert change.updated == change.removed == ()
    assert change.unchanged == 0
    data = target.path.read_bytes()
    check_rendered(data, objects)
    assert data.decode("utf-8") == target.render_text(objects)
    assert stat.S_IMODE(target.path.stat().st_mode) == 0o640
    assert not target.path.with_name("pjsip_users.conf.bak").exists()
    # Beside it only the writers' lock, empty, mode 0640, hidden from #include globs.
    assert sorted(p.name for p in target.path.parent.iterdir()) == [
        ".pjsip_users.conf.lock",
        "pjsip_users.conf",
    ]
    lock = target.path.with_name(".pjsip_users.conf.lock")
    assert (lock.stat().st_size, stat.S_IMODE(lock.stat().st_mode)) == (0, 0o640)


@pytest.mark.parametrize("leads_to", ["missing", "existing"])
def test_a_lock_file_that_is_a_symbolic_link_is_never_followed(
    target: ConfigFileTarget, tmp_path: Path, leads_to: str
) -> None:
    """A symbolic link planted at the writers' lock (``.pjsip_users.conf.lock``) by someone
    who may write the directory is never followed: no file is made (or locked) where it
    leads, whose owner and group a write run as root would also have changed; the apply
    fails naming the lock, and nothing is written."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "nologin"
    if leads_to == "existing":
        victim.write_text("kept\n")
    target.path.parent.mkdir(parents=True, exist_ok=True)
    lock = target.path.with_name(".pjsip_users.conf.lock")
    lock.symlink_to(victim)
    with pytest.raises(TargetWriteFailed, match=r"cannot lock '.*\.pjsip_users\.conf\.lock'"):
        target.apply(rendered())
    assert victim.exists() is (leads_to == "existing")
    assert not target.path.exists()
    assert lock.is_symlink()


def test_unchanged_bytes_are_not_written(target: ConfigFileTarget) -> None:
    """A second apply of the same objects writes nothing: inode and mtime stay."""
    objects = rendered()
    target.apply(objects)
    before = target.path.stat()
    change = target.apply(objects)
    after = target.path.stat()
    assert not change.wrote
    assert change.empty
    assert change.unchanged == len(objects)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not target.path.with_name("pjsip_users.conf.bak").exists()


@pytest.mark.parametrize("shards", [0, 4])
def test_a_target_path_that_is_a_symlink_stays_one_and_its_file_is_replaced(
    tmp_path: Path, shards: int
) -> None:
    """When target.path is a symbolic link (as Asterisk configs often are), the file it
    leads to is replaced, with its .bak beside it: the link itself stays as it was."""
    real = tmp_path / "data" / "pjsip_users.conf"
    real.parent.mkdir()
    real.write_bytes(b"; the file before\n")
    path = tmp_path / "etc" / "pjsip_users.conf"
    path.parent.mkdir()
    path.symlink_to(Path("..") / "data" / "pjsip_users.conf")
    target = make_target(path, shards)
    for objects in (rendered()[1:], rendered()):
        before = real.read_bytes()
        assert target.apply(objects).wrote
        assert path.is_symlink()
        assert os.readlink(path) == str(Path("..") / "data" / "pjsip_users.conf")
        if real.read_bytes() != before:  # a sharded main file changes at the first only
            assert real.with_name(real.name + ".bak").read_bytes() == before
        check_written(target, objects)
    assert real.with_name(real.name + ".bak").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["pjsip_users.conf", *(["pjsip_users.d"] if shards else [])]
    )


@pytest.mark.parametrize("shards", [0, 4])
def test_a_rewritten_file_is_never_as_old_as_the_one_it_replaces(
    tmp_path: Path, shards: int
) -> None:
    """A file rewritten with bytes of the same size gets a modification time later than
    the one it replaces, even when the clock has not moved past it (Asterisk's reload
    skips a file whose size and time it loaded before)."""
    target = make_target(tmp_path / "pjsip_users.conf", shards)
    first = rendered()
    target.apply(first)
    held = target.path if not shards else target.file_of(first[0].endpoint_id)  # type: ignore[union-attr]
    future = time.time_ns() + 3_600 * 10**9  # the old file's time: ahead of the clock
    os.utime(held, ns=(future, future))
    size = held.stat().st_size
    moved = replace(REPRESENTATIVE[0], voice=replace(REPRESENTATIVE[0].voice, context="from-sop"))
    assert target.apply(rendered(users=[moved, *REPRESENTATIVE[1:]])).wrote
    after = held.stat()
    assert after.st_size == size
    assert after.st_mtime_ns > future


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file another owner")
@pytest.mark.parametrize("shards", [0, 4])
def test_a_rewritten_file_keeps_the_owner_and_group_of_the_file_it_replaces(
    tmp_path: Path, shards: int
) -> None:
    """A file an operator gave to Asterisk's user and group (chown asterisk:asterisk) is
    replaced by one of the same owner and group, mode 0640: Asterisk can still read it."""
    path = tmp_path / "pjsip_users.conf"
    path.write_bytes(b"; the file before\n")
    os.chown(path, 4242, 4343)
    target = make_target(path, shards)
    for objects in (rendered()[1:], rendered()[2:]):
        target.apply(objects)
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (4242, 4343)
        assert stat.S_IMODE(info.st_mode) == 0o640
    check_written(target, rendered()[2:])


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file another owner")
@pytest.mark.parametrize("shards", [0, 4])
def test_a_first_file_takes_the_owner_and_group_of_its_directory(
    tmp_path: Path, shards: int
) -> None:
    """A file written where none was takes the owner and group of the directory an operator
    gave to Asterisk (chown asterisk:asterisk), mode 0640: Asterisk can read it."""
    path = tmp_path / "asterisk" / "pjsip_users.conf"
    path.parent.mkdir()
    os.chown(path.parent, 4242, 4343)
    target = make_target(path, shards)
    target.apply(rendered())
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4242, 4343, 0o640)
    check_written(target, rendered())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file another owner")
@pytest.mark.parametrize("shards", [0, 4])
@pytest.mark.parametrize("errno_", [errno.EPERM, errno.EINVAL])
def test_a_group_the_writer_cannot_give_is_logged_and_the_file_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, errno_: int
) -> None:
    """When giving the new file the replaced file's group fails (EPERM: not the writer's
    group, or chown refused by the unit's syscall filter; EINVAL: not mapped in its user
    namespace, as under PrivateUsers= alone), the file is written all the same, with the
    writer's group, and file.group_not_kept says so, advising a setgid directory first."""
    path = tmp_path / "pjsip_users.conf"
    target = make_target(path, shards)
    target.apply(rendered()[1:])
    before = {}
    for written in {path, *path.parent.rglob("*.conf")}:
        os.chown(written, -1, 4343)
        before[written] = written.stat().st_ino

    def refused(*_args: object) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "chown", refused)
    with capture_logs() as logs:
        assert target.apply(rendered()).wrote
    check_written(target, rendered())
    replaced = [f for f, inode in before.items() if f.stat().st_ino != inode]
    assert replaced
    assert all(f.stat().st_gid == os.getegid() for f in replaced)
    kept = [e for e in logs if e["event"] == "file.group_not_kept"]
    assert kept, logs
    assert all(e["error"] == os.strerror(errno_) for e in kept), kept
    # The one remedy that works under the shipped unit, whatever the errno.
    assert all(e["advice"].startswith("make the directory setgid") for e in kept), kept


#: Run as a writer in a user namespace mapping only its own user and group, as systemd's
#: PrivateUsers=yes does: writes the representative users to the target in argv[1].
_IN_NAMESPACE = """
import sys
from pathlib import Path
from provisioner.pjsip import RenderSettings, render_user
from tests.test_configfile import REPRESENTATIVE, make_target
target = make_target(Path(sys.argv[1]), int(sys.argv[2]))
target.apply([render_user(u, RenderSettings()) for u in REPRESENTATIVE])
"""


#: A user namespace mapping one user and one group (1000) to this process's: every other
#: group appears as nobody and cannot be given.
_UNSHARE = ("unshare", "--user", "--map-user=1000", "--map-group=1000")


def _unshare_works() -> bool:
    """Whether this host lets ``unshare`` make a user namespace (Linux, allowed by sysctl)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*_UNSHARE, "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a directory another group")
@pytest.mark.skipif(not _unshare_works(), reason="no user namespaces here")
@pytest.mark.parametrize("shards", [0, 4])
def test_a_setgid_directory_gives_its_unmapped_group_to_a_writer_under_private_users(
    tmp_path: Path, shards: int
) -> None:
    """A writer in a user namespace that does not map the directory's group (systemd's
    PrivateUsers=yes, the shipped unit) writes every file, shard files included, with the
    group of the setgid directory an operator gave to Asterisk's group."""
    path = tmp_path / "asterisk" / "pjsip_users.conf"
    path.parent.mkdir()
    os.chown(path.parent, -1, 4343)
    os.chmod(path.parent, 0o2770)
    os.chmod(tmp_path, 0o755)
    run = subprocess.run(
        [*_UNSHARE, sys.executable, "-c", _IN_NAMESPACE, str(path), str(shards)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr
    written = [path, *(path.parent / "pjsip_users.d").glob("*.conf")]
    assert len(written) == 1 + shards
    assert {(f.stat().st_gid, stat.S_IMODE(f.stat().st_mode)) for f in written} == {(4343, 0o640)}


def test_a_rewrite_of_a_hard_linked_file_warns_that_the_link_is_split(tmp_path: Path) -> None:
    """A file with another hard link (an operator's ln) is replaced by a new file, as every
    write is: the other name keeps the old bytes, and the write logs a warning naming the
    file; a file with no other link (its .bak aside) logs none."""
    path = tmp_path / "asterisk" / "pjsip_users.conf"
    target = ConfigFileTarget(path)
    target.apply(rendered()[1:])
    with capture_logs() as logs:
        target.apply(rendered()[2:])
    assert not [e for e in logs if e["event"] == "file.hard_link_split"]
    other = tmp_path / "copy.conf"
    os.link(path, other)
    before = other.read_bytes()
    with capture_logs() as logs:
        assert target.apply(rendered()).wrote
    split = [e for e in logs if e["event"] == "file.hard_link_split"]
    assert [(e["log_level"], e["path"], e["other_links"]) for e in split] == [
        ("warning", str(path), 1)
    ]
    assert other.read_bytes() == before
    check_written(target, rendered())


def test_changes_are_counted_and_the_old_file_kept(target: ConfigFileTarget) -> None:
    """A change is reported per user and object; the previous bytes stay in <name>.bak."""
    first = rendered()
    target.apply(first)
    old = target.path.read_bytes()
    moved = replace(REPRESENTATIVE[0], voice=replace(REPRESENTATIVE[0].voice, nat="no"))
    newcomer = make_user("1006", "frank", "Frank Fu")
    second = rendered(users=[moved, *REPRESENTATIVE[1:4], newcomer])
    change = target.apply(second)
    assert change.wrote
    assert change.added == ("1006",)
    assert change.updated == ("1001",)
    assert change.removed == ("1005", "20001")
    assert change.unchanged == 3
    assert ("endpoint", "1001") in change.changed_objects
    assert ("auth", "1001-auth") not in change.changed_objects
    assert ("aor", "20001") in change.changed_objects
    assert target.path.with_name("pjsip_users.conf.bak").read_bytes() == old
    check_rendered(target.path.read_bytes(), second)


def test_a_backup_that_cannot_be_replaced_is_named_and_the_file_kept(
    target: ConfigFileTarget,
) -> None:
    """A write whose ``.bak`` cannot be replaced (a directory made at its name) fails
    naming the backup, not the file (which could be written), and leaves the file as it was."""
    from provisioner.errors import TargetWriteFailed

    target.apply(rendered())
    old = target.path.read_bytes()
    backup = target.path.with_name("pjsip_users.conf.bak")
    backup.mkdir()  # no backup yet: a first file has no former one
    with pytest.raises(TargetWriteFailed) as raised:
        target.apply(rendered(users=REPRESENTATIVE[:2]))
    assert str(raised.value) == (
        f"cannot write {str(target.path)!r}: cannot keep its backup {str(backup)!r}: Is a directory"
    )
    assert target.path.read_bytes() == old


def test_check_fails_its_target_line_when_the_backup_is_no_regular_file(tmp_path: Path) -> None:
    """'check' fails the target line when the file's ``.bak`` is a directory, which every
    write fails to replace (exit 9 naming the backup), rather than pass it."""
    from .faultkit import cli, seed_store, store_url, write_config

    seed_store(store_url(tmp_path), 1).dispose()
    config = write_config(tmp_path)
    cli(config, "sync", "--once")
    backup = tmp_path / "pjsip_users.conf.bak"
    backup.mkdir()
    checked = cli(config, "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    assert checked.code == 1
    assert line == (
        f"FAIL  target: {backup} is not a regular file (each write keeps the previous file there)"
    )
    cli(config, "--as", "root", "user", "edit", "u0", "--nat", "yes")
    synced = cli(config, "sync", "--once", check=False)
    assert synced.code == 9
    assert f"cannot keep its backup {str(backup)!r}: Is a directory" in synced.err


def test_plan_writes_nothing_and_redacts_credentials(target: ConfigFileTarget) -> None:
    """plan returns the change and a unified diff without writing or showing any digest."""
    objects = rendered()
    change = target.plan(objects)
    assert not target.path.exists()
    assert not target.path.parent.exists()
    assert not change.wrote
    assert change.added == tuple(o.endpoint_id for o in objects)
    assert change.diff.startswith("--- /dev/null")
    assert "+[1001]" in change.diff
    assert "+transport=transport-wss" in change.diff
    assert "password_digest=<redacted>" in change.diff
    for user in REPRESENTATIVE:
        assert user.sip_md5 not in change.diff
        assert user.sip_sha256 not in change.diff


@pytest.mark.parametrize("shards", [0, 4])
def test_plan_diff_redacts_a_digest_an_override_prints_in_a_comment(
    tmp_path: Path, shards: int
) -> None:
    """A digest an override template prints outside its option (in a comment, which the
    parse-back check lets through) is redacted in the dry-run diff as the option is."""
    section = (
        "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
        "{% for k, v in options %}{{ k }}={{ v }}\n; was {{ v }} ({{ v[8:45] }})\n"
        "{% endfor %}{% endmacro %}"
    )
    overrides = write_override(tmp_path / "t", "section.j2", section)
    change = make_target(tmp_path / "out.conf", shards, overrides).plan(rendered())
    assert "+; was SHA-256:<redacted>,MD5:<redacted> (<redacted>)\n" in change.diff
    assert not _quotes_a_digest(change.diff)


def test_plan_diff_shows_a_changed_secret_only_as_changed(target: ConfigFileTarget) -> None:
    """A rotated digest shows as '<redacted> <changed>'; unchanged ones drop out of the diff."""
    target.apply(rendered())
    rotated = replace(REPRESENTATIVE[1], sip_md5="0" * 32, sip_sha256="1" * 64)
    change = target.plan(rendered(users=[REPRESENTATIVE[0], rotated, *REPRESENTATIVE[2:]]))
    assert change.updated == ("1002",)
    assert change.changed_objects == (("auth", "1002-auth"),)
    assert "+password_digest=<redacted> <changed>" in change.diff
    assert "-password_digest=<redacted>\n" in change.diff
    assert change.diff.count("password_digest") == 2
    assert "0" * 32 not in change.diff


def test_plan_redacts_every_credential_line_asterisk_reads_in_the_current_file(
    target: ConfigFileTarget,
) -> None:
    """A current (hand-written) file's credential options are redacted in the diff in every
    form Asterisk reads as one: any case, ``+=``, an escaped first character, control
    bytes around the name."""
    secrets = [f"hunter{i}secret" for i in range(5)]
    target.path.parent.mkdir(parents=True)
    target.path.write_bytes(
        (
            "[9001-auth]\ntype=auth\n"
            f"PASSWORD={secrets[0]}\n"
            f"Md5_Cred = {secrets[1]}\n"
            f"password += {secrets[2]}\n"
            f"\\password={secrets[3]}\n"
            f"\x01password_digest\x01=>{secrets[4]}\n"
        ).encode()
    )
    diff = target.plan(rendered()).diff
    assert diff.count("<redacted>") >= len(secrets)
    for secret in secrets:
        assert secret not in diff


def test_plan_redacts_oauth_credentials_of_the_current_file(target: ConfigFileTarget) -> None:
    """An OAuth auth's ``oauth_secret`` and ``refresh_token`` in a current (hand-written)
    file are credentials too: redacted in the diff, as the realtime diff redacts them."""
    target.path.parent.mkdir(parents=True)
    target.path.write_bytes(
        b"[9001-auth]\ntype=auth\nauth_type=oauth\noauth_clientid=cid\n"
        b"oauth_secret=hunter2oauth\nrefresh_token=hunter2refresh\n"
    )
    diff = target.plan(rendered()).diff
    assert "-oauth_secret=<redacted>" in diff
    assert "-refresh_token=<redacted>" in diff
    assert "hunter2" not in diff


#: Overrides quoting each credential in a comment, in a line of its own (a comment is all
#: the parse-back check lets a template add).
QUOTING_OVERRIDES = {
    "section.j2": (SHIPPED_TEMPLATES / "section.j2")
    .read_text()
    .replace(
        "{{ key }}={{ value }}\n", "; {{ key }} is {{ value | upper }}\n{{ key }}={{ value }}\n"
    ),
    "header.j2": "{% for u in users %}; {{ u.auth_id }}: {{ u.auth }}\n{% endfor %}",
}


@pytest.mark.parametrize("shards", [0, 4])
def test_plan_redacts_a_part_of_a_credential_an_override_quotes(
    tmp_path: Path, shards: int
) -> None:
    """31 or more hex digits of a credential quoted by an override's comment (a slice of the
    digest) never reach the diff either."""
    section = (SHIPPED_TEMPLATES / "section.j2").read_text()
    quoting = "; {{ key }} starts {{ value[11:42] }}\n{{ key }}={{ value }}\n"
    overrides = write_override(
        tmp_path / "t", "section.j2", section.replace("{{ key }}={{ value }}\n", quoting)
    )
    diff = make_target(tmp_path / "out.conf", shards, overrides).plan(rendered()).diff
    assert "starts <redacted>" in diff
    for user in REPRESENTATIVE:
        for digest in (user.sip_md5, user.sip_sha256):
            pieces = {digest[i : i + 31] for i in range(len(digest) - 30)}
            assert not any(piece in diff for piece in pieces)


@pytest.mark.parametrize("name", sorted(QUOTING_OVERRIDES))
@pytest.mark.parametrize("shards", [0, 4])
def test_plan_redacts_credentials_an_override_quotes_in_comments(
    tmp_path: Path, name: str, shards: int
) -> None:
    """A credential an override's comment quotes (in full, in any case) never reaches the
    diff, for a first file and for an edit: only '<redacted>' stands for it."""
    overrides = write_override(tmp_path / "t", name, QUOTING_OVERRIDES[name])
    target = make_target(tmp_path / "out.conf", shards, overrides)
    rotated = replace(REPRESENTATIVE[1], sip_md5="0a" * 16, sip_sha256="1b" * 32)
    first = target.plan(rendered())
    target.apply(rendered())
    edit = target.plan(rendered(users=[REPRESENTATIVE[0], rotated, *REPRESENTATIVE[2:]]))
    assert "<redacted>" in edit.diff
    digests = [(u.sip_md5, u.sip_sha256) for u in (*REPRESENTATIVE, rotated)]
    for diff in (first.diff, edit.diff):
        for digest in chain.from_iterable(digests):
            assert digest.lower() not in diff.lower()


def test_a_broken_current_file_is_replaced(target: ConfigFileTarget) -> None:
    """A current file Asterisk could not load is replaced; all users count as added."""
    target.path.parent.mkdir(parents=True)
    target.path.write_text("[broken\n")
    change = target.apply(rendered())
    assert change.wrote
    assert len(change.added) == len(REPRESENTATIVE)
    assert target.path.with_name("pjsip_users.conf.bak").read_text() == "[broken\n"


#: Asterisk's own pjsip.conf, as a mistyped ``target.path`` could name it: objects
#: provisioner never writes (a global, a transport, a trunk's registration) and an include.
ASTERISKS_PJSIP_CONF = (
    "[global]\ntype=global\nuser_agent=PBX\n\n"
    "[transport-udp]\ntype=transport\nprotocol=udp\nbind=0.0.0.0\n\n"
    "[trunk]\ntype=registration\nserver_uri=sip:carrier.example\n\n"
    "#include pjsip_users.conf\n"
)


#: Files a mistaken ``target.path`` could name, and what the refusal says they hold.
FOREIGN_FILES = {
    "pjsip.conf": (
        ASTERISKS_PJSIP_CONF,
        "(objects of type global, registration, transport; #include)",
    ),
    "includes only": (
        "#include pjsip_transports.conf\n#include pjsip_users.conf\n",
        "(#include)",
    ),
    "extensions.conf": (
        "[from-sip]\nexten => 100,1,Dial(PJSIP/100)\n same => n,Hangup()\n",
        "(sections with no type=, no PJSIP objects: a dialplan, another program's file)",
    ),
    "provisioner.toml": (
        "[store]\nurl = 'sqlite:///var/provisioner.db'\n[target]\nkind = 'config'\n",
        "(sections with no type=, no PJSIP objects: a dialplan, another program's file)",
    ),
}


@pytest.mark.parametrize("shards", [0, 4])
@pytest.mark.parametrize("name", sorted(FOREIGN_FILES))
def test_a_file_holding_what_provisioner_never_writes_is_not_replaced(
    tmp_path: Path, shards: int, name: str
) -> None:
    """A ``target.path`` naming a file holding objects, sections or directives provisioner
    never writes (Asterisk's own pjsip.conf, the dialplan, provisioner's own TOML) is
    refused, naming them: nothing is written, neither by an apply nor by an edit, and a
    dry run says so too, instead of replacing what Asterisk needs with the users."""
    text, held = FOREIGN_FILES[name]
    path = tmp_path / "pjsip.conf"
    path.write_text(text)
    target = make_target(path, shards)
    attempts: list[Callable[[], Change]] = [
        lambda: target.apply(rendered()),
        lambda: target.plan(rendered()),
        lambda: target.apply_partial(rendered()[:1], ()),
    ]
    for attempt in attempts:
        with pytest.raises(TargetWriteFailed) as refused:
            attempt()
        assert refused.value.exit_code == 9
        message = refused.value.message
        assert f"refusing to replace {str(path)!r}: it holds what provisioner never writes " in (
            message
        )
        assert held in message
        assert "carrier" not in message
        assert "Dial" not in message
    # Beside it at most the writers' lock: no temporary file, no backup, no shard file.
    assert {p.name for p in tmp_path.iterdir()} <= {"pjsip.conf", ".pjsip.conf.lock"}
    assert path.read_text() == text


def test_render_refuses_a_target_path_naming_asterisks_pjsip_conf(tmp_path: Path) -> None:
    """'provisioner render' with ``target.path`` set to Asterisk's own pjsip.conf exits 9
    naming the file and why, and leaves that file as it was."""
    from .faultkit import cli, seed_store, store_url, write_config

    seed_store(store_url(tmp_path), 2).dispose()
    pjsip_conf = tmp_path / "pjsip.conf"
    pjsip_conf.write_text(ASTERISKS_PJSIP_CONF)
    config = write_config(tmp_path)
    ran = cli(config, "--set", f"target.path={pjsip_conf}", "render", check=False)
    assert ran.code == 9
    assert f"refusing to replace {str(pjsip_conf)!r}" in ran.err
    assert pjsip_conf.read_text() == ASTERISKS_PJSIP_CONF
    assert not pjsip_conf.with_name("pjsip.conf.bak").exists()


def test_render_refuses_a_target_path_naming_the_user_stores_database(tmp_path: Path) -> None:
    """'provisioner render' with ``target.path`` naming the SQLite user store itself (or
    any file holding a NUL byte: a database, an image) exits 9 and leaves it whole,
    rather than replace the database with the users' text."""
    from .faultkit import cli, seed_store, store_url, write_config

    seed_store(store_url(tmp_path), 2).dispose()
    store = tmp_path / "store.db"
    before = store.read_bytes()
    config = write_config(tmp_path)
    ran = cli(config, "--set", f"target.path={store}", "render", check=False)
    assert ran.code == 9, ran
    assert f"refusing to replace {str(store)!r}: it holds what provisioner never writes" in ran.err
    assert "a NUL byte" in ran.err
    assert store.read_bytes() == before
    assert not store.with_name("store.db.bak").exists()
    assert "u0" in cli(config, "user", "list").out
    checked = cli(config, "--set", f"target.path={store}", "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    assert line.startswith(f"FAIL  target: refusing to replace {str(store)!r}")


@pytest.mark.parametrize("shards", [0, 4])
def test_check_fails_its_target_line_for_a_file_provisioner_never_wrote(
    tmp_path: Path, shards: int
) -> None:
    """'check' fails the target line for a ``target.path`` holding what provisioner never
    writes, with the refusal every apply gives, rather than call it writable; a file of
    provisioner's passes."""
    from .faultkit import cli, seed_store, store_url, write_config

    seed_store(store_url(tmp_path), 2).dispose()
    pjsip_conf = tmp_path / "pjsip.conf"
    pjsip_conf.write_text(ASTERISKS_PJSIP_CONF)
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[target]", f"[target]\nshards = {shards}"))
    checked = cli(config, "--set", f"target.path={pjsip_conf}", "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    assert checked.code == 1
    assert line.startswith(f"FAIL  target: refusing to replace {str(pjsip_conf)!r}: ")
    assert "(objects of type global, registration, transport; #include)" in line
    cli(config, "sync", "--once")
    checked = cli(config, "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    assert line.startswith("ok    target: config file")


#: Overrides that compile but render no file Asterisk would load as intended: a
#: ``user.j2`` without the ``user`` macro, one dropping the AOR, one printing a directive.
UNRENDERABLE_OVERRIDES = {
    "no macro": (
        "{% macro usr(user) %}{% endmacro %}\n",
        "templates failed to render (UndefinedError) at pjsip_users.conf.j2 line 7",
    ),
    "no aor": (
        (SHIPPED_TEMPLATES / "user.j2")
        .read_text()
        .replace('{{ section(user.aor_id, "aor", user.aor) -}}\n', ""),
        "the rendered file does not hold exactly the intended objects: ",
    ),
    "a directive": (
        (SHIPPED_TEMPLATES / "user.j2")
        .read_text()
        .replace("{% endmacro %}", "#exec /bin/true\n{% endmacro %}"),
        "holds a #exec directive",
    ),
}


@pytest.mark.parametrize("case", sorted(UNRENDERABLE_OVERRIDES))
def test_check_fails_its_target_line_for_templates_that_render_no_good_file(
    tmp_path: Path, case: str
) -> None:
    """'check' fails the target line for an override that compiles but renders no file
    Asterisk would load as intended (no ``user`` macro, a section dropped, a directive
    added), naming why as every apply would, rather than pass it."""
    from .faultkit import cli, seed_store, store_url, write_config

    override, why = UNRENDERABLE_OVERRIDES[case]
    seed_store(store_url(tmp_path), 1).dispose()
    overrides = write_override(tmp_path / "overrides", "user.j2", override)
    config = write_config(tmp_path)
    checked = cli(config, "--set", f"target.templates={overrides}", "check", check=False)
    (line,) = [line for line in checked.out.splitlines() if "target:" in line]
    assert checked.code == 1
    assert line.startswith("FAIL  target: ")
    assert why in line
    synced = cli(config, "--set", f"target.templates={overrides}", "sync", "--once", check=False)
    assert synced.code == 8
    assert why in synced.err


def test_kept_users_stay_as_they_are(target: ConfigFileTarget) -> None:
    """Endpoint ids in ``keep`` keep their current objects, in place, and are not removed."""
    target.apply(rendered())
    before = target.path.read_bytes()
    without = rendered(users=[u for u in REPRESENTATIVE if u.extension not in ("1003", "20001")])
    change = target.apply(without, keep=["1003", "20001", "9999"])
    assert not change.wrote
    assert change.removed == ()
    assert change.unchanged == len(REPRESENTATIVE)
    assert target.path.read_bytes() == before
    assert target.plan(without, keep=["1003"]).removed == ("20001",)


def test_guard_sees_the_change_and_can_abort(target: ConfigFileTarget) -> None:
    """A guard that raises stops apply before anything is written."""
    target.apply(rendered())
    before = target.path.read_bytes()
    seen: list[tuple[str, ...]] = []

    def guard(change: Change) -> None:
        seen.append(change.removed)
        raise RuntimeError("too many removals")

    with pytest.raises(RuntimeError):
        target.apply(rendered(users=REPRESENTATIVE[:1]), guard=guard)
    assert seen == [tuple(u.extension for u in REPRESENTATIVE[1:])]
    assert target.path.read_bytes() == before


def _temporaries(directory: Path) -> list[Path]:
    """The temporary files a writer left in ``directory``."""
    return sorted(directory.glob(".*.tmp"))


def test_a_staged_write_shows_nothing_until_published_and_a_discarded_one_leaves_no_trace(
    tmp_path: Path,
) -> None:
    """Staged bytes leave the file and its backup as they were until published (then the
    file holds them and the old file is the backup); a discarded stage leaves no file."""
    path = tmp_path / "pjsip_users.conf"
    path.write_bytes(b"old\n")
    files_module.backup_of(path).write_bytes(b"older\n")
    files_module.stage(path, b"discarded\n").discard()
    assert path.read_bytes() == b"old\n"
    assert files_module.backup_of(path).read_bytes() == b"older\n"
    assert _temporaries(tmp_path) == []
    staged = files_module.stage(path, b"new\n")
    assert path.read_bytes() == b"old\n"
    files_module.publish(staged, path, backup=True)
    assert path.read_bytes() == b"new\n"
    assert files_module.backup_of(path).read_bytes() == b"old\n"
    assert stat.S_IMODE(path.stat().st_mode) == files_module.FILE_MODE
    assert _temporaries(tmp_path) == []


def test_a_staged_write_that_cannot_be_written_fails_when_published(tmp_path: Path) -> None:
    """Staged bytes that cannot be written (the file size limit) raise TargetWriteFailed
    when published, not when staged, and leave the old file and no temporary file."""
    from provisioner.errors import TargetWriteFailed

    path = tmp_path / "pjsip_users.conf"
    path.write_bytes(b"old\n")
    open_files = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Python ignores SIGXFSZ: a write past the limit fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))
    try:
        staged = files_module.stage(path, b"new and longer than sixteen bytes\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(TargetWriteFailed, match="cannot write"):
        files_module.publish(staged, path, backup=True)
    assert path.read_bytes() == b"old\n"
    assert _temporaries(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) == open_files  # the temporary file closed


@contextlib.contextmanager
def _interrupted_after(seconds: float) -> Iterator[None]:
    """KeyboardInterrupt raised in this (the main) thread after ``seconds``, as Ctrl-C
    raises it in a ``sync --once`` waiting on a staged write."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _drain_batch_stagers() -> None:
    """Return once every batch stage thread has ended what it was given before (each
    then runs a task of a barrier that needs all of them at once)."""
    barrier = threading.Barrier(files_module.BATCH_STAGERS)
    pool = files_module._stage_executor(batch=True)
    for done in [pool.submit(barrier.wait, 10) for _ in range(files_module.BATCH_STAGERS)]:
        done.result()


@pytest.mark.parametrize("end", ["publish", "discard"])
def test_a_staged_batch_write_whose_wait_is_interrupted_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """A batch-staged write (a shard file's) whose publish or discard is interrupted
    (Ctrl-C) while it waits, before its thread took it or while the thread writes it,
    leaves no temporary file once the thread is done, and the old file as it was."""
    path = tmp_path / "0000-of-0064.conf"
    path.write_bytes(b"old\n")
    if end == "publish":  # a discard cancels a write no thread took, without a wait
        pool = files_module._stage_executor(batch=True)
        busy = threading.Event()
        # Every stage thread busy: the write is queued, not taken, when the wait is cut.
        for _ in range(files_module.BATCH_STAGERS):
            pool.submit(busy.wait, 10)
        queued = files_module.stage(path, b"queued\n", batch=True)
        with pytest.raises(KeyboardInterrupt), _interrupted_after(0.05):
            queued.publish(backup=True)
        busy.set()
        _drain_batch_stagers()
        assert _temporaries(tmp_path) == []
    written, writing = threading.Event(), threading.Event()
    # Taken by its thread, which is still writing it when the wait is cut.
    real_write = files_module._write_temporary

    def slow_write(temp: Path, like: Path, data: Any) -> None:
        real_write(temp, like, data)
        written.set()
        writing.wait(10)

    monkeypatch.setattr(files_module, "_write_temporary", slow_write)
    running = files_module.stage(path, b"running\n", batch=True)
    assert written.wait(10)
    with pytest.raises(KeyboardInterrupt), _interrupted_after(0.05):
        getattr(running, end)(**({"backup": True} if end == "publish" else {}))
    writing.set()
    _drain_batch_stagers()
    assert _temporaries(tmp_path) == []
    assert path.read_bytes() == b"old\n"


def test_a_first_full_apply_refused_by_its_guard_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A new target's full apply whose guard raises leaves the file, its backup and the
    directory as they were (the bytes it had begun writing are removed)."""
    path = tmp_path / "pjsip_users.conf"
    ConfigFileTarget(path).apply(rendered())
    ConfigFileTarget(path).apply(rendered("md5"))
    before = written(tmp_path)

    def guard(change: Change) -> None:
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        ConfigFileTarget(path).apply(rendered(users=REPRESENTATIVE[:1]), guard=guard)
    assert written(tmp_path) == before


def test_a_small_first_full_apply_fsyncs_its_temporary_file_in_the_stage_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new target's first full apply of a small file has its temporary file fsynced by
    the stage thread (while the caller checks the text), and the file holds the text."""
    fsynced: list[tuple[str, str]] = []
    fsync = os.fsync

    def spied(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        fsynced.append((threading.current_thread().name, name))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spied)
    path = tmp_path / "pjsip_users.conf"
    assert ConfigFileTarget(path).apply(rendered()).wrote
    check_rendered(path.read_bytes(), rendered())
    temporaries = [(thread, name) for thread, name in fsynced if name.endswith(".tmp")]
    assert len(temporaries) == 1, fsynced
    assert temporaries[0][0].startswith("stage"), fsynced
    assert _temporaries(tmp_path) == []


def test_a_first_full_apply_whose_check_fails_leaves_everything_as_it_was(
    tmp_path: Path,
) -> None:
    """A new target's full apply whose text does not parse back to its objects raises
    RenderCheckFailed and leaves the file, its backup and the directory as they were."""
    path = tmp_path / "pjsip_users.conf"
    ConfigFileTarget(path).apply(rendered())
    ConfigFileTarget(path).apply(rendered("md5"))
    before = written(tmp_path)
    # A comment mark: Asterisk would read the value as "a", not "a;b".
    odd = replace(rendered()[0], endpoint=(*rendered()[0].endpoint, ("x", "a;b")))
    with pytest.raises(RenderCheckFailed):
        ConfigFileTarget(path).apply([odd, *rendered()[1:]])
    assert written(tmp_path) == before


def test_a_first_full_apply_the_canonical_checks_refuse_is_parsed_in_full(tmp_path: Path) -> None:
    """A new target's full apply holding a value the canonical checks leave to the parser
    writes the text that parses back exactly, and leaves no temporary file."""
    odd = replace(rendered()[0], endpoint=(*rendered()[0].endpoint, ("x", "a=>b")))
    objects = [odd, *rendered()[1:]]
    path = tmp_path / "pjsip_users.conf"
    assert ConfigFileTarget(path).apply(objects).wrote
    check_rendered(path.read_bytes(), objects)
    assert _temporaries(tmp_path) == []


# --- templates ---------------------------------------------------------------------------


def test_operator_override_is_used(tmp_path: Path) -> None:
    """A header.j2 in target.templates replaces the shipped one; the rest still applies."""
    overrides = write_override(tmp_path / "tpl", "header.j2", "; Site ACME: do not edit\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    change = target.apply(rendered())
    text = target.path.read_text(encoding="utf-8")
    assert change.wrote
    assert text.startswith("; Site ACME: do not edit\n\n[1001]\n")
    check_rendered(text.encode(), rendered())


def test_override_may_change_layout_but_not_content(tmp_path: Path) -> None:
    """An override that writes 'key = value' with comments still parses to the same objects."""
    section = (
        "{% macro section(id, type, options) %}\n"
        "[{{ id }}] ; {{ type }}\ntype = {{ type }}\n"
        "{% for k, v in options %}{{ k }} => {{ v }}\n{% endfor %}"
        "{% endmacro %}"
    )
    target = ConfigFileTarget(
        tmp_path / "out.conf", write_override(tmp_path / "t", "section.j2", section)
    )
    assert target.apply(rendered()).wrote
    assert "aors => 1001" in target.path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "section",
    [
        # An extra option in every section.
        "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
        "{% for k, v in options %}{{ k }}={{ v }}\n{% endfor %}allow=all\n{% endmacro %}",
        # A directive.
        "{% macro section(id, type, options) %}\n#include evil.conf\n[{{ id }}]\n"
        "type={{ type }}\n{% for k, v in options %}{{ k }}={{ v }}\n{% endfor %}{% endmacro %}",
        # A value cut short by a comment.
        "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
        "{% for k, v in options %}{{ k }}={{ v[:3] }};{{ v[3:] }}\n{% endfor %}{% endmacro %}",
        # A template mark and an injected section.
        "{% macro section(id, type, options) %}\n[{{ id }}](!)\ntype={{ type }}\n"
        "{% for k, v in options %}{{ k }}={{ v }}\n{% endfor %}[evil]\nx=1\n{% endmacro %}",
        # Options in another order.
        "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
        "{% for k, v in options|reverse %}{{ k }}={{ v }}\n{% endfor %}{% endmacro %}",
    ],
)
@pytest.mark.parametrize("shards", [0, 4])
def test_bad_template_fails_and_keeps_the_old_file(
    tmp_path: Path, section: str, shards: int
) -> None:
    """A template whose output differs from the objects raises RenderCheckFailed; no file
    (nor temporary file) is written, whether one file or shard files."""
    path = tmp_path / "out.conf"
    make_target(path, shards).apply(rendered())
    overrides = write_override(tmp_path / "t", "section.j2", section)
    before = written(tmp_path)
    target = make_target(path, shards, overrides)
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    assert written(tmp_path) == before
    for user in REPRESENTATIVE:
        assert user.sip_md5 not in str(info.value)
        assert user.sip_sha256 not in str(info.value)


#: The auth section's digest value, as an override can reach it in section.j2.
_DIGEST = '{% for k, v in options %}{% if k == "password_digest" %}{{ v }}{% endif %}{% endfor %}'


def _quotes_a_digest(message: str) -> bool:
    """True when ``message`` holds 12 characters in a row of any representative user's
    digests (a digest cut short by a template leaks as much)."""
    digests = [d for u in REPRESENTATIVE for d in (u.sip_md5, u.sip_sha256)]
    return any(d[i : i + 12] in message for d in digests for i in range(len(d) - 11))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        # Option names and values swapped: the digest comes out as an option's name.
        (
            "section.j2",
            "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
            "{% for k, v in options %}{{ v }}={{ k }}\n{% endfor %}{% endmacro %}",
        ),
        # The digest as an unknown directive's word.
        (
            "section.j2",
            "{% macro section(id, type, options) %}\n[{{ id }}]\ntype={{ type }}\n"
            "{% for k, v in options %}{{ k }}={{ v }}\n#{{ v }}\n{% endfor %}{% endmacro %}",
        ),
        # Part of the digest in a section's name.
        (
            "section.j2",
            "{% macro section(id, type, options) %}\n[{{ id }}"
            + _DIGEST.replace("{{ v }}", "{{ v[7:40] }}")
            + "]\ntype={{ type }}\n{% for k, v in options %}{{ k }}={{ v }}\n{% endfor %}"
            "{% endmacro %}",
        ),
        # The digest as the name of a section inherited from (Asterisk refuses the file).
        (
            "section.j2",
            "{% macro section(id, type, options) %}\n[{{ id }}]"
            + "{% if type == 'auth' %}("
            + _DIGEST
            + "){% endif %}"
            "\ntype={{ type }}\n{% for k, v in options %}{{ k }}={{ v }}\n{% endfor %}"
            "{% endmacro %}",
        ),
        # The header makes a section of the first user's digest.
        (
            "header.j2",
            '[{% for k, v in users[0].auth %}{% if k == "password_digest" %}{{ v }}'
            "{% endif %}{% endfor %}]\nx=1\n",
        ),
    ],
)
@pytest.mark.parametrize("shards", [0, 4])
def test_a_render_check_failure_never_quotes_a_digest_an_override_put_in_a_name(
    tmp_path: Path, name: str, text: str, shards: int
) -> None:
    """An override that puts a digest (or part of one) where the parse-back check quotes
    text (a section's or option's name, a directive's word, a section inherited from)
    fails the check with a message that holds no part of it."""
    target = make_target(tmp_path / "out.conf", shards, write_override(tmp_path / "t", name, text))
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    assert not _quotes_a_digest(str(info.value)), str(info.value)


def test_template_errors_are_render_check_failures(tmp_path: Path) -> None:
    """A syntax error or an undefined name in an override raises RenderCheckFailed."""
    broken = ConfigFileTarget(
        tmp_path / "a.conf", write_override(tmp_path / "t1", "header.j2", "{% if %}")
    )
    with pytest.raises(RenderCheckFailed, match=r"header\.j2"):
        broken.render_text(rendered())
    undefined = ConfigFileTarget(
        tmp_path / "b.conf", write_override(tmp_path / "t2", "header.j2", "{{ nope }}\n")
    )
    with pytest.raises(RenderCheckFailed):
        undefined.render_text(rendered())


@pytest.mark.parametrize(
    ("name", "text", "error", "line"),
    [
        ("header.j2", "; Site ACME\n; {{ nope }}\n", "UndefinedError", 2),
        ("header.j2", "; Site ACME\n\n; {{ 1 // 0 }}\n", "ZeroDivisionError", 3),
        ("header.j2", "; {{ users | length + 'x' }}\n", "TypeError", 1),
        (
            "user.j2",
            "{% macro user(user) %}\n\n{{ user.nope }}\n{% endmacro %}\n",
            "UndefinedError",
            3,
        ),
    ],
)
@pytest.mark.parametrize("shards", [0, 4])
def test_a_template_failing_as_it_renders_is_named_with_its_line_and_nothing_is_written(
    tmp_path: Path, name: str, text: str, error: str, line: int, shards: int
) -> None:
    """An override that fails while rendering (an undefined name, a Python error) raises
    RenderCheckFailed naming the error's type, the template and the line; no file changes."""
    path = tmp_path / "out.conf"
    make_target(path, shards).apply(rendered())
    overrides = write_override(tmp_path / "t", name, text)
    before = written(tmp_path)
    target = make_target(path, shards, overrides)
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    assert str(info.value).endswith(f"templates failed to render ({error}) at {name} line {line}")
    assert written(tmp_path) == before


#: Override mistakes that put values where Asterisk reads names: key and value swapped, a
#: value as a section header, as an inheritance, as a directive.
MISTAKES = {
    "swapped": ("{{ key }}={{ value }}", "{{ value }}={{ key }}"),
    "header": ("{{ key }}={{ value }}", "{{ key }}={{ value }}\n[x{{ value }}]"),
    "inheritance": ("{{ key }}={{ value }}", "{{ key }}={{ value }}\n[y](x{{ value }})"),
    "directive": ("{{ key }}={{ value }}", "{{ key }}={{ value }}\n#x{{ value }} y"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("shards", [0, 4])
def test_a_parse_back_failure_never_quotes_a_credential(
    tmp_path: Path, mistake: str, shards: int
) -> None:
    """An override whose mistake puts a credential where Asterisk reads a name (an option
    name, a section header, an inheritance, a directive) fails the parse-back check with
    a message that holds no digest, nor 21 hex digits of one; nothing is written."""
    old, new = MISTAKES[mistake]
    section = (SHIPPED_TEMPLATES / "section.j2").read_text()
    overrides = write_override(tmp_path / "t", "section.j2", section.replace(old, new))
    target = make_target(tmp_path / "out.conf", shards, overrides)
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    message = str(info.value).lower()
    for user in REPRESENTATIVE:
        for digest in (user.sip_md5, user.sip_sha256):
            pieces = {digest[i : i + 21] for i in range(len(digest) - 20)}
            assert not any(piece in message for piece in pieces), message
    assert not target.path.exists()


@pytest.mark.parametrize("shards", [0, 4])
def test_a_byte_order_mark_starting_a_template_never_reaches_the_file(
    tmp_path: Path, shards: int
) -> None:
    """A header.j2 saved with a UTF-8 byte-order mark (as Windows Notepad saves) renders
    without it, also where the main template includes it after a first line (a BOM
    there would be a line Asterisk cannot read)."""
    overrides = tmp_path / "t"
    overrides.mkdir()
    (overrides / "header.j2").write_bytes(b"\xef\xbb\xbf; Site ACME\n")
    main = (SHIPPED_TEMPLATES / MAIN_TEMPLATE).read_text(encoding="utf-8")
    (overrides / MAIN_TEMPLATE).write_text(
        main.replace('{% include "header.j2" -%}', '; first\n{% include "header.j2" -%}'),
        encoding="utf-8",
    )
    target = make_target(tmp_path / "out.conf", shards, overrides)
    assert target.apply(rendered()).wrote
    conf = {path: data for path, data in written(tmp_path).items() if path.suffix == ".conf"}
    assert len(conf) == 1 + shards
    assert not [path for path, data in conf.items() if b"\xef\xbb\xbf" in data]
    check_written(target, rendered())


@pytest.mark.parametrize("shards", [0, 4])
def test_a_template_that_is_not_utf8_is_named_and_nothing_is_written(
    tmp_path: Path, shards: int
) -> None:
    """An override saved in another encoding (Latin-1) raises RenderCheckFailed naming the
    template, not a UnicodeDecodeError (which the daemon's apply would not catch)."""
    path = tmp_path / "out.conf"
    make_target(path, shards).apply(rendered())
    overrides = tmp_path / "t"
    overrides.mkdir()
    (overrides / "header.j2").write_bytes("; Société ACME\n".encode("latin-1"))
    before = written(tmp_path)
    target = make_target(path, shards, overrides)
    with pytest.raises(RenderCheckFailed, match=r"template 'header\.j2' is not UTF-8"):
        target.apply(rendered())
    assert written(tmp_path) == before


def _unreadable(overrides: Path, name: str, kind: str) -> str:
    """Make ``overrides/name`` an entry no template can be read from (``kind``: a dangling
    symbolic link, a link loop, a directory): what the error says it is."""
    entry = overrides / name
    if kind == "dangling":
        entry.symlink_to(overrides / "gone.j2")
        return "is a symbolic link to nothing"
    if kind == "loop":
        entry.symlink_to(entry)
        return "cannot be opened: too many levels of symbolic links"
    entry.mkdir()
    return "is a directory"


@pytest.mark.parametrize("name", ["header.j2", "user.j2"])
@pytest.mark.parametrize("kind", ["dangling", "loop", "directory"])
@pytest.mark.parametrize("shards", [0, 4])
def test_an_override_template_that_cannot_be_read_is_named_and_nothing_is_written(
    tmp_path: Path, name: str, kind: str, shards: int
) -> None:
    """An override template that cannot be read (a dangling symbolic link, a link loop, a
    directory), even one rendered well before, raises RenderCheckFailed naming the file
    and why, never rendering the shipped template in its place; nothing is written."""
    (tmp_path / "out").mkdir()
    overrides = write_override(tmp_path / "t", "header.j2", "; site header v1\n")
    target = make_target(tmp_path / "out" / "out.conf", shards, overrides)
    target.apply(rendered())
    before = written(tmp_path / "out")
    (overrides / "header.j2").unlink()
    why = _unreadable(overrides, name, kind)
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    # A shard file's failure starts with the shard file's name.
    assert str(info.value).endswith(
        f"template {name!r} cannot be read: {str(overrides / name)!r} {why}"
    )
    assert written(tmp_path / "out") == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_override_template_without_read_permission_is_named(tmp_path: Path) -> None:
    """An override template the daemon may not read raises RenderCheckFailed naming the
    file and why, never rendering the shipped template in its place."""
    overrides = write_override(tmp_path / "t", "header.j2", "; site header\n")
    (overrides / "header.j2").chmod(0)
    with pytest.raises(RenderCheckFailed) as info:
        ConfigFileTarget(tmp_path / "out.conf", overrides).render_text(rendered())
    assert str(info.value) == (
        f"template 'header.j2' cannot be read: {str(overrides / 'header.j2')!r} "
        "cannot be opened: permission denied"
    )


@pytest.mark.parametrize(
    "header",
    [
        "; {{ ''.__class__.__mro__ }}\n",
        "; {{ cycler.__init__.__globals__.os.environ }}\n",
        "; {{ users.append(1) }}\n",
        "; {% set seen = {} %}{{ seen.update(a=1) }}\n",
    ],
)
def test_override_templates_are_sandboxed(tmp_path: Path, header: str) -> None:
    """An override reaching Python internals or calling a mutating method fails to render."""
    target = ConfigFileTarget(
        tmp_path / "a.conf", write_override(tmp_path / "t", "header.j2", header)
    )
    with pytest.raises(
        RenderCheckFailed, match=r"templates failed to render \((Undefined|Security)Error\)"
    ):
        target.render_text(rendered())
    assert not (tmp_path / "a.conf").exists()


def test_missing_override_directory_is_a_config_error(tmp_path: Path) -> None:
    """A target.templates directory that does not exist is reported as a config problem."""
    with pytest.raises(ConfigError) as info:
        ConfigFileTarget(tmp_path / "x.conf", tmp_path / "nope")
    assert info.value.problems[0].field == "target.templates"


def test_from_config(tmp_path: Path) -> None:
    """from_config takes target.path and target.templates (empty means none)."""
    overrides = write_override(tmp_path / "tpl", "header.j2", "; custom\n")
    config = load_config(
        env={},
        overrides={"target": {"path": str(tmp_path / "p.conf"), "templates": str(overrides)}},
    )
    target = ConfigFileTarget.from_config(config)
    assert target.path == tmp_path / "p.conf"
    assert target.templates_dir == overrides
    assert ConfigFileTarget.from_config(load_config(env={})).templates_dir is None


# --- hostile input -----------------------------------------------------------------------

HOSTILE_PIECES = [
    "\r",
    "\n",
    "\r\n",
    "\0",
    ";",
    ";--",
    "--;",
    "\\",
    "\\;",
    "[section]",
    "[1001](!)",
    "(!)",
    "(+)",
    "+=",
    "=>",
    "=",
    "#include /etc/passwd",
    "#exec /bin/sh",
    "#tryinclude x",
    '"',
    "'",
    "<",
    ">",
    " ",
    "\t",
    "\x0b",
    "\x0c",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\u00a0",
    "\u2028",
    "\u2029",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\ufe54",  # small semicolon
    "\uff1b",  # fullwidth semicolon
    "\uff3b",  # fullwidth [
    "\uff03",  # fullwidth #
    "\u037e",  # Greek question mark, looks like ';'
    "\ud800",
    "é",
    "Zoë",
    "☎",
    "1001",
    "ulaw",
    "1-3",
    "alice",
    "from-sip",
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE_PIECES),
    st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(max_size=4)), max_size=6).map(
        "".join
    ),
    st.text(max_size=30),
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["a", "é", "1", ";", "\n"]),
        st.integers(40, 9000),
    ),
)

#: Field -> how a hostile string replaces it in a user; and the Problem.field names it may give.
FIELDS: dict[str, tuple[Callable[[User, str], User], set[str]]] = {
    "full_name": (lambda u, s: replace(u, full_name=s), {"full_name"}),
    "username": (lambda u, s: replace(u, username=s), {"username"}),
    "extension": (lambda u, s: replace(u, extension=s), {"extension"}),
    "sip_md5": (lambda u, s: replace(u, sip_md5=s), {"sip_secret"}),
    "sip_sha256": (lambda u, s: replace(u, sip_sha256=s), {"sip_secret"}),
    "sip_realm": (lambda u, s: replace(u, sip_realm=s), {"sip_secret"}),
    "context": (lambda u, s: replace(u, voice=replace(u.voice, context=s)), {"context"}),
    "call_group": (lambda u, s: replace(u, voice=replace(u.voice, call_group=s)), {"call_group"}),
    "pickup_group": (
        lambda u, s: replace(u, voice=replace(u.voice, pickup_group=s)),
        {"pickup_group"},
    ),
    "transport": (lambda u, s: replace(u, voice=replace(u.voice, transport=s)), {"transport"}),
    "nat": (lambda u, s: replace(u, voice=replace(u.voice, nat=s)), {"nat"}),
    "video": (lambda u, s: replace(u, voice=replace(u.voice, video=s)), {"video"}),
    "codecs": (
        lambda u, s: replace(u, voice=replace(u.voice, codecs=(*u.voice.codecs, s))),
        {"codecs"},
    ),
    "codecs_only": (
        lambda u, s: replace(u, voice=replace(u.voice, codecs=tuple(s.split(",")))),
        {"codecs"},
    ),
}


def attempt(
    user: User, render_settings: RenderSettings
) -> tuple[UserObjects | None, set[str] | None]:
    """The rendered objects, or the fields named by the InvalidInput that refused the user."""
    try:
        return render_user(user, render_settings), None
    except InvalidInput as exc:
        return None, {p.field for p in exc.problems}


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from(REPRESENTATIVE),
    changes=st.lists(
        st.tuples(st.sampled_from(sorted(FIELDS)), hostile_text), min_size=1, max_size=3
    ),
    auth_type=st.sampled_from(["userpass", "md5"]),
)
def test_hostile_fields_are_refused_or_render_exactly(
    base: User, changes: list[tuple[str, str]], auth_type: str
) -> None:
    """A hostile value in any field is refused naming that field, or renders exactly."""
    user = base
    for name, value in changes:
        user = FIELDS[name][0](user, value)
    render_settings = RenderSettings(auth_type=auth_type)
    objects, refused = attempt(user, render_settings)
    if refused is not None:
        allowed = set().union(*(FIELDS[name][1] for name, _ in changes))
        assert refused & allowed, refused
        event("refused")
        return
    assert objects is not None
    event("rendered")
    target = ConfigFileTarget(Path("unused.conf"))
    check_rendered(target.render_text([objects]).encode("utf-8"), [objects])
    # What was rendered is what the user holds: nothing was silently altered.
    assert objects.endpoint_id == user.extension
    assert dict(objects.endpoint)["context"] == user.voice.context
    assert user.full_name.startswith(dict(objects.endpoint)["callerid"][1:].rsplit('"', 1)[0])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(realm=hostile_text, transport_name=hostile_text)
@example(realm="é" * 4093, transport_name="0")  # a line Asterisk would skip
def test_hostile_settings_are_refused_or_render_exactly(realm: str, transport_name: str) -> None:
    """A hostile realm or transport name in the settings is refused or renders exactly."""
    user = make_user("1001", "alice", "Alice", realm=realm)
    render_settings = RenderSettings(
        realm=realm,
        transports={p: transport_name for p in ("udp", "tcp", "tls", "ws", "wss")},
    )
    objects, refused = attempt(user, render_settings)
    if refused is not None:
        assert refused & {"realm", "transport", "sip_secret"}
        return
    assert objects is not None
    check_rendered(ConfigFileTarget(Path("u.conf")).render_text([objects]).encode(), [objects])


#: Pieces the rules let through in a full name, but that mean something to Asterisk or a terminal.
ALLOWED_BUT_TRICKY = [
    "(!)",
    "(+)",
    "+=",
    "=>",
    "=",
    "--",
    "-",
    "'",
    ",",
    "(",
    ")",
    "$",
    "${EXTEN}",
    "%s",
    "{{ x }}",
    "{% raw %}",
    "\uff1b",
    "\u037e",
    "\uff3b",
    "\uff03",
    "\u2028",
    "\u2029",
    "é",
    "Zoë",
    "☎",
    "𝔄",
    "a",
    "Z",
    "0",
]

tricky_name = st.lists(
    st.one_of(st.sampled_from(ALLOWED_BUT_TRICKY), st.sampled_from([" ", "x"])), min_size=1
).map(lambda parts: "".join(parts).strip() or "x")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(full_name=tricky_name, base=st.sampled_from(REPRESENTATIVE))
def test_tricky_allowed_names_render_exactly(full_name: str, base: User) -> None:
    """Full names the rules allow, however odd, render a file that parses back exactly."""
    objects, refused = attempt(replace(base, full_name=full_name), RenderSettings())
    if refused is not None:
        assert refused == {"full_name"}
        event("refused")
        return
    assert objects is not None
    event("rendered")
    check_rendered(ConfigFileTarget(Path("u.conf")).render_text([objects]).encode(), [objects])


def test_a_long_multibyte_name_fits_asterisks_caller_id_buffer(target: ConfigFileTarget) -> None:
    """A caller ID name Asterisk would cut at byte 79, inside a character, is shortened
    to whole characters that fit."""
    name = "अनुराधा श्रीनिवासन कृष्णमूर्ति"  # 30 characters, 86 bytes of UTF-8
    target.apply([render_user(make_user("1001", "anu", name), RenderSettings())])
    (endpoint, _auth, _aor) = parse(target.path.read_bytes()).sections
    callerid = dict(endpoint.options)["callerid"]
    shown = callerid[1 : callerid.rindex('"')]
    assert len(shown.encode()) <= 79  # res_pjsip: char cid_name[80]
    assert name.startswith(shown)
    assert len(shown.encode()) > 79 - 3  # only what does not fit is dropped
    assert callerid.endswith('" <1001>')


# --- speed: fast parse-back check, template reloads, apply without a diff -------------------

HEADER = (SHIPPED := ConfigFileTarget(Path("u.conf"))).render_text([])


def test_shipped_templates_render_the_canonical_chunks() -> None:
    """The shipped templates' text is the header followed by every user's canonical chunk."""
    for auth_type in ("userpass", "md5"):
        objects = rendered(auth_type)
        chunks = [canonical_chunk(u) for u in objects]
        assert None not in chunks
        assert SHIPPED.render_text(objects) == HEADER + "".join(c or "" for c in chunks)
        # What Jinja makes of the shipped templates, without the target's direct path.
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(SHIPPED_TEMPLATES)), keep_trailing_newline=True
        )
        assert env.get_template(MAIN_TEMPLATE).render(users=objects) == SHIPPED.render_text(objects)


#: Mostly near-plain text (so the fast path is taken often), with the odd characters mixed in.
near_plain = st.text(
    alphabet=st.sampled_from([*"ax1é☎.-+=" * 8, *">;[]#\\\n\t\r \x00\x85"]), max_size=5
)
plain_ids = st.sampled_from(["1001", "1001-auth", "a.b@c+d"])
hostile_id = st.one_of(plain_ids, plain_ids, plain_ids, near_plain, hostile_text)
plain_names = st.sampled_from(["allow", "a_1", "type"])
hostile_name = st.one_of(plain_names, plain_names, plain_names, near_plain, hostile_text)
hostile_value = st.one_of(near_plain, near_plain, near_plain, hostile_text)
hostile_options = st.lists(st.tuples(hostile_name, hostile_value), max_size=3).map(tuple)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.tuples(hostile_id, hostile_id, hostile_id),
    options=st.tuples(hostile_options, hostile_options, hostile_options),
)
@example(ids=("1001", "1001-auth", "1001"), options=((("a", ">x"),), (), ()))
@example(ids=("1001", "1001-auth", "1001"), options=((("a+", "x"),), (("b", " x"),), ()))
@example(ids=("1001", "1001-auth", "1001"), options=((("a", "x\nb=y"),), (("c=d", "e"),), ()))
@example(ids=("1001\n[x]", "1001]=a", "1001"), options=((), (("b", "x;y"),), (("c", "é "),)))
def test_the_fast_path_accepts_only_what_the_parser_accepts(
    ids: tuple[str, str, str], options: tuple[Any, Any, Any]
) -> None:
    """Any objects whose canonical chunk exists parse back exactly from header + chunk."""
    user = UserObjects("u", ids[0], options[0], ids[1], options[1], ids[2], options[2])
    chunk = canonical_chunk(user)
    if chunk is None:
        event("left to the parser")
        return
    event("fast path")
    check_rendered((HEADER + chunk).encode("utf-8"), [user])


def test_a_header_hiding_the_users_is_caught(tmp_path: Path) -> None:
    """A header opening a block comment hides the canonical users: the full check refuses it."""
    target = ConfigFileTarget(
        tmp_path / "out.conf", write_override(tmp_path / "t", "header.j2", "; hi\n;--\n")
    )
    with pytest.raises(RenderCheckFailed):
        target.apply(rendered())
    assert not target.path.exists()


def test_a_changed_template_is_used_by_the_same_target(tmp_path: Path) -> None:
    """Editing an override between applies changes the next file, with no new target object."""
    overrides = write_override(tmp_path / "t", "header.j2", "; one\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    assert target.path.read_text(encoding="utf-8").startswith("; one\n")
    (overrides / "header.j2").write_text("; two, longer\n", encoding="utf-8")
    assert target.apply(rendered()).wrote
    assert target.path.read_text(encoding="utf-8").startswith("; two, longer\n")
    (overrides / "header.j2").unlink()
    target.reload_templates()
    assert target.apply(rendered()).wrote
    assert target.path.read_text(encoding="utf-8").startswith(HEADER)


def test_a_template_in_a_subdirectory_of_the_override_is_found_and_its_edit_used(
    tmp_path: Path,
) -> None:
    """An override including a template from a subdirectory of its directory renders it,
    and an edit of that file in place is used by the same target at the next apply."""
    overrides = write_override(tmp_path / "t", "header.j2", '{% include "sub/note.j2" %}')
    write_override(overrides / "sub", "note.j2", "; one\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    assert target.path.read_text(encoding="utf-8").startswith("; one\n")
    (overrides / "sub" / "note.j2").write_text("; two, longer\n", encoding="utf-8")
    assert target.apply(rendered()).wrote
    assert target.path.read_text(encoding="utf-8").startswith("; two, longer\n")
    check_rendered(target.path.read_bytes(), rendered())


def test_an_include_marked_ignore_missing_or_with_a_fallback_renders_and_a_missing_one_is_named(
    tmp_path: Path,
) -> None:
    """An override's include of a missing template marked ``ignore missing``, or listed
    before one that exists, renders; an include of missing templates alone is a
    RenderCheckFailed saying which were not found, and nothing is written."""
    header = '; x\n{% include "gone.j2" ignore missing %}{% include ["gone.j2", "note.j2"] %}'
    overrides = write_override(tmp_path / "t", "header.j2", header)
    write_override(overrides, "note.j2", "; note\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    assert target.path.read_text(encoding="utf-8").startswith("; x\n; note\n")
    for text, said in (
        ('{% include "gone.j2" %}', "template 'gone.j2' not found"),
        ('{% include ["gone.j2", "lost.j2"] %}', "none of templates 'gone.j2', 'lost.j2' found"),
    ):
        broken = ConfigFileTarget(
            tmp_path / "b.conf", write_override(tmp_path / "t2", "header.j2", text)
        )
        with pytest.raises(RenderCheckFailed) as info:
            broken.apply(rendered())
        assert str(info.value) == said
        assert not broken.path.exists()


def test_a_template_in_a_subdirectory_failing_as_it_renders_is_named(tmp_path: Path) -> None:
    """A Python error raised by a template an override includes from a subdirectory is a
    RenderCheckFailed naming that template by its path and line; nothing is written."""
    overrides = write_override(tmp_path / "t", "header.j2", '{% include "sub/note.j2" %}')
    write_override(overrides / "sub", "note.j2", "; fine\n{{ 1 // 0 }}\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    with pytest.raises(RenderCheckFailed) as info:
        target.apply(rendered())
    assert str(info.value).endswith("(ZeroDivisionError) at sub/note.j2 line 2")
    assert not target.path.exists()


def test_editor_files_beside_the_templates_keep_the_compiled_templates(tmp_path: Path) -> None:
    """Swap, backup and lock files an editor writes beside an override leave the target's
    compiled templates in use (nothing is recompiled for them)."""
    overrides = write_override(tmp_path / "t", "header.j2", "; one\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    env = target._templates.fresh()
    for name in (".header.j2.swp", "header.j2~", "#header.j2#", "4913"):
        (overrides / name).write_text("junk\n", encoding="utf-8")
    assert target._templates.fresh() is env


def test_an_override_directory_deleted_under_a_target_is_logged_loudly(tmp_path: Path) -> None:
    """An override directory deleted after the target was made is logged as a warning
    naming it, once, at the render that falls back to the shipped templates; its return is
    logged too, and its templates are used again."""
    overrides = write_override(tmp_path / "t", "header.j2", "; one\n")
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    shutil.rmtree(overrides)
    with capture_logs() as logs:
        assert target.apply(rendered()).wrote
        target.apply(rendered())
    assert target.path.read_text(encoding="utf-8").startswith(HEADER)
    gone = [e for e in logs if e["event"] == "templates.directory_missing"]
    assert [(e["log_level"], e["path"]) for e in gone] == [("warning", str(overrides))]
    write_override(overrides, "header.j2", "; two\n")
    with capture_logs() as logs:
        assert target.apply(rendered()).wrote
    assert target.path.read_text(encoding="utf-8").startswith("; two\n")
    assert [e["path"] for e in logs if e["event"] == "templates.directory_back"] == [str(overrides)]


def test_a_template_replaced_by_a_file_of_the_same_size_and_mtime_is_used(
    tmp_path: Path,
) -> None:
    """A template renamed over by another file of the same size and modification time (a
    release tool fixing mtimes, a package's files) is read afresh at the next apply, by
    the same target and by a new one: the daemon's watcher saw it change."""
    overrides = write_override(tmp_path / "t", "header.j2", "; Site A\n")
    header = overrides / "header.j2"
    os.utime(header, ns=(1_000_000_000, 1_000_000_000))
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    assert target.path.read_text(encoding="utf-8").startswith("; Site A\n")
    release = overrides / "header.j2.new"
    release.write_text("; Site B\n", encoding="utf-8")
    os.utime(release, ns=(1_000_000_000, 1_000_000_000))
    os.replace(release, header)
    assert target.apply(rendered()).wrote
    assert target.path.read_text(encoding="utf-8").startswith("; Site B\n")
    other = ConfigFileTarget(tmp_path / "other.conf", overrides)
    assert other.render_text(rendered()).startswith("; Site B\n")


def test_targets_share_compiled_templates_until_a_file_changes(tmp_path: Path) -> None:
    """A new target over the same, unchanged template files renders with the templates
    another compiled; an edit (even one keeping size and mtime, after reload_templates)
    is read afresh."""
    overrides = write_override(tmp_path / "t", "header.j2", "; one\n")
    first = ConfigFileTarget(tmp_path / "a.conf", overrides)
    second = ConfigFileTarget(tmp_path / "b.conf", overrides)
    assert first._templates.fresh() is second._templates.fresh()
    header = overrides / "header.j2"
    stat = header.stat()
    header.write_text("; two\n", encoding="utf-8")
    os.utime(header, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second.reload_templates()
    assert second.apply(rendered()).wrote
    assert second.path.read_text(encoding="utf-8").startswith("; two\n")
    assert ConfigFileTarget(tmp_path / "c.conf", overrides)._templates.fresh() is (
        second._templates.fresh()
    )


def test_preparing_a_file_of_thousands_of_users_runs_no_garbage_collection(
    target: ConfigFileTarget,
) -> None:
    """Rendering and checking a file of 2,000 users runs no cyclic garbage collection (what
    it allocates holds no cycles) but the one due when the collector, left enabled as it
    was found, resumes."""
    users = [make_user(str(2000 + i), f"user{i}", f"User {i}") for i in range(2000)]
    objects = rendered(users=users)
    with collections_seen() as generations:
        pending = target.prepare(objects, ())
        enabled_after = gc.isenabled()
    assert generations in ([], [0])
    assert enabled_after
    assert len(pending.change.added) == 2000


def test_apply_computes_no_diff_but_plan_does(target: ConfigFileTarget) -> None:
    """apply leaves Change.diff empty (plan fills it); the written file is still exact."""
    change = target.apply(rendered())
    assert change.wrote
    assert change.diff == ""
    check_rendered(target.path.read_bytes(), rendered())
    assert target.plan(rendered("md5")).diff.startswith(f"--- {target.path}")


@pytest.mark.parametrize(
    ("endpoint_id", "option"),
    [
        ("1001", ("a", "x\nb=y")),
        ("1001", ("c=d", "e")),
        ("1001", ("a+", "x")),
        ("1001", ("a", ">x")),
        ("1001", ("a", " x")),
        ("1001", ("a", "x;y")),
        ("1001", ("a", "x\\")),
        ("1001]", ("a", "x")),
        ("1001\n[x]", ("a", "x")),
        ("1" * 80, ("a", "x")),
    ],
)
def test_the_fast_path_leaves_odd_text_to_the_parser(
    endpoint_id: str, option: tuple[str, str]
) -> None:
    """An id, name or value that Asterisk would not take literally has no canonical chunk."""
    user = UserObjects("u", endpoint_id, (option,), "1001-auth", (), "1001", ())
    assert canonical_chunk(user) is None


@pytest.mark.parametrize("value", ["a b", "x y z", '"A B" <1001>', "a=b c", "a >b"])
def test_the_fast_path_takes_blanks_inside_a_value(value: str) -> None:
    """A value with blanks (or a '>') inside, not at its edges, is canonical and parses back
    exactly, also where the boiled-down bytes the checks read first put such a blank right
    after the option's '=' (a value "a b")."""
    user = UserObjects("u", "1001", (("a", value),), "1001-auth", (("b", "x"),), "1001", ())
    chunk = canonical_chunk(user)
    assert chunk is not None
    check_rendered((HEADER + chunk).encode("utf-8"), [user])


#: A real user with one id, option name or value replaced (:func:`_with_one_piece`).
ONE_PIECE = {
    "base": st.sampled_from(REPRESENTATIVE),
    "where": st.integers(0, 300),
    "part": st.sampled_from(["id", "name", "value"]),
    "piece": st.one_of(near_plain, near_plain, hostile_text),
}


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(**ONE_PIECE)
def test_one_odd_piece_is_caught_by_the_fast_path_or_the_parser(
    base: User, where: int, part: str, piece: str
) -> None:
    """A real user with one id, option name or value replaced parses back exactly whenever
    the fast path takes it."""
    user = _with_one_piece(base, where, part, piece)
    chunk = canonical_chunk(user)
    event("left to the parser" if chunk is None else "fast path")
    if chunk is not None:
        check_rendered((HEADER + chunk).encode("utf-8"), [user])


def _with_one_piece(base: User, where: int, part: str, piece: str) -> UserObjects:
    """``base``'s objects with one id (``part`` "id"), option name ("name") or value
    ("value") replaced by ``piece``; ``where`` picks which."""
    sections = [list(s) for s in render_user(base, RenderSettings()).sections()]
    section = sections[where % 3]
    options = [list(o) for o in section[2]]
    if part == "id":
        section[0] = piece
    else:
        options[where // 3 % len(options)][0 if part == "name" else 1] = piece
    section[2] = tuple((k, v) for k, v in options)
    (e, _, eo), (a, _, ao), (r, _, ro) = sections
    return UserObjects("u", e, eo, a, ao, r, ro)  # type: ignore[arg-type]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    **ONE_PIECE,
    header=st.sampled_from([HEADER, "; \\ ; =>  \n", "; é ☎\x85 \n"]),
)
def test_the_checks_of_a_first_full_apply_judge_the_users_as_they_would_alone(
    base: User, where: int, part: str, piece: str, header: str
) -> None:
    """The canonical checks run in place on a first full apply's one text (a header, odd
    characters and all, then the users) and its one encoding accept exactly the users
    they accept with no header."""
    users = [*rendered(users=[REPRESENTATIVE[0]]), _with_one_piece(base, where, part, piece)]
    texts = [canonical_module._chunk_text(user) for user in users]
    alone = canonical_module._plain_join(users, texts)
    text = header + "".join(texts)
    data = text.encode("utf-8") if text.isascii() else None  # only ASCII bytes are read
    after = canonical_module._plain_join(users, texts, text, len(header), data)
    event("fast path" if alone is not None else "left to the parser")
    assert (after is None) == (alone is None)


#: Text a mutation of a file puts in: plain characters (the file may stay canonical),
#: and every mark, blank, control and odd byte the parser treats specially.
SNIPPETS = st.sampled_from(
    [
        *"ax1=-.\n",
        *";[]#\\\r\t \x00>+()!é\x85\ufeff",
        "\r\n",
        ";--",
        "--;",
        "\n;x\n",
        "\n[1001]\n",
        "\n[1001](!)\n",
        "\n[1001](+)\n",
        "\n[x](1001)\n",
        "\ntype=aor\n",
        "\n#include x.conf\n",
        "\na+=b\n",
        "\na=>b\n",
        "\n\n",
        "x" * 8200,
    ]
)
#: One change of a file's text: (where, how many characters removed, text put in).
MUTATION = st.tuples(st.integers(0, 10**6), st.integers(0, 40), SNIPPETS)
#: A value, name or id put in a real user: often plain, so that files stay canonical.
READ_PIECE = st.one_of(st.sampled_from(["x", "1001", "a.b", "a=b", ""]), near_plain, hostile_text)


def _mutated(text: str, mutations: list[tuple[int, int, str]]) -> str:
    """``text`` with each (where, removed, put) applied in turn (``where`` taken modulo
    the text's length plus one)."""
    for where, removed, put in mutations:
        at = where % (len(text) + 1)
        text = text[:at] + put + text[at + removed :]
    return text


def _assert_read_as_parsed(data: bytes, known: list[UserObjects]) -> None:
    """:func:`read_canonical` of ``data``, alone or given the canonical chunks of ``known``,
    declines, or gives exactly what the parser reads (sections, types, options, order; no
    template, directive or notice)."""
    chunks = {chunk: user for user in known if (chunk := canonical_chunk(user)) is not None}
    reads = [canonical_module.read_canonical(data), canonical_module.read_canonical(data, chunks)]
    try:
        parsed = parse(data)
    except AsteriskSyntaxError:
        assert reads == [None, None]
        event("parser refuses")
        return
    for fast, how in zip(reads, ("alone", "given chunks"), strict=True):
        if fast is None:
            event(f"declined {how}")
            continue
        event(f"read without the parser {how}")
        assert not parsed.directives
        assert not parsed.notices
        assert [(s.name, s.template, s.inherits, s.options) for s in parsed.sections] == [
            (name, False, (), (("type", kind), *options))
            for name, kind, options in intended(fast.users)
        ]
        assert Current.verified(data, fast.users) == Current.of_parsed(data, parsed)
        assert fast.chunks == [canonical_chunk(user) for user in fast.users]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    base=ONE_PIECE["base"],
    where=ONE_PIECE["where"],
    part=ONE_PIECE["part"],
    piece=READ_PIECE,
    header=st.sampled_from([HEADER, "", "; \\ ; =>  \n", "; é ☎\x85 \n", "\ufeff; x\n", ";--\n"]),
    mutations=st.one_of(st.just([]), st.lists(MUTATION, max_size=3)),
    odd_byte=st.sampled_from([b"", b"", b"", b"", b"", b"\xff", b"\xed\xa0\x80"]),
)
@example(
    base=REPRESENTATIVE[0],
    where=0,
    part="id",
    piece="1001",
    header=HEADER,
    mutations=[],
    odd_byte=b"",
)
def test_a_file_read_without_the_parser_holds_what_the_parser_reads(
    base: User,
    where: int,
    part: str,
    piece: str,
    header: str,
    mutations: list[tuple[int, int, str]],
    odd_byte: bytes,
) -> None:
    """A rendered file, mutated or not, is either declined by the canonical reader or read
    by it exactly as the general parser reads it."""
    users = [*rendered(users=REPRESENTATIVE[:2]), _with_one_piece(base, where, part, piece)]
    text = header + "".join(canonical_module._chunk_text(user) for user in users)
    data = _mutated(text, mutations).encode("utf-8", "surrogatepass")
    if odd_byte:
        at = where % (len(data) + 1)
        data = data[:at] + odd_byte + data[at:]
    _assert_read_as_parsed(data, users)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("context=from-sip\n", "context=from-sip ; by hand\n", 1),
        lambda t: t.replace("\n", "\r\n"),
        lambda t: t + "\n#include extra.conf\n",
        lambda t: t.replace("[1001]\ntype=endpoint", "[1001](!)\ntype=endpoint", 1),
        lambda t: t.replace("context=from-sip\n", "context = from-sip\n", 1),
        lambda t: t + "\n[1001](+)\nallow=g722\n",
        lambda t: t[: t.rindex("\n[")] + "\n",  # the last user's AOR removed
        lambda t: t + "\n",
        lambda t: ";--\n" + t,
    ],
)
def test_a_hand_edited_file_is_left_to_the_parser(
    edit: Callable[[str], str], tmp_path: Path
) -> None:
    """A rendered file edited by hand (a comment, CRLF, an include, a template, blanks, an
    addition, a section removed, a trailing line) is declined by the canonical reader, and
    its current objects are what the parser reads."""
    text = SHIPPED.render_text(rendered())
    data = edit(text).encode("utf-8")
    assert canonical_module.read_canonical(data) is None
    parsed = parse(data)
    current = Current.of_main(tmp_path / "u.conf", data, None)
    assert current == Current.of_parsed(data, parsed)


def test_a_file_of_canonical_users_is_read_without_the_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file holding a header and the canonical users (as written, or with one value
    changed by hand to another plain one) is read without the general parser, and
    holds what the parser reads."""
    objects = rendered() + rendered("md5")[:1]
    text = SHIPPED.render_text(objects)
    edited_text = text.replace("context=from-sip\n", "context=by-hand\n", 1)
    assert edited_text != text
    expected = [Current.of_parsed(d, parse(d)) for d in (text.encode(), edited_text.encode())]

    def no_parse(data: bytes | str) -> None:
        raise AssertionError("parsed in full")

    monkeypatch.setattr(holdings_module, "parse", no_parse)
    for data, want in zip((text.encode(), edited_text.encode()), expected, strict=True):
        current = Current.of_main(tmp_path / "u.conf", data, None)
        assert current == want
        # 1001 twice (userpass, then md5): the second's objects, the first's place.
        assert current.endpoints == tuple(dict.fromkeys(u.endpoint_id for u in objects))
        assert current.objects[("auth", "1001-auth")] == objects[-1].auth


def test_a_new_target_counts_a_change_against_a_file_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new target applying users with one changed, and one skipped user kept, to a file
    another process wrote counts the change from the file without the general parser,
    splitting the lines of those two users' sections only."""
    objects = rendered()
    ConfigFileTarget(tmp_path / "u.conf").apply(objects)
    changed = replace(objects[1], endpoint=(*objects[1].endpoint[:-1], ("webrtc", "yes")))
    parsed: list[int] = []

    def counting_parse(data: bytes | str) -> object:
        parsed.append(len(data))
        return parse(data)

    split: list[int] = []
    real_users = canonical_module._users

    def counting_users(pieces: list[str]) -> list[UserObjects] | None:
        split.append(len(pieces))
        return real_users(pieces)

    monkeypatch.setattr(holdings_module, "parse", counting_parse)
    monkeypatch.setattr(canonical_module, "_users", counting_users)
    fresh = ConfigFileTarget(tmp_path / "u.conf")
    kept = objects[2].endpoint_id
    wanted = [objects[0], changed, *objects[3:]]
    change = fresh.apply(wanted, keep=[kept])
    assert change.updated == (changed.endpoint_id,)
    assert not change.added
    assert not change.removed
    assert change.unchanged == len(objects) - 1
    assert parsed == []
    assert split == [6]  # the changed user's and the kept one's three sections
    assert Current.of_main(fresh.path, fresh.path.read_bytes(), None) == Current.verified(
        fresh.path.read_bytes(), [objects[0], changed, *objects[2:]]
    )


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    """A temp file left by a killed writer is removed when a target starts; a fresh one is kept."""
    import os

    from provisioner.targets.configfile import ConfigFileTarget
    from provisioner.targets.files import STALE_TEMP_SECONDS

    target_path = tmp_path / "pjsip_users.conf"
    stale = tmp_path / ".pjsip_users.conf.abc123.tmp"
    fresh = tmp_path / ".pjsip_users.conf.def456.tmp"
    stale.write_text("half")
    fresh.write_text("live")
    old = stale.stat().st_mtime - STALE_TEMP_SECONDS - 10
    os.utime(stale, (old, old))
    ConfigFileTarget(target_path)
    assert not stale.exists()
    assert fresh.exists()


def test_stale_temporaries_are_found_by_the_file_name_taken_literally(tmp_path: Path) -> None:
    """A file name holding glob characters finds its own stale temporaries and never
    another file's (``users[1].conf`` is not a pattern matching ``users1.conf``)."""
    from provisioner.targets.configfile import ConfigFileTarget
    from provisioner.targets.files import STALE_TEMP_SECONDS

    own = tmp_path / ".users[1].conf.abc123.tmp"
    others = tmp_path / ".users1.conf.abc123.tmp"
    for temporary in (own, others):
        temporary.write_text("half")
        old = temporary.stat().st_mtime - STALE_TEMP_SECONDS - 10
        os.utime(temporary, (old, old))
    ConfigFileTarget(tmp_path / "users[1].conf")
    assert not own.exists()
    assert others.exists()


def test_a_stale_temporary_that_cannot_be_removed_is_left_and_the_target_works(
    tmp_path: Path,
) -> None:
    """A stale temporary that cannot be deleted (here a directory under its name: unlink
    fails even for root) is left in place, and the target is built and writes as usual."""
    from provisioner.targets.configfile import ConfigFileTarget
    from provisioner.targets.files import STALE_TEMP_SECONDS

    stuck = tmp_path / ".pjsip_users.conf.abc123.tmp"
    stuck.mkdir()
    old = stuck.stat().st_mtime - STALE_TEMP_SECONDS - 10
    os.utime(stuck, (old, old))
    target = ConfigFileTarget(tmp_path / "pjsip_users.conf")
    assert target.apply(rendered()).wrote
    assert stuck.is_dir()


def test_a_large_former_backup_is_freed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DISCARD_LATER_BYTES the backup before last is renamed aside and unlinked by
    another thread once the new file is in place; the file and its backup are as always."""
    monkeypatch.setattr(files_module, "DISCARD_LATER_BYTES", 1)
    unlinked: list[tuple[str, str]] = []
    real_unlink = os.unlink

    def recording_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        unlinked.append((os.path.basename(path), threading.current_thread().name))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    target = ConfigFileTarget(tmp_path / "out.conf")
    versions = [rendered()[:n] for n in (3, 4, 5)]
    for objects in versions:
        target.apply(objects)
    deadline = time.monotonic() + 10
    while any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline, sorted(tmp_path.iterdir())
        time.sleep(0.01)
    assert target.path.read_bytes() == _full_file(tmp_path / "a", versions[2], "a.conf")
    backup = tmp_path / "out.conf.bak"
    assert backup.read_bytes() == _full_file(tmp_path / "b", versions[1], "b.conf")
    in_background = [name for name, thread in unlinked if thread.startswith("discard")]
    assert len(in_background) == 1
    assert in_background[0].startswith(".out.conf.bak.")


# --- apply_partial: the applier's one-edit path ------------------------------------------

#: Edits as (users to put, endpoint ids to remove), from the representative users.
_EXTRA = make_user("1010", "frank", "Frank Fox", nat="no")
_CHANGED = make_user("1002", "bob.b", "Bob Brown", transport="udp", context="sales")


def _full_file(tmp_path: Path, objects: list[UserObjects], name: str) -> bytes:
    """What a fresh target's apply writes for ``objects``."""
    fresh = ConfigFileTarget(tmp_path / name)
    fresh.apply(objects)
    return fresh.path.read_bytes()


@pytest.mark.parametrize(
    ("put", "remove", "added", "updated", "removed"),
    [
        ([_CHANGED], [], (), ("1002",), ()),
        ([_EXTRA], [], ("1010",), (), ()),
        ([], ["1003"], (), (), ("1003",)),
        ([_EXTRA, _CHANGED], ["1001", "1005"], ("1010",), ("1002",), ("1001", "1005")),
        ([_CHANGED], ["1002"], (), ("1002",), ()),  # an id in both is upserted
        ([], ["9999"], (), (), ()),
    ],
)
@pytest.mark.parametrize("ascii_only", [False, True])  # True: the one-edit splice
def test_apply_partial_writes_what_a_full_apply_writes(
    tmp_path: Path,
    ascii_only: bool,
    put: list[User],
    remove: list[str],
    added: tuple[str, ...],
    updated: tuple[str, ...],
    removed: tuple[str, ...],
) -> None:
    """A partial edit leaves exactly the bytes a full apply of the edited list writes, and
    names only the edited users."""
    base = rendered(users=REPRESENTATIVE[:5] if ascii_only else REPRESENTATIVE)
    target = ConfigFileTarget(tmp_path / "out.conf")
    target.apply(base)
    upserts = rendered(users=put) if put else []
    change = target.apply_partial(upserts, remove)
    edited = {u.endpoint_id: u for u in base if u.endpoint_id not in remove}
    edited.update({u.endpoint_id: u for u in upserts})
    expected = sorted(edited.values(), key=lambda u: (len(u.endpoint_id), u.endpoint_id))
    assert target.path.read_bytes() == _full_file(tmp_path, expected, "full.conf")
    assert (change.added, change.updated, change.removed) == (added, updated, removed)
    assert change.wrote == bool(added or updated or removed)
    check_rendered(target.path.read_bytes(), expected)
    # The next full apply of the same list finds nothing to do.
    assert target.apply(expected).empty


def test_a_full_apply_leaves_the_order_the_first_edit_needs_already_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a full apply (a first one, staged or not, and a later one), the first edit
    sorts nothing to find where its user goes: that was done with the full apply."""
    target = ConfigFileTarget(tmp_path / "out.conf")
    base = rendered()
    for _ in range(2):
        assert target.apply(base[1:]).wrote
        monkeypatch.setattr(configfile_module, "sorted", _no_sorting, raising=False)
        assert target.apply_partial(rendered(users=[REPRESENTATIVE[0]]), ()).wrote
        monkeypatch.delattr(configfile_module, "sorted")
        assert target.path.read_bytes() == _full_file(tmp_path, base, "full.conf")


def _no_sorting(*args: object, **kwargs: object) -> None:
    raise AssertionError("sorted during an edit")


def test_successive_edits_splice_into_the_file_a_full_apply_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One edit after another (each spliced into the last bytes, their pieces joined now
    and then) leaves the bytes a full apply writes, and a full apply then writes nothing."""
    monkeypatch.setattr(pieces, "MAX_PARTS", 5)
    base = rendered(users=REPRESENTATIVE[:5])
    target = ConfigFileTarget(tmp_path / "out.conf")
    target.apply(base)
    current = {u.endpoint_id: u for u in base}
    for i in range(12):
        user = base[i % len(base)]
        edit = replace(user, endpoint=(*user.endpoint[:-1], ("context", f"ctx{i}")))
        assert target.apply_partial([edit], []).wrote
        current[edit.endpoint_id] = edit
        expected = sorted(current.values(), key=lambda u: (len(u.endpoint_id), u.endpoint_id))
        assert target.path.read_bytes() == _full_file(tmp_path, expected, f"full{i}.conf")
    assert not target.apply(expected).wrote


#: An edit of the one-edit path: put user ``index`` (of the representative ones but the
#: last) with context ``ctx<n>``, or remove it (``n`` None).
_EDITS = st.lists(
    st.tuples(st.integers(0, len(REPRESENTATIVE) - 2), st.none() | st.integers(0, 9)),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=_EDITS, max_parts=st.integers(3, 12), ascii_only=st.booleans())
def test_any_run_of_edits_leaves_what_a_full_apply_writes(
    tmp_path: Path, edits: list[tuple[int, int | None]], max_parts: int, ascii_only: bool
) -> None:
    """Whatever run of puts and removals the one-edit path takes (its bytes spliced as
    pieces, joined now and then, in an all-ASCII file; joined anew in one with the last
    user's non-ASCII name), the file is after each exactly what a full apply of the same
    users writes, and it parses to them."""
    saved = pieces.MAX_PARTS
    pieces.MAX_PARTS = max_parts
    try:
        base = rendered(users=REPRESENTATIVE[:-1] if ascii_only else REPRESENTATIVE)
        directory = Path(tempfile.mkdtemp(dir=tmp_path))
        target = ConfigFileTarget(directory / "out.conf")
        target.apply(base)
        current = {u.endpoint_id: u for u in base}
        for step, (index, context) in enumerate(edits):
            user = base[index]
            if context is None:
                target.apply_partial([], [user.endpoint_id])
                current.pop(user.endpoint_id, None)
            else:
                options = (*user.endpoint[:-1], ("context", f"ctx{context}"))
                edited = replace(user, endpoint=options)
                target.apply_partial([edited], [])
                current[edited.endpoint_id] = edited
            expected = sorted(current.values(), key=lambda u: (len(u.endpoint_id), u.endpoint_id))
            data = target.path.read_bytes()
            assert data == _full_file(directory, expected, f"full{step}.conf")
            check_rendered(data, expected)
    finally:
        pieces.MAX_PARTS = saved


def test_apply_partial_of_unchanged_users_writes_nothing(target: ConfigFileTarget) -> None:
    """Putting users as they are changes no byte and does not touch the file."""
    target.apply(rendered())
    mtime = target.path.stat().st_mtime_ns
    change = target.apply_partial(rendered()[:2], [])
    assert change.empty
    assert not change.wrote
    assert change.unchanged == len(REPRESENTATIVE)
    assert target.path.stat().st_mtime_ns == mtime


def test_apply_partial_before_any_apply_keeps_the_file_users(tmp_path: Path) -> None:
    """A new target object edits the users the current file holds."""
    ConfigFileTarget(tmp_path / "out.conf").apply(rendered())
    target = ConfigFileTarget(tmp_path / "out.conf")
    change = target.apply_partial(rendered(users=[_EXTRA]), ["1001"])
    assert (change.added, change.removed) == (("1010",), ("1001",))
    expected = sorted(
        [*rendered()[1:], *rendered(users=[_EXTRA])],
        key=lambda u: (len(u.endpoint_id), u.endpoint_id),
    )
    check_rendered(target.path.read_bytes(), expected)


@pytest.mark.parametrize("shards", [0, 4])
def test_apply_partial_with_an_odd_user_is_parsed_in_full(tmp_path: Path, shards: int) -> None:
    """A user with no canonical chunk goes through the full check; a hostile one is refused
    and every file left as it was (one file, or shard files and their main file)."""
    target = make_target(tmp_path / "asterisk" / "pjsip_users.conf", shards)
    target.apply(rendered())
    before = written(tmp_path)
    # "= " inside a value is left to the parser by the fast path, which reads it exactly.
    odd = replace(rendered()[0], endpoint=(("context", "a = b"),))
    assert canonical_chunk(odd) is None
    hostile = replace(rendered()[0], endpoint=(("context", "x\n[evil]\ntype=aor"),))
    with pytest.raises(RenderCheckFailed):
        target.apply_partial([hostile], [])
    assert written(tmp_path) == before
    change = target.apply_partial([odd], [])
    assert change.updated == ("1001",)
    check_written(target, [odd, *rendered()[1:]])


def test_apply_partial_under_an_override_renders_through_the_templates(tmp_path: Path) -> None:
    """With an overridden layout the edited list is rendered by the templates."""
    overrides = write_override(
        tmp_path / "t",
        "section.j2",
        "{% macro section(id, type, options) %}\n[{{ id }}]\ntype => {{ type }}\n"
        "{% for key, value in options -%}\n{{ key }} => {{ value }}\n{% endfor -%}\n"
        "{% endmacro %}",
    )
    target = ConfigFileTarget(tmp_path / "out.conf", overrides)
    target.apply(rendered())
    change = target.apply_partial(rendered(users=[_CHANGED]), [])
    assert change.updated == ("1002",)
    text = target.path.read_text(encoding="utf-8")
    assert "context => sales" in text
    assert "type => endpoint" in text


def test_apply_partial_of_a_file_not_in_render_order_goes_through_apply(
    target: ConfigFileTarget,
) -> None:
    """Users applied out of render_all's order cannot be found by bisection: the edited list
    is applied whole, and the file holds exactly the edited users."""
    target.apply(rendered()[::-1])
    change = target.apply_partial(rendered(users=[_CHANGED, _EXTRA]), ["1001"])
    assert (change.added, change.updated, change.removed) == (("1010",), ("1002",), ("1001",))
    sections = parse(target.path.read_bytes()).sections
    want = {
        (s[0], s[1]): s[2]
        for u in rendered(users=[*REPRESENTATIVE[1:], _EXTRA])
        for s in u.sections()
    }
    want.update({(s[0], s[1]): s[2] for s in rendered(users=[_CHANGED])[0].sections()})
    assert {(s.name, s.options[0][1]): s.options[1:] for s in sections} == want


def test_apply_partial_before_any_apply_refuses_a_broken_file(tmp_path: Path) -> None:
    """With no apply yet, a current file that does not load is not taken as empty: the
    edit is refused and the file left as it is."""
    path = tmp_path / "out.conf"
    path.write_bytes(b"[1001]\ntype=endpoint\n[broken\n")
    target = ConfigFileTarget(path)
    with pytest.raises(RenderCheckFailed, match="apply every user"):
        target.apply_partial(rendered(users=[_EXTRA]), [])
    assert path.read_bytes() == b"[1001]\ntype=endpoint\n[broken\n"


@pytest.mark.parametrize("shards", [0, 4])
def test_the_applier_one_edit_path_writes_what_a_full_apply_writes(
    tmp_path: Path, shards: int
) -> None:
    """Through Applier.users_changed (apply_partial), edits, additions, extension changes,
    disables and deletes leave the bytes a fresh full apply writes, in one file or in
    every shard file."""
    from provisioner.accounts import Accounts, Policy
    from provisioner.applier import Applier

    from .faultkit import cheap_hasher, seed_store, store_url

    cheap_hasher()
    engine = seed_store(store_url(tmp_path), 12)
    try:
        accounts = Accounts(engine, Policy(password_policy=False))
        edited = make_target(tmp_path / "a" / "pjsip_users.conf", shards)
        applier = Applier(engine, edited, RenderSettings())
        applier.full()

        def ids(*names: str) -> list[int]:
            return [accounts.get_user(n).id for n in names]

        def files(target: ConfigFileTarget | ShardedConfigFileTarget) -> list[bytes]:
            paths = target.files if isinstance(target, ShardedConfigFileTarget) else [target.path]
            return [path.read_bytes() for path in paths]

        def same_as_full() -> None:
            full = make_target(tmp_path / "b" / "pjsip_users.conf", shards)
            Applier(engine, full, RenderSettings()).full()
            assert files(edited) == files(full)

        accounts.edit_user("u1", {"nat": "yes", "context": "sales"})
        assert applier.users_changed(ids("u1")).change.updated
        same_as_full()
        accounts.add_user(
            {
                "username": "new",
                "full_name": "New One",
                "email": "n@example.com",
                "profile": "agents",
            }
        )
        assert applier.users_changed(ids("new")).change.added
        same_as_full()
        accounts.edit_user("u2", {"extension": "99"})
        change = applier.users_changed(ids("u2")).change
        assert change.added == ("99",)
        assert len(change.removed) == 1
        same_as_full()
        gone = ids("u3", "u4")
        accounts.disable(["u3"])
        accounts.delete(["u4"])
        assert len(applier.users_changed(gone).change.removed) == 2
        same_as_full()
    finally:
        engine.dispose()


def _applier_store(tmp_path: Path, count: int) -> tuple[Any, Any, Any, ConfigFileTarget]:
    """A seeded store, its Accounts, and an Applier over a config file fully applied once."""
    from provisioner.accounts import Accounts, Policy
    from provisioner.applier import Applier

    from .faultkit import cheap_hasher, seed_store, store_url

    cheap_hasher()
    engine = seed_store(store_url(tmp_path), count)
    target = ConfigFileTarget(tmp_path / "a" / "pjsip_users.conf")
    applier = Applier(engine, target, RenderSettings())
    applier.full()
    return engine, Accounts(engine, Policy(password_policy=False)), applier, target


def _sql(engine: Any, statement: str, **params: str) -> None:
    """Another application writing the store directly (values the rules would refuse)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text(statement), params)


def _same_as_a_fresh_full_apply(engine: Any, target: ConfigFileTarget, tmp_path: Path) -> None:
    from provisioner.applier import Applier

    fresh = ConfigFileTarget(tmp_path / "fresh" / "pjsip_users.conf")
    Applier(engine, fresh, RenderSettings()).full()
    assert target.path.read_bytes() == fresh.path.read_bytes()


def test_a_name_another_writer_left_not_utf8_skips_only_that_user(tmp_path: Path) -> None:
    """A full name SQLite holds as bytes that are not UTF-8 (a Latin-1 writer's) skips that
    user, naming the field and the rule, in an edit's apply and a full apply alike: its last
    good objects stay and the others are applied."""
    engine, accounts, applier, target = _applier_store(tmp_path, 3)
    try:
        u0, u1 = accounts.get_user("u0"), accounts.get_user("u1")
        _sql(
            engine,
            "UPDATE users SET full_name = CAST(X'4167E96E74' AS TEXT) WHERE id = :id",
            id=str(u0.id),
        )
        accounts.edit_user("u1", {"full_name": "Renamed"})
        rule = (
            "must be text: it holds a byte that is not valid in its character set "
            "(the terminal's, or UTF-8 in the store)"
        )
        for applied in (applier.users_changed([u0.id, u1.id]), applier.full()):
            assert [str(s) for s in applied.skipped] == [f"u0: full_name: {rule}"]
            text = target.path.read_text()
            assert f'"Agent 0" <{u0.extension}>' in text
            assert f'"Renamed" <{u1.extension}>' in text
    finally:
        engine.dispose()


def test_the_one_edit_path_removes_a_user_kept_at_the_last_full_apply(tmp_path: Path) -> None:
    """A user kept by a full apply (it could not be rendered) loses its old endpoint on its
    next edit when it is disabled, or fixed and moved to another extension."""
    engine, accounts, applier, target = _applier_store(tmp_path, 4)
    try:
        u1, u2 = accounts.get_user("u1"), accounts.get_user("u2")
        _sql(engine, "UPDATE users SET full_name = 'Bad;Name' WHERE username IN ('u1', 'u2')")
        assert len(applier.full().skipped) == 2
        assert f"[{u1.extension}]" in target.path.read_text()
        assert f"[{u2.extension}]" in target.path.read_text()

        accounts.disable(["u1"])
        assert applier.users_changed([u1.id]).change.removed == (u1.extension,)
        assert f"[{u1.extension}]" not in target.path.read_text()
        assert f"[{u2.extension}]" in target.path.read_text()  # still kept

        accounts.edit_user("u2", {"full_name": "Fixed", "extension": "1050"})
        change = applier.users_changed([u2.id]).change
        assert (change.added, change.removed) == (("1050",), (u2.extension,))
        _same_as_a_fresh_full_apply(engine, target, tmp_path)
    finally:
        engine.dispose()


def test_the_one_edit_path_never_removes_an_endpoint_another_user_holds(tmp_path: Path) -> None:
    """A user that cannot be rendered keeps its last objects until another user validly
    holds their extension (as a full apply does), and no edit removes an endpoint id another
    user holds."""
    from provisioner.applier import Applier

    engine, accounts, applier, target = _applier_store(tmp_path, 4)
    try:
        u0, u1, u2 = (accounts.get_user(n) for n in ("u0", "u1", "u2"))
        # Moved and broken in one statement: its last good endpoint stays, as in a full
        # apply (one by a process that knows only the file).
        _sql(
            engine,
            "UPDATE users SET extension = '1905', full_name = 'Bad;Name' WHERE username = 'u1'",
        )
        applied = applier.users_changed([u1.id])
        assert [s.username for s in applied.skipped] == ["u1"]
        assert applied.change.removed == ()
        assert f"[{u1.extension}]" in target.path.read_text()
        fresh = Applier(engine, ConfigFileTarget(target.path), RenderSettings())
        assert fresh.full().change.empty
        # The extension, free in the store, goes to u2 (who wins over u1's last good
        # endpoint); u1, fixed, then must not take it away again.
        accounts.edit_user("u2", {"extension": u1.extension})
        applier.users_changed([u2.id])
        accounts.edit_user("u1", {"full_name": "Good Name"})
        change = applier.users_changed([u1.id]).change
        assert (change.added, change.removed) == (("1905",), ())
        _same_as_a_fresh_full_apply(engine, target, tmp_path)
        # Extensions moved in the store, the new holder re-rendered first: the old holder's
        # edit leaves the endpoint id alone, since it is the new holder's now.
        _sql(engine, "UPDATE users SET extension = '1906' WHERE username = 'u0'")
        _sql(engine, "UPDATE users SET extension = :e WHERE username = 'u3'", e=u0.extension)
        u3 = accounts.get_user("u3")
        applier.users_changed([u3.id])
        assert applier.users_changed([u0.id]).change.removed == ()
        assert f"[{u0.extension}]" in target.path.read_text()
        _same_as_a_fresh_full_apply(engine, target, tmp_path)
    finally:
        engine.dispose()
