"""Registration state in the store: ``write_endpoint_rows`` and the flusher, on every backend."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, create_engine, delete, event, select, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs

from bench.common import seed_store
from provisioner.accounts import Accounts
from provisioner.ami import pbx as pbx_module
from provisioner.ami.client import AmiClient
from provisioner.ami.pbx import AmiPbx, Link
from provisioner.ami.registration import apply_events
from provisioner.ami.reload import PjsipOps, ReloadCoordinator
from provisioner.health import Health
from provisioner.store import registrations as registrations_module
from provisioner.store.bulk import has_json_table
from provisioner.store.engine import is_conflict, open_engine, reading, transaction
from provisioner.store.registrations import (
    LIVE_FOR,
    ContactRow,
    EndpointRows,
    SummaryRow,
    clock_key,
    database_epoch,
    epoch_text,
    forget_other_servers,
    live_key,
    live_mark,
    mark_live,
    replace_server_snapshot,
    set_problems,
    status_rows,
    time_text,
    write_endpoint_rows,
)
from provisioner.store.schema import daemon_state, registration_summary, users
from provisioner.store.state import put_state
from provisioner.targets import Change

from .amipeer import (
    AN_HOUR_AGO,
    FakeAsterisk,
    ReceivedAction,
    eventually,
    fast_settings,
    run,
    running,
    server_for,
)
from .helpers import collections_seen

NOW = datetime(2026, 5, 1, 12, 0, 0, 123456)


class _Contact(NamedTuple):
    """A stored contact as the ``registrations`` table held it before migration 0014."""

    user_id: int
    server: str
    contact_id: str
    uri: str
    status: str
    user_agent: str
    source: str
    rtt_usec: int | None
    expires_at: datetime | None
    changed_at: datetime


#: The summary's columns but its contacts (read by :func:`_contacts`).
_SUMMARY = [c for c in registration_summary.c if c.name != "contacts"]


def _contacts(conn: Connection, *fields: str, server: str | None = None) -> list[Any]:
    """The contacts the summaries hold (of ``server``, or all), by user then contact id:
    each a :class:`_Contact`, or the tuple of its ``fields``."""
    summary = registration_summary.c
    query = select(summary.user_id, summary.server, summary.contacts).where(
        summary.contacts.is_not(None)
    )
    if server is not None:
        query = query.where(summary.server == server)
    found = []
    for uid, name, text_ in conn.execute(query):
        for values in json.loads(text_):
            cid, uri, status, agent, source, rtt, expires, changed = values
            found.append(
                _Contact(
                    uid,
                    name,
                    cid,
                    uri,
                    status,
                    agent,
                    source,
                    rtt,
                    None if expires is None else datetime.fromisoformat(expires),
                    datetime.fromisoformat(changed),
                )
            )
    found.sort(key=lambda c: (c.user_id, c.server, c.contact_id))
    if not fields:
        return found
    return [tuple(getattr(c, f) for f in fields) for c in found]


SEEN = datetime(2026, 5, 1, 11, 59, 58, 654321)
#: SEEN as the plain rows carry times: the store's timestamp text.
SEEN_TEXT = "2026-05-01 11:59:58.654321"


@asynccontextmanager
async def _lab_pbx(engine: Engine) -> AsyncIterator[tuple[FakeAsterisk, Link, AmiPbx]]:
    """A running AmiPbx with one link, "lab", to a fake Asterisk over a real socket, once
    its connect snapshot is written: (the peer, the link, the AmiPbx)."""
    peer = FakeAsterisk()
    await peer.start()
    client = AmiClient(server_for(peer), fast_settings())
    link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
    pbx = AmiPbx([link], engine, "realtime")
    try:
        async with running(pbx):
            await eventually(lambda: link.last_snapshot > 0 and client.connected)
            await asyncio.sleep(0.3)  # the connect snapshot written
            yield peer, link, pbx
    finally:
        await peer.stop()


def _state(ep: str, status: str) -> tuple[list[ContactRow], SummaryRow]:
    """One contact of ``ep`` seen at SEEN, and an online summary, as the flusher's rows."""
    uri = f"sip:{ep}@10.0.0.1:5060"
    contact = (f"{ep};@abc", uri, status, "Phone/1", "", 1234, SEEN_TEXT, SEEN_TEXT)
    return [contact], ("online", "NOT_INUSE", "", SEEN_TEXT)


def test_a_write_replaces_rows_and_round_trips_values(engine: Engine) -> None:
    """Contacts and summaries of known endpoints are replaced; values and times read back."""
    seed_store(engine, 3)
    with engine.begin() as conn:
        assert write_endpoint_rows(conn, "pbx1", {"100000": _state("100000", "Unknown")}, NOW) == 1
    states = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001", "trunk")}
    with engine.begin() as conn:
        assert write_endpoint_rows(conn, "pbx1", states, NOW) == 2
    with engine.connect() as conn:
        rows = _contacts(conn)
        sums = conn.execute(select(*_SUMMARY)).all()
        people = {p["extension"]: p for p in status_rows(conn, now=NOW)}
    assert [(r.user_id, r.status, r.rtt_usec, r.expires_at, r.changed_at) for r in rows] == [
        (1, "NonQualified", 1234, SEEN, SEEN),
        (2, "NonQualified", 1234, SEEN, SEEN),
    ]
    assert sorted((s.user_id, s.state, s.device_state, s.changed_at) for s in sums) == [
        (1, "online", "NOT_INUSE", SEEN),
        (2, "online", "NOT_INUSE", SEEN),
    ]
    assert people["100000"]["state"] == "online"
    assert people["100002"]["state"] == "offline"


def test_each_contact_lands_under_its_own_user_beside_trunks_and_empty_endpoints(
    engine: Engine,
) -> None:
    """Contacts of a batch whose endpoints interleave users with several contacts, users
    with none and a trunk (no user) with contacts are each stored under their own user,
    on a first write and on a rewrite."""
    seed_store(engine, 3)

    def contact(ep: str, key: str) -> ContactRow:
        return (f"{ep};@{key}", f"sip:{ep}-{key}@10.0.0.1", "Reachable", "", "", 5, None, None)

    summary: SummaryRow = ("online", "NOT_INUSE", "", SEEN_TEXT)
    batch = {
        "100000": ([contact("100000", "a"), contact("100000", "b")], summary),
        "100000x": ([contact("100000x", "a"), contact("100000x", "b")], summary),  # a trunk
        "100001": ([], ("offline", "", "", SEEN_TEXT)),
        "100002": ([contact("100002", "a")], summary),
    }
    for _ in range(2):
        with engine.begin() as conn:
            assert write_endpoint_rows(conn, "pbx1", batch, NOW) == 3
        contacts, _ = _tables(engine)
        assert [(c[0], c[2], c[3]) for c in contacts] == [
            (1, "100000;@a", "sip:100000-a@10.0.0.1"),
            (1, "100000;@b", "sip:100000-b@10.0.0.1"),
            (3, "100002;@a", "sip:100002-a@10.0.0.1"),
        ]


def test_snapshot_replaces_every_contact_and_problems_are_kept(engine: Engine) -> None:
    """A snapshot leaves exactly its contacts and summaries for the server (another
    endpoint's summary goes offline); a problem lands in the summary."""
    seed_store(engine, 3)
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100002": _state("100002", "Reachable")}, NOW)
        snapshot = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001", "trunk")}
        assert replace_server_snapshot(conn, "pbx1", snapshot, NOW) == 2
        assert set_problems(conn, "pbx1", {"100000": "rejected", "100002": ""}, NOW) == 2
    with engine.connect() as conn:
        rows = _contacts(conn, "user_id", "changed_at")
        summary = registration_summary.c
        sums = conn.execute(select(summary.user_id, summary.state, summary.problem))
        states = sorted(tuple(r) for r in sums)
    assert sorted(tuple(r) for r in rows) == [(1, SEEN), (2, SEEN)]
    assert states == [(1, "online", "rejected"), (2, "online", ""), (3, "offline", "")]


