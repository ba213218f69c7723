"""The admin CLI, run in-process: outcomes re-read from the store, clear errors, no leaks."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from provisioner import cli as cli_module
from provisioner import credentials
from provisioner.accounts import Accounts, Policy
from provisioner.store.engine import open_engine
from provisioner.store.migrate import head_revision
from provisioner.store.registrations import (
    EndpointRows,
    replace_server_snapshot,
    set_problems,
    status_rows,
    write_endpoint_rows,
)

from .conftest import FakeClock
from .dbs import temp_database
from .faultkit import PROVISIONER, env
from .helpers import (
    GOOD_PASSWORD,
    OTHER_PASSWORD,
    Cli,
    Result,
    cheap_argon2,
    make_cli,
    secret_after,
    user_row,
)

CONFIG = """
[security]
password_policy = true
max_failed_logins = 3
lock_minutes = 15

[extensions]
first = 100
last = 199
"""


@pytest.fixture(autouse=True)
def _fast_hashes_and_clock(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    cheap_argon2(monkeypatch)

    # The CLI builds its Accounts itself; give it the test's clock.
    def accounts(engine: Engine, policy: Policy, *, actor: str | None = None) -> Accounts:
        return Accounts(engine, policy, clock, actor=actor)

    monkeypatch.setattr(cli_module, "Accounts", accounts)


def _seed(cli: Cli) -> None:
    cli.ok("db", "upgrade")
    cli.ok("profile", "add", "agents", "--description", "Contact-center agents")
    cli.ok(
        "user", "add", "root", "--role", "admin", "--full-name", "Root", "--email", "r@example.com"
    )


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The CLI on a fresh SQLite store holding the first admin and profile ``agents``."""
    with temp_database("sqlite", tmp_path) as url:
        c = make_cli(url, tmp_path, CONFIG)
        _seed(c)
        yield c


@pytest.fixture
def store(cli: Cli) -> Iterator[Engine]:
    engine = open_engine(cli.url)
    yield engine
    engine.dispose()


def _add(cli: Cli, name: str, *extra: str) -> str:
    out = cli.ok(
        "user", "add", name, "--full-name", f"{name.title()} A", "--email", f"{name}@example.com",
        "--profile", "agents", *extra,
    )  # fmt: skip
    return out


def test_workflow_on_every_backend(backend: str, tmp_path: Path) -> None:
    """The main admin commands work end to end on SQLite, PostgreSQL and MariaDB."""
    with temp_database(backend, tmp_path) as url:
        cli = make_cli(url, tmp_path, CONFIG)
        assert "store at revision" in cli.ok("db", "upgrade")
        _seed(cli)
        out = _add(
            cli, "alice", "--codecs", "opus,ulaw", "--attr", "team=blue", "--call-group", "1,3-5"
        )
        assert "added alice (id 2, extension 101)" in out
        secret = secret_after(out)
        engine = open_engine(url)
        try:
            row = user_row(engine, "alice")
            assert row.sip_md5 == hashlib.md5(f"alice:asterisk:{secret}".encode()).hexdigest()
            assert (row.codecs, row.call_group) == ("opus,ulaw", "1,3-5")

            cli.ok("user", "edit", "alice", "--nat", "comedia", "--attr", "team=", "--attr", "x=1")
            shown = json.loads(cli.ok("user", "show", "alice", "--json"))
            assert shown["voice"]["nat"] == "comedia"
            assert shown["attributes"] == {"x": "1"}
            assert shown["state"] == "active"

            cli.ok("user", "disable", "alice")
            listed = json.loads(cli.ok("user", "list", "--state", "disabled", "--json"))
            assert [u["username"] for u in listed] == ["alice"]
            cli.ok("user", "enable", "alice")
            cli.ok("user", "delete", "alice")
            assert user_row(engine, "alice").deleted_at is not None
            deleted = json.loads(cli.ok("user", "list", "--deleted", "--json"))
            assert [u["username"] for u in deleted] == ["alice"]
            cli.ok("user", "restore", "alice")
            assert user_row(engine, "alice").deleted_at is None

            csv_file = tmp_path / "users.csv"
            cli.ok("user", "export", "--csv", str(csv_file))
            assert "added 0, updated 0, unchanged 2" in cli.ok(
                "user", "import", "--csv", str(csv_file)
            )

            cli.ok("user", "delete", "alice")
            assert "purge: alice" in cli.ok("user", "purge", "alice")
            assert cli("user", "show", "alice").code == 3
        finally:
            engine.dispose()


def test_a_sqlite_store_whose_directory_cannot_be_made_exits_7_naming_it(tmp_path: Path) -> None:
    """A SQLite store URL whose directory cannot be made (a file is in its way) exits 7
    saying so, instead of ending in a traceback."""
    (tmp_path / "file").write_text("")
    store = tmp_path / "file" / "var" / "store.db"
    result = make_cli(f"sqlite:///{store}", tmp_path)("db", "upgrade")
    assert result.code == 7
    assert result.err.splitlines() == [
        f"error: cannot make the directory {str(store.parent)!r} of the SQLite database:"
        " Not a directory"
    ]


