"""End to end: the daemon as a real subprocess, the store, the file and a fake Asterisk."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, select

from provisioner.ami.changes import loaded_digest_key, owed_removal_key, reload_owed_key
from provisioner.store.engine import open_engine, reading
from provisioner.store.registrations import write_endpoint_rows
from provisioner.store.schema import users
from provisioner.store.state import load_state
from provisioner.targets.asterisk_schema import ps_aors, ps_auths, ps_endpoints
from provisioner.targets.shards import shard_name, shard_of

from .amipeer import FakeAsterisk, ReceivedAction
from .faultkit import SEED_COMMANDS, cli_in_thread, seed_admin_store
from .faultkit import cli_async as _cli
from .faultkit import until_async as _until

PROVISIONER = str(Path(sys.executable).with_name("provisioner"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env["PROVISIONER_LOG__FORMAT"] = "json"
    return env


def _write_config(
    tmp: Path,
    ami_port: int | None,
    *,
    quiet: float = 0.02,
    max_wait: float = 0.2,
    kind: str = "config",
    caches: tuple[str, ...] = (),
    default_reload_gaps: bool = False,
) -> Path:
    """A daemon config on ``tmp``'s store and file; reloads ungapped (``reload_min_gap`` and
    ``reload_gap_factor`` 0) unless ``default_reload_gaps``."""
    gaps = [] if default_reload_gaps else ["reload_min_gap = 0", "reload_gap_factor = 0"]
    lines = [
        "[store]",
        f'url = "sqlite:///{tmp / "store.db"}"',
        "[security]",
        "password_policy = false",
        "[target]",
        f'kind = "{kind}"',
        f'path = "{tmp / "pjsip_users.conf"}"',
        "[daemon]",
        f'state_dir = "{tmp / "state"}"',
        f"quiet = {quiet}",
        f"max_wait = {max_wait}",
        "shutdown_timeout = 5",
        "[ami]",
        *gaps,
        "backoff_base = 0.05",
        "backoff_cap = 0.2",
    ]
    if ami_port is not None:
        lines += [
            "[[asterisk]]",
            'name = "pbx1"',
            'host = "127.0.0.1"',
            f"port = {ami_port}",
            'username = "provisioner"',
            'secret = "lab-secret"',
            f"sorcery_caches = {json.dumps(list(caches))}",
        ]
    path = tmp / "provisioner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _start_daemon(config: Path, log: Path, *flags: str) -> asyncio.subprocess.Process:
    fh = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        PROVISIONER, "--config", str(config), *flags, "run", stdout=fh, stderr=fh, env=_env()
    )
    fh.close()
    health = config.parent / "state" / "health.json"

    def ready() -> bool:
        try:
            return (
                bool(json.loads(health.read_text())["ready"])
                and json.loads(health.read_text())["pid"] == proc.pid
            )
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    await _until(ready, 20)
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout=15)


def _bytes(path: Path) -> bytes:
    """The file's bytes, or none while it does not exist (yet)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _text(path: Path) -> str:
    """The file's text, or "" while it does not exist (yet)."""
    return _bytes(path).decode()


def _agent_args(username: str, full_name: str) -> list[str]:
    """``user add`` arguments of a user of profile "agents"."""
    email = f"{username}@example.com"
    return [
        "user",
        "add",
        username,
        "--full-name",
        full_name,
        "--email",
        email,
        "--profile",
        "agents",
    ]


async def _add_agent(config: Path, username: str, full_name: str) -> None:
    """``provisioner user add`` of a user of profile "agents" (the CLI run in this process)."""
    await cli_in_thread(config, *_agent_args(username, full_name))


async def _seed(config: Path) -> None:
    """The store of ``config`` as ``db upgrade``, ``profile add agents`` and ``user add root``
    (an admin) make it (a copy of one made so in this process)."""
    seed_admin_store(config)


async def _seed_by_console_script(config: Path) -> None:
    """:func:`_seed`, each command run by the console script as a subprocess."""
    for command in SEED_COMMANDS:
        await _cli(config, *command)


def _temporaries(directory: Path) -> set[str]:
    """The names of the atomic writes' temporary files (``.<name>.<random>.tmp``) in
    ``directory``."""
    return {p.name for p in directory.glob(".*.tmp")}


def _created_at(store: Path, username: str) -> datetime:
    """The ``created_at`` (UTC) of ``username``'s row in the SQLite store at ``store``: the
    time the add's transaction took just before its insert, so no later than its commit."""
    engine = open_engine(f"sqlite:///{store}")
    try:
        with reading(engine) as conn:
            query = select(users.c.created_at).where(users.c.username == username)
            made: datetime = conn.execute(query).scalar_one()
    finally:
        engine.dispose()
    return made.replace(tzinfo=UTC)


async def _live_at(check: Callable[[], bool], timeout: float = 5.0) -> datetime:
    """The wall-clock time (UTC) at which ``check``, polled every 20 ms, was first seen
    true (a moment after it became so); fails after ``timeout`` seconds."""
    await _until(check, timeout)
    return datetime.now(UTC)


def _live_with(conf: Path, text: str, peer: FakeAsterisk, reloads: int) -> bool:
    """``conf`` holds ``text`` and ``peer`` has had more than ``reloads`` reloads."""
    return text in _text(conf) and len(peer.actions("Reload")) > reloads


