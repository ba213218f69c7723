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

Each file's own digest is kept (:class:`FileDigests`) under the identity it was hashed
with (device, inode, size, modification and change times): before a reload a file
whose identity is unchanged is only looked at (a ``stat``), and only one replaced or
written since is opened and read.  With 1,024 shard files, opening and closing every
file took 15-20 ms of the event loop's time per reload, in an edit's path to its
``Reload`` action, and the digest read all 62 MB of a 100k-user site each time.  A kept
digest is as safe as an opened file: its identity was the file's right before the
reload was sent, so Asterisk read those bytes or newer ones.  (A write in place that
keeps the size within one tick of the kernel's clock keeps the identity too: the digest
noted is then of older bytes, and the next start reloads once more than needed.  The
target's own writes are renames.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeAlias

from sqlalchemy import Connection

from ..store.state import write_states
from ..targets.shards import shard_files
from .changes import loaded_digest_key

__all__ = [
    "CHUNK",
    "UNKNOWN",
    "FileDigests",
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


#: A file as ``stat`` finds it: device, inode, size, modification and change times (ns).
#: A rename over it changes the inode; a write in place, the times (and mostly the size).
Identity: TypeAlias = tuple[int, int, int, int, int]


def _identity(found: os.stat_result) -> Identity:
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


@dataclass
class FileDigests:
    """Each config file's SHA-256, by path, with the identity the file had when hashed:
    kept from one reload to the next, so that only files changed since are read again.

    Filled by :meth:`OpenedFiles.digest` in worker threads and read by :func:`open_files`
    on the event loop: each entry is replaced whole (one dict item, atomic under the
    GIL), and one read stale names an identity the file no longer has, so the file is
    simply opened again."""

    known: dict[Path, tuple[Identity, bytes]] = field(default_factory=dict)

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Forget every file but ``paths`` (the target's files changed: a SIGHUP)."""
        wanted = set(paths)
        self.known = {p: v for p, v in self.known.items() if p in wanted}


#: A file as :func:`open_files` found it: absent (None), known (its digest, unchanged
#: since it was hashed) or opened (to be hashed as it was).
_Found: TypeAlias = BinaryIO | bytes | None


@dataclass
class OpenedFiles:
    """Files found at one moment, to be hashed later as they were: each absent, known
    (its kept digest, :class:`FileDigests`) or opened."""

    files: list[tuple[Path, _Found]] = field(default_factory=list)
    #: Where the digests of the files opened here are kept once read (None: nowhere).
    digests: FileDigests | None = None

    def digest(self) -> str:
        """The SHA-256 (hex) of every file's name and own digest, an absent one marked
        so; closes them.  Blocking: run it in a worker thread."""
        hashed = hashlib.sha256()
        try:
            for path, found in self.files:
                hashed.update(f"{path}\0".encode())
                if found is None:
                    hashed.update(b"absent\0")
                    continue
                own = found if isinstance(found, bytes) else self._read(path, found)
                hashed.update(b"present\0" + own)
        finally:
            self.close()
        return hashed.hexdigest()

    def _read(self, path: Path, handle: BinaryIO) -> bytes:
        """The digest of the file open at ``handle``, kept under its identity (taken
        before reading: a write meanwhile leaves an identity the file no longer has)."""
        identity = _identity(os.fstat(handle.fileno()))
        own = hashlib.sha256()
        while chunk := handle.read(CHUNK):
            own.update(chunk)
        value = own.digest()
        if self.digests is not None:
            self.digests.known[path] = (identity, value)
        return value

    def close(self) -> None:
        """Close every file still open."""
        for _path, found in self.files:
            if found is not None and not isinstance(found, bytes):
                found.close()
        self.files = []


def open_files(paths: Iterable[Path], digests: FileDigests | None = None) -> OpenedFiles:
    """Find ``paths`` as they are now: an absent one noted absent, one whose identity is
    the one its digest in ``digests`` was kept under taken as that digest (a ``stat``),
    any other opened.  An error other than absence closes those already opened and
    raises."""
    found = OpenedFiles(digests=digests)
    known = digests.known if digests is not None else {}
    try:
        for path in paths:
            found.files.append((path, _find(path, known.get(path))))
    except BaseException:
        found.close()
        raise
    return found


def _find(path: Path, kept: tuple[Identity, bytes] | None) -> _Found:
    try:
        if kept is not None and _identity(os.stat(path)) == kept[0]:
            return kept[1]
        return path.open("rb")
    except FileNotFoundError:
        return None


def files_digest(paths: Iterable[Path], digests: FileDigests | None = None) -> str:
    """The digest of ``paths`` as they are now (:meth:`OpenedFiles.digest`), with the
    digests kept in ``digests`` used and updated; blocking."""
    return open_files(paths, digests).digest()


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
