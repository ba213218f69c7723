"""What an applied change becomes on an Asterisk server (cache expiries, reloads, contact
removals, the post-apply check) when AMI fails: nothing owed is lost, over a real socket
to the fake Asterisk."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, update
from structlog.testing import capture_logs

from bench.common import seed_store
from provisioner.ami import changes as changes_module
from provisioner.ami import pbx as pbx_module
from provisioner.ami.changes import (
    EXPIRE_ALL_NOTE,
    EXPIRE_ALL_OVER,
    OWED_RETRY,
    VERIFY_BACKOFF_MAX,
    Owed,
    note_owed,
    pay,
    verify_backoff,
    verify_some,
)
from provisioner.ami.client import AmiClient
from provisioner.ami.pbx import (
    SNAPSHOT_GAP_FACTOR,
    SNAPSHOT_MIN_GAP,
    AmiPbx,
    Link,
    snapshot_gap,
    take_due,
)
from provisioner.ami.reload import PjsipOps, ReloadCoordinator
from provisioner.checks import run_checks
from provisioner.config import Config, caches_by_kind, load_config
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.store.registrations import status_rows, write_endpoint_rows
from provisioner.store.schema import daemon_state, registration_summary, users
from provisioner.store.state import put_state
from provisioner.targets import Change

from .amipeer import (
    AN_HOUR_AGO,
    FakeAsterisk,
    eventually,
    fast_settings,
    in_a_thread,
    run,
    running,
    server_for,
)
from .faultkit import write_config

CACHE = "ep_cache"  # the cache the fake Asterisk has (sorcery_memory_cache.txt)
#: ``sorcery_caches`` as a config gives it: a list (every kind) or a table by kind.
Caches = Sequence[str] | Mapping[str, str]
OBJECTS = (("endpoint", "100001"), ("auth", "100001-auth"), ("aor", "100001"))
#: Each object id once: the endpoint and AOR share an id, so in a cache fronting every
#: kind (the list form of ``sorcery_caches``) one expiry covers both.
IDS = ["100001", "100001-auth"]
#: One cache per kind (the table form of ``sorcery_caches``), all known to the fake Asterisk.
PER_KIND = {"endpoint": CACHE, "auth": "auth_cache", "aor": "aor_cache"}
#: (cache, object) of each expiry of OBJECTS with PER_KIND caches, in the change's order.
PER_KIND_EXPIRED = [(CACHE, "100001"), ("auth_cache", "100001-auth"), ("aor_cache", "100001")]
ADDED = Change(added=("100001",), changed_objects=OBJECTS, wrote=True)
UPDATED = Change(updated=("100001",), changed_objects=OBJECTS, wrote=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite store at the newest schema holding two users (extensions 100000-100001)."""
    engine = open_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    seed_store(engine, 2)
    yield engine
    engine.dispose()


def _link(peer: FakeAsterisk, caches: Caches = (CACHE,)) -> Link:
    """A link to ``peer`` whose sorcery caches are ``caches`` (as in the config)."""
    client = AmiClient(server_for(peer), fast_settings())
    reloads = ReloadCoordinator(client, fast_settings())
    return Link("lab", client, reloads, PjsipOps(client), caches_by_kind(caches))


def _expired(peer: FakeAsterisk) -> list[str]:
    return [a.get("Object") for a in peer.actions("SorceryMemoryCacheExpireObject")]


def _deleted(peer: FakeAsterisk) -> list[str]:
    """The astdb key of every DBDel ``peer`` received, in order."""
    return [a.get("Key") for a in peer.actions("DBDel")]


def _emptied(peer: FakeAsterisk) -> list[str]:
    """The cache of every SorceryMemoryCacheExpire (a whole cache emptied) ``peer`` received."""
    return [a.get("Cache") for a in peer.actions("SorceryMemoryCacheExpire")]


def _expired_from(peer: FakeAsterisk) -> list[tuple[str, str]]:
    """``(cache, object)`` of every SorceryMemoryCacheExpireObject ``peer`` received."""
    sent = peer.actions("SorceryMemoryCacheExpireObject")
    return [(a.get("Cache"), a.get("Object")) for a in sent]


@asynccontextmanager
async def _serving(peer: FakeAsterisk, pbx: AmiPbx) -> AsyncIterator[Link]:
    """``pbx`` running against the started ``peer``, its first link connected (both
    sessions, where reloads have their own); the peer stopped on the way out."""
    link = pbx.links[0]
    try:
        async with running(pbx):
            await eventually(lambda: link.client.connected and link.reloads.client.connected)
            yield link
    finally:
        await peer.stop()


@asynccontextmanager
async def _start_serving(
    peer: FakeAsterisk, store: Engine, kind: str
) -> AsyncIterator[tuple[AmiPbx, Link]]:
    """Start ``peer``, then run an AmiPbx over ``store`` for the ``kind`` target with one
    default link to it, as ``_serving`` does: (the pbx, its connected link)."""
    await peer.start()
    pbx = AmiPbx([_link(peer)], store, kind)
    async with _serving(peer, pbx) as link:
        yield pbx, link


def test_a_user_added_while_asterisk_is_down_is_expired_and_reloaded_once_it_is_back(
    store: Engine,
) -> None:
    """A realtime change applied while no AMI session exists still gets its reload and
    its cache expiries, sent once the server is back."""

    async def scenario() -> tuple[int, list[str], bool]:
        peer = FakeAsterisk()
        await peer.start()
        await peer.stop()  # its port known, nothing listening on it
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            async with running(pbx):
                pbx.applied(ADDED, target_kind="realtime")
                await eventually(lambda: bool(link.owed.expiries))
                await peer.start()
                await eventually(lambda: bool(peer.actions("Reload")) and not link.owed)
                return len(peer.actions("Reload")), sorted(_expired(peer)), bool(link.owed)
        finally:
            await peer.stop()

    reloads, expired, owed = run(scenario())
    assert reloads == 1
    assert expired == IDS
    assert not owed


def test_an_expiry_cut_by_a_lost_connection_is_sent_again_after_the_reconnect(
    store: Engine,
) -> None:
    """An expiry whose connection drops before its answer stays owed, and the reconnect
    sends it (and the rest of the change's objects) again."""

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        await peer.start()
        peer.drop_on = {"SorceryMemoryCacheExpireObject"}
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            async with running(pbx):
                await eventually(lambda: link.client.connected)
                pbx.applied(UPDATED, target_kind="realtime")
                await eventually(lambda: bool(_expired(peer)))
                peer.drop_on = set()
                await eventually(lambda: not link.owed and len(_expired(peer)) > len(IDS))
                return _expired(peer)
        finally:
            await peer.stop()

    expired = run(scenario())
    # The first was cut off, then both went.
    assert expired[1:] == IDS


def _expired_once_applied(tmp_path: Path, store: Engine, caches: Caches) -> list[tuple[str, str]]:
    """``(cache, object)`` of each expiry a fake Asterisk holding ``PER_KIND``'s caches
    received once the daemon's AmiPbx, its config naming ``caches``, applied ``UPDATED``
    (a realtime change) and owed nothing more."""

    async def scenario() -> list[tuple[str, str]]:
        peer = _per_kind_peer()
        await peer.start()
        pbx = _pbx_from_config(tmp_path, peer, store, caches)
        async with _serving(peer, pbx) as link:
            pbx.applied(UPDATED, target_kind="realtime")
            await eventually(lambda: bool(_expired_from(peer)) and not link.owed)
            return _expired_from(peer)

    return run(scenario())


def _per_kind_peer() -> FakeAsterisk:
    """A fake Asterisk (not started) holding one memory cache per kind (``PER_KIND``)."""
    peer = FakeAsterisk()
    peer.caches = set(PER_KIND.values())
    return peer


def test_a_per_kind_table_expires_each_object_from_its_kinds_cache_only(
    tmp_path: Path, store: Engine
) -> None:
    """With sorcery_caches a table by kind, a user's changed endpoint, auth and AOR are
    each expired from their own kind's cache alone: three actions, not one per cache."""
    assert _expired_once_applied(tmp_path, store, PER_KIND) == PER_KIND_EXPIRED


def test_a_list_of_caches_expires_each_object_id_from_every_cache(
    tmp_path: Path, store: Engine
) -> None:
    """With sorcery_caches a list, each changed object's id is expired from every cache,
    each id once per cache."""
    expired = _expired_once_applied(tmp_path, store, list(PER_KIND.values()))
    assert sorted(expired) == sorted((c, i) for c in PER_KIND.values() for i in IDS)


def test_an_expiry_resent_after_a_reconnect_still_goes_to_its_kinds_cache_only(
    store: Engine,
) -> None:
    """Owed expiries keep their object's kind: those a lost connection cut off are sent
    again after the reconnect to their own kind's cache alone."""

    async def scenario() -> list[tuple[str, str]]:
        peer = _per_kind_peer()
        await peer.start()
        peer.drop_on = {"SorceryMemoryCacheExpireObject"}
        link = _link(peer, PER_KIND)
        pbx = AmiPbx([link], store, "realtime")
        async with _serving(peer, pbx):
            pbx.applied(UPDATED, target_kind="realtime")
            await eventually(lambda: bool(_expired_from(peer)))
            peer.drop_on = set()
            await eventually(lambda: not link.owed and len(_expired_from(peer)) > 3)
            return _expired_from(peer)

    expired = run(scenario())
    # The first was cut off, then all three went, each to its own cache.
    assert expired[:1] == PER_KIND_EXPIRED[:1]
    assert expired[1:] == PER_KIND_EXPIRED


def test_many_changed_objects_empty_each_distinct_cache_once(store: Engine) -> None:
    """Past EXPIRE_ALL_OVER owed objects, a cache that fronts two kinds is emptied once,
    like the cache of the third kind, and no object is expired one by one."""

    async def scenario() -> tuple[list[str], int]:
        peer = _per_kind_peer()
        await peer.start()
        link = _link(peer, {"endpoint": CACHE, "auth": "auth_cache", "aor": CACHE})
        pbx = AmiPbx([link], store, "realtime")
        async with _serving(peer, pbx):
            pbx.applied(_many(EXPIRE_ALL_OVER + 1), target_kind="realtime")
            await eventually(lambda: bool(peer.actions("SorceryMemoryCacheExpire")))
            await eventually(lambda: not link.owed)
            emptied = _emptied(peer)
            return emptied, len(_expired_from(peer))

    emptied, one_by_one = run(scenario())
    assert emptied == [CACHE, "auth_cache"]
    assert one_by_one == 0


def test_an_owed_contact_removal_is_cancelled_by_a_later_add_of_that_endpoint() -> None:
    """A removal owed for an endpoint that a later change adds again is dropped (its
    contacts are its phone's again); one owed after the add stays."""
    owed = Owed()
    owed.add(Change(removed=("100001", "100002")), expire=False)
    owed.add(Change(added=("100001",)), expire=False)
    assert list(owed.removals) == ["100002"]
    owed.add(Change(removed=("100001",)), expire=False)
    assert list(owed.removals) == ["100002", "100001"]


def test_expiries_are_owed_only_where_caches_are_expired() -> None:
    """Expiries are owed in the order the changes named the objects, each (kind, id) once,
    and only when asked for (a config-file target, or no cache configured, owes none)."""
    owed = Owed()
    owed.add(UPDATED, expire=False)
    assert not owed
    owed.add(UPDATED, expire=True)
    owed.add(ADDED, expire=True)
    assert list(owed.expiries) == list(OBJECTS)


def _many(count: int) -> Change:
    """An update of ``count`` endpoints (a profile edit): one changed object each."""
    ids = tuple(str(200000 + i) for i in range(count))
    return Change(updated=ids, changed_objects=tuple(("endpoint", i) for i in ids), wrote=True)


@pytest.mark.parametrize(("objects", "whole"), [(EXPIRE_ALL_OVER, 0), (EXPIRE_ALL_OVER + 1, 1)])
def test_many_changed_objects_empty_each_cache_with_one_action(
    store: Engine, objects: int, whole: int
) -> None:
    """Up to EXPIRE_ALL_OVER objects are expired one by one; more, owed while Asterisk was
    down, empty each cache with one action once it is back (and no object is expired)."""

    async def scenario() -> tuple[list[str], int, bool]:
        peer = FakeAsterisk()
        await peer.start()
        await peer.stop()
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            async with running(pbx):
                pbx.applied(_many(objects), target_kind="realtime")
                await eventually(lambda: bool(link.owed.expiries))
                await peer.start()
                await eventually(lambda: link.client.connected and not link.owed, timeout=30)
                emptied = _emptied(peer)
                return emptied, len(_expired(peer)), bool(link.owed)
        finally:
            await peer.stop()

    emptied, one_by_one, owed = run(scenario())
    assert emptied == [CACHE] * whole
    assert one_by_one == (0 if whole else objects)
    assert not owed


