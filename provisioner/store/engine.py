"""Opening the user store: one SQLAlchemy engine per URL, with each backend's needs."""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..config import display_url, driver_refusal
from ..errors import Problem, RealtimeUnavailable, StoreUnavailable, UrlRefused
from ..logs import get_logger

__all__ = [
    "CONFLICT_ATTEMPTS",
    "MYSQL_KEEPALIVE",
    "PG_KEEPALIVE",
    "STORE_DOWN",
    "blame",
    "blamed",
    "driver_error",
    "escaping_bytes_not_utf8",
    "exclusive",
    "file_identity",
    "is_conflict",
    "is_missing_schema",
    "mysql_lock_name",
    "open_engine",
    "open_store_engine",
    "pg_keepalive",
    "pg_lock_key",
    "reading",
    "schema_named",
    "sqlite_file",
    "store_named",
    "store_unreadable",
    "transaction",
    "unavailable",
]

log = get_logger(__name__)
_T = TypeVar("_T")

#: Failures of a store read or write worth waiting out and trying again: the database
#: refused it or is away, or every pooled connection stayed taken until the pool's
#: timeout.  Any other error is a bug.
STORE_DOWN = (DBAPIError, PoolTimeout)


def driver_error(exc: DBAPIError) -> str:
    """``<driver error type>: <first line of its message>``: what may be shown of a
    database error.  Never ``str(exc)``, which quotes the statement's parameters
    (digests), nor the lines after the first (libpq's hints: one line per message)."""
    first_line = (str(exc.orig).splitlines() or [""])[0]
    return f"{type(exc.orig).__name__}: {first_line}"


#: The start of sqlite3's message for a text value whose bytes are not UTF-8.
_NOT_UTF8 = "Could not decode to UTF-8"


def escaping_bytes_not_utf8(conn: Connection, read: Callable[[], _T]) -> _T:
    """``read()``, which only reads on ``conn``; on SQLite, when it meets a text value whose
    bytes are not UTF-8 (another application's Latin-1: SQLite stores text unchecked), it
    runs again with every such byte read as Python's escape of it (U+DC80 to U+DCFF,
    ``surrogateescape``) instead of failing the whole read.  The model's rules refuse such
    a value as not text, so the render skips that one user and a listing shows the escape.

    Only that retry decodes in Python (the connection's text factory, restored after): a
    text factory for every read would cost about 150 ms per million values.  PostgreSQL
    and MariaDB refuse or convert such bytes when written, so they never raise this."""
    try:
        return read()
    except DBAPIError as exc:
        if not (isinstance(exc.orig, sqlite3.OperationalError) and _NOT_UTF8 in str(exc.orig)):
            raise
    raw: Any = conn.connection.dbapi_connection
    before = raw.text_factory
    raw.text_factory = _escaped_text
    try:
        return read()
    finally:
        raw.text_factory = before


def _escaped_text(value: bytes) -> str:
    """SQLite text as Python reads text that is not in its character set: UTF-8, each
    byte that is not as its escape."""
    return value.decode("utf-8", "surrogateescape")


#: Times :func:`transaction` runs a write that a database ended as a deadlock's victim.
CONFLICT_ATTEMPTS = 4
#: PostgreSQL's SQLSTATEs for a deadlock victim and a serialization failure.
_PG_CONFLICTS = frozenset({"40P01", "40001"})
#: MariaDB/MySQL's error numbers for a deadlock victim (ER_LOCK_DEADLOCK) and a lock wait
#: timeout (ER_LOCK_WAIT_TIMEOUT).
_MYSQL_CONFLICTS = frozenset({1213, 1205})

#: Execution option that makes a SQLite connection's transactions plain (deferred)
#: ``BEGIN``s: see :func:`reading`.
_READ_ONLY = "provisioner_read_only"
#: Key of a SQLite connection's record: the (device, inode) of the file it opened.
_FILE = "provisioner_file"

#: A file's identity: its device and inode numbers.
FileIdentity = tuple[int, int]

#: libpq's TCP settings for every PostgreSQL connection (the engine's and the LISTEN
#: one) the store URL does not set: keepalive probes after 10 s idle, every 5 s, 3 of
#: them, and at most 30 s (milliseconds here) for sent data to be acknowledged.  A
#: server host gone without a FIN or RST (a half-open connection) then ends the
#: connection within about 30 s; libpq's defaults (the kernel's: 2 h idle, and about
#: 15 min of retransmissions of unacknowledged data) had the LISTEN connection's
#: ``SELECT 1`` hang meanwhile, waking nobody, and a pooled connection's ping hold an
#: apply until ``daemon.stuck_after``.
PG_KEEPALIVE: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


