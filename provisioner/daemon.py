"""The long-running service: ``startup()``, ``main_loop()``, ``shutdown()``.

- startup: open the store, one full reconcile, start the wake-up sources and
  the Asterisk connections, tell systemd READY;
- main loop: wait for a wake-up (or the periodic reconcile), apply the changes the
  change feed lists, tell Asterisk.  An edit after a calm period is applied at once;
  edits that arrive while an apply runs are a burst, let settle first (quiescence
  window) so it costs a few applies and reloads, not one per edit;
- shutdown: stop the sources, let the apply in progress finish within
  ``shutdown_timeout``, then cancel what is left.

Signal handlers only set flags (SIGTERM/SIGINT: exit; SIGHUP: reload the
configuration and templates).  Database and file work runs in a worker thread
so the event loop keeps reading AMI promptly (Asterisk drops slow readers).
A store outage is logged and retried; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .aio import sleep_unless, wait_all_or_event, wait_first, wait_task_or_event
from .applier import Applied, Applier
from .config import Config, display_url, load_config, secret_file_problem
from .early_signals import take as take_early_signals
from .errors import (
    ConfigError,
    ConflictError,
    ForeignTargetFile,
    Problem,
    ProvisionerError,
    ServiceFailed,
    StoreUnavailable,
    TargetWriteFailed,
    UrlRefused,
)
from .health import Health, write_health
from .logs import configure as configure_logs
from .logs import get_logger, worth_repeating
from .metrics import Metrics
from .pjsip import RenderSettings
from .sdnotify import Notifier, watchdog_interval
from .store.changefeed import (
    CursorTracker,
    load_cursor,
    newest_change_id,
    prune_changes,
    read_change_ids,
    read_unapplied,
    save_cursor,
)
from .store.engine import (
    STORE_DOWN,
    FileIdentity,
    blamed,
    driver_error,
    file_identity,
    open_engine,
    open_store_engine,
    reading,
    schema_named,
    sqlite_file,
    transaction,
)
from .store.registrations import forget_other_servers
from .store.repair import REPAIR_COMMAND, lost_triggers
from .store.runlock import DaemonLock, PreviousSessionHolds
from .store.untold import drop_untold, new_token, note_untold, untold_key
from .targets import Change, Target
from .targets.configfile import ConfigFileTarget
from .targets.sharded import ShardedConfigFileTarget
from .targets.shards import shard_directory
from .targets.templating import SHIPPED_TEMPLATES
from .threads import in_worker
from .watch import (
    TemplateStamp,
    coalesce,
    poll_wakeups,
    postgres_wakeups,
    sqlite_wakeups,
    template_stamp,
    template_wakeups,
)

__all__ = ["Daemon", "Pbx", "build_target"]

log = get_logger(__name__)

#: Seconds between two health-record writes while idle (``provisioner check`` allows 4x).
HEARTBEAT_INTERVAL = 15.0
#: Seconds a successful apply's health write waits: the record is not on the edit's
#: way to Asterisk, and a stream of edits writes it a few times a second, not per edit.
HEALTH_DELAY = 0.05
#: Seconds between two tries to serve the metrics while their port is taken.
METRICS_RETRY = 5.0
#: Seconds between two looks at whether ``run --burst`` has told Asterisk everything.
BURST_POLL = 0.05
#: Changes one incremental apply reads at most; a longer backlog (a bulk import) is
#: applied in several, one after the other.
FEED_BATCH = 10_000
#: Changes one pruning transaction deletes at most (some 7 ms of SQLite's write lock),
#: and the pause after each: SQLite's lock is not fair, and a writer waiting on it looks
#: again only every 100 ms in the end, so without a pause it could miss every gap.
PRUNE_STEP = 1_000
PRUNE_PAUSE = 0.005

#: Applied changes that make an incremental apply prune the change table too (a full
#: reconcile always prunes): with ``reconcile_interval = 0`` (never) it would only grow.
PRUNE_EVERY = 1_000
#: Seconds between two looks at the daemon's lock of the store (:meth:`Daemon._keep_lock`).
LOCK_CHECK = 5.0
#: Longest pause (seconds) between two attempts at the first reconcile while the store
#: is down.  Until it succeeds nothing else finds the store back (no wake-up source runs
#: yet): a daemon started before its database (a boot where MariaDB comes up later) was
#: ready up to 30 s after it.  One refused connection every 5 s costs nothing; the
#: running daemon tries at every poll anyway.
FIRST_RETRY_MAX = 5.0
#: Seconds at most between two ``sync.still_failing`` lines of one outage.  Tries are
#: not logged each: a failed apply is tried again at every poll and wake-up (and after
#: its backoff when nothing wakes it), which is what finds the store back within a poll
#: of its return, and a 20 s MariaDB outage at the default 1 s poll logged 21 errors.
STILL_FAILING_EVERY = 30.0


@dataclass
class Hearing:
    """Whether a wake source's notices are lost on their way (a PostgreSQL LISTEN that
    hears no NOTIFY), so the store is polled instead: the health record says so."""

    deaf: bool = False

    def said(self, deaf: bool) -> None:
        self.deaf = deaf


@dataclass(frozen=True)
class WakeSource:
    """A coroutine function ``run(event, stop)`` that sets ``event`` when there may be work."""

    run: Callable[[asyncio.Event, asyncio.Event], Awaitable[None]]
    #: A timer (the safety-net poll), not a notice of a change: its wake-ups never make
    #: the next edit wait for a burst to settle.
    timer: bool = False
    #: How well it hears the store's notices, for a source that can tell.
    hearing: Hearing | None = None


class Pbx(Protocol):
    """What the daemon needs from the Asterisk side (see :mod:`provisioner.ami`)."""

    #: Seconds a store write of the AMI side may run before it counts as stuck
    #: (``daemon.stuck_after``, which a SIGHUP may change; 0: never).
    stuck_after: float

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the connections up until ``stop`` is set."""
        ...

    def applied(self, change: Change, *, target_kind: str) -> None:
        """Schedule what ``change`` needs (reload, cache expiry, contact removal); never blocks."""
        ...

    def health(self) -> dict[str, dict[str, Any]]:
        """Per server: connected, last_error, reconnects, not_live, events, reloads
        (result -> count) and online (endpoints with a usable contact)."""
        ...

    def follow_target(self, config: Config) -> None:
        """A SIGHUP built the target anew from ``config``: reloads load its files now."""
        ...

    def follow_servers(self, config: Config) -> None:
        """A SIGHUP re-read ``[[asterisk]]``: let go of the servers taken out or changed,
        start those put in; never blocks."""
        ...

    def caches_unsure(self) -> None:
        """Another writer may have left realtime rows whose cache expiries were never
        sent: empty every server's caches (see :mod:`provisioner.store.untold`)."""
        ...

    def store_answered(self) -> None:
        """An apply succeeded after the store failed one: store writes waiting out the
        outage go now."""
        ...

    def idle(self) -> bool:
        """Whether every server was sent all it is owed (nothing waits, runs or retries)."""
        ...

    def writes_stuck(self) -> bool:
        """Whether a store write (registration state, a note of what is owed) has run
        past :attr:`stuck_after`."""
        ...

    def told_all(self) -> bool:
        """Once :meth:`run` has ended: every change handed over was sent, or noted owed
        in the store for the next run."""
        ...


def removal_noter(
    engine: Engine, target: Callable[[], Target], servers: Callable[[], Sequence[str]]
) -> Callable[[Sequence[str], bool], None]:
    """The ``Applier.before_removing`` of a writer on the store at ``engine`` whose target
    and configured Asterisk servers are ``target()`` and ``servers()`` when called (a
    SIGHUP may change either): before an apply writes the target removing endpoints (a
    user disabled or deleted), it notes their contact removals owed to every server
    (blocking, in the apply's thread).

    The daemon's AMI side notes them again once the change reaches it, and drops the
    notes once the removals are sent; a kill in between (the flusher's turn can wait
    behind a registration storm) leaves them noted, and the next run sends them
    (``ami.owed_resumed``).  ``sync --once`` and ``render`` note them so too (and again
    once written, with the reowned ones).  In a transaction of their own, but from within
    the write (``in_write``) of realtime rows into the store's own database: in that
    write's transaction, so the notes commit with the rows or not at all (a transaction
    of their own would wait for the write's lock in vain on SQLite)."""

    def note_ahead(endpoints: Sequence[str], in_write: bool) -> None:
        names = list(servers())
        if not names:
            return
        from .ami.changes import note_removals

        note = partial(note_removals, servers=names, endpoints=endpoints)
        writing = _store_write_in_progress(engine, target()) if in_write else None
        if writing is not None:
            note(writing)
        else:
            transaction(engine, note)

    return note_ahead


def _store_write_in_progress(store: Engine, target: Target) -> Connection | None:
    """The connection of the write in progress of ``target``, a realtime target whose
    database is the store's (the same engine, or the same SQLite file), else None."""
    writing = getattr(target, "writing", None)
    engine = getattr(target, "engine", None)
    if not isinstance(writing, Connection) or not isinstance(engine, Engine):
        return None
    if engine is store:
        return writing
    if engine.dialect.name != "sqlite" or store.dialect.name != "sqlite":
        return None
    mine, theirs = store.url.database, engine.url.database
    if not mine or not theirs or Path(mine).resolve() != Path(theirs).resolve():
        return None
    return writing