def test_a_store_migrated_by_a_newer_version_is_said_so_not_a_traceback(tmp_path: Path) -> None:
    """A store at a revision this version has no migration for (a newer provisioner
    migrated it) makes 'db upgrade' exit 7 saying so and 'check' fail its store line."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cli = make_cli(url, tmp_path, f'[target]\npath = "{tmp_path}/p.conf"\n')
    assert cli("db", "upgrade").code == 0
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    upgraded = cli("db", "upgrade")
    assert upgraded.code == 7
    assert upgraded.err.splitlines() == [
        "error: the store's schema is at revision '9999', which this provisioner does not know"
        f" (its newest is '{head_revision()}'): a newer provisioner migrated it; run that version"
    ]
    checked = cli("check")
    assert checked.code == 1
    assert (
        f"FAIL  store: schema at 9999, newer than this provisioner's {head_revision()}:"
        " a newer provisioner migrated it; run that version"
    ) in checked.out.splitlines()


def test_export_refuses_a_named_deleted_user(cli: Cli, tmp_path: Path) -> None:
    """Exporting a deleted member by name exits 5 naming it (the file would not
    re-import); once restored it exports."""
    _add(cli, "alice")
    cli.ok("user", "delete", "alice")
    out = tmp_path / "alice.csv"
    refused = cli("user", "export", "--csv", str(out), "alice")
    assert refused.code == 5
    assert "alice is in deleted members; restore it first" in refused.err
    assert not out.exists()
    cli.ok("user", "restore", "alice")
    cli.ok("user", "export", "--csv", str(out), "alice")
    assert "alice" in out.read_text(encoding="utf-8")


def test_export_to_a_file_that_cannot_be_made_exits_2_naming_it(cli: Cli, tmp_path: Path) -> None:
    """An export to a file that cannot be made (its directory is missing) exits 2 naming
    --csv and the file, instead of ending in a traceback."""
    _add(cli, "alice")
    out = tmp_path / "missing" / "alice.csv"
    result = cli("user", "export", "--csv", str(out))
    assert result.code == 2
    assert result.err.splitlines() == [
        "error: invalid input",
        f"  --csv: cannot write {str(out)!r}: No such file or directory",
    ]


def test_export_names_every_missing_user_as_the_bulk_commands_do_and_writes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    """`user export` naming several users that do not exist exits 3 naming them all (each
    once, as first spelled), as `user disable` does, and makes no file, not even a
    partial one; to stdout it writes nothing."""
    _add(cli, "alice")
    out = tmp_path / "some.csv"
    named = ("ghost", "alice", "nobody", "GHOST")
    refused = cli("user", "export", "--csv", str(out), *named)
    bulk = cli("user", "disable", *named)
    assert (refused.code, bulk.code) == (3, 3)
    assert "user 'ghost, nobody' not found" in refused.err
    assert refused.err == bulk.err
    assert not out.exists()
    to_stdout = cli("user", "export", "--csv", "-", *named)
    assert (to_stdout.code, to_stdout.out, to_stdout.err) == (3, "", refused.err)


def test_export_names_each_user_once_so_it_reimports(cli: Cli, tmp_path: Path) -> None:
    """A user named twice (in any case) is exported once, so the file re-imports as is."""
    _add(cli, "alice")
    out = tmp_path / "alice.csv"
    assert "exported 1 users" in cli.ok("user", "export", "--csv", str(out), "alice", "ALICE")
    assert out.read_text(encoding="utf-8").count("alice@example.com") == 1
    assert "unchanged 1" in cli.ok("user", "import", "--csv", str(out))


def test_an_export_of_named_users_lists_them_by_id_so_it_imports_into_an_empty_store(
    cli: Cli, tmp_path: Path
) -> None:
    """`user export alice root` lists root (the first admin) first, as a full export does,
    so the file imports into an empty store, whose first user must be an admin."""
    _add(cli, "alice")
    out = tmp_path / "two.csv"
    cli.ok("user", "export", "--csv", str(out), "alice", "root")
    assert [line.split(",")[0] for line in out.read_text().splitlines()[1:]] == ["root", "alice"]
    (tmp_path / "empty").mkdir()
    with temp_database("sqlite", tmp_path / "empty") as url:
        other = make_cli(url, tmp_path / "empty", CONFIG)
        other.ok("db", "upgrade")
        other.ok("profile", "add", "agents")
        assert "added 2" in other.ok("user", "import", "--csv", str(out))


def test_add_reports_every_bad_field(cli: Cli) -> None:
    """A bad add exits 2 and lists each bad field with its rule on stderr; nothing is stored."""
    result = cli(
        "user", "add", "bad name", "--full-name", " x", "--email", "nope", "--profile", "ghosts",
        "--codecs", "mp3", "--context", "a b", "--call-group", "99", "--extension", "12a",
    )  # fmt: skip
    assert result.code == 2
    assert result.err.startswith("error: invalid input\n")
    for field, rule in [
        ("username", "only letters, digits, '.' and '_'"),
        ("full_name", "must not start or end with spaces"),
        ("email", "must be a valid email address"),
        ("codecs", "distinct codecs from ulaw, alaw, gsm, g722, g729, opus"),
        ("context", "an Asterisk context name"),
        ("call_group", "numbers 0-63"),
        ("extension", "must be 1-20 digits"),
        ("profile", "must name an existing profile"),
    ]:
        assert f"  {field}: " in result.err, field
        assert rule in result.err, field
    assert "Traceback" not in result.err
    assert json.loads(cli.ok("user", "list", "--json"))[0]["username"] == "root"
    assert len(json.loads(cli.ok("user", "list", "--json"))) == 1


def test_choice_options_and_missing_required_are_clear(cli: Cli) -> None:
    """An unknown transport or a missing --full-name is refused with a clear message and exit 2."""
    result = _run_add_bad(cli, "--transport", "sctp")
    assert result.code == 2
    assert "Invalid value for '--transport'" in result.err
    missing = cli("user", "add", "zed", "--email", "z@example.com", "--profile", "agents")
    assert missing.code == 2
    assert "full_name: is required" in missing.err


def _run_add_bad(cli: Cli, *extra: str) -> Result:
    return cli(
        "user", "add", "zed", "--full-name", "Zed", "--email", "z@example.com",
        "--profile", "agents", *extra,
    )  # fmt: skip


def test_error_exit_codes_name_the_problem(cli: Cli) -> None:
    """Not found, conflict and forbidden each exit non-zero with a message naming the rule."""
    _add(cli, "alice")
    cases = [
        (("user", "show", "ghost"), 3, "user 'ghost' not found"),
        (("user", "disable", "alice", "ghost"), 3, "user 'ghost' not found"),
        (("user", "add", "ALICE", "--full-name", "A", "--email", "a@example.com",
          "--profile", "agents"), 4, "username: is already taken"),
        (("user", "edit", "alice", "--extension", "100"), 4,
         "extension: 100 is already used by user root"),
        (("user", "disable", "root"), 5, "first admin and can never be disabled"),
        (("user", "delete", "root"), 5, "first admin and can never be deleted"),
        (("user", "purge", "alice"), 5, "only deleted users can be purged"),
        (("profile", "add", "agents"), 4, "profile 'agents' already exists"),
        (("user", "edit", "alice"), 2, "options: name at least one field to change"),
    ]  # fmt: skip
    for args, code, message in cases:
        result = cli(*args)
        assert (result.code, message in result.err) == (code, True), (args, result)
        assert "Traceback" not in result.err
    assert not json.loads(cli.ok("user", "show", "alice", "--json"))["disabled"]


@pytest.mark.parametrize("name", ["nobody", "gone"])
def test_passwd_refuses_a_user_it_cannot_set_before_it_reads_a_password(
    cli: Cli, name: str
) -> None:
    """`user passwd` of a name no user has, or of a deleted user, is refused as such (exit
    3 or 5, naming the user) before it reads a password: given none, it says so, not that
    the (unread) password breaks the rule."""
    _add(cli, "gone")
    cli.ok("user", "delete", "gone")
    refused = cli("user", "passwd", name, input="")
    assert "password" not in refused.err.replace(f"user {name!r}", ""), refused.err
    if name == "nobody":
        assert (refused.code, "user 'nobody' not found" in refused.err) == (3, True), refused
    else:
        assert (refused.code, "gone is in deleted members" in refused.err) == (5, True), refused


def test_passwords_from_stdin_policy_and_login_lockout(
    cli: Cli, store: Engine, clock: FakeClock
) -> None:
    """Passwords come from stdin; logins lock at the limit and unlock by time or by an admin."""
    cli.ok(
        "user", "add", "alice", "--full-name", "Alice", "--email", "a@example.com",
        "--profile", "agents", "--password", "-", input=GOOD_PASSWORD + "\n",
    )  # fmt: skip
    assert credentials.verify_password(user_row(store, "alice").password_hash, GOOD_PASSWORD)
    weak = cli("user", "passwd", "alice", input="weakpass\n")
    assert weak.code == 2
    assert "password: must be at least 8 characters with a lowercase letter" in weak.err

    assert "welcome, Alice" in cli.ok("auth", "login", "alice", input=GOOD_PASSWORD + "\n")
    for _ in range(3):
        result = cli("auth", "login", "alice", input="wrong\n")
        assert result.code == 6
    assert "account is locked after too many failed logins; contact an administrator" in result.err
    locked = json.loads(cli.ok("user", "list", "--state", "locked", "--json"))
    assert [u["username"] for u in locked] == ["alice"]
    still = cli("auth", "login", "alice", input=GOOD_PASSWORD + "\n")
    assert still.code == 6
    assert "contact an administrator" in still.err

    clock.advance(minutes=15)
    assert "welcome" in cli.ok("auth", "login", "alice", input=GOOD_PASSWORD + "\n")

    for _ in range(3):
        cli("auth", "login", "alice", input="wrong\n")
    assert user_row(store, "alice").locked_at is not None
    cli.ok("user", "unlock", "alice")
    assert user_row(store, "alice").locked_at is None
    cli.ok("user", "passwd", "alice", input=OTHER_PASSWORD + "\n")
    assert "welcome" in cli.ok("auth", "login", "alice", input=OTHER_PASSWORD + "\n")
    assert user_row(store, "alice").last_password_reset_at == clock.now


def test_a_password_on_stdin_that_is_not_utf8_is_judged_not_a_traceback(
    cli: Cli, store: Engine
) -> None:
    """A password typed at a Latin-1 terminal (``ö`` as the byte F6) is, on ``auth login``,
    a wrong password that counts toward the lock (exit 6), and on ``user passwd``, ``user
    add --password -`` and ``--sip-secret -`` refused naming the field and its rule (exit
    2), whatever the locale makes of stdin, instead of a traceback."""
    cli.ok(
        "user", "add", "alice", "--full-name", "Alice", "--email", "a@example.com",
        "--profile", "agents", "--password", "-", input=GOOD_PASSWORD + "\n",
    )  # fmt: skip
    latin1 = "Gr\u00f6n-Pass1\n".encode("latin-1")
    for _ in range(2):
        result = cli("auth", "login", "alice", input=latin1)
        assert (result.code, result.err) == (6, "error: invalid username or password\n")
    assert cli("auth", "login", "nobody", input=latin1).code == 6
    assert user_row(store, "alice").failed_logins == 2
    assert "welcome" in cli.ok("auth", "login", "alice", input=GOOD_PASSWORD + "\n")
    for args in (
        ("user", "passwd", "alice"),
        ("user", "edit", "alice", "--password", "-"),
        ("user", "sip-secret", "alice", "--rotate", "--secret", "-"),
    ):
        result = cli(*args, input=latin1)
        field = "sip_secret" if "sip-secret" in args else "password"
        rule = (
            "8-128 printable ASCII" if field == "sip_secret" else "not valid in its character set"
        )
        assert (result.code, f"  {field}: must" in result.err, rule in result.err) == (
            2,
            True,
            True,
        ), args
    assert credentials.verify_password(user_row(store, "alice").password_hash, GOOD_PASSWORD)


def test_list_filters_and_table(cli: Cli) -> None:
    """user list filters by role, profile and state and prints one row per user."""
    cli.ok("profile", "add", "supervisors")
    _add(cli, "alice")
    _add(cli, "bob")
    cli.ok("user", "add", "sue", "--full-name", "Sue", "--email", "s@example.com",
           "--profile", "supervisors")  # fmt: skip
    cli.ok("user", "disable", "bob")
    table = cli.ok("user", "list").splitlines()
    assert table[0].split()[:6] == ["ID", "USERNAME", "ROLE", "PROFILE", "EXTENSION", "STATE"]
    assert [line.split()[1] for line in table[1:]] == ["root", "alice", "bob", "sue"]
    assert "disabled" in table[3]

    def names(*args: str) -> list[str]:
        return [u["username"] for u in json.loads(cli.ok("user", "list", "--json", *args))]

    assert names("--role", "admin") == ["root"]
    assert names("--profile", "supervisors") == ["sue"]
    assert names("--state", "active") == ["root", "alice", "sue"]
    profiles = json.loads(cli.ok("profile", "list", "--json"))
    assert [p["name"] for p in profiles] == ["agents", "supervisors"]


def test_import_reports_bad_rows_and_applies_nothing(cli: Cli, tmp_path: Path) -> None:
    """A CSV with bad rows exits 2 naming line, field and rule, adding no one; so does --dry-run."""
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "username,full_name,email,profile\n"
        "dave,Dave,dave@example.com,agents\n"
        "eve,Eve,not-an-email,agents\n"
        "frank,,frank@example.com,ghosts\n",
        encoding="utf-8",
    )
    result = cli("user", "import", "--csv", str(bad))
    assert result.code == 2
    assert "line 3: email: must be a valid email address" in result.err
    assert "line 4: full_name: " in result.err
    assert "line 4: profile: must name an existing profile" in result.err
    assert [u["username"] for u in json.loads(cli.ok("user", "list", "--json"))] == ["root"]

    good = tmp_path / "good.csv"
    good.write_text("username,full_name,email,profile\ndave,Dave,dave@example.com,agents\n")
    out = cli.ok("user", "import", "--csv", str(good), "--dry-run")
    assert "would add 1" in out
    assert "shown once" not in out
    assert [u["username"] for u in json.loads(cli.ok("user", "list", "--json"))] == ["root"]
    out = cli.ok("user", "import", "--csv", str(good))
    assert "added 1" in out
    secret = secret_after(out)
    assert cli.ok("user", "show", "dave").count("extension") == 1
    assert secret not in cli.ok("user", "show", "dave")


def test_an_import_of_a_file_that_is_not_utf8_names_the_line(cli: Cli, tmp_path: Path) -> None:
    """A CSV saved by Excel as plain "CSV" (Windows-1252: ``ë`` is the byte EB) is refused
    naming --csv, the line holding the first byte that is not UTF-8, that byte and the
    fix, not a byte offset into the file; nothing is applied."""
    saved = tmp_path / "excel.csv"
    saved.write_bytes(
        "username,full_name,email,profile\n"
        "dave,Dave,dave@example.com,agents\n"
        "erin,Erin,erin@example.com,agents\n"
        "zoe,Zoë,zoe@example.com,agents\n".encode("cp1252")
    )
    result = cli("user", "import", "--csv", str(saved))
    assert (result.code, result.err) == (
        2,
        f"error: invalid input\n  line 4: --csv: cannot read {str(saved)!r}: not UTF-8 "
        '(byte 0xEB); save it as "CSV UTF-8"\n',
    )
    assert [u["username"] for u in json.loads(cli.ok("user", "list", "--json"))] == ["root"]


def test_avatar_checked_by_content(cli: Cli, tmp_path: Path, store: Engine) -> None:
    """--avatar stores a real image and refuses a text file named .png."""
    fake = tmp_path / "avatar.png"
    fake.write_bytes(b"I am not an image")
    result = _run_add_bad(cli, "--avatar", str(fake))
    assert result.code == 2
    assert "avatar: must be a PNG, JPG, GIF or SVG image (checked by content)" in result.err
    real = tmp_path / "photo.bin"
    real.write_bytes(b"GIF89a" + b"\x00" * 20)
    _add(cli, "alice", "--avatar", str(real))
    assert user_row(store, "alice").avatar_type == "image/gif"


def test_config_precedence_and_problems(cli: Cli, tmp_path: Path) -> None:
    """Flags beat the environment, which beats the file; a bad config lists every problem."""
    cli.env["PROVISIONER_EXTENSIONS__FIRST"] = "150"
    assert "extension 150" in _add(cli, "alice")
    assert "extension 170" in cli.ok(
        "--set", "extensions.first=170", "user", "add", "bob", "--full-name", "Bob",
        "--email", "b@example.com", "--profile", "agents",
    )  # fmt: skip
    cli.env.clear()

    cli.config.write_text("[security]\nmax_failed_logins = 0\nshoe_size = 9\n", encoding="utf-8")
    cli.env["PROVISIONER_SIP__REALM"] = "bad realm"
    result = cli("user", "list")
    assert result.code == 2
    assert result.err.startswith("error: invalid configuration\n")
    assert "security.max_failed_logins: Input should be greater than or equal to 1" in result.err
    assert "security.shoe_size: is not a known setting" in result.err
    assert "sip.realm: " in result.err


def test_malformed_set_flag_is_a_clear_error(cli: Cli) -> None:
    """A --set that is not section.key=value, or holds broken JSON, is reported, not a traceback."""
    for flag in ("nokey", "target.transports={broken", "=x"):
        result = cli("--set", flag, "user", "list")
        assert result.code == 2, (flag, result)
        assert "--set: " in result.err
        assert "Traceback" not in result.err
    empty = cli("--set", "store.busy_timeout=", "user", "list")  # empty: a string, not JSON
    assert empty.code == 2
    assert "store.busy_timeout: Input should be a valid number" in empty.err


def test_a_set_value_given_as_a_word_of_its_own_is_not_shown_as_a_command(cli: Cli) -> None:
    """``--set store.url URL`` (a space for the '='): the URL, taken for the command, is
    refused as no command without showing its password."""
    url = "postgresql+psycopg://app:hunter2@db/users"
    result = cli("--set", "store.url", url, "user", "list")
    assert result.code == 2
    assert "hunter" not in result.out + result.err
    assert "Error: No such command 'postgresql…'." in result.err
    assert "No such command 'usr'." in cli("usr", "list").err


def test_unmigrated_store_is_a_clear_error(db_url: str, tmp_path: Path) -> None:
    """Using a store that was never upgraded says so and how to fix it, on every backend."""
    cli = make_cli(db_url, tmp_path, CONFIG)
    result = cli("user", "list")
    assert result.code == 7
    assert "provisioner db upgrade" in result.err
    assert "Traceback" not in result.err


#: Commands that only read the store (a dry run writes nothing).
_READERS = (
    ("status",),
    ("status", "--json"),
    ("user", "list"),
    ("user", "show", "alice"),
    ("user", "export", "--csv", "-"),
    ("profile", "list"),
    ("render", "--dry-run"),
    ("sync", "--once", "--dry-run"),
    ("user", "import", "--csv", "users.csv", "--dry-run"),
    (
        "import",
        "pjsip",
        "pjsip.conf",
        "--profile",
        "agents",
        "--email-domain",
        "x.org",
        "--dry-run",
    ),
)


#: Commands that write only to what an existing store holds (``auth login``: a user's failed
#: logins and lock; ``adopt``: ownership records of an existing store's users' rows), so a
#: store they would create could not serve them.
_EXISTING_STORE_WRITERS = (("auth", "login", "alice"), ("adopt",), ("adopt", "--dry-run"))

#: Commands that write the store's tables, which only ``db upgrade`` (or ``quickstart``)
#: makes: a store they created would be an empty file refusing them for want of a schema.
_SCHEMA_WRITERS = (
    ("render",),
    ("sync", "--once"),
    ("profile", "add", "agents"),
    ("user", "add", "root", "--role", "admin", "--email", "root@x.org"),
    ("user", "edit", "alice", "--email", "a@x.org"),
    ("user", "disable", "alice"),
    ("user", "purge", "alice"),
    ("user", "sip-secret", "alice", "--rotate"),
    ("user", "apikey", "alice", "generate"),
    ("user", "import", "--csv", "users.csv"),
    ("import", "pjsip", "pjsip.conf", "--profile", "agents", "--email-domain", "x.org"),
    ("db", "repair"),
    ("run", "--burst"),
)


@pytest.mark.parametrize(
    "args", [*_READERS, *_EXISTING_STORE_WRITERS, *_SCHEMA_WRITERS], ids=" ".join
)
def test_a_command_but_db_upgrade_never_creates_a_missing_sqlite_store(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    """A command other than ``db upgrade`` and ``quickstart`` (a reader, ``auth login``, or
    one writing tables only ``db upgrade`` makes) on a SQLite store file that does not exist
    (a typo) exits 7 naming the path and the fix, and makes neither the file nor its
    directories."""
    store = tmp_path / "nope" / "typo.db"
    (tmp_path / "users.csv").write_text("username,full_name,email\nbob,Bob B,bob@x.org\n")
    (tmp_path / "pjsip.conf").write_text(
        "[101]\ntype=endpoint\nauth=101-auth\naors=101\n"
        "[101-auth]\ntype=auth\nusername=bob\npassword=Secret123456\n[101]\ntype=aor\n"
    )
    result = make_cli(f"sqlite:///{store}", tmp_path, CONFIG)(*args)
    assert (result.code, result.err.splitlines()) == (
        7,
        [
            f"error: user store unavailable: no database file at {store}"
            " (run `provisioner db upgrade` to create it)"
        ],
    )
    assert not (tmp_path / "nope").exists()


def test_a_reading_engine_never_creates_a_sqlite_file_removed_after_it_was_opened(
    tmp_path: Path,
) -> None:
    """An engine opened without ``create`` reads an existing SQLite file, and a file removed
    meanwhile is a database error at the next connection, not a new empty file."""
    store = tmp_path / "store.db"
    sqlite3.connect(store).close()
    engine = open_engine(f"sqlite:///{store}", create=False)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        engine.dispose()
        store.unlink()
        with pytest.raises(OperationalError, match="unable to open database file"):
            engine.connect()
        assert not store.exists()
    finally:
        engine.dispose()


def test_db_upgrade_still_creates_a_missing_sqlite_store_and_its_directories(
    tmp_path: Path,
) -> None:
    """``db upgrade`` (and the commands that write) still make a missing SQLite file and its
    directories, as on a fresh checkout."""
    store = tmp_path / "var" / "deep" / "store.db"
    cli = make_cli(f"sqlite:///{store}", tmp_path, CONFIG)
    assert "store at revision" in cli.ok("db", "upgrade")
    assert store.is_file()
    assert cli.ok("user", "list").splitlines()[1:] == []


def _typed_at_a_terminal(args: list[str], typed: list[str], env_: dict[str, str]) -> str:
    """Run ``provisioner args`` with a pseudo-terminal as stdin, stdout and stderr, type each
    of ``typed`` (a line) once the command waits for it, and return all it showed there:
    what it printed and what the terminal echoed of the typing."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [PROVISIONER, *args], stdin=slave, stdout=slave, stderr=slave, env=env_, close_fds=True
    )
    os.close(slave)
    shown = b""
    pending = list(typed)
    typed_at = 0  # len(shown) when the last line was typed
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 5.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command ended and closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            # A line is typed at a new prompt, or after 5 s of silence (a plain read).
            prompted = len(shown) > typed_at and shown.endswith(b": ")
            if pending and (prompted or not ready):
                os.write(master, (pending.pop(0) + "\n").encode())
                typed_at = len(shown)
            elif not ready and proc.poll() is not None:
                break
    finally:
        proc.wait(timeout=30)
        os.close(master)
    return shown.decode(errors="replace")


