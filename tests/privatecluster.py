"""What the private database servers of the fault tests share (:mod:`tests.pgcluster`,
:mod:`tests.mariacluster`): a free port, a directory of their own the server's system
user may write, and the data directory inside it."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def server_directory(prefix: str, server_user: str) -> Iterator[Path]:
    """A new directory for one private server, owned by ``server_user`` when running as
    root (the server runs as that user); removed with everything in it afterwards."""
    # Not under pytest's tmp_path: its parents are private to root, and the server runs
    # as another user.
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(server_user)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PrivateServer:
    """A private server's directory and port; its data directory is ``data`` inside."""

    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"
