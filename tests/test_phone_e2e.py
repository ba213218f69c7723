"""End to end, what an admin sees of a phone: the daemon as a real subprocess, the store,
the target and a fake Asterisk speaking the recorded AMI (``../shared/asterisk``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

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