def test_a_snapshot_that_finds_a_phone_as_the_last_run_left_it_keeps_its_last_change(
    engine: Engine,
) -> None:
    """A snapshot (a daemon's start: no event time known) finding an endpoint in the state
    the store holds keeps the stored last change, of its summary and its contacts; an
    endpoint whose state it changes takes the snapshot's time."""
    seed_store(engine, 2)
    phone = ("100000;@a", "sip:100000@10.0.0.1:5060", "NonQualified", "P/1", "", None, None)
    with engine.begin() as conn:
        rows = {
            "100000": ([(*phone, SEEN_TEXT)], ("online", "NOT_INUSE", "", SEEN_TEXT)),
            "100001": ([], ("offline", "UNAVAILABLE", "", SEEN_TEXT)),
        }
        write_endpoint_rows(conn, "pbx1", rows, SEEN)
    other = ("100001;@b", "sip:100001@10.0.0.2", *phone[2:])
    online: SummaryRow = ("online", "", "", None)
    snapshot = {"100000": ([(*phone, None)], online), "100001": ([(*other, None)], online)}
    with engine.begin() as conn:
        replace_server_snapshot(conn, "pbx1", snapshot, NOW)
    with engine.connect() as conn:
        summary = registration_summary.c
        sums = sorted(tuple(r) for r in conn.execute(select(summary.user_id, summary.changed_at)))
        cons = sorted(_contacts(conn, "user_id", "changed_at"))
        people = {r["extension"]: r["last_change"] for r in status_rows(conn)}
    assert sums == [(1, SEEN), (2, NOW)]
    assert cons == [(1, SEEN), (2, NOW)]
    assert people == {"100000": SEEN, "100001": NOW}


def test_a_user_online_on_one_server_is_online_though_another_finds_its_contact_unreachable(
    engine: Engine,
) -> None:
    """``status`` says online for a user one server holds online (registered, no contact
    row: its peer said Reachable) while another server's contact of it does not answer."""
    seed_store(engine, 1)
    (contact,), _ = _state("100000", "Unreachable")
    with engine.begin() as conn:
        registered: tuple[list[ContactRow], SummaryRow] = (
            [],
            ("online", "NOT_INUSE", "", SEEN_TEXT),
        )
        write_endpoint_rows(conn, "pbx1", {"100000": registered}, NOW)
        silent = ([contact], ("unreachable", "UNAVAILABLE", "", SEEN_TEXT))
        write_endpoint_rows(conn, "pbx2", {"100000": silent}, NOW)
    with engine.connect() as conn:
        (person,) = status_rows(conn)
    assert sorted(s["state"] for s in person["servers"]) == ["online", "unreachable"]
    assert person["state"] == "online"


def test_a_server_no_one_reads_makes_its_users_state_unknown_not_what_it_last_said(
    engine: Engine,
) -> None:
    """A configured server whose live mark is ``down``, older than ``LIVE_FOR`` (a killed
    daemon's last beat) or missing leaves a user no live server holds online ``unknown``,
    its rows shown as last known (``live: false``, ``stale``); a live server's online wins."""
    seed_store(engine, 2)
    with engine.connect() as conn:
        epoch = database_epoch(conn)  # the clock status judges marks by
    registered = _state("100000", "NonQualified")
    gone: tuple[list[ContactRow], SummaryRow] = ([], ("offline", "UNAVAILABLE", "", SEEN_TEXT))
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": registered, "100001": gone}, NOW)
        write_endpoint_rows(conn, "pbx2", {"100000": gone, "100001": registered}, NOW)
        put_state(conn, live_key("pbx1"), live_mark(True, epoch - 30))
        put_state(conn, live_key("pbx2"), live_mark(False, epoch - 30))

    def shown(**marks: str) -> dict[str, dict[str, Any]]:
        with engine.begin() as conn:
            for server, mark in marks.items():
                put_state(conn, live_key(server), mark)
            rows = status_rows(conn, now=NOW, servers=["pbx1", "pbx2"])
        return {p["extension"]: p for p in rows}

    people = shown()
    assert people["100000"]["state"] == "online"  # pbx1, read now, holds it online
    assert people["100001"]["state"] == "unknown"  # only pbx2, not read, said online
    (on1, on2) = people["100001"]["servers"]
    assert (on1["server"], on1["live"], on2["server"], on2["live"]) == ("pbx1", True, "pbx2", False)
    assert [c["stale"] for c in people["100001"]["contacts"]] == [True]
    assert people["100001"]["user_agent"] == "Phone/1"  # last known, shown as such
    stale = live_mark(True, epoch - LIVE_FOR.total_seconds() - 1)
    people = shown(pbx1=stale, pbx2=live_mark(True, epoch))
    assert (people["100000"]["state"], people["100001"]["state"]) == ("unknown", "online")
    with engine.begin() as conn:
        conn.execute(delete(daemon_state))
    people = shown()  # never marked: no daemon read either since this code runs
    assert {p["state"] for p in people.values()} == {"unknown"}
    with engine.connect() as conn:  # no server configured: nothing to be unknown about
        assert {p["state"] for p in status_rows(conn, now=NOW)} == {"online"}


#: How far off the tests' skewed clocks run: well past ``LIVE_FOR``.
_SKEW = 300.0


def _utc_now(offset: float = 0.0) -> datetime:
    """This host's naive UTC time, ``offset`` seconds off."""
    return datetime.fromtimestamp(time.time() + offset, UTC).replace(tzinfo=None)


def test_a_status_reader_whose_clock_is_off_judges_a_mark_by_its_real_age(
    engine: Engine,
) -> None:
    """A reader whose clock runs 5 minutes ahead or behind takes a 10 s old live mark for
    live and a 2 minutes old one for stale: the age is the database's clock's."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        registered, summary = _state("100000", "NonQualified")
        expires = time_text(_utc_now(3600))  # not expired by either clock
        contact = (*registered[0][:6], expires, registered[0][7])
        write_endpoint_rows(conn, "pbx1", {"100000": ([contact], summary)}, NOW)

    def state(age: float, skew: float) -> str:
        with engine.begin() as conn:
            put_state(conn, live_key("pbx1"), live_mark(True, time.time() - age))
        with engine.connect() as conn:
            (person,) = status_rows(conn, now=_utc_now(skew), servers=["pbx1"])
        return str(person["state"])

    for skew in (_SKEW, -_SKEW):
        assert (state(10, skew), state(120, skew)) == ("online", "unknown"), skew


def test_a_daemon_whose_clock_is_off_marks_a_server_live_as_of_the_database_clock(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon whose clock runs 5 minutes ahead marks its server live for a status
    reader with a right clock: the mark's time is the database's."""
    seed_store(engine, 1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + _SKEW)

    async def marked() -> str:
        async with _lab_pbx(engine):
            await eventually(lambda: _mark(engine, "lab").startswith("live:"))
            monkeypatch.setattr(time, "time", real)
            with engine.connect() as conn:
                (person,) = status_rows(conn, now=_utc_now(), servers=["lab"])
            return str(person["state"])

    assert run(marked()) == "offline"  # read now, and no phone registered: not unknown


def _expiring(ep: str, at: float) -> tuple[list[ContactRow], SummaryRow]:
    """``ep`` registered (one contact, an online summary) with Asterisk's expiry ``at``
    (epoch seconds), as the flusher writes it."""
    (contact,), summary = _state(ep, "NonQualified")
    return [(*contact[:6], epoch_text(at), contact[7])], summary


def _expiry_view(engine: Engine, server: str) -> dict[str, tuple[str, list[bool]]]:
    """``status``'s state and contacts' ``expired`` of every user, by extension."""
    with engine.connect() as conn:
        people = status_rows(conn, servers=[server])
    return {p["extension"]: (p["state"], [c["expired"] for c in p["contacts"]]) for p in people}


#: A phone registered for 2 more minutes, and one whose expiry passed 3 minutes ago
#: (past ``EXPIRED_AFTER``), as ``_expiry_view`` shows them.
_JUDGED = {"100000": ("online", [False]), "100001": ("offline", [True])}


class _SkewedDatetime(datetime):
    """``datetime`` whose ``now`` is ``time.time``'s (a test skews that)."""

    @classmethod
    def now(cls, tz: Any = None) -> _SkewedDatetime:
        return cls.fromtimestamp(time.time(), tz)


def test_a_status_reader_whose_clock_is_off_judges_contact_expiries_right(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader whose clock runs 5 minutes ahead or behind shows a contact expiring in 2
    minutes as live and one 3 minutes past its expiry as expired: expiries are judged on
    the database's clock (and the daemon's offset from it), not the reader's."""
    seed_store(engine, 2)
    real = time.time
    with engine.begin() as conn:
        rows = {
            "100000": _expiring("100000", real() + 120),
            "100001": _expiring("100001", real() - 180),
        }
        write_endpoint_rows(conn, "pbx1", rows, NOW)
        mark_live(conn, "pbx1", True)
    monkeypatch.setattr(registrations_module, "datetime", _SkewedDatetime)
    for skew in (_SKEW, -_SKEW):
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        assert _expiry_view(engine, "pbx1") == _JUDGED, skew