def build_target(config: Config, store_engine: Engine, *, writes: bool = True) -> Target:
    """The configured target (the one place targets are built from config).  Nothing is
    written here: a realtime target creates its tables at its first write (a dry run
    writes nothing: its plan takes missing tables as empty).

    Without ``writes`` (a dry run) a realtime ``target.url`` naming a SQLite file is
    never created: a file that does not exist is planned into as an empty database."""
    if config.target.kind == "realtime":
        from .targets.realtime import RealtimeTarget

        engine = _realtime_engine(config, writes=writes) if config.target.url else store_engine
        return RealtimeTarget(engine)
    from .targets.sharded import config_file_target

    return config_file_target(config)


def _checked_target(config: Config, store_engine: Engine) -> Target:
    """:func:`build_target`, for a SIGHUP: a config-file target only once its templates
    render a good file (:func:`~provisioner.targets.configfile.check_templates`), a
    realtime target on a database of its own (``target.url``) only once that database
    opens and reads (:func:`_probe_realtime`), so either failing is refused as a bad
    configuration is and the old target kept, rather than taken and every apply failed.
    Blocking."""
    if config.target.kind == "config":
        from .targets.configfile import check_templates

        templates = Path(config.target.templates) if config.target.templates else None
        check_templates(templates, RenderSettings.from_config(config))
    target = build_target(config, store_engine)
    engine = getattr(target, "engine", None)
    if isinstance(engine, Engine) and engine is not store_engine:
        _probe_realtime(engine, config.target.url)
    return target


def _probe_realtime(engine: Engine, url: str) -> None:
    """Open the realtime database ``url`` on ``engine`` and read its table names (SQLite
    reads its file only then); :class:`ConfigError` on ``target.url`` with the driver's
    words (not the user store's failure, as a bare database error would be told), or the
    :class:`UrlRefused` of a driver refusing its parameters, the engine disposed."""
    try:
        with engine.connect() as conn:
            inspect(conn).get_table_names()
    except DBAPIError as exc:
        engine.dispose()
        rule = f"cannot open the realtime database ({display_url(url)}): {driver_error(exc)}"
        raise ConfigError([Problem("target.url", rule)]) from None
    except UrlRefused:  # already on target.url, in the driver's words
        engine.dispose()
        raise


def _realtime_engine(config: Config, *, writes: bool) -> Engine:
    """The engine of the realtime database ``target.url`` names: one that creates a SQLite
    file there when ``writes``; else one that never does, or, for a SQLite file that does
    not exist, an empty in-memory SQLite database (what the first write would start from)."""
    url = config.target.url
    path = sqlite_file(url)
    if not writes and path is not None and not path.exists():
        return open_engine("sqlite://")
    return open_store_engine(url, config.store, create=writes, field="target.url")


def _placement(config: Config) -> tuple[str, str, str, str, int]:
    """What :func:`build_target` builds the target from (the rest of ``[target]`` is
    render settings, which reach the applier without a new target)."""
    t = config.target
    return (t.kind, t.path, t.url, t.templates, t.shards)


def _target_where(config: Config, store_url: str) -> tuple[str, str]:
    """Where ``config``'s target puts the endpoints: its kind and its file's absolute path
    or its database's URL fit to log (``store_url``'s when ``target.url`` is empty)."""
    t = config.target
    if t.kind == "config":
        return (t.kind, os.path.abspath(t.path))
    return (t.kind, display_url(t.url or store_url))


def _left_behind(old: Config, new: Config, store_url: str) -> list[str]:
    """What ``old``'s target leaves holding endpoints once ``new``'s replaces it: its
    config file and shard directory, those that exist and are not ``new``'s own (a path
    that links to the new file); or its realtime rows."""
    kind, where = _target_where(old, store_url)
    if kind != "config":
        return [f"ps_endpoints, ps_auths, ps_aors rows in {where}"]
    kept: set[str] = set()
    if new.target.kind == "config":
        path = Path(os.path.abspath(new.target.path))
        kept = {os.path.realpath(path), os.path.realpath(shard_directory(path))}
    paths = [where, str(shard_directory(Path(where)))] if old.target.shards else [where]
    return [p for p in paths if os.path.lexists(p) and os.path.realpath(p) not in kept]


#: Sections a SIGHUP cannot apply: the store's engine and the AMI settings are taken once
#: (``[[asterisk]]`` servers are followed: :meth:`Pbx.follow_servers`).
RESTART_SECTIONS = ("store", "ami")
#: Single keys only a restart applies: the wake-up sources and the metrics server are
#: built once, at the start.
RESTART_KEYS = (
    ("daemon", "metrics_port"),
    ("daemon", "poll_interval"),
    ("daemon", "sqlite_poll"),
)


def _needs_restart(new: Config, old: Config) -> list[str]:
    """The sections of :data:`RESTART_SECTIONS` and the keys of :data:`RESTART_KEYS`
    (as ``section.key``) that differ between ``new`` and ``old``."""
    sections = [name for name in RESTART_SECTIONS if getattr(new, name) != getattr(old, name)]
    keys = [
        f"{section}.{key}"
        for section, key in RESTART_KEYS
        if getattr(getattr(new, section), key) != getattr(getattr(old, section), key)
    ]
    return sections + keys


def _in_effect(new: Config, running: Config) -> Config:
    """``new`` with the settings only a restart applies (:data:`RESTART_SECTIONS`,
    :data:`RESTART_KEYS`) as ``running`` has them."""
    kept: dict[str, Any] = {name: getattr(running, name) for name in RESTART_SECTIONS}
    for section in dict.fromkeys(section for section, _ in RESTART_KEYS):
        keys = [key for name, key in RESTART_KEYS if name == section]
        old = {key: getattr(getattr(running, section), key) for key in keys}
        kept[section] = getattr(new, section).model_copy(update=old)
    return new.model_copy(update=kept)


def _reread_templates(target: Target) -> None:
    """SIGHUP: a config-file target reads its templates afresh at the next render, even a
    file whose name, inode, mtime and size look unchanged (an edit in place within one
    tick of a coarse clock, or by a tool that keeps mtimes)."""
    if isinstance(target, ConfigFileTarget | ShardedConfigFileTarget):
        target.reload_templates()


def template_dirs(config: Config) -> list[Path]:
    dirs = [SHIPPED_TEMPLATES]
    if config.target.templates:
        dirs.insert(0, Path(config.target.templates))
    return dirs


def wake_sources(config: Config) -> list[WakeSource]:
    """How this store announces changes, plus a slow poll as a safety net."""
    url = make_url(config.store.url)
    backend = url.get_backend_name()
    poll = config.daemon.poll_interval
    sources: list[WakeSource] = []
    if backend == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        every = config.daemon.sqlite_poll
        sources.append(
            WakeSource(lambda wake, stop: sqlite_wakeups(path, wake, stop, interval=every))
        )
        poll = max(poll, 5.0)
    elif backend == "postgresql":
        # While LISTEN is down or deaf, poll as often as MariaDB/MySQL are polled.
        sources.append(_listening(config.store.url, poll))
        poll = max(poll, 5.0)
    sources.append(WakeSource(lambda wake, stop: poll_wakeups(poll, wake, stop), timer=True))
    return sources


def _listening(url: str, poll: float) -> WakeSource:
    """PostgreSQL's LISTEN as a wake source whose hearing follows the watcher's probe."""
    hearing = Hearing()
    return WakeSource(
        lambda wake, stop: postgres_wakeups(url, wake, stop, poll=poll, on_deaf=hearing.said),
        hearing=hearing,
    )