def test_edits_in_quick_succession_are_each_live_within_1_s_with_the_default_reload_gaps(
    tmp_path: Path,
) -> None:
    """With the shipped reload spacing (the peer's reloads take no time, as a small site's
    do), an edit committed right after another's reload is live, in the file with a
    reload of its own, within 1 s of its commit: the gap between reloads holds it back
    less than that."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, default_reload_gaps=True)
        conf = tmp_path / "pjsip_users.conf"
        await _seed_by_console_script(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: peer.logins_ok >= 1, 10)
            await _cli(config, *_agent_args("alice", "Alice"))
            await _until(lambda: "[1001]" in _text(conf), 5)
            store = sqlite3.connect(tmp_path / "store.db")
            for context in ("ctx-one", "ctx-two", "ctx-three"):
                reloads = len(peer.actions("Reload"))
                with store:  # commits
                    store.execute(
                        "UPDATE users SET context = ? WHERE username = 'alice'", (context,)
                    )
                committed = time.monotonic()
                await _until(partial(_live_with, conf, f"context={context}", peer, reloads), 5)
                took = time.monotonic() - committed
                assert took < 1.0, f"{context}: commit to live took {took:.3f} s"
            store.close()
        finally:
            assert await _stop(daemon) == 0
            await peer.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_edit_to_live_reload_registration_and_disable(tmp_path: Path) -> None:
    """A user add is live in the file with a reload within 1 s of its commit (timed from the
    ``created_at`` its transaction wrote); ContactStatus makes it online,
    then offline, then online again; a disable removes its section, reloads, deletes its
    registration from Asterisk and shows it offline."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        conf = tmp_path / "pjsip_users.conf"
        # Every command here is the console script, as an admin would run it.
        await _seed_by_console_script(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: peer.logins_ok >= 1, 10)
            reloads_before = len(peer.actions("Reload"))
            await _cli(config, *_agent_args("alice", "Alice"))
            live = await _live_at(
                lambda: "[1001]" in _text(conf) and len(peer.actions("Reload")) > reloads_before
            )
            took = (live - _created_at(tmp_path / "store.db", "alice")).total_seconds()
            assert took < 1.0, f"commit to live took {took:.3f} s"
            assert peer.actions("Reload")[-1].get("Module") == "res_pjsip.so"

            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")

            async def state() -> str:
                out = json.loads(await _cli(config, "status", "alice", "--json"))
                return str(out[0]["state"])

            async def online() -> bool:
                return await state() == "online"

            await _until(online, 5)
            status = json.loads(await _cli(config, "status", "alice", "--json"))[0]
            assert status["contacts"][0]["uri"] == "sip:1001@127.0.0.1:5070;ob"

            await peer.send_recorded("Event: ContactStatus\r\n", "ContactStatus: Removed")

            async def offline() -> bool:
                return await state() == "offline"

            await _until(offline, 5)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await _until(online, 5)

            reloads_before = len(peer.actions("Reload"))
            await _cli(config, "user", "disable", "alice")
            await _until(
                lambda: (
                    "[1001]" not in _text(conf) and len(peer.actions("Reload")) > reloads_before
                ),
                5,
            )
            await _until(
                lambda: any(
                    a.get("Key").startswith("contact/1001;@") for a in peer.actions("DBDel")
                ),
                5,
            )
            # The registration is gone from Asterisk ...
            assert not [k for k in peer.astdb if k.startswith("contact/1001;@")]
            await _until(offline, 5)  # ... and the store says so
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()
        log = (tmp_path / "daemon.log").read_text()
        assert "Traceback" not in log
        assert "lab-secret" not in log

    asyncio.run(scenario())


#: The realtime rows of extension 1001: table and id.
_ROWS_1001 = ((ps_endpoints, "1001"), (ps_auths, "1001-auth"), (ps_aors, "1001"))


def _has_rows(store: Path, rows: tuple[tuple[Table, str], ...]) -> bool:
    """Whether each (table, id) of ``rows`` is a committed row of the SQLite store at
    ``store`` now (read without the write lock, as Asterisk reads)."""
    engine = open_engine(f"sqlite:///{store}")
    try:
        with reading(engine) as conn:
            return all(
                conn.execute(select(table.c.id).where(table.c.id == key)).first() is not None
                for table, key in rows
            )
    finally:
        engine.dispose()


def _expired_from(peer: FakeAsterisk, since: int, cache: str, object_id: str) -> bool:
    """Whether ``peer`` was asked after position ``since`` to expire ``object_id`` from
    ``cache`` (``SorceryMemoryCacheExpireObject``)."""
    return any(
        a.get("Cache") == cache and a.get("Object") == object_id
        for a in peer.received[since:]
        if a.name.lower() == "sorcerymemorycacheexpireobject"
    )


def test_realtime_user_add_is_in_the_rows_with_its_cache_expiry_within_1_s(
    tmp_path: Path,
) -> None:
    """``provisioner user add`` on a realtime target: within 1 s of its commit (timed from
    the ``created_at`` its transaction wrote) the endpoint's, auth's and aor's rows are in
    the SQLite store's ps_* tables and the fake Asterisk got the endpoint's
    SorceryMemoryCacheExpireObject from ``ep_cache``."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind="realtime", caches=("ep_cache",))
        store = tmp_path / "store.db"
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: peer.logins_ok >= 2, 10)  # its events and actions sessions
            since = len(peer.received)
            await _cli(config, *_agent_args("alice", "Alice"))
            live = await _live_at(
                lambda: (
                    _has_rows(store, _ROWS_1001) and _expired_from(peer, since, "ep_cache", "1001")
                )
            )
            took = (live - _created_at(store, "alice")).total_seconds()
            assert took < 1.0, f"commit to live took {took:.3f} s"
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()
        assert "Traceback" not in (tmp_path / "daemon.log").read_text()

    asyncio.run(scenario())


@asynccontextmanager
async def _running_on_file(
    tmp_path: Path,
) -> AsyncIterator[tuple[Path, Path, asyncio.subprocess.Process]]:
    """A seeded daemon on the config-file target, once the file is rendered: (its config
    file, the rendered file, the process); stopped at the end, which must exit 0."""
    config = _write_config(tmp_path, None)
    conf = tmp_path / "pjsip_users.conf"
    await _seed(config)
    daemon = await _start_daemon(config, tmp_path / "daemon.log")
    try:
        await _until(lambda: "transport=transport-udp" in _text(conf), 5)
        yield config, conf, daemon
    except BaseException:
        daemon.kill()  # a failed test leaves no daemon behind
        await daemon.wait()
        raise
    assert await _stop(daemon) == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP])
def test_sighup_reloads_config(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGHUP re-reads the configuration: a changed transport name is re-rendered for everyone."""

    async def scenario() -> None:
        async with _running_on_file(tmp_path) as (config, conf, daemon):
            config.write_text(config.read_text() + '\n[target.transports]\nudp = "udp-main"\n')
            daemon.send_signal(sig)
            await _until(lambda: "transport=udp-main" in _text(conf), 5)

    asyncio.run(scenario())


def test_sighup_keeps_command_line_settings(tmp_path: Path) -> None:
    """A SIGHUP re-reads the file under the same --set flags: a transport name given on the
    command line stays in the file while another file setting takes effect."""

    async def scenario() -> None:
        config = _write_config(tmp_path, None)
        conf = tmp_path / "pjsip_users.conf"
        log = tmp_path / "daemon.log"
        await _seed(config)
        daemon = await _start_daemon(config, log, "--set", "target.transports.udp=udp-flag")
        try:
            await _until(lambda: "transport=udp-flag" in _text(conf), 5)
            config.write_text(config.read_text() + '\n[target.transports]\ntcp = "tcp-file"\n')
            daemon.send_signal(signal.SIGHUP)
            await _until(lambda: "config.reloaded" in _text(log), 5)
            await asyncio.sleep(0.3)  # the full apply that follows a reload
            assert "transport=udp-flag" in _text(conf)
            assert "transport=transport-udp" not in _text(conf)
        finally:
            assert await _stop(daemon) == 0

    asyncio.run(scenario())


def test_sighup_applies_a_new_layout(tmp_path: Path) -> None:
    """A SIGHUP that sets target.shards builds the sharded target anew: the main file then
    includes the shard files, which hold every user; a user added afterwards lands in
    the shard file its extension belongs to."""
    directory = tmp_path / "pjsip_users.d"
    shards = [directory / shard_name(index, 4) for index in range(4)]

    def holding(text: str) -> list[Path]:
        return [shard for shard in shards if text in _text(shard)]

    async def scenario() -> None:
        async with _running_on_file(tmp_path) as (config, conf, daemon):
            users = _text(conf).count("type=endpoint")
            config.write_text(config.read_text().replace("[target]\n", "[target]\nshards = 4\n"))
            daemon.send_signal(signal.SIGHUP)
            await _until(lambda: _text(conf).count("#include") == 4, 5)
            assert sum(_text(shard).count("type=endpoint") for shard in shards) == users
            await _add_agent(config, "shardy", "Shard Y")
            await _until(lambda: bool(holding('"Shard Y" <')), 5)
            (shard,) = holding('"Shard Y" <')
            extension = _text(shard).split('callerid="Shard Y" <', 1)[1].split(">", 1)[0]
            assert shard.name == shard_name(shard_of(extension, 4), 4)

    asyncio.run(scenario())


