"""What an applied change becomes on an Asterisk server (cache expiries, reloads, contact
removals, the post-apply check) when AMI fails: nothing owed is lost, over a real socket
to the fake Asterisk."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from bench.common import seed_store
from provisioner.ami.changes import EXPIRE_ALL_OVER, Owed
from provisioner.ami.client import AmiClient
from provisioner.ami.pbx import AmiPbx, Link
from provisioner.ami.reload import PjsipOps, ReloadCoordinator
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.targets import Change

from .amipeer import FakeAsterisk, eventually, fast_settings, run, running, server_for

CACHE = "ep_cache"  # the cache the fake Asterisk has (sorcery_memory_cache.txt)
OBJECTS = (("endpoint", "100001"), ("auth", "100001-auth"), ("aor", "100001"))
#: Each object id once: an expiry goes to every cache, so one covers the endpoint and AOR.
IDS = ["100001", "100001-auth"]
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


def _link(peer: FakeAsterisk) -> Link:
    client = AmiClient(server_for(peer), fast_settings())
    ops = PjsipOps(client, (CACHE,))
    return Link("lab", client, ReloadCoordinator(client, fast_settings()), ops, (CACHE,))


def _expired(peer: FakeAsterisk) -> list[str]:
    return [a.get("Object") for a in peer.actions("SorceryMemoryCacheExpireObject")]


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
    """Expiries are owed in the order the changes named the objects, each id once, and only
    when asked for (a config-file target, or no cache configured, owes none)."""
    owed = Owed()
    owed.add(UPDATED, expire=False)
    assert not owed
    owed.add(UPDATED, expire=True)
    owed.add(ADDED, expire=True)
    assert list(owed.expiries) == IDS


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
                emptied = [a.get("Cache") for a in peer.actions("SorceryMemoryCacheExpire")]
                return emptied, len(_expired(peer)), bool(link.owed)
        finally:
            await peer.stop()

    emptied, one_by_one, owed = run(scenario())
    assert emptied == [CACHE] * whole
    assert one_by_one == (0 if whole else objects)
    assert not owed


def test_a_missing_cache_is_logged_when_emptied_and_nothing_stays_owed(store: Engine) -> None:
    """Emptying a cache Asterisk does not have logs ami.cache_missing and owes nothing
    more (the objects are read from the database anyway); the other cache is emptied."""

    async def scenario() -> tuple[list[str], bool, list[MutableMapping[str, Any]]]:
        peer = FakeAsterisk()
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings())
        caches = ("no_such_cache", CACHE)
        ops = PjsipOps(client, caches)
        link = Link("lab", client, ReloadCoordinator(client, fast_settings()), ops, caches)
        pbx = AmiPbx([link], store, "realtime")
        try:
            with capture_logs() as logs:
                async with running(pbx):
                    await eventually(lambda: link.client.connected)
                    pbx.applied(_many(EXPIRE_ALL_OVER + 1), target_kind="realtime")
                    await eventually(lambda: len(peer.actions("SorceryMemoryCacheExpire")) == 2)
                    await eventually(lambda: not link.owed)
            emptied = [a.get("Cache") for a in peer.actions("SorceryMemoryCacheExpire")]
            return emptied, bool(link.owed), logs
        finally:
            await peer.stop()

    emptied, owed, logs = run(scenario())
    assert emptied == ["no_such_cache", CACHE]
    assert not owed
    missing = [e for e in logs if e["event"] == "ami.cache_missing"]
    assert [e["cache"] for e in missing] == ["no_such_cache"]
    assert any(e["event"] == "ami.caches_expired" for e in logs)
