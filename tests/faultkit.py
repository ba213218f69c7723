"""Helpers for the fault and hostile-input tests: stores, configs, CLI and daemon subprocesses.

Everything here runs real things: a real SQLite store, the ``provisioner``
console script as a subprocess, the daemon as a subprocess with its log kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from click.testing import CliRunner
from sqlalchemy import Engine, delete, select, text

from provisioner import credentials
from provisioner.accounts import Accounts, Policy
from provisioner.asterisk_conf import parse
from provisioner.cli import main
from provisioner.store.engine import open_engine
from provisioner.store.migrate import upgrade
from provisioner.store.schema import users

PROVISIONER = str(Path(sys.executable).with_name("provisioner"))
PYTHON = sys.executable


def env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no PROVISIONER_ leaking in, JSON logs."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    out.pop("NOTIFY_SOCKET", None)
    out.pop("WATCHDOG_USEC", None)
    out.pop("WATCHDOG_PID", None)
    out["PROVISIONER_LOG__FORMAT"] = "json"
    out.update(extra)
    return out


def write_config(
    tmp: Path,
    *,
    store_url: str | None = None,
    kind: str = "config",
    extra: Iterable[str] = (),
    name: str = "provisioner.toml",
) -> Path:
    """A config file for a store in ``tmp`` (SQLite unless ``store_url``) and a target there."""
    url = store_url or f"sqlite:///{tmp / 'store.db'}"
    lines = [
        "[store]",
        f'url = "{url}"',
        "busy_timeout = 2",
        "[security]",
        "password_policy = false",
        "[target]",
        f'kind = "{kind}"',
        f'path = "{tmp / "pjsip_users.conf"}"',
        "[daemon]",
        f'state_dir = "{tmp / "state"}"',
        "quiet = 0.02",
        "max_wait = 0.2",
        "shutdown_timeout = 5",
        *extra,
    ]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


def store_url(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'store.db'}"


def cheap_hasher() -> None:
    """Small argon2 costs for this process (tests that create many users)."""
    credentials._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def seed_store(url: str, count: int, *, prefix: str = "u") -> Engine:
    """A migrated store with root (admin), profile ``agents`` and ``count`` agents."""
    engine = open_engine(url)
    upgrade(engine)
    acc = Accounts(engine, Policy(password_policy=False))
    acc.add_profile("agents", "Contact-center agents")
    acc.add_user(
        {"username": "root", "role": "admin", "full_name": "Root", "email": "root@example.com"}
    )
    for i in range(count):
        acc.add_user(
            {
                "username": f"{prefix}{i}",
                "full_name": f"Agent {i}",
                "email": f"{prefix}{i}@example.com",
                "profile": "agents",
            }
        )
    return engine


def delete_users_sql(engine: Engine, keep: int | None = None) -> int:
    """Plain SQL, as a careless DBA would: delete every user (or all but ``keep`` of them)."""
    with engine.begin() as conn:
        ids = list(conn.execute(select(users.c.id).order_by(users.c.id)).scalars())
        doomed = ids if keep is None else ids[keep:]
        conn.execute(text("DELETE FROM user_attributes"))
        conn.execute(delete(users).where(users.c.id.in_(doomed)))
    return len(doomed)


@dataclass
class Ran:
    code: int
    out: str
    err: str


def cli(config: Path, *args: str, input: str | bytes | None = None, check: bool = True) -> Ran:
    """Run the CLI in-process (``main``) on ``config``; with ``check`` require exit code 0."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PROVISIONER_")}
    with CliRunner().isolation(input=input, env=clean) as (out, err, _mixed):
        code = main(["--config", str(config), *args])
        ran = Ran(code, out.getvalue().decode(), err.getvalue().decode())
    if check:
        assert ran.code == 0, (args, ran)
    return ran


async def cli_in_thread(config: Path, *args: str) -> str:
    """:func:`cli` (the CLI's ``main`` in this process: no new interpreter and imports, about
    0.7 s a run) in a thread, so the event loop keeps serving a fake Asterisk meanwhile:
    its stdout; it must exit 0."""
    return (await asyncio.to_thread(cli, config, *args)).out


#: Seeded stores made in this process, by the config sections seeding reads.
_SEEDED: dict[str, Path] = {}