def test_a_missing_cache_is_logged_when_emptied_and_nothing_stays_owed(store: Engine) -> None:
    """Emptying a cache Asterisk does not have logs ami.cache_missing, names it in the
    health record and owes nothing more (sent again, it would be refused again); the
    other cache is emptied."""

    async def scenario() -> tuple[list[str], bool, list[MutableMapping[str, Any]]]:
        peer = FakeAsterisk()
        await peer.start()
        link = _link(peer, ("no_such_cache", CACHE))
        pbx = AmiPbx([link], store, "realtime")
        try:
            with capture_logs() as logs:
                async with running(pbx):
                    await eventually(lambda: link.client.connected)
                    pbx.applied(_many(EXPIRE_ALL_OVER + 1), target_kind="realtime")
                    await eventually(lambda: len(peer.actions("SorceryMemoryCacheExpire")) == 2)
                    await eventually(lambda: not link.owed)
                    health.update(pbx.health()[link.name])
            emptied = _emptied(peer)
            return emptied, bool(link.owed), logs
        finally:
            await peer.stop()

    health: dict[str, Any] = {}
    emptied, owed, logs = run(scenario())
    assert health["missing_caches"] == ["no_such_cache"]
    assert emptied == ["no_such_cache", CACHE]
    assert not owed
    missing = [e for e in logs if e["event"] == "ami.cache_missing"]
    assert [e["cache"] for e in missing] == ["no_such_cache"]
    assert any(e["event"] == "ami.caches_expired" for e in logs)


#: The recorded phone's contact (show_actions.txt): its astdb key is the MD5 of its URI.
CONTACT_KEY = "contact/1001;@4647304968688045788916f1ea15a2ae"
REMOVED = Change(removed=("1001",), changed_objects=(("endpoint", "1001"),), wrote=True)


async def _removal(
    store: Engine,
    prepare: Callable[[FakeAsterisk, Link], Awaitable[None]],
    *,
    registered: bool = True,
) -> tuple[list[str], int, bool]:
    """Connect to a fake Asterisk (its phone ``registered`` or not), run ``prepare``,
    apply the removal of endpoint 1001: the DBDel keys sent, the PJSIPShowContacts asked
    for after ``prepare``, and whether the book still holds a contact of 1001."""
    peer = FakeAsterisk()
    if not registered:
        peer.astdb.discard(CONTACT_KEY)
    async with _start_serving(peer, store, "realtime") as (pbx, link):
        await eventually(link.book_complete)
        await prepare(peer, link)
        listed = len(peer.actions("PJSIPShowContacts"))
        pbx.applied(REMOVED, target_kind="realtime")
        await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed)
        keys = _deleted(peer)
        reg = link.book.get("1001")
        return keys, len(peer.actions("PJSIPShowContacts")) - listed, bool(reg and reg.contacts)


async def _nothing(peer: FakeAsterisk, link: Link) -> None:
    return None


def test_a_contact_the_snapshot_named_is_deleted_without_listing_every_contact(
    store: Engine,
) -> None:
    """With the book complete, a removed endpoint's contact (named by the connect's
    snapshot) is deleted by that name; no second PJSIPShowContacts; the book forgets it."""
    keys, listed, held = run(_removal(store, _nothing))
    assert keys == [CONTACT_KEY]
    assert listed == 0
    assert not held


async def _registered_by_event(peer: FakeAsterisk, link: Link) -> None:
    """The phone registers after the snapshot: the book knows its contact from the
    ContactStatus event only (an AOR and a URI, no name)."""
    await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
    await eventually(lambda: bool(link.book.get("1001") and link.book["1001"].contacts))
    assert link.book["1001"].contacts[0].object_name is None


def test_a_contact_known_from_an_event_is_deleted_by_its_derived_name(store: Engine) -> None:
    """A contact the book knows from a status event is deleted by <aor>;@<MD5 of URI>,
    the name Asterisk gave it, without listing every contact."""

    async def prepare(peer: FakeAsterisk, link: Link) -> None:
        await _registered_by_event(peer, link)
        assert CONTACT_KEY in peer.astdb

    keys, listed, held = run(_removal(store, prepare, registered=False))
    assert keys == [CONTACT_KEY]
    assert listed == 0
    assert not held


def test_a_derived_name_astdb_does_not_hold_has_every_contact_listed(store: Engine) -> None:
    """When the derived name is not in astdb (the derivation may not hold everywhere),
    every contact is listed, and the removed endpoint's deleted by their names."""

    async def prepare(peer: FakeAsterisk, link: Link) -> None:
        await _registered_by_event(peer, link)
        # The book's contact now has no name; give it a URI whose MD5 names nothing.
        reg = link.book["1001"]
        odd = reg.contacts[0]._replace(uri=reg.contacts[0].uri + ";x=1")
        link.book["1001"] = reg._replace(contacts=(odd,))

    keys, listed, held = run(_removal(store, prepare, registered=False))
    assert keys[-1] == CONTACT_KEY
    assert CONTACT_KEY not in keys[:-1]
    assert listed == 1
    assert not held