def _override_header(tmp_path: Path) -> Path:
    """A template override directory ``override`` under ``tmp_path`` holding only
    ``header.j2`` (its text ``; site header v1``): that header's path."""
    override = tmp_path / "override"
    override.mkdir()
    header = override / "header.j2"
    header.write_text("; site header v1\n")
    return header


async def _sighup_to_templates(
    config: Path, conf: Path, daemon: asyncio.subprocess.Process, directory: Path
) -> None:
    """Name ``directory`` as ``target.templates`` in ``config``, SIGHUP ``daemon``, and
    return once ``conf`` starts with the v1 header of ``_override_header``."""
    setting = f'[target]\ntemplates = "{directory}"\n'
    config.write_text(config.read_text().replace("[target]\n", setting))
    daemon.send_signal(signal.SIGHUP)
    await _until(lambda: _text(conf).startswith("; site header v1"), 5)


def test_sighup_watches_a_new_template_directory(tmp_path: Path) -> None:
    """After a SIGHUP names a template override directory, the file is rendered with it at
    once, and an edit of a template there is rendered too (the new directory is watched)."""
    header = _override_header(tmp_path)

    async def scenario() -> None:
        async with _running_on_file(tmp_path) as (config, conf, daemon):
            await _sighup_to_templates(config, conf, daemon, header.parent)
            header.write_text("; site header v2\n")
            await _until(lambda: _text(conf).startswith("; site header v2"), 5)

    asyncio.run(scenario())


def test_sighup_rereads_a_template_edited_in_place_keeping_its_size_and_mtime(
    tmp_path: Path,
) -> None:
    """A template edited in place with its size and modification time unchanged (a coarse
    clock, a tool keeping mtimes) looks untouched; a SIGHUP re-reads it all the same."""
    header = _override_header(tmp_path)

    async def scenario() -> None:
        async with _running_on_file(tmp_path) as (config, conf, daemon):
            await _sighup_to_templates(config, conf, daemon, header.parent)
            before = header.stat()
            header.write_text("; site header v2\n")
            os.utime(header, ns=(before.st_atime_ns, before.st_mtime_ns))
            daemon.send_signal(signal.SIGHUP)
            await _until(lambda: _text(conf).startswith("; site header v2"), 5)

    asyncio.run(scenario())


def test_metrics_endpoint_counts_syncs(tmp_path: Path) -> None:
    """With daemon.metrics_port set, /metrics on localhost counts syncs and provisioned users."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> str:
        config = _write_config(tmp_path, None)
        config.write_text(
            config.read_text().replace("[daemon]", f"[daemon]\nmetrics_port = {port}")
        )
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body: bytes = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=5).read()
            )
            return body.decode()
        finally:
            assert await _stop(daemon) == 0

    text = asyncio.run(scenario())
    assert 'provisioner_syncs_total{kind="full",result="ok"} 1.0' in text
    assert "provisioner_users_provisioned 1.0" in text


def test_postgresql_outage_is_survived(tmp_path: Path) -> None:
    """The store's PostgreSQL drops every connection and refuses new ones for a while:
    the daemon keeps running and applies the next edit once the database is back."""
    from sqlalchemy import create_engine, text

    from .dbs import PG_ADMIN, temp_database

    async def scenario(url: str) -> None:
        config = _write_config(tmp_path, None)
        config.write_text(
            config.read_text().replace(
                f'url = "sqlite:///{tmp_path / "store.db"}"', f'url = "{url}"'
            )
        )
        conf = tmp_path / "pjsip_users.conf"
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        name = url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": name},
                )
            await asyncio.sleep(2.0)
            assert daemon.returncode is None
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            await _add_agent(config, "bob", "Bob")
            await _until(lambda: "[1001]" in _text(conf), 15)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            admin.dispose()
        assert "Traceback" not in (tmp_path / "daemon.log").read_text()

    with temp_database("postgresql", tmp_path) as url:
        asyncio.run(scenario(url))


def test_an_edit_after_a_calm_period_does_not_wait_for_the_quiet_window(tmp_path: Path) -> None:
    """With a 10 s quiescence window, a single edit on an idle daemon is still applied at
    once: only edits arriving while an apply runs are held back to coalesce."""

    async def scenario() -> None:
        config = _write_config(tmp_path, None, quiet=10, max_wait=20)
        conf = tmp_path / "pjsip_users.conf"
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: "[1000]" in _text(conf), 5)
            await _add_agent(config, "carol", "Carol")
            await _until(lambda: "[1001]" in _text(conf), 5)
            assert await _stop(daemon) == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()

    asyncio.run(scenario())


@dataclass
class _Run:
    """A daemon subprocess, the fake Asterisk it talks to, its config and its log."""

    peer: FakeAsterisk
    config: Path
    log: Path
    daemon: asyncio.subprocess.Process

    async def restart(self) -> int:
        """Stop the daemon (exit 0), start it again, then the fake Asterisk; the position
        in what the peer received from which the new run's actions come."""
        assert await _stop(self.daemon) == 0
        since = len(self.peer.received)
        self.daemon = await _start_daemon(self.config, self.log)
        await self.peer.start()
        return since


@asynccontextmanager
async def _alice_then_asterisk_down(
    tmp_path: Path, live: Callable[[FakeAsterisk], bool], **config: Any
) -> AsyncIterator[_Run]:
    """A daemon (config ``config``) whose store has alice added, once ``live`` says her
    objects reached the fake Asterisk, which is then stopped; both stopped on the way out."""
    peer = FakeAsterisk()
    await peer.start()
    path = _write_config(tmp_path, peer.port, **config)
    log = tmp_path / "daemon.log"
    await _seed(path)
    run = _Run(peer, path, log, await _start_daemon(path, log))
    try:
        await _add_agent(path, "alice", "Alice")
        await _until(lambda: live(peer), 5)
        await peer.stop()
        yield run
    finally:
        if run.daemon.returncode is None:
            assert await _stop(run.daemon) == 0
        await peer.stop()


def _reloaded_with_alice(conf: Path) -> Callable[[FakeAsterisk], bool]:
    return lambda peer: "[1001]" in _text(conf) and bool(peer.actions("Reload"))


