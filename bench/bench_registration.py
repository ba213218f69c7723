"""Benchmark of registration-event ingestion, socket to store (a script, not a test).

    .venv/bin/python -m bench.bench_registration --events 10000 50000 --backend sqlite postgresql

For each backend and size N it seeds a throwaway store with N users (extensions from
100000), runs an :class:`~provisioner.ami.pbx.AmiPbx` in this process against a fake
Asterisk (``tests/amipeer.py``) over a real socket, waits for the connect snapshot, then
has the peer send N recorded ``ContactStatus`` events (``send_burst``, one per user) and
reports ``rate``: events/s from the first byte sent until the store's ``registrations``
table holds all N contacts (target >= 50,000/s; the flusher runs every 0.2 s, so a small
burst is bounded by that).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, select

from provisioner.ami.client import AmiClient
from provisioner.ami.pbx import AmiPbx, Link
from provisioner.ami.reload import PjsipOps, ReloadCoordinator
from provisioner.store.engine import open_engine
from provisioner.store.schema import registrations
from tests.amipeer import FakeAsterisk, fast_settings, running, server_for

from .common import Column, print_header, print_row, seed_store, temp_database

__all__ = ["main", "run_one"]

COLUMNS: list[Column] = [
    ("backend", "{:>10}"),
    ("events", "{:>7d}"),
    ("seconds", "{:>7.2f}"),
    ("rate", "{:>8.0f}"),
]


def _stored(engine: Engine, server: str) -> int:
    """How many contacts of ``server`` the store holds."""
    query = select(func.count()).select_from(registrations).where(registrations.c.server == server)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _has_user(engine: Engine, server: str, user_id: int) -> bool:
    """Whether the store holds a contact of user ``user_id`` on ``server`` (a point query)."""
    query = select(registrations.c.user_id).where(
        registrations.c.server == server, registrations.c.user_id == user_id
    )
    with engine.connect() as conn:
        return conn.execute(query.limit(1)).first() is not None


def _all_stored(engine: Engine, server: str, last_user: int, total: int) -> bool:
    """Whether ``total`` contacts of ``server`` are stored: counted only once the burst's
    last user is there (its batch was taken after every earlier event was folded, and
    batches commit one after another), as counting every 5 ms took most of a core."""
    return _has_user(engine, server, last_user) and _stored(engine, server) >= total


async def _until(check: Any, timeout: float, what: str) -> float:
    """Poll ``check()`` (in a thread: it queries the store) until true; the time it was."""
    deadline = time.perf_counter() + timeout
    while not await asyncio.to_thread(check):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def _measure(engine: Engine, count: int, watcher: Engine) -> float:
    """Seconds from the burst's first byte until ``watcher`` counts every contact stored."""
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
            before = await asyncio.to_thread(_stored, watcher, "lab")
            began = time.perf_counter()
            await peer.send_burst(count)
            done = await _until(
                lambda: _all_stored(watcher, "lab", count, before + count), 600, "registrations"
            )
    finally:
        await peer.stop()
    return done - began


def run_one(backend: str, count: int, scratch: Path) -> dict[str, Any]:
    """Seconds and events/s for ``count`` events into a fresh store of ``count`` users."""
    with (
        tempfile.TemporaryDirectory(dir=scratch) as name,
        temp_database(backend, Path(name)) as url,
    ):
        engine = open_engine(url)
        # The count is polled through a plain engine: open_engine's SQLite transactions
        # begin IMMEDIATE (the write lock), so each poll made the daemon's write wait in
        # SQLite's busy handler and the bench measured its own interference.
        watcher = create_engine(url)
        try:
            seed_store(engine, count)
            took = asyncio.run(_measure(engine, count, watcher))
        finally:
            watcher.dispose()
            engine.dispose()
    return {"backend": backend, "events": count, "seconds": took, "rate": count / took}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument(
        "--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    print_header("registration ingestion (ContactStatus events, socket to store)", COLUMNS)
    for backend in args.backend:
        for count in args.events:
            print_row(COLUMNS, run_one(backend, count, args.scratch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