def test_a_removal_owed_across_a_reconnect_uses_the_reconnects_snapshot(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contact removal the lost connection left owed is sent after the reconnect from the
    book its snapshot fills: one PJSIPShowContacts (the snapshot's), not a second listing
    of every contact at the same time (at 100k phones, twice 100k events at once)."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.0)  # the snapshot is due at once

    async def scenario() -> tuple[list[str], int]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            peer.drop_on = {"DBDel"}
            pbx.applied(REMOVED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")))
            peer.delays["pjsipshowcontacts"] = 0.2  # a listing that takes a while
            peer.drop_on = set()
            await eventually(lambda: len(peer.actions("DBDel")) == 2 and not link.owed)
            await asyncio.sleep(0.3)  # a listing still coming would show now
            dels = peer.actions("DBDel")
            # Counted on the reconnect's connection only: the first session's listings
            # (its snapshot, however late its store write) are not the reconnect's.
            again = dels[1].connection
            lists = [a for a in peer.actions("PJSIPShowContacts") if a.connection == again]
            return [a.get("Key") for a in dels], len(lists)

    keys, listed = run(scenario())
    assert keys == [CONTACT_KEY, CONTACT_KEY]
    assert listed == 1


def test_a_removal_during_an_expiry_lookup_deletes_by_name_without_listing(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal while an endpoint whose contact's expiry passed is being looked up
    deletes the contact by the name the snapshot told, without listing every contact:
    such a lookup leaves the book missing nothing (at 100k phones a listing is 100k
    events, and an expiry is seen to every few seconds)."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.05)

    async def scenario() -> tuple[list[str], int]:
        peer = FakeAsterisk()
        peer.expiry_shift = AN_HOUR_AGO  # the recorded contact has expired
        peer.delays["pjsipshowendpoint"] = 0.5
        await peer.start()
        pbx = AmiPbx([_link(peer, caches=())], store, "realtime")
        async with _serving(peer, pbx) as link:
            # The recorded contact's expiry is long past: its endpoint is looked up.
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            listed = len(peer.actions("PJSIPShowContacts"))
            pbx.applied(REMOVED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed)
            keys = _deleted(peer)
            return keys, len(peer.actions("PJSIPShowContacts")) - listed

    keys, listed = run(scenario())
    assert keys == [CONTACT_KEY]
    assert listed == 0


OTHER_KEY = "contact/2001;@258051625f000c138c3aa701ea725404"
BOTH_REMOVED = Change(
    removed=("1001", "2001"),
    changed_objects=(("endpoint", "1001"), ("endpoint", "2001")),
    wrote=True,
)


def test_one_owed_action_asterisk_refuses_drops_only_itself_when_the_server_is_back(
    store: Engine,
) -> None:
    """Removals and expiries owed while Asterisk is down are paid when it is back, each
    on its own: the DBDel and the expiry it refuses (one of each of two users) are logged
    as refused (``ami.owed_refused``, naming what) and dropped, and the other user's
    contact is still deleted and its object expired, nothing left owed."""

    async def scenario() -> tuple[list[str], list[str], bool, list[MutableMapping[str, Any]]]:
        peer = FakeAsterisk()
        peer.merge_contact_lists = True  # both phones registered, listed at once
        peer.refuse = {
            ("dbdel", CONTACT_KEY): "Permission denied",
            ("sorcerymemorycacheexpireobject", "1001"): "Permission denied",
        }
        await peer.start()
        await peer.stop()  # its port known, nothing listening on it
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        with capture_logs() as logs:
            try:
                async with running(pbx):
                    pbx.applied(BOTH_REMOVED, target_kind="realtime")
                    await eventually(lambda: len(link.owed.removals) == 2)
                    await peer.start()
                    await eventually(lambda: bool(peer.actions("Reload")) and not link.owed)
                    return _deleted(peer), _expired(peer), bool(link.owed), logs
            finally:
                await peer.stop()

    deleted, expired, owed, logs = run(scenario())
    assert OTHER_KEY in deleted
    assert "2001" in expired
    assert not owed
    refused = {(e["what"], e["item"]) for e in logs if e["event"] == "ami.owed_refused"}
    assert ("expire", "1001") in refused
    assert any(what == "remove_contact" and "1001;@" in item for what, item in refused)


def test_a_removal_the_action_validator_refuses_is_logged_and_the_change_goes_on(
    store: Engine,
) -> None:
    """A removed endpoint whose contact cannot be put in a DBDel (a status event without
    its AOR gave it none, so its name has an empty AOR) is logged as refused and dropped,
    like one Asterisk refuses; the change's reload is still asked for and nothing stays
    owed, where the validator's error escaped the payment and every later one."""

    async def scenario() -> tuple[int, bool, list[str]]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "realtime")
        with capture_logs() as logs:
            async with _serving(peer, pbx) as link:
                await eventually(link.book_complete)
                link.book.pop("1001", None)
                await peer.send_recorded(
                    "Event: ContactStatus\r\n", "NonQualified", replace=((b"AOR: 1001\r\n", b""),)
                )
                await eventually(lambda: bool(link.book.get("1001") and link.book["1001"].contacts))
                pbx.applied(REMOVED, target_kind="realtime")
                await eventually(lambda: bool(peer.actions("Reload")), timeout=3)
                return len(peer.actions("Reload")), bool(link.owed), [e["event"] for e in logs]

    reloads, owed, events = run(scenario())
    assert reloads == 1
    assert not owed
    assert "ami.owed_refused" in events
    assert "ami.apply_failed" not in events


def test_a_removed_endpoints_phone_is_stored_offline_though_its_peer_was_reachable(
    store: Engine,
) -> None:
    """A realtime removal that deletes a registered phone's contact leaves its user
    offline in the store, though its registration said PeerStatus Reachable and Asterisk
    sends no event for the deletion."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))

    async def scenario() -> tuple[str | None, str | None]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(lambda: _stored_state(store) == "online" and link.store_idle.is_set())
            before = _stored_state(store)
            pbx.applied(REMOVED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed)
            await eventually(lambda: not link.dirty and link.store_idle.is_set())
            await asyncio.sleep(0.1)
            return before, _stored_state(store)

    before, after = run(scenario())
    assert before == "online"
    assert after == "offline"


async def _untracked_auth(peer: FakeAsterisk, link: Link) -> None:
    """A phone authenticates as endpoint 3001, which Asterisk does not track (it was
    added since the last reload): that wants a snapshot."""
    link.untracked = {"3001"}
    await peer.send_recorded(
        "Event: SuccessfulAuth\r\n",
        "Service: PJSIP",
        replace=((b"AccountID: 1001", b"AccountID: 3001"),),
    )


def test_while_a_snapshot_is_wanted_every_contact_is_listed(store: Engine) -> None:
    """A SuccessfulAuth of an endpoint Asterisk does not track wants a snapshot (its
    contacts are only seen by asking): until that is in, a removal lists every contact."""

    async def prepare(peer: FakeAsterisk, link: Link) -> None:
        await _untracked_auth(peer, link)
        await eventually(lambda: not link.book_complete())

    keys, listed, held = run(_removal(store, prepare))
    assert keys == [CONTACT_KEY]
    assert listed >= 1
    assert not held


def test_snapshots_are_spaced_by_their_duration() -> None:
    """The gap between snapshots is the minimum, or the factor times the last one's
    duration when that is longer."""
    assert snapshot_gap(0.0) == SNAPSHOT_MIN_GAP
    assert snapshot_gap(1.5) == max(SNAPSHOT_MIN_GAP, SNAPSHOT_GAP_FACTOR * 1.5)


def test_a_slow_snapshot_holds_the_next_one_back(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a snapshot that took 0.3 s, one wanted by SuccessfulAuths of more untracked
    endpoints than are looked up one by one waits until factor x 0.3 s after the first
    began, then is taken."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.05)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_GAP_FACTOR", 10.0)  # 3 s: a wide margin
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)
    monkeypatch.setattr(pbx_module, "LOOKUP_LIMIT", 0)

    async def scenario() -> tuple[float, int, int]:
        peer = FakeAsterisk()
        peer.delays["pjsipshowcontacts"] = 0.3
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            await _untracked_auth(peer, link)
            await asyncio.sleep(0.5)
            held_back = len(peer.actions("PJSIPShowContacts"))
            await eventually(lambda: len(peer.actions("PJSIPShowContacts")) == 2)
            return link.snapshot_took, held_back, len(peer.actions("PJSIPShowContacts"))

    took, held_back, taken = run(scenario())
    assert took >= 0.3
    assert held_back == 1
    assert taken == 2


def test_a_snapshot_cut_by_a_lost_connection_does_not_hold_the_next_one_back(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that failed 0.4 s in (the connection dropped) says nothing of what a
    listing costs: the reconnect's snapshot is taken at once, not factor x 0.4 s after
    the failed one began."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.05)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_GAP_FACTOR", 10.0)  # 4 s: a wide margin
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)
    monkeypatch.setattr(pbx_module, "LOOKUP_LIMIT", 0)

    async def scenario() -> float:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            peer.delays["pjsipshowcontacts"] = 5.0
            await _untracked_auth(peer, link)
            await eventually(lambda: len(peer.actions("PJSIPShowContacts")) == 2)
            await asyncio.sleep(0.4)
            peer.delays.clear()
            peer.drop_all()
            dropped = time.monotonic()
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            return time.monotonic() - dropped

    assert run(scenario()) < 2.0


def test_due_endpoints_are_taken_oldest_first_up_to_now() -> None:
    """take_due removes and returns the endpoints whose deadline has passed, in order,
    and leaves the later ones."""
    unconfirmed = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert take_due(unconfirmed, 2.0) == ["a", "b"]
    assert unconfirmed == {"c": 3.0}
    assert take_due(unconfirmed, 2.5) == []


async def _first_auth_since_start(
    peer: FakeAsterisk, link: Link, *followers: tuple[str, str]
) -> None:
    """Phone 1001, listed by the start's snapshot, authenticates (SuccessfulAuth), then
    its recorded ``followers`` events come; the lookups' window passes.  Any endpoint
    may be untracked, as after a run that owed a reload."""
    await eventually(link.book_complete)
    link.untracked = None
    await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
    for first, *rest in followers:
        await peer.send_recorded(first, *rest)
    await asyncio.sleep(pbx_module.CONFIRM_WINDOW * 3)


def test_status_events_after_an_auth_want_no_lookup_and_no_snapshot(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SuccessfulAuth followed by its registration's status events (a tracked
    endpoint) asks Asterisk nothing more: neither a lookup nor a second snapshot."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.1)

    async def scenario() -> tuple[int, int, bool]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await _first_auth_since_start(peer, link, *_REGISTER)
            return (
                len(peer.actions("PJSIPShowContacts")),
                len(peer.actions("PJSIPShowEndpoint")),
                link.book_complete(),
            )

    snapshots, lookups, complete = run(scenario())
    assert (snapshots, lookups) == (1, 0)
    assert complete


def test_an_auth_no_status_event_follows_has_its_endpoint_looked_up(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SuccessfulAuth of an endpoint Asterisk does not track (no status event follows)
    has that endpoint's contacts looked up with PJSIPShowEndpoint, not every contact
    listed, and the book holds them, named as astdb names them."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.1)

    async def scenario() -> tuple[int, list[str], tuple[str | None, ...], bool]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await _first_auth_since_start(peer, link)
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            await eventually(link.book_complete)
            reg = link.book["1001"]
            return (
                len(peer.actions("PJSIPShowContacts")),
                [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")],
                tuple(c.object_name for c in reg.contacts),
                reg.tracked,
            )

    snapshots, looked_up, names, tracked = run(scenario())
    assert snapshots == 1
    assert looked_up == ["1001"]
    assert names == (CONTACT_KEY.removeprefix("contact/"),)
    assert not tracked


_REGISTER = (
    ("Event: PeerStatus", "Reachable"),
    ("Event: ContactStatus\r\n", "NonQualified"),
    ("Event: DeviceStateChange", "NOT_INUSE"),
)
_UNREGISTER = (
    ("Event: PeerStatus", "Unreachable"),
    ("Event: ContactStatus\r\n", "Removed"),
    ("Event: DeviceStateChange", "UNAVAILABLE"),
)


def test_a_phone_gone_while_disconnected_is_offline_after_the_reconnect_snapshot(
    store: Engine,
) -> None:
    """An endpoint the reconnect's snapshot lists no contact for is offline, though the
    last session's events left it Reachable (its un-registration was lost)."""

    async def scenario() -> tuple[str, str, str | None]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(lambda: link.book["1001"].peer_status == "Reachable")
            before = link.book["1001"].summary
            await peer.stop()
            peer.astdb.clear()  # the phone un-registered while the connection was down
            await peer.start()
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            reg = link.book["1001"]
            return before, reg.summary, reg.peer_status

    before, after, peer_status = run(scenario())
    assert before == "online"
    assert after == "offline"
    assert peer_status is None


def test_an_endpoint_said_invalid_then_added_again_is_online_when_a_snapshot_lists_its_phone(
    store: Engine,
) -> None:
    """An endpoint Asterisk called INVALID (deleted, then a reload), added again (the
    user restored) and found live by the post-apply check, is online once a snapshot
    (the reconnect's) lists its phone's contact."""
    added = Change(added=("1001",), changed_objects=(("endpoint", "1001"),), wrote=True)

    async def scenario() -> tuple[bool, str, int]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            await peer.send_recorded(
                "Event: DeviceStateChange", "UNAVAILABLE", replace=((b"UNAVAILABLE", b"INVALID"),)
            )
            await eventually(lambda: not link.book["1001"].exists)
            pbx.applied(added, target_kind="realtime")
            # The check asked and answered: an empty queue alone may be seen before the
            # change loop queued the endpoint for it.
            await eventually(
                lambda: (
                    bool(peer.actions("PJSIPShowEndpoint"))
                    and link.changes.empty()
                    and not link.unverified
                )
            )
            await peer.stop()
            await peer.start()  # astdb holds 1001's contact: its phone registered meanwhile
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            reg = link.book["1001"]
            return reg.exists, reg.summary, len(reg.contacts)

    assert run(scenario()) == (True, "online", 1)


def test_a_reconnect_snapshot_keeps_the_last_change_of_a_phone_it_still_lists(
    store: Engine,
) -> None:
    """``status``'s last change of a phone registered before an AMI reconnect stays the
    time of its registration's events (Asterisk's Timestamp), not the time the
    reconnect's snapshot was written."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))

    async def scenario() -> float | None:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(lambda: link.totals.events == 3 and not link.dirty)
            registered = link.book["1001"].last_change
            await peer.stop()
            await peer.start()  # the phone stays registered: the snapshot lists it
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            await eventually(lambda: not link.jobs and link.store_idle.is_set())
            return registered

    registered = run(scenario())
    assert registered is not None
    with store.connect() as conn:
        # Read as when the snapshot was recorded: the recorded expiry is long past now.
        (row,) = status_rows(conn, ["user0"], now=datetime(2026, 11, 24, 23, 53))
    assert row["state"] == "online"
    assert row["last_change"] == datetime.fromtimestamp(registered, UTC).replace(tzinfo=None)


def test_a_disabled_users_phone_asterisk_still_lists_after_its_endpoint_went_is_offline(
    store: Engine,
) -> None:
    """A disabled user's endpoint Asterisk called INVALID (gone at the reload) whose phone's
    contact the next snapshot still lists (Asterisk keeps a deleted endpoint's contacts
    until they expire) is offline in ``status``, as its server's summary says."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001", disabled=True))

    async def scenario() -> str:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            await peer.send_recorded(
                "Event: DeviceStateChange", "UNAVAILABLE", replace=((b"UNAVAILABLE", b"INVALID"),)
            )
            await eventually(lambda: not link.book["1001"].exists)
            await peer.stop()
            await peer.start()  # astdb still holds 1001's contact
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            await eventually(lambda: not link.jobs and link.store_idle.is_set())
            return link.book["1001"].summary

    assert run(scenario()) == "offline"
    with store.connect() as conn:
        (row,) = status_rows(conn, ["user0"])
    assert [s["state"] for s in row["servers"]] == ["offline"]
    assert row["state"] == "offline"


def test_a_contact_removed_right_after_a_snapshot_stays_removed_in_the_store(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal acting on the book a snapshot has just filled (before that snapshot is
    stored) deletes the phone's contact by name; the snapshot, though written behind a
    slow store write and a note write taken before it, does not bring the contact back:
    ``status`` shows the user offline, as Asterisk has it."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.0)
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))
    database = store.url.database
    assert database is not None

    async def scenario() -> None:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(lambda: link.book_complete() and not link.jobs)
            await eventually(lambda: link.store_idle.is_set() and not link.dirty)
            holder = sqlite3.connect(database, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # every store write now waits for it
            try:
                # A registration write in flight (held), then a snapshot under way.
                await peer.send_recorded("Event: DeviceStateChange", "NOT_INUSE")
                await eventually(lambda: link.writes_running == 1)
                peer.delays["pjsipshowcontacts"] = 0.3
                link.snapshot_wanted.set()
                await eventually(lambda: len(peer.actions("PJSIPShowContacts")) == 2)
                # The removal's note is taken by the flusher before the snapshot is in;
                # the removal waits for the listing, then deletes by the book's name.
                pbx.applied(REMOVED, target_kind="realtime")
                await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed)
                assert len(peer.actions("PJSIPShowContacts")) == 2
            finally:
                holder.execute("COMMIT")
                holder.close()
            await eventually(
                lambda: not (link.jobs or link.dirty or link.writes_running), timeout=10
            )
            assert not link.book["1001"].contacts

    run(scenario(), timeout=30)
    with store.connect() as conn:
        (row,) = status_rows(conn, ["user0"])
    assert row["contacts"] == []
    assert row["state"] == "offline"


def test_a_change_a_reconnect_snapshot_finds_is_logged_and_so_is_the_next(
    store: Engine,
) -> None:
    """A phone that un-registered while the connection was down is logged offline
    (``registration.changed``) when the reconnect's snapshot finds it gone, and online
    again when it registers once more."""

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(lambda: link.totals.events == 3 and not link.dirty)
            await eventually(lambda: link.reported.get("1001") == "online")
            with capture_logs() as logs:
                await peer.stop()
                peer.astdb.clear()  # the phone un-registered while the connection was down
                await peer.start()
                await eventually(lambda: link.client.sessions == 2 and link.book_complete())
                await eventually(lambda: not link.jobs and link.store_idle.is_set())
                for needles in _REGISTER:
                    await peer.send_recorded(*needles)
                await eventually(lambda: link.totals.events == 6 and not link.dirty)
                await eventually(lambda: link.store_idle.is_set())
            return [
                line["state"]
                for line in logs
                if line["event"] == "registration.changed" and line["endpoint"] == "1001"
            ]

    assert run(scenario()) == ["offline", "online"]


def test_a_phone_gone_while_disconnected_is_stored_unavailable_not_in_use(
    store: Engine,
) -> None:
    """A phone that un-registered while the connection was down is stored, after the
    reconnect's snapshot lists no contact for it, with Asterisk's device state for an
    endpoint with no contact (UNAVAILABLE), not the NOT_INUSE its last events said."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))

    async def scenario() -> None:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(lambda: link.totals.events == 3 and not link.dirty)
            await peer.stop()
            peer.astdb.clear()  # the phone un-registered while the connection was down
            await peer.start()
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            await eventually(lambda: not link.jobs and link.store_idle.is_set())

    run(scenario())
    summary = registration_summary.c
    with store.connect() as conn:
        query = select(summary.state, summary.device_state).where(summary.user_id == 1)
        assert tuple(conn.execute(query).one()) == ("offline", "UNAVAILABLE")


class _TailPeer(FakeAsterisk):
    """A fake Asterisk that sends ``tail`` (events it queued while listing) right after
    its next PJSIPShowContacts answer, in the same write, as Asterisk does."""

    tail = b""

    async def _answer(self, action: Any) -> bytes:
        answer = await super()._answer(action)
        if action.name.lower() == "pjsipshowcontacts" and self.tail:
            answer, self.tail = answer + self.tail, b""
        return answer


def test_events_right_after_the_contact_list_are_not_lost_to_the_snapshot(
    store: Engine,
) -> None:
    """An un-registration whose events come in the same read as the snapshot's list end
    is folded over the snapshot: the endpoint ends offline, without the listed contact."""

    async def scenario() -> tuple[str, int, str | None]:
        peer = _TailPeer()
        peer.tail = b"".join(peer.library.find_message(*needles) for needles in _UNREGISTER)
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(lambda: link.book_complete() and link.totals.events >= 3)
            reg = link.book["1001"]
            return reg.summary, len(reg.contacts), reg.peer_status

    summary, contacts, peer_status = run(scenario())
    assert summary == "offline"
    assert contacts == 0
    assert peer_status == "Unreachable"


def test_health_counts_reconnects_as_sessions_after_the_first(store: Engine) -> None:
    """One session, never lost, is no reconnect; a second session after a restart is one."""

    async def scenario() -> tuple[int, int]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            first = pbx.health()["lab"]["reconnects"]
            await peer.stop()
            await peer.start()
            await eventually(lambda: link.client.sessions == 2 and link.client.connected)
            return first, pbx.health()["lab"]["reconnects"]

    assert run(scenario()) == (0, 1)


def _asterisk_toml(peer: FakeAsterisk, caches: Caches) -> list[str]:
    """The ``[[asterisk]]`` entry of a config file for ``peer`` and these caches."""
    if isinstance(caches, Mapping):
        table = ", ".join(f'{kind} = "{cache}"' for kind, cache in caches.items())
        value = f"{{ {table} }}"
    else:
        value = "[" + ", ".join(f'"{cache}"' for cache in caches) + "]"
    return [
        "[[asterisk]]",
        'name = "lab"',
        'host = "127.0.0.1"',
        f"port = {peer.port}",
        f'username = "{peer.username}"',
        f'secret = "{peer.secret}"',
        f"sorcery_caches = {value}",
    ]


def _realtime_config(tmp_path: Path, peer: FakeAsterisk, caches: Caches) -> Config:
    """A realtime target's config with one server, the fake Asterisk (AMI timings fast)."""
    ami = fast_settings()
    extra = [
        "[ami]",
        *(f"{key} = {value}" for key, value in ami.model_dump().items()),
        *_asterisk_toml(peer, caches),
    ]
    return load_config(str(write_config(tmp_path, kind="realtime", extra=extra)))


def _pbx_from_config(
    tmp_path: Path, peer: FakeAsterisk, store: Engine, caches: Caches = (CACHE,)
) -> AmiPbx:
    """The daemon's AmiPbx for a realtime target and one server: the fake Asterisk."""
    return AmiPbx.from_config(_realtime_config(tmp_path, peer, caches), store)


def test_reloads_go_on_a_session_of_their_own_without_events(tmp_path: Path, store: Engine) -> None:
    """Each server gets two sessions: the main one (events, expiries, queries) and one
    logged in with Events: off that sends the reloads; events reach the main one only."""

    async def scenario() -> tuple[list[str], set[int], int, int, bool]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = _pbx_from_config(tmp_path, peer, store)
        async with _serving(peer, pbx) as link:
            await eventually(link.book_complete)
            pbx.applied(ADDED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("Reload")) and not link.owed)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await eventually(lambda: bool(link.book.get("1001")))
            logins = peer.actions("Login")
            quiet = {a.connection for a in logins if a.get("Events") == "off"}
            reload_conn = peer.actions("Reload")[0].connection
            expire_conn = peer.actions("SorceryMemoryCacheExpireObject")[0].connection
            events_on_reload_session = link.reloads.client.health().events_received
            return (
                [a.get("Events") for a in logins],
                quiet,
                reload_conn,
                expire_conn,
                events_on_reload_session == 0,
            )

    events, quiet, reload_conn, expire_conn, no_events = run(scenario())
    assert sorted(events) == sorted(["system,call,security", "off"])
    assert quiet == {reload_conn}
    assert expire_conn != reload_conn
    assert no_events


def test_a_realtime_edit_is_live_while_a_slow_reload_runs(tmp_path: Path, store: Engine) -> None:
    """An added endpoint's reload (slow: 3 s here, 95 s at 50k endpoints) holds back
    neither the next edit's cache expiry nor its answer."""

    async def scenario() -> tuple[float, int]:
        peer = FakeAsterisk()
        peer.reload_delay = 3.0
        await peer.start()
        pbx = _pbx_from_config(tmp_path, peer, store)
        async with _serving(peer, pbx) as link:
            pbx.applied(ADDED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("Reload")))
            edited = Change(updated=("100000",), changed_objects=(("endpoint", "100000"),))
            started = time.monotonic()
            pbx.applied(edited, target_kind="realtime")
            await eventually(lambda: "100000" in _expired(peer) and not link.owed)
            return time.monotonic() - started, sum(link.totals.reload_results.values())

    took, reloads_done = run(scenario())
    assert took < 1.5, f"the edit waited {took:.2f} s for the reload"
    assert reloads_done == 0  # the reload was still running


