"""Atomic file replacement, as the config-file targets write: a temporary file in the
same directory, written and fsynced, then renamed over the old file, then the directory
fsynced, so a reader (Asterisk) sees the old bytes or the new, never a mix, and a
power loss leaves one of them.  The previous file can be kept as ``<name>.bak``.

Temporaries are named ``.<name>.<random>.tmp``; a writer killed between creating and
renaming one leaves it behind, and :func:`remove_stale_temporaries` deletes those old
enough to be no live writer's.

A large former backup is not freed on the way to Asterisk: unlinking a file frees its
blocks within the call (about 30 ms for the 62 MB file of 100k users, ext4 on the lab
VM), so it is renamed to a temporary name and unlinked by a background thread once the
new file is in place (:func:`discard_later`).

Two writers of one target (the daemon and ``sync --once``, ``render`` or ``run --burst``)
take turns: :func:`writers_lock` holds an ``flock`` on ``.<name>.lock`` beside the file
from before the current file is read to after the new one is in place.

A writer with CPU work left before it may publish (the parse-back check) can
:func:`stage` the bytes first: the temporary file is written and fsynced by a background
thread (both release the GIL) while the caller works, and only
:meth:`StagedWrite.publish` renames it into place; :meth:`StagedWrite.discard` removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import TargetWriteFailed
from ..logs import get_logger
from ..store import engine as store_engine
from .pieces import Pieces

__all__ = [
    "DIRECTORY_MODE",
    "DISCARD_LATER_BYTES",
    "FILE_MODE",
    "STAGE_WRITE_MIN",
    "STALE_TEMP_SECONDS",
    "WRITEBACK_STEP",
    "BackupNotKept",
    "StagedWrite",
    "atomic_write",
    "backup_of",
    "discard_later",
    "fsync_directory",
    "keep_backup",
    "keep_owner",
    "later_than",
    "lock_file",
    "make_directories",
    "owner_source",
    "publish",
    "read_file",
    "real_path",
    "remove_stale_in",
    "remove_stale_temporaries",
    "stage",
    "sync_directory",
    "temporary",
    "warn_of_other_links",
    "write_file",
    "write_synced",
    "writers_lock",
]

log = get_logger(__name__)

#: Asterisk (group) reads the file; digests make it unfit for everyone to read.
FILE_MODE = 0o640

#: A directory a write makes (a shard directory, a missing target directory): the owner
#: writes, its group (Asterisk's, as for :data:`FILE_MODE`) reaches the files in it.
DIRECTORY_MODE = 0o750

#: A former backup at least this large is freed by :func:`discard_later`; a smaller one
#: is replaced in place (freeing it costs next to nothing).
DISCARD_LATER_BYTES = 4 << 20


def _new_temporary(directory: Path, name: str) -> Path:
    """A new empty file in ``directory`` named ``.<name>.<random>.tmp`` (the names
    :func:`remove_stale_temporaries` knows)."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(temp)