#: The same TCP settings for every MariaDB/MySQL connection (pymysql has no parameters
#: for them: set on its socket as it connects).  pymysql turns SO_KEEPALIVE on with the
#: kernel's timings (2 h idle) and no read timeout, so a server host gone silent left a
#: read (a ping, a reconcile, a registration write) waiting about 15 min, the daemon's
#: loop with it.  No read timeout either: it would end a legitimate long wait, as
#: ``GET_LOCK``'s (up to :data:`EXCLUSIVE_WAIT`) or a schema upgrade's ``ALTER TABLE``,
#: while keepalive probes end only a connection whose server no longer answers.
MYSQL_KEEPALIVE: dict[str, float] = {
    "idle": 10,
    "interval": 5,
    "count": 3,
    "user_timeout": 30.0,
}


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite ``url`` names, or None (another database, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def file_identity(path: Path) -> FileIdentity | None:
    """The (device, inode) of the file ``path`` names now (through symbolic links), or
    None when there is none.  Another identity than a connection's means the file was
    replaced (a backup moved over it): the connection still reads the old, unlinked one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino)


class StoreOptions(Protocol):
    """How to connect to a database: the ``[store]`` settings but its URL."""

    @property
    def busy_timeout(self) -> float: ...
    @property
    def pool_size(self) -> int: ...
    @property
    def pool_timeout(self) -> float: ...


def open_store_engine(
    url: str, options: StoreOptions, *, create: bool = True, field: str = "store.url"
) -> Engine:
    """:func:`open_engine` for ``url`` (the config key ``field``) with ``options``
    (``config.store``): its busy timeout and its pool's size and checkout timeout."""
    return open_engine(
        url,
        busy_timeout=options.busy_timeout,
        create=create,
        pool_size=options.pool_size,
        pool_timeout=options.pool_timeout,
        field=field,
    )


#: Every engine's database errors leave out the statement's parameters (SQLAlchemy's
#: ``hide_parameters``): the code never shows ``str(exc)`` (:func:`driver_error`), but a
#: library's own record does, its traceback quoting each chained error whole (the pool
#: failing to reset a connection while an INSERT's error is handled), and the
#: parameters are SIP digests.
HIDE_PARAMETERS = True


def open_engine(
    url: str,
    *,
    busy_timeout: float = 10.0,
    create: bool = True,
    pool_size: int = 5,
    pool_timeout: float = 30.0,
    field: str = "store.url",
) -> Engine:
    """An engine for ``url``, the config key ``field``.

    Its pool keeps ``pool_size`` connections open (SQLAlchemy may open 10 more for a
    burst), and a checkout when every one is taken waits ``pool_timeout`` seconds, then
    raises :data:`PoolTimeout`; a SQLite file's pool too.  A SQLite URL naming no file
    path (in memory, a ``file:`` URI) keeps SQLAlchemy's own pool for it.

    SQLite gets WAL (readers never block the writer), enforced foreign keys, a
    busy timeout, and ``BEGIN IMMEDIATE`` for every transaction but those of
    :func:`reading`, so two writers queue on the lock instead of deadlocking on a
    read-to-write upgrade.  A pooled SQLite connection whose file is no longer the one
    the path names (a backup moved over it) is never handed out: the pool's idle
    connections are closed, and a new one opens the file the path names.

    With ``create`` (the default) a SQLite file that does not exist is created at the
    first connection, and its parent directory at once, so ``sqlite:///var/provisioner.db``
    works on a fresh checkout; one that cannot be raises :class:`StoreUnavailable`.
    Without it (commands that only read) nothing is created: a file that does not exist
    raises :class:`StoreUnavailable` naming it, and every connection opens the file
    read-write only if it is there (SQLite's ``mode=rw``), so one removed meanwhile is an
    error, not a new empty store.  Other databases are unaffected.

    A connect the driver refuses for the parameters ``url`` gives it, before any byte
    reaches a server, raises :class:`UrlRefused` on ``field`` (:func:`_refusals_named`).
    """
    path = sqlite_file(url)
    if path is not None:
        if create:
            _make_parent(path)
        elif not path.exists():
            raise StoreUnavailable(
                f"user store unavailable: no database file at {path} "
                "(run `provisioner db upgrade` to create it)"
            )
        engine = create_engine(
            url,
            hide_parameters=HIDE_PARAMETERS,
            connect_args={"timeout": busy_timeout, "isolation_level": None},
            pool_size=pool_size,
            pool_timeout=pool_timeout,
        )
        _sqlite_events(engine, path, busy_timeout)
        if create:
            _sqlite_creates_private(engine, path)
        else:
            _sqlite_never_creates(engine, path)
        _refusals_named(engine, url, field)
        return engine
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": HIDE_PARAMETERS}
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":  # in memory, SQLAlchemy's takes no timeout
        kwargs.update(pool_size=pool_size, pool_timeout=pool_timeout)
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = pg_keepalive(parsed.query)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name in ("mysql", "mariadb") and engine.dialect.driver == "pymysql":
        event.listen(engine, "connect", _mysql_keepalive)
    _refusals_named(engine, url, field)
    return engine


#: What a driver raises, not being a database error, for a connect argument it cannot
#: take (pymysql: ``TypeError`` for an unknown one, ``AttributeError`` for an unknown
#: ``charset``; a bad value: ``ValueError``, ``KeyError``, ``LookupError``).
_ARGUMENT_ERRORS = (TypeError, ValueError, AttributeError, LookupError)


def _refusals_named(engine: Engine, url: str, field: str) -> None:
    """Have each connect of ``engine`` (the last of its ``do_connect`` listeners, so after
    those that adjust the arguments) that the driver refuses for the parameters ``url``
    gives it raise :class:`UrlRefused` on ``field``, in the driver's words
    (:func:`~provisioner.config.driver_refusal`) with the URL fit to show: the driver's
    own error (pymysql's is not a database error) was a traceback from every command and
    a daemon restarted for ever, and libpq's ``ProgrammingError`` (an unknown option, a
    bad value) a store outage retried for ever.  Every other database error passes as it
    is (SQLAlchemy wraps it)."""
    dialect = engine.dialect
    dbapi: Any = dialect.loaded_dbapi

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except dbapi.ProgrammingError as exc:
            # At a connect, the URL's: libpq's unknown option or bad value (refused before
            # any exchange), MariaDB's wrong database name or init_command.
            raise _refused(field, url, exc) from None
        except dbapi.Error:
            raise
        except _ARGUMENT_ERRORS as exc:
            raise _refused(field, url, exc) from None


def _refused(field: str, url: str, exc: Exception) -> UrlRefused:
    rule = f"its driver refused its parameters ({display_url(url)}): {driver_refusal(exc, url)}"
    return UrlRefused([Problem(field, rule)])


def _mysql_keepalive(dbapi_conn: Any, _record: Any) -> None:
    """Set :data:`MYSQL_KEEPALIVE` on the TCP socket of a new pymysql connection (one
    through a local Unix socket has no TCP to watch)."""
    sock = getattr(dbapi_conn, "_sock", None)  # pymysql's, set by its connect()
    if not isinstance(sock, socket.socket) or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(MYSQL_KEEPALIVE["idle"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(MYSQL_KEEPALIVE["interval"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(MYSQL_KEEPALIVE["count"]))
    user_timeout_ms = int(MYSQL_KEEPALIVE["user_timeout"] * 1000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)


def _make_parent(path: Path) -> None:
    """Make the directory of the SQLite file ``path`` (and those above it) where missing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a typo'd or forbidden path: said so, not a traceback
        raise StoreUnavailable(
            f"cannot make the directory {str(path.parent)!r} of the SQLite database: "
            f"{exc.strerror or exc}"
        ) from None


#: The mode a SQLite file is made with (never wider: a stricter umask narrows it).  The
#: store holds the SIP digests (with one, anyone registers as that phone), password and
#: API-key hashes: not for other local users, whatever the umask of whoever ran
#: ``db upgrade`` (022 makes SQLite's own 0644).  SQLite gives its ``-wal`` and ``-shm``
#: files the database file's mode.
SQLITE_FILE_MODE = 0o640


def _sqlite_creates_private(engine: Engine, path: Path) -> None:
    """Have ``engine`` make a missing ``path`` itself, mode :data:`SQLITE_FILE_MODE`, just
    before a connection would (an empty file is an empty SQLite database)."""

    @event.listens_for(engine, "do_connect")
    def _create_private(_dialect: Any, _record: Any, _cargs: list[Any], _cparams: Any) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            os.close(os.open(path, flags, SQLITE_FILE_MODE))
        except FileExistsError:
            pass  # there already (the usual case): its mode is its owner's choice
        except OSError:
            # Not ours to make (a read-only directory, say): SQLite's own open fails
            # the same way and says so as the store being unavailable.
            pass


def _sqlite_never_creates(engine: Engine, path: Path) -> None:
    """Have every connection of ``engine`` open ``path`` as a SQLite URI with ``mode=rw``:
    an existing file only (read-only if the system forbids writing), never a new one."""

    @event.listens_for(engine, "do_connect")
    def _existing_only(_dialect: Any, _record: Any, cargs: list[Any], cparams: Any) -> None:
        # as_uri() percent-encodes what a URI cannot hold as is (``?``, ``#``, ``%``).
        cargs[0] = Path(os.path.abspath(path)).as_uri() + "?mode=rw"
        cparams["uri"] = True


def pg_keepalive(given: Mapping[str, object]) -> dict[str, str]:
    """The :data:`PG_KEEPALIVE` settings not in ``given`` (a store URL's parameters):
    the URL's own win."""
    return {key: value for key, value in PG_KEEPALIVE.items() if key not in given}


def _sqlite_events(engine: Engine, path: Path, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")  # an int from config
        cur.close()
        record.info[_FILE] = file_identity(path)

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        now = file_identity(path)
        if now is None or record.info.get(_FILE) == now:
            return  # the same file (or none for the moment: a restore under way)
        log.warning("store.file_replaced", path=str(path))
        # The idle connections to the old file closed before a new one opens.
        engine.pool.dispose()
        raise InvalidatePoolError("the SQLite file was replaced")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def reading(engine: Engine) -> Connection:
    """A connection for transactions that only read.

    On SQLite they begin deferred: a snapshot of the WAL, taking no lock, so a long read
    (loading 100,000 users for a reconcile) never makes a writer (the CLI, the
    registration flusher) wait.  Nothing stops a write on it, but a write would risk the
    read-to-write deadlock that ``BEGIN IMMEDIATE`` avoids: only read through it.  Other
    databases are unaffected.
    """
    return engine.connect().execution_options(**{_READ_ONLY: True})


def is_conflict(exc: DBAPIError) -> bool:
    """True when the database ended the transaction because it met another one (a
    deadlock, a serialization failure, a lock wait timed out): nothing it did remains,
    and running it again is the documented answer.  Pure: it reads the driver's code."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _PG_CONFLICTS:  # psycopg
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _MYSQL_CONFLICTS  # pymysql: (errno, message)


#: What a table or a column missing looks like: PostgreSQL's SQLSTATEs (undefined table,
#: undefined column), MariaDB/MySQL's error numbers (ER_NO_SUCH_TABLE,
#: ER_BAD_FIELD_ERROR) and the start of SQLite's message.
_PG_MISSING = frozenset({"42P01", "42703"})
_MYSQL_MISSING = frozenset({1146, 1054})
_SQLITE_MISSING = ("no such table", "no such column")


def is_missing_schema(exc: DBAPIError) -> bool:
    """True when the database refused a statement for a table or a column it does not have:
    a store never upgraded, or upgraded by an older provisioner.  Pure: it reads the
    driver's code (SQLite's message)."""
    orig = exc.orig
    args: tuple[Any, ...] = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # pymysql: (errno, message), its SQLSTATE too vague
        return args[0] in _MYSQL_MISSING
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:  # psycopg
        return sqlstate in _PG_MISSING
    return str(orig).startswith(_SQLITE_MISSING)


def unavailable(exc: DBAPIError) -> StoreUnavailable:
    """The :class:`StoreUnavailable` to raise for ``exc``, a database error of the user store:
    ``user store unavailable: <the driver's first line>``, with the fix when the schema is
    missing or old (:func:`is_missing_schema`).  Never ``str(exc)`` (the statement's
    parameters)."""
    detail = (str(exc.orig) or type(exc.orig).__name__).splitlines()[0]
    hint = " (is the schema missing or old? run `provisioner db upgrade`)"
    return StoreUnavailable(
        f"user store unavailable: {detail}{hint if is_missing_schema(exc) else ''}"
    )


@contextmanager
def schema_named(engine: Engine) -> Iterator[None]:
    """Errors inside pass as they are, but a table or column missing while the store's schema
    is not at this provisioner's revision (never upgraded, or by another version) becomes the
    :class:`StoreUnavailable` every command reading the store through
    :class:`~provisioner.accounts.Accounts` raises, with the same message (:func:`unavailable`);
    one of a realtime target's own tables stays a database error."""
    try:
        yield
    except DBAPIError as exc:
        if is_missing_schema(exc) and not _store_current(engine):
            raise unavailable(exc) from None
        raise


@contextmanager
def store_named(engine: Engine, target_url: str | None = None) -> Iterator[None]:
    """:func:`schema_named`, and a database error said by whose it is (:func:`blamed`):
    the user store on ``engine`` that cannot be read (its server away, its SQLite file no
    database or no file) is the :class:`StoreUnavailable`
    :class:`~provisioner.accounts.Accounts` raises, in the store's own words
    (:func:`store_unreadable`); otherwise, with ``target_url`` (a realtime target's own
    database), that database's :class:`RealtimeUnavailable`.  ``render``, ``sync``,
    ``run --burst`` say it as ``user list`` and the daemon do.  Any other error while the
    store reads stays a database error."""
    with schema_named(engine):
        try:
            yield
        except DBAPIError as exc:
            fault = blamed(engine, exc, target_url)
            if fault is not None:
                raise fault from None
            raise


def blame(
    exc: DBAPIError, store: StoreUnavailable | None, target_url: str | None
) -> StoreUnavailable | None:
    """Whose failure the database error ``exc`` is, as the error to report, or None when
    it stays a plain database error.  ``store`` is what the user store said when asked
    after ``exc`` (:func:`store_unreadable`: None when it reads); ``target_url`` the
    realtime target's own database (``target.url``), None when there is none (a config
    file, or realtime rows in the user store's database).

    The store failing too is the store's (:class:`StoreUnavailable`): with it down nothing
    else can be told.  Else, with a database of its own, the target's
    (:class:`RealtimeUnavailable`, ``realtime database unavailable (target.url URL):
    <driver error>``, the URL's password hidden).  Pure: the one place every command and
    the daemon decide it."""
    if store is not None:
        return store
    if target_url:
        shown = display_url(target_url)
        return RealtimeUnavailable(
            f"realtime database unavailable (target.url {shown}): {driver_error(exc)}"
        )
    return None


def blamed(engine: Engine, exc: DBAPIError, target_url: str | None) -> StoreUnavailable | None:
    """:func:`blame`, the user store on ``engine`` asked (:func:`store_unreadable`).
    Blocking."""
    return blame(exc, store_unreadable(engine), target_url)


def store_unreadable(engine: Engine) -> StoreUnavailable | None:
    """The :class:`StoreUnavailable` (:func:`unavailable`) of the user store on ``engine``
    failing to read one user row, None when it reads, or fails only for a table it lacks
    (:func:`schema_named` says that one).  Asked after an error, to tell whose it was: a
    ``SELECT 1`` would not do, SQLite answers it without reading its file.  Blocking."""
    from .schema import users

    try:
        with engine.connect() as conn:
            conn.execute(select(users.c.id).limit(1)).all()
    except DBAPIError as exc:
        return None if is_missing_schema(exc) else unavailable(exc)
    return None


def _store_current(engine: Engine) -> bool:
    """Whether the store's schema is at this provisioner's newest revision (not when it
    cannot be read)."""
    from .migrate import current_revision, head_revision

    try:
        return current_revision(engine) == head_revision()
    except DBAPIError:
        return False


def transaction(
    engine: Engine, write: Callable[[Connection], _T], *, attempts: int = CONFLICT_ATTEMPTS
) -> _T:
    """``write(conn)`` in one transaction, committed; run again (at most ``attempts``
    times in all, after a short random pause that grows) when the database ends it as
    the victim of a conflict with another writer (:func:`is_conflict`): on MariaDB two
    registration writes of different servers over the same users deadlock now and then.
    Any other error, or the last conflict, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return write(conn)
        except DBAPIError as exc:
            if attempt == attempts or not is_conflict(exc):
                raise
            log.info("store.conflict_retry", attempt=attempt, error=type(exc.orig).__name__)
            # Apart again, at random: the two writers must not meet the same way twice.
            time.sleep(random.uniform(0.0, 0.005 * 2**attempt))  # noqa: S311 (not crypto)
    raise AssertionError("unreachable")  # the loop returns or raises


#: Seconds a writer waits for :func:`exclusive`'s lock before giving up with
#: :class:`StoreUnavailable` (the daemon retries; the command line exits 7): a writer
#: stuck in its transaction (a suspended ``sync --once``) must not hold the others for
#: ever.  A full sync of 100k users takes a few seconds.
EXCLUSIVE_WAIT = 120


def pg_lock_key(name: str) -> int:
    """PostgreSQL's advisory lock key of the lock ``name``: its CRC-32, the same in
    every process.  Below 2**32, so ``pg_locks`` shows it as taken with one bigint:
    ``classid`` 0 (the high 32 bits), ``objid`` the key (the low 32), ``objsubid`` 1."""
    return zlib.crc32(name.encode())


def mysql_lock_name(name: str) -> ColumnElement[str]:
    """MariaDB/MySQL's ``GET_LOCK`` name of the lock ``name`` (an SQL expression): its
    first 24 characters, ``:`` and the MD5 of the current database's name, at most 64
    characters.  ``GET_LOCK`` names are the server's: this one is the database's."""
    return func.concat(name[:24], ":", func.md5(func.database()))


@contextmanager
def exclusive(conn: Connection, name: str) -> Iterator[None]:
    """One transaction on ``conn`` (committed at the end of the ``with``, rolled back on
    an error) holding the lock ``name`` of this database from its start until it has
    ended: two writers taking it run one after the other, the second reading what the
    first committed.  Waiting is logged (``store.writer_waits``).

    A writer that waits longer than :data:`EXCLUSIVE_WAIT` gives up with
    :class:`StoreUnavailable` naming the lock, having written nothing.

    PostgreSQL: a transaction-level advisory lock (the commit releases it).
    MariaDB/MySQL: ``GET_LOCK`` (named after the database: the name is the server's) is
    the session's, released once the transaction is over; a connection that cannot
    release it is invalidated, so its session, and the lock, end.  SQLite: no lock, its
    writes already begin ``IMMEDIATE`` and queue on the file's lock.
    """
    dialect = conn.dialect.name
    if dialect not in ("mysql", "mariadb"):
        with conn.begin():
            if dialect == "postgresql":
                _pg_lock(conn, name)
            yield
        return
    lock = mysql_lock_name(name)
    try:
        with conn.begin():
            _mysql_lock(conn, name, lock)
            yield
    finally:
        _release(conn, lock)


#: PostgreSQL's SQLSTATE for a lock not granted within ``lock_timeout``.
_PG_LOCK_TIMEOUT = "55P03"


def _pg_lock(conn: Connection, name: str) -> None:
    key = pg_lock_key(name)
    if conn.execute(select(func.pg_try_advisory_xact_lock(key))).scalar():
        return
    log.warning("store.writer_waits", lock=name)
    # The wait bounded like MariaDB's, for this statement only: the transaction's other
    # statements keep the session's lock_timeout.
    before = conn.execute(select(func.current_setting("lock_timeout"))).scalar_one()
    conn.execute(select(func.set_config("lock_timeout", f"{EXCLUSIVE_WAIT * 1000}", True)))
    try:
        conn.execute(select(func.pg_advisory_xact_lock(key)))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _PG_LOCK_TIMEOUT:
            raise _held_too_long(name) from None
        raise
    conn.execute(select(func.set_config("lock_timeout", before, True)))


def _held_too_long(name: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"another writer held the lock {name!r} for {EXCLUSIVE_WAIT} s: nothing written"
    )


def _mysql_lock(conn: Connection, name: str, lock: ColumnElement[str]) -> None:
    if conn.execute(select(func.get_lock(lock, 0))).scalar():
        return
    log.warning("store.writer_waits", lock=name)
    if not conn.execute(select(func.get_lock(lock, EXCLUSIVE_WAIT))).scalar():
        raise _held_too_long(name)


def _release(conn: Connection, lock: ColumnElement[str]) -> None:
    """Release a MariaDB/MySQL ``GET_LOCK`` of ``conn``'s session (not held: nothing)."""
    try:
        conn.execute(select(func.release_lock(lock)))
        conn.rollback()  # the transaction the statement began
    except DBAPIError:
        conn.invalidate()  # the session ends, and the lock with it