def test_a_reload_owed_when_the_daemon_stopped_is_sent_after_its_restart(tmp_path: Path) -> None:
    """An edit written while Asterisk is down owes it a reload; a SIGTERM before Asterisk
    is back does not lose it: the next run sends it once Asterisk answers, although its
    reconcile finds the file already written."""

    async def scenario() -> None:
        conf = tmp_path / "pjsip_users.conf"
        async with _alice_then_asterisk_down(tmp_path, _reloaded_with_alice(conf)) as run:
            before = _text(conf)
            await _cli(run.config, "user", "edit", "alice", "--nat", "yes")
            await _until(lambda: _text(conf) != before, 5)
            await asyncio.sleep(0.3)  # the reload noted owed in the store
            sent = len(run.peer.actions("Reload"))
            await run.restart()
            await _until(lambda: len(run.peer.actions("Reload")) > sent, 10)
            assert "ami.reload_resumed" in _text(run.log)

    asyncio.run(scenario())


#: The recorded phone's contact of endpoint 1001 (alice), in the fake Asterisk's astdb.
ALICE_CONTACT = "contact/1001;@4647304968688045788916f1ea15a2ae"


def _index(
    peer: FakeAsterisk, name: str, since: int, check: Callable[[ReceivedAction], bool]
) -> int:
    """The position in everything ``peer`` received of the first ``name`` action after
    position ``since`` for which ``check`` holds, or -1."""
    for i, action in enumerate(peer.received[since:], start=since):
        if action.name.lower() == name.lower() and check(action):
            return i
    return -1


def test_a_file_contact_removal_owed_when_the_daemon_stopped_is_sent_after_its_restart(
    tmp_path: Path,
) -> None:
    """A user deleted while Asterisk is down has its registration deleted from astdb by
    the next run, after the resumed reload, although that run's reconcile owes nothing."""

    async def scenario() -> None:
        conf = tmp_path / "pjsip_users.conf"
        async with _alice_then_asterisk_down(tmp_path, _reloaded_with_alice(conf)) as run:
            await _cli(run.config, "user", "delete", "alice")
            await _until(lambda: "[1001]" not in _text(conf), 5)
            await asyncio.sleep(0.3)  # the reload and the removal noted owed in the store
            since = await run.restart()

            def deleted(action: ReceivedAction) -> bool:
                return bool(action.get("Key") == ALICE_CONTACT)

            # Received, then answered: astdb changes when the answer is made.
            peer = run.peer
            await _until(lambda: ALICE_CONTACT not in peer.astdb, 10)
            reload = _index(peer, "Reload", since, lambda _: True)
            assert 0 <= reload < _index(peer, "DBDel", since, deleted)
            assert [(e["removals"], e["after_reload"]) for e in _resumed(run.log)] == [(1, True)]

    asyncio.run(scenario())


def test_realtime_expiries_and_removal_owed_when_the_daemon_stopped_are_sent_after_its_restart(
    tmp_path: Path,
) -> None:
    """A realtime user deleted while Asterisk is down has its objects expired from the
    sorcery cache and its registration deleted from astdb by the next run."""

    async def scenario() -> None:
        def expired(peer: FakeAsterisk) -> bool:
            return "1001" in _expired_objects(peer, 0)

        async with _alice_then_asterisk_down(
            tmp_path, expired, kind="realtime", caches=("ep_cache",)
        ) as run:
            await _cli(run.config, "user", "delete", "alice")
            await asyncio.sleep(0.5)  # applied, and its expiries and removal noted owed
            since = await run.restart()
            # Received, then answered: astdb changes when the answer is made.
            peer = run.peer
            await _until(lambda: ALICE_CONTACT not in peer.astdb, 10)
            assert ALICE_CONTACT in [a.get("Key") for a in peer.actions("DBDel")]
            assert "1001" in _expired_objects(peer, since)
            assert [e["removals"] for e in _resumed(run.log)] == [1]

    asyncio.run(scenario())


def _expired_objects(peer: FakeAsterisk, since: int) -> list[str]:
    """The objects ``peer`` was asked to expire from a cache after position ``since``."""
    return [
        a.get("Object")
        for a in peer.received[since:]
        if a.name.lower() == "sorcerymemorycacheexpireobject"
    ]


def _resumed(log: Path) -> list[dict[str, Any]]:
    """The ``ami.owed_resumed`` lines of the JSON log at ``log``."""
    lines = [json.loads(line) for line in _text(log).splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == "ami.owed_resumed"]


def _loaded_digest(store: Path) -> str | None:
    """The ``loaded_digest`` note of server ``pbx1`` in the SQLite store at ``store``."""
    engine = open_engine(f"sqlite:///{store}")
    try:
        with reading(engine) as conn:
            return load_state(conn, loaded_digest_key("pbx1"))
    finally:
        engine.dispose()


@asynccontextmanager
async def _alice_loaded_then_stopped(tmp_path: Path) -> AsyncIterator[_Run]:
    """A daemon whose store has alice added, stopped (exit 0) once the fake Asterisk got
    her reload and the digest of the files it loaded is noted; the test may start the
    daemon again (``run.daemon``), stopped on the way out with the peer."""
    conf = tmp_path / "pjsip_users.conf"
    peer = FakeAsterisk()
    await peer.start()
    config = _write_config(tmp_path, peer.port)
    log = tmp_path / "daemon.log"
    await _seed(config)
    run = _Run(peer, config, log, await _start_daemon(config, log))
    try:
        await _add_agent(config, "alice", "Alice")
        await _until(lambda: _reloaded_with_alice(conf)(peer), 5)
        await _until(lambda: _loaded_digest(tmp_path / "store.db") is not None, 5)
        assert await _stop(run.daemon) == 0
        yield run
    finally:
        if run.daemon.returncode is None:
            assert await _stop(run.daemon) == 0
        await peer.stop()


async def _reloaded_at_the_next_start(run: _Run) -> None:
    """Start ``run``'s daemon again; it sends a reload within 10 s."""
    since = len(run.peer.received)
    run.daemon = await _start_daemon(run.config, run.log)
    await _until(lambda: _index(run.peer, "Reload", since, lambda _: True) >= 0, 10)


def test_a_file_written_but_never_reloaded_is_reloaded_at_the_next_start(tmp_path: Path) -> None:
    """The crash window of a config-file target: a daemon killed after writing the file
    and before the reload was sent or noted owed leaves a file its next run's reconcile
    finds as desired.  Simulated by writing the edit with ``sync --once`` while no daemon
    runs: the next start sees the file differ from what the last accepted reload loaded
    (``loaded_digest``) and reloads."""

    async def scenario() -> None:
        conf = tmp_path / "pjsip_users.conf"
        async with _alice_loaded_then_stopped(tmp_path) as run:
            before = _text(conf)
            await _cli(run.config, "user", "edit", "alice", "--nat", "yes")
            await _cli(run.config, "sync", "--once")
            assert _text(conf) != before
            await _reloaded_at_the_next_start(run)
            assert "ami.file_not_loaded" in _text(run.log)

    asyncio.run(scenario())


def _caches_emptied(peer: FakeAsterisk, since: int) -> list[str]:
    """The caches ``peer`` was asked to empty whole after position ``since``."""
    return [
        a.get("Cache")
        for a in peer.received[since:]
        if a.name.lower() == "sorcerymemorycacheexpire"
    ]


