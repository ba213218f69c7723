"""Who acts: with an acting admin, only the first admin changes the first admin, and the
actor must be an existing, active admin; without one, nothing changes."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from provisioner.accounts import Accounts, Bulk, Policy
from provisioner.csvio import export_users, import_users
from provisioner.errors import AuthenticationError, ForbiddenError, InvalidInput
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.store.schema import users

from .conftest import FakeClock
from .dbs import temp_database
from .helpers import GOOD_PASSWORD, OTHER_PASSWORD, cheap_argon2, user_row

ONLY_ITSELF = r"root is the first admin, and the first admin is edited only by itself"

#: Every way of changing one user by name, as (label, action on Accounts).
CHANGES: list[tuple[str, Callable[[Accounts, str], Any]]] = [
    ("email", lambda acc, name: acc.edit_user(name, {"email": "new@example.com"})),
    ("full name", lambda acc, name: acc.edit_user(name, {"full_name": "New Name"})),
    ("voice", lambda acc, name: acc.edit_user(name, {"nat": "comedia", "codecs": "opus"})),
    ("attributes", lambda acc, name: acc.edit_user(name, {"attributes": {"team": "red"}})),
    ("password edit", lambda acc, name: acc.edit_user(name, {"password": OTHER_PASSWORD})),
    ("sip secret edit", lambda acc, name: acc.edit_user(name, {"sip_secret": "Secret-1234"})),
    ("passwd", lambda acc, name: acc.set_password(name, OTHER_PASSWORD)),
    ("sip-secret --rotate", lambda acc, name: acc.rotate_sip_secret(name)),
    ("apikey generate", lambda acc, name: acc.generate_apikey(name)),
    ("apikey remove", lambda acc, name: acc.remove_apikey(name)),
]


@pytest.fixture(autouse=True)
def _fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_argon2(monkeypatch)


@pytest.fixture
def store(tmp_path: Path, policy: Policy, clock: FakeClock) -> Iterator[Engine]:
    """A SQLite store holding the first admin root, a second admin boss and a user alice."""
    with temp_database("sqlite", tmp_path) as url:
        engine = open_engine(url)
        upgrade(engine)
        _populate(Accounts(engine, policy, clock))
        yield engine
        engine.dispose()


def _populate(acc: Accounts) -> None:
    acc.add_profile("agents")
    for name, role in (("root", "admin"), ("boss", "admin"), ("alice", "user")):
        acc.add_user(
            {
                "username": name,
                "role": role,
                "full_name": name.title(),
                "email": f"{name}@example.com",
                "profile": "agents" if role == "user" else None,
                "password": GOOD_PASSWORD,
                "attributes": {"team": "blue"},
            }
        )
    for name in ("root", "boss", "alice"):
        acc.generate_apikey(name)  # each holds one: removing it is then a change


def _as(engine: Engine, actor: str | None, policy: Policy, clock: FakeClock) -> Accounts:
    return Accounts(engine, policy, clock, actor=actor)


def _raw(engine: Engine, name: str) -> dict[str, Any]:
    return dict(user_row(engine, name)._mapping)


@pytest.mark.parametrize(("label", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_another_admin_cannot_change_the_first_admin(
    store: Engine, policy: Policy, clock: FakeClock, label: str, change: Callable[..., Any]
) -> None:
    """Another admin's change of any kind to the first admin is refused naming it and the
    rule, and the first admin's row stays exactly as it was."""
    before = _raw(store, "root")
    with pytest.raises(ForbiddenError, match=ONLY_ITSELF) as raised:
        change(_as(store, "boss", policy, clock), "root")
    assert [p.field for p in raised.value.problems] == ["username"]
    assert raised.value.exit_code == 5
    assert _raw(store, "root") == before


