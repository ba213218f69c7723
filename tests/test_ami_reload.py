"""ReloadCoordinator and PjsipOps over TCP against the transcript-replaying fake Asterisk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from structlog.testing import capture_logs

from provisioner.ami import AmiClient, PjsipOps, ReloadCoordinator, ReloadOutcome
from provisioner.ami import reload as reload_module
from provisioner.errors import InvalidInput

from .amipeer import (
    RECORDED_AT,
    FakeAsterisk,
    eventually,
    fast_settings,
    run,
    running,
    server_for,
)


async def _setup(**settings: float) -> tuple[FakeAsterisk, AmiClient, ReloadCoordinator]:
    peer = FakeAsterisk()
    await peer.start()
    client = AmiClient(server_for(peer, sorcery_caches=["ep_cache"]), fast_settings(**settings))
    return peer, client, ReloadCoordinator(client)


@asynccontextmanager
async def _ops_session() -> AsyncIterator[tuple[FakeAsterisk, PjsipOps]]:
    """PjsipOps over a client connected to a started fake Asterisk; the client and the
    peer are stopped on the way out (what the peer received stays readable)."""
    peer, client, _ = await _setup()
    try:
        async with running(client):
            await eventually(lambda: client.connected)
            yield peer, PjsipOps(client)
    finally:
        await peer.stop()


def test_reload_success_is_logged() -> None:
    """One request sends one Reload of res_pjsip.so and logs ami.reload with result ok."""

    async def scenario() -> None:
        peer, client, reloads = await _setup()
        with capture_logs() as logs:
            async with running(client, reloads):
                outcome = await reloads.request()
        assert outcome.ok
        assert outcome.attempts == 1
        sent = peer.actions("Reload")
        assert [a.get("Module") for a in sent] == ["res_pjsip.so"]
        logged = [e for e in logs if e["event"] == "ami.reload"]
        assert logged[-1]["result"] == "ok"
        assert {"server", "module", "took_ms"} <= logged[-1].keys()
        await peer.stop()

    run(scenario())


def test_reload_in_progress_is_retried_a_bounded_number_of_times() -> None:
    """'A reload is in progress' is retried with backoff, then given up after reload_retries."""

    async def scenario() -> None:
        peer, client, reloads = await _setup(reload_retries=3)
        peer.reload_busy = 2
        async with running(client, reloads):
            first = await reloads.request()
            peer.reload_busy = 10
            second = await reloads.request()
        assert first.ok
        assert first.attempts == 3
        assert second.result == "busy"
        assert second.attempts == 4
        assert len(peer.actions("Reload")) == 3 + 4
        await peer.stop()

    run(scenario())


def test_in_progress_retries_pause_at_most_the_cap_however_many_are_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With many retries allowed (reload_retries may be 100), the pause before each retry
    of 'A reload is in progress' doubles only up to BUSY_RETRY_MAX: ten retries from
    20 ms take about 1 s here, not 20 s (and 100 from 2 s, not 10^23 years)."""
    monkeypatch.setattr(reload_module, "BUSY_RETRY_MAX", 0.1)

    async def scenario() -> tuple[bool, int]:
        peer, client, reloads = await _setup(reload_retries=10, reload_retry_delay=0.02)
        peer.reload_busy = 10
        async with running(client, reloads):
            outcome = await asyncio.wait_for(reloads.request(), timeout=5)
        await peer.stop()
        return outcome.ok, outcome.attempts

    assert run(scenario()) == (True, 11)


def test_requests_during_a_reload_merge_into_one() -> None:
    """Ten requests while a reload runs give at most two reloads, never two at once."""

    async def scenario() -> None:
        peer, client, reloads = await _setup()
        peer.reload_delay = 0.2
        async with running(client, reloads):
            await eventually(lambda: client.connected)
            first = reloads.request()
            await eventually(lambda: reloads.in_flight)
            later = [reloads.request() for _ in range(10)]
            outcomes = await asyncio.gather(first, *later)
        assert all(o.ok for o in outcomes)
        assert len(peer.actions("Reload")) == 2
        assert outcomes[-1].requests == 10
        await peer.stop()

    run(scenario())


