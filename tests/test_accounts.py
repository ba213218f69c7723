"""The user store on SQLite, PostgreSQL and MariaDB: every rule, re-read from the database."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Connection, Engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from provisioner import credentials
from provisioner.accounts import Accounts, Policy
from provisioner.csvio import export_users, import_users
from provisioner.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InvalidInput,
    NotFoundError,
    Problem,
)
from provisioner.store import queries as q
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.store.schema import profiles, user_attributes, users

from .conftest import FakeClock
from .helpers import (
    GOOD_PASSWORD,
    OTHER_PASSWORD,
    cheap_argon2,
    insert_user_copy,
    user_row,
    while_another_writer_holds,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture(autouse=True)
def _fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_argon2(monkeypatch)


def _agent(username: str = "alice", **extra: Any) -> dict[str, Any]:
    return {
        "username": username,
        "full_name": f"{username.title()} Agent",
        "email": f"{username.lower()}@example.com",
        "profile": "agents",
        **extra,
    }


def test_add_user_defaults_and_stored_digests(accounts: Accounts, clock: FakeClock) -> None:
    """A new user gets the lowest free extension, the Voice defaults, and only SIP digests."""
    created = accounts.add_user(_agent())
    assert created.sip_secret is not None
    user = accounts.get_user("alice")
    assert user.extension == "101"  # root holds 100
    assert user.role == "user"
    assert user.profile == "agents"
    assert (user.voice.transport, user.voice.nat, user.voice.codecs) == (
        "udp",
        "no",
        ("ulaw", "alaw"),
    )
    assert (user.voice.context, user.voice.video) == ("from-sip", "no")
    assert (user.log_level, user.messenger_sound, user.toast_position) == (None, True, "top-right")
    assert user.created_at == user.updated_at == clock.now
    assert not user.disabled
    assert user.deleted_at is None
    assert not user.has_apikey

    row = user_row(accounts.engine, "alice")
    ha1 = f"alice:asterisk:{created.sip_secret}".encode()
    assert row.sip_md5 == hashlib.md5(ha1).hexdigest()
    assert row.sip_sha256 == hashlib.sha256(ha1).hexdigest()
    assert created.sip_secret not in repr(tuple(row))
    assert row.password_hash is None


def test_given_extension_and_secret_and_voice(accounts: Accounts) -> None:
    """A given extension, SIP secret and Voice settings are stored as given; no secret is shown."""
    created = accounts.add_user(
        _agent(
            extension="4242",
            sip_secret="Given-Secret-1",
            transport="wss",
            nat="force_rport",
            codecs="opus,g722",
            context="internal",
            call_group="1,3-5",
            pickup_group="2",
            video="always",
            description="night shift",
            attributes={"team": "blue"},
        )
    )
    assert created.sip_secret is None
    user = accounts.get_user("ALICE")
    assert user.extension == "4242"
    assert user.voice.codecs == ("opus", "g722")
    assert (user.voice.transport, user.voice.nat, user.voice.video) == (
        "wss",
        "force_rport",
        "always",
    )
    assert (user.voice.call_group, user.voice.pickup_group) == ("1,3-5", "2")
    assert user.voice.context == "internal"
    assert user.description == "night shift"
    assert user.attributes == {"team": "blue"}
    row = user_row(accounts.engine, "alice")
    assert row.sip_md5 == hashlib.md5(b"alice:asterisk:Given-Secret-1").hexdigest()


def test_lowest_free_extension_fills_gaps(accounts: Accounts) -> None:
    """Extensions are allocated lowest free first, reusing a purged user's number."""
    for name in ("a1", "a2", "a3"):
        accounts.add_user(_agent(name))
    assert [accounts.get_user(n).extension for n in ("a1", "a2", "a3")] == ["101", "102", "103"]
    accounts.add_user(_agent("given", extension="104"))
    accounts.delete(["a2"])
    assert accounts.add_user(_agent("a4")).user.extension == "105"  # deleted a2 keeps 102
    accounts.purge(["a2"])
    assert accounts.add_user(_agent("a5")).user.extension == "102"


def test_an_extension_with_a_leading_zero_leaves_the_number_without_it_free(
    accounts: Accounts,
) -> None:
    """Extensions are dialled digits, so a user on 0101 does not keep 101 from being allocated
    (nor a user on 102 keep 0102 from being given): they are different extensions."""
    accounts.add_user(_agent("zero", extension="0101"))
    assert accounts.add_user(_agent("alice")).user.extension == "101"
    assert accounts.add_user(_agent("bob")).user.extension == "102"
    assert accounts.add_user(_agent("carol", extension="0102")).user.extension == "0102"


def test_extension_range_exhausted(accounts: Accounts, clock: FakeClock, policy: Policy) -> None:
    """When every number of the range is taken the add fails naming the extension and range."""
    small = Accounts(accounts.engine, replace(policy, ext_first=100, ext_last=101), clock)
    small.add_user(_agent("a1"))
    with pytest.raises(ConflictError) as info:
        small.add_user(_agent("a2"))
    assert info.value.problems[0].field == "extension"
    assert "no free extension left in 100-101" in info.value.problems[0].rule
    with pytest.raises(NotFoundError):
        accounts.get_user("a2")


def test_username_unique_case_insensitively_and_reserved_until_purge(accounts: Accounts) -> None:
    """A username taken in any case, even by a deleted user, is refused until purged."""
    accounts.add_user(_agent("Alice"))
    with pytest.raises(ConflictError, match=r"username: is already taken \(ignoring case"):
        accounts.add_user(_agent("aLiCe"))
    accounts.delete(["alice"])
    with pytest.raises(ConflictError, match=r"username: is already taken"):
        accounts.add_user(_agent("ALICE"))
    accounts.purge(["alice"])
    assert accounts.add_user(_agent("ALICE")).user.username == "ALICE"


def test_extension_unique_and_reserved_by_deleted_user(accounts: Accounts) -> None:
    """A given extension already used, even by a deleted user, is refused with the owner
    named, and a deleted owner said to be one (no listing shows it) until purged, on an
    add, an edit and an import alike."""
    accounts.add_user(_agent("alice", extension="500"))
    accounts.add_user(_agent("carol", extension="501"))
    accounts.delete(["alice"])
    deleted = "500 is already used by user alice (in deleted members: purge it to free 500)"
    with pytest.raises(ConflictError) as info:
        accounts.add_user(_agent("bob", extension="500"))
    assert [(p.field, p.rule) for p in info.value.problems] == [("extension", deleted)]
    with pytest.raises(ConflictError, match=re.escape(f"extension: {deleted}")):
        accounts.edit_user("carol", {"extension": "500"})
    with pytest.raises(InvalidInput, match=re.escape(f"line 2: extension: {deleted}")):
        import_users(accounts, "username,extension\ncarol,500\n")
    with pytest.raises(ConflictError, match=r"501 is already used by user carol$"):
        accounts.add_user(_agent("bob", extension="501"))
    with pytest.raises(NotFoundError):
        accounts.get_user("bob")
    accounts.purge(["alice"])
    assert accounts.edit_user("carol", {"extension": "500"}).user.extension == "500"


def test_profile_required_for_user_and_must_exist(accounts: Accounts) -> None:
    """Role user needs an existing profile; an admin needs none."""
    with pytest.raises(InvalidInput, match=r"profile: is required for role user"):
        accounts.add_user(_agent(profile=None))
    with pytest.raises(InvalidInput, match=r"profile: must name an existing profile \('ghosts'"):
        accounts.add_user(_agent(profile="ghosts"))
    admin = accounts.add_user({**_agent("boss", profile=None), "role": "admin"}).user
    assert admin.role == "admin"
    assert admin.profile is None
    assert [u.username for u in accounts.list_users()] == ["root", "boss"]


def test_all_problems_of_an_add_are_reported(accounts: Accounts) -> None:
    """An add with several bad fields reports each field and rule, and stores nothing."""
    with pytest.raises(InvalidInput) as info:
        accounts.add_user(
            {
                "username": "bad name",
                "email": "nope",
                "codecs": "mp3",
                "profile": "ghosts",
                "password": "weak",
            }
        )
    fields = [p.field for p in info.value.problems]
    assert set(fields) == {"full_name", "username", "email", "codecs", "profile", "password"}
    assert [u.username for u in accounts.list_users(deleted=None)] == ["root"]


def test_an_empty_required_field_is_one_problem_not_two(accounts: Accounts) -> None:
    """An add (or an import row) with empty username, full name and email reports each of
    them once, as required, not also as badly formed."""
    with pytest.raises(InvalidInput) as info:
        accounts.add_user({"username": "", "full_name": "", "email": "", "profile": "agents"})
    assert info.value.problems == (
        Problem("username", "is required"),
        Problem("full_name", "is required"),
        Problem("email", "is required"),
    )
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, "username,full_name,email,profile\nbob,,,agents\n")
    assert info.value.problems == (
        Problem("full_name", "is required", 2),
        Problem("email", "is required", 2),
    )


def test_first_user_must_be_admin(engine: Engine, policy: Policy, clock: FakeClock) -> None:
    """In an empty store the first user must be an admin, and becomes id 1."""
    acc = Accounts(engine, policy, clock)
    acc.add_profile("agents")
    with pytest.raises(InvalidInput, match=r"role: the first user must be an admin"):
        acc.add_user(_agent())
    root = acc.add_user({**_agent("root", profile=None), "role": "admin"}).user
    assert root.id == 1


