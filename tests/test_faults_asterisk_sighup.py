"""Several [[asterisk]] servers changed by SIGHUP, with the daemon as a real subprocess
against fake Asterisks over TCP: a server taken out is let go, one put in is taken up,
without a restart and without touching the others."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from provisioner.store.engine import open_engine
from provisioner.store.schema import registration_summary

from .amipeer import FakeAsterisk, in_a_thread
from .faultkit import (
    CutProxy,
    Daemon,
    agent_args,
    cli,
    pbx_entry_lines,
    seed_store,
    until,
    write_config,
)
from .privatecluster import free_port


@pytest.fixture
def peers() -> Iterator[tuple[FakeAsterisk, FakeAsterisk, FakeAsterisk]]:
    """Three fake Asterisks, each on an event loop thread of its own."""
    with (
        in_a_thread(FakeAsterisk()) as one,
        in_a_thread(FakeAsterisk()) as two,
        in_a_thread(FakeAsterisk()) as three,
    ):
        yield one, two, three


def _entry(name: str, port: int) -> list[str]:
    return [line.replace('"pbx1"', f'"{name}"') for line in pbx_entry_lines(port)]


def _config(tmp: Path, url: str, servers: list[tuple[str, int]], metrics: int) -> Path:
    lines = [f"metrics_port = {metrics}", "[ami]", "reload_min_gap = 0"]
    lines += ["backoff_base = 0.05", "backoff_cap = 0.2"]
    for name, port in servers:
        lines += _entry(name, port)
    return write_config(tmp, store_url=url, extra=lines)


def _series_of(port: int, server: str) -> list[str]:
    """The exposition lines of every series labelled ``server``, gauges and counters."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return [line for line in body.decode().splitlines() if f'server="{server}"' in line]


def _scraped(port: int, name: str) -> dict[str, float]:
    """The series of metric ``name`` (its exposition name) by their label text."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def _reconnects(daemon: Daemon) -> int | None:
    """The health record's ``reconnects`` of server pbx (None: not in the record yet)."""
    servers = (daemon.health() or {}).get("asterisk") or {}
    return servers["pbx"]["reconnects"] if "pbx" in servers else None


def _rows_of(engine: Engine, server: str) -> list[object]:
    """The registration summaries the store holds for ``server``."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(registration_summary.c.user_id).where(registration_summary.c.server == server)
        )
        return list(rows.all())


def _connected(daemon: Daemon) -> dict[str, bool]:
    health = daemon.health() or {}
    return {name: bool(h["connected"]) for name, h in (health.get("asterisk") or {}).items()}


def test_sighup_lets_go_of_a_removed_server_and_takes_up_an_added_one(
    tmp_path: Path, peers: tuple[FakeAsterisk, FakeAsterisk, FakeAsterisk]
) -> None:
    """A SIGHUP that removes one [[asterisk]] entry and adds another disconnects the first
    and forgets its registration state and every metric series of its name, connects and
    snapshots the second, and leaves the server kept connected on its first session."""
    kept, removed, added = peers
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_store(url, 1).dispose()
    metrics = free_port()
    conf = _config(tmp_path, url, [("keep", kept.port), ("gone", removed.port)], metrics)
    daemon = Daemon(conf, tmp_path / "daemon.log").start()
    try:
        until(lambda: _connected(daemon) == {"keep": True, "gone": True}, 20, "both connected")
        engine = open_engine(url)
        try:
            # The removed server's state, as its snapshot wrote it.
            until(lambda: bool(_rows_of(engine, "gone")), 10, "gone's state written")
            kept_logins = kept.logins_ok
            gone_series = _series_of(metrics, "gone")
            assert any(line.startswith("provisioner_contacts_online{") for line in gone_series)
            assert any(line.startswith("provisioner_ami_reconnects_total{") for line in gone_series)
            _config(tmp_path, url, [("keep", kept.port), ("new", added.port)], metrics)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            until(lambda: _connected(daemon) == {"keep": True, "new": True}, 20, "swapped")
            until(lambda: bool(added.actions("PJSIPShowContacts")), 10, "new one snapshotted")
            until(lambda: not removed._writers, 10, "removed one let go")
            until(lambda: not _rows_of(engine, "gone"), 10, "gone's state forgotten")
            until(lambda: not _series_of(metrics, "gone"), 10, "removed server's series gone")
            assert _series_of(metrics, "new")
            assert kept.logins_ok == kept_logins  # the kept server's sessions stayed up
            assert not daemon.logged("config.restart_needed")
            assert daemon.logged("ami.servers_changed")[-1]["removed"] == ["gone"]
        finally:
            engine.dispose()
    finally:
        assert daemon.stop() == 0


def test_sighup_moving_a_server_to_another_host_reconnects_it_there(
    tmp_path: Path, peers: tuple[FakeAsterisk, FakeAsterisk, FakeAsterisk]
) -> None:
    """A SIGHUP that points an [[asterisk]] entry at another port (another Asterisk) closes
    the sessions to the old one and logs in to, and snapshots, the new one under the same
    name."""
    old, new, _ = peers
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_store(url, 1).dispose()
    metrics = free_port()
    conf = _config(tmp_path, url, [("pbx", old.port)], metrics)
    daemon = Daemon(conf, tmp_path / "daemon.log").start()
    try:
        until(lambda: _connected(daemon) == {"pbx": True}, 20, "connected")
        _config(tmp_path, url, [("pbx", new.port)], metrics)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: not old._writers, 10, "old host let go")
        until(lambda: _connected(daemon) == {"pbx": True}, 20, "connected to the new host")
        until(lambda: bool(new.actions("PJSIPShowContacts")), 10, "new host snapshotted")
        changed = daemon.logged("ami.servers_changed")[-1]
        assert (changed["removed"], changed["added"]) == (["pbx"], ["pbx"])
        assert daemon.logged("registration.servers_forgotten")[-1]["servers"] == ["pbx"]
    finally:
        assert daemon.stop() == 0


def test_a_down_silent_or_refusing_server_never_delays_the_others(tmp_path: Path) -> None:
    """With four servers, one down, one that never answers (not even the login) and one
    refusing the login, an edit's reload reaches the healthy one at once; the refusing
    one is tried again only after the long backoff, and the down one gets its own
    pending reload when it comes up."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_store(url, 1).dispose()
    silent, refusing, late = FakeAsterisk(), FakeAsterisk(), FakeAsterisk()
    silent.silent = True
    refusing.secret, refusing.login_delay = "not-ours", 1.0  # as Asterisk refuses
    late.port = free_port()
    with in_a_thread(FakeAsterisk()) as good, in_a_thread(silent), in_a_thread(refusing):
        servers = [("good", good.port), ("silent", silent.port)]
        servers += [("refusing", refusing.port), ("down", late.port)]
        conf = _config(tmp_path, url, servers, free_port())
        daemon = Daemon(conf, tmp_path / "daemon.log").start()
        try:
            until(lambda: good.logins_ok >= 2, 20, "good's two sessions logged in")
            before = len(good.actions("Reload"))
            cli(conf, *agent_args("alice"))
            took = until(lambda: len(good.actions("Reload")) > before, 10, "good reloaded")
            assert took < 1.5, f"the healthy server's reload waited {took:.2f} s"
            assert refusing.logins_failed <= 2  # main and reload session, once each
            with in_a_thread(late):
                until(lambda: bool(late.actions("Reload")), 20, "the late one's own reload")
            assert refusing.logins_failed <= 2
            assert len(daemon.logged("ami.login_failed")) <= 2
        finally:
            assert daemon.stop() == 0


