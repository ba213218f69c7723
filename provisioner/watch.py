"""Wake-ups: what tells the daemon that the store (or a template) may have changed.

Each source is a coroutine that sets a shared :class:`asyncio.Event` and runs
until ``stop`` is set; none of them reads the change itself (the change feed
does), so a spurious wake-up costs one cheap query and a missed one is healed
by the next wake-up or the periodic reconcile.

- SQLite: inotify on the database files (and on the names on the way to them), then a
  read of the newest change id (see :func:`sqlite_wakeups`);
- PostgreSQL: ``LISTEN provisioner_changes`` (the triggers ``NOTIFY``), and a timer
  while that connection is down;
- MariaDB/MySQL: a timer (the change table is polled).
- Templates: :mod:`watchfiles` on the template directories, and a look at them every
  second (a directory deleted and made again is watched anew).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import random
import sqlite3
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import psycopg
from sqlalchemy import func, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from .aio import sleep_unless, wait_first
from .logs import get_logger
from .store.changefeed import NOTIFY_CHANNEL
from .store.engine import FileIdentity, file_identity, pg_keepalive
from .store.schema import changes
from .targets.templating import editor_file, template_files

__all__ = [
    "DirectoryWatch",
    "NewestChange",
    "TemplateStamp",
    "coalesce",
    "newest_change_sql",
    "poll_wakeups",
    "postgres_wakeups",
    "sqlite_wakeups",
    "template_stamp",
    "template_wakeups",
]

log = get_logger(__name__)


def newest_change_sql() -> str:
    """``SELECT max(id) FROM changes`` as SQLite text, compiled once from Core."""
    return str(select(func.max(changes.c.id)).compile(dialect=sqlite_dialect.dialect()))


class NewestChange:
    """Reads ``max(changes.id)`` of a SQLite store on its own connection.

    A few microseconds of CPU (an index seek; in WAL mode a reader never waits on a
    writer, and with ``timeout=0`` it never waits at all), so it runs on the event loop.
    The file is never created (``mode=rw``).  When the path names another file than the
    connection's (a backup moved over the store), the connection is opened anew and the
    read counts as a move.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self.query = newest_change_sql()
        self.conn: sqlite3.Connection | None = None
        #: The file the connection reads.
        self.file: FileIdentity | None = None
        self.last: object = _UNREAD
        self.failing = False

    def check(self, wake: asyncio.Event) -> bool:
        """Set ``wake`` if the newest id moved since the last read (the first read counts,
        and so does the first on a replaced file); ``False`` when the store cannot be read
        (logged once per outage)."""
        now = file_identity(self.path)
        if self.conn is not None and now is not None and now != self.file:
            self.close()
            self.last = _UNREAD
        try:
            if self.conn is None:
                # Resolved at each connect: a symbolic link pointed at another database
                # since the last one must lead to that one, as the engine's connections do.
                uri = self.path.resolve().as_uri() + "?mode=rw"
                self.conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
                self.file = file_identity(self.path)
            newest = self.conn.execute(self.query).fetchone()[0]
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") in _BUSY:
                return True  # a writer holds a lock for a moment: read again next time
            if not self.failing:
                log.warning("store.poll_failed", error=str(exc))
            self.failing = True
            self.close()
            return False
        self.failing = False
        if newest != self.last:
            self.last = newest
            wake.set()
        return True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
#: "Nothing read yet": differs from every id and from None (an empty feed).
_UNREAD = object()