def test_first_admin_is_the_lowest_id(
    engine: Engine, backend: str, policy: Policy, clock: FakeClock
) -> None:
    """The lowest id is the protected first admin, even when a rolled-back insert used id 1."""
    acc = Accounts(engine, policy, clock)
    text = "username,role,full_name,email,disabled\nroot,admin,Root,root@example.com,no\n"
    import_users(acc, text, dry_run=True)  # rolled back; PostgreSQL and MariaDB keep the ids used
    import_users(acc, text)
    root = acc.get_user("root")
    if backend != "sqlite":
        assert root.id > 1
    acc.add_user({**_agent("boss", profile=None), "role": "admin"})
    for action in (acc.disable, acc.delete, acc.purge):
        with pytest.raises(ForbiddenError, match=r"root is the first admin and can never be"):
            action(["root"])
    with pytest.raises(InvalidInput, match=r"disabled: the first admin can never be disabled"):
        import_users(acc, text.replace(",no", ",yes"))
    assert acc.disable(["boss"]).done == ["boss"]
    assert not acc.get_user("root").disabled


def test_first_admin_is_protected(accounts: Accounts) -> None:
    """The first admin can never be disabled, deleted, purged or demoted."""
    for action in (accounts.disable, accounts.delete, accounts.purge):
        with pytest.raises(ForbiddenError, match=r"first admin and can never be"):
            action(["root"])
    with pytest.raises(ForbiddenError, match=r"role: cannot be changed"):
        accounts.edit_user("root", {"role": "user", "profile": "agents"})
    root = accounts.get_user("root")
    assert (root.role, root.disabled, root.deleted_at) == ("admin", False, None)


def test_password_stored_as_argon2_with_policy(accounts: Accounts, clock: FakeClock) -> None:
    """A good password is stored only as argon2 with its reset time; a weak one is refused
    while the security suite is on."""
    with pytest.raises(InvalidInput, match=r"password: must be at least 8 characters"):
        accounts.add_user(_agent(password="password"))
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    row = user_row(accounts.engine, "alice")
    assert row.password_hash.startswith("$argon2id$")
    assert GOOD_PASSWORD not in row.password_hash
    assert credentials.verify_password(row.password_hash, GOOD_PASSWORD)
    assert row.last_password_reset_at == clock.now

    clock.advance(minutes=5)
    with pytest.raises(InvalidInput, match=r"password: must be at least 8"):
        accounts.set_password("alice", "short")
    accounts.set_password("alice", OTHER_PASSWORD)
    row = user_row(accounts.engine, "alice")
    assert credentials.verify_password(row.password_hash, OTHER_PASSWORD)
    assert row.last_password_reset_at == clock.now

    # With the security suite off a simple password is accepted.
    lax = Accounts(accounts.engine, replace(accounts.policy, password_policy=False), clock)
    lax.set_password("alice", "simple")
    assert credentials.verify_password(user_row(accounts.engine, "alice").password_hash, "simple")


def test_edit_changes_fields_and_updated_at(accounts: Accounts, clock: FakeClock) -> None:
    """An edit stores the new values, bumps updated_at only, and re-reads them from the store."""
    accounts.add_user(_agent(attributes={"team": "blue", "floor": "2"}))
    created_at = clock.now
    clock.advance(minutes=10)
    accounts.edit_user(
        "alice",
        {
            "full_name": "Alice Smith",
            "email": "alice.smith@example.com",
            "codecs": "g722",
            "nat": "comedia",
            "log_level": "debug",
            "messenger_sound": "off",
            "toast_position": "bottom-center",
            "attributes": {"team": "red"},
            "avatar": PNG,
        },
    )
    user = accounts.get_user("alice")
    assert (user.full_name, user.email) == ("Alice Smith", "alice.smith@example.com")
    assert user.voice.codecs == ("g722",)
    assert user.voice.nat == "comedia"
    assert (user.log_level, user.messenger_sound, user.toast_position) == (
        "debug",
        False,
        "bottom-center",
    )
    assert user.attributes == {"team": "red"}
    assert user.avatar_type == "image/png"
    assert user_row(accounts.engine, "alice").avatar == PNG
    assert user.created_at == created_at
    assert user.updated_at == clock.now

    edited_at = clock.now
    clock.advance(minutes=1)
    accounts.edit_user("alice", {"full_name": "Alice Smith"})  # no change: no new timestamp
    assert accounts.get_user("alice").updated_at == edited_at


def test_an_empty_attribute_value_means_no_such_attribute_on_add_and_edit(
    accounts: Accounts,
) -> None:
    """An attribute given an empty value is not stored by an add and is removed by an edit,
    as an edit's ``KEY=`` and an empty ``attr:`` cell do; an export then re-imports as is."""
    accounts.add_user(_agent(attributes={"team": "", "site": "north"}))
    assert accounts.get_user("alice").attributes == {"site": "north"}
    accounts.edit_user("alice", {"attributes": {"site": "", "desk": "7"}})
    assert accounts.get_user("alice").attributes == {"desk": "7"}
    exported = io.StringIO()
    export_users(accounts.list_users(), exported)
    assert import_users(accounts, exported.getvalue()).updated == []


def test_attribute_keys_are_one_key_ignoring_case_on_every_backend(accounts: Accounts) -> None:
    """Attribute keys are unique ignoring case on every database (MariaDB's collation makes
    them so): two keys of one change that differ only in case are refused on field
    attributes (an add, an edit, a CSV header), and a key given in another case than the
    stored one sets it (keeping its spelling), instead of a clash reported as a busy
    extension; an export of users spelling one key differently re-imports as is."""
    both = {"Team": "x", "team": "y"}
    rule = "keys 'Team' and 'team' are one key (attribute keys are unique ignoring case)"
    with pytest.raises(InvalidInput) as info:
        accounts.add_user(_agent(attributes=both))
    assert info.value.problems == (Problem("attributes", rule),)
    accounts.add_user(_agent(attributes={"Team": "x"}))
    with pytest.raises(InvalidInput) as info:
        accounts.edit_user("alice", {}, attribute_changes=both)
    assert info.value.problems == (Problem("attributes", rule),)
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, "username,attr:Team,attr:team\nalice,a,b\n")
    assert info.value.problems == (Problem("attr:team", "repeats column attr:Team", 1),)
    accounts.edit_user("alice", {}, attribute_changes={"team": "y"})
    assert accounts.get_user("alice").attributes == {"Team": "y"}
    import_users(accounts, "username,attr:TEAM\nalice,z\n")
    assert accounts.get_user("alice").attributes == {"Team": "z"}
    accounts.add_user(_agent("bob", attributes={"team": "b"}))
    exported = io.StringIO()
    export_users(accounts.list_users(), exported)
    assert exported.getvalue().splitlines()[0].endswith(",attr:Team")
    assert import_users(accounts, exported.getvalue()).updated == []
    assert accounts.get_user("bob").attributes == {"team": "b"}
    accounts.edit_user("alice", {}, attribute_changes={"team": ""})
    assert accounts.get_user("alice").attributes == {}


def test_edit_refuses_immutable_fields_and_bad_values(accounts: Accounts) -> None:
    """Role and username cannot change (case aside); bad values name their rule."""
    accounts.add_user(_agent())
    with pytest.raises(ForbiddenError, match=r"username: cannot be changed after creation"):
        accounts.edit_user("alice", {"username": "alicia"})
    with pytest.raises(ForbiddenError, match=r"role: cannot be changed after creation"):
        accounts.edit_user("alice", {"role": "admin"})
    accounts.edit_user("alice", {"username": "ALICE", "description": "same name"})
    with pytest.raises(InvalidInput) as info:
        accounts.edit_user("alice", {"email": "x", "transport": "pigeon", "profile": ""})
    assert {p.field for p in info.value.problems} == {"email", "transport", "profile"}
    user = accounts.get_user("alice")
    assert (user.username, user.role, user.description) == ("alice", "user", "same name")
    assert user.voice.transport == "udp"


def test_edit_extension_conflict_and_deleted_user(accounts: Accounts) -> None:
    """An edit to a taken extension is refused; a deleted user must be restored before editing."""
    accounts.add_user(_agent("alice"))
    accounts.add_user(_agent("bob"))
    with pytest.raises(ConflictError, match=r"extension: 101 is already used by user alice"):
        accounts.edit_user("bob", {"extension": "101"})
    accounts.edit_user("bob", {"extension": "777"})
    assert accounts.get_user("bob").extension == "777"
    accounts.delete(["bob"])
    with pytest.raises(ForbiddenError, match=r"restore it before editing"):
        accounts.edit_user("bob", {"full_name": "Bob B"})
    accounts.restore(["bob"])
    accounts.edit_user("bob", {"full_name": "Bob B"})
    assert accounts.get_user("bob").full_name == "Bob B"