def test_contact_expiries_are_judged_on_the_clock_of_the_daemon_that_told_them(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the daemon's (and Asterisk's) clock 5 minutes ahead of or behind the
    database's, a reader with a right clock shows a contact Asterisk says expires in 2
    minutes as live and one it says expired 3 minutes ago as expired: the daemon's live
    mark notes how far its clock is from the database's (under a key that fits a server
    name too long for the key column)."""
    seed_store(engine, 2)
    server = "asterisk-" + "x" * 55  # 64: the longest a server name may be
    real = time.time
    for skew in (_SKEW, -_SKEW):
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)  # the daemon's
        asterisk_now = time.time()
        with engine.begin() as conn:
            rows = {
                "100000": _expiring("100000", asterisk_now + 120),
                "100001": _expiring("100001", asterisk_now - 180),
            }
            write_endpoint_rows(conn, server, rows, NOW)
            mark_live(conn, server, True)
        monkeypatch.setattr(time, "time", real)  # the reader's
        assert _expiry_view(engine, server) == _JUDGED, skew


def test_a_phone_registered_with_asterisk_and_daemon_clocks_behind_is_shown_live(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real AmiPbx whose host, like Asterisk's, runs 10 minutes behind the database's
    clock stores a snapshot whose contact Asterisk says expires in 5 minutes: a reader
    with a right clock shows it live, not expired (10 minutes behind, it is 5 minutes
    past by the reader's clock)."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))
    real = time.time
    behind = 2 * _SKEW

    async def shown() -> dict[str, tuple[str, list[bool]]]:
        peer = FakeAsterisk()
        peer.clock = lambda: real() - behind  # its snapshot's expiry ~297 s after that
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings())
        ops = PjsipOps(client)
        link = Link("lab", client, ReloadCoordinator(client, fast_settings()), ops)
        try:
            async with running(AmiPbx([link], engine, "realtime")):
                await eventually(link.book_complete)
                await eventually(lambda: _mark(engine, "lab").startswith("live:"))
                await eventually(lambda: not link.dirty and link.store_idle.is_set())
                monkeypatch.setattr(time, "time", real)  # the reader's
                return _expiry_view(engine, "lab")
        finally:
            await peer.stop()

    monkeypatch.setattr(time, "time", lambda: real() - behind)  # the daemon's
    assert run(shown()) == {"1001": ("online", [False])}


#: How far the fake Asterisk's clock is off the daemon's (and the database's) host's.
_ASTERISK_SKEW = 600.0


def _clock_note(engine: Engine, server: str) -> float | None:
    """The clock offset noted with ``server``'s live mark, or ``None``."""
    with engine.connect() as conn:
        value = conn.execute(
            select(daemon_state.c.value).where(daemon_state.c.key == clock_key(server))
        ).scalar()
    return None if value is None else float(value)


async def _on_a_skewed_asterisk(
    engine: Engine, skew: float, expiry_shift: float, how: str
) -> tuple[int | None, dict[str, tuple[str, list[bool]]], list[str]]:
    """A real AmiPbx (on this host's clock, as the database) against a fake Asterisk
    whose clock is ``skew`` seconds off, whose snapshot lists 1001's contact expiring
    about 297 s plus ``expiry_shift`` after Asterisk's now and whose PJSIPShowEndpoint
    finds 1001 with no contact.  Asterisk's time comes from a stamped event (``how``:
    ``events``, ``timestampevents = yes``) or from the Ping answers alone (``pings``).
    Once the daemon noted that time with its live mark and the expiry watcher had its
    turn: the health record's online count, ``status``'s view, the lookups sent."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))
    peer = FakeAsterisk()
    peer.clock = lambda: time.time() + skew
    peer.expiry_shift = expiry_shift
    peer.timestampevents = how == "events"
    peer.prefer["pjsipshowendpoint"] = "ObjectName: 1009"  # found, with no contact
    await peer.start()
    # Pings only a little after the snapshot: the events' case must not owe them its time.
    client = AmiClient(server_for(peer), fast_settings(ping_interval=0.3 if how == "pings" else 60))
    link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
    pbx = AmiPbx([link], engine, "realtime")
    try:
        async with running(pbx):
            await eventually(link.book_complete)
            if how == "events":
                await peer.send_recorded("Event: PeerStatus\r\n", "PeerStatus: Reachable")
            noted = lambda: abs((_clock_note(engine, "lab") or 0.0) - skew) < 5  # noqa: E731
            with suppress(AssertionError):  # a daemon that never notes it is judged below
                await eventually(noted, timeout=3.0)
            await asyncio.sleep(3 * pbx_module.EXPIRY_GRACE)  # the watcher's turn
            await eventually(lambda: not link.dirty and link.store_idle.is_set())
            online = pbx.health()["lab"]["online"]
            view = _expiry_view(engine, "lab")
    finally:
        await peer.stop()
    lookups = [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
    return online, view, lookups


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("how", ["events", "pings"])
@pytest.mark.parametrize("skew", [_ASTERISK_SKEW, -_ASTERISK_SKEW])
def test_a_registered_phone_on_a_skewed_asterisk_stays_online(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, skew: float, how: str
) -> None:
    """With Asterisk's clock 10 minutes ahead of or behind the daemon's, a phone whose
    contact Asterisk says expires in 5 minutes is online in the daemon's health record
    and in ``status`` (its contact not expired), and the expiry watcher looks nothing
    up: expiries are judged on Asterisk's clock, learnt from its stamps."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.3)
    online, view, lookups = run(_on_a_skewed_asterisk(engine, skew, 0.0, how))
    assert (online, view, lookups) == (1, {"1001": ("online", [False])}, [])


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("how", ["events", "pings"])
@pytest.mark.parametrize("skew", [_ASTERISK_SKEW, -_ASTERISK_SKEW])
def test_a_gone_phone_on_a_skewed_asterisk_expires(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, skew: float, how: str
) -> None:
    """With Asterisk's clock 10 minutes ahead of or behind the daemon's, a contact whose
    expiry passed 2 minutes ago on Asterisk's clock has its endpoint looked up by the
    expiry watcher, and its phone is offline in the health record and in ``status``."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.3)
    online, view, lookups = run(_on_a_skewed_asterisk(engine, skew, -420.0, how))
    assert online == 0
    assert view["1001"][0] == "offline"
    assert view["1001"][1] in ([], [True])  # looked up and gone, or still listed, expired
    assert lookups[:1] == ["1001"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_skewed_asterisk_is_logged_once(engine: Engine) -> None:
    """A server whose clock is 10 minutes ahead is logged once as skewed
    (``ami.clock_skew`` with the server and the seconds), however many stamps follow;
    one whose clock is right is not logged."""

    async def logged(skew: float) -> list[MutableMapping[str, Any]]:
        peer = FakeAsterisk()
        peer.clock = lambda: time.time() + skew
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(ping_interval=0.1))
        link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
        try:
            with capture_logs() as logs:
                async with running(AmiPbx([link], engine, "realtime")):
                    await eventually(link.book_complete)
                    for _ in range(3):
                        await peer.send_recorded("Event: PeerStatus\r\n", "PeerStatus: Reachable")
                    await asyncio.sleep(0.5)  # pings too
        finally:
            await peer.stop()
        return [e for e in logs if e["event"] == "ami.clock_skew"]

    seed_store(engine, 1)
    (ahead,) = run(logged(_ASTERISK_SKEW))
    assert (ahead["server"], ahead["log_level"]) == ("lab", "warning")
    assert abs(ahead["seconds"] - _ASTERISK_SKEW) < 5
    assert run(logged(0.0)) == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_asterisks_clock_is_learnt_anew_on_each_connection(engine: Engine) -> None:
    """An Asterisk that comes back with its clock set right (10 minutes ahead before) is
    read on its new clock as soon as the new session's snapshot is in, not minutes later
    when the old estimate would have aged out."""

    async def offsets() -> tuple[float | None, float | None]:
        peer = FakeAsterisk()
        peer.clock = lambda: time.time() + _ASTERISK_SKEW
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings())
        link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
        try:
            async with running(AmiPbx([link], engine, "realtime")):
                await eventually(link.book_complete)
                before = client.clock.offset
                peer.clock = time.time
                await peer.restart()
                await eventually(lambda: client.sessions == 2 and link.book_complete())
                return before, client.clock.offset
        finally:
            await peer.stop()

    seed_store(engine, 1)
    before, after = run(offsets())
    assert before is not None
    assert after is not None
    assert (round(before / 60), round(after / 60)) == (10, 0)  # minutes ahead


def _mark(engine: Engine, server: str) -> str:
    """The live mark stored for ``server``, or ``""``."""
    with engine.connect() as conn:
        value = conn.execute(
            select(daemon_state.c.value).where(daemon_state.c.key == live_key(server))
        ).scalar()
    return value or ""


def test_the_state_of_servers_no_longer_configured_is_forgotten(engine: Engine) -> None:
    """Contacts and summaries of servers not named are deleted and the others kept; with
    no server named, all go: a server taken out of the configuration would otherwise
    keep its users online in ``status`` for good."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        for server in ("pbx1", "pbx_1", "old"):
            write_endpoint_rows(conn, server, {"100000": _state("100000", "Reachable")}, NOW)
    with engine.begin() as conn:
        assert forget_other_servers(conn, ["pbx1", "pbx_1"]) == 1
    with engine.connect() as conn:
        (person,) = status_rows(conn)
        assert sorted(s["server"] for s in person["servers"]) == ["pbx1", "pbx_1"]
        assert sorted(c["server"] for c in person["contacts"]) == ["pbx1", "pbx_1"]
    with engine.begin() as conn:
        assert forget_other_servers(conn, []) == 2
    with engine.connect() as conn:
        (person,) = status_rows(conn)
    assert (person["state"], person["servers"], person["contacts"]) == ("offline", [], [])


