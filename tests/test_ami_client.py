"""AmiClient over a real TCP socket against the transcript-replaying fake Asterisk."""

from __future__ import annotations

import asyncio
import gc
import hashlib
from collections.abc import Awaitable, Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from provisioner.ami import (
    AmiClient,
    AmiConnectionLost,
    AmiMessage,
    AmiNotConnected,
    AmiProtocolError,
    AmiTimeout,
)
from provisioner.ami.actions import MAX_HEADERS, FrameDecoder, build_action
from provisioner.ami.client import PATIENCE, _Pending

from .amipeer import FakeAsterisk, eventually, fast_settings, run, running, server_for


async def _peer() -> FakeAsterisk:
    peer = FakeAsterisk()
    await peer.start()
    return peer


def test_the_secret_never_goes_on_the_wire() -> None:
    """The login answers an MD5 challenge (``Challenge``, then ``Login`` with ``AuthType:
    MD5`` and ``Key``: the MD5 of the challenge and the secret), as Asterisk's manager
    checks it: whoever reads the connection, or greets as Asterisk on the port (a local
    user who bound it while Asterisk restarted), never gets the secret itself."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        async with running(client):
            await eventually(lambda: client.connected)
        (challenge,) = peer.actions("Challenge")
        assert challenge.get("AuthType") == "MD5"
        (login,) = peer.actions("Login")
        assert login.get("AuthType") == "MD5"
        key = hashlib.md5(f"{peer.challenges[0]}lab-secret".encode()).hexdigest()
        assert login.get("Key") == key
        assert all("lab-secret" not in value for a in peer.received for _, value in a.headers)
        await peer.stop()

    run(scenario())


def test_a_peer_refusing_the_challenge_never_gets_the_secret() -> None:
    """A peer that greets as Asterisk but refuses the MD5 challenge (one that wants the
    plain secret) is a refused login (ami.login_failed, the long backoff): no Login is
    sent, with the secret or without."""

    async def scenario() -> None:
        peer = await _peer()
        peer.challenge_refused = "Permission denied"
        client = AmiClient(server_for(peer), fast_settings(login_failure_backoff=0.6))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.health().login_failures == 1)
        assert [e["event"] for e in logs].count("ami.login_failed") == 1
        assert client.health().last_error == (
            'MD5 challenge refused: Permission denied (login = "plain" sends the secret instead)'
        )
        assert peer.actions("Challenge")
        assert peer.actions("Login") == []
        assert all("lab-secret" not in value for a in peer.received for _, value in a.headers)
        await peer.stop()

    run(scenario())


def test_a_plain_login_sends_the_secret_and_asks_no_challenge() -> None:
    """A server whose ``login`` is ``plain`` logs in as the recorded transcript does:
    ``Login`` with ``Username`` and ``Secret``, no ``Challenge`` asked, for a manager (or
    a proxy before it) that offers none."""

    async def scenario() -> None:
        peer = await _peer()
        peer.challenge_refused = "Permission denied"
        client = AmiClient(server_for(peer, login="plain"), fast_settings())
        async with running(client):
            await eventually(lambda: client.connected)
        assert peer.actions("Challenge") == []
        (login,) = peer.actions("Login")
        assert (login.get("Username"), login.get("Secret")) == ("provisioner", "lab-secret")
        assert [name for name, _ in login.headers if name in ("AuthType", "Key")] == []
        await peer.stop()

    run(scenario())


def test_login_success_and_ping() -> None:
    """A client logs in with the right secret, gets FullyBooted and answers to Ping."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        booted: list[AmiMessage] = []
        client.on_event("FullyBooted", booted.append)
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected and bool(booted))
                reply = await client.send_action("Ping")
                assert reply.ok
                assert reply.response.get("Ping") == "Pong"
        login = peer.actions("Login")[0]
        assert login.get("Username") == "provisioner"
        assert login.get("Key")
        assert [e["event"] for e in logs].count("ami.connected") == 1
        assert "lab-secret" not in repr(logs)
        assert client.health().sessions == 1
        assert not client.connected
        await peer.stop()

    run(scenario())