@contextlib.contextmanager
def temporary(directory: Path, name: str) -> Iterator[Path]:
    """A new empty file in ``directory``; removed on exit unless it was renamed away."""
    temp = _new_temporary(directory, name)
    try:
        yield temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def real_path(path: Path) -> Path:
    """The file a write of ``path`` replaces: where a symbolic link at ``path`` leads
    (followed to the end; Asterisk configs are often links into another directory), else
    ``path`` itself.  Renaming over the link would turn it into a file of its own."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def backup_of(path: Path) -> Path:
    """Where the previous version of ``path`` is kept: ``<name>.bak`` beside the file
    :func:`real_path` finds."""
    real = real_path(path)
    return real.with_name(real.name + ".bak")


#: A temporary file older than this was left by a writer that died (SIGKILL, power loss).
STALE_TEMP_SECONDS = 300.0


def remove_stale_temporaries(path: Path, now: float | None = None) -> list[Path]:
    """Delete temporary files of ``path`` that a killed writer left behind; return them.

    Only files named like :func:`temporary` makes them and older than
    :data:`STALE_TEMP_SECONDS`, so a concurrent writer's live file is never touched.
    """
    # The name taken literally: one holding glob characters ("users[1].conf") would
    # otherwise miss its own temporaries and match another file's.
    real = real_path(path)
    return remove_stale_in(real.parent, f".{glob.escape(real.name)}.*.tmp", now)


def remove_stale_in(directory: Path, pattern: str, now: float | None = None) -> list[Path]:
    """Delete the files of ``directory`` named ``pattern`` (a glob of :func:`temporary`'s
    names) older than :data:`STALE_TEMP_SECONDS`; return them.

    A leftover is harmless (no reader opens it), so one that cannot be deleted is logged
    (``target.cleanup_failed``), not raised: it must not stop the target being built."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for candidate in directory.glob(pattern):
        try:
            if now - candidate.stat().st_mtime > STALE_TEMP_SECONDS:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("target.cleanup_failed", path=str(candidate), error=exc.strerror)
    return removed


def write_synced(path: Path, data: bytes | Pieces) -> None:
    """Write ``data`` to ``path`` (mode :data:`FILE_MODE`) and fsync it: on disk before
    any rename makes it the file Asterisk reads.  Data of :data:`WRITEBACK_STEP` bytes
    or more goes to the disk as it is written (:func:`_write_with_writeback`)."""
    pieces = Pieces.of(data)
    with path.open("wb") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        if len(pieces) >= WRITEBACK_STEP and _SYNC_FILE_RANGE is not None:
            _write_with_writeback(handle, pieces, _SYNC_FILE_RANGE)
        else:
            pieces.write_to(handle)
        handle.flush()
        os.fsync(handle.fileno())


#: Bytes written between two requests that the kernel start writing them to the disk.
WRITEBACK_STEP = 8 << 20
#: ``sync_file_range``'s flag: start writing the range out, wait for nothing.
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # a libc without it: the file is still fsynced
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _sync_file_range()


def _write_with_writeback(
    handle: BinaryIO, pieces: Pieces, start_writeback: Callable[[int, int, int, int], int]
) -> None:
    """Write ``pieces`` to ``handle``, asking the kernel, each time a whole
    :data:`WRITEBACK_STEP` more is written, to start writing that step to the disk
    (``sync_file_range``, not waiting), so the disk works while the rest is copied and
    the fsync after waits for the last part only.  Measured on this VM's disk, 62 MB (a
    100k-user file): write and fsync 60 ms, 44 ms so.  Only whole steps are asked for: a
    spliced file's pieces are of any size (an edited user's few hundred bytes), and a
    request per piece would hand the disk a page at a time.  A request the kernel
    refuses (a file system without it) only ends the requests: the fsync makes the file
    durable all the same."""
    fd = handle.fileno()
    written = asked = 0
    asking = True
    for part in pieces.slices(WRITEBACK_STEP):
        handle.write(part)
        written += len(part)
        # Each slice is at most a step: at most one whole step is waiting here.
        if asking and written - asked >= WRITEBACK_STEP:
            handle.flush()
            if start_writeback(fd, asked, WRITEBACK_STEP, _SYNC_FILE_RANGE_WRITE) != 0:
                asking = False
                log.debug("file.writeback_not_started", error=os.strerror(ctypes.get_errno()))
            asked += WRITEBACK_STEP


def later_than(new: Path, old: Path) -> None:
    """Make ``new``'s modification time later than ``old``'s (when ``old`` exists), so
    each version of a file has a later one than every version before it.

    Asterisk's reload skips a file whose size and modification time are those it last
    loaded (a config file unchanged).  With a coarse clock (a kernel tick of a few
    milliseconds, before Linux 6.13), two writes of the same size within one tick, a
    reload reading between them, would leave the second unloaded until some later
    change."""
    try:
        before = old.stat().st_mtime_ns
    except FileNotFoundError:
        return
    now = new.stat()
    if now.st_mtime_ns <= before:
        os.utime(new, ns=(now.st_atime_ns, before + 1))