def test_a_reload_session_lost_mid_reload_leaves_the_main_session_up(
    tmp_path: Path, store: Engine
) -> None:
    """A reload whose session drops is sent again once that session is back; the main
    session (events, expiries) stays up throughout and is never reconnected."""

    async def scenario() -> tuple[int, int, int, dict[str, int]]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = _pbx_from_config(tmp_path, peer, store)
        async with _serving(peer, pbx) as link:
            peer.drop_on = {"Reload"}
            pbx.applied(ADDED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("Reload")))
            await eventually(lambda: not link.reloads.client.connected)
            peer.drop_on = set()
            await eventually(lambda: sum(link.totals.reload_results.values()) == 1, timeout=10)
            return (
                link.client.health().sessions,
                link.reloads.client.health().sessions,
                len(peer.actions("Reload")),
                dict(link.totals.reload_results),
            )

    main_sessions, reload_sessions, reloads, results = run(scenario())
    assert main_sessions == 1
    assert reload_sessions == 2
    assert reloads == 2
    assert results == {"ok": 1}


@pytest.mark.parametrize(
    ("caches", "ok"),
    [
        ([CACHE], True),
        ([CACHE, "no_such_cache"], False),
        ({"endpoint": CACHE, "aor": CACHE}, True),
        ({"endpoint": CACHE, "auth": "no_such_cache"}, False),
    ],
)
def test_check_names_a_sorcery_cache_asterisk_does_not_have(
    tmp_path: Path, store: Engine, caches: Caches, ok: bool
) -> None:
    """`provisioner check` with a realtime target asks each configured cache to expire an
    object no one has: a cache Asterisk does not have fails the check, by name."""
    with in_a_thread(FakeAsterisk()) as peer:
        config = _realtime_config(tmp_path, peer, caches)
        checks = {name: (passed, detail) for name, passed, detail in run_checks(config)}
    passed, detail = checks["asterisk lab"]
    assert passed is ok, detail
    assert ("no_such_cache" in detail) is not ok


def test_a_large_apply_is_verified_against_one_endpoint_listing(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LISTING_OVER waiting endpoints one PJSIPShowEndpoints listing checks them all
    (no lookup one by one): the endpoint Asterisk does not list is counted, logged and
    recorded next to its user; the listed ones are live."""
    monkeypatch.setattr(changes_module, "LISTING_OVER", 2)

    async def scenario() -> tuple[int, int, int, list[str]]:
        peer = FakeAsterisk()
        await peer.start()
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            with capture_logs() as logs:
                async with running(pbx):
                    await eventually(lambda: link.client.connected)
                    # 1001 and 2001 are in the recorded listing; 100000 is not.
                    ids = ("1001", "2001", "100000")
                    pbx.applied(Change(updated=ids), target_kind="realtime")
                    await eventually(lambda: link.not_live > 0)
                    await eventually(lambda: link.store_idle.is_set() and not link.jobs)
            not_live = [e["endpoint"] for e in logs if e["event"] == "pjsip.not_live"]
            return (
                len(peer.actions("PJSIPShowEndpoints")),
                len(peer.actions("PJSIPShowEndpoint")),
                link.not_live,
                not_live,
            )
        finally:
            await peer.stop()

    listings, lookups, count, logged = run(scenario())
    assert (listings, lookups, count, logged) == (1, 0, 1, ["100000"])
    with store.connect() as conn:
        query = select(registration_summary.c.user_id, registration_summary.c.problem)
        problems = {uid: problem for uid, problem in conn.execute(query)}
    assert "does not hold" in problems[1]


def test_a_bulk_edit_is_verified_in_rounds_between_edits(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More endpoints than VERIFY_LIMIT are looked up a round at a time, the change loop
    coming back for the rest: every one is asked about once, and none stays waiting."""
    monkeypatch.setattr(changes_module, "VERIFY_LIMIT", 2)
    ids = tuple(str(300000 + i) for i in range(7))

    async def scenario() -> tuple[list[str], int]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            pbx.applied(Change(updated=ids), target_kind="realtime")
            await eventually(lambda: len(peer.actions("PJSIPShowEndpoint")) == len(ids))
            await eventually(lambda: not link.unverified)
            asked = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
            return asked, len(peer.actions("PJSIPShowEndpoints"))

    asked, listings = run(scenario())
    assert asked == list(ids)
    assert listings == 0


def test_a_failing_check_waits_longer_each_round_and_keeps_its_endpoints() -> None:
    """A round that fails keeps the unanswered endpoints waiting and pushes the next
    round back: 5 s, then doubling up to 5 minutes."""
    assert [verify_backoff(n) for n in (1, 2, 3)] == [OWED_RETRY, 2 * OWED_RETRY, 4 * OWED_RETRY]
    assert verify_backoff(50) == VERIFY_BACKOFF_MAX

    async def scenario() -> tuple[int, bool, float]:
        peer = FakeAsterisk()
        await peer.start()
        peer.drop_on = {"PJSIPShowEndpoint"}
        link = _link(peer)
        try:
            async with running(AmiPbx([link], create_engine("sqlite://"), "realtime")):
                await eventually(lambda: link.client.connected)
                link.unverified.update({"1001": 0, "2001": 0})
                await verify_some(link)
                waited = link.verify_after - time.monotonic()
                return link.verify_failures, list(link.unverified) == ["1001", "2001"], waited
        finally:
            await peer.stop()

    failures, kept, waited = run(scenario())
    assert failures == 1
    assert kept
    assert OWED_RETRY - 1 < waited <= OWED_RETRY


def test_file_edits_made_while_a_reload_waits_merge_into_it(store: Engine) -> None:
    """Config-file edits applied while a reload waits for its gap are served by that
    reload (their bytes are on disk before it is sent), not by one reload each after it;
    the edited endpoint is verified once it has been reloaded."""

    async def scenario() -> tuple[int, list[str]]:
        peer = FakeAsterisk()
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(reload_min_gap=1.0))
        coordinator = ReloadCoordinator(client, fast_settings(reload_min_gap=1.0))
        link = Link("lab", client, coordinator, PjsipOps(client))
        pbx = AmiPbx([link], store, "config")
        async with _serving(peer, pbx):
            pbx.applied(UPDATED, target_kind="config")  # reloaded at once
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            for _ in range(3):  # each one waits for the 1 s gap
                pbx.applied(UPDATED, target_kind="config")
                await asyncio.sleep(0.1)
            await eventually(lambda: len(peer.actions("Reload")) == 2)
            await eventually(
                lambda: not link.unverified and bool(peer.actions("PJSIPShowEndpoint"))
            )
            await asyncio.sleep(1.5)  # a third reload would have come by now
            shown = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
            return len(peer.actions("Reload")), shown

    reloads, shown = run(scenario())
    assert reloads == 2
    assert "100001" in shown


async def _file_actions(store: Engine, *changes: Change) -> list[str]:
    """Apply ``changes`` to a config-file target's server (its phone registered, each
    reload taking 0.3 s) until their reloads ended and nothing is owed: the DBDel and
    Reload actions it received, in order."""
    peer = FakeAsterisk()
    peer.reload_delay = 0.3
    async with _start_serving(peer, store, "config") as (pbx, link):
        await eventually(link.book_complete)
        for change in changes:
            pbx.applied(change, target_kind="config")
        await eventually(lambda: bool(peer.actions("Reload")) and not link.reloads.in_flight)
        await eventually(lambda: not link.reloads.pending and not link.owed)
        await asyncio.sleep(0.2)  # a removal owed by the reload's end would be sent by now
        return [a.name for a in peer.received if a.name in ("DBDel", "Reload")]


def test_a_file_removal_deletes_the_contacts_after_the_reload(store: Engine) -> None:
    """Config-file target: a removed endpoint's contacts are deleted only once the reload
    that drops the endpoint has ended (before it, the phone could register again)."""
    assert run(_file_actions(store, REMOVED)) == ["Reload", "DBDel"]


def test_a_file_endpoint_removed_then_added_again_keeps_its_contacts(store: Engine) -> None:
    """Config-file target: an endpoint removed and added back before their reload ends
    keeps its phone's contacts."""
    again = Change(added=("1001",), wrote=True)
    assert run(_file_actions(store, REMOVED, again)) == ["Reload"]