async def _start_and_settle(run: _Run) -> int:
    """Start ``run``'s daemon again (the fake Asterisk up); once it logged in and had a
    moment to send what it owes, the position from which its actions came."""
    since = len(run.peer.received)
    logins = run.peer.logins_ok
    run.daemon = await _start_daemon(run.config, run.log)
    await _until(lambda: run.peer.logins_ok >= logins + 2, 10)  # events and reload sessions
    await asyncio.sleep(0.5)
    return since


@asynccontextmanager
async def _realtime_alice_expired(tmp_path: Path) -> AsyncIterator[_Run]:
    """A realtime daemon (sorcery cache ``ep_cache``) whose store has alice added, once her
    objects were expired from the fake Asterisk's cache; it and the peer are stopped on
    the way out."""
    peer = FakeAsterisk()
    await peer.start()
    config = _write_config(tmp_path, peer.port, kind="realtime", caches=("ep_cache",))
    log = tmp_path / "daemon.log"
    await _seed(config)
    run = _Run(peer, config, log, await _start_daemon(config, log))
    try:
        await _add_agent(config, "alice", "Alice")
        await _until(lambda: "1001" in _expired_objects(peer, 0), 5)
        yield run
    finally:
        if run.daemon.returncode is None:
            assert await _stop(run.daemon) == 0
        await peer.stop()


def test_realtime_rows_a_killed_daemon_may_have_left_untold_empty_the_caches_next_start(
    tmp_path: Path,
) -> None:
    """A daemon SIGKILLed may have committed rows whose cache expiries it never sent
    nor noted: its marker stays in the store, and the next run empties each cache
    (``SorceryMemoryCacheExpire``), once: a clean stop then leaves nothing to empty."""

    async def scenario() -> None:
        async with _realtime_alice_expired(tmp_path) as run:
            peer = run.peer
            assert _caches_emptied(peer, 0) == []
            run.daemon.kill()
            await run.daemon.wait()
            since = await _start_and_settle(run)
            await _until(lambda: _caches_emptied(peer, since) == ["ep_cache"], 5)
            assert "ami.caches_unsure" in _text(run.log)
            assert await _stop(run.daemon) == 0
            since = await _start_and_settle(run)
            assert _caches_emptied(peer, since) == []

    asyncio.run(scenario())


def test_realtime_rows_sync_once_wrote_empty_the_caches_at_the_next_start(tmp_path: Path) -> None:
    """``sync --once`` tells Asterisk nothing: rows it wrote leave a marker, and the next
    daemon empties each cache; a clean stop, or a ``sync --once`` that wrote nothing,
    leaves the caches alone."""

    async def scenario() -> None:
        async with _realtime_alice_expired(tmp_path) as run:
            peer, config = run.peer, run.config
            assert await _stop(run.daemon) == 0
            since = await _start_and_settle(run)
            assert _caches_emptied(peer, since) == []
            assert await _stop(run.daemon) == 0
            assert "unchanged" in await _cli(config, "sync", "--once")
            since = await _start_and_settle(run)
            assert _caches_emptied(peer, since) == []
            assert await _stop(run.daemon) == 0
            await _cli(config, "user", "edit", "alice", "--nat", "yes")
            await _cli(config, "sync", "--once")
            since = await _start_and_settle(run)
            await _until(lambda: _caches_emptied(peer, since) == ["ep_cache"], 5)

    asyncio.run(scenario())


async def _alice_contact_deleted_after_a_reload(peer: FakeAsterisk, since: int) -> None:
    """Wait (10 s at most) until alice's contact is gone from ``peer``'s astdb, and check
    that the DBDel deleting it came after a Reload, both among what came since ``since``."""
    await _until(lambda: ALICE_CONTACT not in peer.astdb, 10)
    reload = _index(peer, "Reload", since, lambda _: True)
    deleted = _index(peer, "DBDel", since, lambda a: a.get("Key") == ALICE_CONTACT)
    assert 0 <= reload < deleted


def test_a_user_sync_once_removed_from_the_file_has_its_contact_deleted_by_the_next_run(
    tmp_path: Path,
) -> None:
    """``sync --once`` tells Asterisk nothing: a user it removed from the config file has
    its registration deleted from astdb by the next daemon start, after the reload."""

    async def scenario() -> None:
        async with _alice_loaded_then_stopped(tmp_path) as run:
            await _cli(run.config, "user", "delete", "alice")
            await _cli(run.config, "sync", "--once")
            since = await _start_and_settle(run)
            await _alice_contact_deleted_after_a_reload(run.peer, since)
            assert [(e["removals"], e["after_reload"]) for e in _resumed(run.log)] == [(1, True)]

    asyncio.run(scenario())


def test_an_extension_sync_once_gave_to_another_user_has_its_contact_deleted_by_the_next_run(
    tmp_path: Path,
) -> None:
    """``sync --once`` tells Asterisk nothing: alice moved off 1001 and bob given it, the
    phone registered with alice's credentials has its contact deleted from astdb by the
    next daemon start, after the reload."""

    async def scenario() -> None:
        conf = tmp_path / "pjsip_users.conf"
        async with _alice_loaded_then_stopped(tmp_path) as run:
            await _cli(run.config, "user", "edit", "alice", "--extension", "1500")
            await _cli(
                run.config,
                "user",
                "add",
                "bob",
                "--full-name",
                "Bob",
                "--email",
                "bob@example.com",
                "--profile",
                "agents",
                "--extension",
                "1001",
            )
            await _cli(run.config, "sync", "--once")
            assert "[1500]" in _text(conf)
            since = await _start_and_settle(run)
            await _alice_contact_deleted_after_a_reload(run.peer, since)

    asyncio.run(scenario())


def test_a_user_sync_once_removed_from_realtime_has_its_contact_deleted_by_the_next_run(
    tmp_path: Path,
) -> None:
    """``sync --once`` tells Asterisk nothing: a user whose realtime rows it deleted has
    its registration deleted from astdb by the next daemon start."""

    async def scenario() -> None:
        async with _realtime_alice_expired(tmp_path) as run:
            assert await _stop(run.daemon) == 0
            await _cli(run.config, "user", "delete", "alice")
            await _cli(run.config, "sync", "--once")
            await _start_and_settle(run)
            peer = run.peer
            await _until(lambda: ALICE_CONTACT not in peer.astdb, 10)
            assert [e["removals"] for e in _resumed(run.log)] == [1]

    asyncio.run(scenario())


def _noted(store: Path, key: str) -> str | None:
    """The note kept under ``key`` in the SQLite store at ``store``."""
    engine = open_engine(f"sqlite:///{store}")
    try:
        with reading(engine) as conn:
            return load_state(conn, key)
    finally:
        engine.dispose()