def test_a_deleted_user_gets_no_new_password_or_sip_secret(accounts: Accounts) -> None:
    """Setting a password or rotating the SIP secret of a deleted user is refused (restore
    it first), as an edit is; after a restore both work."""
    accounts.add_user(_agent("bob"))
    accounts.delete(["bob"])
    with pytest.raises(ForbiddenError, match=r"bob is in deleted members; restore it first"):
        accounts.set_password("bob", OTHER_PASSWORD)
    with pytest.raises(ForbiddenError, match=r"restore it first"):
        accounts.rotate_sip_secret("bob")
    accounts.restore(["bob"])
    accounts.set_password("bob", OTHER_PASSWORD)
    assert accounts.rotate_sip_secret("bob", "Chosen-Secret-9") == "Chosen-Secret-9"


def test_disable_enable_delete_restore_and_list_filters(
    accounts: Accounts, clock: FakeClock
) -> None:
    """State changes are reversible and list filters by role, profile, state and deleted."""
    accounts.add_profile("supervisors")
    for name in ("alice", "bob", "carol"):
        accounts.add_user(_agent(name))
    accounts.add_user(_agent("sue", profile="supervisors"))
    clock.advance(minutes=1)
    assert accounts.disable(["alice", "bob"]).done == ["alice", "bob"]
    accounts.delete(["carol"])

    def names(**kw: Any) -> list[str]:
        return [u.username for u in accounts.list_users(**kw)]

    assert names() == ["root", "alice", "bob", "sue"]
    assert names(deleted=True) == ["carol"]
    assert names(state="disabled") == ["alice", "bob"]
    assert names(state="active") == ["root", "sue"]
    assert names(role="admin") == ["root"]
    assert names(profile="supervisors") == ["sue"]
    assert accounts.get_user("carol").deleted_at == clock.now
    assert accounts.state(accounts.get_user("carol")) == "deleted"

    accounts.enable(["alice"])
    accounts.restore(["carol"])
    assert names(state="disabled") == ["bob"]
    assert accounts.get_user("carol").deleted_at is None
    assert accounts.get_user("alice").updated_at == clock.now


def test_bulk_actions_are_all_or_nothing(accounts: Accounts) -> None:
    """A bulk action naming a missing user or the first admin changes no one."""
    accounts.add_user(_agent("alice"))
    with pytest.raises(NotFoundError, match=r"user 'ghost' not found"):
        accounts.disable(["alice", "ghost"])
    with pytest.raises(ForbiddenError):
        accounts.delete(["alice", "root"])
    alice = accounts.get_user("alice")
    assert not alice.disabled
    assert alice.deleted_at is None
    with pytest.raises(InvalidInput, match=r"name at least one user"):
        accounts.enable([])


def test_a_user_named_twice_in_a_bulk_action_is_acted_on_and_reported_once(
    accounts: Accounts,
) -> None:
    """A bulk action naming one user twice, in any case, changes it once and names it once."""
    accounts.add_user(_agent("alice"))
    accounts.add_user(_agent("bob"))
    assert accounts.disable(["alice", "ALICE", "bob", "alice"]).done == ["alice", "bob"]
    assert accounts.delete(["bob", "Bob"]).done == ["bob"]
    assert accounts.purge(["bob", "bob"]).done == ["bob"]
    assert [u.username for u in accounts.list_users(state="disabled")] == ["alice"]


def test_purge_only_deleted_and_removes_attributes(accounts: Accounts) -> None:
    """Only deleted users can be purged; purging removes the user and its attributes for good."""
    alice = accounts.add_user(_agent(attributes={"team": "blue"})).user
    with pytest.raises(ForbiddenError, match=r"only deleted users can be purged"):
        accounts.purge(["alice"])
    accounts.delete(["alice"])
    assert accounts.purge(["alice"]).done == ["alice"]
    with pytest.raises(NotFoundError):
        accounts.get_user("alice")
    with accounts.engine.connect() as conn:
        left = conn.execute(
            select(func.count())
            .select_from(user_attributes)
            .where(user_attributes.c.user_id == alice.id)
        ).scalar_one()
    assert left == 0


def test_lockout_after_failures_and_auto_unlock(accounts: Accounts, clock: FakeClock) -> None:
    """Max failed logins lock the account, even to the right password, until lock_minutes pass."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    for _ in range(2):
        with pytest.raises(AuthenticationError, match=r"invalid username or password"):
            accounts.login("alice", "wrong")
    assert accounts.get_user("alice").failed_logins == 2
    with pytest.raises(AuthenticationError, match=r"locked .* contact an administrator"):
        accounts.login("alice", "wrong")
    user = accounts.get_user("alice")
    assert user.locked_at == clock.now
    assert accounts.state(user) == "locked"
    assert [u.username for u in accounts.list_users(state="locked")] == ["alice"]

    clock.advance(minutes=14, seconds=59)
    with pytest.raises(AuthenticationError, match=r"contact an administrator"):
        accounts.login("alice", GOOD_PASSWORD)
    clock.advance(seconds=1)
    assert accounts.state(accounts.get_user("alice")) == "active"
    assert accounts.login("alice", GOOD_PASSWORD).username == "alice"
    user = accounts.get_user("alice")
    assert user.failed_logins == 0
    assert user.locked_at is None


def test_failed_logins_more_than_lock_minutes_apart_do_not_add_up_to_a_lock(
    accounts: Accounts, clock: FakeClock
) -> None:
    """A failed login lock_minutes or more after the one before counts afresh: failures
    spread over a year never lock, while max_failed_logins within the window still do."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    for _ in range(5):
        with pytest.raises(AuthenticationError, match=r"^invalid username or password$"):
            accounts.login("alice", "wrong")
        clock.advance(minutes=15)
    assert accounts.state(accounts.get_user("alice")) == "active"
    assert accounts.get_user("alice").failed_logins == 1
    clock.advance(minutes=60 * 24 * 365)
    for _ in range(2):
        clock.advance(minutes=14, seconds=59)
        with pytest.raises(AuthenticationError, match=r"^invalid username or password$"):
            accounts.login("alice", "wrong")
    with pytest.raises(AuthenticationError, match=r"locked .* contact an administrator"):
        accounts.login("alice", "wrong")
    assert accounts.state(accounts.get_user("alice")) == "locked"


def test_admin_unlock_and_lock_without_expiry(
    accounts: Accounts, clock: FakeClock, policy: Policy
) -> None:
    """With lock_minutes 0 a lock never expires; an admin unlock lets the user in at once."""
    strict = Accounts(accounts.engine, replace(policy, lock_minutes=0), clock)
    strict.add_user(_agent(password=GOOD_PASSWORD))
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            strict.login("alice", "wrong")
    clock.advance(minutes=60 * 24 * 365)
    with pytest.raises(AuthenticationError, match=r"contact an administrator"):
        strict.login("alice", GOOD_PASSWORD)
    strict.unlock(["alice"])
    user = strict.get_user("alice")
    assert user.locked_at is None
    assert user.failed_logins == 0
    assert strict.login("alice", GOOD_PASSWORD).username == "alice"


def test_success_resets_failures_and_refusals(accounts: Accounts) -> None:
    """A good login clears earlier failures; unknown, disabled and deleted users are refused."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    with pytest.raises(AuthenticationError):
        accounts.login("alice", "wrong")
    accounts.login("ALICE", GOOD_PASSWORD)
    assert accounts.get_user("alice").failed_logins == 0
    with pytest.raises(AuthenticationError, match=r"invalid username or password"):
        accounts.login("ghost", GOOD_PASSWORD)
    with pytest.raises(AuthenticationError, match=r"invalid username or password"):
        accounts.login("root", "")  # no password set
    accounts.disable(["alice"])
    with pytest.raises(AuthenticationError, match=r"disabled; contact an administrator"):
        accounts.login("alice", GOOD_PASSWORD)
    accounts.enable(["alice"])
    accounts.delete(["alice"])
    with pytest.raises(AuthenticationError, match=r"invalid username or password"):
        accounts.login("alice", GOOD_PASSWORD)


def test_a_disabled_account_is_named_only_to_whoever_knows_its_password(
    accounts: Accounts,
) -> None:
    """A login to a disabled account with a wrong password is refused as any wrong
    password is (a guess does not learn the account is disabled), and with the right one
    says it is disabled."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    accounts.disable(["alice"])
    with pytest.raises(AuthenticationError, match=r"^invalid username or password$"):
        accounts.login("alice", "wrong")
    with pytest.raises(AuthenticationError, match=r"disabled; contact an administrator"):
        accounts.login("alice", GOOD_PASSWORD)