@pytest.mark.parametrize(("label", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_the_first_admin_changes_itself(
    store: Engine, policy: Policy, clock: FakeClock, label: str, change: Callable[..., Any]
) -> None:
    """The first admin acting on itself makes every kind of change."""
    before = _raw(store, "root")
    clock.advance(minutes=1)
    change(_as(store, "root", policy, clock), "root")
    assert _raw(store, "root")["updated_at"] == clock.now != before["updated_at"]


@pytest.mark.parametrize(("label", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_another_admin_changes_other_users(
    store: Engine, policy: Policy, clock: FakeClock, label: str, change: Callable[..., Any]
) -> None:
    """An admin other than the first changes any other user, itself included, as before."""
    for name in ("alice", "boss"):
        clock.advance(minutes=1)
        change(_as(store, "boss", policy, clock), name)
        assert _raw(store, name)["updated_at"] == clock.now


@pytest.mark.parametrize(("label", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_without_an_actor_the_first_admin_is_changed_as_before(
    store: Engine, policy: Policy, clock: FakeClock, label: str, change: Callable[..., Any]
) -> None:
    """With no acting admin (an operator trusted like a DBA) the first admin is changed."""
    clock.advance(minutes=1)
    change(_as(store, None, policy, clock), "root")
    assert _raw(store, "root")["updated_at"] == clock.now


def _unfit(engine: Engine, policy: Policy, clock: FakeClock) -> dict[str, str]:
    """Actors that may not act, each with the rule it breaks: boss disabled, carol deleted."""
    acc = Accounts(engine, policy, clock)
    for name in ("carol", "dave"):
        acc.add_user({"username": name, "role": "admin", "full_name": "X", "email": "x@ex.com"})
    with engine.begin() as conn:
        # An admin disables or deletes another admin through any front end.
        conn.execute(update(users).where(users.c.username == "carol").values(disabled=True))
    acc.delete(["dave"])
    return {
        "ghost": "'ghost' names no user",
        "alice": "'alice' is not an admin",
        "carol": "'carol' is disabled",
        "dave": "'dave' is in deleted members",
    }


def _attempts(acc: Accounts) -> list[Callable[[], Any]]:
    """One change of each kind: an edit, a bulk action, a profile, a new user, an import."""
    new_user = {"username": "eve", "full_name": "E", "email": "e@ex.com", "profile": "agents"}
    return [
        lambda: acc.edit_user("alice", {"email": "x@example.com"}),
        lambda: acc.disable(["alice"]),
        lambda: acc.add_profile("more"),
        lambda: acc.add_user(new_user),
        lambda: acc.set_password("alice", OTHER_PASSWORD),
        lambda: import_users(acc, "username,email\nalice,y@example.com\n"),
    ]


def test_the_actor_must_be_an_existing_active_admin(
    store: Engine, policy: Policy, clock: FakeClock
) -> None:
    """An actor naming no user, a non-admin, a disabled or a deleted admin changes nothing,
    refused on field actor with the rule."""
    before = _raw(store, "alice")
    for actor, rule in _unfit(store, policy, clock).items():
        for action in _attempts(_as(store, actor, policy, clock)):
            with pytest.raises(ForbiddenError, match=rule) as raised:
                action()
            assert [p.field for p in raised.value.problems] == ["actor"], actor
    assert _raw(store, "alice") == before
    assert [p.name for p in Accounts(store, policy, clock).list_profiles()] == ["agents"]


def test_delete_disable_and_purge_stay_refused_even_to_the_first_admin(
    store: Engine, policy: Policy, clock: FakeClock
) -> None:
    """The first admin can never be disabled, deleted or purged, whoever acts."""
    for actor in ("root", "boss", None):
        acc = _as(store, actor, policy, clock)
        for action in (acc.disable, acc.delete, acc.purge):
            with pytest.raises(ForbiddenError, match=r"root is the first admin and can never be"):
                action(["root"])


def _lock(acc: Accounts, name: str) -> None:
    for _ in range(acc.policy.max_failed_logins):
        with pytest.raises(AuthenticationError):
            acc.login(name, "wrong")


def test_bulk_enable_and_unlock_of_the_first_admin_are_all_or_nothing(
    store: Engine, policy: Policy, clock: FakeClock
) -> None:
    """Another admin's unlock or enable naming the first admin, when it would change it, is
    refused and changes no one named; the first admin unlocks itself (locked, it still acts)."""
    plain = Accounts(store, policy, clock)
    _lock(plain, "root")
    _lock(plain, "alice")
    with store.begin() as conn:  # another writer disabled both behind our back
        conn.execute(
            update(users).where(users.c.username.in_(["root", "alice"])).values(disabled=True)
        )
    boss = _as(store, "boss", policy, clock)
    for action in (boss.unlock, boss.enable):
        with pytest.raises(ForbiddenError, match=ONLY_ITSELF):
            action(["alice", "root"])
    alice = _raw(store, "alice")
    assert (alice["disabled"], alice["locked_at"] is not None) == (True, True)
    assert plain.enable(["root"]).done == ["root"]  # disabled, root cannot act: the operator can
    assert _as(store, "root", policy, clock).unlock(["root"]).done == ["root"]
    assert boss.unlock(["alice", "root"]) == Bulk(done=["alice"], unchanged=["root"])
    assert (_raw(store, "root")["locked_at"], _raw(store, "alice")["locked_at"]) == (None, None)


def _csv(engine: Engine, policy: Policy, clock: FakeClock) -> str:
    out = io.StringIO()
    export_users(Accounts(engine, policy, clock).list_users(), out)
    return str(out.getvalue())


def test_csv_import_changing_the_first_admin_is_refused_all_or_nothing(
    store: Engine, policy: Policy, clock: FakeClock
) -> None:
    """Another admin's import that would change the first admin is refused naming its line,
    and no row is applied; an export re-imports unchanged; the first admin's own applies."""
    text = _csv(store, policy, clock)
    boss = _as(store, "boss", policy, clock)
    assert import_users(boss, text).unchanged == ["root", "boss", "alice"]
    edited = text.replace("root@example.com", "evil@example.com").replace("Alice", "Alicia")
    before = {name: _raw(store, name) for name in ("root", "alice")}
    with pytest.raises(InvalidInput, match=ONLY_ITSELF) as raised:
        import_users(boss, edited)
    assert [(p.field, p.line) for p in raised.value.problems] == [("username", 2)]
    assert {name: _raw(store, name) for name in ("root", "alice")} == before
    assert import_users(_as(store, "root", policy, clock), edited).updated == ["root", "alice"]
    assert _raw(store, "root")["email"] == "evil@example.com"


@pytest.mark.parametrize(
    ("header", "cells"),
    [
        ("sip_secret", "Secret-1234"),
        ("password", OTHER_PASSWORD),
        ("attr:team", ""),
        ("disabled", "no"),
    ],
)
def test_csv_secrets_and_attributes_of_the_first_admin_are_refused_to_another_admin(
    store: Engine, policy: Policy, clock: FakeClock, header: str, cells: str
) -> None:
    """A CSV row giving the first admin a secret, dropping its attribute or enabling it
    (disabled behind our back) is refused to another admin."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.username == "root").values(disabled=True))
    before = _raw(store, "root")
    with pytest.raises(InvalidInput, match=ONLY_ITSELF):
        import_users(_as(store, "boss", policy, clock), f"username,{header}\nroot,{cells}\n")
    assert _raw(store, "root") == before


def test_a_given_sip_secret_equal_to_the_stored_one_is_still_refused(
    store: Engine, policy: Policy, clock: FakeClock
) -> None:
    """Another admin giving the first admin its current SIP secret is refused like any
    other, so the refusal never confirms a guess."""
    secret = "Secret-1234"
    Accounts(store, policy, clock).rotate_sip_secret("root", secret)
    with pytest.raises(ForbiddenError, match=ONLY_ITSELF):
        _as(store, "boss", policy, clock).edit_user("root", {"sip_secret": secret})


def test_first_admin_rule_on_every_backend(accounts: Accounts, policy: Policy) -> None:
    """On SQLite, PostgreSQL and MariaDB another admin's edit of the first admin is refused,
    the first admin's own edit applies, and an unknown actor is refused on field actor."""
    accounts.add_user({"username": "boss", "role": "admin", "full_name": "B", "email": "b@ex.com"})
    boss = Accounts(accounts.engine, policy, accounts.clock, actor="boss")
    with pytest.raises(ForbiddenError, match=ONLY_ITSELF):
        boss.edit_user("root", {"email": "evil@example.com"})
    with pytest.raises(ForbiddenError, match=ONLY_ITSELF):
        boss.rotate_sip_secret("root")
    assert accounts.get_user("root").email == "root@example.com"
    root = Accounts(accounts.engine, policy, accounts.clock, actor="root")
    assert root.edit_user("root", {"email": "me@example.com"}).user.email == "me@example.com"
    assert boss.edit_user("boss", {"email": "bb@example.com"}).user.email == "bb@example.com"
    ghost = Accounts(accounts.engine, policy, accounts.clock, actor="ghost")
    with pytest.raises(ForbiddenError, match=r"actor: 'ghost' names no user"):
        ghost.edit_user("boss", {"email": "g@example.com"})