#: What ``seed_admin_store`` runs: the store made, profile "agents", admin "root".
SEED_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("db", "upgrade"),
    ("profile", "add", "agents"),
    (
        "user",
        "add",
        "root",
        "--role",
        "admin",
        "--full-name",
        "Root",
        "--email",
        "root@example.com",
    ),
)


def seed_admin_store(config: Path) -> None:
    """Make the store ``config`` names as :data:`SEED_COMMANDS` (run in this process) make
    it.  A SQLite store is a copy (SQLite's backup, WAL included) of one store those
    commands made in this process for the same ``[extensions]`` and ``[security]``
    settings, the only ones they read: as subprocesses they cost an end-to-end test
    about 2 s."""
    settings = tomllib.loads(config.read_text(encoding="utf-8"))
    url = str(settings["store"]["url"])
    if not url.startswith("sqlite:///"):
        for command in SEED_COMMANDS:
            cli(config, *command)
        return
    key = json.dumps([settings.get("extensions"), settings.get("security")], sort_keys=True)
    made = _SEEDED.get(key)
    if made is None:
        made = Path(tempfile.mkdtemp(prefix="prov-seed-")) / "store.db"
        seed_config = made.with_suffix(".toml")
        lines = ["[store]", f'url = "sqlite:///{made}"']
        for section in ("extensions", "security"):
            lines.append(f"[{section}]")
            # JSON's strings, numbers and booleans are TOML's too.
            lines += [f"{k} = {json.dumps(v)}" for k, v in settings.get(section, {}).items()]
        seed_config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for command in SEED_COMMANDS:
            cli(seed_config, *command)
        _SEEDED[key] = made
    store = Path(url.removeprefix("sqlite:///"))
    source, copy = sqlite3.connect(made), sqlite3.connect(store)
    with contextlib.closing(source), contextlib.closing(copy):
        source.backup(copy)
    store.chmod(made.stat().st_mode & 0o777)