def test_login_failure_backs_off() -> None:
    """A refused login is logged as ami.login_failed and retried only after the long backoff."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(
            server_for(peer, secret="wrong"), fast_settings(login_failure_backoff=0.6)
        )
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: peer.logins_failed == 1)
                await asyncio.sleep(0.4)  # many base backoffs (20 ms), far less than 0.6 s
                assert peer.logins_failed == 1
                # The client's own count: the peer counts its refusal as it sends it,
                # before the client has read and logged it.
                await eventually(lambda: client.health().login_failures == 2, timeout=2)
        failed = [e for e in logs if e["event"] == "ami.login_failed"]
        assert len(failed) == 1  # once per streak (test_login_failed_logged_once_per_streak)
        assert failed[0]["retry_in_s"] >= 0.5
        assert "wrong" not in repr(logs)
        health = client.health()
        assert not health.connected
        assert health.login_failures >= 2
        assert health.last_error == "Authentication failed"
        await peer.stop()

    run(scenario())


def test_login_failed_logged_once_per_streak() -> None:
    """A run of refused logins logs ami.login_failed (an error) once and each later try as
    a warning, ami.login_failed_again; a login that succeeds ends the streak
    (ami.connected says how many failed), and the next refusal is logged anew."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(
            server_for(peer, secret="wrong"), fast_settings(login_failure_backoff=0.05)
        )
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.health().login_failures >= 4)
                failed = [e for e in logs if e["event"] == "ami.login_failed"]
                assert len(failed) == 1, failed
                again = [e for e in logs if e["event"] == "ami.login_failed_again"]
                assert again
                assert again[-1]["log_level"] == "warning"
                peer.secret = "wrong"  # the operator fixes the secret on Asterisk's side
                await eventually(lambda: client.connected)
                connected = [e for e in logs if e["event"] == "ami.connected"]
                assert connected[-1]["after_login_failures"] >= 4
                peer.secret = "rotated"  # then it changes again: a new streak
                peer.drop_all()
                await eventually(lambda: sum(e["event"] == "ami.login_failed" for e in logs) == 2)
        assert "wrong" not in repr(logs)
        assert "rotated" not in repr(logs)
        await peer.stop()

    run(scenario())


def test_a_server_down_is_logged_once_per_streak_not_at_every_try() -> None:
    """A server that refuses connections is logged as ami.connect_failed at the first try
    only, the later tries counted in ami.still_failing warnings at the 2nd, 4th, 8th...
    (debug lines between), and the connection that ends the streak says how many failed."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings(backoff_cap=0.02))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                await peer.stop()
                await eventually(
                    lambda: sum(e["event"] == "ami.still_failing" for e in logs) >= 3, timeout=5
                )
                await peer.start()
                await eventually(lambda: client.connected, timeout=5)
        failed = [e for e in logs if e["event"] == "ami.connect_failed"]
        assert len(failed) == 1, failed
        assert failed[0]["log_level"] == "warning"
        still = [e for e in logs if e["event"] == "ami.still_failing"]
        assert [e["failures"] for e in still[:3]] == [2, 4, 8]
        assert {e["log_level"] for e in still} == {"warning"}
        assert "ConnectionRefusedError" in still[0]["error"]
        again = [e for e in logs if e["event"] == "ami.connect_failed_again"]
        assert {e["log_level"] for e in again} == {"debug"}
        connected = [e for e in logs if e["event"] == "ami.connected"]
        assert connected[-1]["after_connect_failures"] >= 8
        assert connected[-1]["failed_for_s"] >= 0
        assert connected[0]["after_connect_failures"] == 0
        await peer.stop()

    run(scenario())


def test_a_peer_that_is_not_asterisk_is_logged_once_per_streak() -> None:
    """Another service holding the AMI port is logged as ami.not_asterisk (an error) at the
    first try only; the later tries are counted, not each logged at warning or above."""

    async def scenario() -> None:
        peer = FakeAsterisk(banner=b"SSH-2.0-OpenSSH_9.6\r\n")
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(login_failure_backoff=0.02))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: peer.connections >= 5)
        refused = [e for e in logs if e["event"] == "ami.not_asterisk"]
        assert len(refused) == 1, refused
        assert refused[0]["log_level"] == "error"
        loud = [e for e in logs if e["log_level"] in ("warning", "error")]
        assert len(loud) < peer.connections - 1
        await peer.stop()

    run(scenario())


def test_not_connected_action_errors_at_once() -> None:
    """An action while no connection is up fails at once and nothing is queued."""

    async def scenario() -> None:
        peer = await _peer()
        await peer.stop()
        client = AmiClient(server_for(peer), fast_settings())
        async with running(client):
            with pytest.raises(AmiNotConnected):
                await client.send_action("Ping")
            await eventually(lambda: client.health().last_error is not None)
        assert not peer.received

    run(scenario())


def test_drop_mid_action_errors_and_is_never_resent() -> None:
    """A connection dropped while an action waits fails that action; it is not sent again."""

    async def scenario() -> None:
        peer = await _peer()
        peer.drop_on = {"PJSIPShowContacts"}
        client = AmiClient(server_for(peer), fast_settings())
        async with running(client):
            await eventually(lambda: client.connected)
            with pytest.raises(AmiConnectionLost):
                await client.send_action("PJSIPShowContacts")
            peer.drop_on = set()
            await eventually(lambda: client.health().sessions == 2)
            await client.send_action("Ping")
        assert len(peer.actions("PJSIPShowContacts")) == 1
        assert len(peer.actions("Login")) == 2

    run(scenario())


def test_reconnects_after_peer_restart() -> None:
    """After Asterisk restarts the client reconnects by itself and actions work again."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        logins: list[bool] = []
        client.on_connected(lambda: logins.append(client.connected))
        async with running(client):
            await eventually(lambda: client.connected)
            await peer.restart(downtime=0.1)
            await eventually(lambda: client.health().sessions == 2)
            assert logins == [True, True]
            assert (await client.send_action("Ping")).ok
            assert client.health().reconnects == 1
        await peer.stop()

    run(scenario())


