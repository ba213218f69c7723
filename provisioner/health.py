"""The daemon's health record: a small JSON file that ``provisioner check`` turns into an exit code.

Written atomically (temp file, ``os.replace``) after each apply and each AMI
state change, so a reader never sees half a record.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

__all__ = ["Health", "HealthUnreadable", "read_health", "write_health"]

FILE_NAME = "health.json"
#: Registration writes refused in a row (about 3.5 s of retries) that make the daemon
#: unhealthy: one refusal is a blip (a lock, a restart), three are an outage.
STORE_FAILURES_UNHEALTHY = 3


@dataclass
class Health:
    """What the daemon last did, and how its connections are."""

    pid: int = field(default_factory=os.getpid)
    #: The host the daemon runs on: its pid is looked up only on that host.
    host: str = field(default_factory=socket.gethostname)
    #: When the process started, in clock ticks since boot (``/proc/PID/stat``; None
    #: without ``/proc``): a pid another process took since is not the daemon's.
    proc_start: int | None = field(default_factory=lambda: _process_start(os.getpid()))
    started_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    ready: bool = False
    last_sync_at: float | None = None
    last_sync_ok: bool | None = None
    last_error: str = ""
    provisioned: int = 0
    #: Users whose row cannot be rendered (``sync.skipped``), as last found.
    skipped: int = 0
    #: Users a row provisioner did not create blocks (``sync.conflict``), as last found.
    conflicts: int = 0
    cursor: int = 0
    #: server name -> {"connected": bool, "last_error": str, "reconnects": int,
    #: "store_failures": int (registration writes refused in a row), "snapshot_failures":
    #: int (snapshots failed in a row), "snapshot_error": str (the last one's reason), ...}
    asterisk: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: When the daemon shut down (its last record); None while it runs.
    stopped_at: float | None = None
    #: When the apply in progress started, once it has run longer than
    #: ``daemon.stuck_after`` (stuck on the store or the target); None otherwise.
    apply_stuck_since: float | None = None
    #: The store's lost triggers (``"<name> (<problem>)"``) as the last full reconcile
    #: found them: edits by other writers reach Asterisk only at the next full one.
    triggers_lost: list[str] = field(default_factory=list)
    #: The store's LISTEN hears no NOTIFY (``store.listen_deaf``: a pooler in
    #: transaction pooling): edits are found by polling, every ``daemon.poll_interval``.
    listen_deaf: bool = False

    def notes(self) -> list[str]:
        """What is off but not unhealthy: edits still go live, later than they should."""
        if self.listen_deaf and self.stopped_at is None:
            return [
                "the store's LISTEN hears no NOTIFY (a pooler in transaction pooling?):"
                " edits are found by polling (daemon.poll_interval); see store.listen_deaf"
            ]
        return []

    def problems(self, now: float, max_age: float) -> list[str]:
        """Why this record is unhealthy (empty when healthy); a stopped daemon's record
        says only that, and so does one whose pid is not running on this host (a daemon
        killed or crashed, which wrote no last record)."""
        if self.stopped_at is not None:
            return [f"stopped: pid {self.pid} shut down {now - self.stopped_at:.0f} s ago"]
        if self.host == socket.gethostname() and not _running(self.pid, self.proc_start):
            return [f"pid {self.pid} is not running (it ended without a last record)"]
        out = []
        if not self.ready:
            out.append("not ready (the first reconcile has not finished)")
        if self.last_sync_ok is False:
            out.append(f"last sync failed: {self.last_error}")
        if self.apply_stuck_since is not None:
            out.append(
                f"an apply has run for {now - self.apply_stuck_since:.0f} s"
                " (longer than daemon.stuck_after): stuck on the store or the target?"
            )
        if self.triggers_lost:
            out.append(
                f"store trigger {', '.join(self.triggers_lost)}: other writers' edits go live"
                " only at the next full reconcile; run 'provisioner db repair'"
            )
        if now - self.updated_at > max_age:
            out.append(f"record is {now - self.updated_at:.0f} s old (daemon stuck or stopped?)")
        for server, state in sorted(self.asterisk.items()):
            failures = int(state.get("store_failures", 0))
            if failures >= STORE_FAILURES_UNHEALTHY:
                out.append(
                    f"{server}: the store refused the last {failures} registration writes"
                    " (phones' state is kept and retried)"
                )
            since = state.get("write_stuck_since")
            if since is not None:
                out.append(
                    f"{server}: a registration write has run for {now - since:.0f} s"
                    " (longer than daemon.stuck_after): stuck on a store lock?"
                )
        return out


def _running(pid: int, proc_start: int | None) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts) and, when
    ``proc_start`` is known, started then (else the pid was reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # e.g. PermissionError: it exists, run by another user
    if proc_start is None:
        return True
    started = _process_start(pid)
    return started is None or started == proc_start


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        # Field 22; the name (field 2) is in parentheses and may hold spaces.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


#: Beside the record: held while a writer compares the record with its own and replaces it.
LOCK_NAME = ".health.lock"


def write_health(state_dir: Path, health: Health, *, beside: bool = False) -> bool:
    """Write ``health`` as the record, unless the record there is a newer daemon's (another
    process, started later: a restart that overlapped this daemon's stop), or, with
    ``beside`` (``run --burst``, run beside the service), another process's that still
    runs; ``False`` then."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with _open_lock(state_dir / LOCK_NAME) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _newer_daemon(state_dir, health) or (beside and _other_running(state_dir, health)):
            return False
        health.updated_at = time.time()
        _replace(state_dir, health)
    return True