def test_run_burst_applies_what_is_pending_tells_asterisk_and_exits(tmp_path: Path) -> None:
    """``run --burst`` applies the edits made while no daemon ran, sends Asterisk what
    they need (a config file's reload, the endpoint then verified, the loaded digest
    noted) and exits 0; with Asterisk down it exits once the shutdown timeout has
    passed, the reload noted owed for the next run, which sends it."""

    async def scenario() -> None:
        conf = tmp_path / "pjsip_users.conf"
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        store = tmp_path / "store.db"
        log = tmp_path / "daemon.log"
        await _seed(config)
        await _add_agent(config, "alice", "Alice")
        await _cli(config, "run", "--burst")
        assert "[1001]" in _text(conf)
        assert len(peer.actions("Reload")) == 1
        assert "1001" in [a.get("Endpoint") for a in peer.actions("PJSIPShowEndpoint")]
        assert _noted(store, loaded_digest_key("pbx1")) is not None
        assert _noted(store, reload_owed_key("pbx1")) is None

        await peer.stop()
        await _cli(config, "user", "edit", "alice", "--nat", "yes")
        start = time.monotonic()
        await _cli(config, "run", "--burst")
        assert time.monotonic() - start < 15
        assert _noted(store, reload_owed_key("pbx1")) == "1"
        await peer.start()
        since = len(peer.received)
        run = _Run(peer, config, log, await _start_daemon(config, log))
        try:
            await _until(lambda: _index(peer, "Reload", since, lambda _: True) >= 0, 10)
        finally:
            assert await _stop(run.daemon) == 0
            await peer.stop()

    asyncio.run(scenario())


def test_the_daemon_forgets_the_registrations_of_a_server_taken_out_of_its_config(
    tmp_path: Path,
) -> None:
    """Registration state the store holds of a server no longer configured is deleted
    when the daemon starts: nothing would update it again, and its users would show
    online for good."""

    async def scenario() -> None:
        config = _write_config(tmp_path, None)
        log = tmp_path / "daemon.log"
        await _seed(config)
        await _add_agent(config, "alice", "Alice")
        engine = open_engine(f"sqlite:///{tmp_path / 'store.db'}")
        try:
            online = ("online", "NOT_INUSE", "", "2026-05-01 11:59:58.654321")
            with engine.begin() as conn:
                write_endpoint_rows(conn, "retired", {"1001": ([], online)}, datetime.now(UTC))
            assert "online" in await _cli(config, "status", "alice")
            daemon = await _start_daemon(config, log)
            assert await _stop(daemon) == 0
            assert "offline" in await _cli(config, "status", "alice")
            assert "registration.servers_forgotten" in _text(log)
        finally:
            engine.dispose()

    asyncio.run(scenario())


def test_a_file_written_back_to_what_asterisk_last_loaded_is_reloaded_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A daemon killed after Asterisk accepted a reload and before its digest was noted
    leaves the older digest noted; a ``sync --once`` that then writes the file back to
    those older bytes must not pass for loaded: a CLI write notes each server's loaded
    digest unknown, and the next start reloads."""

    async def scenario() -> None:
        conf, store = tmp_path / "pjsip_users.conf", tmp_path / "store.db"
        async with _alice_loaded_then_stopped(tmp_path) as run:
            config = run.config
            noted, loaded = _loaded_digest(store), _text(conf)
            nat = json.loads(await _cli(config, "user", "show", "alice", "--json"))["voice"]["nat"]
            # Asterisk loads B, but the digest noted stays A's (as after a kill).
            await _cli(config, "user", "edit", "alice", "--nat", "comedia")
            await _cli(config, "sync", "--once")
            await _cli(config, "user", "edit", "alice", "--nat", nat)
            await _cli(config, "sync", "--once")
            assert _text(conf) == loaded  # back to A's bytes
            assert _loaded_digest(store) != noted
            await _reloaded_at_the_next_start(run)

    asyncio.run(scenario())


def test_after_a_sighup_sets_shards_the_digest_noted_is_of_the_files_asterisk_loads(
    tmp_path: Path,
) -> None:
    """After a SIGHUP that sets target.shards, a reload of the new layout has the digest of
    the main file and its shard files noted as loaded, not that of the file alone the
    daemon started with (the next start then owed Asterisk a reload for nothing)."""
    from provisioner.ami.loaded import config_files, files_digest

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        conf = tmp_path / "pjsip_users.conf"
        store = tmp_path / "store.db"
        await _seed(config)
        daemon = await _start_daemon(config, tmp_path / "daemon.log")
        try:
            await _until(lambda: _loaded_digest(store) is not None, 10)
            config.write_text(config.read_text().replace("[target]\n", "[target]\nshards = 4\n"))
            daemon.send_signal(signal.SIGHUP)
            await _until(lambda: _text(conf).count("#include") == 4, 5)
            # The layout switch alone (no object changed) has Asterisk reload the shards.
            await _until(lambda: len(peer.actions("Reload")) == 2, 5)
            sharded = config_files(conf, 4)
            await _until(lambda: _loaded_digest(store) == files_digest(sharded), 5)
        finally:
            assert await _stop(daemon) == 0
            await peer.stop()

    asyncio.run(scenario())


def test_a_store_that_stalls_at_the_last_marker_drop_does_not_stretch_the_shutdown(
    tmp_path: Path,
) -> None:
    """SIGTERM while another connection holds the SQLite store's write lock (30 s busy
    timeout): the daemon's last store write (dropping its marker of untold writes) waits
    within daemon.shutdown_timeout (1 s), not its own busy timeout; the marker is kept
    (daemon.untold_kept) and the exit is 0."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        text = config.read_text().replace("shutdown_timeout = 5", "shutdown_timeout = 1")
        config.write_text(text.replace("[security]", "busy_timeout = 30\n[security]"))
        log = tmp_path / "daemon.log"
        await _seed(config)
        await _add_agent(config, "alice", "Alice")
        daemon = await _start_daemon(config, log)
        locker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        try:
            await _until(lambda: len(peer.actions("Reload")) >= 1, 10)
            await asyncio.sleep(0.5)  # idle: Asterisk told everything
            locker.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(daemon.wait(), timeout=40)
            took = time.monotonic() - started
        finally:
            if daemon.returncode is None:
                daemon.kill()
            locker.rollback()
            locker.close()
            await peer.stop()
        assert code == 0
        assert took < 3.0, f"shutdown took {took:.1f} s"
        assert "daemon.untold_kept" in _text(log)

    asyncio.run(scenario())