def test_wrong_passwords_to_a_disabled_account_lock_it_as_any_account(
    accounts: Accounts,
) -> None:
    """Wrong passwords to a disabled account count and lock it at the limit, after which
    even the right password only says locked: a disabled account is no unlimited oracle."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    accounts.disable(["alice"])
    for _ in range(accounts.policy.max_failed_logins):
        with pytest.raises(AuthenticationError):
            accounts.login("alice", "wrong")
    assert accounts.get_user("alice").failed_logins == accounts.policy.max_failed_logins
    with pytest.raises(AuthenticationError, match=r"^account is locked"):
        accounts.login("alice", GOOD_PASSWORD)


def test_sip_secret_rotation(accounts: Accounts, clock: FakeClock) -> None:
    """Rotating replaces the stored digests with those of the new secret, generated or given."""
    first = accounts.add_user(_agent()).sip_secret
    before = user_row(accounts.engine, "alice")
    clock.advance(minutes=1)
    new = accounts.rotate_sip_secret("alice")
    assert new != first
    after = user_row(accounts.engine, "alice")
    assert after.sip_md5 == hashlib.md5(f"alice:asterisk:{new}".encode()).hexdigest()
    assert after.sip_md5 != before.sip_md5
    assert after.updated_at == clock.now
    assert accounts.rotate_sip_secret("alice", "Chosen-Secret-9") == "Chosen-Secret-9"
    row = user_row(accounts.engine, "alice")
    assert row.sip_sha256 == hashlib.sha256(b"alice:asterisk:Chosen-Secret-9").hexdigest()
    with pytest.raises(InvalidInput, match=r"sip_secret: must be 8-128 printable ASCII"):
        accounts.rotate_sip_secret("alice", "a b")


def test_apikey_generate_replace_remove(accounts: Accounts) -> None:
    """An API key is stored hashed, a new one replaces the old, and remove clears it."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    row = user_row(accounts.engine, "alice")
    assert row.apikey_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in repr(tuple(row))
    assert accounts.get_user("alice").has_apikey
    second = accounts.generate_apikey("alice")
    assert second != key
    assert user_row(accounts.engine, "alice").apikey_hash == credentials.hash_apikey(second)
    accounts.remove_apikey("alice")
    row = user_row(accounts.engine, "alice")
    assert row.apikey_hash is None
    assert row.apikey_created_at is None
    assert not accounts.get_user("alice").has_apikey
    accounts.delete(["alice"])
    with pytest.raises(ForbiddenError, match=r"restore it first"):
        accounts.generate_apikey("alice")


def test_removing_an_api_key_a_user_does_not_hold_changes_nothing(
    accounts: Accounts, clock: FakeClock
) -> None:
    """Removing the API key of a user without one (never given, or deleted with the user)
    leaves the row as it was, updated_at included, as any other change that changes nothing."""
    accounts.add_user(_agent())
    accounts.delete(["alice"])
    before = user_row(accounts.engine, "alice")
    clock.advance(minutes=5)
    accounts.remove_apikey("alice")
    assert user_row(accounts.engine, "alice") == before


def test_delete_revokes_the_apikey_and_restore_brings_none_back(accounts: Accounts) -> None:
    """Deleting a user clears its API key (hash and creation time): the user restored has
    no key, and the old key names no one."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    accounts.delete(["alice"])
    row = user_row(accounts.engine, "alice")
    assert (row.apikey_hash, row.apikey_created_at) == (None, None)
    accounts.restore(["alice"])
    row = user_row(accounts.engine, "alice")
    assert (row.apikey_hash, row.apikey_created_at) == (None, None)
    assert not accounts.get_user("alice").has_apikey
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(key)


def test_authenticate_apikey_accepts_a_live_users_key(accounts: Accounts) -> None:
    """A live user's current key authenticates as that user; the key it replaced does not."""
    accounts.add_user(_agent())
    accounts.add_user(_agent("bob"))
    old = accounts.generate_apikey("alice")
    key = accounts.generate_apikey("alice")
    bobs = accounts.generate_apikey("bob")
    assert accounts.authenticate_apikey(key).username == "alice"
    assert accounts.authenticate_apikey(bobs).username == "bob"
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(old)