@dataclass
class Daemon:
    """The service; built by :meth:`from_config`, run by :meth:`serve`."""

    config: Config
    engine: Engine
    applier: Applier
    wake_sources: list[WakeSource]
    pbx: Pbx | None = None
    notifier: Notifier = field(default_factory=Notifier)
    config_path: str | None = None
    #: Settings a caller's code gives (nested), applied again on SIGHUP.
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: The command line's raw ``--set`` flags (``--store-url`` among them), read again on
    #: SIGHUP as at start, so a problem found then is still said to come from the command line.
    config_sets: tuple[str, ...] = ()

    should_exit: bool = False
    reload_requested: bool = False
    #: Set by a change notification (or a signal); ``tick`` by the safety-net timer.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tick: asyncio.Event = field(default_factory=asyncio.Event)
    templates_changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Ends the template watcher of the current directories (see _watch_templates).
    _templates_watch: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: A second SIGTERM/SIGINT: the shutdown cancels what is left at once.
    force_exit: asyncio.Event = field(default_factory=asyncio.Event)
    #: A SIGTERM/SIGINT came (:meth:`handle_exit`): the next one forces the exit.
    _exit_signalled: bool = False
    #: Ends the AMI side: set by :meth:`shutdown` once the apply in progress has ended,
    #: so the change it hands over is still taken (noted owed in the store).
    ami_stop: asyncio.Event = field(default_factory=asyncio.Event)
    health: Health = field(default_factory=Health)
    tracker: CursorTracker = field(default_factory=lambda: CursorTracker(cursor=0))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: This run's marker in the store (:mod:`~provisioner.store.untold`), noted before its
    #: first write, and the other writers' markers found then (None: not noted yet).
    _untold_token: str = field(default_factory=new_token)
    _untold_found: list[str] | None = None
    #: The AMI side was told of the markers found (:meth:`_hand_untold`).
    _untold_handed: bool = False
    #: The shutdown has ended the tasks: :meth:`_spawn` refuses new ones.
    _closed: bool = False
    _next_reconcile: float = 0.0
    #: systemd's STATUS says the first reconcile failed (:meth:`_ready_status`).
    _status_failing: bool = False
    #: A change was notified while the last apply ran (before Asterisk was told): a burst.
    _woken_while_applying: bool = False
    #: Change ids applied by the last apply whose cursor is not saved yet.
    _unsaved: list[int] | None = None
    #: The last full apply's changes are to be pruned (after its cursor is saved).
    _prune_due: bool = False
    #: The highest change id the last prune may have dropped (see :meth:`_prune`).
    _pruned_upto: int = 0
    #: The last incremental apply read a full batch: more changes may be waiting.
    _backlog: bool = False
    #: The pending deferred health write (see :meth:`_write_health_soon`).
    _health_due: asyncio.TimerHandle | None = None
    #: The record is a newer daemon's: this one no longer writes it (logged once).
    _health_yielded: bool = False
    #: ``run --burst``: the record of a daemon running beside it is left to that daemon.
    _burst: bool = False
    _last_exc: BaseException | None = None
    #: The SQLite store's file as the last full apply found it (None: not SQLite, or not
    #: looked at yet): another one at the path was moved over it (:meth:`_store_replaced`).
    _store_file: FileIdentity | None = None
    #: The feed's newest change id was found below the cursor (a backup restored into
    #: the store): the next full apply starts from the store's own cursor.
    _rewound: bool = False
    #: Seconds before a failed incremental apply is run again (0: the last one did not
    #: fail), and its pending timer.
    _retry_delay: float = 0.0
    _retry_due: asyncio.TimerHandle | None = None
    #: Seconds before a failed full reconcile is run again (0: the last one did not fail).
    _full_retry_delay: float = 0.0
    #: The outage under way (applies failing for the store's or the disk's sake, from the
    #: first until the record is healthy again): its failed tries, when it began and when
    #: it was last logged (monotonic), for the bounded log (:meth:`_log_failure`).
    _outage_failures: int = 0
    _outage_since: float = 0.0
    _outage_logged_at: float = 0.0
    #: What the failures under way are: ``None`` for an outage (whatever each try's
    #: error), else the error of a refusal no retry helps (a broken template, a refused
    #: mass removal) and the work refused (:attr:`_attempt`), which stay one run of
    #: failures while every try of the same work says the same.
    _failing_with: tuple[str, tuple[str, int] | None] | None = None
    #: What the apply under way was to apply (its kind, and the newest change id it
    #: covered), once it has read that: a refusal said again for the same work is a
    #: retry (the safety-net poll's), one for newer work is news (an edit held back).
    _attempt: tuple[str, int] | None = None
    #: A full apply began and has not succeeded since: the target may lack what it was to
    #: apply (a template edit, a SIGHUP's settings, a refused mass removal), so the applies
    #: that succeed meanwhile (a poll finding nothing new) leave the record failed.  Set
    #: as :meth:`_full` begins, cleared by :meth:`_succeeded` for any full apply's result.
    _full_owed: bool = False
    #: The apply in progress has run longer than ``daemon.stuck_after`` (see
    #: :meth:`_apply_stuck`), and the timer that says so.
    _stuck: bool = False
    _stuck_due: asyncio.TimerHandle | None = None
    #: A store write of the AMI side was found stuck when the watchdog last looked.
    _writes_stuck: bool = False
    #: The first error a task ended with (see :meth:`_task_ended`).
    _failure: BaseException | None = None
    metrics: Metrics = field(default_factory=Metrics)
    #: The lock of the store held for the daemon's lifetime (None: not taken: a burst,
    #: or not yet); another daemon held it: this one was refused and writes no health.
    _lock: DaemonLock | None = None
    _refused: bool = False
    #: Set when an apply succeeds after the store failed one: the lock, lost with its
    #: connection in the outage, is looked at (and taken again) at once (:meth:`_keep_lock`).
    _store_back: asyncio.Event = field(default_factory=asyncio.Event)
    #: Counter values last exported per (server, name), to export only the increase.
    _exported: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.applier.before_removing = removal_noter(
            self.engine,
            lambda: self.applier.target,
            lambda: [server.name for server in self.config.asterisk],
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        sets: Sequence[str] = (),
        creates_store: bool = True,
    ) -> Daemon:
        """The daemon for ``config``; ``config_path``, ``overrides`` and the raw ``--set``
        flags ``sets`` are what a SIGHUP reads the configuration from again.  Without
        ``creates_store`` (a burst, which ends at the first failure) a SQLite store whose
        file does not exist raises :class:`StoreUnavailable` naming it, and none is made;
        with it the file is made, and the daemon waits for ``db upgrade`` to give it a
        schema."""
        engine = open_store_engine(config.store.url, config.store, create=creates_store)
        applier = Applier(
            engine,
            build_target(config, engine),
            RenderSettings.from_config(config),
            max_removal_fraction=config.daemon.max_removal_fraction,
        )
        pbx = None
        if config.asterisk:
            from .ami.pbx import AmiPbx

            pbx = AmiPbx.from_config(config, engine)
        return cls(
            config,
            engine,
            applier,
            wake_sources(config),
            pbx=pbx,
            config_path=config_path,
            config_overrides=dict(overrides or {}),
            config_sets=tuple(sets),
            tracker=CursorTracker(cursor=0, grace=config.daemon.cursor_grace),
        )

    # -- signals: flags only -----------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: :meth:`handle_exit`; SIGHUP: :meth:`handle_reload`; those the
        console script deferred before (:mod:`provisioner.early_signals`) are handled now."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.handle_exit)
        loop.add_signal_handler(signal.SIGINT, self.handle_exit)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload)
        # Those that came while the process started (noted, not acted on): act now, as
        # one stop at most (there was no drain for a second one to cut short).
        early = take_early_signals()
        if signal.SIGHUP in early:
            self.handle_reload()
        if any(sig != signal.SIGHUP for sig in early):
            self.handle_exit()

    def handle_exit(self) -> None:
        """SIGTERM/SIGINT: stop; the shutdown lets the apply in progress end
        (``shutdown_timeout``).  A second one while it drains (Ctrl-C twice, a second
        ``kill``) ends the drain at once: what is left is cancelled
        (``daemon.shutdown_forced``)."""
        if self._exit_signalled and not self.force_exit.is_set():
            log.warning("daemon.exit_forced")
            self.force_exit.set()
        self._exit_signalled = True
        self._stop()

    def _stop(self) -> None:
        """Start the shutdown (a signal, or a task that failed)."""
        self.should_exit = True
        self.stop.set()
        self.wake.set()

    def handle_reload(self) -> None:
        self.reload_requested = True
        self.wake.set()

    # -- lifecycle ------------------------------------------------------------------

    async def serve(self, *, burst: bool = False) -> Applied | None:
        """Run until a signal (or, with ``burst``, apply pending changes once and return;
        an apply that fails is not retried then, its error is raised).

        The work runs as a task: a signal starts the shutdown at once, and the apply in
        progress gets ``shutdown_timeout`` like every other task, then is cancelled, so
        an apply stuck on the store (a lock never granted, a server gone silent) cannot
        keep the daemon from exiting.  The work raising an error of its own (``run
        --burst``: a refused mass removal, the store unavailable) raises it; an
        unexpected one (a bug) is a failed task (:meth:`_work_ended`)."""
        self._burst = burst
        self.install_signal_handlers()
        work = asyncio.create_task(self._serve(burst))
        work.add_done_callback(self._work_ended)
        try:
            await wait_task_or_event(work, self.stop)
        finally:
            await self.shutdown(work)
        error = None if work.cancelled() else work.exception()
        if error is not None and error is not self._failure:
            raise error
        if self._failure is not None:
            raise ServiceFailed(
                f"stopped: a task failed ({_describe(self._failure)})"
            ) from self._failure
        return None if work.cancelled() else work.result()

    def _work_ended(self, work: asyncio.Future[Applied | None]) -> None:
        """The startup and main loop ended with an unexpected error (neither one of ours
        nor a store or disk failure, which :meth:`serve` raises as they are): a failed
        task, as :meth:`_task_ended` has it (logged, exit code 10, the untold marker
        kept), not a bare traceback and exit 1."""
        if work.cancelled() or isinstance(work.exception(), (ProvisionerError, *_RETRYABLE)):
            return
        self._task_ended(work)

    async def _serve(self, burst: bool) -> Applied | None:
        if not burst:
            # ``run --burst`` takes no lock: it is meant to run beside the service.
            await self._take_lock()
        first = await self.startup(burst=burst)
        if not burst:
            await self.main_loop()
        return first

    async def startup(self, *, burst: bool = False) -> Applied | None:
        """Open the store, reconcile everything once, start sources and AMI; READY.
        A ``secret_file`` too open is logged first (:func:`_warn_open_secret_files`)."""
        _warn_open_secret_files(self.config)
        self.health = Health()
        if self.config.daemon.metrics_port:
            self._spawn(self._serve_metrics(self.config.daemon.metrics_port))
        dirs = template_dirs(self.config)
        # Taken before the first reconcile reads the templates: an edit made before the
        # watcher starts is still seen.
        templates = template_stamp(dirs)
        first = await self._reconcile_until_done(retry=not burst)
        if isinstance(self._last_exc, UrlRefused):
            # Neither a retry nor an edit of the users mends it: end with the config's
            # exit code (2), which the unit's RestartPreventExitStatus does not restart.
            raise self._last_exc
        if burst:
            if self._last_exc is not None:
                # A one-shot run that applied nothing ends with the reason (its exit
                # code: a refused mass removal, the store unavailable…), not as a success.
                raise await self._burst_failure(self._last_exc)
            await self._tell_once(first)
            return first
        if self.pbx is not None:
            self._spawn(self.pbx.run(self.ami_stop))
            if first is not None:
                self.pbx.applied(first.change, target_kind=self.config.target.kind)
        if self.should_exit:
            # Stopped during the first reconcile: the shutdown has begun (STOPPING=1
            # sent).  The AMI side takes its change (noted owed at the stop), but READY
            # and the sources would contradict the stop.
            return first
        for source in self.wake_sources:
            self._spawn(source.run(self.tick if source.timer else self.wake, self.stop))
        self._spawn(self._watch_templates(dirs, templates))
        if (interval := watchdog_interval()) is not None:
            self._spawn(self._watchdog(interval))
        self._spawn(self._heartbeat())
        self.health.ready = True
        self._write_health()
        self.notifier.ready(status=self._ready_status())
        log.info("daemon.ready", target=self.config.target.kind)
        return first

    def _ready_status(self) -> str:
        """systemd's STATUS at READY: ``provisioning``, or, when the first reconcile failed
        (a target file that is not provisioner's, a refused mass removal…), ``not
        provisioning: <why>``, shown by ``systemctl status`` until an apply succeeds."""
        if self.health.last_sync_ok is False:
            self._status_failing = True
            return f"not provisioning: {self.health.last_error}"
        return "provisioning"

    async def _take_lock(self) -> None:
        """Take the daemon's lock of the store (:mod:`~provisioner.store.runlock`), then
        watch it (:meth:`_keep_lock`) if it can be lost (one on a connection, not a
        SQLite file's: :attr:`DaemonLock.can_be_lost`).  Another daemon holding it raises
        :class:`ConflictError` (exit 4) before this one wrote anything.  A store down
        now (``daemon.lock_waits``) does not hold the start up: the first reconcile
        fails and is retried as it would, and the watch takes the lock once the store
        answers."""
        lock = DaemonLock(self.engine, self.config.store.url)
        try:
            await in_worker(lock.take)
        except ConflictError:
            self._refused = True
            raise
        except STORE_DOWN as exc:
            log.warning("daemon.lock_waits", error=_describe(exc), retry_in_s=LOCK_CHECK)
        self._lock = lock
        if lock.can_be_lost:
            self._spawn(self._keep_lock(lock))

    async def _keep_lock(self, lock: DaemonLock) -> None:
        """Every :data:`LOCK_CHECK` seconds, make sure the lock is held: one lost with
        its connection (a store restart, a network cut) is logged (``daemon.lock_lost``)
        and taken again as soon as the store answers (``daemon.lock_retaken``: at the next
        look, or at once when an apply finds the store back, :meth:`_lock_pause`), and this
        daemon's old session no longer holds it (a cut the server has not noticed yet:
        ``daemon.lock_waits`` meanwhile); taken by another daemon meanwhile, this one
        stops (a failed task: exit 10).  A wait is logged as ``daemon.lock_waits`` at its
        first try only, then counted (:func:`_log_lock_wait`), and ``daemon.lock_retaken``
        says how many tries it took (``after_tries``) and how long (``waited_s``)."""
        was_held = await in_worker(lock.check)
        tries, since, logged_at = 0, 0.0, 0.0
        while not await self._lock_pause():
            if await in_worker(lock.check):
                was_held = True
                continue
            if was_held:
                log.warning("daemon.lock_lost")
                was_held = False
            try:
                await in_worker(lock.retake)
            except (*STORE_DOWN, PreviousSessionHolds) as exc:
                # Not yet: the store is down, or this daemon's old session (its
                # connection lost in a cut the server has not noticed) still holds it.
                now = time.monotonic()
                tries += 1
                if tries == 1:
                    since = now
                if _log_lock_wait(tries, now - since, now - logged_at, _describe(exc)):
                    logged_at = now
                continue
            was_held = True
            waited = round(time.monotonic() - since, 1) if tries else 0.0
            log.info("daemon.lock_retaken", after_tries=tries, waited_s=waited)
            tries = 0

    async def _lock_pause(self) -> bool:
        """Wait :data:`LOCK_CHECK` seconds, or until an apply found the store back from an
        outage (:attr:`_store_back`): the lock it lost is then taken again at once, not up
        to 5 s later, while a second daemon could take it.  True once stopping."""
        await wait_first(self.stop, self._store_back, timeout=LOCK_CHECK)
        self._store_back.clear()
        return self.stop.is_set()

    async def _tell_once(self, first: Applied | None) -> None:
        """``run --burst``: start the AMI side, hand it what the apply changed, and wait
        until every server was sent all it is owed (this run's and the last run's), or
        ``daemon.shutdown_timeout`` has passed (``daemon.burst_untold``: a server down,
        a reload taking minutes at scale); the shutdown then notes what is left owed,
        and the next run sends it."""
        if self.pbx is None:
            return
        self._spawn(self.pbx.run(self.ami_stop))
        if first is not None and _owes_asterisk(first.change):
            self.pbx.applied(first.change, target_kind=self.config.target.kind)
        loop = asyncio.get_running_loop()
        timeout = self.config.daemon.shutdown_timeout
        deadline = loop.time() + timeout
        while not self.pbx.idle():
            if loop.time() >= deadline:
                log.warning("daemon.burst_untold", timeout_s=timeout)
                return
            if await sleep_unless(self.stop, BURST_POLL):
                return

    async def main_loop(self) -> None:
        interval = self.config.daemon.reconcile_interval
        self._next_reconcile = time.monotonic() + interval if interval else float("inf")
        # The first reconcile failed for the disk's sake (a target file not provisioner's
        # is not retried before READY): tried again as any failed full one.
        self._retry_if_failed(full=True)
        burst = False
        while not self.should_exit:
            await self._wait_for_work()
            if self.should_exit:
                break
            if burst:
                # Edits kept coming while the last apply ran: one apply for the lot.
                await coalesce(
                    self.wake, quiet=self.config.daemon.quiet, max_wait=self.config.daemon.max_wait
                )
            else:
                self.wake.clear()  # the first edit after a calm period: no waiting
            self.tick.clear()
            if self.reload_requested:
                self.reload_requested = False
                # systemd shows the reload until READY=1, sent whether or not the new
                # configuration was taken (a refused one is logged, the old one runs on,
                # and systemd's STATUS says so until the next change of it).
                self.notifier.reloading()
                refused = await self._reload_config()
                self.notifier.ready(status=self._reloaded_status(refused))
            full = self.templates_changed.is_set() or time.monotonic() >= self._next_reconcile
            if full:
                self.templates_changed.clear()
                interval = self.config.daemon.reconcile_interval  # SIGHUP may change it
                self._next_reconcile = time.monotonic() + interval if interval else float("inf")
                await self._run(self._full)
            else:
                await self._run(self._incremental)
            self._retry_if_failed(full=full)
            burst = self._woken_while_applying

    def _retry_if_failed(self, *, full: bool) -> None:
        """After an apply that failed for the store's or the disk's sake, run again after
        a pause doubling from 0.5 s up to 30 s: what it missed must not wait for the next
        edit or the safety-net poll.  A full reconcile is retried as one, with a backoff
        of its own that the incremental applies succeeding meanwhile leave as it is; an
        incremental retry is one timer at most, replaced by the next failure's, and none
        once the daemon stops."""
        failed = not self.health.last_sync_ok and isinstance(self._last_exc, _RETRYABLE)
        if full:
            self._full_retry_delay = _next_retry(self._full_retry_delay) if failed else 0.0
            if failed:
                due = time.monotonic() + self._full_retry_delay
                self._next_reconcile = min(self._next_reconcile, due)
        if not full or self.health.last_sync_ok:  # a full one that succeeded covers all
            self._retry_delay = _next_retry(self._retry_delay) if failed else 0.0
            self._cancel_retry()
            if failed and not self.stop.is_set():  # an apply that ended in the shutdown
                loop = asyncio.get_running_loop()
                self._retry_due = loop.call_later(self._retry_delay, self.tick.set)
        if failed and self._outage_failures == 1:
            # Said once an outage: the backoff is the longest wait; a poll or a wake-up
            # before it tries at once (see STILL_FAILING_EVERY).
            delay = self._full_retry_delay if full else self._retry_delay
            log.info("sync.retry", full=full, retry_within_s=delay, sooner="next poll or edit")

    def _cancel_retry(self) -> None:
        """Cancel the pending incremental retry, if any."""
        if self._retry_due is not None:
            self._retry_due.cancel()
            self._retry_due = None

    async def shutdown(self, work: asyncio.Task[Applied | None] | None = None) -> None:
        """Stop the sources, let ``work`` (the startup and main loop, whose errors are the
        caller's) end its apply in progress, then stop AMI, all within
        ``shutdown_timeout`` (or until a second signal, :meth:`handle_exit`); then cancel
        the rest (``daemon.shutdown_timeout`` or ``daemon.shutdown_forced`` names how
        many).  AMI stops after the apply so the change it hands over is taken: the AMI
        side notes in the store what that change still owes Asterisk (a reload, cache
        expiries, contact removals), and the next run sends it."""
        self.notifier.stopping()
        self.stop.set()
        self._cancel_retry()
        if self._health_due is not None:  # e.g. ``run --burst``: its one apply is recorded
            self._health_due.cancel()
            self._write_due_health()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.daemon.shutdown_timeout
        if work is not None:
            timeout = self.config.daemon.shutdown_timeout
            await wait_all_or_event([work], self.force_exit, timeout=timeout)
        self.ami_stop.set()
        await self._end_tasks([work] if work is not None else [], deadline)
        await self._end_untold(work, deadline)
        self.engine.dispose()
        if self._refused:
            # The health record is the running daemon's: left alone.
            log.warning("daemon.refused")
            return
        # The last record: 'provisioner check' then fails at once, not once it is stale.
        self.health.stopped_at = time.time()
        self._write_health()
        if self._lock is not None:
            # Last: no other daemon writes the store, or the record, before this one's end.
            await in_worker(self._lock.release)
        log.info("daemon.stopped")

    async def _end_untold(self, work: asyncio.Task[Any] | None, deadline: float) -> None:
        """Drop this run's marker (:mod:`~provisioner.store.untold`), which stands for
        those it found too, when it stopped having told Asterisk everything: its work
        ended by itself (an apply cancelled at the timeout may still commit, in its
        thread), no task failed, and the AMI side sent or noted owed every change.
        Otherwise it stays, and the next run empties the caches (``daemon.untold_kept``
        says why it stayed).  The write waits until ``deadline`` (loop time; a second
        signal ends it too) at most: a store that stalls (a lock held, a server gone
        silent) keeps the marker, not the process.  A write that fails of an error
        other than a store failure is a failed task (:meth:`_task_ended`): the shutdown
        still ends, and :meth:`serve` raises :class:`ServiceFailed`."""
        if self._untold_found is None or self.pbx is None:
            # Nothing written by this run, or no Asterisk configured: nothing to say (a
            # run with one configured finds the marker and empties the caches).
            return
        why = ""
        if not self._untold_handed:
            why = "no Asterisk was told"
        elif self._failure is not None:
            why = "a task failed"
        elif work is not None and (not work.done() or work.cancelled()):
            why = "an apply was cut off"
        elif not self.pbx.told_all():
            why = "what Asterisk is owed is not noted"
        if why:
            log.info("daemon.untold_kept", reason=why)
            return
        keys = [untold_key(self._untold_token)]  # those found were taken over at the start
        drop = asyncio.ensure_future(
            in_worker(transaction, self.engine, partial(drop_untold, keys=keys))
        )
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        await wait_all_or_event([drop], self.force_exit, timeout=left)
        if not drop.done():
            # Left to its thread, which the process's exit ends (its transaction then
            # rolls back: the marker stays).
            drop.cancel()
            log.info("daemon.untold_kept", reason="store write timed out")
            return
        exc = drop.exception()
        if isinstance(exc, STORE_DOWN):
            # Refused, or every pooled connection stayed taken until the pool's timeout.
            error = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
            log.warning("daemon.untold_kept", reason="store write failed", error=error)
        elif exc is not None:
            # A bug, not an outage: raised here it would skip the rest of the shutdown
            # (the engine's disposal, the last health record, daemon.stopped).  It ends
            # the daemon as a failed task does instead (logged, ServiceFailed, exit 10);
            # the marker stays, and the next run empties the caches.
            self._task_ended(drop)

    async def _end_tasks(self, work: list[asyncio.Task[Any]], deadline: float) -> None:
        """Wait until ``deadline`` (monotonic loop time), or a second signal
        (:attr:`force_exit`), for ``work`` and every spawned task to end, those spawned
        meanwhile too (the startup still under way starts its tasks after the stop);
        then refuse any new one (:meth:`_spawn`), cancel what is
        left (``daemon.shutdown_timeout`` says how many) and await it, so no task
        outlives the shutdown."""
        loop = asyncio.get_running_loop()
        while running := _running([*self._tasks, *work]):
            left = max(0.0, deadline - loop.time())
            await wait_all_or_event(running, self.force_exit, timeout=left)
            if loop.time() >= deadline or self.force_exit.is_set():
                break
        self._closed = True
        pending = _running([*self._tasks, *work])
        if pending and self.force_exit.is_set():
            log.warning("daemon.shutdown_forced", cancelled=len(pending))
        elif pending:
            log.warning(
                "daemon.shutdown_timeout",
                timeout_s=self.config.daemon.shutdown_timeout,
                cancelled=len(pending),
            )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()

    # -- work -------------------------------------------------------------------------

    async def _wait_for_work(self) -> None:
        timeout = max(0.0, self._next_reconcile - time.monotonic())
        await wait_first(self.wake, self.tick, self.templates_changed, timeout=min(timeout, 3600.0))

    async def _reconcile_until_done(self, *, retry: bool = True) -> Applied | None:
        """The first full reconcile, retried with backoff while the store is down (with
        ``retry``; else tried once: the caller finds why it failed in ``_last_exc``): 0.5 s
        doubling up to :data:`FIRST_RETRY_MAX`."""
        delay = 0.5
        while not self.should_exit:
            result = await self._run(self._full)
            if self.health.last_sync_ok:
                return result
            if (
                not retry
                or not isinstance(self._last_exc, _RETRYABLE)
                or isinstance(self._last_exc, ForeignTargetFile)
            ):
                # e.g. a refused mass removal or a broken template: no retry will help;
                # keep running (health says why) and wait for an edit, a SIGHUP or an
                # operator.  A target file that is not provisioner's waits for the
                # operator too (sync.failed said what to do): retried behind READY (the
                # main loop), not before it, where systemd's start timeout would end the
                # daemon with no word of why.
                return None
            await sleep_unless(self.stop, delay)
            delay = min(delay * 2, FIRST_RETRY_MAX)
        return None

    async def _run(self, work: Callable[[], Applied | None]) -> Applied | None:
        """Run one apply in a worker thread; record the outcome, tell Asterisk, then save
        the cursor of an incremental apply (bookkeeping, not on the way to Asterisk:
        a crash before the save only re-applies those changes, which writes nothing)."""
        kind = "full" if work == self._full else "incremental"
        self._watch_stuck()
        try:
            return await self._apply(kind, work)
        finally:
            self._end_stuck()

    async def _apply(self, kind: str, work: Callable[[], Applied | None]) -> Applied | None:
        """:meth:`_run`'s body: the apply, its record, and its bookkeeping."""
        self._attempt = None
        try:
            result = await in_worker(self._on_store, work)
            self._hand_untold()
            self._woken_while_applying = self.wake.is_set()
            self._succeeded(kind, result)
            if kind == "full":
                await self._check_triggers()
            if self._unsaved is not None:
                ids, self._unsaved = self._unsaved, None
                await in_worker(self._advance, ids)
            if self._prune_due or self.tracker.prune_limit() - self._pruned_upto >= PRUNE_EVERY:
                self._prune_due = False
                await in_worker(self._prune)
            if self._backlog:
                self._backlog = False
                self.tick.set()  # the next batch at once, not at the next poll
        except (*_RETRYABLE, ProvisionerError) as exc:
            self._hand_untold()
            self._woken_while_applying = self.wake.is_set()
            self.metrics.syncs.labels(kind=kind, result="failed").inc()
            self._last_exc = exc
            self.health.last_sync_ok = False
            self.health.last_error = await self._failure_said(exc)
            self.health.last_sync_at = time.time()
            self._log_failure(exc)
            self._write_health()
            return None
        self.health.cursor = self.tracker.cursor
        self._write_health_soon()  # after the AMI task had its turn: it is what goes live
        return result

    async def _failure_said(self, exc: BaseException) -> str:
        """:func:`_describe` of an apply's failure; a database error said by whose it is
        (:func:`~provisioner.store.engine.blame`): the user store's when it cannot be
        read, else a realtime target's own database's (``realtime database unavailable
        (target.url URL): ...``), where the operator would otherwise not look."""
        fault = await self._blamed(exc)
        return fault.message if fault is not None else _describe(exc)

    async def _blamed(self, exc: BaseException) -> StoreUnavailable | None:
        """:func:`~provisioner.store.engine.blamed` of a database error ``exc`` (the user
        store asked in a worker), None for any other failure."""
        if not isinstance(exc, DBAPIError):
            return None
        engine = getattr(self.applier.target, "engine", None)
        own = isinstance(engine, Engine) and engine is not self.engine
        target_url = self.config.target.own_database if own else None
        return await in_worker(blamed, self.engine, exc, target_url)

    def _log_failure(self, exc: BaseException) -> None:
        """Log a failed apply: the first of a run as ``sync.failed``, then the count so
        far as ``sync.still_failing`` at the 2nd, 4th, 8th… try and at least every
        :data:`STILL_FAILING_EVERY` seconds, so the log neither floods nor goes quiet
        (:meth:`_succeeded` logs its end).  A run is an outage (the store or the disk),
        or a refusal no retry helps (a broken template, a refused mass removal) said
        the same at every try of the same work, which the safety-net poll retries as
        often; another refusal, one of newer work (an edit held back) or one after an
        outage begins a run of its own."""
        error = self.health.last_error
        failing_with = None if isinstance(exc, _RETRYABLE) else (error, self._attempt)
        if self._outage_failures and failing_with != self._failing_with:
            if self._failing_with is None:
                self._end_outage()  # the store answered, and refused: another story
            else:
                self._outage_failures = 0  # still failing, otherwise: its sync.failed says so
        self._failing_with = failing_with
        now = time.monotonic()
        self._outage_failures += 1
        failures = self._outage_failures
        if failures == 1:
            self._outage_since = self._outage_logged_at = now
            log.error("sync.failed", error=error)
        elif worth_repeating(failures, now - self._outage_logged_at, STILL_FAILING_EVERY):
            self._outage_logged_at = now
            log.warning(
                "sync.still_failing",
                failures=failures,
                failing_for_s=round(now - self._outage_since, 1),
                error=error,
            )

    def _end_outage(self) -> None:
        """The outage under way, if any, is over: ``sync.recovered`` says how long it
        lasted and how many tries failed."""
        if self._outage_failures:
            failing = time.monotonic() - self._outage_since
            log.info(
                "sync.recovered", failures=self._outage_failures, failed_for_s=round(failing, 1)
            )
            self._outage_failures = 0

    def _on_store(self, work: Callable[[], Applied | None]) -> Applied | None:
        """``work``, a store it finds without this provisioner's schema (never upgraded)
        said as every command says it, the fix named (:func:`schema_named`).  Blocking."""
        with schema_named(self.engine):
            return work()

    async def _burst_failure(self, exc: BaseException) -> BaseException:
        """``exc``, the failure ending ``run --burst``, as :func:`_named` says it; a database
        error said by whose it is, as every command and the daemon say it (:meth:`_blamed`:
        the user store unavailable, or a realtime target's own database)."""
        fault = await self._blamed(exc)
        return fault if fault is not None else _named(exc)

    def _watch_stuck(self) -> None:
        """Call :meth:`_apply_stuck` once the apply starting now has run for
        ``daemon.stuck_after`` seconds (never when it is 0)."""
        after = self.config.daemon.stuck_after
        if after:
            loop = asyncio.get_running_loop()
            self._stuck_due = loop.call_later(after, self._apply_stuck, time.time())

    def _apply_stuck(self, started_at: float) -> None:
        """The apply in progress has run past ``daemon.stuck_after``: a store that stopped
        answering without closing the connection, or a lock never granted, has it wait
        for ever, and a thread cannot be cancelled.  Stop feeding the watchdog (systemd
        then restarts the daemon, whose connections close with it), and say so in the
        log (``daemon.apply_stuck``), to systemd's status and in the health record."""
        self._stuck_due = None
        self._stuck = True
        after = self.config.daemon.stuck_after
        log.error(
            "daemon.apply_stuck", running_s=round(time.time() - started_at), stuck_after=after
        )
        self.notifier.status(f"apply stuck for more than {after:g} s")
        self.health.apply_stuck_since = started_at
        self._write_health()

    def _end_stuck(self) -> None:
        """The apply has ended: no longer watched; if it was stuck, the watchdog is fed
        again and the health record says so soon."""
        if self._stuck_due is not None:
            self._stuck_due.cancel()
            self._stuck_due = None
        if self._stuck:
            self._stuck = False
            self.health.apply_stuck_since = None
            log.info("daemon.apply_unstuck")
            self.notifier.status("provisioning")
            self._write_health_soon()

    def _succeeded(self, kind: str, result: Applied | None) -> None:
        """Record a successful apply and hand its change to the AMI side.  While a full
        apply is owed (:attr:`_full_owed`) the record keeps that one's failure, unless this
        one re-rendered everyone (a profile edit, a burst too large for memory alone)."""
        if isinstance(self._last_exc, (*STORE_DOWN, StoreUnavailable)):
            # The store is back: the lock is taken again and registration writes waiting
            # out the outage go, now.  Only then: writes refused for another reason keep
            # their own backoff.
            self._store_back.set()
            if self.pbx is not None:
                self.pbx.store_answered()
        self._last_exc = None
        if result is not None and result.full:
            self._full_owed = False
        if not self._full_owed:
            self.health.last_sync_ok = True
            self.health.last_error = ""
            self._end_outage()
            if self._status_failing:
                self._status_failing = False
                self.notifier.status("provisioning")
        self.health.last_sync_at = time.time()
        if result is not None:
            self._count(kind, result.change)
            self.health.provisioned = len(self.applier.objects)
            self.health.skipped = self.applier.skipped_now
            self.health.conflicts = self.applier.conflicted
            if self.pbx is not None and self.health.ready and _owes_asterisk(result.change):
                self.pbx.applied(result.change, target_kind=self.config.target.kind)

    async def _check_triggers(self) -> None:
        """Read (never mend: the daemon's account may not create triggers) which of the
        store's triggers are lost, in a worker thread; a change of that set is logged,
        ``store.triggers_missing`` (warning, naming them and the repair command) or
        ``store.triggers_restored``, and kept in the health record.  A store that does
        not answer keeps the last set, and says so (``store.triggers_unchecked``)."""
        try:
            lost = await in_worker(self._lost_triggers)
        except DBAPIError as exc:
            log.warning("store.triggers_unchecked", error=driver_error(exc))
            return
        if lost == self.health.triggers_lost:
            return
        self.health.triggers_lost = lost
        if lost:
            log.warning("store.triggers_missing", triggers=lost, repair=REPAIR_COMMAND)
        else:
            log.info("store.triggers_restored")

    def _lost_triggers(self) -> list[str]:
        """:func:`~.store.repair.lost_triggers` of the store.  Blocking."""
        with self.engine.connect() as conn:
            return lost_triggers(conn)

    def _hand_untold(self) -> None:
        """Tell the AMI side, once, of the markers the first apply found: the caches may
        hold objects older than the rows (:meth:`Pbx.caches_unsure`)."""
        if self._untold_found and not self._untold_handed and self.pbx is not None:
            self.pbx.caches_unsure()
        self._untold_handed = self._untold_found is not None

    def _begin_run(self) -> list[str]:
        """Before this run's first write, in one transaction: note its marker, and forget
        the registration state of servers no longer configured (logged as
        ``registration.servers_forgotten``); the other writers' markers
        (``daemon.untold_found`` when there are).  Blocking."""
        servers = [server.name for server in self.config.asterisk]
        who = f"daemon pid {os.getpid()}"

        def begin(conn: Connection) -> tuple[list[str], int]:
            found = note_untold(conn, self._untold_token, who, take_over=True)
            return found, forget_other_servers(conn, servers)

        found, forgotten = transaction(self.engine, begin)
        if found:
            log.info("daemon.untold_found", writers=len(found))
        if forgotten:
            log.info("registration.servers_forgotten", rows=forgotten, kept=servers)
        return found

    def _store_identity(self) -> FileIdentity | None:
        """The (device, inode) of the file the SQLite store's path names now; None for
        other databases, or while there is none.  Blocking (a stat)."""
        path = sqlite_file(self.config.store.url)
        return None if path is None else file_identity(path)

    def _store_replaced(self, now: FileIdentity | None) -> bool:
        """Whether ``now`` (:meth:`_store_identity`) is another file than the last full
        apply read: a backup was moved over the store."""
        return now is not None and self._store_file is not None and now != self._store_file

    def _full(self) -> Applied:
        self._full_owed = True
        now = self._store_identity()
        replaced = self._store_replaced(now)
        if now is not None:
            self._store_file = now
        if replaced:
            log.warning("store.replaced", url=self.config.store.url)
        replaced, self._rewound = replaced or self._rewound, False
        if replaced:
            # Another store: its cursor, its changes and its markers, not the old one's.
            self._untold_found, self._untold_handed = None, False
        if self._untold_found is None:
            self._untold_found = self._begin_run()
        with reading(self.engine) as conn:
            cursor = load_cursor(conn)
            if replaced:
                # Its cursor may be the old store's (a write of it left in the WAL a
                # new file inherits): never above the store's own newest change.
                cursor = min(cursor, newest_change_id(conn))
            pending = read_change_ids(conn, cursor, limit=1_000_000)
        if replaced or cursor > self.tracker.cursor:
            self.tracker = CursorTracker(cursor=cursor, grace=self.config.daemon.cursor_grace)
        self._attempt = ("full", max(pending, default=cursor))
        result = self.applier.full()
        # The cursor is saved and the feed pruned by _run once Asterisk was told: a store
        # write failing now must not keep what the target took from Asterisk (the retry
        # would find the target as wanted, and tell nothing).
        self._unsaved = self.tracker.fresh_ids(pending)
        self._prune_due = True
        _settle_heap()
        return result

    def _prune(self) -> None:
        """Drop the applied changes: the change table stays small (the cursor, not the
        rows, is what resumes), a step of :data:`PRUNE_STEP` per transaction.  Blocking."""
        upto = self.tracker.prune_limit()
        pruned = 0
        while True:
            # A transaction per step: a backlog of a million changes (a daemon back after
            # a long stop) took some 7 s, SQLite's write lock held all along, and the
            # CLI's writes waiting on it failed at their busy timeout.
            with self.engine.begin() as conn:
                step = prune_changes(conn, upto, most=PRUNE_STEP)
            pruned += step
            if step < PRUNE_STEP:
                break
            time.sleep(PRUNE_PAUSE)
        self._pruned_upto = upto
        if pruned:
            log.info("changes.pruned", upto=upto, rows=pruned)

    def _incremental(self) -> Applied | None:
        """Apply the changes the feed lists; a full apply instead when the SQLite store's
        file was replaced, or the feed's newest id went back below the cursor (a backup
        restored into the store: its new changes take ids the cursor has passed)."""
        if self._store_replaced(self._store_identity()):
            return self._full()
        with reading(self.engine) as conn:
            rows = read_unapplied(conn, self.tracker, limit=FEED_BATCH)
            # Only when nothing new was found: a wake-up with work costs no extra query.
            newest = newest_change_id(conn) if not rows else None
        if newest is not None and newest < self.tracker.cursor:
            log.warning("store.rewound", newest=newest, cursor=self.tracker.cursor)
            self._rewound = True
            return self._full()
        # The rest of a backlog wakes nobody (its notifications, its commit are past).
        self._backlog = len(rows) >= FEED_BATCH
        if not rows:
            self._advance([])
            return None
        self._attempt = ("incremental", max(r.id for r in rows))
        if any(r.entity != "user" for r in rows):
            # A profile changed: rare, re-render everyone.  Not verifying: hand edits of
            # the target are the periodic reconcile's business, not an edit's.
            result = self.applier.full(verify=False)
        else:
            result = self.applier.users_changed({r.entity_id for r in rows})
        self._unsaved = [r.id for r in rows]  # saved by _run once Asterisk was told
        return result

    def _advance(self, ids: list[int]) -> None:
        """Mark ``ids`` applied; save the durable cursor when it moved (never past a
        hole still looked for: see :meth:`CursorTracker.durable`).  Blocking."""
        before = self.tracker.durable()
        self.tracker.mark(ids, time.monotonic())
        after = self.tracker.durable()
        if after != before:
            with self.engine.begin() as conn:
                save_cursor(conn, after)

    def _reloaded_status(self, refused: str | None) -> str:
        """systemd's STATUS after a SIGHUP: the refusal when the configuration was refused,
        else what it is at READY (:meth:`_ready_status`), or the stuck apply's."""
        if refused is not None:
            return f"configuration refused, the previous one runs on: {refused}"
        if self._stuck:
            return f"apply stuck for more than {self.config.daemon.stuck_after:g} s"
        return self._ready_status()

    async def _reload_config(self) -> str | None:
        """SIGHUP: re-read the configuration; a bad one is logged and the old one kept.
        Returns why it was refused, or None when it was taken."""
        try:
            config = load_config(
                self.config_path, overrides=self.config_overrides, sets=self.config_sets
            )
        except ProvisionerError as exc:
            log.error("config.reload_failed", error=_describe(exc))
            return _describe(exc)
        fixed = _needs_restart(config, self.config)
        if self.pbx is None and config.asterisk != self.config.asterisk:
            # Started without any server: nothing runs the AMI side to take one up.
            fixed.append("asterisk")
            config = config.model_copy(update={"asterisk": self.config.asterisk})
        if fixed:
            # The AMI sessions and the store's engine live as long as the process: say so
            # rather than run on with settings that are not the file's.
            log.warning("config.restart_needed", settings=fixed)
        if _placement(config) != _placement(self.config):
            # Another kind, path, database, template directory or layout (shards): a target
            # built anew (off the loop: it may open a database), which the full apply below
            # fills; memory no longer mirrors what is there until it has.  Render settings
            # alone (transports, codecs…) keep the target and its caches.
            try:
                target = await in_worker(_checked_target, config, self.engine)
            except (ProvisionerError, OSError, DBAPIError) as exc:
                log.error("config.reload_failed", error=_describe(exc))
                return _describe(exc)
            old, self.applier.target = self.applier.target, target
            self.applier.synced = False
            old_engine = getattr(old, "engine", None)
            if isinstance(old_engine, Engine) and old_engine is not self.engine:
                old_engine.dispose()  # a realtime database of its own (target.url)
            if self.pbx is not None:
                self.pbx.follow_target(config)
            log.info("config.target_changed", kind=config.target.kind, path=config.target.path)
            await self._say_what_is_left(self.config, config)
        dirs = template_dirs(config)
        if dirs != template_dirs(self.config):
            # Watch the new override directory (and no longer the old one).
            self._templates_watch.set()
            self._templates_watch = asyncio.Event()
            self._spawn(self._watch_templates(dirs, template_stamp(dirs)))
        if config.log != self.config.log:
            configure_logs(config.log.level, config.log.format)
        if config.daemon.reconcile_interval != self.config.daemon.reconcile_interval:
            # Counted from now: the main loop read the old interval when it last set it.
            every = config.daemon.reconcile_interval
            self._next_reconcile = time.monotonic() + every if every else float("inf")
        # What runs: the restart-only settings stay those in effect, so the next SIGHUP
        # still finds them changed (and says so again) until a restart applies them.
        self.config = config = _in_effect(config, self.config)
        self.tracker.grace = config.daemon.cursor_grace
        self.applier.settings = RenderSettings.from_config(config)
        self.applier.max_removal_fraction = config.daemon.max_removal_fraction
        if self.pbx is not None:
            self.pbx.stuck_after = config.daemon.stuck_after
            # With the [ami] settings in effect (a new [ami] waits for a restart).
            self.pbx.follow_servers(config)
        _reread_templates(self.applier.target)
        self.templates_changed.set()
        log.info("config.reloaded", file=config.source)  # ``source`` is the logger's name
        return None

    async def _say_what_is_left(self, old: Config, new: Config) -> None:
        """Log ``target.switched`` (a warning) when a SIGHUP moved the target elsewhere
        (another kind, config file or realtime database) and the old one still holds
        endpoints: its file (and shard directory) or its realtime rows.  They are left as
        they are: Asterisk may still ``#include`` that file or read those rows, and
        emptying them here could empty Asterisk; the operator removes them (README)."""
        store_url = self.config.store.url  # the running store, which a SIGHUP keeps
        before, after = _target_where(old, store_url), _target_where(new, store_url)
        if before == after:
            return
        left = await in_worker(_left_behind, old, new, store_url)
        if left:
            log.warning(
                "target.switched",
                old_kind=old.target.kind,
                old_where=before[1],
                new_kind=new.target.kind,
                new_where=after[1],
                left=left,
                todo="remove what is left, and its #include or sorcery mapping, once Asterisk "
                "reads the new target: until then Asterisk may hold both",
            )

    async def _watch_templates(self, dirs: list[Path], since: TemplateStamp) -> None:
        """Set ``templates_changed`` on any change in ``dirs`` after ``since`` (their stamp
        when the templates were last read), until the daemon stops or a SIGHUP names other
        directories (which starts another watcher)."""
        done = self._templates_watch
        watching = template_wakeups(dirs, self.templates_changed, done, since=since)
        watcher = asyncio.ensure_future(watching)
        await wait_first(self.stop, done)
        done.set()
        await watcher

    async def _serve_metrics(self, port: int) -> None:
        """Serve ``/metrics`` on ``port``; while the port is taken (another process, a
        previous run still stopping), log it once (``metrics.serve_failed``) and try again
        every ``METRICS_RETRY`` seconds: provisioning never waits for metrics."""
        failed = False
        while True:
            try:
                self.metrics.serve(port)
            except OSError as exc:
                if not failed:
                    log.error(
                        "metrics.serve_failed", port=port, error=str(exc), retry_in_s=METRICS_RETRY
                    )
                failed = True
                if await sleep_unless(self.stop, METRICS_RETRY):
                    return
                continue
            if failed:
                log.info("metrics.serving", port=port)
            return

    async def _watchdog(self, interval: float) -> None:
        """Feed systemd's watchdog every ``interval`` seconds, from the event loop itself
        (a blocked loop starves it), unless an apply is stuck (:meth:`_apply_stuck`) or
        a store write of the AMI side is (:meth:`_ami_writes_stuck`)."""
        while not self.stop.is_set():
            writes_stuck = self._ami_writes_stuck()
            if not (self._stuck or writes_stuck):
                self.notifier.watchdog()
            await sleep_unless(self.stop, interval)

    def _ami_writes_stuck(self) -> bool:
        """Whether a store write of the AMI side (registration state, a note of what is
        owed) has run past ``daemon.stuck_after``: a lock never granted stops the phones'
        state from flowing as surely as a stuck apply stops edits.  A change either way
        is told to systemd's status and written to the health record at once (the
        record's per-server ``write_stuck_since``; the heartbeat writes it too)."""
        stuck = self.pbx is not None and self.pbx.writes_stuck()
        if stuck != self._writes_stuck:
            self._writes_stuck = stuck
            after = self.config.daemon.stuck_after
            if stuck:
                self.notifier.status(f"registration write stuck for more than {after:g} s")
            elif not self._stuck:
                self.notifier.status("provisioning")
            self._write_health_soon()
        return stuck

    async def _heartbeat(self) -> None:
        # Keeps the health record fresh while idle, with the AMI connections' state.
        while not await sleep_unless(self.stop, HEARTBEAT_INTERVAL):
            self._write_health()

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as one of the daemon's tasks (awaited, or cancelled, at the
        shutdown); once the shutdown has ended them (:meth:`_end_tasks`) it is refused
        (a coroutine closed unrun, ``daemon.spawn_refused``): nothing would await it."""
        if self._closed:
            log.warning("daemon.spawn_refused", task=getattr(coro, "__qualname__", repr(coro)))
            if isinstance(coro, Coroutine):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)

    def _task_ended(self, task: asyncio.Future[Any]) -> None:
        """A task that ends with an error stops the daemon (logged at once, as
        ``daemon.task_failed``): one running on without its AMI side or a wake-up
        source would look healthy and do half its job, where an exit has systemd
        restart a whole one."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        # A database error's text quotes the statement's parameters (digests): no trace.
        trace = None if _holds_db_error(exc) else exc
        log.error("daemon.task_failed", error=_describe(exc), exc_info=trace)
        if self._failure is None:
            self._failure = exc
        self._stop()

    def _count(self, kind: str, change: Change) -> None:
        m = self.metrics
        m.syncs.labels(kind=kind, result="ok").inc()
        m.objects.labels(op="added").inc(len(change.added))
        m.objects.labels(op="updated").inc(len(change.updated))
        m.objects.labels(op="removed").inc(len(change.removed))
        m.provisioned.set(len(self.applier.objects))
        m.conflicts.set(self.applier.conflicted)
        m.skipped.set(self.applier.skipped_now)

    def _export_ami(self, servers: dict[str, dict[str, Any]]) -> None:
        """Turn the AMI links' running totals into Prometheus counters and gauges."""
        m = self.metrics
        for name in {name for name, _ in self._exported} - servers.keys():
            # A server a SIGHUP took out: none of its series is served any more.
            keys = [key for n, key in self._exported if n == name]
            m.drop_server(
                name, [key.removeprefix("reload:") for key in keys if key.startswith("reload:")]
            )
            self._exported = {k: v for k, v in self._exported.items() if k[0] != name}
        for name, h in servers.items():
            # NaN while the server is not read: its last count is no count of now.
            online = h["online"]
            m.online.labels(server=name).set(math.nan if online is None else online)
            m.live.labels(server=name).set(1 if h["live"] else 0)
            m.owed.labels(server=name).set(h["owed"])
            m.not_live.labels(server=name).set(h["rejected"])
            m.reconnects.labels(server=name)  # a server with none says 0, not nothing
            totals = {
                "events": h["events"],
                "reconnects": h["reconnects"],
                **{f"reload:{k}": v for k, v in h["reloads"].items()},
            }
            for key, total in totals.items():
                # Less than exported: the name's totals start from 0 again (a SIGHUP took
                # the server out and a later one put it back before this export saw it
                # gone; a link made anew for a changed entry keeps its name's totals).
                previous = self._exported.get((name, key), 0)
                delta = total - (previous if previous <= total else 0)
                self._exported[(name, key)] = total
                if delta <= 0:
                    continue
                if key == "events":
                    m.events.labels(server=name).inc(delta)
                elif key == "reconnects":
                    m.reconnects.labels(server=name).inc(delta)
                else:
                    m.reloads.labels(server=name, result=key.split(":", 1)[1]).inc(delta)

    def _write_health_soon(self) -> None:
        """Write the health record shortly (at most one write per ``HEALTH_DELAY``)."""
        if self._health_due is None:
            loop = asyncio.get_running_loop()
            self._health_due = loop.call_later(HEALTH_DELAY, self._write_due_health)

    def _write_due_health(self) -> None:
        self._health_due = None
        self._write_health()

    def _write_health(self) -> None:
        self.health.listen_deaf = any(s.hearing.deaf for s in self.wake_sources if s.hearing)
        if self.pbx is not None:
            self.health.asterisk = self.pbx.health()
            self._export_ami(self.health.asterisk)
        try:
            written = write_health(
                Path(self.config.daemon.state_dir), self.health, beside=self._burst
            )
        except OSError as exc:
            log.warning("health.write_failed", error=str(exc))
            return
        if not written and not self._health_yielded:
            self._health_yielded = True
            state_dir = self.config.daemon.state_dir
            if self._burst:
                # The service runs beside this burst: its record speaks for the state.
                log.info("health.left_to_daemon", state_dir=state_dir)
            else:
                # A daemon started after this one runs on the same state directory (a
                # restart overlapping this one's stop): its record stands.
                log.warning("health.newer_daemon", state_dir=state_dir)