class _InvalidAtReloadPeer(FakeAsterisk):
    """A fake Asterisk that, reloading, sends ``DeviceStateChange`` ``INVALID`` for 1001 (an
    endpoint the reload dropped) before its answer to the reload."""

    async def _answer(self, action: Any) -> bytes:
        if action.name.lower() == "reload":
            await self.send_recorded(
                "Event: DeviceStateChange", "UNAVAILABLE", replace=((b"UNAVAILABLE", b"INVALID"),)
            )
            await asyncio.sleep(0.1)  # the event read and folded before the answer
        return await super()._answer(action)


def test_a_file_removal_deletes_the_contacts_though_invalid_came_before_the_reloads_end(
    store: Engine,
) -> None:
    """Config-file target: the contacts of a removed endpoint are deleted after the reload
    even when Asterisk's ``INVALID`` for that endpoint came before the reload's answer
    (the book then no longer holds them): its phone's contact does not stay in astdb."""

    async def scenario() -> tuple[list[str], bool]:
        peer = _InvalidAtReloadPeer()
        async with _start_serving(peer, store, "config") as (pbx, link):
            await eventually(link.book_complete)
            assert link.book["1001"].contacts
            pbx.applied(REMOVED, target_kind="config")
            await eventually(lambda: bool(peer.actions("Reload")) and not link.reloads.in_flight)
            await eventually(lambda: not link.reloads.pending and not link.owed)
            await asyncio.sleep(0.2)  # a removal owed by the reload's end would be sent by now
            return _deleted(peer), CONTACT_KEY in peer.astdb

    deleted, kept = run(scenario())
    assert deleted == [CONTACT_KEY]
    assert not kept


def test_a_failed_reload_is_asked_for_again_and_removals_wait_for_it(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config-file target: a reload still busy past its retries is asked for again after
    a pause (ami.reload_retry), and the removed endpoint's contacts go only once a reload
    has ended well."""
    monkeypatch.setattr(changes_module, "RELOAD_RETRY_BASE", 0.2)

    async def scenario() -> tuple[list[str], list[MutableMapping[str, Any]]]:
        peer = FakeAsterisk()
        peer.reload_busy = 4  # the first reload and its 3 retries (fast_settings)
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "config")
        with capture_logs() as logs:
            async with _serving(peer, pbx) as link:
                await eventually(link.book_complete)
                pbx.applied(REMOVED, target_kind="config")
                await eventually(lambda: bool(peer.actions("DBDel")))
                return [a.name for a in peer.received if a.name in ("DBDel", "Reload")], logs

    actions, logs = run(scenario())
    assert actions == ["Reload"] * 5 + ["DBDel"]
    [retry] = [e for e in logs if e["event"] == "ami.reload_retry"]
    assert (retry["result"], retry["failures"]) == ("busy", 1)


def test_a_reload_sent_right_after_another_stays_noted_while_it_runs(store: Engine) -> None:
    """With no gap between reloads (both gaps 0), a reload asked for while another ran
    stays noted owed in the store while it runs: the end of the first one does not drop
    the note the second one still stands for."""

    async def scenario() -> tuple[int, dict[str, str]]:
        peer = FakeAsterisk()
        peer.reload_delay = 0.5
        async with _start_serving(peer, store, "config") as (pbx, link):
            pbx.applied(UPDATED, target_kind="config")
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            pbx.applied(UPDATED, target_kind="config")
            await eventually(lambda: len(peer.actions("Reload")) == 2)
            await eventually(lambda: link.store_idle.is_set() and not link.jobs)
            await asyncio.sleep(0.1)
            return len(peer.actions("Reload")), _all_notes(store)

    reloads, notes = run(scenario())
    assert reloads == 2
    assert notes.get(changes_module.reload_owed_key("lab")) == "1"


def test_a_file_endpoint_edited_then_removed_in_one_batch_loses_its_contacts(
    store: Engine,
) -> None:
    """Config-file target: an endpoint updated and then removed, the two changes taken
    in one batch, has its contacts deleted after the reload: the later change wins."""
    edited = Change(updated=("1001",), wrote=True)
    assert run(_file_actions(store, edited, REMOVED)) == ["Reload", "DBDel"]


#: Endpoint 1001 given to another user (its auth username changed): Change.reowned.
REOWNED = Change(
    updated=("1001",), changed_objects=(("auth", "1001-auth"),), wrote=True, reowned=("1001",)
)


def test_a_file_endpoint_given_to_another_user_loses_the_previous_phones_contacts(
    store: Engine,
) -> None:
    """Config-file target: an endpoint whose owner changed keeps its objects, but the
    previous owner's phone's contacts are deleted once the reload has ended (before it,
    Asterisk still takes the previous credentials)."""
    assert run(_file_actions(store, REOWNED)) == ["Reload", "DBDel"]


def test_a_file_endpoint_removed_then_given_to_another_user_loses_its_contacts(
    store: Engine,
) -> None:
    """Config-file target: an endpoint removed (its user moved away) and added for
    another user before the reload ends, then edited again, has the first user's
    contacts deleted after the reload: they are not the new owner's phone's."""
    reowned = Change(added=("1001",), wrote=True, reowned=("1001",))
    edited = Change(updated=("1001",), wrote=True)
    assert run(_file_actions(store, REMOVED, reowned, edited)) == ["Reload", "DBDel"]


def test_a_realtime_endpoint_given_to_another_user_loses_the_previous_phones_contact(
    store: Engine,
) -> None:
    """Realtime target: an endpoint whose owner changed has the previous owner's contact
    deleted from astdb at once (DBDel by its key), and the book forgets it, so the new
    owner is not shown online with the previous owner's phone."""

    async def scenario() -> tuple[list[str], bool]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            assert link.book["1001"].contacts
            pbx.applied(REOWNED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed)
            reg = link.book.get("1001")
            return _deleted(peer), bool(reg and reg.contacts)

    keys, held = run(scenario())
    assert keys == [CONTACT_KEY]
    assert not held


def test_an_owed_removal_of_a_reowned_endpoint_is_not_cancelled_by_its_new_owners_edits() -> None:
    """A removal owed for an endpoint given to another user stays owed through later adds
    and updates of that endpoint, and is owed no more once paid."""
    owed = Owed()
    owed.add(Change(removed=("1001",)), expire=False)
    owed.add(Change(added=("1001",), reowned=("1001",)), expire=False)
    owed.add(Change(updated=("1001",)), expire=False)
    assert list(owed.removals) == ["1001"]
    owed.paid("1001")
    owed.add(Change(removed=("1001",)), expire=False)
    owed.add(Change(added=("1001",)), expire=False)
    assert not owed.removals


async def _owed_then_restarted(store: Engine, first: Change, second: Change) -> list[str]:
    """Realtime target, Asterisk down: a run is handed ``first`` and stops with its
    contact removal noted owed; the next run is handed ``second`` before Asterisk comes
    back.  Returns the DBDel keys sent once it is back and nothing is owed."""
    peer = FakeAsterisk()
    await peer.start()
    await peer.stop()  # down: nothing is sent before the restart
    before = AmiPbx([_link(peer)], store, "realtime")
    async with running(before):
        await asyncio.sleep(0.2)  # the change loop waits for a change
        before.applied(first, target_kind="realtime")
        await eventually(lambda: "owed_removal:lab:1001" in _owed_notes(store))
    after = AmiPbx([_link(peer)], store, "realtime")
    link = after.links[0]
    try:
        async with running(after):
            await eventually(lambda: link.owed.resumed)
            after.applied(second, target_kind="realtime")
            await eventually(lambda: ("endpoint", "1001") in link.owed.expiries)
            await peer.start()
            await eventually(lambda: link.client.connected and not link.owed)
    finally:
        await peer.stop()
    return _deleted(peer)


def test_a_reowned_endpoints_removal_resumed_after_a_restart_survives_the_new_owners_edit(
    store: Engine,
) -> None:
    """Realtime target: the removal of a previous owner's contacts, noted owed as the
    daemon stopped before Asterisk answered, is still sent after the restart although
    the new owner's endpoint was edited before Asterisk came back: the note says whose
    contacts they are."""
    edited = Change(updated=("1001",), changed_objects=(("endpoint", "1001"),), wrote=True)
    assert run(_owed_then_restarted(store, REOWNED, edited)) == [CONTACT_KEY]


def test_a_removal_resumed_after_a_restart_survives_the_endpoint_added_again(
    store: Engine,
) -> None:
    """Realtime target: a removed endpoint's contact removal, noted owed as the daemon
    stopped, is still sent after the restart although the endpoint is added again before
    Asterisk came back: that run cannot tell whose contacts they are (the previous run
    knew the owner; the endpoint may be another user's now), and a stranger's phone must
    not take the new owner's calls (the owner's own phone registers again)."""
    added = Change(added=("1001",), changed_objects=(("endpoint", "1001"),), wrote=True)
    assert run(_owed_then_restarted(store, REMOVED, added)) == [CONTACT_KEY]


def test_the_last_change_of_a_batch_decides_what_an_endpoint_is() -> None:
    """In a batch, an endpoint's last change decides whether it is there or gone; within
    one change, one added (another user's) wins over one removed."""
    batch = [
        Change(added=("a",), removed=("b",)),
        Change(removed=("a", "c"), updated=("b",)),
        Change(added=("c",), removed=("c",)),
    ]
    assert changes_module.final_states(batch) == ({"b", "c"}, {"a"})


def _owed_notes(store: Engine) -> dict[str, str]:
    """Every note of something owed to an Asterisk server, in the store."""
    with store.connect() as conn:
        rows = conn.execute(select(daemon_state.c.key, daemon_state.c.value)).all()
    return {key: value for key, value in rows if key.startswith("owed_")}


def test_many_expiries_owed_at_a_stop_are_one_note_and_empty_each_cache_after_the_restart(
    store: Engine,
) -> None:
    """More than EXPIRE_ALL_OVER expiries owed to a server that is down are noted as one
    'expire all' row; a new run empties each cache with one action once the server is back,
    then drops the note."""

    async def scenario() -> tuple[dict[str, str], list[str], int, dict[str, str]]:
        peer = FakeAsterisk()
        await peer.start()
        await peer.stop()
        first = AmiPbx([_link(peer)], store, "realtime")
        async with running(first):
            first.applied(_many(EXPIRE_ALL_OVER + 1), target_kind="realtime")
            await eventually(lambda: bool(_owed_notes(store)))
            noted = _owed_notes(store)
        second = AmiPbx([_link(peer)], store, "realtime")
        try:
            async with running(second):
                await peer.start()
                await eventually(lambda: bool(peer.actions("SorceryMemoryCacheExpire")))
                await eventually(lambda: not _owed_notes(store))
        finally:
            await peer.stop()
        emptied = _emptied(peer)
        return noted, emptied, len(_expired(peer)), _owed_notes(store)

    noted, emptied, one_by_one, left = run(scenario())
    assert noted == {"owed_expiries:lab": EXPIRE_ALL_NOTE}
    assert emptied == [CACHE]
    assert one_by_one == 0
    assert left == {}


def test_a_removal_owed_again_while_it_is_being_sent_stays_owed(store: Engine) -> None:
    """A contact removal owed again (a reload ending) while the same endpoint's removal is
    being sent is not taken for paid with it, and stays noted in the store."""

    async def scenario() -> tuple[list[str], bool, dict[str, str]]:
        peer = FakeAsterisk()
        peer.delays["dbdel"] = 0.3
        await peer.start()
        link = _link(peer)
        try:
            async with running(link.client, *_flusher(link, store)):
                await eventually(lambda: link.client.connected)
                link.owed.owe_removals(["1001"])
                note_owed(link)
                sending = asyncio.ensure_future(pay(link))
                await eventually(lambda: bool(peer.actions("DBDel")))
                link.owed.reloaded(link.owed.await_reload(["1001"]))  # as _file_reloaded
                note_owed(link)
                await sending
                await eventually(lambda: bool(_owed_notes(store)))  # the flusher wrote it
                return (
                    _deleted(peer),
                    "1001" in link.owed.removals,
                    _owed_notes(store),
                )
        finally:
            await peer.stop()

    keys, owed, notes = run(scenario())
    assert keys == [CONTACT_KEY]
    assert owed
    assert notes == {"owed_removal:lab:1001": "1001"}


def _flusher(link: Link, store: Engine) -> tuple[AmiPbx]:
    """What runs ``link``'s flusher (and so writes its notes) without its change loop."""

    class Flusher(AmiPbx):
        async def run(self, stop: asyncio.Event) -> None:
            await self._flusher(link, stop)

    return (Flusher([link], store, "realtime"),)


def test_an_expiries_note_keeps_each_objects_kind() -> None:
    """A few owed expiries are noted as [kind, id] pairs and read back as the same pairs,
    so a resumed expiry goes to its kind's caches only."""
    owed = Owed()
    owed.add(UPDATED, expire=True)
    note = owed.expiries_note()
    assert note is not None
    assert changes_module._noted_objects(note) == list(OBJECTS)
    assert changes_module._noted_objects('["100001"]') is None  # unreadable: empty all


def test_a_change_handed_over_as_the_daemon_stops_is_noted_owed(store: Engine) -> None:
    """A config-file change handed to the AMI side just as it stops is not sent, but
    noted: its reload and its removed endpoint's contact removal wait in the store."""
    from provisioner.store.state import load_states

    async def scenario() -> tuple[dict[str, str], int]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "config")
        link = pbx.links[0]
        stop = asyncio.Event()
        task = asyncio.create_task(pbx.run(stop))
        try:
            await eventually(lambda: link.client.connected)
            await asyncio.sleep(0.1)  # the change loop waits for a change
            pbx.applied(Change(removed=("100001",), wrote=True), target_kind="config")
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            await peer.stop()
        with store.connect() as conn:
            return load_states(conn, ""), len(peer.actions("Reload"))

    notes, reloads = run(scenario())
    assert reloads == 0
    assert notes.get(changes_module.reload_owed_key("lab")) == "1"
    assert notes.get(changes_module.owed_removal_key("lab", "100001")) == "100001"


