"""Prometheus metrics of a real daemon: served on localhost, and what they count."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

from .faultkit import Daemon, seed_store, store_url, until, write_config


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