def test_a_secret_read_with_dash_from_a_terminal_is_not_echoed(tmp_path: Path) -> None:
    """``--password -``, ``--sip-secret -`` and ``user sip-secret --secret -`` typed at a
    terminal are asked for with the echo off (and confirmed), as ``user passwd`` asks: the
    secret never shows on the screen or in its scrollback; the user is added with them."""
    config = tmp_path / "provisioner.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "store.db"}"\n')
    run_env = env()
    for args in (["db", "upgrade"], ["profile", "add", "agents"]):
        subprocess.run([PROVISIONER, "--config", str(config), *args], env=run_env, check=True)
    add = ["user", "add", "alice", "--role", "admin", "--full-name", "A", "--email", "a@e.com"]
    shown = _typed_at_a_terminal(
        ["--config", str(config), *add, "--password", "-", "--sip-secret", "-"],
        ["Typed-Pass-Word-1", "Typed-Pass-Word-1", "Typed-Sip-Secret-2", "Typed-Sip-Secret-2"],
        run_env,
    )
    assert "added alice" in shown, shown
    assert "Typed-Pass-Word-1" not in shown
    assert "Typed-Sip-Secret-2" not in shown
    login = subprocess.run(
        [PROVISIONER, "--config", str(config), "auth", "login", "alice"],
        input="Typed-Pass-Word-1\n", capture_output=True, text=True, env=run_env,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    rotate = ["user", "sip-secret", "alice", "--rotate", "--secret", "-"]
    shown = _typed_at_a_terminal(
        ["--config", str(config), *rotate], ["Typed-Sip-Secret-3", "Typed-Sip-Secret-3"], run_env
    )
    assert "SIP secret rotated for alice" in shown, shown
    assert "Typed-Sip-Secret-3" not in shown


def test_a_new_sqlite_store_and_its_wal_files_are_not_world_readable(tmp_path: Path) -> None:
    """``db upgrade`` under the usual umask 022 makes the SQLite store (which holds the SIP
    digests, enough to register as any phone) and its WAL and shared-memory files mode 0640,
    not readable by other local users."""
    store = tmp_path / "store.db"
    cli = make_cli(f"sqlite:///{store}", tmp_path, CONFIG)
    old = os.umask(0o022)
    try:
        assert "store at revision" in cli.ok("db", "upgrade")
        engine = open_engine(f"sqlite:///{store}")
        try:
            with engine.connect() as conn:  # WAL mode: the -wal and -shm files exist meanwhile
                conn.exec_driver_sql("SELECT 1")
                modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.glob("store.db*")}
        finally:
            engine.dispose()
    finally:
        os.umask(old)
    assert modes == {"store.db": 0o640, "store.db-wal": 0o640, "store.db-shm": 0o640}