def _all_notes(store: Engine) -> dict[str, str]:
    """Every ``daemon_state`` row, by key."""
    with store.connect() as conn:
        rows = conn.execute(select(daemon_state.c.key, daemon_state.c.value)).all()
    return {key: value for key, value in rows}


def test_a_change_being_sent_as_the_daemon_stops_has_its_reload_noted(store: Engine) -> None:
    """A realtime change whose expiry is on its way when the AMI side stops still has
    the reload it needs noted owed in the store, beside the expiries it could not send."""

    async def scenario() -> tuple[dict[str, str], int]:
        peer = FakeAsterisk()
        peer.delays["sorcerymemorycacheexpireobject"] = 0.5
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "realtime")
        link = pbx.links[0]
        stop = asyncio.Event()
        task = asyncio.create_task(pbx.run(stop))
        try:
            await eventually(lambda: link.client.connected and link.book_complete())
            pbx.applied(ADDED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("SorceryMemoryCacheExpireObject")))
            reload_key = changes_module.reload_owed_key("lab")
            await eventually(lambda: reload_key in _all_notes(store))  # noted before sending
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            await peer.stop()
        return _all_notes(store), len(peer.actions("Reload"))

    notes, reloads = run(scenario())
    assert reloads == 0
    assert notes.get(changes_module.reload_owed_key("lab")) == "1"
    assert changes_module.owed_expiries_key("lab") in notes


def test_a_note_asked_for_just_before_the_stop_is_written_at_the_stop(store: Engine) -> None:
    """A note of something owed, asked for while the flusher is busy with a slow write as
    the AMI side stops, is in the store once it has stopped."""

    async def scenario() -> dict[str, str]:
        peer = FakeAsterisk()
        await peer.start()
        await peer.stop()  # down: what is owed stays owed
        pbx = AmiPbx([_link(peer)], store, "realtime")
        link = pbx.links[0]
        stop = asyncio.Event()
        task = asyncio.create_task(pbx.run(stop))
        await asyncio.sleep(0.2)  # the change loop waits for a change
        slow = link.in_flusher_turn(lambda _conn: time.sleep(0.3))  # a slow store write
        await asyncio.sleep(0.05)  # the flusher is writing it
        link.owed.owe_removals(["1001"])
        changes_module.note_owed(link)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert slow.done()
        return _owed_notes(store)

    assert run(scenario()) == {"owed_removal:lab:1001": "1001"}