def test_ping_detects_a_silent_peer() -> None:
    """A peer that stops answering (half-open) is detected by the ping and reconnected."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings(ping_interval=0.05, ping_timeout=0.1))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                peer.silent = True
                await eventually(lambda: not client.connected, timeout=2)
                assert "Ping" in (client.health().last_error or "")
                peer.silent = False
                await eventually(lambda: client.connected, timeout=2)
        assert any(e["event"] == "ami.ping_timeout" for e in logs)
        await peer.stop()

    run(scenario())


def test_a_ping_answer_behind_a_stream_of_events_keeps_the_session() -> None:
    """A Ping answered only after many ping timeouts, while events keep arriving (its
    answer queued behind a storm), leaves the session up; the answer is awaited."""

    async def scenario() -> None:
        peer = await _peer()
        peer.delays["ping"] = 1.0
        client = AmiClient(server_for(peer), fast_settings(ping_interval=0.05, ping_timeout=0.25))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                pinged = len(peer.actions("Ping"))
                deadline = asyncio.get_running_loop().time() + 2.0
                while asyncio.get_running_loop().time() < deadline:
                    await peer.send_burst(20)
                    await asyncio.sleep(0.02)
                health = client.health()
                assert len(peer.actions("Ping")) > pinged  # pings went on, answered late
        assert (health.connected, health.sessions) == (True, 1)
        assert not [e for e in logs if e["event"] == "ami.ping_timeout"]
        await peer.stop()

    run(scenario())


async def _asked_during_a_stream(delay: float) -> tuple[bool, int]:
    """Ask for an endpoint (a patient query) whose answer takes ``delay`` seconds while
    events stream in: (answered, connections), with a 0.1 s action timeout."""
    peer = await _peer()
    peer.delays["pjsipshowendpoint"] = delay
    client = AmiClient(server_for(peer), fast_settings(action_timeout=0.1))
    async with running(client):
        await eventually(lambda: client.connected)
        asking = asyncio.ensure_future(
            client.send_action("PJSIPShowEndpoint", {"Endpoint": "1001"}, patient=True)
        )
        while not asking.done():
            await peer.send_burst(20)
            await asyncio.sleep(0.02)
        answered = asking.exception() is None
        if not answered:
            assert isinstance(asking.exception(), AmiTimeout)
        connections = peer.connections
    await peer.stop()
    return answered, connections


def test_a_patient_query_is_answered_behind_a_stream_of_events() -> None:
    """A query whose answer comes several action timeouts late, while events keep
    arriving, is answered on the same session."""
    assert run(_asked_during_a_stream(0.5)) == (True, 1)


def test_a_patient_query_still_times_out_after_patience_timeouts() -> None:
    """However long events keep coming, a patient query gives up after PATIENCE of its
    timeouts (0.6 s here), and the session stays."""
    assert PATIENCE * 0.1 < 1.5
    assert run(_asked_during_a_stream(1.5)) == (False, 1)


def test_action_timeout_is_an_error_and_not_resent() -> None:
    """An unanswered action times out for its caller and is sent exactly once."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings(action_timeout=0.1))
        async with running(client):
            await eventually(lambda: client.connected)
            peer.silent = True
            with pytest.raises(AmiTimeout):
                await client.send_action("PJSIPShowEndpoint", {"Endpoint": "1001"})
            peer.silent = False
            await asyncio.sleep(0.05)
        assert len(peer.actions("PJSIPShowEndpoint")) == 1
        await peer.stop()

    run(scenario())


