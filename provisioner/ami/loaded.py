"""What a config-file reload made Asterisk load: a digest of the files it reads.

A reload owed for a file the daemon wrote is noted in the store only after the write
(a note before every write would cost a store write per edit): a daemon killed between
the two leaves a file that the next run's reconcile finds as desired, owing nothing.
So after each reload Asterisk accepted, the digest of the files it loaded is noted per
server (``loaded_digest:<server>``, one write per reload, and reloads are rare), and at
the start a server whose noted digest differs from the files' is owed a reload.

The files are opened right before the reload is sent (:func:`open_files`) and hashed
after it ended well (:meth:`OpenedFiles.digest`): a write replaces a file by a rename,
so an opened file keeps the bytes it had, and Asterisk, reading after the action came,
read those bytes or newer ones.  A noted digest is thus never of bytes Asterisk did not
load; at worst it is of older ones, and the next start reloads once more than needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Connection

from ..store.state import write_states
from ..targets.shards import shard_files
from .changes import loaded_digest_key

__all__ = [
    "CHUNK",
    "UNKNOWN",
    "OpenedFiles",
    "config_files",
    "files_digest",
    "note_unknown",
    "open_files",
    "owes_reload",
]

#: Bytes read at a time while hashing.
CHUNK = 1 << 20
#: A noted digest saying "what Asterisk loaded is not known" (never a file's digest).
UNKNOWN = "unknown"


def config_files(path: Path, shards: int) -> tuple[Path, ...]:
    """The files a reload of the config-file target at ``path`` loads: the file, and
    with ``shards`` its shard files (the main file includes them)."""
    return (path, *shard_files(path, shards)) if shards else (path,)


@dataclass
class OpenedFiles:
    """Files opened at one moment (None: absent then), to be hashed later as they were."""

    files: list[tuple[Path, BinaryIO | None]] = field(default_factory=list)

    def digest(self) -> str:
        """The SHA-256 (hex) of every file's name and bytes, an absent one marked so;
        closes them.  Blocking: run it in a worker thread."""
        hashed = hashlib.sha256()
        try:
            for path, handle in self.files:
                hashed.update(f"{path}\0".encode())
                if handle is None:
                    hashed.update(b"absent\0")
                    continue
                hashed.update(b"present\0")
                while chunk := handle.read(CHUNK):
                    hashed.update(chunk)
                hashed.update(b"\0")
        finally:
            self.close()
        return hashed.hexdigest()

    def close(self) -> None:
        """Close every file still open."""
        for _path, handle in self.files:
            if handle is not None:
                handle.close()
        self.files = []


def open_files(paths: Iterable[Path]) -> OpenedFiles:
    """Open ``paths`` now (an absent one noted absent); an error other than absence
    closes those already opened and raises."""
    opened = OpenedFiles()
    try:
        for path in paths:
            try:
                handle: BinaryIO | None = path.open("rb")
            except FileNotFoundError:
                handle = None
            opened.files.append((path, handle))
    except BaseException:
        opened.close()
        raise
    return opened


def files_digest(paths: Iterable[Path]) -> str:
    """The digest of ``paths`` as they are now (:meth:`OpenedFiles.digest`); blocking."""
    return open_files(paths).digest()


def owes_reload(noted: str | None, current: str) -> bool:
    """Whether a server whose last accepted reload loaded files of digest ``noted`` is
    owed one for files of digest ``current``.  No note (a first run of a daemon that
    notes digests, a new server) owes none: what Asterisk loaded is not known, and a
    forced reload could take minutes at scale (95 s at 50k endpoints), so the first
    reload asked for notes one."""
    return noted is not None and noted != current


def note_unknown(conn: Connection, servers: Iterable[str]) -> None:
    """Note, in the caller's transaction, that what each of ``servers`` loaded is not
    known (:data:`UNKNOWN`): a writer that changed the config files without asking for a
    reload (``sync --once``, ``render``) calls it, so that the next daemon reloads even
    when the files end as the bytes last noted loaded (a daemon killed after Asterisk
    accepted a reload and before its digest was noted leaves that older digest)."""
    write_states(conn, {loaded_digest_key(server): UNKNOWN for server in servers})