# Linux inotify(7): the events that mean "this file was written or replaced".
_IN_MODIFY = 0x2
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_MASK_ADD = 0x20000000
#: A store file written or replaced.
_WRITTEN = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
#: A name made anew: a link (re)made, a directory or file renamed over the name.
_MADE = _IN_CREATE | _IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class DirectoryWatch:
    """inotify(7) on one directory: tells whether any of ``names`` was written.

    Linux only (through libc's ``inotify_init1`` and ``inotify_add_watch``); raises
    :class:`OSError` where it is not available, so the caller can poll instead.

    Not :mod:`watchfiles` (which still watches the templates): its Rust loop wakes every
    ``step`` ms whether or not anything changed, and reports a change only after a
    ``step`` without another.  Measured on a WAL commit (2-core VM): ``step=1`` 2.0 ms
    commit-to-event and 2.2 % of a core while idle, ``step=5`` 8 ms and 1.1 %; this fd on
    the event loop: ~0.2 ms and no CPU while idle.
    """

    def __init__(self, directory: Path, names: Iterable[str]) -> None:
        self.names = {os.fsencode(n) for n in names}
        #: The names on the way to the store (:meth:`add_way`), also in ``names``.
        self.way: set[bytes] = set()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            raise OSError(f"inotify is not available: {exc}") from None
        add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add_watch = add
        self.fd = int(init(os.O_NONBLOCK | os.O_CLOEXEC))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        try:
            self._watch(directory, _WRITTEN)
        except OSError:
            os.close(self.fd)
            raise

    def add(self, directory: Path, names: Iterable[str]) -> None:
        """Also tell whether any of ``names`` in ``directory`` was written (a name written
        in either directory counts: at worst a spurious wake-up)."""
        self._watch(directory, _WRITTEN)
        self.names.update(os.fsencode(n) for n in names)

    def add_way(self, directory: Path, names: Iterable[str]) -> None:
        """Also tell when any of ``names`` in ``directory`` is made anew (created or moved
        to; see :meth:`way_made`).  Unless the directory is watched for writes already,
        writing to its files raises no event at all."""
        self._watch(directory, _MADE)
        way = {os.fsencode(n) for n in names}
        self.way.update(way)
        self.names.update(way)

    def way_made(self, hits: dict[bytes, int]) -> bool:
        """Whether ``hits`` (:meth:`written_names`) hold a name on the way made anew: a
        set lookup per name created or moved to, none per name only written."""
        way = self.way
        # A loop, not any(): a generator made this check nearly 3x dearer on every wake.
        for name, mask in hits.items():  # noqa: SIM110
            if mask & _MADE and name in way:
                return True
        return False

    def _watch(self, directory: Path, mask: int) -> None:
        # IN_MASK_ADD: a directory watched already (the store's own directory is often on
        # the way to it too) keeps the events it was watched for, or it would lose IN_MODIFY.
        if self._add_watch(self.fd, os.fsencode(directory), mask | _IN_MASK_ADD) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch failed on {str(directory)!r}")

    def written_names(self) -> dict[bytes, int]:
        """Drain the pending events; each watched name they name, with the events' masks
        or'ed (every name, with every mask, when some events were lost)."""
        data = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            data += chunk
            if len(chunk) < 65536:
                break
        hits: dict[bytes, int] = {}
        names, offset = self.names, 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                return dict.fromkeys(names, _WRITTEN)
            if name in names:
                hits[name] = hits.get(name, 0) | mask
        return hits

    def close(self) -> None:
        os.close(self.fd)


#: After a write to the store's files, the feed is read at once, then after 1, 2, 4 ...
#: ms (at most every 50 ms) until 1 s passed without a write: a commit becomes visible a
#: moment after its last write to the WAL (after the fsync, with ``synchronous=FULL``).
_FIRST_STEP = 0.001
_MAX_STEP = 0.05
_LINGER = 1.0
#: A write less than this many seconds after the previous one finds the files busy (a
#: registration storm's commits, hundreds a second): the feed is then read at most once
#: per this many seconds, not at once on each write.  In a SQLite daemon's storms the
#: reads on each write took 3-6 % of the event loop (455-747 a 100k storm, 50-100 µs
#: each); a change committed meanwhile is seen at most this much later.  A write after
#: a quiet spell is read at once, then after 1, 2, 4 ... ms, as before.
_BUSY_GAP = 0.005


