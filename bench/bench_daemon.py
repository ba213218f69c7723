"""Benchmark of the running daemon, edit to live (a script, not a test).

    .venv/bin/python -m bench.bench_daemon --users 1000 10000 --target sqlite postgresql config

For each target (``sqlite``: realtime rows in the SQLite store, ``postgresql``: realtime
rows in a PostgreSQL store, ``config``: ``pjsip_users.conf`` from a SQLite store) and size,
it seeds a throwaway store with generated users, starts the real daemon
(``provisioner run`` subprocess, temporary TOML config) against a fake Asterisk
(``tests/amipeer.py``) running in this process's event loop, and measures:

* ``edits``: that many edits, one at a time (plain SQL ``UPDATE users SET context``, one
  transaction each), each timed from its commit to (``apply``) the row or file holding
  it and (``ami``) the AMI action the peer received for it: ``Reload`` for the config
  file, ``SorceryMemoryCacheExpireObject`` of the endpoint for realtime
  (``sorcery_caches = ["ep_cache"]``); p50 / p99 in milliseconds;
* ``base``: the baseline "regenerate everything and reload on each edit", with the
  daemon stopped: per edit, load every user, ``render_all``, the target's full
  ``apply``, and an AMI ``Reload`` answered by the peer (median ms); ``ratio`` =
  base / ami p50 (target >= 100 at 100k);
* ``burst``: that many edits of distinct users as fast as one connection commits them
  (``burst_s``: how long that took), then how many ``Reload`` actions the peer got
  until everything was applied plus 2 s (target <= 3), and the cache expiries;
* ``reg``: the peer sends one ``ContactStatus`` event per user (``send_burst``); the
  rate (events/s) until the store's summaries hold them all (``contacts``) (target
  >= 50,000/s);
* startup (daemon start to ready), the daemon's peak RSS (``VmHWM``) and this
  process's (``ru_maxrss``).

The edits, and later the storm (``reg``), start once the daemon has verified every
endpoint it applied (its health record's ``unverified`` is 0: at its start that is a
listing of every endpoint, which the fake Asterisk answers holding none, so a problem is
written for each; it must not run beside what is timed) and the peer has had nothing new
for 0.5 s; ``reg_cpu_us`` is the daemon's CPU per event during the storm (every thread's,
from ``/proc``).

``--edits 0`` and ``--burst 0`` leave those parts out (``--edits 0 --burst 0
--baseline-edits 0``: the registration storm alone, after the start).

``--shards N`` runs the config-file target in N shard files (``target.shards``); an
edit is then timed until its user's shard file holds it.

``--reload-min-gap`` (default 0, as in the end-to-end tests) sets ``[ami]
reload_min_gap``; ``reload_gap_factor`` is 0 so a one-at-a-time edit is never held
back by the previous reload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, update

from provisioner.config import load_config
from provisioner.daemon import build_target
from provisioner.pjsip import RenderSettings, render_all
from provisioner.store import queries as q
from provisioner.store.engine import open_engine
from provisioner.store.schema import registration_summary
from provisioner.store.schema import users as users_table
from provisioner.targets import Target
from provisioner.targets.asterisk_schema import ps_endpoints
from provisioner.targets.shards import shard_files, shard_of
from tests.amipeer import FakeAsterisk, ReceivedAction

from .common import (
    Column,
    DirectReader,
    StoredProbe,
    peak_rss_mb,
    percentile,
    print_header,
    print_row,
    seed_store,
    temp_database,
)
from .machine import describe

__all__ = ["main", "run_one"]

PROVISIONER = str(Path(sys.executable).with_name("provisioner"))
TARGETS = ("sqlite", "postgresql", "config")
SERVER = "pbx1"
EXPIRE = "SorceryMemoryCacheExpireObject"


class TimedActions(list[ReceivedAction]):
    """The peer's list of received actions, with the time each one arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: ReceivedAction) -> None:
        self.times.append(time.perf_counter())
        super().append(item)


@dataclass
class Setup:
    """One run's pieces: where the store is, the config, the peer."""

    target: str
    count: int
    tmp: Path
    store_url: str
    engine: Engine
    #: Plain reads of the target and the store (see :func:`_reader_engine`).
    reader: Engine
    peer: FakeAsterisk
    actions: TimedActions
    config: Path
    #: ``target.shards`` of the config-file target (0: one file).
    shards: int = 0
    #: The daemon's process, once started.
    daemon_pid: int = 0

    @property
    def conf_file(self) -> Path:
        return self.tmp / "pjsip_users.conf"

    def file_of(self, uid: int) -> Path:
        """The file that holds user ``uid``'s sections: the one file, or its shard file."""
        if not self.shards:
            return self.conf_file
        return shard_files(self.conf_file, self.shards)[shard_of(_extension(uid), self.shards)]