def test_authenticate_apikey_refuses_an_unknown_key(accounts: Accounts) -> None:
    """A key no user holds (a made-up one, an empty one, a stored hash given as the key)
    is refused with the same message."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    stored = user_row(accounts.engine, "alice").apikey_hash
    for guess in (credentials.generate_apikey(), "", stored, key + "x"):
        with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
            accounts.authenticate_apikey(guess)


def test_authenticate_apikey_refuses_a_key_of_bytes_that_were_not_text(accounts: Accounts) -> None:
    """A key holding bytes that were not UTF-8 where it was read (Python's surrogate
    escapes, as a Latin-1 terminal or a front end's ``surrogateescape`` gives them) is
    refused as any unknown key is, not an encoding error."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    for guess in (key + "\udcff", "\udce9", "\ud800"):
        with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
            accounts.authenticate_apikey(guess)


def test_authenticate_apikey_refuses_a_disabled_users_key_until_enabled(
    accounts: Accounts,
) -> None:
    """Disabling keeps the key but refuses it, saying disabled (only to whoever holds the
    key, as a login says so only to whoever knows the password); enabling accepts it again."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    accounts.disable(["alice"])
    assert accounts.get_user("alice").has_apikey
    with pytest.raises(AuthenticationError, match=r"^account is disabled; contact an admin"):
        accounts.authenticate_apikey(key)
    accounts.enable(["alice"])
    assert accounts.authenticate_apikey(key).username == "alice"


def test_authenticate_apikey_refuses_a_deleted_users_key(accounts: Accounts) -> None:
    """A deleted user's key is refused as an unknown key is, even one a store written
    before delete revoked keys still holds, and restoring that user clears it."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    accounts.delete(["alice"])
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(key)
    # A deleted row that kept its hash (deleted before delete revoked keys).
    with accounts.engine.begin() as conn:
        conn.execute(
            update(users)
            .where(users.c.username == "alice")
            .values(apikey_hash=credentials.hash_apikey(key))
        )
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(key)
    accounts.restore(["alice"])  # ... and its restore brings that key back neither
    assert not accounts.get_user("alice").has_apikey
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(key)


def test_authenticate_apikey_refuses_a_removed_key(accounts: Accounts) -> None:
    """A key removed with remove_apikey is refused as an unknown key is."""
    accounts.add_user(_agent())
    key = accounts.generate_apikey("alice")
    accounts.remove_apikey("alice")
    with pytest.raises(AuthenticationError, match=r"^invalid API key$"):
        accounts.authenticate_apikey(key)


def test_avatar_checked_by_content(accounts: Accounts) -> None:
    """A text file is refused as avatar whatever its name; a GIF is stored with its type."""
    with pytest.raises(InvalidInput, match=r"avatar: must be a PNG, JPG, GIF or SVG"):
        accounts.add_user(_agent(avatar=b"just text, named avatar.png"))
    accounts.add_user(_agent(avatar=b"GIF87a" + b"\x00" * 10))
    assert accounts.get_user("alice").avatar_type == "image/gif"


def test_profiles_unique_and_listed(accounts: Accounts) -> None:
    """Profile names are unique; profiles list by name with their descriptions."""
    accounts.add_profile("billing", "Billing desk")
    with pytest.raises(ConflictError, match=r"name: profile 'agents' already exists"):
        accounts.add_profile("agents")
    assert [(p.name, p.description) for p in accounts.list_profiles()] == [
        ("agents", "Contact-center agents"),
        ("billing", "Billing desk"),
    ]


def test_unknown_user_is_not_found(accounts: Accounts) -> None:
    """Acting on a user that does not exist names it in a not-found error."""
    with pytest.raises(NotFoundError, match=r"user 'ghost' not found"):
        accounts.edit_user("ghost", {"full_name": "G"})
    with pytest.raises(NotFoundError):
        accounts.rotate_sip_secret("ghost")


def _names_no_user(accounts: Accounts, name: str) -> None:
    """Assert that ``name`` names no user: not found for reading, editing, disabling,
    unlocking, deleting, a new SIP secret or an API key, and refused at login."""
    with pytest.raises(NotFoundError):
        accounts.get_user(name)
    with pytest.raises(NotFoundError):
        accounts.edit_user(name, {"full_name": "Someone Else"})
    for action in (accounts.disable, accounts.unlock, accounts.delete):
        with pytest.raises(NotFoundError):
            action([name])
    with pytest.raises(NotFoundError):
        accounts.set_password(name, OTHER_PASSWORD)
    with pytest.raises(NotFoundError):
        accounts.generate_apikey(name)
    with pytest.raises(AuthenticationError):
        accounts.login(name, GOOD_PASSWORD)


@pytest.mark.parametrize("name", ["alice ", "ALICE   "])
def test_username_with_trailing_spaces_names_no_user(accounts: Accounts, name: str) -> None:
    """A username with trailing spaces names no user on any database (MariaDB's PAD SPACE
    collation included) for reading, editing, state changes, secrets and login."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    _names_no_user(accounts, name)
    alice = accounts.get_user("ALICE")
    assert (alice.full_name, alice.deleted_at, alice.has_apikey) == ("Alice Agent", None, False)
    assert accounts.login("alice", GOOD_PASSWORD).username == "alice"


KELVIN = "\u212aate"  # KELVIN SIGN + "ate": Python's lower() makes it "kate"

#: MariaDB's own default collation (case-insensitive, PAD SPACE) for the tables made next.
CASE_INSENSITIVE = "ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"


@pytest.fixture
def folding_accounts(
    db_url: str, backend: str, policy: Policy, clock: FakeClock
) -> Iterator[Accounts]:
    """Accounts as :func:`accounts` gives, over a store whose MariaDB tables take MariaDB's
    own default collation (``utf8mb4_general_ci``: it ignores case and accents)."""
    engine = open_engine(db_url)
    try:
        if backend == "mariadb":
            with engine.begin() as conn:
                conn.execute(text(CASE_INSENSITIVE))
        upgrade(engine)
        acc = Accounts(engine, policy, clock)
        acc.add_profile("agents")
        acc.add_user({"username": "root", "role": "admin", "full_name": "R", "email": "r@x.com"})
        yield acc
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", [KELVIN, "\u212aATE", "k\u0101te", "K\u00c4TE"])
def test_a_name_that_folds_to_another_users_names_no_user(
    folding_accounts: Accounts, name: str
) -> None:
    """A name with a non-ASCII letter that lowercases or collates to another user's (the
    KELVIN SIGN lowers to ``k``; MariaDB's default collation equates ``a``, ``\u0101`` and
    ``\u00c4``) names no user on any database: it is not found for reading, editing, state
    changes, secrets, registration status and login, and a CSV row naming it is a new user
    the username rule refuses, not an edit of ``kate``; ``KATE`` still finds ``kate``."""
    from provisioner.store.registrations import status_rows

    accounts = folding_accounts
    accounts.add_user(_agent("kate", password=GOOD_PASSWORD))
    _names_no_user(accounts, name)
    with accounts.transaction() as conn:
        assert status_rows(conn, [name]) == []
        assert q.extensions_by_username(conn, [name]) == {}
    with pytest.raises(InvalidInput) as imported:
        import_users(accounts, f"username,full_name\n{name},Someone Else\n")
    assert ("username", 2) in [(p.field, p.line) for p in imported.value.problems]
    kate = accounts.get_user("KATE")
    assert (kate.full_name, kate.disabled, kate.deleted_at) == ("Kate Agent", False, None)
    assert accounts.login("kate", GOOD_PASSWORD).username == "kate"


def test_cli_lookups_by_a_name_that_folds_to_another_users_find_no_user(
    accounts: Accounts,
) -> None:
    """``user show``, ``status`` and ``--as`` with the KELVIN SIGN in place of ``k`` name no
    user (exit 3, and exit 5 on field actor), on every database."""
    from provisioner.cli import main

    accounts.add_user({"username": "kboss", "role": "admin", "full_name": "K", "email": "k@x.com"})
    url = accounts.engine.url.render_as_string(hide_password=False)
    kelvin_boss = "\u212aboss"
    assert main(["--store-url", url, "user", "show", kelvin_boss]) == 3
    assert main(["--store-url", url, "status", kelvin_boss]) == 3
    argv = ["--store-url", url, "--as", kelvin_boss, "user", "edit", "root", "--nat", "yes"]
    assert main(argv) == 5
    assert accounts.get_user("root").voice.nat == "no"


def test_extension_with_trailing_space_has_no_owner(accounts: Accounts) -> None:
    """An extension with a trailing space is owned by no user on any database."""
    accounts.add_user(_agent(extension="150"))
    with accounts.transaction() as conn:
        assert (q.extension_owner(conn, "150"), q.extension_owner(conn, "150 ")) == ("alice", None)


def test_profile_name_the_database_cannot_tell_apart_is_a_conflict(
    folding_accounts: Accounts, backend: str
) -> None:
    """A profile name the store's collation holds equal to an existing one (MariaDB's default
    ignores case) is a conflict naming that profile; elsewhere it is a profile of its own."""
    accounts = folding_accounts
    if backend == "mariadb":
        with pytest.raises(ConflictError, match="profile 'agents' exists and the database"):
            accounts.add_profile("Agents")
    else:
        accounts.add_profile("Agents")
    with accounts.transaction() as conn:
        assert q.profile_by_name(conn, "AGENTS") is None


def test_extension_the_database_holds_equal_is_a_conflict(accounts: Accounts, backend: str) -> None:
    """An extension the store's unique key holds equal to another user's (MariaDB: ``'150 '``
    written by another writer) is refused as a conflict on field extension when a user is
    added or edited, not as a database error; elsewhere it is free."""
    accounts.add_user(_agent(extension="151"))
    accounts.add_user(_agent("bob", extension="152"))
    with accounts.transaction() as conn:
        conn.execute(update(users).where(users.c.username == "alice").values(extension="150 "))
    rule = "150 is taken by user alice's '150 ', which the database does not tell apart"
    if backend != "mariadb":
        assert accounts.edit_user("bob", {"extension": "150"}).user.extension == "150"
        return
    with pytest.raises(ConflictError) as edited:
        accounts.edit_user("bob", {"extension": "150"})
    assert edited.value.problems == (Problem("extension", rule),)
    with pytest.raises(ConflictError) as added:
        accounts.add_user(_agent("carol", extension="150"))
    assert added.value.problems == (Problem("extension", rule),)
    assert accounts.edit_user("alice", {"extension": "150"}).user.extension == "150"


def test_an_allocated_extension_skips_one_the_database_holds_equal(
    accounts: Accounts, backend: str
) -> None:
    """A user added without an extension gets the lowest number the store's unique key
    lets it take: on MariaDB a ``'101 '`` another writer stored holds 101 (the add gets
    102, not "could not allocate an extension after repeated conflicts"); elsewhere 101
    is free."""
    accounts.add_user(_agent(extension="500"))
    with accounts.transaction() as conn:
        conn.execute(update(users).where(users.c.username == "alice").values(extension="101 "))
    created = accounts.add_user(_agent("bob"))
    assert created.user.extension == ("102" if backend == "mariadb" else "101")


def test_concurrent_edit_to_the_same_extension_is_a_conflict(accounts: Accounts) -> None:
    """An edit that loses a race for an extension to another writer is refused as a conflict
    on field extension naming the holder, never as a raw database error."""
    accounts.add_user(_agent("alice"))
    accounts.add_user(_agent("bob"))

    def hold(conn: Connection) -> None:
        conn.execute(update(users).where(users.c.username == "bob").values(extension="150"))

    raised = while_another_writer_holds(
        accounts, hold, lambda: accounts.edit_user("alice", {"extension": "150"})
    )
    assert isinstance(raised, ConflictError), repr(raised)
    assert raised.problems == (Problem("extension", "150 is already used by user bob"),)
    assert accounts.get_user("alice").extension == "101"


def test_concurrent_add_of_the_same_username_names_the_username(accounts: Accounts) -> None:
    """An add with a given extension that loses a race for its username to another writer is
    refused on field username, not blamed on the extension."""
    accounts.add_user(_agent("alice"))

    def hold(conn: Connection) -> None:
        insert_user_copy(conn, "alice", "dave", "172")

    raised = while_another_writer_holds(
        accounts, hold, lambda: accounts.add_user(_agent("dave", extension="170"))
    )
    assert isinstance(raised, ConflictError), repr(raised)
    assert [p.field for p in raised.problems] == ["username"]


def test_user_edit_attr_keeps_an_attribute_a_concurrent_edit_sets(accounts: Accounts) -> None:
    """``user edit --attr`` racing another edit of the same user's attributes keeps both:
    it reads the stored attributes in its own write, after the other commits."""
    from provisioner.cli import main

    accounts.add_user(_agent("alice", attributes={"floor": "2"}))
    url = accounts.engine.url.render_as_string(hide_password=False)

    def hold(conn: Connection) -> None:
        # Another edit as the daemon's and CLI's own: the user's row locked, then its
        # attributes replaced with one more.
        alice = q.fetch_user_row(conn, "alice", lock=True)
        q.replace_attributes(conn, alice.id, {"floor": "2", "team": "blue"})

    codes: list[int] = []
    raised = while_another_writer_holds(
        accounts,
        hold,
        lambda: codes.append(
            main(["--store-url", url, "user", "edit", "alice", "--attr", "desk=7"])
        ),
    )
    assert raised is None
    assert codes == [0]
    assert accounts.get_user("alice").attributes == {"floor": "2", "team": "blue", "desk": "7"}


def test_user_edit_attr_as_an_actor_keeps_an_attribute_a_concurrent_edit_sets(
    accounts: Accounts,
) -> None:
    """``user edit --as root --attr`` racing another edit of the user's attributes keeps
    both: the actor check does not fix a snapshot older than the row lock (MariaDB)."""
    from provisioner.cli import main

    accounts.add_user(_agent("alice", attributes={"floor": "2"}))
    url = accounts.engine.url.render_as_string(hide_password=False)

    def hold(conn: Connection) -> None:
        alice = q.fetch_user_row(conn, "alice", lock=True)
        q.replace_attributes(conn, alice.id, {"floor": "2", "team": "blue"})

    codes: list[int] = []
    argv = ["--store-url", url, "--as", "root", "user", "edit", "alice", "--attr", "desk=7"]
    raised = while_another_writer_holds(accounts, hold, lambda: codes.append(main(argv)))
    assert raised is None
    assert codes == [0]
    assert accounts.get_user("alice").attributes == {"floor": "2", "team": "blue", "desk": "7"}


def test_csv_import_keeps_an_attribute_a_concurrent_edit_sets(accounts: Accounts) -> None:
    """A CSV import setting one attribute, racing another edit of the same user's
    attributes, keeps both: it reads them locked, after the other commits."""
    accounts.add_user(_agent("alice", attributes={"floor": "2"}))

    def hold(conn: Connection) -> None:
        alice = q.fetch_user_row(conn, "alice", lock=True)
        q.replace_attributes(conn, alice.id, {"floor": "2", "team": "blue"})

    csv_text = "username,attr:desk\nalice,7\n"
    raised = while_another_writer_holds(accounts, hold, lambda: import_users(accounts, csv_text))
    assert raised is None, repr(raised)
    assert accounts.get_user("alice").attributes == {"floor": "2", "team": "blue", "desk": "7"}


def test_user_edit_attr_as_an_actor_sets_an_attribute_a_concurrent_edit_removes(
    accounts: Accounts,
) -> None:
    """``user edit --as root --attr team=blue`` racing another edit that removes team
    leaves team set: the edit compares with the attributes stored now, not a snapshot."""
    from provisioner.cli import main

    accounts.add_user(_agent("alice", attributes={"floor": "2", "team": "blue"}))
    url = accounts.engine.url.render_as_string(hide_password=False)

    def hold(conn: Connection) -> None:
        alice = q.fetch_user_row(conn, "alice", lock=True)
        q.replace_attributes(conn, alice.id, {"floor": "2"})

    codes: list[int] = []
    argv = ["--store-url", url, "--as", "root", "user", "edit", "alice", "--attr", "team=blue"]
    raised = while_another_writer_holds(accounts, hold, lambda: codes.append(main(argv)))
    assert raised is None
    assert codes == [0]
    assert accounts.get_user("alice").attributes == {"floor": "2", "team": "blue"}


def test_first_admin_stays_protected_when_another_writer_adds_a_lower_id(
    accounts: Accounts,
) -> None:
    """The first admin is the admin with the lowest id: a non-admin row another writer gives a
    lower id neither takes its protection nor lifts it from the real first admin."""
    accounts.add_user(_agent("alice"))
    with accounts.transaction() as conn:
        alice = conn.execute(select(users).where(users.c.username == "alice")).mappings().one()
        lower = {**alice, "id": -5, "username": "early", "username_key": "early", "extension": "5"}
        conn.execute(insert(users).values(**lower))
    for action in (accounts.disable, accounts.delete):
        with pytest.raises(ForbiddenError, match=r"root is the first admin and can never be"):
            action(["root"])
    assert accounts.disable(["early"]).done == ["early"]
    assert accounts.delete(["early"]).done == ["early"]
    assert accounts.purge(["early"]).done == ["early"]
    root = accounts.get_user("root")
    assert (root.disabled, root.deleted_at) == (False, None)


def test_csv_import_racing_another_writer_for_an_extension_takes_the_next(
    accounts: Accounts,
) -> None:
    """A CSV import whose lowest free extension another writer takes meanwhile runs again
    and gives its new user the next free one, instead of failing with a database error."""
    accounts.add_user(_agent("alice"))

    def hold(conn: Connection) -> None:
        insert_user_copy(conn, "alice", "dave", "102")

    csv_text = "username,full_name,email,profile\ncarol,Carol Agent,carol@example.com,agents\n"
    raised = while_another_writer_holds(accounts, hold, lambda: import_users(accounts, csv_text))
    assert raised is None, repr(raised)
    assert accounts.get_user("carol").extension == "103"


@contextmanager
def rival_between_check_and_insert(accounts: Accounts, username: str) -> Iterator[list[int]]:
    """Another writer that, at every try of an add of ``username``, takes the name between
    the add's check and its insert (committing a user of that name just before the
    insert) and gives it up again as the next try begins (deleting that user, before the
    try's first read fixes its snapshot); yield the list of takes, one per try."""
    rival = open_engine(accounts.engine.url.render_as_string(hide_password=False))
    takes: list[int] = []

    def give_up(conn: Any) -> None:
        with rival.begin() as other:
            other.execute(delete(users).where(users.c.username_key == username))

    def take(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO USERS ") and username in repr(params):
            with rival.begin() as other:
                insert_user_copy(other, "root", username, f"9{len(takes)}")
            takes.append(1)

    event.listen(accounts.engine, "begin", give_up)
    event.listen(accounts.engine, "before_cursor_execute", take)
    try:
        yield takes
    finally:
        event.remove(accounts.engine, "begin", give_up)
        event.remove(accounts.engine, "before_cursor_execute", take)
        rival.dispose()


def test_an_add_whose_username_is_taken_at_every_try_names_the_username(
    accounts: Accounts, backend: str
) -> None:
    """An add that another writer beats to its username at every try (between the check
    and the insert) ends in a conflict on field username, exit 4, not in "could not
    allocate an extension" (a store-unavailable error, exit 7) that blames the extension.
    SQLite's writes are serialised (BEGIN IMMEDIATE), so no writer gets in between."""
    if backend == "sqlite":
        pytest.skip("SQLite serialises writers: nothing can take a name between check and insert")
    with (
        rival_between_check_and_insert(accounts, "dave") as takes,
        pytest.raises(ConflictError) as raised,
    ):
        accounts.add_user(_agent("dave"))
    assert len(takes) == 20
    assert raised.value.exit_code == 4
    assert raised.value.problems == (
        Problem(
            "username",
            f"is already taken (by a concurrent writer, at each of {len(takes)} tries); try again",
        ),
    )


def test_an_edit_whose_attribute_key_is_taken_at_every_try_names_the_attributes(
    accounts: Accounts, backend: str
) -> None:
    """An edit of a user's attributes that another writer beats to one of its keys at every
    try (committing that key just before the edit's insert) ends in a conflict on field
    attributes, not on field extension, which the edit never touched.  PostgreSQL only:
    SQLite serialises writers, and MariaDB's gap lock makes the other writer wait."""
    if backend != "postgresql":
        pytest.skip("only PostgreSQL lets another writer in between delete and insert")
    alice = accounts.add_user(_agent("alice", attributes={"floor": "2"})).user
    rival = open_engine(accounts.engine.url.render_as_string(hide_password=False))
    takes: list[int] = []
    team = user_attributes.c.user_id == alice.id, user_attributes.c.key == "team"

    def give_up(conn: Any) -> None:
        with rival.begin() as other:
            other.execute(delete(user_attributes).where(*team))

    def take(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO USER_ATTRIBUTES"):
            with rival.begin() as other:
                other.execute(
                    insert(user_attributes).values(user_id=alice.id, key="team", value="x")
                )
            takes.append(1)

    event.listen(accounts.engine, "begin", give_up)
    event.listen(accounts.engine, "before_cursor_execute", take)
    try:
        with pytest.raises(ConflictError) as raised:
            accounts.edit_user("alice", {"attributes": {"team": "blue"}})
    finally:
        event.remove(accounts.engine, "begin", give_up)
        event.remove(accounts.engine, "before_cursor_execute", take)
        rival.dispose()
    assert len(takes) == 3
    rule = (
        "has a key that was set meanwhile (by a concurrent writer, at each of 3 tries); try again"
    )
    assert raised.value.problems == (Problem("attributes", rule),)


def test_a_key_clash_names_its_field_on_every_backend(accounts: Accounts, backend: str) -> None:
    """Each key a write of users can clash on is told apart from the database's error, on
    every backend: username, extension, API key, attributes, profile name, and a profile
    or a user removed meanwhile (but SQLite, whose foreign key errors name no key)."""
    from sqlalchemy.exc import IntegrityError

    from provisioner.accounts import clash_field

    alice = accounts.add_user(_agent("alice")).user
    now = datetime(2026, 1, 1)
    attrs = [{"user_id": alice.id, "key": "team", "value": v} for v in ("a", "b")]
    writes: list[tuple[Callable[[Connection], Any], tuple[str, str] | None]] = [
        (lambda c: insert_user_copy(c, "alice", "ALICE", "5"), ("username", "is already taken")),
        (
            lambda c: insert_user_copy(c, "alice", "bob", alice.extension),
            ("extension", "is already used"),
        ),
        (
            lambda c: c.execute(update(users).values(apikey_hash="x")),
            ("apikey", "clashed with another key"),
        ),
        (
            lambda c: c.execute(insert(user_attributes), attrs),
            ("attributes", "has a key that was set meanwhile"),
        ),
        (
            lambda c: c.execute(
                insert(profiles).values(
                    name="agents", description="", created_at=now, updated_at=now
                )
            ),
            ("name", "is already taken"),
        ),
        (
            lambda c: c.execute(update(users).where(users.c.id == alice.id).values(profile_id=999)),
            None if backend == "sqlite" else ("profile", "names a profile that was removed"),
        ),
        (
            lambda c: c.execute(insert(user_attributes).values(user_id=999, key="k", value="v")),
            None if backend == "sqlite" else ("username", "names a user that was removed"),
        ),
    ]
    for write, field in writes:
        with pytest.raises(IntegrityError) as refused, accounts.transaction() as conn:
            write(conn)
        assert clash_field(refused.value) == field


def test_concurrent_add_of_the_same_profile_is_a_conflict(accounts: Accounts) -> None:
    """A profile add that loses a race for its name to another writer is refused as a conflict
    on field name, never as a raw database error."""

    def hold(conn: Connection) -> None:
        now = datetime(2026, 1, 1)
        conn.execute(
            insert(profiles).values(name="sales", description="", created_at=now, updated_at=now)
        )

    raised = while_another_writer_holds(accounts, hold, lambda: accounts.add_profile("sales"))
    assert isinstance(raised, ConflictError), repr(raised)
    assert raised.problems == (Problem("name", "profile 'sales' already exists"),)


def test_a_write_refused_by_a_not_null_constraint_is_not_run_again(accounts: Accounts) -> None:
    """A write a NOT NULL constraint refuses (no rerun can change that) raises its
    IntegrityError at once, not as a 'concurrent writers' conflict after every attempt."""
    from sqlalchemy.exc import IntegrityError

    from provisioner.accounts import rerun_on_unique_clash

    runs: list[int] = []

    def write() -> None:
        runs.append(1)
        with accounts.write() as conn:
            conn.execute(update(users).where(users.c.username == "root").values(full_name=None))

    exhausted = ConflictError.one("extension", "kept being taken by concurrent writers")
    with pytest.raises(IntegrityError):
        rerun_on_unique_clash(write, 5, exhausted)
    assert len(runs) == 1


def test_a_write_that_loses_a_unique_key_is_run_again(accounts: Accounts) -> None:
    """A write a unique key refuses runs again, up to its attempts, then is ``exhausted``."""
    from provisioner.accounts import rerun_on_unique_clash

    accounts.add_user(_agent("alice"))
    runs: list[int] = []

    def write() -> None:
        runs.append(1)
        with accounts.write() as conn:
            conn.execute(update(users).where(users.c.username == "alice").values(extension="100"))

    exhausted = ConflictError.one("extension", "kept being taken by concurrent writers")
    with pytest.raises(ConflictError):
        rerun_on_unique_clash(write, 3, exhausted)
    assert len(runs) == 3


@contextmanager
def first_admin_lookups(accounts: Accounts) -> Iterator[list[str]]:
    """The statements that look the first admin up (a scan of ``users``), while inside."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "min(users.id)" in statement.lower():
            seen.append(statement)

    event.listen(accounts.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(accounts.engine, "before_cursor_execute", note)


def test_a_bulk_change_or_import_looks_the_first_admin_up_once(accounts: Accounts) -> None:
    """A bulk change or a CSV import of many users by another admin reads the first admin
    once per transaction, not once per user (each read scans ``users``: per user, a
    10,000-user edit of a 100,000-user store read the table 10,000 times)."""
    accounts.actor = "root"
    names = [f"agent{i}" for i in range(6)]
    for name in names:
        accounts.add_user(_agent(name))
    csv_text = "username,full_name,disabled\n" + "".join(f"{n},New {n},yes\n" for n in names)
    for act in (
        lambda: accounts.disable(names),
        lambda: accounts.enable(names),
        lambda: import_users(accounts, csv_text),
        lambda: accounts.delete(names),
    ):
        with first_admin_lookups(accounts) as seen:
            act()
        assert len(seen) == 1


#: More rows than an add's reruns (each of which takes one id off PostgreSQL's sequence),
#: so no rerun gets past them by chance.
_EXPLICIT_IDS = 40


def _insert_with_ids(engine: Engine, first: int) -> int:
    """Insert ``_EXPLICIT_IDS`` users and profiles with their own ids from ``first`` on,
    as a DBA's ``INSERT ... (id, ...)`` does (copies of root and agents); the last id."""
    last = first + _EXPLICIT_IDS - 1
    with engine.begin() as conn:
        root = conn.execute(select(users).where(users.c.username == "root")).mappings().one()
        agents = conn.execute(select(profiles).where(profiles.c.name == "agents")).mappings().one()
        for n in range(first, last + 1):
            name = f"dba{n}"
            row = {
                **root,
                "id": n,
                "username": name,
                "username_key": name,
                "extension": f"9{n:03d}",
            }
            conn.execute(insert(users).values(**row))
            conn.execute(insert(profiles).values(**{**agents, "id": n, "name": f"p{n}"}))
    return last


def test_a_user_add_after_rows_inserted_with_their_own_ids_succeeds(
    accounts: Accounts, engine: Engine
) -> None:
    """Users and profiles a DBA inserted with explicit ids (PostgreSQL's sequence left
    behind them) do not make the next user add, profile add or CSV import fail: each gets
    an id past the highest, on every backend (PostgreSQL's catch-up of each sequence is
    logged, as store.id_sequence_behind)."""
    last = _insert_with_ids(engine, 2)
    with capture_logs() as logs:
        added = accounts.add_user(_agent("alice"))
        profile = accounts.add_profile("late")
    assert added.user.id > last
    assert profile.id > last
    caught_up = [
        (e["table"], e["moved_to"]) for e in logs if e["event"] == "store.id_sequence_behind"
    ]
    if engine.dialect.name == "postgresql":
        assert caught_up == [("users", last), ("profiles", last)]
    else:
        assert caught_up == []
    last = _insert_with_ids(engine, max(added.user.id, profile.id) + 1)
    import_users(accounts, "username,full_name,email,profile\ncarol,Carol,c@example.com,agents\n")
    (carol,) = accounts.get_users(["carol"])
    assert carol.id > last


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_sequence_the_account_may_not_move_is_a_conflict_saying_what_to_run(
    accounts: Accounts, engine: Engine, policy: Policy, clock: FakeClock
) -> None:
    """On PostgreSQL, an account that may write the tables but not move their sequences
    (no UPDATE on them) gets, for an add behind rows inserted with their own ids, a
    conflict on ``id`` naming the setval to run, not a database error or a misleading
    extension conflict."""
    _insert_with_ids(engine, 2)
    role = "prov_test_writer_" + uuid.uuid4().hex[:8]  # roles are the server's
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(
            text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        )
        conn.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    writer = open_engine(engine.url.set(username=role).render_as_string(hide_password=False))
    try:
        with pytest.raises(ConflictError) as refused:
            Accounts(writer, policy, clock).add_user(_agent("alice"))
        (problem,) = refused.value.problems
        assert problem.field == "id"
        assert "SELECT setval(pg_get_serial_sequence('users', 'id')" in problem.rule
    finally:
        writer.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))


def test_purge_racing_a_restore_never_removes_the_restored_user(accounts: Accounts) -> None:
    """A purge that read a user as deleted while another writer restores it is judged on the
    user as committed: the restored user stays, and the purge is refused as of a live user."""
    accounts.add_user(_agent("alice"))
    accounts.delete(["alice"])

    def hold(conn: Connection) -> None:
        conn.execute(update(users).where(users.c.username == "alice").values(deleted_at=None))

    raised = while_another_writer_holds(accounts, hold, lambda: accounts.purge(["alice"]))
    assert isinstance(raised, ForbiddenError), repr(raised)
    assert raised.problems == (
        Problem("username", "alice is not deleted; only deleted users can be purged"),
    )
    assert accounts.get_user("alice").deleted_at is None


def test_edit_racing_a_purge_says_the_user_is_not_found(accounts: Accounts) -> None:
    """An edit of a user another writer purges meanwhile is refused as a user not found
    (exit 3), never a crash reading back the row it meant to change."""
    accounts.add_user(_agent("alice"))

    def hold(conn: Connection) -> None:
        conn.execute(delete(users).where(users.c.username == "alice"))

    raised = while_another_writer_holds(
        accounts, hold, lambda: accounts.edit_user("alice", {"nat": "yes"})
    )
    assert isinstance(raised, NotFoundError), repr(raised)
    assert str(raised) == "user 'alice' not found"


def test_apikey_generated_racing_a_delete_is_refused_and_none_is_kept(
    accounts: Accounts,
) -> None:
    """A key generated for a user another writer deletes meanwhile is refused as for a
    deleted member, and the deleted user holds no key (delete revokes keys)."""
    accounts.add_user(_agent("alice"))

    def hold(conn: Connection) -> None:
        conn.execute(
            update(users)
            .where(users.c.username == "alice")
            .values(deleted_at=datetime(2026, 1, 1), apikey_hash=None, apikey_created_at=None)
        )

    raised = while_another_writer_holds(accounts, hold, lambda: accounts.generate_apikey("alice"))
    assert isinstance(raised, ForbiddenError), repr(raised)
    assert [p.field for p in raised.problems] == ["username"]
    with accounts.engine.connect() as conn:
        stored = conn.execute(select(users.c.apikey_hash).where(users.c.username == "alice"))
        assert stored.scalar_one() is None


def test_login_racing_the_failed_login_that_locks_the_account_is_refused(
    accounts: Accounts, clock: FakeClock
) -> None:
    """A login whose check began before another login's failure locked the account, and
    which gives the right password, is refused as locked: concurrent guesses never get
    past the lock that an earlier one set."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))

    def hold(conn: Connection) -> None:
        # The failure that reaches max_failed_logins, as _count_failure writes it.
        conn.execute(
            update(users)
            .where(users.c.username == "alice")
            .values(failed_logins=3, failed_login_at=clock.now, locked_at=clock.now)
        )

    raised = while_another_writer_holds(
        accounts, hold, lambda: accounts.login("alice", GOOD_PASSWORD)
    )
    assert isinstance(raised, AuthenticationError), repr(raised)
    assert "locked" in str(raised)
    assert accounts.get_user("alice").locked_at == clock.now


def test_a_profile_given_badly_is_refused_once_by_its_rule_not_as_missing(
    accounts: Accounts,
) -> None:
    """A profile name that breaks its text rule is refused by that rule alone, on add and on
    edit: not also as "is required for role user", which it was given."""
    accounts.add_user(_agent("alice"))
    rule = "must not start or end with spaces"
    with pytest.raises(InvalidInput) as added:
        accounts.add_user(_agent("bob", profile=" agents"))
    assert added.value.problems == (Problem("profile", rule),)
    with pytest.raises(InvalidInput) as edited:
        accounts.edit_user("alice", {"profile": "agents "})
    assert edited.value.problems == (Problem("profile", rule),)
    assert accounts.get_user("alice").profile == "agents"


def _meanwhile(
    act: Callable[[], Any], begun: threading.Event, write: Callable[[], Any]
) -> tuple[Any, float]:
    """Run ``act`` in a thread; once ``begun`` is set (its slow step started), run
    ``write`` here; return what ``act`` returned or raised, and the seconds ``write``
    took."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(act())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert begun.wait(10)
    started = time.monotonic()
    write()
    took = time.monotonic() - started
    worker.join(30)
    assert not worker.is_alive()
    return outcome[0], took


def test_a_login_to_an_unknown_name_keeps_no_lock_while_it_spends_its_decoy(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login to a name no user has holds no lock while it spends the decoy verification
    (as long as a wrong password's): an add of a user next to that name in the index is
    not made to wait for it (MariaDB's locking read of a missing key locks the gap; SQLite's
    write transaction holds the whole file)."""
    spending = threading.Event()

    def slow_decoy(password: str) -> None:
        spending.set()
        time.sleep(3)

    monkeypatch.setattr(credentials, "spend_verification", slow_decoy)
    outcome, waited = _meanwhile(
        lambda: accounts.login("zed", "wrong"), spending, lambda: accounts.add_user(_agent("zack"))
    )
    assert isinstance(outcome, AuthenticationError)
    assert waited < 1.5, f"the add waited {waited:.1f} s for the login's lock"


def _disable_both(accounts: Accounts) -> None:
    accounts.disable(["alice", "bob"])


def _import_both(accounts: Accounts) -> None:
    import_users(accounts, "username,full_name\nalice,Alice Imported\nbob,Bob Imported\n")


def _both_disabled(accounts: Accounts) -> bool:
    return [u.disabled for u in accounts.get_users(["alice", "bob"])] == [True, True]


def _both_imported(accounts: Accounts) -> bool:
    names = [u.full_name for u in accounts.get_users(["alice", "bob"])]
    return names == ["Alice Imported", "Bob Imported"]


@pytest.mark.parametrize(
    ("command", "applied"),
    [(_disable_both, _both_disabled), (_import_both, _both_imported)],
    ids=["bulk", "import"],
)
def test_a_command_ended_by_a_deadlock_runs_again_and_applies(
    accounts: Accounts,
    command: Callable[[Accounts], None],
    applied: Callable[[Accounts], bool],
) -> None:
    """A bulk command or a CSV import that the database ends to break a deadlock with
    another writer (which holds bob and then wants alice, while the command holds alice and
    wants bob) runs again once the other is done and applies to all, instead of "user
    store unavailable"."""
    accounts.add_user(_agent("alice"))
    accounts.add_user(_agent("bob"))
    raised: list[BaseException] = []

    def act() -> None:
        try:
            command(accounts)
        except BaseException as exc:
            raised.append(exc)

    with accounts.engine.connect() as conn:
        tx = conn.begin()
        q.fetch_user_row(conn, "bob", lock=True)
        worker = threading.Thread(target=act)
        worker.start()
        time.sleep(0.5)  # the command holds alice and waits for bob
        try:
            q.fetch_user_row(conn, "alice", lock=True)
            tx.commit()
        except OperationalError:  # MariaDB ends the other writer (the smaller) instead
            tx.rollback()
    worker.join(30)
    assert raised == []
    assert applied(accounts)


@pytest.mark.parametrize("given", [GOOD_PASSWORD, "wrong"], ids=["right", "wrong"])
def test_a_login_keeps_no_lock_while_it_verifies_the_password(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """A login holds no lock while it verifies the password (argon2's tens of
    milliseconds; on SQLite a write transaction holds the whole file): an edit of the same
    user and an add of another go on meanwhile, and the login is judged as before (a right
    password logs in, a wrong one counts a failure)."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    verifying = threading.Event()
    real_verify = credentials.verify_password

    def slow_verify(password_hash: str | None, password: str) -> bool:
        verifying.set()
        time.sleep(3)
        return real_verify(password_hash, password)

    monkeypatch.setattr(credentials, "verify_password", slow_verify)

    def writes() -> None:
        accounts.edit_user("alice", {"full_name": "Alice Edited"})
        accounts.add_user(_agent("bob"))

    outcome, waited = _meanwhile(lambda: accounts.login("alice", given), verifying, writes)
    assert waited < 1.5, f"the writes waited {waited:.1f} s for the login's lock"
    if given == GOOD_PASSWORD:
        assert outcome.username == "alice", outcome
    else:
        assert isinstance(outcome, AuthenticationError), outcome
        assert accounts.get_user("alice").failed_logins == 1


def test_a_right_login_hashes_again_a_password_hashed_with_other_costs(
    accounts: Accounts,
) -> None:
    """A login with the right password whose stored hash was made with other argon2 costs
    than new hashes get (an older library's defaults) stores a new hash with today's costs,
    which the same password still verifies; a wrong password changes nothing."""
    accounts.add_user(_agent(password=GOOD_PASSWORD))
    older = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1).hash(GOOD_PASSWORD)
    with accounts.engine.begin() as conn:
        conn.execute(update(users).where(users.c.username == "alice").values(password_hash=older))
    with pytest.raises(AuthenticationError):
        accounts.login("alice", "wrong")
    assert user_row(accounts.engine, "alice").password_hash == older
    accounts.login("alice", GOOD_PASSWORD)
    stored = user_row(accounts.engine, "alice").password_hash
    assert stored != older
    assert not credentials.needs_rehash(stored)
    assert accounts.login("alice", GOOD_PASSWORD).username == "alice"


def _set_alices_password(accounts: Accounts) -> None:
    accounts.set_password("alice", OTHER_PASSWORD)


def _add_bob_with_a_password(accounts: Accounts) -> None:
    accounts.add_user(_agent("bob", password=OTHER_PASSWORD))


def _edit_alices_password(accounts: Accounts) -> None:
    accounts.edit_user("alice", {"password": OTHER_PASSWORD})


def _import_two_passwords(accounts: Accounts) -> None:
    import_users(
        accounts,
        "username,full_name,email,profile,password\n"
        f"alice,Alice,alice@example.com,agents,{OTHER_PASSWORD}\n"
        f"bob,Bob,bob@example.com,agents,{OTHER_PASSWORD}\n",
    )


@pytest.mark.parametrize(
    "change",
    [_set_alices_password, _add_bob_with_a_password, _edit_alices_password, _import_two_passwords],
    ids=["password", "add", "edit", "import"],
)
def test_a_change_hashes_its_passwords_before_it_locks_anything(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch, change: Callable[[Accounts], None]
) -> None:
    """A change that stores a password (set, add, edit, a CSV import) hashes it (argon2's
    0.1-0.3 s) before its transaction: an edit of alice goes on meanwhile, not kept
    waiting for her row's lock (on SQLite for the whole store's), and each stored hash,
    with a salt of its own, verifies the password."""
    accounts.add_user(_agent("alice", password=GOOD_PASSWORD))
    hashing = threading.Event()
    real_hash = credentials.hash_password

    def slow_hash(password: str) -> str:
        hashing.set()
        time.sleep(1.5)
        return real_hash(password)

    monkeypatch.setattr(credentials, "hash_password", slow_hash)

    def edit() -> None:
        accounts.edit_user("alice", {"description": "edited meanwhile"})

    outcome, waited = _meanwhile(lambda: change(accounts), hashing, edit)
    assert outcome is None, outcome
    assert waited < 1.0, f"the edit waited {waited:.1f} s for the change's lock"
    with accounts.engine.connect() as conn:
        hashes = list(conn.execute(select(users.c.password_hash)).scalars())
    changed = [h for h in hashes if credentials.verify_password(h, OTHER_PASSWORD)]
    assert changed, hashes
    assert len(set(changed)) == len(changed), hashes


def test_a_dry_run_import_makes_no_password_hash(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSV import's dry run, which keeps nothing, spends no argon2 hash on its password
    cells (0.1-0.3 s each), still checks them against the password rule, and stores
    nothing."""
    accounts.add_user(_agent("alice", password=GOOD_PASSWORD))
    before = user_row(accounts.engine, "alice")

    def no_hash(password: str) -> str:
        raise AssertionError("a dry run hashed a password")

    monkeypatch.setattr(credentials, "hash_password", no_hash)
    text = (
        "username,full_name,email,profile,password\n"
        f"alice,Alice,alice@example.com,agents,{OTHER_PASSWORD}\n"
        f"bob,Bob,bob@example.com,agents,{OTHER_PASSWORD}\n"
    )
    result = import_users(accounts, text, dry_run=True)
    assert (result.updated, result.added) == (["alice"], ["bob"])
    with pytest.raises(InvalidInput) as refused:
        import_users(accounts, text.replace(OTHER_PASSWORD, "short"), dry_run=True)
    assert {p.field for p in refused.value.problems} == {"password"}
    assert user_row(accounts.engine, "alice") == before
    with pytest.raises(NotFoundError):
        accounts.get_user("bob")