def test_a_users_registration_goes_with_the_extension_it_leaves(accounts: Accounts) -> None:
    """A user whose extension changes is no longer online with the old extension's phone:
    the registration state filed under it was that endpoint's, and no later write of that
    endpoint (no user holds it now) would ever replace it."""
    accounts.add_user(
        {
            "username": "alice",
            "full_name": "Alice Agent",
            "email": "alice@example.com",
            "profile": "agents",
            "extension": "150",
        }
    )
    with accounts.engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"150": _state("150", "NonQualified")}, NOW)
    accounts.edit_user("alice", {"extension": "160"})
    with accounts.engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"150": ([], ("offline", "", "", SEEN_TEXT))}, NOW)
        (alice,) = status_rows(conn, ["alice"])
    assert (alice["extension"], alice["state"], alice["contacts"]) == ("160", "offline", [])


def _user_one(engine: Engine) -> tuple[str, str, int]:
    """The first seeded user's extension, state and number of contacts in ``status``."""
    with reading(engine) as conn:
        (person,) = [p for p in status_rows(conn) if p["extension"] != "100001"]
    return person["extension"], person["state"], len(person["contacts"])


def test_an_extension_changed_by_hand_in_sql_drops_the_old_endpoints_state(
    engine: Engine,
) -> None:
    """A user whose extension an UPDATE outside provisioner changed (the daemon applies it
    as the old endpoint removed and the new one added) shows the new endpoint's state
    (none: offline), not the old endpoint's phone online."""
    seed_store(engine, 2)

    async def scenario() -> tuple[str, str, int]:
        async with _lab_pbx(engine) as (peer, link, pbx):
            to_user = ((b"1001", b"100000"),)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=to_user)
            await eventually(lambda: _user_one(engine) == ("100000", "online", 1))
            with engine.begin() as conn:
                conn.execute(update(users).where(users.c.id == 1).values(extension="100005"))
            moved = Change(added=("100005",), removed=("100000",), wrote=True)
            pbx.applied(moved, target_kind="realtime")
            await eventually(lambda: bool(peer.actions("DBDel")))
            await eventually(lambda: pbx.idle() and not link.dirty and not link.jobs)
            await eventually(lambda: link.store_idle.is_set())
            return _user_one(engine)

    assert run(scenario()) == ("100005", "offline", 0)


def _status_of_1001(engine: Engine) -> tuple[str, int, bool]:
    """``status`` of the user with extension 1001: its state, how many contacts, and
    whether any contact has an expiry."""
    with reading(engine) as conn:
        (person,) = [p for p in status_rows(conn) if p["extension"] == "1001"]
    contacts = person["contacts"]
    return person["state"], len(contacts), any(c["expires_at"] for c in contacts)


async def _past_expiry(
    engine: Engine, *, refreshed: bool, timestampevents: bool = True
) -> tuple[tuple[str, int, bool], list[ReceivedAction]]:
    """Run against a fake Asterisk whose snapshot lists 1001's contact (its recorded
    expiry long past) and whose PJSIPShowEndpoint finds 1001 with no contact; with
    ``refreshed``, 1001's phone authenticates (a refresh) once the snapshot is in;
    ``timestampevents`` as manager.conf's.  Returns 1001's ``status`` once its expiry
    was seen to, and the lookups sent."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.id == 1).values(extension="1001"))
    peer = FakeAsterisk()
    peer.expiry_shift = AN_HOUR_AGO  # the recorded contact has expired
    peer.timestampevents = timestampevents
    peer.prefer["pjsipshowendpoint"] = "ObjectName: 1009"  # found, with no contact
    await peer.start()
    client = AmiClient(server_for(peer), fast_settings())
    link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
    try:
        async with running(AmiPbx([link], engine, "realtime")):
            await eventually(link.book_complete)
            if refreshed:
                # Stamped by the peer now: after the snapshot, on Asterisk's clock.
                await peer.send_recorded("Event: SuccessfulAuth\r\n", "Service: PJSIP")
            # Seen to: the contact gone, or its expiry unknown.
            await eventually(lambda: all(c.expires_at is None for c in link.book["1001"].contacts))
            await eventually(lambda: not link.dirty and link.store_idle.is_set())
    finally:
        await peer.stop()
    return _status_of_1001(engine), peer.actions("PJSIPShowEndpoint")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_contact_whose_expiry_passes_with_no_event_is_looked_up_and_dropped(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contact the snapshot listed, whose expiry passes with no event about it and no
    authentication of its phone since, has its endpoint looked up (PJSIPShowEndpoint);
    Asterisk listing no contact for it any more, the user is offline with no contact."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.3)
    status, lookups = run(_past_expiry(engine, refreshed=False))
    assert status == ("offline", 0, False)
    assert [a.get("Endpoint") for a in lookups] == ["1001"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_phone_that_authenticated_since_its_expiry_was_told_stays_online_unlooked_up(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contact whose told expiry passes after its phone authenticated again (a refresh,
    which sends no status event) stays online, its expiry unknown, without a lookup."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.3)
    status, lookups = run(_past_expiry(engine, refreshed=True))
    assert status == ("online", 1, False)
    assert lookups == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_refresh_is_seen_by_its_event_tv_without_timestampevents(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``timestampevents``, the refresh's SuccessfulAuth still tells its time (its
    EventTV, a security event's): the phone stays online, its expiry unknown, without a
    lookup."""
    monkeypatch.setattr(pbx_module, "EXPIRY_GRACE", 0.3)
    status, lookups = run(_past_expiry(engine, refreshed=True, timestampevents=False))
    assert status == ("online", 1, False)
    assert lookups == []


def test_a_contact_past_its_stored_expiry_is_not_shown_online(engine: Engine) -> None:
    """A contact whose stored expiry passed (more than a minute ago) with nothing written
    since (the daemon or its AMI session down) does not make its user online, nor does
    the summary written with it; ``status`` lists it as expired."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": _state("100000", "NonQualified")}, NOW)
        (person,) = status_rows(conn)
    assert person["state"] == "offline"
    assert [c.get("expired") for c in person["contacts"]] == [True]


def test_an_event_write_keeps_the_problem_the_verifier_recorded(engine: Engine) -> None:
    """Writing an endpoint's contacts and summary leaves its recorded problem in place."""
    seed_store(engine, 2)
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": _state("100000", "Reachable")}, NOW)
        set_problems(conn, "pbx1", {"100000": "rejected"}, NOW)
    states = {ep: _state(ep, "Unreachable") for ep in ("100000", "100001")}
    with engine.begin() as conn:
        assert write_endpoint_rows(conn, "pbx1", states, NOW) == 2
    with engine.connect() as conn:
        sums = conn.execute(
            select(registration_summary.c.user_id, registration_summary.c.problem)
        ).all()
        statuses = [c[0] for c in _contacts(conn, "status")]
    assert sorted(tuple(s) for s in sums) == [(1, "rejected"), (2, "")]
    assert statuses == ["Unreachable", "Unreachable"]