def keep_owner(new: Path, old: Path) -> None:
    """Give ``new`` the group of ``old`` (when it exists), and its owner too when this
    process runs as root (only root gives a file away): an operator may have handed the
    file to Asterisk (``chown asterisk:asterisk``), which must still read the new one.

    A group the writer may not give is logged (``file.group_not_kept``), and the file is
    written with the writer's group: one it is not in, or any at all where a seccomp
    filter refuses ``chown`` (EPERM: the shipped unit's ``SystemCallFilter=~@privileged``,
    seen under systemd 252), or one its user namespace does not map (EINVAL: under
    ``PrivateUsers=`` without that filter, every group but root's and the service's own;
    ``stat`` shows such a group as ``nobody``).  Only a setgid directory then gives new
    files the directory's group: the kernel does that, not the writer."""
    try:
        before = old.stat()
    except FileNotFoundError:
        return
    now = new.stat()
    uid = before.st_uid if os.geteuid() == 0 and before.st_uid != now.st_uid else -1
    gid = before.st_gid if before.st_gid != now.st_gid else -1
    if uid == gid == -1:
        return
    try:
        os.chown(new, uid, gid)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        log.warning(
            "file.group_not_kept",
            path=str(old),
            group=before.st_gid,
            error=exc.strerror,
            advice=_GROUP_ADVICE[exc.errno],
        )


#: What to do when the writer cannot give a file the group it should have, by errno.
_GROUP_ADVICE = {
    # Under the shipped unit the syscall filter refuses every chown: there, putting the
    # writer in the group mends nothing, and only the setgid directory does.
    errno.EPERM: "make the directory setgid (chmod g+s) so new files get its group; or, "
    "where the writer may chown (not under the shipped unit), add its user to that group",
    errno.EINVAL: "make the directory setgid (chmod g+s) so new files get its group: the "
    "group is not mapped in the writer's user namespace (systemd PrivateUsers=)",
}


def warn_of_other_links(path: Path) -> None:
    """Log ``file.hard_link_split`` (a warning) when the file at ``path`` has hard links
    besides its ``.bak``: the atomic write replaces it by a new file, so every other name
    keeps the old bytes from now on (a hard link cannot follow a rename; a symbolic link
    at ``target.path`` does, see :func:`real_path`)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    others = info.st_nlink - 1
    if others > 0:
        with contextlib.suppress(OSError):
            # A write killed between keeping the backup and the rename left them one file.
            if os.path.samefile(path, backup_of(path)):
                others -= 1
    if others > 0:
        log.warning(
            "file.hard_link_split",
            path=str(path),
            other_links=others,
            advice="the other names keep the old file: use a symbolic link instead",
        )


def fsync_directory(directory: Path) -> None:
    """fsync ``directory``: the renames into it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackupNotKept(OSError):
    """An OS error keeping a file's backup (its ``filename``): the file was not replaced
    either, and :class:`TargetWriteFailed` names the backup, not the file."""


@contextlib.contextmanager
def _keeping(backup: Path) -> Iterator[None]:
    """An OS error inside raised as :class:`BackupNotKept` of ``backup``."""
    try:
        yield
    except BackupNotKept:
        raise
    except OSError as exc:
        raise BackupNotKept(exc.errno, exc.strerror, str(backup)) from exc


def keep_backup(path: Path, backup: Path) -> Path | None:
    """Make ``backup`` the current ``path`` (a hard link, else a copy), replacing it
    atomically, with no mode bit :data:`FILE_MODE` lacks (:func:`_linked_no_wider`,
    :func:`_private_copy`): a former file others could read (0644, made by hand or by
    an older version) holds digests, which its backup would otherwise keep open to them
    until the next write.  A former backup of :data:`DISCARD_LATER_BYTES` or more is first renamed
    to a temporary name instead of being freed here (for a moment there is no backup):
    returned, for :func:`discard_later`.  An OS error is raised as :class:`BackupNotKept`
    (a directory or an immutable file at the backup's name fails every write)."""
    with _keeping(backup):
        return _keep_backup(path, backup)