def test_event_burst_is_consumed_with_bounded_memory() -> None:
    """50,000 ContactStatus events reach the callback; the read buffer stays bounded."""

    async def scenario() -> None:
        peer = await _peer()
        settings = fast_settings()
        client = AmiClient(server_for(peer), settings)
        seen = 0

        def count(_event: AmiMessage) -> None:
            nonlocal seen
            seen += 1

        client.on_event("ContactStatus", count)
        async with running(client):
            await eventually(lambda: client.connected)
            await peer.send_burst(50_000)
            await eventually(lambda: seen == 50_000, timeout=15)
            assert client.connected
            assert client.health().sessions == 1
            assert client.health().max_buffered_bytes <= settings.max_line_bytes
        await peer.stop()

    run(scenario(), timeout=25)


async def _reconnected_after(
    send: Callable[[FakeAsterisk], Awaitable[None]],
) -> tuple[list[MutableMapping[str, Any]], AmiClient]:
    """Connect a client to a new fake Asterisk and have ``send`` send it something; once
    the client has connected again (a second session) and a Ping is answered, the logs
    of all that and the client (stopped, its health kept)."""
    peer = await _peer()
    client = AmiClient(server_for(peer), fast_settings())
    with capture_logs() as logs:
        async with running(client):
            await eventually(lambda: client.connected)
            await send(peer)
            await eventually(lambda: client.health().sessions == 2, timeout=5)
            assert (await client.send_action("Ping")).ok
    await peer.stop()
    return logs, client