#: The tree this bench runs from: the daemon it starts runs this tree's code too.
TREE = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The daemon's environment: no ``PROVISIONER_`` setting of the caller's, JSON logs,
    and this tree first on the import path.  The ``provisioner`` script imports the
    package the venv installed (editable: the project it was installed from), so a bench
    run from another worktree (an older commit, alternated with this one) measured this
    daemon rather than its own without it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env["PROVISIONER_LOG__FORMAT"] = "json"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(TREE), env.get("PYTHONPATH"))))
    return env


def _write_config(s: Setup, reload_min_gap: float) -> None:
    realtime = s.target != "config"
    lines = [
        "[store]",
        f'url = "{s.store_url}"',
        "[security]",
        "password_policy = false",
        "[target]",
        f'kind = "{"realtime" if realtime else "config"}"',
        f'path = "{s.conf_file}"',
        f"shards = {0 if realtime else s.shards}",
        "[daemon]",
        f'state_dir = "{s.tmp / "state"}"',
        "reconcile_interval = 0",
        "shutdown_timeout = 30",
        "[ami]",
        f"reload_min_gap = {reload_min_gap}",
        "reload_gap_factor = 0",
        "backoff_base = 0.05",
        "backoff_cap = 0.2",
        "[[asterisk]]",
        f'name = "{SERVER}"',
        'host = "127.0.0.1"',
        f"port = {s.peer.port}",
        f'username = "{s.peer.username}"',
        f'secret = "{s.peer.secret}"',
    ]
    if realtime:
        lines.append('sorcery_caches = ["ep_cache"]')
    s.config.write_text("\n".join(lines) + "\n")


async def _until(check: Callable[[], bool], timeout: float, what: str, step: float) -> float:
    """Poll ``check`` every ``step`` s; the perf_counter time the check that first held
    began (what it saw was so by then; the check's own time is not the daemon's)."""
    deadline = time.perf_counter() + timeout
    while True:
        began = time.perf_counter()
        if check():
            return began
        if began > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(step)