def test_rows_without_times_take_the_writes_time_and_trunks_are_skipped(
    engine: Engine,
) -> None:
    """A contact or summary without a time is stored with the write's; an endpoint that
    is no user (a trunk) writes nothing and is not counted."""
    seed_store(engine, 2)
    (contact,), summary = _state("100000", "Reachable")
    untimed = (*contact[:7], None)
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": ([contact], summary)}, NOW)
        matched = write_endpoint_rows(
            conn,
            "pbx1",
            {
                "100001": ([untimed], ("online", "NOT_INUSE", "", None)),
                "trunk": ([], (None, "", "", None)),
            },
            NOW,
        )
        assert matched == 1
    with engine.connect() as conn:
        rows = _contacts(conn)
        sums = conn.execute(select(*_SUMMARY).order_by(registration_summary.c.user_id)).all()
    cid, uri = contact[0], contact[1]
    assert [tuple(r)[2:] for r in rows] == [
        (cid, uri, "Reachable", "Phone/1", "", 1234, SEEN, SEEN),
        (cid, uri, "Reachable", "Phone/1", "", 1234, SEEN, NOW),
    ]
    assert [tuple(s)[1:] for s in sums] == [
        ("pbx1", "online", "NOT_INUSE", "", SEEN),
        ("pbx1", "online", "NOT_INUSE", "", NOW),
    ]


def test_events_of_one_contact_in_one_flush_window_leave_the_latest_state(
    engine: Engine,
) -> None:
    """A register then un-register of one contact sent back to back (one flush window, the
    dirty set keeps the endpoint once) leave the store with the un-register's state."""
    seed_store(engine, 2)

    async def scenario() -> None:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            to_user = ((b"1001", b"100000"),)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=to_user)
            await peer.send_recorded("Event: ContactStatus\r\n", "Removed", replace=to_user)
            await eventually(lambda: link.totals.events == 2)
            await eventually(lambda: not link.dirty, timeout=2.0)
            await asyncio.sleep(0.1)  # the write itself, in its thread

    run(scenario())
    with engine.connect() as conn:
        contacts = _contacts(conn, "user_id")
        sums = conn.execute(select(registration_summary.c.user_id, registration_summary.c.state))
        states = sorted(tuple(s) for s in sums)
    assert contacts == []
    assert (1, "offline") in states


def test_two_phones_whose_long_uris_differ_only_after_255_characters_are_both_stored(
    engine: Engine,
) -> None:
    """Two contacts of one endpoint told by ContactStatus events, whose URIs (push
    notification parameters make them long) share their first 300 characters, are two
    rows, each with its whole URI."""
    seed_store(engine, 1)
    common = "sip:100000@10.0.0.1:5060;pn-prid=" + "f" * 280
    uris = [f"{common};phone={n}" for n in ("a", "b")]
    events = [
        {
            "Event": "ContactStatus",
            "EndpointName": "100000",
            "AOR": "100000",
            "URI": uri,
            "ContactStatus": "NonQualified",
            "RoundtripUsec": "0",
        }
        for uri in uris
    ]
    reg = apply_events({}, events)["100000"]
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": pbx_module.rows(reg)}, NOW)
    with engine.connect() as conn:
        stored = sorted(c[0] for c in _contacts(conn, "uri"))
    assert stored == uris


def test_a_contact_created_on_an_older_asterisk_is_stored_online(engine: Engine) -> None:
    """A ContactStatus ``Created`` (what Asterisk before NonQualified sends for a phone
    registering without qualify) leaves its user online in the summary, as ``status``
    reads its contact."""
    seed_store(engine, 1)

    async def scenario() -> None:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            created = ((b"1001", b"100000"), (b"NonQualified", b"Created"))
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=created)
            await eventually(lambda: link.totals.events == 1)
            await eventually(lambda: not link.dirty and link.store_idle.is_set(), timeout=2.0)
            await asyncio.sleep(0.1)  # the write itself, in its thread

    run(scenario())
    with engine.connect() as conn:
        (person,) = status_rows(conn)
    assert [c["status"] for c in person["contacts"]] == ["Created"]
    assert [s["state"] for s in person["servers"]] == ["online"]
    assert person["state"] == "online"


def test_a_nul_in_an_event_neither_blocks_the_batch_nor_reaches_the_store(engine: Engine) -> None:
    """A ContactStatus whose URI holds a NUL (which no PostgreSQL text can hold) is stored
    with U+FFFD in its place, in the same batch as another phone's, on every backend."""
    seed_store(engine, 2)

    async def scenario() -> None:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            hostile = ((b"1001", b"100000"), (b";ob", b";o\0b"))
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=hostile)
            other = ((b"1001", b"100001"),)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=other)
            await eventually(lambda: link.totals.events >= 2)
            await eventually(lambda: link.store_idle.is_set() and not link.dirty, timeout=3.0)
            await asyncio.sleep(0.1)
            assert link.store_failures == 0

    run(scenario())
    with engine.connect() as conn:
        uris = _contacts(conn, "user_id", "uri")
    assert sorted(tuple(u) for u in uris) == [
        (1, "sip:100000@127.0.0.1:5070;o\ufffdb"),
        (2, "sip:100001@127.0.0.1:5070;ob"),
    ]


