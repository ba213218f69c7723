"""What an applied change becomes on an Asterisk server (cache expiries, reloads, contact
removals, the post-apply check) when AMI fails: nothing owed is lost, over a real socket
to the fake Asterisk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bench.common import seed_store
from provisioner.ami.changes import Owed
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
