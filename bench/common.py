"""Helpers shared by the benchmark scripts (scripts, not tests).

Generated users (:func:`make_users`), a throwaway database's engine, a user store
seeded with them in one transaction, timing, peak RSS and table printing.
"""

from __future__ import annotations

import hashlib
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import Engine, Select, func, insert, select

from provisioner.model import User, Voice
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.store.queries import insert_profile
from provisioner.store.schema import registration_summary
from provisioner.store.schema import users as users_table
from tests.dbs import temp_database

__all__ = [
    "Column",
    "DirectReader",
    "StoredProbe",
    "make_users",
    "peak_rss_mb",
    "percentile",
    "print_header",
    "print_row",
    "seed_store",
    "temp_database",
    "temp_engine",
    "timed",
]

T = TypeVar("T")
#: (figure name, format of one value); the header is the name, right-aligned.
Column = tuple[str, str]


def make_users(count: int, realm: str = "asterisk") -> list[User]:
    """``count`` valid users with varied voice settings, extensions from 100000."""
    users = []
    transports = ("udp", "udp", "udp", "tcp", "wss")
    for i in range(count):
        name = f"user{i}"
        secret = f"{name}:{realm}:secret{i}".encode()
        users.append(
            User(
                id=i + 1,
                role="user",
                username=name,
                full_name=f"Agent Number {i}",
                email=f"{name}@example.com",
                extension=str(100000 + i),
                voice=Voice(transport=transports[i % 5], nat="yes" if i % 3 else "no"),
                sip_realm=realm,
                sip_md5=hashlib.md5(secret).hexdigest(),  # noqa: S324 (SIP digest, by design)
                sip_sha256=hashlib.sha256(secret).hexdigest(),
            )
        )
    return users


@contextmanager
def temp_engine(backend: str, scratch: Path) -> Iterator[Engine]:
    """An engine on a brand-new empty database of ``backend`` (a SQLite file goes in
    ``scratch``); the engine is disposed, then the database dropped, on leaving."""
    with temp_database(backend, scratch) as url:
        engine = open_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


class DirectReader:
    """Reads for a bench's polls, as cheap as a query can be: statements compiled once
    (:meth:`prepare`) and run on a DBAPI connection of the reader's own in autocommit, so
    each reads what is committed, with no transaction to end.

    The benches poll every millisecond or few beside the daemon they measure (in
    ``bench_registration`` from its very process, taking the GIL from its event loop; in
    ``bench_daemon`` from the event loop that also stamps the fake Asterisk's actions).
    Through a pooled SQLAlchemy connection with a rollback after each poll, a poll took
    0.3-0.7 ms of CPU on this VM, and ``bench_registration``'s poller 7-12% of its
    process's CPU in a 50k storm; this way 0.002-0.13 ms.  A context manager: the
    connection is closed on leaving (never put back in the pool in autocommit).
    """

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        fairy = engine.raw_connection()
        fairy.detach()
        dbapi = fairy.dbapi_connection
        assert dbapi is not None  # a connection just checked out
        self._dbapi = dbapi
        self.dialect.set_isolation_level(dbapi, "AUTOCOMMIT")
        self._cursor = dbapi.cursor()

    def prepare(self, query: Select[Any]) -> tuple[str, Any]:
        """``query``'s SQL text for the driver and its parameters in the driver's style (a
        tuple for positional styles, else a dict).  No LIMIT or IN list: some dialects
        render those as parameters compiled in late."""
        compiled = query.compile(dialect=self.dialect)
        params = compiled.construct_params()
        if compiled.positiontup is not None:
            return str(compiled), tuple(params[name] for name in compiled.positiontup)
        return str(compiled), params

    def scalar(self, statement: tuple[str, Any]) -> Any:
        """The first column of the first row ``statement`` (from :meth:`prepare`) reads
        now; ``None`` when it reads no row."""
        self._cursor.execute(*statement)
        row = self._cursor.fetchone()
        self._cursor.fetchall()  # nothing left unread for the next statement
        return None if row is None else row[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cursor.close()
        self._dbapi.close()


class StoredProbe(DirectReader):
    """Whether a store holds a registration burst: ``server``'s summary of user ``last``
    has contacts (a point query; the burst's last event is that user's, and its batch
    commits after every earlier one), then at least ``total`` of the server's summaries
    do (a count, run only once the point query holds).  Polled through a storm, so a
    :class:`DirectReader`."""

    def __init__(self, engine: Engine, server: str, last: int, total: int) -> None:
        super().__init__(engine)
        summary = registration_summary.c
        held = (summary.server == server, summary.contacts.is_not(None))
        # (user_id, server) is the primary key: at most one row, no LIMIT needed.
        self._last = self.prepare(select(summary.user_id).where(*held, summary.user_id == last))
        self._count = self.prepare(select(func.count()).where(*held))
        self.total = total

    def held(self) -> bool:
        """Whether the store holds the whole burst now."""
        if self.scalar(self._last) is None:
            return False
        return int(self.scalar(self._count)) >= self.total


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) of ``values``, interpolated; NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[min(98, max(0, round(pct) - 1))]


def _width(name: str, fmt: str) -> int:
    return max(len(name), len(fmt.format(0)))


def print_header(title: str, columns: Sequence[Column]) -> None:
    """Print ``== title`` and the column names, right-aligned to their values' width."""
    print(f"\n== {title}")
    print(" ".join(f"{name:>{_width(name, fmt)}}" for name, fmt in columns), flush=True)


def print_row(columns: Sequence[Column], row: dict[str, Any]) -> None:
    """Print one row under :func:`print_header`'s columns (``-`` for a missing figure)."""
    cells = []
    for name, fmt in columns:
        value = row.get(name)
        cells.append(f"{'-' if value is None else fmt.format(value):>{_width(name, fmt)}}")
    print(" ".join(cells), flush=True)


def user_rows(people: Sequence[User], profile_id: int, now: datetime) -> list[dict[str, Any]]:
    """``people`` as rows of the store's ``users`` table (role user, profile ``profile_id``)."""
    return [
        {
            "id": u.id,
            "role": "user",
            "profile_id": profile_id,
            "username": u.username,
            "username_key": u.username.lower(),
            "full_name": u.full_name,
            "email": u.email,
            "extension": u.extension,
            "sip_realm": u.sip_realm,
            "sip_md5": u.sip_md5,
            "sip_sha256": u.sip_sha256,
            "transport": u.voice.transport,
            "nat": u.voice.nat,
            "created_at": now,
            "updated_at": now,
        }
        for u in people
    ]


def seed_store(engine: Engine, count: int) -> list[User]:
    """Migrate the store at ``engine`` and insert ``count`` generated users (ids 1..count,
    extensions from 100000, profile ``agents``) in one transaction; return them."""
    upgrade(engine)
    people = make_users(count)
    now = datetime(2026, 1, 1)
    with engine.begin() as conn:
        profile = insert_profile(conn, "agents", "bench", now)
        rows = user_rows(people, profile.id, now)
        for i in range(0, len(rows), 5000):
            conn.execute(insert(users_table), rows[i : i + 5000])
    return people