def test_a_snapshot_lands_after_the_batch_written_before_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot taken while an earlier batch is still being written is stored after it:
    the store ends with what the snapshot said (here: the event's contact is gone), not
    with the older batch that finished last."""
    seed_store(engine, 2)
    monkeypatch.setattr(pbx_module, "SNAPSHOT_MIN_GAP", 0.0)

    async def scenario() -> tuple[list[int], str]:
        async with _lab_pbx(engine) as (peer, link, pbx):
            real_start = pbx._start_store
            delayed: list[bool] = []

            def slow_first_store(link: Any, write: Any) -> Any:
                if delayed:
                    return real_start(link, write)
                delayed.append(True)  # the event's batch: a slow database

                def slow(conn: Connection) -> object:
                    time.sleep(0.4)
                    return write(conn)

                return real_start(link, slow)

            monkeypatch.setattr(pbx, "_start_store", slow_first_store)
            to_user = ((b"1001", b"100000"),)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=to_user)
            await eventually(lambda: bool(delayed))
            link.snapshot_wanted.set()  # Asterisk, asked now, holds no contact of 100000
            snapshots = link.last_snapshot
            await eventually(lambda: link.last_snapshot > snapshots)
            await eventually(lambda: link.store_idle.is_set() and not link.dirty, timeout=3.0)
            await asyncio.sleep(0.6)
            summary = registration_summary.c
            with engine.connect() as conn:
                state = select(summary.state).where(summary.server == "lab", summary.user_id == 1)
                found = [row[0] for row in _contacts(conn, "user_id", server="lab")]
                return found, conn.execute(state).scalar_one()

    contacts, state = run(scenario())
    assert 1 not in contacts
    assert state == "offline"


def test_a_rewrite_replaces_contacts_updates_the_summary_and_cuts_long_values(
    engine: Engine,
) -> None:
    """A second write of an endpoint leaves only its new contacts and one updated summary
    (problem included), values cut to their column's size, the same on every backend; an
    endpoint the second write leaves out keeps its contacts."""
    seed_store(engine, 3)
    first: EndpointRows = {
        "100000": (
            [
                (
                    "100000;@a",
                    "sip:a@10.0.0.1",
                    "Reachable",
                    "Phone/1",
                    "10.0.0.1:5060",
                    9,
                    SEEN_TEXT,
                    None,
                ),
                ("100000;@b", "sip:b@10.0.0.2", "Unreachable", "", "", None, None, SEEN_TEXT),
            ],
            ("online", "NOT_INUSE", "", SEEN_TEXT),
        ),
        "100001": ([], ("offline", "", "", None)),
        "100002": (
            [("100002;@d", "sip:d@10.0.0.3", "Reachable", "", "", 5, None, SEEN_TEXT)],
            ("online", "NOT_INUSE", "", SEEN_TEXT),
        ),
    }
    long_uri = "sip:" + "x" * 600
    again = {
        "100000": (
            [
                ("100000;@c", long_uri, "NonQualified", "Pé" * 150, "", None, None, None),
                ("100000;@c", long_uri, "Reachable", "Pé" * 150, "", 77, None, None),
            ],
            ("unreachable", "UNAVAILABLE", "rejected", None),
        ),
    }
    with engine.begin() as conn:
        assert write_endpoint_rows(conn, "pbx1", first, NOW) == 3
    with engine.begin() as conn:
        assert write_endpoint_rows(conn, "pbx1", again, NOW) == 1
    with engine.connect() as conn:
        rows = _contacts(conn)
        sums = conn.execute(select(*_SUMMARY).order_by(registration_summary.c.user_id)).all()
    # The later of two rows of one contact wins; the old contacts are gone.
    assert [tuple(r) for r in rows] == [
        (
            1,
            "pbx1",
            "100000;@c",
            long_uri[:512],
            "Reachable",
            ("Pé" * 150)[:255],
            "",
            77,
            None,
            NOW,
        ),
        (3, "pbx1", "100002;@d", "sip:d@10.0.0.3", "Reachable", "", "", 5, None, SEEN),
    ]
    assert [tuple(s) for s in sums] == [
        (1, "pbx1", "unreachable", "UNAVAILABLE", "rejected", NOW),
        (2, "pbx1", "offline", "", "", NOW),
        (3, "pbx1", "online", "NOT_INUSE", "", SEEN),
    ]


def test_a_large_batch_is_written_before_the_flush_delay(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once FLUSH_BATCH endpoints are dirty the flusher writes at once, not after the
    delay (here 60 s, far past the test's end)."""
    seed_store(engine, 5)
    monkeypatch.setattr(pbx_module, "FLUSH_BATCH", 3)
    monkeypatch.setattr(pbx_module, "FLUSH_DELAY", 60.0)

    async def scenario() -> int:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            await peer.send_burst(5)
            await eventually(lambda: link.totals.events == 5)
            await eventually(lambda: len(link.dirty) < 3, timeout=3.0)
            await asyncio.sleep(0.2)  # the write itself, in its thread
            with engine.connect() as conn:
                return len(_contacts(conn, "user_id", server="lab"))

    assert run(scenario()) >= 3


def test_an_uncounted_write_stores_the_same_rows_without_a_counting_statement(
    engine: Engine,
) -> None:
    """The flusher's writer (``counted=False``) stores what the counted one does (a trunk
    skipped); where counting is a statement of its own (MariaDB's JSON_TABLE documents)
    that statement is not run and no count comes back."""
    seed_store(engine, 3)
    states = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001", "trunk")}
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    writer = registrations_module.endpoint_writer(engine.dialect, "lab", states, NOW, counted=False)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        with engine.begin() as conn:
            result = writer(conn)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    with reading(engine) as conn:
        contacts = _contacts(conn, "user_id", "status")
        summaries = conn.execute(select(registration_summary.c.user_id)).all()
    assert sorted(contacts) == [(1, "NonQualified"), (2, "NonQualified")]
    assert sorted(summaries) == [(1,), (2,)]
    if engine.dialect.name not in ("sqlite", "postgresql"):
        assert has_json_table(engine.dialect)
        assert result is None
        assert not [s for s in sent if "count(" in s.lower()]
    else:
        assert result == 2


def test_a_writer_holds_its_batch_as_made_before_it_runs(engine: Engine) -> None:
    """A writer's batch is made when the writer is (on MariaDB its JSON_TABLE documents
    too), so the rows it was given may go before it runs and it still writes them all."""
    seed_store(engine, 2)
    states = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001")}
    writer = registrations_module.endpoint_writer(engine.dialect, "lab", states, NOW, counted=False)
    states.clear()
    with engine.begin() as conn:
        writer(conn)
    with reading(engine) as conn:
        assert _contacts(conn, "user_id", "status") == [(1, "NonQualified"), (2, "NonQualified")]


def test_a_snapshot_takes_every_contact_and_dates_only_the_summaries_it_turns_offline(
    engine: Engine,
) -> None:
    """An empty snapshot (an Asterisk restarted) leaves every summary of its server
    offline without contacts: one that was online or unreachable changed as of the
    snapshot, one already offline keeping its last change; another server's untouched."""
    seed_store(engine, 4)
    offline: SummaryRow = ("offline", "UNAVAILABLE", "", SEEN_TEXT)
    unreachable: SummaryRow = ("unreachable", "UNAVAILABLE", "", SEEN_TEXT)
    rows = {
        "100000": _state("100000", "Reachable"),
        "100001": (_state("100001", "Unreachable")[0], offline),
        "100002": ([], unreachable),
        "100003": ([], offline),
    }
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", rows, SEEN)
        write_endpoint_rows(conn, "pbx2", {"100000": rows["100000"]}, SEEN)
        replace_server_snapshot(conn, "pbx1", {}, NOW)
    summary = registration_summary.c
    query = select(summary.server, summary.user_id, summary.state, summary.changed_at)
    with reading(engine) as conn:
        sums = sorted(tuple(r) for r in conn.execute(query))
        contacts = _contacts(conn, "server", "user_id")
    assert sums == [
        ("pbx1", 1, "offline", NOW),
        ("pbx1", 2, "offline", SEEN),
        ("pbx1", 3, "offline", NOW),
        ("pbx1", 4, "offline", SEEN),
        ("pbx2", 1, "online", SEEN),
    ]
    assert contacts == [("pbx2", 1)]


def test_a_postgresql_batch_is_split_into_sorted_disjoint_parts() -> None:
    """A large PostgreSQL batch is cut into runs of sorted endpoints that hold each
    endpoint once; a small batch, or one for another database, stays whole."""
    states = {str(100000 + i): i for i in reversed(range(2001))}
    parts = pbx_module.split_batch(states, "postgresql", parts=2)
    assert [len(p) for p in parts] == [1001, 1000]
    assert list(parts[0]) == sorted(parts[0])
    assert max(parts[0]) < min(parts[1])
    assert {ep: v for p in parts for ep, v in p.items()} == states
    small = dict(list(states.items())[: pbx_module.PARALLEL_MIN - 1])
    assert pbx_module.split_batch(small, "postgresql") == [small]
    for dialect in ("sqlite", "mariadb", "mysql"):
        assert pbx_module.split_batch(states, dialect) == [states]


def test_building_a_flusher_batch_runs_no_garbage_collection(engine: Engine) -> None:
    """Making the writes of a flusher batch of 5,000 endpoints runs no cyclic garbage
    collection (its rows hold no cycles) but the one due when the collector, left enabled
    as it was found, resumes; the parts hold every endpoint still in the book."""
    peer = FakeAsterisk()
    peer.port = 5038  # never connected: the link only needs a valid server entry
    client = AmiClient(server_for(peer), fast_settings())
    link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
    pbx = AmiPbx([link], engine, "realtime")
    events = [
        {
            "Event": "ContactStatus",
            "EndpointName": ep,
            "AOR": ep,
            "URI": f"sip:{ep}@10.0.0.1:5060",
            "ContactStatus": "NonQualified",
            "Timestamp": "1777636798.654321",
        }
        for ep in (str(100000 + i) for i in range(5000))
    ]
    link.book.update(apply_events({}, events))
    with collections_seen() as generations:
        writes = pbx._batch_writes(link, {*link.book, "gone"})
        enabled_after = gc.isenabled()
    assert generations in ([], [0])
    assert enabled_after
    assert set().union(*(endpoints for _, endpoints in writes)) == set(link.book)


def test_a_batch_written_in_parts_at_once_stores_every_endpoint(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batches split (on PostgreSQL, each part in a transaction of its own, all at
    once) a burst still leaves exactly one contact and one summary per endpoint."""
    count = 60
    seed_store(engine, count)
    monkeypatch.setattr(pbx_module, "PARALLEL_MIN", 4)
    splits: list[int] = []
    split = pbx_module.split_batch

    def counted(states: dict[str, Any], dialect: str) -> list[dict[str, Any]]:
        parts = split(states, dialect)
        splits.append(len(parts))
        return parts

    monkeypatch.setattr(pbx_module, "split_batch", counted)

    def stored() -> tuple[int, int, int]:
        """Contact rows, users with a contact, summary rows."""
        with reading(engine) as conn:
            contacts = _contacts(conn, "user_id")
            summaries = conn.execute(select(registration_summary.c.user_id)).all()
        return len(contacts), len({r[0] for r in contacts}), len(summaries)

    async def scenario() -> tuple[int, int]:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            await peer.send_burst(count, chunk=7)
            await eventually(lambda: stored() == (count,) * 3 and not link.dirty)
            await asyncio.sleep(0.1)  # a stray second write would show now
            assert stored() == (count,) * 3
            return link.store_failures, link.totals.events

    assert run(scenario()) == (0, count)
    assert max(splits) == (2 if engine.dialect.name == "postgresql" else 1)


def test_a_batch_put_in_its_turn_is_already_being_written_in_its_threads(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the flusher has put a batch in its turn, every part's transaction runs in a
    thread without the event loop's help, so the database writes while the flusher
    builds the next batch (in a storm it does not yield until that is built)."""
    seed_store(engine, 4)
    monkeypatch.setattr(pbx_module, "PARALLEL_MIN", 2)
    peer = FakeAsterisk()
    peer.port = 5038  # never connected: the link only needs a valid server entry
    client = AmiClient(server_for(peer), fast_settings())
    link = Link("lab", client, ReloadCoordinator(client, fast_settings()), PjsipOps(client))
    pbx = AmiPbx([link], engine, "realtime")
    states = {str(100000 + i): _state(str(100000 + i), "NonQualified") for i in range(4)}
    parts = pbx_module.split_batch(states, engine.dialect.name)
    started = [threading.Event() for _ in parts]

    def writer(part: dict[str, Any], began: threading.Event) -> Any:
        write = registrations_module.endpoint_writer(engine.dialect, "lab", part, NOW)

        def run_it(conn: Connection) -> int:
            began.set()
            return write(conn)

        return run_it

    writes = [(writer(p, s), set(p)) for p, s in zip(parts, started, strict=True)]

    async def scenario() -> list[bool]:
        batch = partial(pbx._flush, link, writes, asyncio.Event())
        task = await pbx_module._in_turn(link, None, batch)
        # Blocking the loop, as building the next batch does.
        began = [event.wait(timeout=2.0) for event in started]
        await task
        return began

    assert run(scenario()) == [True] * len(parts)
    with reading(engine) as conn:
        assert len(_contacts(conn, "user_id")) == 4


def test_an_endpoint_asterisk_does_not_hold_after_an_apply_is_recorded_next_to_its_user(
    engine: Engine,
) -> None:
    """After an apply, an added endpoint that PJSIPShowEndpoint does not find gets its
    problem written next to its user; no other user gets a summary."""
    seed_store(engine, 2)

    def problems() -> dict[int, str]:
        with reading(engine) as conn:
            query = select(registration_summary.c.user_id, registration_summary.c.problem)
            return {r.user_id: r.problem for r in conn.execute(query)}

    async def scenario() -> dict[int, str]:
        async with _lab_pbx(engine) as (peer, link, pbx):
            pbx.applied(Change(added=("100001",), wrote=True), target_kind="realtime")
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            await eventually(lambda: 2 in problems() and link.store_idle.is_set())
            return problems()

    recorded = run(scenario())
    assert list(recorded) == [2]
    assert "does not hold this endpoint" in recorded[2]


def test_a_write_asked_of_a_stopped_flusher_is_answered_not_stored_at_once(
    engine: Engine,
) -> None:
    """Once the flusher has ended (the daemon stopping) a write handed to it is answered
    "not stored" at once, not left waiting for a flusher that will never run again."""

    async def scenario() -> tuple[bool, int]:
        async with _lab_pbx(engine) as (_peer, link, _pbx):
            pass
        assert link.flusher_ended
        stored = await asyncio.wait_for(link.in_flusher_turn(lambda conn: 0), 1.0)
        return stored, len(link.jobs)

    assert run(scenario()) == (False, 0)


def test_a_write_the_database_refused_is_retried_without_a_new_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store refuses writes (here: another writer holds SQLite's lock) the
    flusher backs off; once it accepts them the latest state is written, no new event
    needed; meanwhile the health record is unhealthy, naming the server, and healthy
    again after."""
    monkeypatch.setattr(pbx_module, "STORE_RETRY_BASE", 0.05)
    path = tmp_path / "store.db"
    engine = open_engine(f"sqlite:///{path}", busy_timeout=0.05)
    seed_store(engine, 3)
    blocker = sqlite3.connect(path, isolation_level=None)

    def stored() -> int:
        with reading(engine) as conn:
            return len(_contacts(conn, "user_id"))

    def unhealthy(pbx: AmiPbx) -> list[str]:
        """What ``provisioner check`` would say of the daemon's health record now."""
        health = Health(ready=True, last_sync_ok=True, asterisk=pbx.health())
        return health.problems(health.updated_at, max_age=60.0)

    async def scenario() -> tuple[int, int, list[str], list[str]]:
        async with _lab_pbx(engine) as (peer, link, pbx):
            blocker.execute("BEGIN EXCLUSIVE")
            await peer.send_burst(3)
            await eventually(lambda: link.store_failures >= 3, timeout=5.0)
            refused, during = stored(), unhealthy(pbx)
            blocker.execute("ROLLBACK")
            await eventually(lambda: stored() == 3 and link.store_failures == 0, timeout=5.0)
            return refused, link.totals.events, during, unhealthy(pbx)

    try:
        refused, events, during, after = run(scenario())
    finally:
        blocker.close()
        engine.dispose()
    assert (refused, events) == (0, 3)
    (problem,) = during
    assert problem.startswith("lab: the store refused the last")
    assert after == []


def test_a_run_of_refused_registration_writes_is_logged_once_then_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store refuses registration writes, registration.store_failed is logged
    at the first refusal only and registration.store_retry as a warning at the 1st, 2nd,
    4th... (debug lines between); the write that ends the run logs
    registration.store_recovered with the count."""
    monkeypatch.setattr(pbx_module, "STORE_RETRY_BASE", 0.02)
    path = tmp_path / "store.db"
    engine = open_engine(f"sqlite:///{path}", busy_timeout=0.02)
    seed_store(engine, 3)
    blocker = sqlite3.connect(path, isolation_level=None)

    async def scenario() -> None:
        async with _lab_pbx(engine) as (peer, link, _pbx):
            blocker.execute("BEGIN EXCLUSIVE")
            await peer.send_burst(3)
            await eventually(lambda: link.store_failures >= 6, timeout=10.0)
            blocker.execute("ROLLBACK")
            await eventually(lambda: link.store_failures == 0, timeout=10.0)

    try:
        with capture_logs() as logs:
            run(scenario())
    finally:
        blocker.close()
        engine.dispose()
    failed = [e for e in logs if e["event"] == "registration.store_failed"]
    assert [e["log_level"] for e in failed if e["log_level"] != "debug"] == ["warning"], failed
    loud = [
        e["failures"]
        for e in logs
        if e["event"] == "registration.store_retry" and e["log_level"] == "warning"
    ]
    assert loud[:3] == [1, 2, 4]
    (recovered,) = [e for e in logs if e["event"] == "registration.store_recovered"]
    assert recovered["failures"] >= 6


def test_a_write_that_waits_in_vain_for_a_pooled_connection_is_retried(
    engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every pooled connection is taken (stuck elsewhere) until the pool's timeout,
    the flusher backs off as for a refused write, and the latest state is written once a
    connection is free: the AMI side runs on (it ended, and the daemon with it)."""
    monkeypatch.setattr(pbx_module, "STORE_RETRY_BASE", 0.05)
    seed_store(engine, 3)
    pool = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.1)

    def stored() -> int:
        with reading(engine) as conn:
            return len(_contacts(conn, "user_id"))

    async def scenario() -> tuple[int, int]:
        async with _lab_pbx(pool) as (peer, link, _pbx):
            with pool.connect():  # the only connection, held by a stuck transaction
                await peer.send_burst(3)
                await eventually(lambda: link.store_failures >= 2, timeout=5.0)
                waiting = stored()
            await eventually(lambda: stored() == 3 and link.store_failures == 0, timeout=5.0)
            return waiting, link.totals.events

    try:
        assert run(scenario()) == (0, 3)
    finally:
        pool.dispose()


def test_timestamp_text_is_what_sqlites_bind_processor_writes() -> None:
    """The JSON path writes each timestamp as the text SQLAlchemy's SQLite DateTime
    processor would (so both paths store equal values), microseconds or none."""
    dialect = sqlite_dialect.dialect()
    column_type = registration_summary.c.changed_at.type.dialect_impl(dialect)
    proc = column_type.bind_processor(dialect)
    assert proc is not None
    for value in (NOW, SEEN, datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, 60)):
        assert time_text(value) == proc(value)


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
        st.integers(min_value=0, max_value=4_102_444_800).map(lambda s: s + 0.9999995),
        st.integers(min_value=0, max_value=4_102_444_800).map(lambda s: s + 0.0000005),
    )
)
def test_epoch_text_is_the_datetime_routes_text(epoch: float) -> None:
    """An AMI epoch becomes the same text as through datetime.fromtimestamp, rounding
    included (half to even at the microsecond, carried into the next second)."""
    expected = time_text(datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None))
    assert epoch_text(epoch) == expected