def test_a_file_removal_is_never_noted_without_the_reload_it_waits_for(store: Engine) -> None:
    """Config-file target: when the store refuses the reload's note, the removal waiting
    for that reload is not noted either, so a crash then never has the next run delete
    the contacts of an endpoint Asterisk still holds (no reload before it)."""
    from sqlalchemy import text

    refuse_reload_note = text(
        "CREATE TRIGGER refuse_reload BEFORE INSERT ON daemon_state"
        " WHEN NEW.key LIKE 'reload_owed:%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        await peer.start()
        await peer.stop()  # down: nothing is sent in the first run
        with store.begin() as conn:
            conn.execute(refuse_reload_note)
        first = AmiPbx([_link(peer)], store, "config")
        link = first.links[0]
        crash = asyncio.create_task(first.run(asyncio.Event()))
        first.applied(REMOVED, target_kind="config")
        await eventually(lambda: link.reload_noted and not link.jobs)  # asked and taken
        await eventually(link.store_idle.is_set)  # written, or refused
        crash.cancel()  # a crash: nothing more is written
        await asyncio.gather(crash, return_exceptions=True)
        with store.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_reload"))
        second = AmiPbx([_link(peer)], store, "config")
        try:
            async with running(second):
                await peer.start()
                await eventually(lambda: second.links[0].client.connected)
                await asyncio.sleep(0.5)  # a resumed removal would be sent by now
        finally:
            await peer.stop()
        return [a.name for a in peer.received if a.name in ("DBDel", "Reload")]

    sent = run(scenario())
    assert sent[:1] != ["DBDel"]


def test_a_stop_before_the_last_runs_notes_were_read_adds_to_them(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store could not be read for the last run's notes until the stop, the
    changes handed over meanwhile are noted beside those notes, which stay."""
    from sqlalchemy.exc import OperationalError

    from provisioner.store.state import put_state

    def unreadable(*_args: object) -> object:
        raise OperationalError("SELECT", {}, Exception("store unreadable"))

    monkeypatch.setattr(pbx_module, "_read_notes", unreadable)
    with store.begin() as conn:
        put_state(conn, changes_module.owed_removal_key("lab", "1000"), "1000")

    async def scenario() -> dict[str, str]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "config")
        try:
            async with running(pbx):
                await eventually(lambda: pbx.links[0].client.connected)
                pbx.applied(REMOVED, target_kind="config")
                await asyncio.sleep(0.1)
        finally:
            await peer.stop()
        return _all_notes(store)

    notes = run(scenario())
    assert notes.get(changes_module.owed_removal_key("lab", "1000")) == "1000"
    assert notes.get(changes_module.owed_removal_key("lab", "1001")) == "1001"
    assert notes.get(changes_module.reload_owed_key("lab")) == "1"


def test_removals_another_writer_noted_while_the_daemon_ran_survive_its_stop(
    store: Engine,
) -> None:
    """Contact removals a ``sync --once`` noted while the AMI side ran (after it read
    the last run's notes) are still in the store once its stop has rewritten its own
    notes: the next run deletes those phones' contacts."""
    from provisioner.store.engine import transaction

    async def scenario() -> dict[str, str]:
        peer = FakeAsterisk()
        await peer.start()
        pbx = AmiPbx([_link(peer)], store, "config")
        link = pbx.links[0]
        stop = asyncio.Event()
        task = asyncio.create_task(pbx.run(stop))
        try:
            await eventually(lambda: link.client.connected and link.owed.resumed)
            await asyncio.sleep(0.1)  # the change loop waits for a change
            # As the CLI's ``sync --once`` notes them (cli._reconcile).
            cli_change = Change(removed=("1000",), wrote=True)
            await asyncio.to_thread(
                transaction,
                store,
                lambda conn: changes_module.note_untold_removals(conn, ["lab"], cli_change),
            )
            pbx.applied(Change(removed=("100001",), wrote=True), target_kind="config")
            stop.set()  # the change is taken at the stop: its notes are rewritten
            await asyncio.wait_for(task, 10)
        finally:
            await peer.stop()
        return _all_notes(store)

    notes = run(scenario())
    assert notes.get(changes_module.owed_removal_key("lab", "100001")) == "100001"
    assert notes.get(changes_module.owed_removal_key("lab", "1000")) == "1000"


def test_a_removal_while_its_endpoint_is_looked_up_deletes_the_contact(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint removed while its contacts are being looked up (untracked, its phone
    registered since the snapshot) has its contact deleted all the same: until the
    lookup is in, the book is not taken for complete."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.1)

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        peer.astdb.discard(CONTACT_KEY)  # not registered at the start's snapshot
        peer.delays["pjsipshowendpoint"] = 0.5
        await peer.start()
        pbx = AmiPbx([_link(peer, caches=())], store, "realtime")  # no expiry goes first
        async with _serving(peer, pbx) as link:
            await eventually(link.book_complete)
            link.untracked = {"1001"}  # added since the last reload
            peer.astdb.add(CONTACT_KEY)  # the phone registers, untracked: no status event
            await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            pbx.applied(REMOVED, target_kind="realtime")
            await eventually(lambda: not link.owed and not link.unconfirmed)
            await asyncio.sleep(0.7)  # the lookup is in
            return _deleted(peer)

    assert run(scenario()) == [CONTACT_KEY]


def test_a_reload_failing_while_the_ami_side_stops_arms_no_retry() -> None:
    """A reload that fails once the AMI side is stopping arms no retry (its reloader is
    gone): it stays noted owed for the next run."""
    from provisioner.ami.reload import ReloadOutcome

    async def scenario() -> bool:
        peer = FakeAsterisk()
        await peer.start()  # for its port; nothing connects
        try:
            link = _link(peer)
            link.stopping = True
            failed = ReloadOutcome("lab", "res_pjsip.so", "error", 5, 1, 1, "refused")
            changes_module.retry_reload_later(link, failed)
            return link.reload_retry is None
        finally:
            await peer.stop()

    assert run(scenario())


def test_applies_while_reloads_keep_failing_wait_as_one_record_and_lose_nothing(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config-file target: what the ends of reloads that keep failing owe is one merged
    record (one awaiting set) however many applies were made meanwhile, and once a reload
    ends well every removal and check owed by them is sent."""
    monkeypatch.setattr(changes_module, "RELOAD_RETRY_BASE", 0.1)
    monkeypatch.setattr(changes_module, "RELOAD_RETRY_MAX", 0.2)
    edits = [Change(updated=(str(300000 + i),), wrote=True) for i in range(8)]

    async def scenario() -> tuple[int, list[str], list[str]]:
        peer = FakeAsterisk()
        peer.reload_busy = 10**6  # every reload refused
        async with _start_serving(peer, store, "config") as (pbx, link):
            await eventually(link.book_complete)
            for change in (REMOVED, *edits):
                await _applied_then_refused(pbx, link, change)
            await eventually(
                lambda: (
                    not link.reloads.in_flight
                    and not link.reloads.pending
                    and link.after_retry is not None
                )
            )
            waiting = len(link.owed.awaiting)
            peer.reload_busy = 0
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.unverified)
            looked_up = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
            return waiting, _deleted(peer), looked_up

    waiting, deleted, looked_up = run(scenario())
    assert waiting == 1
    assert deleted == [CONTACT_KEY]
    assert {e for c in edits for e in c.updated} <= set(looked_up)


def test_applies_while_asterisk_is_down_wait_as_one_record_and_lose_nothing(
    store: Engine,
) -> None:
    """Config-file target: applies made while the server is down share one waiting
    reload (one future, one merged record, one awaiting set) however many they are,
    and once it is back one reload is sent, then every removal and check they owe."""
    edits = [Change(updated=(str(300000 + i),), wrote=True) for i in range(8)]

    async def scenario() -> tuple[int, int, int, int, list[str], list[str]]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "config") as (pbx, link):
            await eventually(link.book_complete)
            reloads_before = len(peer.actions("Reload"))
            await peer.stop()
            await eventually(lambda: not link.reloads.client.connected)
            for done, change in enumerate((REMOVED, *edits), 1):
                pbx.applied(change, target_kind="config")
                await eventually(lambda: link.reloads.pending == done)  # noqa: B023
            waiting = (len(link.after_reload), len(link.owed.awaiting))
            await peer.start()
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.unverified)
            await eventually(lambda: not link.reload_noted)
            looked_up = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
            assert link.reloads.last_outcome is not None
            return (
                *waiting,
                len(peer.actions("Reload")) - reloads_before,
                link.reloads.last_outcome.requests,
                _deleted(peer),
                looked_up,
            )

    records, awaiting, reloads, requests, deleted, looked_up = run(scenario())
    assert (records, awaiting) == (1, 1)
    assert reloads == 1
    assert requests == 1 + len(edits)
    assert deleted == [CONTACT_KEY]
    assert {e for c in edits for e in c.updated} <= set(looked_up)


async def _applied_then_refused(pbx: AmiPbx, link: Link, change: Change) -> None:
    """Apply ``change`` and wait for a reload after it to be refused."""
    failed = link.totals.reload_results.get("busy", 0)
    pbx.applied(change, target_kind="config")
    await eventually(lambda: link.totals.reload_results.get("busy", 0) > failed)


def test_a_merged_reload_record_owes_what_its_parts_would_in_turn() -> None:
    """Merging what a later reload's end owes into an earlier one's lets each endpoint's
    later state win: removed then added again is verified, added then removed is not."""
    owed = Owed()
    first = changes_module.AfterReload({"a"}, {"b"}, owed.await_reload({"b"}))
    owed.add(Change(added=("b",), removed=("a",)), expire=False, remove=False)
    later = changes_module.AfterReload({"b"}, {"a"}, owed.await_reload({"a"}))
    first.merge(later, owed)
    assert (first.changed, first.gone) == ({"b"}, {"a"})
    assert owed.awaiting == [{"a"}]
    assert first.awaiting is owed.awaiting[0]


@pytest.mark.parametrize("kind", ["config", "realtime"])
def test_a_tracked_phones_refresh_wants_no_lookup(
    store: Engine, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A SuccessfulAuth no status event follows (a registered phone's refresh) of an
    endpoint no apply added since the last reload asks Asterisk nothing: a config
    file's endpoints are tracked once loaded, and a realtime one is untracked only
    between its add and the reload."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)

    async def scenario() -> tuple[int, int]:
        peer = FakeAsterisk()
        await peer.start()
        async with _serving(peer, AmiPbx([_link(peer)], store, kind)) as link:
            await eventually(link.book_complete)
            for _ in range(3):
                await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
                await asyncio.sleep(0.15)
            return len(peer.actions("PJSIPShowEndpoint")), len(peer.actions("PJSIPShowContacts"))

    assert run(scenario()) == (0, 1)


def test_a_realtime_endpoint_added_is_looked_up_until_its_reload_ends_well(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint a realtime apply added authenticates with no status event before the
    reload asked for it ends (it is not tracked yet): it is looked up; after a reload
    Asterisk accepted, its refresh is not."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)

    async def auth(peer: FakeAsterisk) -> None:
        await peer.send_recorded(
            "Event: SuccessfulAuth\r\n",
            "Service: PJSIP",
            replace=((b"AccountID: 1001", b"AccountID: 100001"),),
        )

    async def scenario() -> tuple[list[str], int]:
        peer = FakeAsterisk()
        peer.reload_delay = 0.6
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(link.book_complete)
            pbx.applied(ADDED, target_kind="realtime")
            await eventually(lambda: link.reloads.in_flight)
            await auth(peer)
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            looked_up = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
            await eventually(lambda: not link.reloads.in_flight and link.told())
            before = len(peer.actions("PJSIPShowEndpoint"))
            await auth(peer)
            await asyncio.sleep(0.3)
            return looked_up, len(peer.actions("PJSIPShowEndpoint")) - before

    looked_up, after_reload = run(scenario())
    assert "100001" in looked_up
    assert after_reload == 0


def test_endpoints_untracked_at_a_reload_stay_so_if_it_fails() -> None:
    """Endpoints untracked when a reload is sent are tracked once it ends well; if it
    fails they stay untracked, with those added meanwhile; unknown (None) stays unknown
    until a reload ends well."""
    from provisioner.ami.reload import ReloadOutcome, ReloadResult

    def outcome(result: ReloadResult) -> ReloadOutcome:
        return ReloadOutcome("lab", "res_pjsip.so", result, 1, 1, 1)

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()  # for its port; nothing connects
        try:
            link = _link(peer)
            link.untracked = {"a"}
            ended = link.reload_sent()
            link.untracked.add("b")
            assert link.may_be_untracked("a")
            assert link.may_be_untracked("b")
            ended(outcome("error"))
            assert link.untracked == {"a", "b"}
            ended = link.reload_sent()
            ended(outcome("ok"))
            assert not link.may_be_untracked("a")
            assert not link.may_be_untracked("b")
            link.untracked = None
            ended = link.reload_sent()
            assert link.may_be_untracked("x")
            ended(outcome("timeout"))
            assert link.untracked is None
            ended = link.reload_sent()
            ended(outcome("ok"))
            assert not link.may_be_untracked("x")
        finally:
            await peer.stop()

    run(scenario())


def test_after_a_run_that_owed_a_reload_any_endpoint_may_be_untracked(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A realtime run resuming a reload the last run owed does not know which endpoints
    that run added: a SuccessfulAuth no status event follows is looked up until the
    resumed reload ends well."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)
    with store.begin() as conn:
        put_state(conn, changes_module.reload_owed_key("lab"), "1")

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        peer.reload_delay = 0.6
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(lambda: link.reloads.in_flight)
            await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            return [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]

    assert run(scenario()) == ["1001"]


def _stored_state(store: Engine) -> str | None:
    """User 1's stored summary state on server ``lab`` (None: no row)."""
    summary = registration_summary.c
    query = select(summary.state).where(summary.server == "lab", summary.user_id == 1)
    with store.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


async def _fold_altered_status(
    store: Engine,
    endpoint: str,
    needle: str,
    altered: tuple[tuple[bytes, bytes], ...],
    *,
    forget: bool = False,
) -> tuple[str | None, bool]:
    """Send the recorded ContactStatus holding ``needle`` with ``altered`` replacements,
    for ``endpoint`` (first taken out of the book with ``forget``), once the snapshot is
    in; return user 1's stored state once written, and whether the flusher ended."""
    peer = FakeAsterisk()
    async with _start_serving(peer, store, "realtime") as (_pbx, link):
        await eventually(link.book_complete)
        if forget:
            link.book.pop(endpoint, None)
        await peer.send_recorded("Event: ContactStatus\r\n", needle, replace=altered)
        await eventually(lambda: endpoint in link.book)
        await eventually(lambda: not link.dirty and link.store_idle.is_set())
        await asyncio.sleep(0.1)
        return _stored_state(store), link.flusher_ended


@pytest.mark.parametrize("stamp", [b"nan", b"-inf", b"1e12"])
def test_a_status_event_whose_time_no_date_can_hold_is_stored_without_that_time(
    store: Engine, stamp: bytes
) -> None:
    """A ContactStatus whose Timestamp is not a time a date can hold (NaN, infinite, past
    year 9999) is stored like one without a Timestamp: the phone is online; the flusher
    does not die building its row (which ended the whole AMI side, and the daemon)."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))

    altered = ((b"Timestamp: 1795564305.935754", b"Timestamp: " + stamp),)
    stored = _fold_altered_status(store, "1001", "NonQualified", altered, forget=True)
    assert run(stored) == ("online", False)


def test_a_round_trip_no_database_integer_holds_is_stored_as_unmeasured(store: Engine) -> None:
    """A Reachable ContactStatus whose RoundtripUsec passes a 64-bit integer is stored
    without a round trip: the write raised OverflowError, which no store retry catches,
    and the flusher (the whole AMI side, the daemon) died of it."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="2003"))

    altered = ((b"RoundtripUsec: 556", b"RoundtripUsec: " + b"9" * 20),)
    stored = _fold_altered_status(store, "2003", "ContactStatus: Reachable", altered)
    assert run(stored) == ("online", False)


def test_a_registered_phones_refresh_changes_nothing_in_the_store(store: Engine) -> None:
    """A registered phone's refresh (a SuccessfulAuth five minutes on, no status event)
    writes nothing: the summary's last change stays the registration's."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))

    def changed_at() -> object:
        summary = registration_summary.c
        query = select(summary.changed_at).where(summary.server == "lab", summary.user_id == 1)
        with store.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    async def scenario() -> tuple[object, object, float | None, float]:
        peer = FakeAsterisk()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete)
            for needles in _REGISTER:
                await peer.send_recorded(*needles)
            await eventually(
                lambda: changed_at() is not None and not link.dirty and link.store_idle.is_set()
            )
            await asyncio.sleep(0.3)  # the snapshot and the events written, in either order
            before = changed_at()
            auth = peer.library.find_message("Event: SuccessfulAuth\r\n", "Service: PJSIP")
            found = re.search(rb"Timestamp: ([0-9.]+)", auth)
            assert found is not None
            later = float(found.group(1)) + 300
            refresh = ((found.group(1), str(later).encode()),)
            await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP", replace=refresh)
            await eventually(lambda: link.book["1001"].last_auth_at == later)
            await asyncio.sleep(0.2)
            return before, changed_at(), link.book["1001"].last_auth_at, later

    before, after, seen, later = run(scenario())
    assert after == before
    assert seen == later


async def _event_during_the_starts_snapshot(
    store: Engine, device_state: str, needles: tuple[str, ...]
) -> tuple[str | None, str | None]:
    """User 1 on 1001 stored online (``device_state``) by a last run; the recorded event
    holding ``needles`` sent while the start's snapshot is still being listed: user 1's
    stored state then (past the flush delay and a write), and once the snapshot is in."""
    with store.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))
        online = ("online", device_state, "", None)
        write_endpoint_rows(conn, "lab", {"1001": ([], online)}, datetime(2026, 5, 1, 12))
    peer = FakeAsterisk()
    peer.delays["pjsipshowcontacts"] = 1.0
    await peer.start()
    link = _link(peer)
    async with _serving(peer, AmiPbx([link], store, "realtime")):
        await eventually(lambda: link.snapshot_running)
        await peer.send_recorded(*needles)
        await eventually(lambda: "1001" in link.book)
        await asyncio.sleep(0.3)  # past the flush delay and a write
        assert link.snapshot_running
        during = _stored_state(store)
        await eventually(link.book_complete)
        await eventually(lambda: not link.jobs and link.store_idle.is_set())
        return during, _stored_state(store)


def test_a_refresh_before_the_starts_snapshot_leaves_the_stored_state_alone(
    store: Engine,
) -> None:
    """A registered phone's refresh (a SuccessfulAuth, no status event) that comes while
    the start's snapshot is still being listed writes nothing: its user stays online in
    the store, as the last run left it, instead of turning offline until the list ends."""
    needles = ("Event: SuccessfulAuth\r\n", "Service: PJSIP")
    during, _after = run(_event_during_the_starts_snapshot(store, "NOT_INUSE", needles))
    assert during == "online"


def test_a_call_ending_before_the_starts_snapshot_leaves_the_stored_state_alone(
    store: Engine,
) -> None:
    """A registered phone's call that ends while the start's snapshot is still being
    listed (a DeviceStateChange NOT_INUSE, the book knowing nothing else of it) writes
    nothing: its user stays online in the store, as the last run left it, until the
    snapshot, which then writes what is true."""
    needles = ("Event: DeviceStateChange", "NOT_INUSE")
    stored = _event_during_the_starts_snapshot(store, "INUSE", needles)
    assert run(stored) == ("online", "online")


class _BootingPeer(FakeAsterisk):
    """A fake Asterisk whose first ``unknown`` PJSIPShowContacts get Asterisk's answer to
    an action no module registered (``Invalid/unknown command``), as before res_pjsip has
    loaded: a login is accepted before ``FullyBooted``."""

    unknown = 1
    #: Another ``Response: Error`` message to answer instead (a refusal for good).
    refusal: str | None = None

    async def _answer(self, action: Any) -> bytes:
        if action.name.lower() == "pjsipshowcontacts" and self.unknown > 0:
            self.unknown -= 1
            return self._error(
                action,
                self.refusal
                or f"Invalid/unknown command: {action.name}. "
                "Use Action: ListCommands to show available commands.",
            )
        return await super()._answer(action)


def test_a_snapshot_refused_on_a_live_session_is_asked_for_again(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot Asterisk refuses on a session that stays up is taken again after a pause,
    so the book becomes whole without waiting for a reconnect."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.05)

    async def scenario() -> tuple[int, int, bool]:
        peer = _BootingPeer()
        async with _start_serving(peer, store, "realtime") as (_pbx, link):
            await eventually(link.book_complete, timeout=5)
            return len(peer.actions("PJSIPShowContacts")), link.client.sessions, "1001" in link.book

    asked, sessions, listed = run(scenario())
    assert asked == 2
    assert sessions == 1
    assert listed


def test_a_snapshot_failing_again_and_again_is_logged_once_a_reason_counted_and_its_end_said(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot Asterisk keeps refusing, then leaves unanswered, on a session that stays
    up logs one warning (registration.snapshot_failed) per reason for the whole run (the
    refusal's, then the missing answer's), the health record counts the failures and
    shows the last reason, and the answered snapshot that ends the run logs
    registration.snapshot_recovered once, with the count, the health record's count back
    to 0."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.02)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_RETRY_MAX", 0.1)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[MutableMapping[str, Any]]]:
        peer = _BootingPeer()
        peer.unknown = 1_000_000
        peer.refusal = "Permission denied"
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(action_timeout=0.2))
        reloads = ReloadCoordinator(client, fast_settings())
        link = Link("lab", client, reloads, PjsipOps(client), caches_by_kind((CACHE,)))
        pbx = AmiPbx([link], store, "realtime")
        with capture_logs() as logs:
            async with _serving(peer, pbx):
                await eventually(lambda: link.snapshot_failures >= 3)
                peer.unknown = 0
                peer.delays["pjsipshowcontacts"] = 1.0  # unanswered within 0.2 s
                asked = len(peer.actions("PJSIPShowContacts"))
                await eventually(lambda: len(peer.actions("PJSIPShowContacts")) >= asked + 2)
                await eventually(lambda: "no answer" in link.snapshot_error)
                failing = pbx.health()["lab"]
                peer.delays.clear()
                await eventually(link.book_complete, timeout=5)
                return failing, pbx.health()["lab"], logs

    failing, healthy, logs = run(scenario())
    assert failing["snapshot_failures"] >= 5
    assert "PJSIPShowContacts: no answer in 0.2s" in failing["snapshot_error"]
    assert (healthy["snapshot_failures"], healthy["snapshot_error"]) == (0, "")
    loud = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert [e["event"] for e in loud] == ["registration.snapshot_failed"] * 2
    assert "Permission denied" in loud[0]["error"]
    assert "no answer in 0.2s" in loud[1]["error"]
    (recovered,) = [e for e in logs if e["event"] == "registration.snapshot_recovered"]
    assert recovered["failures"] >= 5
    assert (
        len([e for e in logs if e["event"] == "registration.snapshot_failed"])
        == (recovered["failures"])
    )


def test_a_removal_whose_listing_asterisk_does_not_know_yet_stays_owed(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed endpoint's contacts, listed while Asterisk does not know PJSIPShowContacts
    yet (res_pjsip still loading), stay owed and are deleted once it answers, not dropped
    as if refused for good."""
    monkeypatch.setattr(pbx_module, "OWED_RETRY", 0.2)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 5.0)  # the book stays incomplete

    async def scenario() -> tuple[list[str], bool]:
        peer = _BootingPeer()
        peer.unknown = 2  # the connect's snapshot, then the removal's listing
        async with _start_serving(peer, store, "realtime") as (pbx, link):
            await eventually(lambda: peer.unknown == 1)
            pbx.applied(REMOVED, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")) and not link.owed, timeout=4)
            return _deleted(peer), CONTACT_KEY in peer.astdb

    keys, held = run(scenario())
    assert keys == [CONTACT_KEY]
    assert not held


def _refused_listing_removal(
    store: Engine, refusals: int
) -> tuple[list[str], bool, list[MutableMapping[str, Any]]]:
    """Remove endpoint 1001 while Asterisk refuses its first ``refusals`` contact
    listings (``Permission denied``: the connect's snapshot, then the removal's own), the
    book never complete, until a DBDel is sent or the removal is dropped: the keys
    deleted, whether a removal is still owed, and the log."""

    async def scenario() -> tuple[list[str], bool, list[MutableMapping[str, Any]]]:
        peer = _BootingPeer()
        peer.unknown = refusals
        peer.refusal = "Permission denied"
        with capture_logs() as logs:
            async with _start_serving(peer, store, "realtime") as (pbx, link):
                await eventually(lambda: bool(peer.actions("PJSIPShowContacts")))
                pbx.applied(REMOVED, target_kind="realtime")
                await eventually(
                    lambda: (
                        bool(peer.actions("DBDel"))
                        or any(e["event"] == "ami.owed_dropped" for e in logs)
                    ),
                    timeout=5,
                )
                await eventually(lambda: not link.owed.removals)
                return _deleted(peer), bool(link.owed.removals), logs

    return run(scenario())


def test_a_removal_whose_contact_listing_asterisk_refuses_stays_owed_and_is_retried(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed endpoint's contacts whose listing Asterisk refuses (``Response: Error``)
    stay owed, the refusal logged (``ami.owed_refused``), and are deleted once a later
    listing answers, not dropped with the refusal."""
    monkeypatch.setattr(pbx_module, "OWED_RETRY", 0.1)
    monkeypatch.setattr(changes_module, "OWED_RETRY", 0.1)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 30.0)  # the book stays incomplete

    keys, owed, logs = _refused_listing_removal(store, refusals=3)
    assert keys == [CONTACT_KEY]
    assert not owed
    refused = [e for e in logs if e["event"] == "ami.owed_refused"]
    assert [e["what"] for e in refused] == ["list_contacts", "list_contacts"], refused
    assert refused[0]["item"] == "1001"
    assert refused[0]["error"] == "Permission denied"


def test_a_removal_whose_contact_listing_is_always_refused_is_dropped_after_a_bound(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal whose contact listing Asterisk keeps refusing is tried
    ``LISTING_REFUSALS_MAX`` times, then dropped, saying so (``ami.owed_dropped``), not
    tried for ever."""
    monkeypatch.setattr(pbx_module, "OWED_RETRY", 0.1)
    monkeypatch.setattr(changes_module, "OWED_RETRY", 0.1)
    monkeypatch.setattr(changes_module, "LISTING_REFUSALS_MAX", 3)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 30.0)

    keys, owed, logs = _refused_listing_removal(store, refusals=1000)
    assert keys == []
    assert not owed
    tries = [e for e in logs if e["event"] == "ami.owed_refused" and e["what"] == "list_contacts"]
    assert len(tries) == 3
    (dropped,) = [e for e in logs if e["event"] == "ami.owed_dropped"]
    assert dropped["removals"] == 1
    assert dropped["error"] == "Permission denied"


def test_an_endpoint_asterisk_said_invalid_is_looked_up_when_added_again(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint Asterisk called INVALID (deleted, then a reload) and a realtime apply
    adds again is not tracked by Asterisk until its reload ends: its phone's
    SuccessfulAuth, with no status event after it, has it looked up, and it is online."""
    monkeypatch.setattr(pbx_module, "CONFIRM_WINDOW", 0.05)
    added = Change(added=("1001",), changed_objects=(("endpoint", "1001"),), wrote=True)

    async def scenario() -> tuple[int, bool, str]:
        peer = FakeAsterisk()
        peer.reload_delay = 1.0
        await peer.start()
        link = _link(peer)
        quiet = server_for(peer).model_copy(update={"events": "off"})
        link.reloads = ReloadCoordinator(AmiClient(quiet, fast_settings()), fast_settings())
        pbx = AmiPbx([link], store, "realtime")
        async with _serving(peer, pbx):
            await eventually(link.book_complete)
            await peer.send_recorded(
                "Event: DeviceStateChange", "UNAVAILABLE", replace=((b"UNAVAILABLE", b"INVALID"),)
            )
            await eventually(lambda: not link.book["1001"].exists)
            pbx.applied(added, target_kind="realtime")
            await eventually(lambda: link.reloads.in_flight and not link.unverified)
            before = len(peer.actions("PJSIPShowEndpoint"))
            await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
            await asyncio.sleep(0.4)
            return (
                len(peer.actions("PJSIPShowEndpoint")) - before,
                link.reloads.in_flight,
                link.book["1001"].summary,
            )

    looked_up, reload_running, summary = run(scenario())
    assert reload_running
    assert looked_up == 1
    assert summary == "online"


def test_a_contact_list_past_max_list_bytes_fails_its_snapshot_and_the_session_goes_on(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PJSIPShowContacts answer past ami.max_list_bytes (2,000 contacts, 1 MB, over 64
    KiB) fails that snapshot (registration.snapshot_failed naming the bound), the session
    stays up and its events are still folded, and the snapshot is asked for again after
    the retry pause: once the list fits, the book is complete on the same session."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.05)

    async def scenario() -> tuple[int, list[MutableMapping[str, Any]]]:
        peer = FakeAsterisk()
        peer.list_items["pjsipshowcontacts"] = 2000
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(max_list_bytes=1 << 16))
        reloads = ReloadCoordinator(client, fast_settings())
        link = Link("lab", client, reloads, PjsipOps(client), caches_by_kind((CACHE,)))
        with capture_logs() as logs:
            async with _serving(peer, AmiPbx([link], store, "realtime")):
                await eventually(lambda: len(peer.actions("PJSIPShowContacts")) >= 2)
                assert not link.book_complete()
                await peer.send_recorded("Event: PeerStatus\r\n", "PeerStatus: Reachable")
                await eventually(lambda: "1001" in link.book)
                peer.list_items.clear()
                await eventually(link.book_complete, timeout=5)
                return link.client.sessions, logs

    sessions, logs = run(scenario())
    assert sessions == 1
    failed = [e for e in logs if e["event"] == "registration.snapshot_failed"]
    assert failed
    assert all("over 65536 bytes" in e["error"] for e in failed)
    assert any(e["event"] == "registration.snapshot_retry" for e in logs)
    assert {e["limit"] for e in logs if e["event"] == "ami.protocol_error"} == {"list_bytes"}


def test_a_reconnect_during_a_snapshot_retry_pause_takes_its_snapshot_at_once(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause before a refused snapshot is asked for again ends when the connection is
    made anew: the new session's snapshot does not wait for it."""
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.05)

    async def scenario() -> int:
        peer = _BootingPeer()
        await peer.start()
        link = _link(peer)
        link.snapshot_failures = 20  # refused many times: the next pause is the longest
        async with _serving(peer, AmiPbx([link], store, "realtime")):
            await eventually(lambda: peer.unknown == 0)
            await asyncio.sleep(0.1)
            peer.drop_all()
            await eventually(lambda: link.client.sessions == 2 and link.book_complete())
            return len(peer.actions("PJSIPShowContacts"))

    assert run(scenario()) == 2


def test_an_endpoint_changed_again_during_its_check_is_checked_again(store: Engine) -> None:
    """A config-file edit reloaded while the endpoint's previous check is still waiting for
    Asterisk's answer has the endpoint checked once more afterwards: the older answer
    does not stand for the newer change."""

    async def scenario() -> list[str]:
        peer = FakeAsterisk()
        peer.reload_delay = 0.3
        peer.delays["PJSIPShowEndpoint"] = 1.0
        async with _start_serving(peer, store, "config") as (pbx, link):
            pbx.applied(UPDATED, target_kind="config")
            await eventually(lambda: bool(peer.actions("Reload")))
            # Pending behind the first reload: sent when it ends, as the check of the
            # first starts, and ended (0.3 s) while that check waits (1 s).
            pbx.applied(UPDATED, target_kind="config")
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            await eventually(lambda: len(peer.actions("Reload")) == 2)
            await eventually(lambda: not link.reloads.in_flight and not link.reloads.pending)
            await eventually(lambda: not link.unverified, timeout=5)
            await asyncio.sleep(0.5)  # a second check would have been sent by now
            return [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]

    assert run(scenario()) == ["100001", "100001"]


def test_health_does_not_count_online_a_contact_long_past_its_expiry(store: Engine) -> None:
    """The health record's (and metrics') online count leaves out an endpoint whose only
    usable contact is more than 60 s past its expiry, as ``status`` does; a contact
    within those 60 s, or not yet expired, still counts."""
    from provisioner.ami.registration import ContactState, EndpointRegistration

    async def scenario() -> int:
        peer = FakeAsterisk()
        peer.expiry_shift = AN_HOUR_AGO  # the recorded contact has expired
        await peer.start()
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            async with running(pbx):
                await eventually(link.live)  # read now; the book is filled here, not by events
                now = int(time.time())
                book = link.book
                for endpoint, expires_at in (
                    ("gone", now - 120),
                    ("late", now - 30),
                    ("on", now + 600),
                ):
                    contact = ContactState(endpoint, f"sip:{endpoint}@10.0.0.1", "Reachable")
                    contact = contact._replace(expires_at=expires_at)
                    book[endpoint] = EndpointRegistration(endpoint, (contact,))
                online = int(pbx.health()["lab"]["online"])
        finally:
            await peer.stop()
        return online

    assert run(scenario()) == 2


def test_health_has_no_online_count_for_a_server_whose_session_is_lost(store: Engine) -> None:
    """The health record's (and metrics') online count of a server is None while its
    session is down (the book is what it said before, not what it holds now), and is
    counted again once the reconnect's snapshot is stored."""
    from provisioner.ami.registration import ContactState, EndpointRegistration

    async def scenario() -> tuple[int | None, int | None, int | None]:
        peer = FakeAsterisk()
        peer.expiry_shift = AN_HOUR_AGO  # the recorded contact has expired
        await peer.start()
        link = _link(peer)
        pbx = AmiPbx([link], store, "realtime")
        try:
            async with running(pbx):
                await eventually(link.live)
                contact = ContactState("on", "sip:on@10.0.0.1", "Reachable")
                link.book["on"] = EndpointRegistration("on", (contact,))
                before = pbx.health()["lab"]["online"]
                await peer.stop()
                await eventually(lambda: not link.client.connected)
                during = pbx.health()["lab"]["online"]
                await peer.start()
                await eventually(link.live)
                after = pbx.health()["lab"]["online"]
        finally:
            await peer.stop()
        return before, during, after

    before, during, after = run(scenario())
    assert before == 1
    assert during is None
    assert after is not None