def cli_process(config: Path, *args: str, input: str | None = None, check: bool = True) -> Ran:
    """Run the ``provisioner`` console script as a subprocess."""
    proc = subprocess.run(
        [PROVISIONER, "--config", str(config), *args],
        input=input,
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    ran = Ran(proc.returncode, proc.stdout, proc.stderr)
    if check:
        assert ran.code == 0, (args, ran)
    return ran


def agent_args(username: str, *extra: str) -> list[str]:
    """``user add`` arguments of ``username`` in profile "agents" (full name the titled
    username, email at example.com), then ``extra`` options."""
    return [
        "user",
        "add",
        username,
        "--full-name",
        username.title(),
        "--email",
        f"{username}@example.com",
        "--profile",
        "agents",
        *extra,
    ]


def fake_pbx_lines(port: int, secret: str = "lab-secret") -> list[str]:
    """Config lines for a daemon talking to one fake Asterisk on ``port`` (``[[asterisk]]``
    named pbx1) with no gap between reloads and quick reconnects."""
    return [
        "[ami]",
        "reload_min_gap = 0",
        "reload_gap_factor = 0",
        "backoff_base = 0.05",
        "backoff_cap = 0.2",
        *pbx_entry_lines(port, secret),
    ]


def pbx_entry_lines(port: int, secret: str = "lab-secret") -> list[str]:
    """The ``[[asterisk]]`` entry pbx1 at 127.0.0.1:``port``, user provisioner, as config
    lines (no [ami] tuning)."""
    return [
        "[[asterisk]]",
        'name = "pbx1"',
        'host = "127.0.0.1"',
        f"port = {port}",
        'username = "provisioner"',
        f'secret = "{secret}"',
    ]


def tcp_options(fd: int) -> tuple[int, int, int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT of the
    socket ``fd``, as the kernel holds them."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


async def cli_async(config: Path, *args: str) -> str:
    """:func:`cli_process` from a coroutine (the event loop keeps serving a fake Asterisk
    meanwhile): the console script's stdout; it must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        PROVISIONER,
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(),
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    return out.decode()


def sections(path: Path) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The file's sections as Asterisk would load them: ``(name, options)`` in order."""
    return [(s.name, s.options) for s in parse(path.read_bytes()).visible()]


def endpoints(path: Path) -> list[str]:
    """The endpoint ids the file holds (none when it is absent)."""
    if not path.exists():
        return []
    return [n for n, o in sections(path) if o and o[0] == ("type", "endpoint")]


def until(check: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Poll ``check`` until true; return the seconds it took, or fail at ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not true within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


async def until_async(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str = "condition",
    interval: float = 0.02,
) -> float:
    """:func:`until` from a coroutine: await ``check()`` (a coroutine function or a plain
    one) every ``interval`` seconds until true; the seconds it took, or fail at
    ``timeout``."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not true within {timeout} s")
        await asyncio.sleep(interval)


@dataclass
class Daemon:
    """``provisioner run`` as a subprocess, its stdout and stderr appended to ``log``."""

    config: Path
    log: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def health_path(self) -> Path:
        return self.config.parent / "state" / "health.json"

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> Daemon:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [PROVISIONER, "--config", str(self.config), "run"],
                stdout=fh,
                stderr=fh,
                env=env(**self.extra_env),
            )
        if wait_ready:
            until(self.ready, timeout, "daemon ready")
        return self

    def run_to_exit(self, timeout: float = 30.0) -> int:
        """Start without waiting for readiness and wait for the process to end by itself
        (a daemon that must be refused); its exit code."""
        self.start(wait_ready=False)
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def health(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.health_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        assert self.proc is not None
        return data if data.get("pid") == self.proc.pid else None

    def ready(self) -> bool:
        h = self.health()
        return bool(h and h["ready"])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def timed_stop(self, timeout: float = 15.0) -> tuple[int, float]:
        """:meth:`stop`, and the seconds from SIGTERM to the exit."""
        started = time.monotonic()
        code = self.stop(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines are skipped)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def failed_tries(self) -> int:
        """The failed tries of the outage under way (or the last), as logged: 1 at its
        ``sync.failed``, then the count each ``sync.still_failing`` gives (the 2nd, 4th…)."""
        counts = [1 for _ in self.logged("sync.failed")]
        counts += [int(e["failures"]) for e in self.logged("sync.still_failing")]
        return max(counts, default=0)


@dataclass
class _Link:
    """One forwarded connection of a :class:`CutProxy`: the client's end and the server's."""

    client: socket.socket
    server: socket.socket
    was_cut: bool = False

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward ``src`` to ``dst`` until either end closes; then close both, unless the
        link was cut (the server's end then stays open, silent)."""
        with contextlib.suppress(OSError):  # an end closed under the pump: it just ends
            while data := src.recv(65536):
                dst.sendall(data)
        if not self.was_cut:
            self.close()

    def cut(self) -> None:
        self.was_cut = True
        _close(self.client)

    def close(self) -> None:
        _close(self.client)
        _close(self.server)


def _close(sock: socket.socket) -> None:
    """Shut ``sock`` down (waking a thread blocked reading it) and close it; one already
    closed is left as it is."""
    with contextlib.suppress(OSError):  # not connected any more: nothing to shut down
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class CutProxy:
    """A TCP forwarder on 127.0.0.1 to a database server at ``port``, whose :meth:`cut`
    closes the connections open so far on the client's side only.

    The client sees its connection closed (end of file, or a reset) at its next read or
    write: it notices the cut at once, so this is not a silent cut that leaves the client
    waiting too.  The server's side stays open: nothing more is sent to it, the first
    bytes it sends after the cut are read and dropped and any later ones are left unread,
    and this host's TCP stack keeps the connection up (it answers keepalive probes).  So
    it plays a cut the client has seen and the server has not: the server's sessions, and
    the locks they hold, live on until the server ends them itself (an idle timeout, an
    administrator's kill) or the proxy is closed.  Connections made after a cut are
    forwarded as usual."""

    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._cut: list[_Link] = []
        self._guard = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the proxy was closed
                return
            link = _Link(client, socket.create_connection(self._target))
            with self._guard:
                self._links.append(link)
            for src, dst in ((link.client, link.server), (link.server, link.client)):
                threading.Thread(target=link.pump, args=(src, dst), daemon=True).start()

    def cut(self) -> None:
        """Close every connection open now for its client, leaving the server's end open."""
        with self._guard:
            links, self._links = self._links, []
            self._cut.extend(links)
        for link in links:
            link.cut()

    def close(self) -> None:
        """Stop accepting and close every connection, cut ones included: their server
        sessions end."""
        _close(self._listener)
        with self._guard:
            links = self._links + self._cut
        for link in links:
            link.close()