def _protocol_errors(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """The ``ami.protocol_error`` events of ``logs``."""
    return [e for e in logs if e["event"] == "ami.protocol_error"]


def test_oversized_line_drops_the_connection_and_reconnects() -> None:
    """A 10 MB line is refused after max_line_bytes: the client hangs up and reconnects."""

    async def scenario() -> None:
        logs, client = await _reconnected_after(
            lambda peer: peer.send_oversized_line(10 * 1024 * 1024)
        )
        assert [e["limit"] for e in _protocol_errors(logs)] == ["line"]
        assert client.health().max_buffered_bytes <= client.settings.max_line_bytes + 65536

    run(scenario())


def test_a_message_that_never_ends_drops_the_connection_and_reconnects() -> None:
    """10 MB of 1 KB header lines with no blank line is refused past max_message_bytes:
    the client logs which bound (not the bytes), hangs up and reconnects, its buffer
    bounded."""
    line = b"Data: secretive" + b"x" * 1000 + b"\r\n"  # 1 KB: the header bound is far

    async def scenario() -> None:
        logs, client = await _reconnected_after(
            lambda peer: peer.send_stream(b"Event: Junk\r\n", line, 10 << 20)
        )
        errors = _protocol_errors(logs)
        assert [e["limit"] for e in errors] == ["message"]
        assert errors[0]["server"] == "lab"
        assert "secretive" not in repr(logs)
        assert client.health().max_buffered_bytes <= client.settings.max_line_bytes + 65536

    run(scenario())


def test_a_message_of_too_many_headers_drops_the_connection() -> None:
    """A 600 KB message of 100,000 short headers (under the byte bound) passes the header
    bound: the client logs limit=headers, hangs up and reconnects; events after work."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        seen: list[AmiMessage] = []
        client.on_event("*", seen.append)
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                await peer.send_stream(b"Event: Junk\r\n", b"A: b\r\n", 100_000 * 6)
                for writer in peer._event_writers():
                    writer.write(b"\r\n")
                await eventually(lambda: client.health().sessions == 2, timeout=5)
                await peer.send_burst(1)
                await eventually(lambda: any(e.event == "ContactStatus" for e in seen))
        assert [e["limit"] for e in _protocol_errors(logs)] == ["headers"]
        assert all(len(e.headers) <= MAX_HEADERS for e in seen)
        await peer.stop()

    run(scenario())


def test_an_action_in_flight_fails_when_the_peer_passes_a_bound() -> None:
    """An action waiting for its answer gets AmiConnectionLost when the peer's line passes
    max_line_bytes, as on a dropped connection, and is not sent again."""

    async def scenario() -> None:
        peer = await _peer()
        peer.delays["pjsipshowendpoint"] = 3.0
        client = AmiClient(server_for(peer), fast_settings(action_timeout=4.0))
        async with running(client):
            await eventually(lambda: client.connected)
            waiting = asyncio.ensure_future(
                client.send_action("PJSIPShowEndpoint", {"Endpoint": "1001"})
            )
            await eventually(lambda: bool(peer.actions("PJSIPShowEndpoint")))
            await peer.send_oversized_line(1 << 20)
            with pytest.raises(AmiConnectionLost):
                await waiting
            await eventually(lambda: client.connected)
        assert len(peer.actions("PJSIPShowEndpoint")) == 1
        await peer.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("bound", "value", "limit"),
    [("max_list_bytes", 1 << 16, "list_bytes"), ("max_list_events", 100, "list_events")],
)
def test_a_list_past_its_bound_fails_the_action_and_the_session_goes_on(
    bound: str, value: int, limit: str
) -> None:
    """A PJSIPShowContacts answer of 2,000 contacts (about 1 MB) past max_list_bytes or
    max_list_events fails that action with AmiProtocolError naming the bound, logged as
    ami.protocol_error (never the bytes); the session stays up and answers what follows."""

    async def scenario() -> None:
        peer = await _peer()
        peer.list_items["pjsipshowcontacts"] = 2000
        client = AmiClient(server_for(peer), fast_settings(**{bound: value}))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                with pytest.raises(AmiProtocolError) as refused:
                    await client.send_action("PJSIPShowContacts", patient=True)
                assert refused.value.limit == limit
                assert (await client.send_action("Ping")).ok
                peer.list_items.clear()
                reply = await client.send_action("PJSIPShowContacts", patient=True)
                assert [e.get("Endpoint") for e in reply.events] == ["1001"]
                assert client.health().sessions == 1
        errors = _protocol_errors(logs)
        assert [(e["limit"], e["action"]) for e in errors] == [(limit, "PJSIPShowContacts")]
        assert "PJSUA" not in repr(logs)
        await peer.stop()

    run(scenario())


def test_a_peer_that_breaks_a_bound_at_once_is_not_reconnected_in_a_tight_loop() -> None:
    """A peer that sends an oversized line right after every login is reconnected with the
    growing backoff (20 ms doubling to 200 ms here), not hundreds of times a second."""

    async def scenario() -> None:
        peer = await _peer()
        peer.after_login = b"Event: Junk\r\nData: " + b"x" * (70 << 10)
        client = AmiClient(server_for(peer), fast_settings())
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: peer.logins_ok >= 2)
                await asyncio.sleep(1.0)
        # 20, 40, 80, 160, then 200 ms (each 50-100 % of it): at most some 15 in 1.2 s.
        assert 2 <= peer.logins_ok <= 16
        assert {e["limit"] for e in _protocol_errors(logs)} == {"line"}
        await peer.stop()

    run(scenario())


def test_a_peer_that_is_not_asterisk_gets_no_login_and_the_long_backoff() -> None:
    """A service whose greeting is not AMI (an SSH server) is logged as ami.not_asterisk
    with its greeting, never sees the login (nor its secret), and is tried again only
    after login_failure_backoff."""

    async def scenario() -> None:
        peer = FakeAsterisk(banner=b"SSH-2.0-OpenSSH_9.6\r\n")
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings(login_failure_backoff=0.6))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: peer.connections == 1)
                await asyncio.sleep(0.4)  # many base backoffs (20 ms), far less than 0.6 s
                assert peer.connections == 1
                await eventually(lambda: peer.connections == 2, timeout=2)
        assert peer.received == []
        refused = [e for e in logs if e["event"] == "ami.not_asterisk"]
        assert refused
        assert refused[0]["greeting"] == "SSH-2.0-OpenSSH_9.6"
        assert all(e["retry_in_s"] >= 0.5 for e in refused)
        assert "not Asterisk" in (client.health().last_error or "")
        assert not client.connected
        await peer.stop()

    run(scenario())


def test_a_silent_peer_gets_no_login_and_a_clear_reason() -> None:
    """A service that says nothing on connect (an HTTP server waiting for a request) never
    gets the login; the client gives up after the server's timeout, saying no AMI greeting
    came."""

    async def scenario() -> None:
        peer = FakeAsterisk(banner=b"")
        await peer.start()
        client = AmiClient(server_for(peer), fast_settings())
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.health().last_error is not None, timeout=4)
        assert peer.received == []
        assert "no AMI greeting" in (client.health().last_error or "")
        assert any(e["event"] == "ami.connect_failed" for e in logs)
        await peer.stop()

    run(scenario())


def test_shutdown_event_is_dispatched_and_handled() -> None:
    """Event: Shutdown (replayed from the transcript) reaches callbacks and ends the session."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        shutdowns: list[AmiMessage] = []
        client.on_event("Shutdown", shutdowns.append)
        async with running(client):
            await eventually(lambda: client.connected)
            await peer.send_shutdown()
            await eventually(lambda: client.health().sessions == 2)
        assert shutdowns[0].get("Shutdown") == "Cleanly"
        await peer.stop()

    run(scenario())


def test_broken_callback_does_not_stop_the_reader() -> None:
    """A callback that raises is logged; the next events are still delivered."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        seen: list[str] = []

        def broken(_event: AmiMessage) -> None:
            raise RuntimeError("boom")

        client.on_event("ContactStatus", broken)
        client.on_event("*", lambda e: seen.append(e.event))
        with capture_logs() as logs:
            async with running(client):
                await eventually(lambda: client.connected)
                await peer.send_burst(3)
                await eventually(lambda: seen.count("ContactStatus") == 3)
        assert sum(e["event"] == "ami.callback_failed" for e in logs) == 3
        await peer.stop()

    run(scenario())


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_is_paused_only_while_a_read_is_handled(enabled: bool) -> None:
    """Callbacks run with the cyclic collector paused; after the read it is as it was."""

    async def scenario() -> None:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings())
        during: list[bool] = []
        client.on_event("ContactStatus", lambda _e: during.append(gc.isenabled()))
        async with running(client):
            await eventually(lambda: client.connected)
            await peer.send_burst(3)
            await eventually(lambda: len(during) == 3)
            assert gc.isenabled() is enabled
        assert during == [False, False, False]
        await peer.stop()

    was = gc.isenabled()
    if not enabled:
        gc.disable()
    try:
        run(scenario())
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("login", ["md5", "plain"])
@pytest.mark.parametrize("odd", ["\x85", "\x9f", "\x7f", "\x1b", "é", "\u2028"])
@pytest.mark.parametrize("field", ["username", "secret"])
def test_a_login_the_configuration_accepts_can_be_sent(field: str, odd: str, login: str) -> None:
    """A username or secret is either refused by the configuration or sent in a Login that
    Asterisk accepts, by either login form: never accepted there and then refused by the
    client, whose run died of it (the daemon exited and restarted for ever)."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        value = f"lab{odd}value"
        setattr(peer, field, value)
        await peer.start()
        try:
            server = server_for(peer, login=login)
        except ValidationError:
            await peer.stop()
            return
        client = AmiClient(server, fast_settings())
        async with running(client):
            await eventually(lambda: client.connected)
        sent = peer.actions("Login")[0]
        assert peer.logins_ok == 1
        if field == "username":
            assert sent.get("Username") == value
        elif login == "md5":
            # Hashed with the challenge (UTF-8, as manager.conf holds it): accepted.
            assert sent.get("Secret") == ""
        else:
            assert sent.get("Secret") == value
        await peer.stop()

    run(scenario())


def test_a_stop_while_connecting_ends_the_client_at_once() -> None:
    """A stop that comes while the client waits on a host that accepts but never answers
    (no banner) ends the client at once, not after the server's connect timeout."""

    async def scenario() -> float:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never a banner: a host gone silent behind its port
            writer.close()

        silent = await asyncio.start_server(mute, "127.0.0.1", 0)
        peer = FakeAsterisk()
        peer.port = silent.sockets[0].getsockname()[1]
        client = AmiClient(server_for(peer, timeout=10.0), fast_settings())
        stop = asyncio.Event()
        runner = asyncio.create_task(client.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(runner, timeout=15)
        took = asyncio.get_running_loop().time() - started
        silent.close()
        await silent.wait_closed()
        return took

    assert run(scenario()) < 1.0


def test_the_kernel_probes_a_peer_that_answers_nothing_while_an_action_is_pending() -> None:
    """The AMI socket has TCP keepalive and a user timeout of ping_interval + ping_timeout:
    no Ping goes out while an action waits (a reload on its own session, up to
    reload_timeout), and a host gone meanwhile (no FIN, no RST) would otherwise be
    noticed only when that action timed out (600 s by default)."""
    import socket

    async def scenario() -> tuple[int, int, int, int]:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings(ping_interval=7.0, ping_timeout=3.0))
        async with running(client):
            await eventually(lambda: client.connected)
            session = client._session
            assert session is not None
            sock = session.writer.get_extra_info("socket")
            options = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        await peer.stop()
        return options

    keepalive, idle, interval, user_timeout = run(scenario())
    assert keepalive == 1
    assert idle == 7
    assert interval == 1
    assert user_timeout == 10_000


def test_a_ping_interval_past_the_kernels_keepalive_limit_still_connects() -> None:
    """A ping_interval longer than the kernel's keepalive limit (32767 s) still connects:
    the probe times are capped, not refused by the kernel for every connection."""

    async def scenario() -> bool:
        peer = await _peer()
        client = AmiClient(server_for(peer), fast_settings(ping_interval=86_400.0))
        async with running(client):
            await eventually(lambda: client.connected)
            ok = (await client.send_action("Ping")).ok
        await peer.stop()
        return ok

    assert run(scenario())


def test_a_pending_list_is_matched_by_its_id_in_any_spelling_and_other_events_dispatched() -> None:
    """While a list action waits, an item whose ActionID is spelled in another case goes to
    it, and an event that only mentions its id in another header goes to the callbacks."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        peer.port = 5038  # never connected: the client only needs a valid server entry
        client = AmiClient(server_for(peer), fast_settings())
        seen: list[AmiMessage] = []
        client.on_event("ContactList", seen.append)
        client.on_event("*", seen.append)
        action = build_action("PJSIPShowContacts", (), action_id="id-7")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session: Any = SimpleNamespace(pending={"id-7": _Pending(action, future)})
        wire = (
            b"Asterisk Call Manager/11.0.0\r\n"
            b"Response: Success\r\nactionid: id-7\r\nEventList: start\r\n\r\n"
            b"Event: ContactList\r\nACTIONID: id-7\r\nUri: sip:a\r\n\r\n"
            b"Event: ContactList\r\nUri: id-7\r\n\r\n"
            b"Event: ContactListComplete\r\nActionID: id-7\r\nEventList: Complete\r\n\r\n"
        )
        for message in FrameDecoder().feed(wire):
            client._handle(session, message)
        reply = future.result()
        assert [e.get("Uri") for e in reply.events] == ["sip:a"]
        # The one only naming the id, to its own callback and the wildcard's, in order.
        assert [e.get("Uri") for e in seen] == ["id-7", "id-7"]

    run(scenario())