async def sqlite_wakeups(
    db_path: Path, wake: asyncio.Event, stop: asyncio.Event, *, interval: float = 0.005
) -> None:
    """Set ``wake`` whenever the newest change id of the SQLite store moves; also once at start.

    It wakes only for the change feed (not for the daemon's own writes to the same file:
    target rows, cursor, registrations) and without a debounce.  On Linux it sleeps until
    inotify reports a write to the database, its WAL or its journal, then reads the
    newest id a few times (see ``_LINGER``): no CPU while idle, a millisecond or two from
    a commit to ``wake``.  Elsewhere it reads the newest id every ``interval`` seconds.
    A store that cannot be read (gone, not migrated) is retried every second.
    """
    feed = NewestChange(db_path)
    try:
        try:
            files = _store_watch(db_path)
        except OSError as exc:
            log.info("store.watch_unavailable", error=str(exc), poll_s=interval)
            await _poll_feed(feed, wake, stop, interval)
            return
        await _watch_feed(feed, files, wake, stop)
    finally:
        feed.close()


#: Symbolic links followed in resolving a path before it counts as a loop (Linux's limit).
_MAX_LINKS = 40

#: Per directory on the way to the store: its path, identity (device, inode; None when it
#: cannot be looked at) and the names looked up in it.
_Way = tuple[tuple[Path, FileIdentity | None, tuple[str, ...]], ...]
#: What a store watch watches: the file the store's path leads to, and the way to it.
_StorePlan = tuple[Path, _Way]


def _names_on_the_way(path: Path) -> dict[Path, set[str]]:
    """The names looked up in resolving ``path``, by the (resolved) directory each is
    looked up in: every component of the path, and of each symbolic link's target met
    (each link's own name included), as ``Path.resolve`` walks them.  A component that
    is missing is walked as named; more than ``_MAX_LINKS`` links raise ELOOP."""
    absolute = path.absolute()
    pending = list(reversed(absolute.parts[1:]))
    current, links = Path(absolute.anchor), 0
    way: dict[Path, set[str]] = {}
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        way.setdefault(current, set()).add(name)
        step = current / name
        try:
            target = os.readlink(step)
        except OSError:  # not a link (or missing): a directory or the file itself
            current = step
            continue
        links += 1
        if links > _MAX_LINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        if os.path.isabs(target):
            current = Path(absolute.anchor)
        pending.extend(reversed(target.split(os.sep)))
    return way


def _store_plan(db_path: Path) -> _StorePlan:
    """The file the store's path leads to now, and the way to it
    (:func:`_names_on_the_way`) with each directory's identity: another plan means the
    path may lead elsewhere (a link re-pointed, a directory renamed over another)."""
    way = _names_on_the_way(db_path)
    return db_path.resolve(), tuple(
        (directory, file_identity(directory), tuple(sorted(names)))
        for directory, names in sorted(way.items())
    )


def _store_watch(
    db_path: Path, plan: _StorePlan | None = None
) -> tuple[DirectoryWatch, _StorePlan]:
    """A watch of the store's files, and its plan (:func:`_store_plan`, made now unless
    given).

    SQLite follows symbolic links and writes the WAL and journal beside the file the path
    leads to, named after that file: those names are watched for writes.  Each name on
    the way to it is watched for being made anew, in its own directory: so a link of a
    chain or an ancestor directory re-pointed (``ln -sfn``), or a directory renamed over
    an ancestor, is noticed (and the watch then moved to that database's files).  A
    directory on the way that cannot be watched is logged and left out: the store's
    files are still watched (the safety-net reads follow such a change)."""
    real, way = plan = plan or _store_plan(db_path)
    files = DirectoryWatch(real.parent, [real.name, real.name + "-wal", real.name + "-journal"])
    errors: dict[str, str] = {}
    for directory, _id, names in way:
        try:
            files.add_way(directory, names)
        except OSError as exc:
            errors[str(directory)] = str(exc)
    if errors:
        log.warning(
            "store.watch_partial", unwatched=list(errors), error=next(iter(errors.values()))
        )
    return files, plan