def test_an_existing_sqlite_store_keeps_its_mode(tmp_path: Path) -> None:
    """A store file that is already there keeps the mode its owner gave it (0600 here)."""
    store = tmp_path / "store.db"
    sqlite3.connect(store).close()
    store.chmod(0o600)
    assert "store at revision" in make_cli(f"sqlite:///{store}", tmp_path, CONFIG).ok(
        "db", "upgrade"
    )
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


@pytest.mark.parametrize("args", [*_READERS[:8], ("render",), ("sync", "--once")], ids=" ".join)
def test_every_command_reading_an_unmigrated_store_says_so_alike(
    args: tuple[str, ...], db_url: str, tmp_path: Path
) -> None:
    """Every command reading a store whose schema is missing (an empty database) exits 7 with
    one message: the database's words and ``provisioner db upgrade``."""
    if (path := make_url(db_url).database) and db_url.startswith("sqlite"):
        sqlite3.connect(path).close()  # an empty file: there, but never upgraded
    result = make_cli(db_url, tmp_path, CONFIG)(*args)
    assert result.code == 7, result
    [line] = result.err.splitlines()
    assert line.startswith("error: user store unavailable: "), line
    assert line.endswith(" (is the schema missing or old? run `provisioner db upgrade`)"), line


def test_a_realtime_targets_own_missing_column_is_the_realtime_databases(tmp_path: Path) -> None:
    """A realtime target's table lacking a column a user's options need (made by hand) is
    said as that database's error, not taken for the store's schema, which is current."""
    cli = make_cli(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, CONFIG)
    cli.ok("db", "upgrade")
    _add_boss(cli)  # the first user is an admin; an admin with an extension renders too
    target = tmp_path / "target.db"
    with sqlite3.connect(target) as conn:
        conn.execute("CREATE TABLE ps_endpoints (id TEXT PRIMARY KEY)")
    conn.close()
    result = cli("--set", f"target.url=sqlite:///{target}", "render", "--target", "realtime")
    assert result.code == 7, result
    said = f"error: realtime database unavailable (target.url sqlite:///{target}): "
    assert result.err.startswith(said + "OperationalError: "), result


def test_no_secret_leaks_into_output_or_logs(cli: Cli, store: Engine, tmp_path: Path) -> None:
    """In verbose runs passwords and given secrets never appear; generated ones appear once."""
    shown_once: list[str] = []
    never: list[str] = [GOOD_PASSWORD, OTHER_PASSWORD, "Given-Sip-Secret-1", "Given-Sip-Secret-2"]

    out = cli.ok(
        "user", "add", "alice", "--full-name", "Alice", "--email", "a@example.com",
        "--profile", "agents", "--password", "-", input=GOOD_PASSWORD + "\n",
    )  # fmt: skip
    shown_once.append(secret_after(out))
    _add(cli, "bob", "--sip-secret", "Given-Sip-Secret-1")
    cli.ok("user", "passwd", "bob", input=OTHER_PASSWORD + "\n")
    cli.ok("user", "edit", "bob", "--sip-secret", "-", input="Given-Sip-Secret-2\n")
    shown_once.append(secret_after(cli.ok("user", "sip-secret", "alice", "--rotate")))
    cli.ok("user", "sip-secret", "alice", "--rotate", "--secret", "-", input="Given-Sip-Secret-3\n")
    never.append("Given-Sip-Secret-3")
    key = secret_after(cli.ok("user", "apikey", "alice", "generate"))
    shown_once.append(key)
    cli.ok("auth", "login", "alice", input=GOOD_PASSWORD + "\n")
    cli("auth", "login", "bob", input="Wrong-Guess-42\n")
    never.append("Wrong-Guess-42")
    cli.ok("user", "show", "alice")
    cli.ok("user", "show", "bob", "--json")
    cli.ok("user", "list", "--json")
    csv_file = tmp_path / "out.csv"
    cli.ok("user", "export", "--csv", str(csv_file))
    import_file = tmp_path / "in.csv"
    import_file.write_text(
        f"username,full_name,email,profile,password\ncarol,Carol,c@example.com,agents,{GOOD_PASSWORD}\n"
    )
    shown_once.append(secret_after(cli.ok("user", "import", "--csv", str(import_file))))
    cli.ok("user", "apikey", "alice", "remove")

    transcript = "\n".join(cli.transcript) + csv_file.read_text(encoding="utf-8")
    assert '"event": "user.added"' in transcript or "user.added" in transcript  # logs captured
    for secret in never:
        assert secret not in transcript, secret
    for secret in shown_once:
        assert transcript.count(secret) == 1, secret
    for name in ("alice", "bob", "carol"):
        row = user_row(store, name)
        for stored in (row.password_hash, row.sip_md5, row.sip_sha256, row.apikey_hash):
            assert stored is None or stored not in transcript
    assert credentials.hash_apikey(key) not in transcript


def test_status_names_one_user_in_any_case_once(cli: Cli) -> None:
    """``status`` given one user's name in two cases reports that user instead of a missing one."""
    _add(cli, "alice")
    rows = json.loads(cli.ok("status", "alice", "ALICE", "--json"))
    assert [r["username"] for r in rows] == ["alice"]
    result = cli("status", "alice", "ALICE", "nobody", "NOBODY")
    assert result.code == 3
    assert "user 'nobody' not found" in result.err.replace('"', "'")


def test_status_and_json_times_say_they_are_utc(cli: Cli, store: Engine) -> None:
    """Times the store keeps in UTC without a zone are shown marked UTC: ``status``'s last
    change says UTC, and JSON times carry the +00:00 offset."""
    from provisioner.store.registrations import write_endpoint_rows

    _add(cli, "alice")
    extension = json.loads(cli.ok("user", "show", "alice", "--json"))["extension"]
    online = ("online", "NOT_INUSE", "", "2026-05-01 11:59:58.654321")
    with store.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {extension: ([], online)}, datetime(2026, 5, 1, 12))
    assert "2026-05-01 11:59:58 UTC" in cli.ok("status", "alice")
    (row,) = json.loads(cli.ok("status", "alice", "--json"))
    assert row["last_change"] == "2026-05-01T11:59:58.654321+00:00"
    assert json.loads(cli.ok("user", "show", "alice", "--json"))["created_at"].endswith("+00:00")