def test_status_says_unknown_while_the_servers_ami_is_down_or_the_daemon_stopped(
    tmp_path: Path,
) -> None:
    """A phone registered on a server whose AMI session is lost, or whose daemon stopped,
    is shown with state unknown (its last known state kept per server), not online."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port)
        await _seed(config)
        await _add_agent(config, "alice", "Alice")
        daemon = await _start_daemon(config, tmp_path / "daemon.log")

        async def shown() -> dict[str, Any]:
            out = json.loads(await _cli(config, "status", "alice", "--json"))
            return dict(out[0])

        async def state_is(wanted: str) -> bool:
            return bool((await shown())["state"] == wanted)

        try:
            await _until(lambda: len(peer.actions("PJSIPShowContacts")) >= 1, 10)
            await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
            await _until(partial(state_is, "online"), 5)

            await peer.stop()  # the AMI session is lost: no event can say the phone went
            await _until(partial(state_is, "unknown"), 5)
            (server,) = (await shown())["servers"]
            assert (server["server"], server["state"], server["live"]) == ("pbx1", "online", False)
            assert "unknown" in await _cli(config, "status", "alice")

            await peer.start()  # back: the reconnect's snapshot tells the truth again

            async def read_again() -> bool:
                return bool((await shown())["servers"][0]["live"])

            await _until(read_again, 10)
            # What the snapshot lists (the recorded contact, expiring 300 s from now as
            # the fake moves it), not unknown.
            assert (await shown())["state"] == "online"

            assert await _stop(daemon) == 0
            assert await state_is("unknown")  # no one reads Asterisk any more
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await peer.stop()

    asyncio.run(scenario())


def test_a_realtime_endpoint_row_deleted_by_hand_is_put_back_with_a_reload(
    tmp_path: Path,
) -> None:
    """A realtime endpoint row deleted by hand is put back by the daemon's periodic
    reconcile, and Asterisk is asked for a res_pjsip reload, as for an added endpoint:
    without it Asterisk may not report that endpoint's registration state."""

    async def scenario() -> None:
        peer = FakeAsterisk()
        await peer.start()
        config = _write_config(tmp_path, peer.port, kind="realtime")
        config.write_text(
            config.read_text().replace("[daemon]\n", "[daemon]\nreconcile_interval = 1\n")
        )
        log = tmp_path / "daemon.log"
        await _seed(config)
        daemon = await _start_daemon(config, log)
        try:
            await _add_agent(config, "alice", "Alice")
            await _until(lambda: bool(peer.actions("Reload")), 5)
            await asyncio.sleep(1.5)  # a periodic reconcile with nothing to do
            reloads = len(peer.actions("Reload"))
            with sqlite3.connect(tmp_path / "store.db") as conn:
                assert conn.execute("DELETE FROM ps_endpoints WHERE id = '1001'").rowcount == 1
            conn.close()

            def put_back() -> bool:
                with sqlite3.connect(tmp_path / "store.db") as conn:
                    found = conn.execute("SELECT 1 FROM ps_endpoints WHERE id = '1001'").fetchall()
                conn.close()
                return bool(found)

            await _until(put_back, 5)
            await _until(lambda: len(peer.actions("Reload")) > reloads, 5)
            assert peer.actions("Reload")[-1].get("Module") == "res_pjsip.so"
        finally:
            assert await _stop(daemon) == 0
            await peer.stop()

    asyncio.run(scenario())


#: The edits the kill -9 test makes, in order (alice, 1001, exists before them: her phone's
#: contact is in the fake Asterisk's astdb).  Every one changes the target, and no two
#: leave it with the same bytes, so "Asterisk loaded the file as it is" names one edit.
_KILL_EDITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("add bob", tuple(_agent_args("bob", "Bob"))),
    ("add carol", tuple(_agent_args("carol", "Carol"))),
    ("edit alice", ("user", "edit", "alice", "--nat", "yes")),
    ("disable alice", ("user", "disable", "alice")),
    ("add dave", tuple(_agent_args("dave", "Dave"))),
)
_DISABLE = 3
#: Seeds run in CI (about 15 s each); the others only with ``-m slow``.  Config seed 5
#: kills thrice after the disable, with its removal noted owed (resumed each time, and its
#: reload); realtime seed 2 kills after the disable and twice after the last add.  The
#: ``unnoted`` kills (the loaded-digest path) come in slow seeds 2, 3, 4, 7 and 8.  Outcomes
#: still vary with timing: a seed fixes the schedule, not the daemon's interleaving.
_KILL_SEEDS_CI = {"config": (5,), "realtime": (2,)}


@dataclass
class _Kill:
    """One SIGKILL of :func:`test_kill_9_at_random_moments_converges_and_owes_asterisk`:
    after which edit, how (``plain``: a random delay after the edit; ``unnoted``: the edit
    applied while the store refuses the daemon's writes and Asterisk gets no reload, so
    nothing it owes is noted or sent;
    ``again``: a random delay after the restart that followed the previous kill), and what
    it left of alice's contact removal (``done``, ``noted``, ``untold``, or ``not yet``:
    the disable not in the target)."""

    after: str
    mode: str
    delay_ms: int
    left: str = ""

    def __str__(self) -> str:
        return f"{self.after}/{self.mode}/{self.delay_ms}ms->{self.left}"


def _kill_schedule(rng: random.Random, kind: str) -> list[tuple[int, str, float]]:
    """Three kills (edit index, mode, delay in seconds): one after the disable, two after
    edits ``rng`` picks; a second kill after the same edit comes right after the restart."""
    spots = sorted([_DISABLE, *rng.choices(range(len(_KILL_EDITS)), k=2)])
    schedule, previous = [], -1
    for spot in spots:
        if spot == previous:
            mode = "again"
        elif kind == "config" and rng.random() < 0.4:
            mode = "unnoted"
        else:
            mode = "plain"
        schedule.append((spot, mode, rng.uniform(0, 0.12)))
        previous = spot
    return schedule


async def _rendered_as_stored(config: Path) -> bool:
    """Whether the target of ``config`` equals a fresh render of its store."""
    dry = await cli_in_thread(config, "render", "--dry-run")
    return "would be added 0, would be updated 0, would be removed 0" in dry