def _keep_backup(path: Path, backup: Path) -> Path | None:
    """:func:`keep_backup`'s body."""
    former = _set_aside(backup)
    try:
        with temporary(path.parent, backup.name) as temp:
            if not _linked_no_wider(path, temp):
                _private_copy(path, temp)
            os.replace(temp, backup)
    except BaseException:
        if former is not None:
            discard_later(former)
        raise
    return former


def _linked_no_wider(path: Path, temp: Path) -> bool:
    """Make ``temp`` (an empty temporary) a hard link of ``path`` whose mode has no bit
    :data:`FILE_MODE` lacks (the former file's inode narrowed, an instant before the new
    one replaces it with that mode).  False, nothing left at ``temp``, when it cannot be:
    no hard links here (some network or FUSE file systems), or a file the writer may
    neither link (the kernel's ``protected_hardlinks``) nor narrow (not its owner)."""
    temp.unlink()
    try:
        os.link(path, temp)
    except OSError:
        return False
    mode = stat.S_IMODE(os.stat(temp).st_mode)
    if mode & ~FILE_MODE:
        try:
            os.chmod(temp, mode & FILE_MODE)
        except PermissionError:
            temp.unlink()
            return False
    return True


def _private_copy(path: Path, temp: Path) -> None:
    """Copy ``path`` to a new file ``temp``, the writer's: mode 0600 while it is filled,
    then ``path``'s mode without the bits :data:`FILE_MODE` lacks, and its times."""
    info = os.stat(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    with open(path, "rb") as source, open(os.open(temp, flags, 0o600), "wb") as copy:
        shutil.copyfileobj(source, copy)
    os.utime(temp, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.chmod(temp, stat.S_IMODE(info.st_mode) & FILE_MODE)


def _set_aside(backup: Path) -> Path | None:
    """Rename a large ``backup`` to a new temporary name (a rename over an empty file frees
    nothing); None when there is no backup or it is small."""
    try:
        if backup.stat().st_size < DISCARD_LATER_BYTES:
            return None
    except FileNotFoundError:
        return None
    aside = _new_temporary(backup.parent, backup.name)
    os.replace(backup, aside)
    return aside


_discarder: ThreadPoolExecutor | None = None
_discarder_lock = threading.Lock()


def discard_later(path: Path) -> None:
    """Unlink ``path`` in a background thread (one for the process, made when first
    needed; the interpreter waits for it at exit).  A failure is logged
    (``file.discard_failed``); the name is a temporary's, so a later start removes it."""
    global _discarder
    with _discarder_lock:
        if _discarder is None:
            _discarder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="discard")
    _discarder.submit(_discard, path)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("file.discard_failed", path=str(path), error=exc.strerror)


def owner_source(path: Path, new_owner_of: Sequence[Path]) -> Path:
    """The file whose owner and group a write of ``path`` keeps: ``path`` when it exists,
    else the first of ``new_owner_of`` that does, else the nearest directory above
    ``path`` that exists (the target directory an operator gave to Asterisk: a first file
    with the writer's own group, mode 0640, would be one Asterisk cannot read)."""
    for candidate in (path, *new_owner_of):
        if candidate.exists():
            return candidate
    for directory in path.parents:
        if directory.is_dir():
            return directory
    return path


def make_directories(directory: Path, like: Path) -> None:
    """Make ``directory`` and its missing parents, each mode :data:`DIRECTORY_MODE`
    whatever the umask, with the group (and owner, as root) of ``like`` (:func:`keep_owner`):
    made with the writer's umask, user and group, Asterisk could not reach the files in it
    that it is given to read.  Each new entry is fsynced in its parent: a file written
    into a new directory must not vanish with it at a power loss."""
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if candidate.is_dir():
            break  # its parents are there too: no stat of each one at every write
        missing.append(candidate)
    for made in reversed(missing):
        try:
            made.mkdir(DIRECTORY_MODE)
        except FileExistsError:
            continue  # made meanwhile, by another writer: its mode is that writer's
        _undo_umask(made)
        keep_owner(made, like)
        fsync_directory(made.parent)


def _undo_umask(made: Path) -> None:
    """Give the directory ``made`` mode :data:`DIRECTORY_MODE` when a umask stricter than
    ``027`` took bits from it, keeping the setgid bit it inherited from a setgid parent:
    that bit is what gives the files in it the parent's group where the writer cannot
    (:func:`keep_owner`).  A chmod only when needed: ``chmod 0750`` would clear the bit,
    and a chmod setting it is refused under systemd's ``RestrictSUIDSGID=``."""
    mode = made.stat().st_mode
    if stat.S_IMODE(mode) & ~stat.S_ISGID == DIRECTORY_MODE:
        return
    try:
        os.chmod(made, DIRECTORY_MODE | (mode & stat.S_ISGID))
    except PermissionError:
        os.chmod(made, DIRECTORY_MODE)  # RestrictSUIDSGID=: the files get the writer's group


def atomic_write(
    path: Path,
    data: bytes | Pieces,
    *,
    backup: bool,
    sync_directory: bool = True,
    new_owner_of: Sequence[Path] = (),
) -> None:
    """Atomically make ``path`` hold ``data``, keeping the old file as ``<name>.bak``.

    Without ``sync_directory`` the rename is not yet durable: the caller fsyncs the
    directory once for many files (the sharded layout's full apply), before anything
    that names them.  A large former backup is freed afterwards, in the background.

    The new file has mode :data:`FILE_MODE` and the old one's group (and owner, written
    as root: :func:`keep_owner`); a first file at ``path`` takes those of the first of
    ``new_owner_of`` that exists, else of its directory (:func:`owner_source`; a shard
    file: the main file's, else the shard directory's).  A missing directory is made
    mode :data:`DIRECTORY_MODE` with the same owner and group (:func:`make_directories`).
    A symbolic link at ``path`` stays: the file it leads to is replaced
    (:func:`real_path`), and its backup is kept beside that file; a hard link does not
    (:func:`warn_of_other_links`)."""
    path = real_path(path)
    like = owner_source(path, new_owner_of)
    make_directories(path.parent, like)
    with temporary(path.parent, path.name) as temp:
        _write_temporary(temp, like, data)
        _put_in_place(temp, path, backup=backup, sync_directory=sync_directory)


def _write_temporary(temp: Path, like: Path, data: bytes | Pieces) -> None:
    """Fill ``temp``, the new version of a file: the owner and group of ``like``
    (:func:`owner_source`), bytes written and fsynced."""
    # First: the fsync then makes the owner durable too.
    keep_owner(temp, like)
    write_synced(temp, data)


def _put_in_place(temp: Path, path: Path, *, backup: bool, sync_directory: bool) -> None:
    """Rename the written ``temp`` over ``path`` (a later mtime; the old file kept as
    ``.bak`` when ``backup``; other hard links warned of), then fsync the directory
    (``sync_directory``)."""
    former: Path | None = None
    try:
        later_than(temp, path)
        warn_of_other_links(path)
        if backup:
            former = keep_backup(path, backup_of(path))
        os.replace(temp, path)
        if sync_directory:
            fsync_directory(path.parent)
    finally:
        if former is not None:
            discard_later(former)


_stager: ThreadPoolExecutor | None = None
_batch_stager: ThreadPoolExecutor | None = None
_stager_lock = threading.Lock()
#: Threads that stage the files of a batch (:func:`stage` with ``batch``): the disk serves
#: several fsyncs at once (see :mod:`.sharded`'s writers).
BATCH_STAGERS = 8


def _stage_executor(batch: bool = False) -> ThreadPoolExecutor:
    """The one thread staged writes are made in, or (``batch``) the
    :data:`BATCH_STAGERS` threads of a batch's; made when first needed."""
    global _stager, _batch_stager
    with _stager_lock:
        if batch:
            if _batch_stager is None:
                _batch_stager = ThreadPoolExecutor(BATCH_STAGERS, thread_name_prefix="stage-batch")
            return _batch_stager
        if _stager is None:
            _stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        return _stager


#: Staged bytes fewer than this are written by the caller, only their fsync in the
#: background; more are written there too (a 62 MB write is 20-40 ms of the caller's).
STAGE_WRITE_MIN = 4 << 20


class StagedWrite:
    """The next version of a file, written and fsynced to a temporary file beside it
    while the caller goes on, not yet in place (see :func:`stage`).  Exactly one of
    :meth:`publish` and :meth:`discard` ends it.

    The background thread is handed the file only once the caller waits for it to have
    started: a thread waking while the caller runs Python code gets the GIL only after
    the interpreter's switch interval (5 ms), longer than a small file's whole check, so
    its fsync would not overlap that check at all (staging 1k users was 6% slower so).
    Each call releasing the GIL is a new such wait, so that thread makes only the
    calls that block: the write of a large file, and the fsync.

    ``batch``: one of many files staged one after the other (a sharded layout's): the
    temporary file is made, written and fsynced in one of :data:`BATCH_STAGERS` threads,
    and the caller goes on at once.  Waiting for each to start would wait, with every
    thread busy, for an fsync, one file after the other; and a file made in a directory
    while others there are fsynced waits on them (~1 ms each: ~1 s of the caller's for
    1,024 shard files).  A thread handed a file while the caller runs Python code starts
    within the interpreter's switch interval."""

    def __init__(
        self,
        path: Path,
        data: bytes | Pieces,
        new_owner_of: Sequence[Path],
        *,
        batch: bool = False,
    ) -> None:
        #: The bytes the file will hold.
        self.data = data
        self._path = real_path(path)
        like = owner_source(self._path, new_owner_of)
        make_directories(self._path.parent, like)
        #: The temporary file, once made (in the stage thread, for a batch's).
        self._temp: Path | None = None
        if batch:
            self._done = _stage_executor(batch=True).submit(self._fill, like, data)
            return
        self._temp = temp = _new_temporary(self._path.parent, self._path.name)
        try:
            self._done = _start_writing(temp, like, data)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _fill(self, like: Path, data: bytes | Pieces) -> None:
        """In a batch's stage thread: make the temporary file, then fill it as
        :func:`atomic_write` does (owner, bytes, fsync)."""
        self._temp = _new_temporary(self._path.parent, self._path.name)
        _write_temporary(self._temp, like, data)

    def publish(self, *, backup: bool, sync_directory: bool = True) -> None:
        """Wait for the temporary file, then put it in place as :func:`atomic_write` does
        (``backup``, ``sync_directory``: as there); the temporary file is removed when
        anything fails, the old file staying as it was."""
        try:
            self._done.result()  # the writer's OSError, if any, raised here
            if self._temp is None:  # never: made before the write ended without error
                raise FileNotFoundError(f"no temporary file staged for {self._path}")
            _put_in_place(self._temp, self._path, backup=backup, sync_directory=sync_directory)
        finally:
            self.abandon()

    def discard(self) -> None:
        """Wait for the temporary file (its error, if any, ignored) and remove it: the file
        stays as it was.  A batch's file no thread has taken yet is never made.  A wait
        cut short (Ctrl-C) still leaves no temporary file (see :meth:`abandon`)."""
        try:
            if not self._done.cancel():
                with contextlib.suppress(Exception):
                    self._done.result()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Without waiting: the temporary file removed now if its write has ended, else as
        soon as it ends (by the stage thread); a batch's file no thread has taken yet is
        never made.  So a caller interrupted while it waited (``sync --once`` stopped by
        Ctrl-C during a first apply) leaves none behind: the thread would otherwise make
        or finish it after the caller had looked for it."""
        if not self._done.cancel():
            # Run at once, in this thread, when the write has ended already.
            self._done.add_done_callback(lambda _done: self._remove())

    def _remove(self) -> None:
        """Remove the temporary file, if it was made and is still there; one that cannot be
        removed is logged (``target.temporary_left``), not raised: the files staged
        beside it are still removed, and the next target built here removes it once old
        (:func:`remove_stale_in`)."""
        if self._temp is None:
            return
        try:
            self._temp.unlink()
        except FileNotFoundError:
            pass  # put in place, or removed already
        except OSError as exc:
            log.warning("target.temporary_left", path=str(self._temp), error=str(exc))


def _start_writing(temp: Path, like: Path, data: bytes | Pieces) -> Future[None]:
    """Fill ``temp`` as :func:`_write_temporary` does, the fsync (and the write of
    :data:`STAGE_WRITE_MIN` bytes or more) in the stage thread, returning once that
    thread runs; an OS error is the future's, raised by its result (as the thread's)."""
    try:
        keep_owner(temp, like)  # first: the fsync then makes the owner durable too
        handle = temp.open("wb")
    except OSError as exc:
        return _failed(exc)
    try:
        os.fchmod(handle.fileno(), FILE_MODE)
        if len(data) < STAGE_WRITE_MIN:
            Pieces.of(data).write_to(handle)
            handle.flush()
            data = b""
    except OSError as exc:
        with contextlib.suppress(OSError):  # closed all the same; its flush fails again
            handle.close()
        return _failed(exc)
    started = threading.Event()
    try:
        done = _stage_executor().submit(_finish_temporary, handle, data, started)
    except BaseException:
        handle.close()
        raise
    started.wait()
    return done


def _failed(exc: OSError) -> Future[None]:
    """A future already ended by ``exc``."""
    future: Future[None] = Future()
    future.set_exception(exc)
    return future


def _finish_temporary(handle: BinaryIO, data: bytes | Pieces, started: threading.Event) -> None:
    """In the stage thread: say it runs, write ``data`` (what the caller left unwritten),
    fsync and close."""
    started.set()
    with handle:
        if data:
            Pieces.of(data).write_to(handle)
            handle.flush()
        os.fsync(handle.fileno())


def stage(
    path: Path, data: bytes | Pieces, *, new_owner_of: Sequence[Path] = (), batch: bool = False
) -> StagedWrite:
    """Start writing ``data`` as the next version of ``path`` in the background: a
    temporary file in its directory (as :func:`atomic_write` names, owns and fsyncs it),
    invisible to Asterisk until :meth:`StagedWrite.publish`.  An OS error creating the
    temporary file is raised as :class:`TargetWriteFailed` (with ``batch``, one of many
    files staged together, see :class:`StagedWrite`: by ``publish``); one writing it, by
    ``publish``."""
    with _failing_as("write", path):
        return StagedWrite(path, data, new_owner_of, batch=batch)


def publish(staged: StagedWrite, path: Path, *, backup: bool, sync_directory: bool = True) -> None:
    """:meth:`StagedWrite.publish`, an OS error raised as :class:`TargetWriteFailed`."""
    with _failing_as("write", path):
        staged.publish(backup=backup, sync_directory=sync_directory)


def write_file(
    path: Path,
    data: bytes | Pieces,
    *,
    backup: bool,
    sync_directory: bool = True,
    new_owner_of: Sequence[Path] = (),
) -> None:
    """:func:`atomic_write`, an OS error raised as :class:`TargetWriteFailed`."""
    with _failing_as("write", path):
        atomic_write(
            path, data, backup=backup, sync_directory=sync_directory, new_owner_of=new_owner_of
        )


def sync_directory(directory: Path) -> None:
    """:func:`fsync_directory`, an OS error raised as :class:`TargetWriteFailed`."""
    with _failing_as("sync", directory):
        fsync_directory(directory)


def read_file(path: Path) -> bytes | None:
    """The bytes of the file at ``path``; None when it does not exist."""
    with _failing_as("read", path):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


@contextlib.contextmanager
def _failing_as(verb: str, path: Path) -> Iterator[None]:
    """An OS error inside raised as :class:`TargetWriteFailed` ("cannot <verb> <path>:
    <reason>"; the path the caller named, the driver's traceback dropped)."""
    try:
        yield
    except BackupNotKept as exc:
        backup = f"cannot keep its backup {exc.filename!r}"
        raise TargetWriteFailed(f"cannot {verb} {str(path)!r}: {backup}: {exc.strerror}") from None
    except OSError as exc:
        raise TargetWriteFailed(f"cannot {verb} {str(path)!r}: {exc.strerror}") from None


def lock_file(path: Path) -> Path:
    """The file the writers of ``path`` lock: ``.<name>.lock`` beside the file
    :func:`real_path` finds (a directory the service may write; hidden, as the
    temporaries are, from an ``#include`` glob and the template watcher)."""
    real = real_path(path)
    return real.with_name(f".{real.name}.lock")


#: The first pause between two tries of a lock another writer holds, and the longest.
_LOCK_PAUSE = (0.001, 0.05)


@contextlib.contextmanager
def writers_lock(path: Path, *, new_owner_of: Sequence[Path] = ()) -> Iterator[None]:
    """Within the block, hold the writers' lock of the file ``path`` (:func:`lock_file`,
    made when missing, mode :data:`FILE_MODE` with the owner and group a new ``path``
    would get, and left in place): two writers of one file, in one process or two, run
    one after the other, the second reading what the first wrote.

    Waiting is logged (``store.writer_waits``, as for the realtime writers' lock); a
    writer kept waiting :data:`~provisioner.store.engine.EXCLUSIVE_WAIT` seconds gives up
    with :class:`TargetWriteFailed` ("another writer held the lock … nothing written").
    A lock file that cannot be made or opened is a :class:`TargetWriteFailed` too."""
    lock = lock_file(path)
    with _failing_as("lock", lock):
        like = owner_source(real_path(path), new_owner_of)
        make_directories(lock.parent, like)
        made = not os.path.lexists(lock)
        if os.path.islink(lock):
            # Never followed: a link planted by whoever may write the directory would have
            # a writer (root, from the command line) make, chown and lock a file anywhere.
            raise TargetWriteFailed(
                f"cannot lock {str(lock)!r}: it is a symbolic link (remove it; the lock "
                "is a plain file provisioner makes)"
            )
        # Read-only is enough for flock, and opens a lock file another user made; a link
        # put there since the look above is refused (ELOOP), not followed.
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(lock, flags, FILE_MODE)
    try:
        if made:
            with _failing_as("lock", lock):
                keep_owner(lock, like)
        _take(fd, lock)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _take(fd: int, lock: Path) -> None:
    """``flock`` ``fd`` exclusively, waiting at most ``EXCLUSIVE_WAIT`` seconds."""
    with _failing_as("lock", lock):
        if _try_lock(fd):
            return
        log.warning("store.writer_waits", lock=str(lock))
        wait = store_engine.EXCLUSIVE_WAIT
        deadline = time.monotonic() + wait
        pause, longest = _LOCK_PAUSE
        while not _try_lock(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetWriteFailed(
                    f"another writer held the lock {str(lock)!r} for {wait} s: nothing written"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, longest)


def _try_lock(fd: int) -> bool:
    """Take the exclusive ``flock`` of ``fd`` if no one holds it; True when taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