def test_user_show_says_its_times_are_utc(cli: Cli, clock: FakeClock) -> None:
    """``user show`` without ``--json`` marks its times UTC, as ``status`` does: a lock time
    read as local time would tell a supervisor east or west of UTC the wrong hour."""
    _add(cli, "alice")
    clock.advance(minutes=5, microseconds=250)
    for _ in range(3):
        cli("auth", "login", "alice", input="Wrong-password-1\n")
    shown = {line[:24].strip(): line[25:] for line in cli.ok("user", "show", "alice").splitlines()}
    assert shown["created_at"] == "2026-01-01 12:00:00 UTC"
    assert shown["locked_at"] == "2026-01-01 12:05:00 UTC"
    assert shown["deleted_at"] == ""


def test_status_shows_the_user_agent_of_a_usable_contact_and_contacts_in_order(
    cli: Cli, store: Engine
) -> None:
    """A user with an unreachable old phone and a registered new one is shown with the new
    phone's user agent, whichever contact the store returns first; contacts are listed
    by server, then URI."""
    from provisioner.store.registrations import write_endpoint_rows

    _add(cli, "alice")
    ext = json.loads(cli.ok("user", "show", "alice", "--json"))["extension"]
    seen = "2026-05-01 11:59:58.654321"
    old = (f"{ext};@a", f"sip:{ext}@10.0.0.9:5060", "Unreachable", "Old/1", "", None, None, seen)
    new = (f"{ext};@b", f"sip:{ext}@10.0.0.1:5060", "NonQualified", "New/2", "", None, None, seen)
    online = ("online", "NOT_INUSE", "", seen)
    with store.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {ext: ([old, new], online)}, datetime(2026, 5, 1, 12))
    (row,) = json.loads(cli.ok("status", "alice", "--json"))
    assert row["user_agent"] == "New/2"
    assert [c["uri"] for c in row["contacts"]] == [new[1], old[1]]
    assert "New/2" in cli.ok("status", "alice")


def _alice_online_with_agent(cli: Cli, store: Engine, agent: str) -> None:
    """Add alice, and store one online contact of hers on ``pbx1`` whose phone sent
    ``agent`` as its user agent."""
    from provisioner.store.registrations import write_endpoint_rows

    _add(cli, "alice")
    ext = json.loads(cli.ok("user", "show", "alice", "--json"))["extension"]
    seen = "2026-05-01 11:59:58.654321"
    contact = (f"{ext};@a", f"sip:{ext}@10.0.0.1:5060", "NonQualified", agent, "", None, None, seen)
    with store.begin() as conn:
        write_endpoint_rows(
            conn,
            "pbx1",
            {ext: ([contact], ("online", "NOT_INUSE", "", seen))},
            datetime(2026, 5, 1),
        )


def test_status_prints_a_phones_control_characters_escaped(cli: Cli, store: Engine) -> None:
    """A user agent a phone sent with terminal escape sequences (an OSC 52 clipboard write, a
    screen clear) reaches the admin's terminal as visible ``\\x1b`` escapes, never as the
    bytes that a terminal would act on; ``--json`` keeps the exact text, escaped by JSON."""
    agent = "Phone/1 \x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x9b1m\r"
    _alice_online_with_agent(cli, store, agent)
    shown = cli.ok("status", "alice")
    assert not any(ch in shown for ch in "\x1b\x07\x9b\r"), repr(shown)
    assert "Phone/1 \\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\x9b1m\\x0d" in shown
    (row,) = json.loads(cli.ok("status", "alice", "--json"))
    assert row["user_agent"] == agent


def test_status_prints_a_phones_bidi_and_line_separators_escaped(cli: Cli, store: Engine) -> None:
    """A user agent with a right-to-left override (which a bidi terminal would apply to the
    rest of the row, showing another time or problem), zero-width characters or a Unicode
    line separator reaches the terminal as ``\\u`` escapes."""
    agent = "Phone/1 \u202edeliver\u2066\u200b\u2028\ufeffx"
    _alice_online_with_agent(cli, store, agent)
    shown = cli.ok("status", "alice")
    assert not any(ch in shown for ch in "\u202e\u2066\u200b\u2028\ufeff"), repr(shown)
    assert "Phone/1 \\u202edeliver\\u2066\\u200b\\u2028\\ufeffx" in shown


def test_status_orders_users_by_extension_as_dialled_numbers(cli: Cli) -> None:
    """``status`` lists extension 2001 before 10000 (numbers, not text), and 0101 just
    before 101 (same number: the text decides)."""
    for name, ext in (("alice", "10000"), ("bob", "2001"), ("carol", "101"), ("dave", "0101")):
        _add(cli, name, "--extension", ext)
    rows = json.loads(cli.ok("status", "--json"))
    assert [r["extension"] for r in rows] == ["100", "0101", "101", "2001", "10000"]


def test_username_with_trailing_spaces_is_not_found_on_every_backend(
    backend: str, tmp_path: Path
) -> None:
    """``user show``, ``user delete`` and ``status`` of a username with trailing spaces find
    no user on SQLite, PostgreSQL and MariaDB alike."""
    with temp_database(backend, tmp_path) as url:
        cli = make_cli(url, tmp_path, CONFIG)
        _seed(cli)
        _add(cli, "alice")
        for command in ("show", "delete"):
            result = cli("user", command, "alice   ")
            assert (result.code, "user 'alice   ' not found" in result.err) == (3, True)
        assert cli("status", "alice ").code == 3
        assert json.loads(cli.ok("user", "show", "ALICE", "--json"))["deleted_at"] is None


#: ``al\xffice`` as Python reads it from a command line that is not UTF-8 (a Latin-1
#: terminal, a script's bytes): the byte becomes a surrogate no database can be sent.
NOT_UTF8 = "al\udcffice"


def test_a_name_that_is_not_utf8_names_no_user_on_every_backend(
    backend: str, tmp_path: Path
) -> None:
    """A username, ``--as`` actor or profile name holding a byte that is not UTF-8 names
    no user (exit 3), no actor (exit 5), no login (exit 6) and no profile (exit 2), and a
    CSV row's username holding a NUL is refused by the username rule on its line, on
    SQLite, PostgreSQL and MariaDB, instead of a traceback or a database error."""
    with temp_database(backend, tmp_path) as url:
        cli = make_cli(url, tmp_path, CONFIG)
        _seed(cli)
        _add(cli, "alice")
        for args in (
            ("user", "show", NOT_UTF8),
            ("user", "delete", NOT_UTF8),
            ("user", "edit", NOT_UTF8, "--nat", "yes"),
            ("user", "apikey", NOT_UTF8, "generate"),
            ("user", "export", "--csv", "-", NOT_UTF8),
            ("status", NOT_UTF8),
        ):
            result = cli(*args)
            assert (result.code, "user 'al\\udcffice' not found" in result.err) == (3, True), args
        assert cli("auth", "login", NOT_UTF8, input="Secret-123\n").code == 6
        result = cli("--as", NOT_UTF8, "user", "edit", "alice", "--nat", "yes")
        assert (result.code, "actor: 'al\\udcffice' names no user" in result.err) == (5, True)
        pjsip = tmp_path / "pjsip.conf"
        pjsip.write_text("[1001]\ntype=endpoint\n", encoding="utf-8")
        result = cli("import", "pjsip", str(pjsip), "--profile", NOT_UTF8, "--email-domain", "x.io")
        assert (result.code, "--profile: must name an existing profile" in result.err) == (2, True)
        assert json.loads(cli.ok("user", "show", "alice", "--json"))["voice"]["nat"] == "no"
        # A CSV cell may hold a NUL, which PostgreSQL cannot be sent in text: as any bad name.
        result = cli("user", "import", "--csv", "-", input="username,nat\nal\x00ice,yes\n")
        assert (result.code, "line 2: username: must be 1-40" in result.err) == (2, True)


def test_quickstart_hides_the_store_password(tmp_path: Path) -> None:
    """``quickstart`` prints the store URL with its password hidden."""
    with temp_database("postgresql", tmp_path) as url:
        secret_url = make_url(url).set(password="s3cret-pw").render_as_string(hide_password=False)
        config = CONFIG + f'\n[target]\npath = "{tmp_path / "pjsip_users.conf"}"\n'
        result = make_cli(secret_url, tmp_path, config)("quickstart")
        assert result.code == 0, result
        assert "s3cret-pw" not in result.out + result.err
        assert "store: postgresql+psycopg://postgres:***@127.0.0.1:5432/" in result.out