def _open_lock(path: Path) -> IO[bytes]:
    """The record's lock file at ``path``, made mode :data:`RECORD_MODE` when missing.  A
    symbolic link there is never followed (an :class:`OSError` saying so): planted by
    whoever may write the state directory, it would have a writer run as root make a
    file anywhere."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, RECORD_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "it is a symbolic link", str(path)) from None
        raise
    return os.fdopen(fd, "ab")


def _newer_daemon(state_dir: Path, health: Health) -> bool:
    """Whether the record in ``state_dir`` is another process's, started after ``health``'s,
    and not its last: one that has stopped (e.g. a ``run --burst`` beside the service)
    no longer speaks for the state directory; left in place, it would have ``check``
    report the daemon still running as stopped, for ever."""
    try:
        there = read_health(state_dir)
    except HealthUnreadable:
        return False
    if there is None:
        return False
    mine = (there.host, there.pid, there.proc_start) == (health.host, health.pid, health.proc_start)
    return not mine and there.started_at > health.started_at and there.stopped_at is None


def _other_running(state_dir: Path, health: Health) -> bool:
    """Whether the record in ``state_dir`` is another process's that has not stopped and,
    when it ran on this host, still runs: the service's, which a run beside it must not
    replace (``check`` would report the service as that run: not ready, then stopped)."""
    try:
        there = read_health(state_dir)
    except HealthUnreadable:
        return False
    if there is None or there.stopped_at is not None:
        return False
    if (there.host, there.pid, there.proc_start) == (health.host, health.pid, health.proc_start):
        return False
    return there.host != socket.gethostname() or _running(there.pid, there.proc_start)


#: The record's mode: the owner writes it, its group reads it.
RECORD_MODE = 0o640


def _replace(state_dir: Path, health: Health) -> None:
    """Write ``health`` to a temporary file and move it over the record."""
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".health.", suffix=".tmp")
    try:
        # mkstemp makes it 0600: the group (a monitoring user running ``provisioner
        # check``) may read it, as the unit's UMask=0027 means.  It holds no secret.
        os.fchmod(fd, RECORD_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(health), fh)
        os.replace(tmp, state_dir / FILE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HealthUnreadable(ValueError):
    """The health record is there but cannot be read as one."""


#: The JSON types each field of a record may have (``None`` included where it may be null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "pid": (int,),
    "host": (str,),
    "proc_start": (int, type(None)),
    "started_at": (int, float),
    "updated_at": (int, float),
    "ready": (bool,),
    "last_sync_at": (int, float, type(None)),
    "last_sync_ok": (bool, type(None)),
    "last_error": (str,),
    "provisioned": (int,),
    "skipped": (int,),
    "conflicts": (int,),
    "cursor": (int,),
    "asterisk": (dict,),
    "stopped_at": (int, float, type(None)),
    "apply_stuck_since": (int, float, type(None)),
    "triggers_lost": (list,),
    "listen_deaf": (bool,),
}


def read_health(state_dir: Path) -> Health | None:
    """The last record, or None when the daemon never wrote one.  Fields this version does
    not know (a later version's) are left out; a file that is not a JSON object of a
    record's fields raises :class:`HealthUnreadable` saying why."""
    try:
        raw = (state_dir / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HealthUnreadable(f"{exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:  # not UTF-8 or not JSON (e.g. empty)
        raise HealthUnreadable(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HealthUnreadable(f"a JSON {type(data).__name__}, not an object")
    known = {f.name for f in fields(Health)}
    values = {k: v for k, v in data.items() if k in known}
    for key, value in values.items():
        if not isinstance(value, _FIELD_TYPES[key]):
            raise HealthUnreadable(f"{key} is a JSON {type(value).__name__}")
    for server, state in values.get("asterisk", {}).items():
        _check_server(server, state)
    if not all(isinstance(name, str) for name in values.get("triggers_lost", [])):
        raise HealthUnreadable("triggers_lost holds a value that is not a string")
    return Health(**values)


def _check_server(server: str, state: object) -> None:
    """Raise :class:`HealthUnreadable` unless ``state`` is a server's object whose
    ``store_failures`` and ``write_stuck_since`` (which :meth:`Health.problems` reads),
    if any, are a number (the latter may be null)."""
    if not isinstance(state, dict):
        raise HealthUnreadable("asterisk holds a server that is not an object")
    failures = state.get("store_failures", 0)
    if isinstance(failures, bool) or not isinstance(failures, int):
        raise HealthUnreadable(
            f"asterisk.{server}.store_failures is a JSON {type(failures).__name__}"
        )
    since = state.get("write_stuck_since")
    if isinstance(since, bool) or not isinstance(since, int | float | None):
        raise HealthUnreadable(
            f"asterisk.{server}.write_stuck_since is a JSON {type(since).__name__}"
        )