async def _poll_feed(
    feed: NewestChange, wake: asyncio.Event, stop: asyncio.Event, interval: float
) -> None:
    while not stop.is_set():
        await asyncio.sleep(interval if feed.check(wake) else max(interval, 1.0))


async def _watch_feed(
    feed: NewestChange,
    watch: tuple[DirectoryWatch, _StorePlan],
    wake: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    follower = _Follower(asyncio.get_running_loop(), feed, watch, wake)
    follower.loop.add_reader(follower.files.fd, follower.on_readable)
    follower.check()  # the start counts as a write: the feed is read at once
    try:
        await stop.wait()
    finally:
        follower.loop.remove_reader(follower.files.fd)
        follower.files.close()
        follower.cancel()


class _Follower:
    """Callbacks on the event loop: a write to the store's files reads the feed at once and
    then at growing steps (``_FIRST_STEP`` doubling to ``_MAX_STEP``) until ``_LINGER``
    passes without a write; then no timer runs until the next write."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        feed: NewestChange,
        watch: tuple[DirectoryWatch, _StorePlan],
        wake: asyncio.Event,
    ) -> None:
        self.loop, self.feed, self.wake = loop, feed, wake
        #: The watch of the store's files, and its plan: where the path led when made.
        #: Only a name on the way made anew can lead the path elsewhere, so the path is
        #: resolved only then (resolving it on each write of the WAL or the database took
        #: 29 µs a wake, half of what a storm's wakes cost).
        self.files, self.plan = watch
        self.last_write = loop.time()
        self.step = _FIRST_STEP
        self.timer: asyncio.TimerHandle | None = None
        #: When the feed was last read (loop time).
        self.last_read = -_BUSY_GAP
        #: The last write came less than ``_BUSY_GAP`` after the one before.
        self.busy = False
        #: The watch's fd is off the loop until the next read (the files are busy).
        self.paused = False

    def on_readable(self) -> None:
        """A write to the store's files: read the feed at once; but while the files are
        busy (this write came less than ``_BUSY_GAP`` after the one before), not before
        ``_BUSY_GAP`` has passed since the last read, and until then the watch is off
        the loop (:meth:`resume`)."""
        hits = self.files.written_names()
        if not hits:
            return
        now = self.loop.time()
        self.busy = now - self.last_write < _BUSY_GAP
        self.last_write = now
        self.step = _FIRST_STEP
        if self.files.way_made(hits):
            self.follow_link()
        due = self.last_read + _BUSY_GAP
        if self.busy and now < due:
            # The writes until that read need not wake the loop (a storm's commits woke
            # it on nearly every turn): inotify keeps them queued, and the read's tick
            # puts the watch back.
            self.loop.remove_reader(self.files.fd)
            self.paused = True
            if self.timer is None or self.timer.when() > due:
                self.cancel()
                self.timer = self.loop.call_at(due, self.tick)
            return
        self.check()

    def follow_link(self) -> None:
        """A name on the way to the store was made anew: when the store's path now leads
        elsewhere (another file, another way, a directory on the way replaced), watch the
        files and the way it leads to now.  A watch that cannot be made keeps the old one
        (logged; the safety-net poll and the engine still follow the new file)."""
        try:
            plan = _store_plan(self.feed.path)
            if plan == self.plan:
                return
            files, self.plan = _store_watch(self.feed.path, plan)
        except OSError as exc:
            log.warning("store.watch_failed", error=str(exc))
            return
        self.loop.remove_reader(self.files.fd)
        self.files.close()
        self.files = files
        self.loop.add_reader(files.fd, self.on_readable)

    def tick(self) -> None:
        self.timer = None
        self.step = min(self.step * 2, _MAX_STEP)
        if self.paused:
            self.resume()
        self.check()

    def resume(self) -> None:
        """Put the watch back on the loop after a pause of busy files: writes made during
        it wake the loop now, and the files count as written now (still busy)."""
        self.paused = False
        self.loop.add_reader(self.files.fd, self.on_readable)
        self.last_write = self.loop.time()

    def check(self) -> None:
        """Read the feed now; schedule the next read (none once the files are quiet; no
        sooner than ``_BUSY_GAP`` while they are busy)."""
        self.cancel()
        self.last_read = self.loop.time()
        if not self.feed.check(self.wake):
            delay = 1.0  # the store cannot be read: retry every second, writes or not
        elif self.loop.time() - self.last_write >= _LINGER:
            return
        else:
            delay = max(self.step, _BUSY_GAP) if self.busy else self.step
        self.timer = self.loop.call_later(delay, self.tick)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


#: Seconds between two looks at the template directories themselves, beside the watch: a
#: directory made after the start, deleted and made again, or replaced is watched anew, and
#: a change the watch could not see (made before it began) still wakes.
TEMPLATE_RECHECK = 1.0

#: Per template directory: its path, identity (device, inode; None when absent) and its
#: files' paths below it (subdirectories' too), inodes, mtimes and sizes.
TemplateStamp = tuple[
    tuple[str, tuple[int, int] | None, tuple[tuple[str, int, int, int], ...]], ...
]


def template_stamp(dirs: Iterable[Path]) -> TemplateStamp:
    """What the template directories hold now: any edit, atomic replacement, new or removed
    file, and any directory made, deleted or replaced gives another stamp."""
    return tuple(_directory_stamp(d) for d in dirs)


def _directory_stamp(
    directory: Path,
) -> tuple[str, tuple[int, int] | None, tuple[tuple[str, int, int, int], ...]]:
    try:
        info = directory.stat()
        # Subdirectories included (an override may include ``sub/x.j2``); an entry that
        # cannot be looked at is left out, not taken for the whole directory gone.
        files = template_files(directory)
    except OSError:
        return (str(directory), None, ())
    held = tuple(sorted((n, s.st_ino, s.st_mtime_ns, s.st_size) for n, s in files))
    return (str(directory), (info.st_dev, info.st_ino), held)


def _identities(stamp: TemplateStamp) -> tuple[tuple[str, tuple[int, int] | None], ...]:
    return tuple((path, identity) for path, identity, _files in stamp)


async def template_wakeups(
    dirs: Iterable[Path],
    wake: asyncio.Event,
    stop: asyncio.Event,
    *,
    since: TemplateStamp | None = None,
    recheck: float = TEMPLATE_RECHECK,
) -> None:
    """Set ``wake`` whenever a template file in ``dirs`` changes, including a change made
    after ``since`` (a :func:`template_stamp` taken before the caller last read them) and
    before the watch began.

    The existing directories are watched with watchfiles; every ``recheck`` seconds their
    stamp is compared too, and a directory that appeared, vanished or was replaced is
    watched anew.  A watch that cannot start (a directory gone meanwhile) is logged
    (``templates.watch_failed``) and retried: it never ends the daemon."""
    dirs = list(dirs)
    seen = since if since is not None else template_stamp(dirs)
    while not stop.is_set():
        now = template_stamp(dirs)
        if now != seen:
            _templates_changed(wake)
        seen = now
        existing = [Path(path) for path, identity, _files in seen if identity is not None]
        try:
            if existing:
                seen = await _watch_templates(existing, dirs, seen, wake, stop, recheck)
                continue
        except (OSError, RuntimeError) as exc:  # watchfiles' internal errors are RuntimeErrors
            log.warning("templates.watch_failed", error=str(exc), retry_in_s=recheck)
        await sleep_unless(stop, recheck)


async def _watch_templates(
    existing: list[Path],
    dirs: list[Path],
    seen: TemplateStamp,
    wake: asyncio.Event,
    stop: asyncio.Event,
    recheck: float,
) -> TemplateStamp:
    """Watch ``existing`` until ``stop``, or until a directory of ``dirs`` appears, vanishes
    or is replaced; return the last stamp."""
    from watchfiles import awatch

    watch = awatch(
        *existing,
        watch_filter=_TemplateFilter(existing),
        stop_event=stop,
        debounce=50,
        step=20,
        rust_timeout=max(1, round(recheck * 1000)),
        yield_on_timeout=True,
    )
    async with contextlib.aclosing(watch) as batches:
        async for batch in batches:
            now = template_stamp(dirs)
            if batch or now != seen:
                _templates_changed(wake)
            if _identities(now) != _identities(seen):
                return now
            seen = now
    return seen


class _TemplateFilter:
    """watchfiles' filter of the template directories ``roots``: a change counts unless it
    is to an editor's own file, or lies under a hidden directory below a root
    (:func:`~provisioner.targets.templating.editor_file`), as the template stamps count."""

    def __init__(self, roots: Iterable[Path]) -> None:
        # watchfiles reports absolute paths (a relative root made absolute): each root as
        # named, made absolute, and with its links resolved.
        self.roots = sorted(
            {form for root in roots for form in (os.path.abspath(root), os.path.realpath(root))},
            key=len,
            reverse=True,
        )

    def __call__(self, _change: object, path: str) -> bool:
        for root in self.roots:
            if path.startswith(root + os.sep):
                parts = path[len(root) + 1 :].split(os.sep)
                return not any(map(editor_file, parts))
        return not editor_file(os.path.basename(path))


def _templates_changed(wake: asyncio.Event) -> None:
    log.info("templates.changed")
    wake.set()


async def poll_wakeups(interval: float, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` every ``interval`` seconds (MariaDB/MySQL have no notifications)."""
    while not await sleep_unless(stop, interval):
        wake.set()


def listen_conninfo(url: str) -> str:
    """The libpq connection string for the store ``url``: its parameters as SQLAlchemy's
    psycopg dialect passes them to the engine's connections, escaped by psycopg.  (A URI
    rendered back from the URL leaves a password's spaces raw, which libpq refuses with
    an error quoting the password, so LISTEN never worked and the password was logged.)
    With TCP keepalive and a user timeout (:data:`~provisioner.store.engine.PG_KEEPALIVE`)
    where the URL sets none: a half-open connection ends, and the poll takes over."""
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    _args, params = parsed.get_dialect()().create_connect_args(parsed)
    return psycopg.conninfo.make_conninfo(**params, **pg_keepalive(params))


#: Seconds a new LISTEN connection waits for its probe's notification (see
#: :func:`postgres_wakeups`): a local server delivers it in about a millisecond.
PROBE_TIMEOUT = 5.0

_DEAF_CAUSE = (
    "the LISTEN connection goes through a pooler in transaction or statement pooling"
    " (PgBouncer's pool_mode = transaction): notifications reach another client or none"
)
_DEAF_FIX = (
    "give the daemon a session-pooled (pool_mode = session) or direct connection to"
    " PostgreSQL in store.url"
)


async def postgres_wakeups(
    url: str,
    wake: asyncio.Event,
    stop: asyncio.Event,
    *,
    poll: float = 0.5,
    backoff_cap: float = 30.0,
    probe: Callable[[], Awaitable[None]] | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    on_deaf: Callable[[bool], None] | None = None,
) -> None:
    """Set ``wake`` on every ``NOTIFY provisioner_changes``; reconnect with capped backoff.

    After each (re)connect it sets ``wake`` once, since notifications sent while
    it was away are lost (the change feed still has the changes).  While it is not
    listening (before the first connect, and from a lost connection until ``LISTEN``
    works again, up to ``backoff_cap`` seconds apart) it sets ``wake`` every ``poll``
    seconds instead, so an edit still goes live within about ``poll``.

    After ``LISTEN`` a probe (``probe``; by default a ``pg_notify`` on the channel from a
    connection of its own, as a writer's) must be heard within ``probe_timeout`` seconds.
    One not heard (PgBouncer in transaction pooling takes ``LISTEN`` and never relays a
    notification) is said once per streak of such connections (``store.listen_deaf``,
    with the likely cause and the fix) and ``wake`` stays set every ``poll`` seconds.
    ``on_deaf`` is told each connection's outcome: True when its probe was not heard,
    False when it was (the daemon's health record carries it).
    """
    conninfo = listen_conninfo(url)
    send_probe = probe or (lambda: _notify_probe(conninfo))
    delay = 0.5
    deaf = False  # the last connection's probe was not heard
    listening = asyncio.Event()  # ends the poll of the current time away
    poller: asyncio.Future[None] | None = None
    try:
        while not stop.is_set():
            if poller is None:
                listening = asyncio.Event()
                poller = asyncio.ensure_future(_poll_until(poll, wake, stop, listening))
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")  # a constant channel name
                    heard = await _hears(conn, send_probe, probe_timeout, stop)
                    if stop.is_set():
                        break
                    if on_deaf is not None:
                        on_deaf(not heard)
                    if heard:
                        listening.set()
                        await poller
                        poller = None
                        log.info("store.listening", channel=NOTIFY_CHANNEL)
                        deaf = False
                    elif not deaf:
                        log.warning(
                            "store.listen_deaf",
                            channel=NOTIFY_CHANNEL,
                            waited_s=probe_timeout,
                            cause=_DEAF_CAUSE,
                            fix=_DEAF_FIX,
                        )
                        deaf = True
                    delay = 0.5
                    wake.set()
                    await _relay_notifies(conn, wake, stop)
            except (psycopg.Error, OSError) as exc:
                log.warning("store.listen_failed", error=str(exc), retry_in_s=round(delay, 2))
                await sleep_unless(stop, delay)
                delay = min(backoff_cap, delay * 2) * random.uniform(0.8, 1.2)  # noqa: S311
    finally:
        if poller is not None:
            listening.set()
            await poller


async def _notify_probe(conninfo: str) -> None:
    """Notify the change channel from a connection of its own, as a writer's trigger does."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, 'probe')", (NOTIFY_CHANNEL,))


async def _hears(
    conn: psycopg.AsyncConnection[object],
    probe: Callable[[], Awaitable[None]],
    timeout: float,
    stop: asyncio.Event,
) -> bool:
    """Whether ``conn``, listening, hears a notification within ``timeout`` seconds of
    ``probe`` (any notification counts: a writer's proves delivery as well).  It waits a
    second at a time, so a stop request is noticed within a second (False then)."""
    await probe()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not stop.is_set() and (left := end - loop.time()) > 0:
        async for _note in conn.notifies(timeout=min(left, 1.0), stop_after=1):
            return True
    return False


async def _poll_until(
    interval: float, wake: asyncio.Event, stop: asyncio.Event, end: asyncio.Event
) -> None:
    """Set ``wake`` every ``interval`` seconds until ``stop`` or ``end`` is set."""
    while not await wait_first(stop, end, timeout=interval):
        wake.set()


async def _relay_notifies(
    conn: psycopg.AsyncConnection[object], wake: asyncio.Event, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        # A bounded wait so a stop request is noticed within a second.
        async for _note in conn.notifies(timeout=1.0):
            wake.set()
        await conn.execute("SELECT 1")  # notices a dead server between notifications


async def coalesce(
    wake: asyncio.Event,
    *,
    quiet: float,
    max_wait: float,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """After a wake-up, wait until ``quiet`` seconds pass with no new one, or ``max_wait`` in all.

    A burst of edits thus becomes one apply, while a single edit waits only ``quiet``.
    """
    now = clock or asyncio.get_running_loop().time
    start = now()
    while True:
        wake.clear()
        remaining = max_wait - (now() - start)
        if remaining <= 0:
            return
        await sleep(min(quiet, remaining))
        if not wake.is_set():
            return