def test_an_empty_store_url_flag_is_refused_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--store-url ""`` (a script's unset variable) is a config problem on store.url
    (exit 2), not a silent fall back to the default store in the working directory."""
    monkeypatch.chdir(tmp_path)
    result = make_cli("", tmp_path, CONFIG)("user", "list")
    assert result.code == 2, result
    assert "  store.url: must be a SQLAlchemy database URL" in result.err
    assert not (tmp_path / "var").exists()


def _quickstart_cli(tmp_path: Path, url: str) -> Cli:
    target = tmp_path / "pjsip_users.conf"
    return make_cli(url, tmp_path, CONFIG + f'\n[target]\npath = "{target}"\n')


def _usernames(cli: Cli) -> list[str]:
    return sorted(u["username"] for u in json.loads(cli.ok("user", "list", "--json")))


def test_quickstart_on_a_store_with_profile_agents_but_no_users_seeds_the_samples(
    tmp_path: Path,
) -> None:
    """``quickstart`` on a store that holds the profile ``agents`` but no user seeds the
    samples into that profile instead of failing on the taken profile name."""
    with temp_database("sqlite", tmp_path) as url:
        cli = _quickstart_cli(tmp_path, url)
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        result = cli("quickstart")
        assert result.code == 0, result
        assert _usernames(cli) == ["admin", "alice", "bob.smith", "carol_web"]


def test_quickstart_seeds_every_sample_or_none(tmp_path: Path) -> None:
    """A sample that cannot be added (no free extension left) leaves the store as it was,
    with no profile and no user, so ``quickstart`` seeds all of them once it can."""
    with temp_database("sqlite", tmp_path) as url:
        cli = _quickstart_cli(tmp_path, url)
        result = cli("--set", "extensions.last=101", "quickstart")
        assert result.code == 4, result
        assert "no free extension left in 100-101" in result.err
        assert _usernames(cli) == []
        assert cli.ok("profile", "list", "--json").strip() == "[]"
        assert cli("quickstart").code == 0
        assert _usernames(cli) == ["admin", "alice", "bob.smith", "carol_web"]


def test_realtime_dry_run_creates_no_table(cli: Cli, db_url: str) -> None:
    """``render --target realtime --dry-run`` against a database without the tables plans
    every user as added and creates nothing; the real render then creates the tables."""
    _add(cli, "alice")
    cli.config.write_text(CONFIG + f'\n[target]\nurl = "{db_url}"\n', encoding="utf-8")
    target = create_engine(db_url)
    try:
        out = cli.ok("render", "--target", "realtime", "--dry-run")
        assert "+ ps_endpoints" in out
        assert "would be added 2" in out
        assert inspect(target).get_table_names() == []
        cli.ok("render", "--target", "realtime")
        assert {"ps_endpoints", "ps_auths", "ps_aors", "provisioner_objects"} <= set(
            inspect(target).get_table_names()
        )
        assert "would be added 0" in cli.ok("render", "--target", "realtime", "--dry-run")
    finally:
        target.dispose()


@pytest.mark.parametrize(
    "args", [("render", "--target", "realtime", "--dry-run"), ("sync", "--once", "--dry-run")],
    ids=" ".join,
)  # fmt: skip
def test_a_realtime_dry_run_never_creates_a_missing_sqlite_target(
    args: tuple[str, ...], cli: Cli, tmp_path: Path
) -> None:
    """A dry run whose realtime ``target.url`` names a SQLite file that does not exist plans
    every user as added, as into an empty database, and makes neither the file nor its
    directories; the real render then makes them."""
    _add(cli, "alice")
    target = tmp_path / "rt" / "asterisk.db"
    cli.config.write_text(
        CONFIG + f'\n[target]\nkind = "realtime"\nurl = "sqlite:///{target}"\n', encoding="utf-8"
    )
    out = cli.ok(*args)
    assert "would be added 2, " in out
    assert not (tmp_path / "rt").exists()
    cli.ok("render")
    assert "would be added 0, " in cli.ok(*args)


# -- who acts: --as ---------------------------------------------------------------------------

ONLY_ITSELF = "root is the first admin, and the first admin is edited only by itself"


def _add_boss(cli: Cli) -> None:
    cli.ok("user", "add", "boss", "--role", "admin", "--full-name", "Boss", "--email", "b@ex.com")


def test_as_another_admin_editing_the_first_admin_exits_5(cli: Cli, store: Engine) -> None:
    """``--as boss`` editing, re-keying or re-passwording root exits 5 naming root and the
    rule, and root's row stays as it was."""
    _add_boss(cli)
    before = dict(user_row(store, "root")._mapping)
    for args in (
        ("user", "edit", "root", "--email", "evil@example.com"),
        ("user", "edit", "root", "--nat", "comedia"),
        ("user", "passwd", "root"),
        ("user", "sip-secret", "root", "--rotate"),
        ("user", "apikey", "root", "generate"),
    ):
        result = cli("--as", "boss", *args, input=GOOD_PASSWORD + "\n")
        assert result.code == 5, (args, result)
        assert result.err == f"error: not allowed\n  username: {ONLY_ITSELF} (not by boss)\n"
    assert dict(user_row(store, "root")._mapping) == before


def test_as_the_first_admin_or_without_as_root_is_edited(cli: Cli, store: Engine) -> None:
    """``--as root`` edits root, and so does a command without ``--as``, as before."""
    _add_boss(cli)
    assert "updated: root" in cli.ok("--as", "root", "user", "edit", "root", "--email", "a@ex.com")
    assert user_row(store, "root").email == "a@ex.com"
    assert "updated: root" in cli.ok("user", "edit", "root", "--email", "b@ex.com")
    assert user_row(store, "root").email == "b@ex.com"
    assert "updated: boss" in cli.ok("--as", "boss", "user", "edit", "boss", "--nat", "yes")


def test_provisioner_as_names_the_actor_and_is_no_config_key(cli: Cli, store: Engine) -> None:
    """``$PROVISIONER_AS`` acts like ``--as`` (and is not read as a config key)."""
    _add_boss(cli)
    cli.env["PROVISIONER_AS"] = "boss"
    refused = cli("user", "edit", "root", "--email", "evil@example.com")
    assert refused.code == 5, refused
    assert ONLY_ITSELF in refused.err
    assert "updated: boss" in cli.ok("user", "edit", "boss", "--email", "bb@ex.com")
    assert "updated: root" in cli.ok("--as", "root", "user", "edit", "root", "--email", "r@ex.com")


def test_an_empty_provisioner_as_is_refused_not_taken_for_no_actor(cli: Cli, store: Engine) -> None:
    """``$PROVISIONER_AS`` set but empty (a front end whose admin variable came out empty)
    is refused on field actor, exit 5, as ``--as ''`` is: it does not run the command
    unchecked as the store's operator."""
    _add_boss(cli)
    cli.env["PROVISIONER_AS"] = ""
    refused = cli("user", "edit", "root", "--email", "evil@example.com")
    assert refused.code == 5, refused
    assert "  actor: '' names no user; only an existing, active admin acts" in refused.err
    assert user_row(store, "root").email == "r@example.com"


def test_as_an_unfit_actor_exits_5_naming_actor(cli: Cli, store: Engine) -> None:
    """``--as`` naming no user, or a non-admin, changes nothing and exits 5 on field actor."""
    _add(cli, "alice")
    for actor, rule in (("ghost", "'ghost' names no user"), ("alice", "'alice' is not an admin")):
        result = cli("--as", actor, "user", "edit", "alice", "--nat", "yes")
        assert result.code == 5, result
        assert f"  actor: {rule}; only an existing, active admin acts" in result.err
    assert user_row(store, "alice").nat == "no"


def test_as_another_admin_importing_a_change_to_root_is_refused(
    cli: Cli, store: Engine, tmp_path: Path
) -> None:
    """``--as boss user import`` re-importing an export passes, but one that changes root is
    refused naming its line, and none of its rows is applied."""
    _add_boss(cli)
    _add(cli, "alice")
    csv_file = tmp_path / "users.csv"
    cli.ok("user", "export", "--csv", str(csv_file))
    assert "unchanged 3" in cli.ok("--as", "boss", "user", "import", "--csv", str(csv_file))
    text = csv_file.read_text(encoding="utf-8")
    csv_file.write_text(text.replace("r@example.com", "x@ex.com").replace("Alice A", "Al"))
    result = cli("--as", "boss", "user", "import", "--csv", str(csv_file))
    assert result.code == 2, result
    assert f"  line 2: username: {ONLY_ITSELF} (not by boss)" in result.err
    assert (user_row(store, "root").email, user_row(store, "alice").full_name) == (
        "r@example.com",
        "Alice A",
    )


def test_an_empty_role_cell_keeps_the_role_like_a_missing_column(cli: Cli, tmp_path: Path) -> None:
    """An empty role cell in a CSV import keeps an existing user's role and gives a new user
    the default role, as a missing role column does, instead of being refused as a change."""
    _add(cli, "alice")
    sheet = tmp_path / "roles.csv"
    sheet.write_text(
        "username,role,full_name,email,profile\n"
        "alice,,Alice B,alice@example.com,agents\n"
        "dave,,Dave,dave@example.com,agents\n",
        encoding="utf-8",
    )
    out = cli.ok("user", "import", "--csv", str(sheet))
    assert "added 1, updated 1" in out
    shown = {u["username"]: u for u in json.loads(cli.ok("user", "list", "--json"))}
    assert (shown["alice"]["role"], shown["alice"]["full_name"]) == ("user", "Alice B")
    assert shown["dave"]["role"] == "user"


def test_unlocking_a_deleted_member_exits_5_and_changes_no_one(cli: Cli, store: Engine) -> None:
    """'user unlock' refuses a deleted member (restore it first), as enable and disable do,
    and unlocks none of the users named with it."""
    for name in ("alice", "bob"):
        _add(cli, name)
        cli.ok("user", "passwd", name, input=GOOD_PASSWORD + "\n")
        for _ in range(3):
            cli("auth", "login", name, input="wrong\n")
        assert user_row(store, name).locked_at is not None
    cli.ok("user", "delete", "alice")
    before = user_row(store, "alice")
    result = cli("user", "unlock", "bob", "alice")
    assert result.code == 5
    assert "username: alice is in deleted members; restore it first" in result.err
    assert user_row(store, "alice") == before
    assert user_row(store, "bob").locked_at is not None


def test_a_role_in_capitals_is_taken_as_csv_import_takes_it(
    cli: Cli,
) -> None:
    """`user add --role ADMIN` adds an admin and `user list --role ADMIN` finds it, as CSV
    import and --transport/--nat/--video take any case."""
    cli.ok("user", "add", "boss", "--role", "ADMIN", "--full-name", "Boss", "--email", "b@ex.com")
    listed = json.loads(cli.ok("user", "list", "--json", "--role", "Admin"))
    assert [(u["username"], u["role"]) for u in listed] == [("root", "admin"), ("boss", "admin")]


def test_user_add_and_edit_take_an_empty_attribute_value_alike(cli: Cli) -> None:
    """`--attr KEY=` sets no attribute on add and removes it on edit, and on both a key that
    breaks the key rule is refused naming field attributes (exit 2), even with an empty value."""
    _add(cli, "alice", "--attr", "team=", "--attr", "site=north")
    assert json.loads(cli.ok("user", "show", "alice", "--json"))["attributes"] == {"site": "north"}
    for command in (["add", "bob", "--full-name", "Bob", "--email", "b@ex.com"], ["edit", "alice"]):
        result = cli("user", *command, "--profile", "agents", "--attr", "[x]=")
        assert result.code == 2, result
        assert "  attributes: key '[x]' must be 1-64 letters" in result.err
    cli.ok("user", "edit", "alice", "--attr", "site=")
    assert json.loads(cli.ok("user", "show", "alice", "--json"))["attributes"] == {}


def test_an_export_to_a_stdout_that_cannot_be_written_exits_2_naming_csv(cli: Cli) -> None:
    """`user export --csv -` with stdout on a full device exits 2 naming --csv, no
    traceback; written to the terminal's stdout it holds every row, flushed."""
    with Path("/dev/full").open("w") as device:
        full = subprocess.run(
            [PROVISIONER, "--config", str(cli.config), "--store-url", cli.url,
             "user", "export", "--csv", "-"],
            stdout=device, stderr=subprocess.PIPE, text=True, env=env(), timeout=60, check=False,
        )  # fmt: skip
    assert (full.returncode, full.stderr) == (
        2,
        "error: invalid input\n  --csv: cannot write '-': No space left on device\n",
    )
    assert cli.ok("user", "export", "--csv", "-").splitlines()[1].startswith("root,admin,")


def test_an_export_to_stdout_is_utf8_whatever_the_locale_so_it_reimports(
    cli: Cli, tmp_path: Path
) -> None:
    """`user export --csv -` under a Latin-1 or ASCII terminal writes the same UTF-8 bytes
    as `--csv FILE` (no traceback on a name the terminal cannot show), and they re-import
    unchanged, as the import reads every file as UTF-8."""
    _add(cli, "alice")
    cli.ok("user", "edit", "alice", "--full-name", "Zoë 中文 😀")
    cli.ok("user", "export", "--csv", str(tmp_path / "file.csv"))
    written = (tmp_path / "file.csv").read_bytes()
    for encoding in ("latin-1", "ascii"):
        piped = subprocess.run(
            [PROVISIONER, "--config", str(cli.config), "--store-url", cli.url,
             "user", "export", "--csv", "-"],
            capture_output=True, env=env(PYTHONIOENCODING=encoding), timeout=60, check=False,
        )  # fmt: skip
        assert (piped.returncode, piped.stderr, piped.stdout) == (0, b"", written), encoding
    (tmp_path / "piped.csv").write_bytes(piped.stdout)
    assert "unchanged 2" in cli.ok("user", "import", "--csv", str(tmp_path / "piped.csv"))


def test_listings_under_a_latin1_locale_escape_what_it_cannot_show(cli: Cli) -> None:
    """``user list`` and ``user show`` under a Latin-1 terminal show a full name
    with CJK characters and an emoji, the characters Latin-1 lacks as escapes, instead of
    a traceback half-way through the listing."""
    _add(cli, "alice")
    cli.ok("user", "edit", "alice", "--full-name", "Zoë 中 😀")
    for command in (("user", "list"), ("user", "show", "alice")):
        shown = subprocess.run(
            [PROVISIONER, "--config", str(cli.config), "--store-url", cli.url, *command],
            capture_output=True, env=env(PYTHONIOENCODING="latin-1"), timeout=60, check=False,
        )  # fmt: skip
        assert (shown.returncode, shown.stderr) == (0, b""), command
        assert "Zo\u00eb \\u4e2d \\U0001f600".encode("latin-1") in shown.stdout, command


def _write_latin1(cli: Cli, statement: str) -> None:
    """Another application writing the SQLite store through the sqlite3 module, its text
    in Latin-1 (a PHP writer's ``é`` as the byte E9), which SQLite stores unchecked."""
    db = make_url(cli.url).database
    assert db is not None
    with sqlite3.connect(db) as conn:
        conn.execute(statement)
    conn.close()


#: What a byte that is not UTF-8 in the store is refused as, wherever it was read.
_NOT_TEXT = (
    "full_name: must be text: it holds a byte that is not valid in its character set "
    "(the terminal's, or UTF-8 in the store)"
)


def test_a_name_another_writer_left_not_utf8_is_skipped_shown_and_repaired(
    cli: Cli, tmp_path: Path
) -> None:
    """A full name another writer left in SQLite as bytes that are not UTF-8 skips only
    that user in `sync --once` (exit 0, the field and the rule said, its last good section
    kept, the others applied); `user list`, `user show`, `status` and `user export` show
    the byte as an escape; `user edit --full-name` repairs it and the next sync renders it."""
    conf = tmp_path / "pjsip_users.conf"
    cli.config.write_text(CONFIG + f'\n[target]\npath = "{conf}"\n', encoding="utf-8")
    _add(cli, "alice")
    _add(cli, "bob")
    cli.ok("sync", "--once")
    _write_latin1(
        cli, "UPDATE users SET full_name = CAST(X'416C6963E9' AS TEXT) WHERE username = 'alice'"
    )
    _add(cli, "carol")
    synced = cli("sync", "--once")
    assert (synced.code, synced.err.endswith(f"\nskipped alice: {_NOT_TEXT}\n")) == (0, True)
    assert "added 1, updated 0, removed 0, unchanged 3, skipped 1" in synced.out
    assert '"Alice A" <101>' in conf.read_text()  # its last good section
    assert "[103]" in conf.read_text()
    for command in (("user", "list"), ("user", "show", "alice"), ("user", "export", "--csv", "-")):
        assert "Alic\\udce9" in cli.ok(*command), command
    assert "alice" in cli.ok("status")
    cli.ok("user", "edit", "alice", "--full-name", "Alice")
    synced = cli("sync", "--once")
    assert (synced.code, "skipped alice" in synced.err) == (0, False)
    assert "updated 1, removed 0, unchanged 3, skipped 0" in synced.out
    assert '"Alice" <101>' in conf.read_text()


def test_an_attribute_and_a_profile_another_writer_left_not_utf8_are_shown_and_judged(
    cli: Cli,
) -> None:
    """An attribute value and a profile description SQLite holds as bytes that are not
    UTF-8 are shown with the byte as an escape by `user show` and `profile list`; an
    `--attr` edit keeping that value is refused naming the attribute, one replacing it
    passes."""
    _add(cli, "alice", "--attr", "desk=A1")
    _write_latin1(cli, "UPDATE user_attributes SET value = CAST(X'41E9' AS TEXT)")
    _write_latin1(cli, "UPDATE profiles SET description = CAST(X'44E9' AS TEXT)")
    assert "A\\udce9" in cli.ok("user", "show", "alice")
    assert "D\\udce9" in cli.ok("profile", "list")
    kept = cli("user", "edit", "alice", "--attr", "floor=2")
    assert (kept.code, "attributes: value of 'desk' must be text: it holds a byte" in kept.err) == (
        2,
        True,
    )
    cli.ok("user", "edit", "alice", "--attr", "desk=A2")
    assert "A2" in cli.ok("user", "show", "alice")


def test_an_extension_another_writer_left_not_utf8_fails_no_other_users_read_or_write(
    cli: Cli, tmp_path: Path
) -> None:
    """An extension SQLite holds as bytes that are not UTF-8 names that user in `sync` and
    `status`, while `user add` without an extension, `user import`, `import pjsip` and the
    registration writes still work for the others, and an import moving it repairs it."""
    conf = tmp_path / "pjsip_users.conf"
    cli.config.write_text(CONFIG + f'\n[target]\npath = "{conf}"\n', encoding="utf-8")
    _add(cli, "alice")
    _add(cli, "bob")
    _write_latin1(
        cli, "UPDATE users SET extension = CAST(X'313031E9' AS TEXT) WHERE username = 'alice'"
    )
    synced = cli("sync", "--once")
    assert (synced.code, "\nskipped alice: extension: " in synced.err) == (0, True)
    assert "alice" in cli.ok("status", "alice")
    assert "extension 101)" in _add(cli, "carol")  # alice's bytes are not the number 101
    csv_file = tmp_path / "users.csv"
    csv_file.write_text(
        "username,full_name,email,profile,extension\n"
        "dave,Dave A,dave@example.com,agents,\nalice,Alice A,alice@example.com,agents,180\n",
        encoding="utf-8",
    )
    assert "added 1, updated 1, unchanged 0" in cli.ok("user", "import", "--csv", str(csv_file))
    pjsip = tmp_path / "pjsip.conf"
    pjsip.write_text("[1001]\ntype=endpoint\nauth=1001\n[1001]\ntype=auth\n"
                     "auth_type=userpass\nusername=erin\npassword=Secret-1234\n")  # fmt: skip
    cli.ok("import", "pjsip", str(pjsip), "--profile", "agents", "--email-domain", "x.org")
    synced = cli("sync", "--once")
    repaired = (synced.code, "skipped alice" in synced.err, "[180]" in conf.read_text())
    assert repaired == (0, False, True)
    _write_latin1(
        cli, "UPDATE users SET extension = CAST(X'313831E9' AS TEXT) WHERE username = 'alice'"
    )
    engine = open_engine(cli.url)
    try:
        with engine.begin() as conn:
            state: EndpointRows = {"102": ([], ("online", "NOT_INUSE", "", None))}
            assert write_endpoint_rows(conn, "pbx1", state, datetime(2026, 1, 1)) == 1
            assert replace_server_snapshot(conn, "pbx1", state, datetime(2026, 1, 1)) == 1
            assert set_problems(conn, "pbx1", {"102": "x"}, datetime(2026, 1, 1)) == 1
            people = {p["username"]: p["state"] for p in status_rows(conn)}
    finally:
        engine.dispose()
    assert (people["bob"], people["alice"]) == ("online", "offline")


def test_user_show_and_list_clear_a_lock_that_timed_out(cli: Cli, clock: FakeClock) -> None:
    """Once lock_minutes have passed, 'user show' and 'user list' give the state active
    with no lock time and no failed logins, as the next login sees it, not the stale ones."""
    cli.ok(
        "user", "add", "alice", "--full-name", "Alice", "--email", "a@example.com",
        "--profile", "agents", "--password", "-", input=GOOD_PASSWORD + "\n",
    )  # fmt: skip
    for _ in range(3):
        cli("auth", "login", "alice", input="wrong\n")
    locked = json.loads(cli.ok("user", "show", "alice", "--json"))
    assert (locked["state"], locked["failed_logins"]) == ("locked", 3)
    clock.advance(minutes=15)
    shown = json.loads(cli.ok("user", "show", "alice", "--json"))
    assert (shown["state"], shown["failed_logins"], shown["locked_at"]) == ("active", 0, None)
    (listed,) = [u for u in json.loads(cli.ok("user", "list", "--json")) if u["id"] == shown["id"]]
    assert (listed["failed_logins"], listed["locked_at"]) == (0, None)


def test_another_admins_unlock_of_a_first_admin_whose_lock_timed_out_is_unchanged(
    cli: Cli, store: Engine, clock: FakeClock
) -> None:
    """``--as boss user unlock root`` once root's login lock has timed out changes nothing
    (root shows active with no failed logins): it exits 0 printing ``unchanged: root``,
    not 5; while the lock holds it is still refused, exit 5."""
    _add_boss(cli)
    cli.ok("user", "passwd", "root", input=GOOD_PASSWORD + "\n")
    for _ in range(3):
        cli("auth", "login", "root", input="wrong\n")
    held = cli("--as", "boss", "user", "unlock", "root")
    assert held.code == 5, held
    assert ONLY_ITSELF in held.err
    clock.advance(minutes=15)
    before = dict(user_row(store, "root")._mapping)
    result = cli("--as", "boss", "user", "unlock", "root")
    assert result.code == 0, result
    assert result.out == "unchanged: root\n"
    assert dict(user_row(store, "root")._mapping) == before
    assert cli.ok("--as", "boss", "user", "unlock", "root", "boss") == "unchanged: root, boss\n"


def test_an_attribute_given_twice_is_refused_naming_its_key(cli: Cli) -> None:
    """`--attr team=x --attr team=y` is refused (exit 2) naming the key, on add and edit alike,
    instead of silently keeping the last value."""
    _add(cli, "alice", "--attr", "team=blue")
    for command in (["add", "bob", "--full-name", "Bob", "--email", "b@ex.com"], ["edit", "alice"]):
        result = cli("user", *command, "--attr", "team=x", "--attr", "team=y")
        assert result.code == 2, result
        assert "  attr: key 'team' given twice" in result.err
    assert json.loads(cli.ok("user", "show", "alice", "--json"))["attributes"] == {"team": "blue"}


def test_log_level_sound_and_toast_position_take_any_case(cli: Cli) -> None:
    """`--log-level`, `--messenger-sound` and `--toast-position` take any case, as
    --transport/--nat/--video do, and store the canonical lower-case value."""
    _add(cli, "alice", "--log-level", "DEBUG", "--messenger-sound", "Off")
    cli.ok("user", "edit", "alice", "--toast-position", "TOP-LEFT")
    shown = json.loads(cli.ok("user", "show", "alice", "--json"))
    picked = (shown["log_level"], shown["messenger_sound"], shown["toast_position"])
    assert picked == ("debug", False, "top-left")


def test_status_of_a_deleted_user_shows_it_deleted_as_user_show_finds_it(cli: Cli) -> None:
    """``status NAME`` of a deleted user reports it as deleted with no contacts (exit 0),
    as ``user show`` finds it, instead of "not found"; ``status`` alone lists live users."""
    _add(cli, "alice")
    _add(cli, "bob")
    cli.ok("user", "delete", "alice")
    assert json.loads(cli.ok("user", "show", "alice", "--json"))["state"] == "deleted"
    (row,) = json.loads(cli.ok("status", "alice", "--json"))
    assert (row["username"], row["state"], row["contacts"]) == ("alice", "deleted", [])
    assert "deleted" in cli.ok("status", "ALICE")
    assert [r["username"] for r in json.loads(cli.ok("status", "--json"))] == ["root", "bob"]


def test_bulk_actions_report_users_they_left_unchanged_as_unchanged(cli: Cli) -> None:
    """`user restore`, `enable` and `unlock` name the users they changed as done and those
    already in that state as unchanged, instead of reporting every one as done."""
    _add(cli, "alice")
    _add(cli, "bob")
    cli.ok("user", "delete", "alice")
    cli.ok("user", "disable", "bob")
    assert cli.ok("user", "restore", "alice", "bob") == "restore: alice\nunchanged: bob\n"
    assert cli.ok("user", "enable", "alice", "bob") == "enable: bob\nunchanged: alice\n"
    assert cli.ok("user", "unlock", "alice") == "unchanged: alice\n"


def test_an_edit_that_changes_no_stored_value_says_unchanged_and_writes_nothing(
    cli: Cli, store: Engine, clock: FakeClock
) -> None:
    """``user edit`` giving only the values alice already holds (her NAT, an attribute, the
    SIP secret she has) prints ``unchanged: alice`` (as the bulk commands say it) and exits
    0, writing nothing: not her row, not ``updated_at``, not her attributes, no change-feed
    row (which would make the daemon re-render); a change prints ``updated: alice``."""
    from provisioner.store.changefeed import newest_change_id

    _add(cli, "alice", "--nat", "no", "--attr", "team=blue")
    cli.ok("user", "edit", "alice", "--sip-secret", "-", input="Given-Sip-Secret-2\n")
    clock.advance(minutes=5)
    with store.connect() as conn:
        change = newest_change_id(conn)
    before = dict(user_row(store, "alice")._mapping)
    shown = json.loads(cli.ok("user", "show", "alice", "--json"))
    for edit in (
        ("--nat", "no"),
        ("--nat", "NO", "--attr", "team=blue"),
        ("--sip-secret", "-"),
    ):
        result = cli("user", "edit", "alice", *edit, input="Given-Sip-Secret-2\n")
        assert (result.code, result.out) == (0, "unchanged: alice\n"), result
    assert dict(user_row(store, "alice")._mapping) == before
    assert json.loads(cli.ok("user", "show", "alice", "--json")) == shown
    with store.connect() as conn:
        assert newest_change_id(conn) == change
    assert cli.ok("user", "edit", "alice", "--nat", "yes") == "updated: alice\n"


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_a_json_list_written_in_chunks_is_the_whole_lists_dump(
    count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listing's JSON written a chunk of items at a time is, byte for byte, the dump of
    the whole list (nested values, a time, an empty list), so no listing holds it all."""
    items = [
        {"id": i, "voice": {"codecs": "ulaw"}, "attributes": {}, "at": datetime(2026, 1, i + 1)}
        for i in range(count)
    ]
    cli_module._echo_json(items)
    whole = capsys.readouterr().out
    cli_module._echo_json_list(iter(items), chunk=2)
    assert capsys.readouterr().out == whole


def test_an_export_cut_short_by_a_write_error_leaves_the_file_as_it_was(
    cli: Cli, tmp_path: Path
) -> None:
    """An export whose file cannot be written to the end (a full disk, a size limit) exits 2
    naming --csv and leaves no half-written file: the one already there stays whole (a cut
    file re-imports as a valid, shorter export, a full name cut to its first letters)."""
    rows = "".join(f"u{n},U {n},u{n}@example.com,agents,{'d' * 1000}\n" for n in range(80))
    users_csv = tmp_path / "users.csv"
    users_csv.write_text("username,full_name,email,profile,description\n" + rows)
    cli.ok("user", "import", "--csv", str(users_csv))
    out = tmp_path / "export.csv"
    out.write_text("the previous export\n")
    limit = 64 * 1024  # above SQLite's 32 KiB shared-memory file, below the export

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cut = subprocess.run(
        [PROVISIONER, "--config", str(cli.config), "--store-url", cli.url,
         "user", "export", "--csv", str(out)],
        capture_output=True, text=True, env=env(), timeout=60, check=False,
        preexec_fn=small_files,
    )  # fmt: skip
    assert (cut.returncode, cut.stderr) == (
        2,
        f"error: invalid input\n  --csv: cannot write {str(out)!r}: File too large\n",
    )
    assert out.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("export")] == ["export.csv"]
