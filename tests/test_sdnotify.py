"""systemd's notify messages, read off a real datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

from provisioner.sdnotify import Notifier


def _received(tmp_path: Path, **fields: str | int) -> list[str]:
    """The lines of the one message a Notifier sends with ``fields``."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        try:
            notifier.send(**fields)
        finally:
            notifier.close()
        return listener.recv(65536).decode().split("\n")


def test_a_status_quoting_a_line_break_stays_one_field(tmp_path: Path) -> None:
    """A STATUS holding a line break (a refused file's key, say) is sent escaped as the CLI
    escapes it (provisioner.visible): it can never add another assignment, such as
    WATCHDOG=trigger, to the message."""
    lines = _received(tmp_path, ready=1, status="refused: daemon.a\nWATCHDOG=trigger\r\x00x")
    assert lines == ["READY=1", "STATUS=refused: daemon.a\\x0aWATCHDOG=trigger\\x0d\\x00x"]


def test_printable_text_is_sent_as_it_is(tmp_path: Path) -> None:
    """A printable STATUS, non-ASCII included, is sent unchanged."""
    assert _received(tmp_path, status="provisioning: 3 × naïve") == [
        "STATUS=provisioning: 3 × naïve"
    ]