def test_gap_grows_with_the_last_reload_duration() -> None:
    """The next reload waits max(min_gap, factor * last duration) after the previous one."""

    async def scenario() -> None:
        peer, client, reloads = await _setup(reload_min_gap=0.05, reload_gap_factor=3.0)
        peer.reload_delay = 0.1
        loop = asyncio.get_running_loop()
        async with running(client, reloads):
            await reloads.request()
            ended = loop.time()
            await reloads.request()
            assert loop.time() - ended >= 0.3 + 0.1
        await peer.stop()

    run(scenario())


def test_a_timed_out_reload_spaces_the_next_by_the_min_gap_not_by_its_timeout() -> None:
    """A reload that timed out (its real duration unknown) is followed by the next one
    after reload_min_gap, not after reload_gap_factor times reload_timeout (at the
    defaults, 20 minutes in which nothing could be reloaded)."""

    async def scenario() -> tuple[str, bool, float]:
        settings = {"reload_timeout": 0.2, "reload_min_gap": 0.05, "reload_gap_factor": 50.0}
        peer, client, reloads = await _setup(**settings)
        peer.reload_delay = 0.4
        loop = asyncio.get_running_loop()
        async with running(client, reloads):
            first = await reloads.request()
            peer.reload_delay = 0.0
            ended = loop.time()
            second = await asyncio.wait_for(reloads.request(), timeout=5)
            waited = loop.time() - ended
        await peer.stop()
        return first.result, second.ok, waited

    first, second_ok, waited = run(scenario())
    assert (first, second_ok) == ("timeout", True)
    assert waited < 2.0, f"the next reload waited {waited:.1f} s"


def test_a_reload_cut_by_asterisk_going_away_is_redone_once_it_is_back_not_after_a_gap() -> None:
    """A reload cut when Asterisk goes away mid-reload (a restart after it had run for a
    while) is sent again as soon as the server is back: the gap after it is reload_min_gap,
    not reload_gap_factor times the time it ran before the cut (at the defaults and 95 s
    into a 50k-endpoint reload, over 3 minutes after the server was back)."""

    async def scenario() -> tuple[str, float]:
        settings = {"reload_min_gap": 0.05, "reload_gap_factor": 20.0}
        peer, client, reloads = await _setup(**settings)
        peer.reload_delay = 5.0  # cut well before it answers
        loop = asyncio.get_running_loop()
        async with running(client, reloads):
            await eventually(lambda: client.connected)
            future = reloads.request()
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            await asyncio.sleep(0.4)  # the reload runs a while (x20: an 8 s gap)
            peer.reload_delay = 0.0
            await peer.send_shutdown()  # Asterisk stops; the client reconnects at once
            back = loop.time()
            await eventually(lambda: client.connected and client.sessions == 2)
            outcome = await asyncio.wait_for(future, timeout=10)
            waited = loop.time() - back
        await peer.stop()
        return outcome.result, waited

    result, waited = run(scenario())
    assert result == "ok"
    assert waited < 2.0, f"the redone reload waited {waited:.1f} s after the server was back"


def test_pending_reload_waits_for_a_down_server() -> None:
    """A reload requested while the server is down is sent once it comes back."""

    async def scenario() -> None:
        peer, client, reloads = await _setup()
        await peer.stop()
        async with running(client, reloads):
            future = reloads.request()
            reloads.request()
            await asyncio.sleep(0.1)
            assert not future.done()
            await peer.start()
            outcome = await future
        assert outcome.ok
        assert outcome.requests == 2
        assert len(peer.actions("Reload")) == 1
        await peer.stop()

    run(scenario())


def test_a_reload_asked_for_as_the_session_closes_waits_for_the_reconnect() -> None:
    """A reload asked for at the last moment of a session (here from the callback of
    Asterisk's Shutdown event, right before the client closes the session) is sent after
    the reconnect: with both gaps 0 the coordinator found the client still connected,
    got AmiNotConnected, and tried again at once, for ever, without ever yielding to the
    event loop (the whole daemon froze)."""

    async def scenario() -> bool:
        peer, client, reloads = await _setup()
        asked: list[asyncio.Future[ReloadOutcome]] = []
        client.on_event("Shutdown", lambda _event: asked.append(reloads.request()))
        async with running(client, reloads):
            await eventually(lambda: client.connected)
            await peer.send_shutdown()
            await eventually(lambda: bool(asked))
            outcome = await asyncio.wait_for(asked[0], timeout=3)
        await peer.stop()
        return outcome.ok

    # On a thread of its own: a frozen event loop would never time the scenario out.
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(run(scenario())), daemon=True)
    thread.start()
    thread.join(timeout=15)
    assert not thread.is_alive(), "the event loop froze"
    assert result == [True]