@dataclass
class _KillRun:
    """The kill -9 test's daemon, its fake Asterisk, and what that Asterisk loaded."""

    tmp: Path
    kind: str
    peer: FakeAsterisk
    config: Path
    daemon: asyncio.subprocess.Process
    #: The config file's bytes at each reload the fake Asterisk accepted, and how many
    #: actions it had received then.
    loaded: list[tuple[int, bytes]]

    @property
    def conf(self) -> Path:
        return self.tmp / "pjsip_users.conf"

    @property
    def log(self) -> Path:
        return self.tmp / "daemon.log"

    def alice_in_target(self) -> bool:
        """Whether the target still holds alice's endpoint 1001."""
        if self.kind == "config":
            return "[1001]" in _text(self.conf)
        with sqlite3.connect(self.tmp / "store.db") as db:
            return bool(db.execute("SELECT 1 FROM ps_endpoints WHERE id = '1001'").fetchall())

    def removal_left(self) -> str:
        """What a kill left of alice's contact removal (see :class:`_Kill`)."""
        if ALICE_CONTACT not in self.peer.astdb:
            return "done"
        if self.alice_in_target():
            return "not yet"
        noted = _noted(self.tmp / "store.db", owed_removal_key("pbx1", "1001"))
        return "untold" if noted is None else "noted"

    def loaded_now(self) -> bool:
        """Whether the last reload Asterisk accepted read the config file as it is now."""
        return bool(self.loaded) and self.loaded[-1][1] == _bytes(self.conf)

    async def kill(self, kill: _Kill, delay: float, edit: tuple[str, ...] | None) -> None:
        """Make ``edit`` (if any) and SIGKILL the daemon as ``kill`` says, then note what
        it left; the store's write lock of an ``unnoted`` kill is released after it."""
        lock = None
        if kill.mode == "unnoted" and edit is not None:
            # A removal is noted before the file is written: with the store refusing
            # writes, the file must keep the endpoint (nothing written that is not owed).
            lock = await self._edit_unnoted(edit, writes=kill.after != "disable alice")
        elif edit is not None:
            await cli_in_thread(self.config, *edit)
        await asyncio.sleep(delay)
        self.daemon.kill()
        await self.daemon.wait()
        self.peer.drop_on = set()
        if lock is not None:
            lock.rollback()
            lock.close()
        await asyncio.sleep(0.05)  # the peer answers what it had received
        kill.left = self.removal_left()

    async def _edit_unnoted(self, edit: tuple[str, ...], *, writes: bool) -> sqlite3.Connection:
        """Make ``edit`` while the daemon is stopped (SIGSTOP) and holds no write, then
        hold the store's write lock and let the daemon go on: it writes the file and can
        note nothing of what that owes, and the fake Asterisk drops each connection that
        sends it a reload (as if the daemon died before sending one).  Returns once the
        file changed; the lock held, the reloads dropped until the kill.  Without
        ``writes`` (an edit removing an endpoint, whose removal must be noted first) the
        file must not change: returns after 0.5 s of it unchanged.  Made once the daemon
        applied every edit before it: a change of the file is then this edit's."""
        await _until(partial(_rendered_as_stored, self.config), 10, "earlier edits applied")
        before = _bytes(self.conf)
        store = self.tmp / "store.db"
        while True:
            os.kill(self.daemon.pid, signal.SIGSTOP)
            probe = sqlite3.connect(store, timeout=0.2, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")  # the stopped daemon holds no write
                probe.execute("ROLLBACK")
                break
            except sqlite3.OperationalError:
                os.kill(self.daemon.pid, signal.SIGCONT)
                await asyncio.sleep(0.05)
            finally:
                probe.close()
        try:
            await cli_in_thread(self.config, *edit)
            lock = sqlite3.connect(store, timeout=5, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            self.peer.drop_on = {"Reload"}
        finally:
            os.kill(self.daemon.pid, signal.SIGCONT)
        if writes:
            await _until(lambda: _bytes(self.conf) != before, 5)
        else:
            await asyncio.sleep(0.5)
            assert _bytes(self.conf) == before, "a removal written before it was noted"
        return lock

    async def restart(self) -> int:
        """Start the daemon again; the position in what the peer received from which its
        actions come."""
        since = len(self.peer.received)
        self.daemon = await _start_daemon(self.config, self.log)
        return since

    async def told_after(self, since: int, why: str) -> None:
        """Wait until Asterisk got what the run started at ``since`` owes after a kill:
        the config file as it is loaded, or (realtime) every sorcery cache emptied."""
        if self.kind == "config":
            await _until(self.loaded_now, 10, f"{why}: Asterisk loaded the file as it is")
        else:
            await _until(
                lambda: _caches_emptied(self.peer, since) == ["ep_cache"],
                10,
                f"{why}: the sorcery cache emptied",
            )


@pytest.mark.parametrize(
    ("kind", "seed"),
    [
        pytest.param(kind, seed, marks=() if seed in _KILL_SEEDS_CI[kind] else pytest.mark.slow)
        for kind in ("config", "realtime")
        for seed in sorted({*range(1, 9), *_KILL_SEEDS_CI[kind]})
    ],
)
def test_kill_9_at_random_moments_converges_and_owes_asterisk(
    tmp_path: Path, kind: str, seed: int
) -> None:
    """SIGKILL at seeded random moments of a run of edits, each time a restart: after each
    restart Asterisk gets what the killed run may not have told (the file loaded as it
    is; realtime: its caches emptied), the disabled user's contact is deleted (after a
    reload that dropped its endpoint) wherever the kills fell, and the target ends equal
    to a fresh render."""

    async def scenario() -> None:
        rng = random.Random(seed)
        peer = FakeAsterisk()
        peer.reload_delay = 0.1  # a small Asterisk's reload: a kill may fall inside one
        await peer.start()
        caches = ("ep_cache",) if kind == "realtime" else ()
        config = _write_config(tmp_path, peer.port, kind=kind, caches=caches)
        await _seed(config)
        loaded: list[tuple[int, bytes]] = []
        conf = tmp_path / "pjsip_users.conf"
        peer.on_reload = lambda _: loaded.append((len(peer.received), _bytes(conf)))
        run = _KillRun(
            tmp_path,
            kind,
            peer,
            config,
            await _start_daemon(config, tmp_path / "daemon.log"),
            loaded,
        )
        kills: list[_Kill] = []
        since = 0
        left_by_kills: set[str] = set()

        def why() -> str:
            return f"seed {seed}, target {kind}, kills {[str(k) for k in kills]}"

        try:
            await _add_agent(config, "alice", "Alice")
            if kind == "config":  # a digest noted: a file written and not loaded is seen
                await _until(lambda: "[1001]" in _text(conf) and run.loaded_now(), 5)
                await _until(lambda: _loaded_digest(tmp_path / "store.db") is not None, 5)
            else:
                await _until(lambda: "1001" in _expired_objects(peer, 0), 5)
            schedule = _kill_schedule(rng, kind)
            for index, (what, edit) in enumerate(_KILL_EDITS):
                mine = [(mode, delay) for spot, mode, delay in schedule if spot == index]
                if not mine:
                    await cli_in_thread(config, *edit)
                for n, (mode, delay) in enumerate(mine):
                    kill = _Kill(what, mode, round(delay * 1000))
                    kills.append(kill)
                    await run.kill(kill, delay, edit if n == 0 else None)
                    since = await run.restart()
                    # A killed run's temporary may stay (removed once stale, 300 s).
                    left_by_kills = _temporaries(tmp_path)
                    if n == len(mine) - 1:
                        await run.told_after(since, why())
            await _until(partial(_rendered_as_stored, config), 10, f"{why()}: converged")
            # Wherever the kills fell: the removal is noted before the target is written
            # (realtime rows in the store: in the same transaction).
            await _until(lambda: ALICE_CONTACT not in peer.astdb, 10, f"{why()}: removal")
            deleted = _index(peer, "DBDel", 0, lambda a: a.get("Key") == ALICE_CONTACT)
            if kind == "config":  # deleted once a reload dropped her endpoint
                dropped = [at for at, text in loaded if b"[1001]" not in text]
                assert dropped, why()
                assert dropped[0] <= deleted, why()
            await run.told_after(since, why())
            assert await _stop(run.daemon) == 0, why()
        finally:
            if run.daemon.returncode is None:
                run.daemon.kill()
                await run.daemon.wait()
            await peer.stop()
        assert await _rendered_as_stored(config), why()
        if kind == "config":
            assert run.loaded_now(), why()
            # The last run, stopped cleanly, left no temporary of its own.
            assert _temporaries(tmp_path) <= left_by_kills, why()
        log = run.log.read_text()
        assert "Traceback" not in log, why()
        assert "lab-secret" not in log, why()
        print(why())  # with -s: where this seed's kills fell

    asyncio.run(scenario())
