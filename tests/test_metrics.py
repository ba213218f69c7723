"""Prometheus metrics of a real daemon: served on localhost, and what they count."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from .faultkit import Daemon, seed_store, store_url, until, write_config
from .helpers import local_daemon


def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    body: bytes = urllib.request.urlopen(url, timeout=5).read()
    return body.decode()


def _serves(port: int) -> bool:
    try:
        return "provisioner_syncs_total" in _scrape(port)
    except (urllib.error.URLError, OSError):
        return False


def test_a_metrics_port_in_use_is_logged_and_retried(tmp_path: Path) -> None:
    """With its metrics port taken, the daemon still provisions, logs metrics.serve_failed
    naming the port, and serves the metrics once the port is free."""
    seed_store(store_url(tmp_path), 1).dispose()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    config = write_config(tmp_path, extra=[f"metrics_port = {port}"])
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.start()
        until(lambda: bool(daemon.logged("metrics.serve_failed")), 10, "failure logged")
        (failed,) = daemon.logged("metrics.serve_failed")
        assert failed["port"] == port
        assert daemon.alive
        squatter.close()
        until(lambda: _serves(port), 30, "metrics served once the port is free")
        assert daemon.stop() == 0
    finally:
        squatter.close()
        daemon.kill()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def _server_health(events: int, ok_reloads: int) -> dict[str, Any]:
    """One server's figures as AmiPbx.health gives them (only what the export reads)."""
    return {
        "reconnects": 0,
        "online": 1,
        "live": True,
        "owed": 0,
        "rejected": 0,
        "events": events,
        "reloads": {"ok": ok_reloads},
    }


def test_a_server_made_anew_keeps_counting_and_a_removed_one_drops_every_series(
    tmp_path: Path,
) -> None:
    """A server whose link a SIGHUP made anew (its totals back to 0) adds its new counts to
    the counters instead of none until it passes the old totals; a server taken out no
    longer has any series, gauges and counters alike (reloads of every result,
    registration events, reconnects), while the kept server's stay."""
    daemon = local_daemon(tmp_path)
    try:
        daemon._export_ami({"pbx": _server_health(10, 2), "other": _server_health(1, 1)})
        daemon._export_ami({"pbx": _server_health(3, 1), "other": _server_health(1, 1)})
        text = generate_latest(daemon.metrics.registry).decode()
        assert 'provisioner_registration_events_total{server="pbx"} 13.0' in text
        assert 'provisioner_reloads_total{result="ok",server="pbx"} 3.0' in text
        other = _server_health(1, 1)
        other["reloads"]["busy"] = 2
        other["reconnects"] = 4
        daemon._export_ami({"pbx": _server_health(3, 1), "other": other})
        text = generate_latest(daemon.metrics.registry).decode()
        assert 'provisioner_reloads_total{result="busy",server="other"} 2.0' in text
        assert 'provisioner_ami_reconnects_total{server="other"} 4.0' in text
        daemon._export_ami({"pbx": _server_health(3, 1)})
        text = generate_latest(daemon.metrics.registry).decode()
        assert [line for line in text.splitlines() if 'server="other"' in line] == []
        assert 'provisioner_contacts_online{server="pbx"} 1.0' in text
        assert 'provisioner_registration_events_total{server="pbx"} 13.0' in text
        assert 'provisioner_reloads_total{result="ok",server="pbx"} 3.0' in text
    finally:
        daemon.engine.dispose()