def test_reload_cut_by_a_disconnect_stays_pending() -> None:
    """A reload whose connection drops is redone after the reconnect, not lost."""

    async def scenario() -> None:
        peer, client, reloads = await _setup()
        peer.drop_on = {"Reload"}
        async with running(client, reloads):
            future = reloads.request()
            await eventually(lambda: len(peer.actions("Reload")) == 1)
            peer.drop_on = set()
            outcome = await future
        assert outcome.ok
        assert len(peer.actions("Reload")) == 2
        await peer.stop()

    run(scenario())


def test_stop_resolves_pending_requests() -> None:
    """Stopping the coordinator answers waiting requests with 'stopped'."""

    async def scenario() -> None:
        peer, client, reloads = await _setup()
        await peer.stop()
        async with running(client, reloads):
            future = reloads.request()
        assert (await future).result == "stopped"

    run(scenario())


def test_expire_and_missing_cache() -> None:
    """Expiring from a known cache succeeds; an unknown cache is a counted warning that
    says what it means (sorcery.conf's cache, if any, keeps serving the old object) and
    names the cache among the server's missing ones."""

    async def scenario() -> None:
        async with _ops_session() as (peer, ops):
            assert await ops.expire("ep_cache", "1001") == "expired"
            with capture_logs() as logs:
                assert await ops.expire("no_such_cache", "1001") == "no_such_cache"
        assert ops.missing_cache_warnings == 1
        assert ops.missing_caches == {"no_such_cache"}
        assert logs[0]["event"] == "ami.cache_missing"
        assert "stale" in logs[0]["effect"]
        sent = peer.actions("SorceryMemoryCacheExpireObject")
        assert [(a.get("Cache"), a.get("Object")) for a in sent] == [
            ("ep_cache", "1001"),
            ("no_such_cache", "1001"),
        ]

    run(scenario())


def test_show_endpoint_live_and_unknown() -> None:
    """PJSIPShowEndpoint collects the event list; an unknown endpoint is not live (None)."""

    async def scenario() -> None:
        async with _ops_session() as (_peer, ops):
            detail = await ops.show_endpoint("1001")
            missing = await ops.show_endpoint("5555")
        assert detail is not None
        assert detail.aors == ("1001",)
        assert detail.auths == ("1001",)
        assert detail.device_state == "Not in use"
        assert ("transport", "transport-udp") in detail.objects
        assert detail.contacts[0].uri == "sip:1001@127.0.0.1:5070;ob"
        assert detail.contacts[0].object_name == "1001;@4647304968688045788916f1ea15a2ae"
        assert missing is None

    run(scenario())


def test_show_contacts_list_and_empty() -> None:
    """PJSIPShowContacts gives the ContactList items; 'No Contacts found' is an empty list."""

    async def scenario() -> None:
        async with _ops_session() as (peer, ops):
            peer.clock = lambda: float(RECORDED_AT)  # the answer exactly as recorded
            contacts = await ops.show_contacts()
            peer.astdb.clear()
            empty = await ops.show_contacts()
        assert [(c.aor, c.status, c.source) for c in contacts] == [
            ("1001", "NonQualified", "127.0.0.1:5070")
        ]
        assert contacts[0].expires_at == 1795564605
        assert contacts[0].user_agent is not None
        assert empty == []

    run(scenario())


def test_remove_contact_uses_dbdel_with_the_full_key() -> None:
    """A stale contact is removed with DBDel registrar contact/<aor>;@<hash>, once."""

    async def scenario() -> None:
        async with _ops_session() as (peer, ops):
            contacts = await ops.show_contacts()
            name = contacts[0].object_name
            assert name is not None
            assert await ops.remove_contact_object(name) is True
            assert await ops.remove_contact_object(name) is False
            assert name not in [c.object_name for c in await ops.show_contacts()]
            with pytest.raises(InvalidInput):
                await ops.remove_contact("1001", "abc\r\nAction: Originate")
        sent = peer.actions("DBDel")
        assert [(a.get("Family"), a.get("Key")) for a in sent] == [
            ("registrar", "contact/1001;@4647304968688045788916f1ea15a2ae")
        ] * 2

    run(scenario())