def test_a_transaction_ended_as_a_deadlock_victim_is_run_again(engine: Engine) -> None:
    """Two writers that lock two rows in opposite orders deadlock; the database ends one
    (MariaDB at once, PostgreSQL after its deadlock_timeout), which ``transaction`` runs
    again: both commit, and the victim's work is done once, whole."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's writers queue on one lock (BEGIN IMMEDIATE): none deadlocks")
    seed_store(engine, 2)
    with reading(engine) as conn:
        first, second = sorted(conn.execute(select(users.c.id)).scalars())
    locked = {first: threading.Event(), second: threading.Event()}
    runs: list[int] = []

    def write(conn: Connection, mine: int, theirs: int) -> None:
        runs.append(mine)
        conn.execute(update(users).where(users.c.id == mine).values(full_name=f"by {mine}"))
        if runs.count(mine) == 1:  # the first run of each meets the other's lock
            locked[mine].set()
            assert locked[theirs].wait(10)
        conn.execute(update(users).where(users.c.id == theirs).values(full_name=f"by {mine}"))

    with ThreadPoolExecutor(2) as pool:
        done = [
            pool.submit(transaction, engine, partial(write, mine=a, theirs=b))
            for a, b in ((first, second), (second, first))
        ]
        for future in done:
            future.result()
    assert sorted(runs) in ([first, first, second], [first, second, second])
    with reading(engine) as conn:
        names = set(conn.execute(select(users.c.full_name).where(users.c.id.in_(locked))).scalars())
    # The victim ran last and alone: its name is on both rows.
    assert len(names) == 1


class _Orig(Exception):
    """A driver's exception, with what psycopg and pymysql put on theirs."""

    def __init__(self, *args: object, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("orig", "conflict"),
    [
        (_Orig("deadlock detected", sqlstate="40P01"), True),
        (_Orig("could not serialize access", sqlstate="40001"), True),
        (_Orig("duplicate key", sqlstate="23505"), False),
        (_Orig(1213, "Deadlock found when trying to get lock"), True),
        (_Orig(1205, "Lock wait timeout exceeded"), True),
        (_Orig(1062, "Duplicate entry"), False),
        (_Orig("database is locked"), False),
    ],
)
def test_only_deadlocks_and_serialization_failures_are_conflicts(
    orig: Exception, conflict: bool
) -> None:
    """A deadlock victim, a serialization failure or a lock wait timeout (PostgreSQL's
    SQLSTATE, MariaDB's error number) is a conflict worth running again; nothing else is."""
    assert is_conflict(DBAPIError("INSERT ...", None, orig)) is conflict