def test_two_quick_sighups_moving_a_server_end_on_the_last_host_alone(
    tmp_path: Path, peers: tuple[FakeAsterisk, FakeAsterisk, FakeAsterisk]
) -> None:
    """Two SIGHUPs in a row that move one server from a first host to a second, then a
    third, leave it connected to the third only, the first two let go."""
    first, second, third = peers
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_store(url, 1).dispose()
    metrics = free_port()
    conf = _config(tmp_path, url, [("pbx", first.port)], metrics)
    daemon = Daemon(conf, tmp_path / "daemon.log").start()
    try:
        until(lambda: first.logins_ok >= 2, 20, "connected to the first")
        assert daemon.proc is not None
        _config(tmp_path, url, [("pbx", second.port)], metrics)
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: len(daemon.logged("config.reloaded")) >= 1, 10, "first SIGHUP read")
        _config(tmp_path, url, [("pbx", third.port)], metrics)
        daemon.proc.send_signal(signal.SIGHUP)
        until(lambda: third.logins_ok >= 2, 20, "connected to the third")
        until(lambda: not first._writers and not second._writers, 10, "others let go")
        until(lambda: _connected(daemon) == {"pbx": True}, 10, "health says connected")
    finally:
        assert daemon.stop() == 0


def test_a_server_moved_by_sighup_keeps_counting_its_reconnects(
    tmp_path: Path, peers: tuple[FakeAsterisk, FakeAsterisk, FakeAsterisk]
) -> None:
    """A server that reconnected once, then moved to another host by a SIGHUP (its link
    made anew), counts the new host's session as its second reconnect: the counter
    provisioner_ami_reconnects_total and the health record's reconnects both say 2,
    never going back to 0; the record's reloads and events go on from the old link's
    too."""
    old, new, _ = peers
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_store(url, 1).dispose()
    metrics = free_port()
    series = '{server="pbx"}'
    with CutProxy(old.port) as proxy:
        conf = _config(tmp_path, url, [("pbx", proxy.port)], metrics)
        daemon = Daemon(conf, tmp_path / "daemon.log").start()
        try:
            until(lambda: old.logins_ok >= 2, 20, "both sessions logged in")
            proxy.cut()
            until(lambda: old.logins_ok >= 4, 20, "both sessions logged in again")
            until(lambda: _reconnects(daemon) == 1, 30, "health says one reconnect")
            total = "provisioner_ami_reconnects_total"
            assert _scraped(metrics, total) == {series: 1.0}
            before = (daemon.health() or {})["asterisk"]["pbx"]
            assert before["reloads"], before  # the first sync's reload
            _config(tmp_path, url, [("pbx", new.port)], metrics)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            until(lambda: new.logins_ok >= 2, 20, "connected to the new host")
            until(lambda: _reconnects(daemon) == 2, 30, "health says two reconnects")
            assert _scraped(metrics, total) == {series: 2.0}
            after = (daemon.health() or {})["asterisk"]["pbx"]
            for result, count in before["reloads"].items():
                assert after["reloads"].get(result, 0) >= count, (before, after)
            assert after["events"] >= before["events"]
        finally:
            assert daemon.stop() == 0