async def _start_daemon(s: Setup) -> tuple[asyncio.subprocess.Process, float]:
    """Start ``provisioner run``; return it and the seconds until its health says ready."""
    log = (s.tmp / "daemon.log").open("ab")
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        PROVISIONER, "--config", str(s.config), "run", stdout=log, stderr=log, env=_env()
    )
    log.close()
    health = s.tmp / "state" / "health.json"

    def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"daemon exited {proc.returncode}; see {s.tmp / 'daemon.log'}")
        try:
            record = json.loads(health.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return bool(record.get("ready")) and record.get("pid") == proc.pid

    done = await _until(ready, 1800, "daemon ready", 0.05)
    return proc, done - started


def _daemon_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _quiet(actions: TimedActions, seconds: float, timeout: float) -> None:
    """Wait until the peer has received nothing new for ``seconds``."""
    deadline = time.perf_counter() + timeout
    seen = -1
    while len(actions) != seen and time.perf_counter() < deadline:
        seen = len(actions)
        await asyncio.sleep(seconds)


def _extension(uid: int) -> str:
    return str(100000 + uid - 1)


def _set_context(engine: Engine, uid: int, context: str) -> float:
    """One committed ``UPDATE users SET context``; the time of the commit's return."""
    with engine.begin() as conn:
        conn.execute(update(users_table).where(users_table.c.id == uid).values(context=context))
    return time.perf_counter()


def _applied_check(s: Setup, direct: DirectReader, uid: int, context: str) -> Callable[[], bool]:
    """True once the target holds ``context`` for user ``uid``.

    Made before the edit's commit.  For a file that is once a new file took its name (a
    stat: reading a 62 MB file here, in the
    event loop that also times the fake Asterisk's actions, would delay those timings
    and take a core from the daemon); :func:`_check_file` then checks the bytes, after
    the AMI action was timed."""
    if s.target == "config":
        path = s.file_of(uid)
        before = _identity(path)
        return lambda: _identity(path) != before
    # Polled every millisecond from the event loop that stamps the fake Asterisk's
    # actions: a DirectReader's query, not a pooled connection's (see common.DirectReader).
    query = direct.prepare(
        select(ps_endpoints.c.context).where(ps_endpoints.c.id == _extension(uid))
    )
    return lambda: direct.scalar(query) == context


def _identity(path: Path) -> tuple[int, int]:
    """Inode and mtime: the atomic write renames a new file over the old one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_ino, st.st_mtime_ns)


def _check_file(s: Setup, uid: int, context: str) -> None:
    """The file that changed for an edit holds it (else the timing was of another write)."""
    if s.target == "config" and f"context={context}\n" not in s.file_of(uid).read_text():
        raise AssertionError(f"{s.file_of(uid)} changed without context={context}")


def _action_after(actions: TimedActions, start: int, name: str, obj: str | None) -> float | None:
    for i in range(start, len(actions)):
        a = actions[i]
        if a.name == name and (obj is None or a.get("Object") == obj):
            return actions.times[i]
    return None


async def _edits(s: Setup, edits: int) -> tuple[list[float], list[float]]:
    """Edit-to-applied and edit-to-AMI latencies (seconds) of ``edits`` single edits."""
    with DirectReader(s.reader) as direct:
        return await _timed_edits(s, direct, edits)


async def _timed_edits(
    s: Setup, direct: DirectReader, edits: int
) -> tuple[list[float], list[float]]:
    apply_lat: list[float] = []
    ami_lat: list[float] = []
    for k in range(edits):
        uid = 1 + (k * 7919) % s.count
        context = f"edit{k}"
        start = len(s.actions)
        check = _applied_check(s, direct, uid, context)
        committed = _set_context(s.engine, uid, context)
        applied = await _until(check, 120, f"edit {k}", 0.001)
        name, obj = ("Reload", None) if s.target == "config" else (EXPIRE, _extension(uid))
        await _until(
            lambda: _action_after(s.actions, start, name, obj) is not None,  # noqa: B023
            120,
            f"AMI for edit {k}",
            0.001,
        )
        seen = _action_after(s.actions, start, name, obj)
        assert seen is not None
        _check_file(s, uid, context)
        apply_lat.append(applied - committed)
        ami_lat.append(seen - committed)
    return apply_lat, ami_lat


def _count_applied(s: Setup, context: str) -> Callable[[], int]:
    if s.target == "config":
        needle = f"context={context}\n"
        if not s.shards:
            return lambda: s.conf_file.read_text().count(needle) if s.conf_file.exists() else 0
        files = shard_files(s.conf_file, s.shards)

        def in_shards() -> int:
            return sum(path.read_text().count(needle) for path in files if path.exists())

        return in_shards
    query = select(func.count()).select_from(ps_endpoints).where(ps_endpoints.c.context == context)

    def rows() -> int:
        with s.reader.connect() as conn:
            return int(conn.execute(query).scalar_one())

    return rows


async def _burst(s: Setup, n: int) -> dict[str, float]:
    """``n`` edits of distinct users committed back to back; reloads and expiries seen."""
    await _quiet(s.actions, 0.5, 60)
    start = len(s.actions)
    began = time.perf_counter()
    for k in range(n):
        _set_context(s.engine, 1 + k, "burst")
    issued = time.perf_counter() - began
    count = _count_applied(s, "burst")
    done = await _until(lambda: count() >= n, 600, "burst applied", 0.02)
    await asyncio.sleep(2.0)
    names = [a.name for a in s.actions[start:]]
    return {
        "burst": n,
        "burst_s": issued,
        "burst_apply_s": done - began,
        "reloads": names.count("Reload"),
        "expires": names.count(EXPIRE),
    }


def _unverified(s: Setup) -> int | None:
    """The endpoints the daemon's health record says it has not yet asked Asterisk about
    (None: no record yet)."""
    try:
        record = json.loads((s.tmp / "state" / "health.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(record.get("asterisk", {}).get(SERVER, {}).get("unverified", 0))


async def _settled(s: Setup) -> None:
    """Wait until the daemon has verified every endpoint it applied, and the peer has had
    nothing new for 0.5 s.

    At the daemon's start that is one ``PJSIPShowEndpoints`` of every endpoint, tried
    again 5 s after the first try (made before the AMI session was up); the fake Asterisk
    holds none of them, so it ends with a problem noted for each of them (100k at 100k
    users, one store write in the flusher's turn).  Started 2 s after the daemon was
    ready, the storm met that verification in its middle: the event loop and the writer
    did both, and the storm's rate was the two's (26k and 20k events/s against 53k and
    57k alone); the timed edits, started 1 s after the peer's last action, met it too
    (PostgreSQL, 100k users, a slow VM: the edits' latencies went from 20-60 ms to
    200-500 ms while it was written, apply p99 385 ms).  A real Asterisk holds the endpoints,
    so there it finds nothing to note.  Waited for before the edits and before the storm
    (after the burst's edits, verified too).  The health record says how many are left,
    every 15 s at most."""
    await _until(lambda: _unverified(s) == 0, 120, "endpoints verified", 0.1)
    await _quiet(s.actions, 0.5, 60)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, every thread's, ended ones included) process ``pid``
    has used so far, in clock ticks (10 ms here: ``reg_cpu_us`` means something from
    about 10k events on)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _registrations(s: Setup) -> dict[str, float]:
    """ContactStatus for every user from the peer; events/s until the store has them all."""
    await _quiet(s.actions, 0.5, 60)
    query = select(func.count()).where(
        registration_summary.c.server == SERVER, registration_summary.c.contacts.is_not(None)
    )
    with s.reader.connect() as conn:
        before = int(conn.execute(query).scalar_one())
    # Polled every 5 ms by StoredProbe: a point query on the burst's last user (seed_store:
    # ids 1..count, in the burst's order; its batch is written after every earlier one),
    # and the count only once that holds (a count of up to 100k rows every 5 ms kept a
    # core of this 2-core VM busy, away from the daemon being measured).
    with StoredProbe(s.reader, SERVER, s.count, before + s.count) as probe:
        # The daemon's CPU per event meanwhile: a figure the other work of a shared
        # machine moves far less than the rate.
        cpu = _cpu_seconds(s.daemon_pid)
        began = time.perf_counter()
        await s.peer.send_burst(s.count)
        done = await _until(probe.held, 600, "registrations", 0.005)
    took = done - began
    used = _cpu_seconds(s.daemon_pid) - cpu
    return {
        "reg_events": s.count,
        "reg_s": took,
        "reg_rate": s.count / took,
        "reg_cpu_us": used / s.count * 1e6,
    }


async def _ami_reloader(
    port: int, username: str, secret: str
) -> tuple[Callable[[], Awaitable[None]], asyncio.StreamWriter]:
    """A bare AMI session: a coroutine function that sends one res_pjsip reload and waits
    for its answer (as a front end that reloads on every edit does), and its writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()  # banner
    counter = iter(range(1, 1 << 30))

    async def send(headers: list[tuple[str, str]]) -> None:
        action_id = f"bench-{next(counter)}"
        text = "".join(f"{k}: {v}\r\n" for k, v in [*headers, ("ActionID", action_id)])
        writer.write((text + "\r\n").encode())
        await writer.drain()
        while True:  # messages until the answer to this action
            message = b""
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                message += line
            if not line:
                raise ConnectionError("AMI peer closed the connection")
            if f"ActionID: {action_id}".encode() in message and b"Response:" in message:
                return

    await send([("Action", "Login"), ("Username", username), ("Secret", secret)])

    async def reload() -> None:
        await send([("Action", "Reload"), ("Module", "res_pjsip.so")])

    return reload, writer


async def _baseline(s: Setup, edits: int) -> float:
    """Median seconds of: edit, load all users, render all, full apply, AMI Reload."""
    config = load_config(str(s.config))
    target = build_target(config, s.engine)
    settings = RenderSettings.from_config(config)
    reload, writer = await _ami_reloader(s.peer.port, s.peer.username, s.peer.secret)
    took: list[float] = []
    try:
        await _regenerate_and_reload(s, target, settings, reload, edits, took)
    finally:
        writer.close()
        await writer.wait_closed()
    return statistics.median(took)


async def _regenerate_and_reload(
    s: Setup,
    target: Target,
    settings: RenderSettings,
    reload: Callable[[], Awaitable[None]],
    edits: int,
    took: list[float],
) -> None:
    for k in range(edits):
        committed = _set_context(s.engine, 1 + (k * 104729) % s.count, f"base{k}")

        def regenerate() -> None:
            with s.engine.connect() as conn:
                people = q.load_users(conn, deleted=False)
            objects, _skipped = render_all(people, settings)
            target.apply(objects)

        await asyncio.to_thread(regenerate)
        await reload()
        took.append(time.perf_counter() - committed)


def _editor_engine(url: str) -> Engine:
    """The bench's own connection to the store (the "other application" making edits).

    On SQLite it commits with ``synchronous=NORMAL`` (WAL: no fsync per commit), so a
    burst of single-edit transactions fits in about a second on a slow disk.
    """
    engine = open_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _normal_sync(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def _reader_engine(url: str) -> Engine:
    """The bench's connection for watching the target and the store, as Asterisk reads them.

    Plain SQLAlchemy, not :func:`open_engine`: on SQLite that one begins every
    transaction with ``BEGIN IMMEDIATE`` (the write lock), so a check made while the
    daemon writes would wait in SQLite's busy handler (sleeps of 1, 2, 5, 10 ms ...)
    and hold the daemon's next write back: both would be counted as the daemon's latency.
    """
    return create_engine(url)


@contextmanager
def _store(target: str, tmp: Path) -> Iterator[str]:
    backend = "postgresql" if target == "postgresql" else "sqlite"
    with temp_database(backend, tmp) as url:
        yield url


async def _run(
    target: str, count: int, tmp: Path, url: str, args: argparse.Namespace
) -> dict[str, Any]:
    peer = FakeAsterisk()
    actions = TimedActions()
    peer.received = actions
    await peer.start()
    engine = _editor_engine(url)
    reader = _reader_engine(url)
    config = tmp / "provisioner.toml"
    s = Setup(target, count, tmp, url, engine, reader, peer, actions, config, args.shards)
    figures: dict[str, Any] = {"users": count}
    try:
        seed_store(engine, count)
        _write_config(s, args.reload_min_gap)
        daemon, figures["startup_s"] = await _start_daemon(s)
        try:
            await _until(lambda: peer.logins_ok >= 1, 60, "AMI login", 0.01)
            await _quiet(actions, 1.0, 1800)
            s.daemon_pid = daemon.pid
            await _settled(s)  # the edits are timed on a daemon done with its start
            if args.edits:
                apply_lat, ami_lat = await _edits(s, args.edits)
                figures["edits"] = args.edits
                figures["apply_p50_ms"] = percentile(apply_lat, 50) * 1000
                figures["apply_p99_ms"] = percentile(apply_lat, 99) * 1000
                figures["ami_p50_ms"] = percentile(ami_lat, 50) * 1000
                figures["ami_p99_ms"] = percentile(ami_lat, 99) * 1000
            if args.burst:
                figures.update(await _burst(s, min(args.burst, count)))
            await _settled(s)
            figures.update(await _registrations(s))
            figures["daemon_rss_mb"] = _daemon_rss_mb(daemon.pid)
        finally:
            await _stop(daemon)
        if args.baseline_edits and args.edits:
            base = await _baseline(s, args.baseline_edits)
            figures["base_ms"] = base * 1000
            figures["ratio"] = base * 1000 / figures["ami_p50_ms"]
        log = (tmp / "daemon.log").read_text()
        assert "Traceback" not in log, f"the daemon logged a traceback: {tmp / 'daemon.log'}"
    finally:
        engine.dispose()
        reader.dispose()
        await asyncio.sleep(0.2)  # let the peer's sessions see their clients hang up
        await peer.stop()
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def run_one(target: str, count: int, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """All measurements for one target and size (a fresh store, daemon and peer)."""
    with tempfile.TemporaryDirectory(dir=scratch) as name, _store(target, Path(name)) as url:
        return asyncio.run(_run(target, count, Path(name), url, args))


COLUMNS: tuple[Column, ...] = (
    ("users", "{:>6.0f}"),
    ("startup_s", "{:>6.1f}"),
    ("edits", "{:>4.0f}"),
    ("apply_p50_ms", "{:>6.1f}"),
    ("apply_p99_ms", "{:>6.1f}"),
    ("ami_p50_ms", "{:>6.1f}"),
    ("ami_p99_ms", "{:>6.1f}"),
    ("base_ms", "{:>8.1f}"),
    ("ratio", "{:>6.1f}"),
    ("burst", "{:>5.0f}"),
    ("burst_s", "{:>5.2f}"),
    ("burst_apply_s", "{:>5.2f}"),
    ("reloads", "{:>3.0f}"),
    ("expires", "{:>5.0f}"),
    ("reg_events", "{:>6.0f}"),
    ("reg_s", "{:>5.2f}"),
    ("reg_rate", "{:>7.0f}"),
    ("reg_cpu_us", "{:>6.1f}"),
    ("daemon_rss_mb", "{:>5.0f}"),
    ("peak_rss_mb", "{:>5.0f}"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every requested target and size; print one table per target."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_daemon")
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--target", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--baseline-edits", type=int, default=10)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--reload-min-gap", type=float, default=0.0)
    parser.add_argument(
        "--shards", type=int, default=0, help="target.shards of the config-file target"
    )
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_daemon_") as tmp:
        for target in args.target:
            kind = "config file" if target == "config" else f"realtime on {target}"
            if target == "config" and args.shards:
                kind += f" in {args.shards} shard files"
            print_header(f"daemon, {kind} (latencies in ms from commit)", COLUMNS)
            for count in args.users:
                print_row(COLUMNS, run_one(target, count, Path(tmp), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
