"""End to end, what an admin sees of a phone: the daemon as a real subprocess, the store,
the target and a fake Asterisk speaking the recorded AMI (``../shared/asterisk``)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from .amipeer import FakeAsterisk
from .faultkit import cli_async as _cli
from .test_daemon_e2e import _seed, _start_daemon, _stop, _until, _write_config

#: The recorded REGISTER's security event of realtime endpoint 1001 (capture 1).
_AUTH_1001 = ("Event: SuccessfulAuth", "Service: PJSIP", "AccountID: 1001")


def _asked(peer: FakeAsterisk, action: str, key: str, value: str) -> bool:
    """Whether ``peer`` received ``action`` with ``key: value``."""
    return any(a.get(key) == value for a in peer.actions(action))


async def _status(config: Path, username: str) -> dict[str, Any]:
    """``provisioner status USERNAME --json``'s one row."""
    return dict(json.loads(await _cli(config, "status", username, "--json"))[0])


async def _add(config: Path, username: str, *extra: str) -> None:
    await _cli(
        config,
        "user",
        "add",
        username,
        "--full-name",
        username.title(),
        "--email",
        f"{username}@example.com",
        "--profile",
        "agents",
        *extra,
    )


def test_a_realtime_phone_registering_while_an_earlier_edit_is_sent_is_shown_online(
    tmp_path: Path,
) -> None:
    """A new realtime user's phone that registers (its SuccessfulAuth) while the AMI side
    still sends an earlier edit's cache expiries, before it took the new user's change, is
    looked up all the same and shown online: Asterisk sends no status event for it."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        recorded = set(peer.astdb)
        peer.astdb.clear()  # no phone registered at the start
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind="realtime", caches=("ep_cache",))
        await _seed(config)
        await _add(config, "zed", "--extension", "1500")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            # The start's own actions sent: its check of zed's endpoint is the last.
            await _until(lambda: _asked(peer, "PJSIPShowEndpoint", "Endpoint", "1500"), 15)
            # Asterisk answers each expiry only after 3 s (behind a storm of events, say).
            peer.delays["sorcerymemorycacheexpireobject"] = 3.0
            sent = len(peer.actions("SorceryMemoryCacheExpireObject"))
            await _cli(config, "user", "edit", "zed", "--nat", "yes")
            await _until(lambda: len(peer.actions("SorceryMemoryCacheExpireObject")) > sent, 5)
            await _add(config, "alice")  # extension 1001, its rows live at once
            await asyncio.sleep(0.2)  # applied, its change queued behind the expiries
            peer.astdb.update(recorded)  # its phone registers now
            await peer.send_recorded(*_AUTH_1001)
            peer.delays.clear()

            async def online() -> bool:
                return bool((await _status(config, "alice"))["state"] == "online")

            await _until(online, 10)
            contacts = (await _status(config, "alice"))["contacts"]
            assert [c["uri"] for c in contacts] == ["sip:1001@127.0.0.1:5070;ob"]
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


#: The recorded contact of phone 1001 in astdb (``registration_events.txt``).
_ALICE_CONTACT = "contact/1001;@4647304968688045788916f1ea15a2ae"


@pytest.mark.parametrize("kind", ["config", "realtime"])
def test_a_phone_disabled_while_asterisk_is_away_has_its_registration_removed_once_back(
    tmp_path: Path, kind: str
) -> None:
    """Alice's phone is registered; Asterisk's AMI goes away; alice is disabled: her
    objects go at once, and once Asterisk is back her registration is deleted from astdb
    (a config file's after the reload that drops her endpoint) and she is shown offline."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind=kind)
        await _seed(config)
        await _add(config, "alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state_is(wanted: str) -> bool:
                return bool((await _status(config, "alice"))["state"] == wanted)

            await _until(partial(state_is, "online"), 5)
            await peer.stop()
            await _cli(config, "user", "disable", "alice")
            await asyncio.sleep(0.5)  # applied while Asterisk is away
            since = len(peer.received)
            await peer.start()
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 10)
            names = [a.name for a in peer.received[since:]]
            if kind == "config":
                deleted = names.index("DBDel")
                assert "Reload" in names[:deleted], names
            await _until(partial(state_is, "offline"), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_two_users_swapping_extensions_never_show_the_others_phone(tmp_path: Path) -> None:
    """Alice (1001, her phone registered) and bob (1002) swap extensions in one import:
    while the reload that gives 1001 to bob runs (3 s), bob is not shown online with
    alice's phone; after it alice's registration under 1001 is deleted and both are
    offline (neither phone registered under its new extension yet)."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        await _seed(config)
        await _add(config, "alice")
        await _add(config, "bob")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state(username: str) -> str:
                return str((await _status(config, username))["state"])

            async def online() -> bool:
                return await state("alice") == "online"

            await _until(online, 5)
            peer.reload_delay = 3.0
            csv = tmp_path / "swap.csv"
            csv.write_text("username,extension\nalice,1002\nbob,1001\n")
            reloads = len(peer.actions("Reload"))
            await _cli(config, "user", "import", "--csv", str(csv))
            await _until(lambda: len(peer.actions("Reload")) > reloads, 5)
            await asyncio.sleep(0.5)  # the reload runs
            shown = await _status(config, "bob")
            assert shown["state"] != "online", shown
            assert not shown["contacts"], shown
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 10)
            assert await state("bob") == "offline"
            assert await state("alice") == "offline"
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["config", "realtime"])
def test_an_endpoint_asterisk_rejects_is_reported_next_to_its_user_and_cleared_when_fixed(
    tmp_path: Path, kind: str
) -> None:
    """Asterisk does not hold alice's endpoint after it was applied (a reload that dropped
    it, reload_with_bad_config.txt): status and user show say why next to her, the metrics count
    it; once an edit of hers is held, her problem is cleared and no longer counted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def not_live() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        wanted = 'provisioner_endpoints_not_live{server="pbx1"} '
        return next((line.split()[-1] for line in body.splitlines() if line.startswith(wanted)), "")

    async def scenario() -> None:
        peer = FakeAsterisk()
        peer.prefer["pjsipshowendpoint"] = "Unable to retrieve endpoint"
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind=kind)
        config.write_text(
            config.read_text().replace("[daemon]", f"[daemon]\nmetrics_port = {port}")
        )
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await _add(config, "alice")

            async def problem() -> str:
                servers = (await _status(config, "alice"))["servers"]
                return str(servers[0]["problem"]) if servers else "(none)"

            async def rejected() -> bool:
                return "does not hold" in await problem()

            await _until(rejected, 10)
            assert "does not hold" in await _cli(config, "status", "alice")
            assert "problem:pbx1" in await _cli(config, "user", "show", "alice")
            # Alice's and the admin's (1000), at the next health write.
            await _until(lambda: not_live() == "2.0", 20)
            peer.prefer.clear()  # the cause fixed: Asterisk holds it as rendered
            await _cli(config, "user", "edit", "alice", "--nat", "yes")

            async def cleared() -> bool:
                return await problem() == ""

            await _until(cleared, 10)
            assert "does not hold" not in await _cli(config, "status", "alice")
            shown = json.loads(await _cli(config, "user", "show", "alice", "--json"))
            assert shown["registration_problems"] == {}
            await _until(lambda: not_live() == "1.0", 20)  # the admin's only
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_webrtc_user_with_two_contacts_stays_online_when_one_goes(tmp_path: Path) -> None:
    """Alice registers from two browsers (two contacts of AOR 1001); one un-registers:
    she stays online with the other, then offline once it goes too; the order of the
    three status events of each does not matter."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        peer.astdb.clear()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        await _seed(config)
        await _add(config, "alice", "--transport", "wss")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        second = ((b"127.0.0.1:5070;ob", b"10.0.0.7:41234;transport=ws"),)
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: PeerStatus", "Reachable")
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified", replace=second)

            async def shown() -> tuple[str, list[str]]:
                row = await _status(config, "alice")
                return str(row["state"]), sorted(c["uri"] for c in row["contacts"])

            both = ["sip:1001@10.0.0.7:41234;transport=ws", "sip:1001@127.0.0.1:5070;ob"]

            async def is_(wanted: tuple[str, list[str]]) -> bool:
                return await shown() == wanted

            await _until(partial(is_, ("online", both)), 5)
            await peer.send_recorded("Event: ContactStatus\r\n", "Removed", replace=second)
            await _until(partial(is_, ("online", both[1:])), 5)
            await peer.send_recorded("Event: PeerStatus", "Unreachable")
            await peer.send_recorded("Event: ContactStatus\r\n", "Removed")
            await _until(partial(is_, ("offline", [])), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["config", "realtime"])
def test_an_extension_freed_and_given_to_another_user_at_once_loses_the_old_phone(
    tmp_path: Path, kind: str
) -> None:
    """Alice (1001, her phone registered) moves to 1005, and bob is given 1001 right after,
    while the reload for alice's move still runs: alice's phone's registration under 1001
    is deleted all the same (it must not take bob's calls), and neither user is shown
    with it."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind=kind)
        await _seed(config)
        await _add(config, "alice")
        await _add(config, "bob", "--extension", "1002")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state(username: str) -> str:
                return str((await _status(config, username))["state"])

            async def online() -> bool:
                return await state("alice") == "online"

            await _until(online, 5)
            peer.reload_delay = 2.0
            if kind == "realtime":
                peer.delays["dbdel"] = 2.0  # the removal still on its way
            await _cli(config, "user", "edit", "alice", "--extension", "1005")
            await asyncio.sleep(0.3)
            await _cli(config, "user", "edit", "bob", "--extension", "1001")
            await asyncio.sleep(0.3)  # applied; the removal still waits
            assert _ALICE_CONTACT in peer.astdb
            assert await state("bob") == "offline"
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 15)
            for username in ("alice", "bob"):
                row = await _status(config, username)
                assert (row["state"], row["contacts"]) == ("offline", []), row
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["config", "realtime"])
def test_a_user_renamed_in_the_store_has_the_old_credentials_registration_removed(
    tmp_path: Path, kind: str
) -> None:
    """Alice's phone is registered with her SIP username; a DBA renames her (an UPDATE
    of the username, the auth username): the contact registered under the old
    credentials is deleted, and she is shown offline meanwhile, not online with it."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind=kind)
        await _seed(config)
        await _add(config, "alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state(username: str) -> str:
                return str((await _status(config, username))["state"])

            async def online() -> bool:
                return await state("alice") == "online"

            await _until(online, 5)
            peer.reload_delay = 2.0
            if kind == "realtime":
                peer.delays["dbdel"] = 2.0
            store = sqlite3.connect(tmp_path / "store.db")
            with store:
                store.execute(
                    "UPDATE users SET username = 'alicia', username_key = 'alicia'"
                    " WHERE username = 'alice'"
                )
            store.close()
            await asyncio.sleep(0.5)  # applied; the removal still on its way
            assert _ALICE_CONTACT in peer.astdb
            assert await state("alicia") == "offline"
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 15)
            assert await state("alicia") == "offline"
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_reconnect_before_a_reowned_endpoint_is_cleared_does_not_show_the_old_phone(
    tmp_path: Path,
) -> None:
    """Alice's extension 1001 (her phone registered) is given to bob while alice moves
    away; the AMI session drops before the reload that owes the removal has ended, and
    the reconnect's snapshot lists alice's contact under 1001 again: bob is still not
    shown online with it, and it is deleted once the reload ends."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        await _seed(config)
        await _add(config, "alice")
        await _add(config, "bob", "--extension", "1002")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state(username: str) -> str:
                return str((await _status(config, username))["state"])

            async def online() -> bool:
                return await state("alice") == "online"

            await _until(online, 5)
            peer.reload_delay = 3.0
            csv = tmp_path / "swap.csv"
            csv.write_text("username,extension\nalice,1005\nbob,1001\n")
            reloads = len(peer.actions("Reload"))
            await _cli(config, "user", "import", "--csv", str(csv))
            await _until(lambda: len(peer.actions("Reload")) > reloads, 5)
            listed = len(peer.actions("PJSIPShowContacts"))
            peer.drop_all()  # the reload is lost with the session: asked again
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) > listed, 10)
            await asyncio.sleep(0.5)  # the snapshot stored
            assert _ALICE_CONTACT in peer.astdb
            shown = await _status(config, "bob")
            assert (shown["state"], shown["contacts"]) == ("offline", []), shown
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 20)
            assert await state("bob") == "offline"
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_realtime_phone_disabled_is_expired_from_the_cache_before_its_contact_goes(
    tmp_path: Path,
) -> None:
    """Disabling a realtime user behind a sorcery cache sends, in this order: the expiry
    of her endpoint, auth and AOR from the cache (else Asterisk still takes her phone's
    REGISTER from the cached objects and makes the contact again), the deletion of her
    contact, then a reload; she is shown offline."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind="realtime", caches=("ep_cache",))
        await _seed(config)
        await _add(config, "alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state_is(wanted: str) -> bool:
                return bool((await _status(config, "alice"))["state"] == wanted)

            await _until(partial(state_is, "online"), 5)
            await asyncio.sleep(6)  # the start's checks (retried after 5 s) are done
            since = len(peer.received)
            await _cli(config, "user", "disable", "alice")
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 10)
            await _until(lambda: "Reload" in [a.name for a in peer.received[since:]], 5)
            sent = [
                (a.name, a.get("Object") or a.get("Key"))
                for a in peer.received[since:]
                if a.name in ("SorceryMemoryCacheExpireObject", "DBDel", "Reload")
            ]
            deleted = sent.index(("DBDel", _ALICE_CONTACT))
            expired = [obj for name, obj in sent[:deleted] if name != "DBDel"]
            assert "1001" in expired, sent
            assert sent[-1][0] == "Reload", sent
            await _until(partial(state_is, "offline"), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_phone_disabled_while_asterisk_is_mid_reload_loses_its_contact_after_a_reload(
    tmp_path: Path,
) -> None:
    """Alice (config file, her phone registered) is disabled while Asterisk answers
    "A reload is in progress" (another reload runs): her contact is deleted only after a
    reload Asterisk accepted (before it, her endpoint is still live and her phone could
    register again), and she is then shown offline."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        config.write_text(config.read_text().replace("[ami]", "[ami]\nreload_retry_delay = 0.2"))
        await _seed(config)
        await _add(config, "alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state_is(wanted: str) -> bool:
                return bool((await _status(config, "alice"))["state"] == wanted)

            await _until(partial(state_is, "online"), 5)
            peer.reload_busy = 2
            since = len(peer.received)
            await _cli(config, "user", "disable", "alice")
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 20)
            names = [a.name for a in peer.received[since:]]
            deleted = names.index("DBDel")
            assert names[:deleted].count("Reload") == 3, names  # busy, busy, accepted
            await _until(partial(state_is, "offline"), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_disabled_phone_whose_reload_says_invalid_first_still_loses_its_contact(
    tmp_path: Path,
) -> None:
    """The reload that drops disabled alice's endpoint sends DeviceStateChange INVALID
    for it before its answer (which takes the contacts out of the book, though astdb
    keeps them): her contact is still deleted from astdb, found by listing them."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        await _seed(config)
        await _add(config, "alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state_is(wanted: str) -> bool:
                return bool((await _status(config, "alice"))["state"] == wanted)

            await _until(partial(state_is, "online"), 5)
            peer.reload_delay = 1.0
            reloads = len(peer.actions("Reload"))
            await _cli(config, "user", "disable", "alice")
            await _until(lambda: len(peer.actions("Reload")) > reloads, 5)
            invalid = ((b"State: NOT_INUSE", b"State: INVALID"),)
            await peer.send_recorded("Event: DeviceStateChange", "NOT_INUSE", replace=invalid)
            await _until(lambda: _ALICE_CONTACT not in peer.astdb, 10)
            await _until(partial(state_is, "offline"), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())
