"""systemd's notify protocol (``Type=notify``, ``WatchdogSec``) without a dependency.

``NOTIFY_SOCKET`` names a datagram socket (a path, or ``@name`` in the abstract
namespace); each message is ``KEY=VALUE`` lines.  Outside systemd every call is
a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

from .visible import visible

__all__ = ["Notifier", "watchdog_interval"]


class Notifier:
    """Sends READY / RELOADING / WATCHDOG / STOPPING / STATUS to systemd when it listens."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send one message; a lost message is not an error (systemd may be restarting)."""
        if self._sock is None:
            return
        # A STATUS may quote text from outside (a refused file's key): a line break in it
        # would start another assignment of the message, such as WATCHDOG=trigger.
        payload = "\n".join(f"{k.upper()}={visible(str(v))}" for k, v in fields.items()).encode()
        # A lost datagram is not an error: systemd may be restarting, and a
        # missed watchdog ping is exactly what it is there to notice.
        with contextlib.suppress(OSError):
            self._sock.sendto(payload, self._address)

    def ready(self, status: str = "") -> None:
        self.send(ready=1, **({"status": status} if status else {}))

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic clock, as systemd wants it: the service is
        "reloading" until the next :meth:`ready`, so ``systemctl reload`` waits for it."""
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def status(self, text: str) -> None:
        self.send(status=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds when the watchdog is on for this process, else
    None.  As sd_watchdog_enabled(3) reads them, it is off unless ``WATCHDOG_USEC`` is a
    positive number of microseconds (0 would feed it in a busy loop, a word would end the
    start in a ValueError) and ``WATCHDOG_PID``, when set, is this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID")
    if not (usec.isascii() and usec.isdigit() and int(usec) > 0):
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000
