"""Benchmark of registration-event ingestion, socket to store (a script, not a test).

    .venv/bin/python -m bench.bench_registration --events 10000 50000 --backend sqlite postgresql

For each backend (``mariadb`` too, on request) and size N it seeds a throwaway store
with N users (extensions from 100000), runs an :class:`~provisioner.ami.pbx.AmiPbx` in
this process against a fake Asterisk (``tests/amipeer.py``) over a real socket, waits
for the connect snapshot, then has the peer send N recorded ``ContactStatus`` events
(``send_burst``, one per user) and reports ``rate``: events/s from the first byte sent
until the store's summaries hold all N contacts (``contacts``) (target >= 50,000/s);
``restart_rate``: the same burst again after the peer's state is reset as on a
reconnect to a restarted Asterisk (every summary in the store, set offline; no
contact), the storm met in production.  ``cpu_us`` and ``restart_cpu_us``: this
process's CPU per event during each burst, in microseconds (every thread's; on SQLite
the store's work is in it, on PostgreSQL and MariaDB the server's is not), which the
other work of a shared machine moves far less than the rates.  The peer runs in this
process, so its sending counts against the rate and the CPU (about 1.5 µs an event);
the daemon bench (``bench_daemon``) measures the same with the daemon in a process of
its own (its ``reg_cpu_us`` is the daemon's alone).

``--stages`` also times each stage of the path alone on the same N events, in
microseconds per event (CPU time of this process, the least noisy figure on a shared
machine, garbage collector off; ``wall`` adds the database server's time): ``decode`` (bytes to AMI
messages), ``fold`` (client dispatch and the per-endpoint book), ``rows`` (the
flusher's row tuples) and ``store`` (one ``write_endpoint_rows`` transaction of all N
endpoints, first write and rewrite).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, create_engine, func, select

from provisioner.ami.actions import AmiMessage, FrameDecoder
from provisioner.ami.client import AmiClient
from provisioner.ami.pbx import AmiPbx, Link, rows
from provisioner.ami.reload import PjsipOps, ReloadCoordinator
from provisioner.logs import configure
from provisioner.store.engine import reading
from provisioner.store.registrations import replace_server_snapshot, write_endpoint_rows
from provisioner.store.schema import registration_summary
from tests.amipeer import FakeAsterisk, fast_settings, running, server_for

from .common import Column, StoredProbe, print_header, print_row, seed_store, temp_engine
from .machine import describe

__all__ = ["main", "run_one"]

COLUMNS: list[Column] = [
    ("backend", "{:>10}"),
    ("events", "{:>7d}"),
    ("seconds", "{:>7.2f}"),
    ("rate", "{:>8.0f}"),
    ("cpu_us", "{:>6.1f}"),
    ("restart_s", "{:>9.2f}"),
    ("restart_rate", "{:>12.0f}"),
    ("restart_cpu_us", "{:>14.1f}"),
]


def _stored(conn: Connection, server: str) -> int:
    """How many summaries of ``server`` hold contacts (a burst: one a user)."""
    query = select(func.count()).where(
        registration_summary.c.server == server, registration_summary.c.contacts.is_not(None)
    )
    return int(conn.execute(query).scalar_one())


def _wait_stored(engine: Engine, server: str, last_user: int, total: int, timeout: float) -> float:
    """Poll until ``total`` contacts of ``server`` are stored (``last_user``'s among them);
    the time the poll that found them began (its queries' snapshot is taken after it:
    they were all stored by then, and the count's own time is not the daemon's).

    Runs in one thread for the whole burst, a poll every 2 ms, each as cheap as a query
    can be (:class:`~bench.common.StoredProbe`): this thread shares the GIL with the
    event loop being measured (through a pooled connection with a rollback per poll,
    the poller took 7-12% of this process's CPU in a 50k storm, and a poll every 5 ms
    through ``asyncio.to_thread`` with a pool checkout 8% of the event loop's thread).
    The probe reads in autocommit: on SQLite no write lock, so a poll never makes the
    flusher wait."""
    deadline = time.perf_counter() + timeout
    with StoredProbe(engine, server, last_user, total) as probe:
        while True:
            polled = time.perf_counter()
            if probe.held():
                return polled
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{total} registrations not stored in {timeout} s")
            time.sleep(0.002)


async def _measure(engine: Engine, count: int) -> tuple[Burst, Burst]:
    """A burst into a store with no registration state (the first), and the same burst
    after a reconnect to a restarted Asterisk (every summary there, set offline, every
    contact gone): the storm the daemon meets in production."""
    peer = FakeAsterisk()
    await peer.start()
    settings = fast_settings(action_timeout=30.0)
    client = AmiClient(server_for(peer), settings)
    link = Link("lab", client, ReloadCoordinator(client, settings), PjsipOps(client))
    pbx = AmiPbx([link], engine, "realtime")
    try:
        async with running(pbx):
            deadline = time.perf_counter() + 30
            while link.last_snapshot == 0.0 or not client.health().connected:
                if time.perf_counter() > deadline:
                    raise TimeoutError("no AMI session")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # the connect snapshot written
            first = await _burst(engine, peer, count)
            # Asterisk restarted: the reconnect's snapshot holds no contact.  Written in a
            # thread, as the daemon writes: the event loop is the AMI client's.
            await asyncio.to_thread(_restarted, engine)
            again = await _burst(engine, peer, count)
    finally:
        await peer.stop()
    return first, again


def _restarted(engine: Engine) -> None:
    """The store as after a reconnect to a restarted Asterisk that holds no contact."""
    with engine.begin() as conn:
        replace_server_snapshot(conn, "lab", {}, datetime.now())


class Burst(NamedTuple):
    """One burst: seconds from its first byte until every contact was counted stored, and
    this process's CPU seconds meanwhile (every thread's: the peer's sending included)."""

    seconds: float
    cpu: float


async def _burst(engine: Engine, peer: FakeAsterisk, count: int) -> Burst:
    """A burst of ``count`` events (one per user) until every contact is counted stored."""
    with reading(engine) as conn:
        before = _stored(conn, "lab")
    # As the daemon does after its full reconcile (daemon._settle_heap): what lives on is
    # exempt from collections; the storm's own objects are not.
    gc.collect()
    gc.freeze()
    try:
        cpu, began = time.process_time(), time.perf_counter()
        await peer.send_burst(count)
        done = await asyncio.to_thread(_wait_stored, engine, "lab", count, before + count, 600)
        used = time.process_time() - cpu
    finally:
        gc.unfreeze()
    return Burst(done - began, used)


def run_one(backend: str, count: int, scratch: Path) -> dict[str, Any]:
    """Seconds and events/s for ``count`` events into a fresh store of ``count`` users."""
    with (
        tempfile.TemporaryDirectory(dir=scratch) as name,
        temp_engine(backend, Path(name)) as engine,
    ):
        seed_store(engine, count)
        took, again = asyncio.run(_measure(engine, count))
    return {
        "backend": backend,
        "events": count,
        "seconds": took.seconds,
        "rate": count / took.seconds,
        "cpu_us": took.cpu / count * 1e6,
        "restart_s": again.seconds,
        "restart_rate": count / again.seconds,
        "restart_cpu_us": again.cpu / count * 1e6,
    }


STAGE_COLUMNS: list[Column] = [
    ("backend", "{:>10}"),
    ("events", "{:>7d}"),
    ("stage", "{:>14}"),
    ("cpu_us", "{:>7.2f}"),
    ("wall_us", "{:>7.2f}"),
]


def _timed_stage(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its CPU seconds (this process) and wall seconds, with the cyclic garbage
    collector off: a stage alone holds all N events' objects at once, so collections
    land at random and swamp the difference between runs (the socket-to-store rate
    includes them)."""
    gc.collect()
    gc.disable()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        return result, time.process_time() - cpu, time.perf_counter() - wall
    finally:
        gc.enable()


def _burst_bytes(count: int) -> bytes:
    """What ``send_burst(count)`` sends: the recorded ContactStatus, endpoint numbered."""
    template = FakeAsterisk().library.find_message("Event: ContactStatus\r\n", "NonQualified")
    return b"".join(template.replace(b"1001", str(100000 + i).encode()) for i in range(count))


def _decode(data: bytes) -> list[AmiMessage]:
    """``data`` through the client's decoder, in reads of the client's size."""
    decoder = FrameDecoder(max_line_bytes=1 << 16, max_message_bytes=1 << 20)
    decoder.feed(b"Asterisk Call Manager/11.0.0\r\n")
    out: list[AmiMessage] = []
    for at in range(0, len(data), 65536):
        out += decoder.feed(data[at : at + 65536])
    return out


def stages(backend: str, count: int, scratch: Path) -> list[dict[str, Any]]:
    """Per-event CPU and wall microseconds of each stage alone (see the module doc)."""
    data = _burst_bytes(count)
    messages, cpu, wall = _timed_stage(lambda: _decode(data))
    out = [("decode", cpu, wall)]
    settings = fast_settings()
    peer = FakeAsterisk()
    peer.port = 5038  # never connected: the client only needs a valid server entry
    client = AmiClient(server_for(peer), settings)
    link = Link("lab", client, ReloadCoordinator(client, settings), PjsipOps(client))
    AmiPbx([link], create_engine("sqlite://"), "realtime")._subscribe(link)
    # The reader's per-message call, on a session without a socket or pending actions.
    session: Any = SimpleNamespace(pending={})
    handle = client._handle
    _, cpu, wall = _timed_stage(lambda: [handle(session, m) for m in messages])
    out.append(("fold", cpu, wall))
    book = link.book
    states, cpu, wall = _timed_stage(lambda: {ep: rows(book[ep]) for ep in link.dirty})
    out.append(("rows", cpu, wall))
    with (
        tempfile.TemporaryDirectory(dir=scratch) as name,
        temp_engine(backend, Path(name)) as engine,
    ):
        seed_store(engine, count)
        for label in ("store (first)", "store (again)"):

            def write() -> None:
                with engine.begin() as conn:
                    write_endpoint_rows(conn, "lab", states, datetime.now())

            _, cpu, wall = _timed_stage(write)
            out.append((label, cpu, wall))
    return [
        {
            "backend": backend,
            "events": count,
            "stage": label,
            "cpu_us": cpu / count * 1e6,
            "wall_us": wall / count * 1e6,
        }
        for label, cpu, wall in out
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument(
        "--backend",
        nargs="+",
        default=["sqlite", "postgresql"],
        choices=["sqlite", "postgresql", "mariadb"],
    )
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--stages", action="store_true", help="also time each stage alone")
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    # As the daemon logs (info, JSON), into nothing: its lines cost what they cost there,
    # without burying the table.
    devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (open until exit)
    configure(level="info", fmt="json", stream=devnull)
    print_header("registration ingestion (ContactStatus events, socket to store)", COLUMNS)
    for backend in args.backend:
        for count in args.events:
            print_row(COLUMNS, run_one(backend, count, args.scratch))
    if args.stages:
        print_header("each stage alone, microseconds per event", STAGE_COLUMNS)
        for backend in args.backend:
            for count in args.events:
                for row in stages(backend, count, args.scratch):
                    print_row(STAGE_COLUMNS, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