def _settle_heap() -> None:
    """Collect garbage once, then exempt every surviving object from future collections.

    After a full reconcile the heap holds every user's rendered objects (millions of
    objects at 100,000 users).  Left to itself, the garbage collector would now and then
    walk them all in a full collection (~0.1 s at 10,000 users, more at 100,000), in the
    middle of some edit's apply.  Frozen, they are still freed by reference counting when
    the next full reconcile replaces them; ``unfreeze`` first puts the previous set back
    under collection, so garbage cycles among them live one reconcile interval at most.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


#: Failures of an apply worth retrying: the store or the disk may come back, and the
#: pooled connections all in use until the pool's timeout may be free again.  The
#: config-file target raises the disk's OS errors (full, read-only, a directory that
#: cannot be made, its writers' lock held too long) as TargetWriteFailed.
_RETRYABLE = (*STORE_DOWN, StoreUnavailable, TargetWriteFailed, OSError)


def _warn_open_secret_files(config: Config) -> None:
    """Log ``config.secret_file_open`` (server, file, rule; never the secret) for each
    ``secret_file`` others may read or group or others may write, and
    ``config.secret_file_unchecked`` for one that cannot be looked at: the daemon still
    starts (the secret was read at load; refusing it would stop a running site at
    upgrade), ``check`` fails it."""
    for server in config.asterisk:
        if server.secret_file is None:
            continue
        path = str(server.secret_file)
        try:
            rule = secret_file_problem(server.secret_file)
        except OSError as exc:
            log.warning(
                "config.secret_file_unchecked", server=server.name, path=path, error=exc.strerror
            )
            continue
        if rule is not None:
            log.warning("config.secret_file_open", server=server.name, path=path, rule=rule)


def _named(exc: BaseException) -> BaseException:
    """``exc``, an apply's failure that ends ``run --burst``, as an error the command line
    turns into its exit code: every pooled connection taken until the pool's timeout is
    :class:`StoreUnavailable` (7), an OS error :class:`TargetWriteFailed` (9); a database
    error (which ``cli.main`` reports as 7 without quoting it) and our own errors as
    they are."""
    if isinstance(exc, PoolTimeout):
        return StoreUnavailable(f"store unavailable: {exc}")
    if isinstance(exc, OSError):
        where = f" {str(exc.filename)!r}" if exc.filename is not None else ""
        return TargetWriteFailed(f"cannot apply: {exc.strerror or exc}{where}")
    return exc


def _owes_asterisk(change: Change) -> bool:
    """Whether an apply's ``change`` is for the AMI side: an object changed, or the target
    was written with none changed (the files rewritten in another layout, target.shards:
    Asterisk loads them only with a reload)."""
    return not change.empty or change.wrote


def _next_retry(delay: float) -> float:
    """The pause before the next retry after one of ``delay`` (0: the first failure)."""
    return min(30.0, delay * 2) if delay else 0.5


def _log_lock_wait(tries: int, waiting: float, since_logged: float, error: str) -> bool:
    """Log the ``tries``-th failed try to take the daemon's lock again: the first as
    ``daemon.lock_waits``, the 2nd, 4th, 8th... and any :data:`STILL_FAILING_EVERY`
    seconds after the last line as ``daemon.lock_still_waits`` (warnings), the others at
    debug level: one every :data:`LOCK_CHECK` (5 s) was 720 warnings an hour of a store
    outage.  True when a warning was logged."""
    if tries == 1:
        log.warning("daemon.lock_waits", error=error, retry_in_s=LOCK_CHECK)
        return True
    if worth_repeating(tries, since_logged, STILL_FAILING_EVERY):
        log.warning(
            "daemon.lock_still_waits",
            tries=tries,
            waiting_for_s=round(waiting, 1),
            error=error,
            retry_in_s=LOCK_CHECK,
        )
        return True
    log.debug("daemon.lock_waits_again", tries=tries, error=error)
    return False


def _holds_db_error(exc: BaseException) -> bool:
    """Whether ``exc``, its causes and contexts, or an exception group's members hold a
    database error (whose text quotes the statement's parameters)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _describe(exc: BaseException) -> str:
    """One line naming ``exc`` for the log and the exit's message; an exception group
    (the AMI side runs its links in a task group) by the errors it holds."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(member) for member in exc.exceptions)
    if isinstance(exc, ProvisionerError):
        return exc.message
    if isinstance(exc, DBAPIError):
        return f"store unavailable: {driver_error(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _running(tasks: Iterable[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Those of ``tasks`` not done yet."""
    return {task for task in tasks if not task.done()}