def _tables(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        contacts = _contacts(conn)
        sums = conn.execute(select(*_SUMMARY).order_by(registration_summary.c.user_id)).all()
    return [tuple(r) for r in contacts], [tuple(s) for s in sums]


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_mariadb_writes_as_json_table_documents_what_the_id_lookups_wrote(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On MariaDB a batch goes as JSON_TABLE documents (in parts when large); a server
    without JSON_TABLE has user ids looked up instead: both count the same matches and
    leave the same rows (a recorded problem kept, long values cut, a trunk skipped)."""
    seed_store(engine, 3)
    long_uri = "sip:" + "x" * 600
    batches: list[dict[str, tuple[list[ContactRow], SummaryRow]]] = [
        {ep: _state(ep, "Reachable") for ep in ("100000", "100001", "100002", "trunk")},
        {
            "100000": (
                [("100000;@c", long_uri, "NonQualified", "Pé" * 150, "", None, None, None)],
                ("unreachable", "UNAVAILABLE", "", None),
            ),
            "100001": ([], (None, "", "", None)),
        },
    ]

    def write_all() -> tuple[list[int], tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
        with engine.begin() as conn:
            conn.execute(registration_summary.delete())
            set_problems(conn, "pbx1", {"100000": "rejected"}, NOW)
        matched = []
        for batch in batches:
            with engine.begin() as conn:
                matched.append(write_endpoint_rows(conn, "pbx1", batch, NOW))
        return matched, _tables(engine)

    as_documents = write_all()
    monkeypatch.setattr(registrations_module, "JSON_TABLE_CHUNK", 1)
    in_parts = write_all()
    monkeypatch.setattr(registrations_module, "has_json_table", lambda dialect: False)
    looked_up = write_all()
    assert as_documents == in_parts == looked_up
    assert as_documents[0] == [3, 2]
    contacts, sums = as_documents[1]
    assert [c[3] for c in contacts if c[0] == 1] == [long_uri[:512]]
    assert [(s[0], s[2], s[4]) for s in sums] == [
        (1, "unreachable", "rejected"),
        (2, "offline", ""),
        (3, "online", ""),
    ]


def test_a_large_check_clears_recorded_problems_in_bulk(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past CLEAR_IN_BULK endpoints the problems are written set-based: empty ones clear
    the recorded ones (and add no summary row where none was), the others are set (cut
    to the column) or inserted with a row, on that server only; the matches are counted."""
    monkeypatch.setattr(registrations_module, "CLEAR_IN_BULK", 1)
    seed_store(engine, 4)
    with engine.begin() as conn:
        set_problems(conn, "pbx1", {"100000": "bad", "100001": "worse"}, NOW)
        set_problems(conn, "pbx2", {"100000": "elsewhere"}, NOW)
    live = {"100000": "", "100001": "", "100002": "", "100003": "rejected", "trunk": ""}
    with engine.begin() as conn:
        assert set_problems(conn, "pbx1", live, NOW) == 4
    with engine.connect() as conn:
        query = select(
            registration_summary.c.user_id,
            registration_summary.c.server,
            registration_summary.c.problem,
        ).order_by(registration_summary.c.server, registration_summary.c.user_id)
        rows = [tuple(r) for r in conn.execute(query)]
    assert rows == [
        (1, "pbx1", ""),
        (2, "pbx1", ""),
        (4, "pbx1", "rejected"),
        (1, "pbx2", "elsewhere"),
    ]
    again = {"100000": "x" * 300, "100001": "gone", "100003": ""}
    with engine.begin() as conn:
        assert set_problems(conn, "pbx1", again, NOW) == 3
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
    assert rows == [
        (1, "pbx1", "x" * 255),
        (2, "pbx1", "gone"),
        (4, "pbx1", ""),
        (1, "pbx2", "elsewhere"),
    ]


def _held(engine: Engine) -> tuple[list[int], list[int]]:
    """The user ids of the stored contacts and of the stored summaries, sorted."""
    with engine.connect() as conn:
        contacts = [c[0] for c in _contacts(conn, "user_id")]
        summaries = conn.execute(select(registration_summary.c.user_id).order_by("user_id"))
        return contacts, list(summaries.scalars())


def test_contacts_go_with_their_user_and_with_their_summary(engine: Engine) -> None:
    """A user deleted in plain SQL takes its contacts and summaries with it, and a summary
    row deleted takes its user's contacts on that server (no contact outlives its summary);
    other users' rows stay."""
    seed_store(engine, 3)
    states = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001", "100002")}
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", states, NOW)
        write_endpoint_rows(conn, "pbx2", states, NOW)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE id = 1"))
    assert _held(engine) == ([2, 2, 3, 3], [2, 2, 3, 3])
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM registration_summary WHERE user_id = 2 AND server = 'pbx1'"))
    assert _held(engine) == ([2, 3, 3], [2, 3, 3])


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_truncating_users_on_postgresql_takes_every_contact(engine: Engine) -> None:
    """On PostgreSQL ``TRUNCATE users CASCADE`` (which fires no row trigger) leaves no
    contact and no summary."""
    seed_store(engine, 2)
    with engine.begin() as conn:
        write_endpoint_rows(conn, "pbx1", {"100000": _state("100000", "NonQualified")}, NOW)
        conn.execute(text("TRUNCATE users CASCADE"))
    assert _held(engine) == ([], [])


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_contacts_keep_every_character_in_a_latin1_database_on_mariadb(engine: Engine) -> None:
    """On MariaDB a contact's texts outside latin1 (an emoji, CJK) are stored whole through
    the JSON_TABLE documents even when the database's default character set is latin1
    (the document's nested contacts column takes no character set of its own)."""
    seed_store(engine, 1)
    with engine.begin() as conn:
        name = conn.execute(text("SELECT DATABASE()")).scalar_one()
        conn.execute(text(f"ALTER DATABASE `{name}` CHARACTER SET latin1"))
    agent = "Zoë 😀 王 Phone"
    contact = ("100000;@abc", "sip:100000@10.0.0.1", "Reachable", agent, "", 1, SEEN_TEXT, None)
    with engine.begin() as conn:
        assert has_json_table(conn.dialect)
        write_endpoint_rows(conn, "pbx1", {"100000": ([contact], ("online", "", "", None))}, NOW)
    with engine.connect() as conn:
        assert _contacts(conn, "user_agent") == [(agent,)]
