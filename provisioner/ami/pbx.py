"""The daemon's Asterisk side: what an applied change needs, and registration state back.

Per ``[[asterisk]]`` server, one :class:`Link` keeps an :class:`AmiClient`, its
:class:`ReloadCoordinator` and :class:`PjsipOps`, what is owed to it, and a registration
book (endpoint -> :class:`EndpointRegistration`) folded from events.  :class:`AmiPbx`
runs, per link, the client, the reloads, the change loop, the snapshots and the flusher.

- After an apply (:meth:`AmiPbx.applied`, never blocking) the change loop hands the
  changes to :func:`~provisioner.ami.changes.apply_changes`: reloads, cache expiries,
  contact removals and the check that each endpoint is live (see that module).
- Registration events mark endpoints dirty; a flusher writes them in one
  transaction ``FLUSH_DELAY`` after the first (the other events of the same
  registration come within milliseconds), and whatever became dirty during a write
  in the next one as soon as it ends, so a storm of thousands of events costs a few
  transactions and its last events wait for one write, not for a timer (on
  PostgreSQL a large batch goes as two transactions at once: :func:`split_batch`).  Each
  (re)connect takes a full ``PJSIPShowContacts`` snapshot.  A ``SuccessfulAuth`` of
  an endpoint that no status event follows within ``CONFIRM_WINDOW`` (Asterisk does not
  track it yet: added since its last reload) has that endpoint's contacts looked up
  (``PJSIPShowEndpoint``); many at once want one (rate-limited) snapshot instead.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..accounts import utcnow
from ..aio import doubling, sleep_unless, wait_first
from ..config import AmiSettings, AsteriskServer, Config
from ..errors import ProvisionerError
from ..gcpause import collector_paused
from ..logs import get_logger, worth_repeating
from ..store.engine import STORE_DOWN, reading, transaction
from ..store.registrations import (
    BATCH_DIALECTS,
    EXPIRED_AFTER,
    LIVE_BEAT,
    BatchEntry,
    ContactRow,
    RowBatch,
    SummaryRow,
    contact_text,
    contacts_text,
    endpoint_writer,
    epoch_text,
    forget_servers,
    mark_live,
    replace_server_snapshot,
    time_text,
    write_batch,
)
from ..store.state import load_state, load_states, put_state
from ..targets import Change
from ..threads import in_worker, start_in_worker
from .actions import AmiMessage
from .changes import (
    OWED_RETRY,
    VERIFY_PAUSE,
    AfterReload,
    Owed,
    apply_changes,
    final_notes,
    loaded_digest_key,
    note_owed,
    notes_unsure,
    owed_expiries_key,
    owed_removals_prefix,
    reload_owed_key,
    request_reload,
    resume_owed,
    stop_owes,
)
from .client import AmiClient
from .clock import MOVE as CLOCK_MOVE
from .clock import AsteriskClock
from .loaded import (
    FileDigests,
    OpenedFiles,
    config_files,
    files_digest,
    open_files,
    owes_reload,
)
from .registration import (
    ContactState,
    EndpointRegistration,
    apply_contact_status,
    apply_event,
    contact_object_name,
    counts_online,
    derived_object_name,
    endpoint_of,
    summarize,
)
from .reload import PjsipOps, ReloadCoordinator, ReloadOutcome

__all__ = ["AmiPbx", "Link", "snapshot_gap", "split_batch", "take_due"]

log = get_logger(__name__)
_T = TypeVar("_T")
#: What became of a snapshot (see :meth:`AmiPbx._take_snapshot`).
_Snapshot = Literal["stored", "unstored", "failed", "failed_live"]

#: Seconds the first dirty endpoint waits for more before a write starts: one
#: registration's ContactStatus, PeerStatus and DeviceStateChange come within a few
#: milliseconds of each other and are written together.
FLUSH_DELAY = 0.02
#: Seconds before the first retry of a failed registration write, doubling up to the
#: second: the database may be restarting; the book keeps the latest state meanwhile.
STORE_RETRY_BASE = 0.5
STORE_RETRY_MAX = 30.0
#: Seconds at most between two ``registration.store_retry`` warnings of one run of
#: refused writes (the 1st, 2nd, 4th... are warnings too; the others debug lines).
STORE_SAY_EVERY = 300.0
#: Dirty endpoints that end the waiting at once: during a long write the next batch
#: (at most about this size) is built meanwhile, keeping batches and memory bounded.
FLUSH_BATCH = 5000
#: A flusher batch of at least this many endpoints is written in ``PARALLEL_WRITES``
#: transactions at once, on PostgreSQL (:func:`split_batch`).
PARALLEL_MIN = 1000
PARALLEL_WRITES = 2
SNAPSHOT_MIN_GAP = 2.0
#: Snapshots are at least this many times their last one's duration apart: at 100k
#: registered phones ``PJSIPShowContacts`` is 100k events (seconds of Asterisk's time
#: and of this connection's), and phones of endpoints Asterisk does not track, each
#: registration of which wants a snapshot, must not keep Asterisk listing contacts.
SNAPSHOT_GAP_FACTOR = 10.0
#: ``registration.changed`` lines per flush, at most (the rest are counted).
LOG_CHANGES_LIMIT = 50
#: Seconds a ``SuccessfulAuth`` waits for a status event of its endpoint before that
#: endpoint is taken for one Asterisk does not track.  A REGISTER's ``SuccessfulAuth``
#: always comes before its status events, which trail the SIP exchange by up to 0.6 s
#: (README of ../shared/asterisk): deciding at once had every first registration since
#: the start (and every one of an Asterisk restart's storm) want a full snapshot.
CONFIRM_WINDOW = 1.0
#: Untracked endpoints looked up one by one (``PJSIPShowEndpoint``) at most at once;
#: more want one ``PJSIPShowContacts`` snapshot instead.
LOOKUP_LIMIT = 20
#: Seconds at the most between tries of a snapshot that keeps failing on a session
#: that stays up (refused, unanswered), doubling from ``SNAPSHOT_MIN_GAP``.
SNAPSHOT_RETRY_MAX = 60.0
#: Seconds after a contact's expiry (as a snapshot or lookup told it) before it is seen
#: to: Asterisk sends no event of an expiry it does not track (an endpoint added since
#: its last reload), nor of a refresh, and an event can be lost, so the phone would
#: stay "online" in ``status`` for good.  A phone that authenticated since the expiry
#: was told (its refresh's ``SuccessfulAuth``) is there: its contact's expiry becomes
#: unknown (no lookup: at 100k phones that is one per phone per registration).  Any
#: other has its endpoint looked up: a contact gone leaves the book.
EXPIRY_GRACE = 5.0
#: Seconds Asterisk's clock may be off this host's before ``ami.clock_skew`` says so
#: (once per server): past a few seconds the skew eats into ``EXPIRY_GRACE``, and only
#: the stamps Asterisk sends (``timestampevents``, Ping) let the daemon read its expiries.
CLOCK_SKEW_LOG = 2.0
_EVENTS = ("ContactStatus", "PeerStatus", "DeviceStateChange", "SuccessfulAuth")


def rows(reg: EndpointRegistration) -> tuple[tuple[ContactRow, ...], SummaryRow]:
    """An endpoint's registration as the store's plain tuples (pure; the flusher's path:
    no record object per contact and endpoint).  Tuples only (no list): the garbage
    collector drops them from its lists after one pass, so a storm's batch does not
    bring on full collections.  A contact's key is its ``ObjectName`` as Asterisk names
    it (derived from the AOR and URI when an event did not tell it): short, so two long
    URIs that differ only past the key column's size are two contacts, not one.
    Contacts and summary carry the time of the endpoint's last status event (``None``,
    the write's time, when none came): a rewrite (a reconnect's snapshot) is no change.
    An endpoint Asterisk said ``INVALID`` (gone) has no contact stored: those a snapshot
    still lists are a deleted endpoint's, kept until they expire, and no phone is usable
    through them (``status`` would count them online beside an offline summary)."""
    last = reg.last_change
    changed = None if last is None else epoch_text(last)
    held = reg.contacts if reg.exists else ()
    contacts: tuple[ContactRow, ...]
    if len(held) == 1:  # the storm's case: no list, no loop
        contacts = (_contact_row(held[0], changed),)
    else:
        contacts = tuple([_contact_row(c, changed) for c in held])
    state = summarize(reg)
    return contacts, (
        "offline" if state == "unknown" else state,
        reg.device_state or "",
        "",
        changed,
    )


def batch_entry(endpoint: str, reg: EndpointRegistration, stamp: str) -> BatchEntry:
    """``endpoint``'s registration ``reg`` as its entry of a :class:`RowBatch` (``stamp``:
    the batch's time, for a contact's missing change time): what
    ``RowBatch.of({endpoint: rows(reg)}, ...)`` makes of it (a test checks they agree),
    without the rows between, for the flusher where the store takes batches.  An
    endpoint of one contact (a storm's) has its contact's text made from the record's
    values at once: no row, no fitted copy of it, no list (a 50k batch 4.1 to 3.1 µs an
    endpoint with :meth:`RowBatch.of_entries`)."""
    last = reg.last_change
    changed = None if last is None else epoch_text(last)
    held = reg.contacts if reg.exists else ()
    contacts: str | None
    if len(held) == 1:
        aor, uri, status, rtt, agent, source, expires_at, name = held[0]
        contacts = contact_text(
            name or derived_object_name(aor, uri),
            uri,
            status,
            agent or "",
            source or "",
            rtt,
            None if expires_at is None else epoch_text(expires_at),
            changed or stamp,
        )
    else:
        contacts = contacts_text(tuple([_contact_row(c, changed) for c in held]), stamp)
    state = summarize(reg)
    return (
        endpoint,
        "offline" if state == "unknown" else state,
        reg.device_state or "",
        "",
        changed,
        contacts,
    )


def _contact_row(contact: ContactState, changed: str | None) -> ContactRow:
    """One contact of :func:`rows`, changed at ``changed``; its key as
    :func:`~.registration.contact_object_name` makes it (inline: one unpacking of the
    record, no pair returned)."""
    aor, uri, status, rtt, agent, source, expires_at, name = contact
    return (
        name or derived_object_name(aor, uri),
        uri,
        status,
        agent or "",
        source or "",
        rtt,
        None if expires_at is None else epoch_text(expires_at),
        changed,
    )


@dataclass
class Totals:
    """The running totals of one server name over the daemon's life: shared by the links
    a SIGHUP makes anew for that name (its entry changed), so its counts (the health
    record's ``reconnects``, ``events``, ``reloads``, and the Prometheus counters made
    from them) only ever rise, where each new link's client would count from 0."""

    #: Main AMI sessions logged in.
    sessions: int = 0
    #: Registration events ingested.
    events: int = 0
    #: reload result (ok, busy, error, ...) -> how many.
    reload_results: dict[str, int] = field(default_factory=dict)

    def add_session(self) -> None:
        """Count a session logged in (an ``on_connected`` callback of the main client)."""
        self.sessions += 1

    def add_reload(self, result: str) -> None:
        """Count a reload that ended with ``result``."""
        self.reload_results[result] = self.reload_results.get(result, 0) + 1

    @property
    def reconnects(self) -> int:
        """Sessions after the first."""
        return max(0, self.sessions - 1)


@dataclass
class Link:
    """One Asterisk server: its connection, reloads, queries and registration book."""

    name: str
    client: AmiClient
    reloads: ReloadCoordinator
    ops: PjsipOps
    #: Kind (endpoint, auth, aor) -> the sorcery memory caches in front of that kind.
    caches: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    book: dict[str, EndpointRegistration] = field(default_factory=dict)
    #: The endpoints whose latest state the flusher owes the store, in the order they
    #: were marked (a dict of ``None``, not a set): the order their records were made, so
    #: the flusher's rows walk the book's records in memory order, not a set's hash order
    #: (a 50k storm's rows 5.0-6.4 to 3.3-4.1 µs an event: fewer cache misses).
    dirty: dict[str, None] = field(default_factory=dict)
    snapshot_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    last_snapshot: float = 0.0
    changes: asyncio.Queue[Change] = field(default_factory=asyncio.Queue)
    not_live: int = 0
    #: Endpoints this run's last check of each found not live as rendered, and no later
    #: check held or removal took away: what ``provisioner_endpoints_not_live`` counts.
    rejected: set[str] = field(default_factory=set)
    #: endpoint -> summary last logged, so ``registration.changed`` fires on changes only.
    reported: dict[str, str] = field(default_factory=dict)
    #: Set when ``FLUSH_BATCH`` endpoints are dirty: the flusher writes without waiting.
    flush_now: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when some endpoint is dirty (cleared when the flusher takes them).
    dirtied: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set while no registration write is in flight.
    store_idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Registration writes that failed in a row (0 once one succeeds).
    store_failures: int = 0
    #: Whether this run of failed writes was logged (``registration.store_failed`` is
    #: logged at its first only), and when its last warning was (monotonic seconds).
    store_failed_said: bool = False
    store_said_at: float = 0.0
    #: Set when the daemon found the store back from an outage during a pause after failed
    #: store writes (:meth:`AmiPbx.store_answered`): the pause ends, so the registration
    #: state is written within an apply of the store's return, not after a pause of up
    #: to ``STORE_RETRY_MAX``.
    store_back: asyncio.Event = field(default_factory=asyncio.Event)
    #: Store writes of this server running now (registration batches, snapshots, notes),
    #: since when (wall clock) some has run without a pause, and whether that is past
    #: ``daemon.stuck_after`` (see :meth:`AmiPbx._store`), with the timer that says so.
    writes_running: int = 0
    write_since: float | None = None
    write_stuck: bool = False
    write_stuck_due: asyncio.TimerHandle | None = None
    #: Writes other than batches (a snapshot, the post-apply problems), waiting for the
    #: flusher, which writes them in turn, each with what learns whether it was stored.
    jobs: list[tuple[Callable[[Connection], object], asyncio.Future[bool]]] = field(
        default_factory=list
    )
    #: Set once the flusher has ended: nothing would write a job any more.
    flusher_ended: bool = False
    flusher_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Cache expiries and contact removals not yet sent (see :class:`Owed`).
    owed: Owed = field(default_factory=Owed)
    #: The client session whose snapshot last filled the book (-1: none yet).
    snapshot_session: int = -1
    #: The client session whose snapshot was last stored (-1: none yet).
    stored_session: int = -1
    #: Set when the store's state of this server may have become live or stopped being
    #: so (a snapshot stored, the session lost, a write refused): see :meth:`live`.
    live_changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: True while a snapshot is asked for and not yet in the book.
    snapshot_running: bool = False
    #: While ``PJSIPShowContacts`` runs, the events folded since it was sent, in order:
    #: Asterisk sends the events queued while it listed after the list's end, and they
    #: are folded again over the snapshot, which is older than they are.
    snapshot_events: list[Mapping[str, str]] | None = None
    #: Set while no snapshot's ``PJSIPShowContacts`` is under way (see ``snapshot_events``).
    listing_idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set and cleared at once (waking its waiters) when a snapshot filled the book, when
    #: a snapshot attempt ended, and when the snapshot loop ended (``snapshots_ended``).
    snapshot_turned: asyncio.Event = field(default_factory=asyncio.Event)
    snapshots_ended: bool = False
    #: Seconds the last answered snapshot's ``PJSIPShowContacts`` took (a failed one's
    #: time is not kept: see :meth:`AmiPbx._take_snapshot`).
    snapshot_took: float = 0.0
    #: Snapshots failed in a row (refused, unanswered, their session lost; 0 once
    #: Asterisk answers one), and why the last one failed ("" then): the health record
    #: shows both; ``registration.snapshot_failed`` is a warning at the first, and when
    #: the reason changes.
    snapshot_failures: int = 0
    snapshot_error: str = ""
    #: Endpoints applied but not yet verified (see :func:`~.changes.verify_some`), each
    #: with the number of the change that owes it (a newer change owes a new check).
    unverified: dict[str, int] = field(default_factory=dict)
    #: A reload is noted owed in the store (see :func:`~.changes.request_reload`).
    reload_noted: bool = False
    #: Reloads failed in a row (busy past its retries, timed out, refused), the pending
    #: retry of the last one, and what waits for that retry's end (see
    #: :func:`~.changes.retry_reload_later`).
    reload_failures: int = 0
    reload_retry: asyncio.TimerHandle | None = None
    #: The AMI side is stopping (see :meth:`AmiPbx._note_at_stop`): no retry is armed.
    stopping: bool = False
    #: The stop noted in the store whatever it left owed (or nothing needed noting):
    #: every change handed over was sent or will be by the next run (:meth:`AmiPbx.told_all`).
    stop_noted: bool = False
    #: What the failed reloads' ends owe, merged into one record (bounded however long
    #: reloads keep failing), served by the retried reload.
    after_retry: AfterReload | None = None
    #: The future shared by the requests waiting for a reload that has not started (see
    #: :func:`~.changes.request_reload`), and what the ends of reloads asked for owe, one
    #: merged record per future (bounded however many edits a long outage sees).
    reload_joined: asyncio.Future[ReloadOutcome] | None = None
    after_reload: dict[asyncio.Future[ReloadOutcome], AfterReload] = field(default_factory=dict)
    #: Realtime endpoints Asterisk may not track yet: added since the last reload it
    #: accepted (Asterisk reports status only for endpoints loaded at its start or last
    #: reload).  None: any endpoint may be (the last run owed a reload, or rows were
    #: written that no one told Asterisk of).  A config file's endpoint exists in
    #: Asterisk only once a reload loaded it, tracked: none ever is.  Only these have a
    #: ``SuccessfulAuth`` no status event follows looked up: a tracked phone's refresh
    #: sends none either, and at 100k phones, looking up each refresh (or listing every
    #: contact, above ``LOOKUP_LIMIT`` at once) would keep Asterisk busy for nothing.
    untracked: set[str] | None = field(default_factory=set)
    #: Reowned endpoint (given to another user, or its user renamed) -> the contacts the
    #: book held for it then: the previous owner's phone's, owed removal (after the
    #: reload, for a config file).  Kept out of the book, whose state the store files
    #: under the endpoint's new owner: that user was shown online with the other's
    #: phone until the removal.  Removals delete these as the book's own.
    previous: dict[str, tuple[ContactState, ...]] = field(default_factory=dict)
    #: What ``untracked`` held when the reload in flight was sent: tracked once it ends
    #: well, untracked again if it fails.
    untracked_sent: set[str] | None = field(default_factory=set)
    #: Endpoints whose ``SuccessfulAuth`` no status event followed yet -> the monotonic
    #: time after which it is taken for untracked (:data:`CONFIRM_WINDOW`), in that order.
    unconfirmed: dict[str, float] = field(default_factory=dict)
    #: Set when an endpoint becomes unconfirmed.
    unconfirmed_added: asyncio.Event = field(default_factory=asyncio.Event)
    #: Endpoints taken off ``unconfirmed`` whose lookup has not put its contacts in the
    #: book yet.
    looking_up: set[str] = field(default_factory=set)
    #: (epoch second to look at, endpoint, epoch second told), a heap: the contacts'
    #: expiries (see :data:`EXPIRY_GRACE`), and what says an earlier one came.
    expiries: list[tuple[float, str, float]] = field(default_factory=list)
    expiry_added: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the estimate of Asterisk's clock moved (or became known): the expiries
    #: watched on the old one are watched anew (:meth:`AmiPbx._expiry_checks`).
    clock_moved: bool = False
    #: ``ami.clock_skew`` was logged for this server.
    skew_logged: bool = False
    #: Verification rounds failed in a row, and the monotonic time of the next round.
    verify_failures: int = 0
    verify_after: float = 0.0
    #: The config files as opened before the last reload Asterisk accepted, waiting for
    #: their digest to be noted (see :mod:`~provisioner.ami.loaded`), and what says so.
    loaded: OpenedFiles | None = None
    loaded_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    #: A batch is being applied (:func:`~.changes.apply_changes`), a loaded digest noted.
    applying: bool = False
    noting_loaded: bool = False

    #: The running totals of this server's name, this link's and those of the links it
    #: replaced (see :class:`Totals`).
    totals: Totals = field(default_factory=Totals)
    #: Set to stop this server's sessions and loops (the daemon's stop, or a SIGHUP
    #: that took the server out), and those tasks once started.
    halt: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store_idle.set()
        self.listing_idle.set()

    def book_complete(self) -> bool:
        """Whether the book holds every contact Asterisk has: a snapshot of this session
        filled it, and none is wanted or under way since.  Events keep it whole after
        that, but for an endpoint Asterisk does not track (added since its last reload):
        after its ``SuccessfulAuth``, until its contacts are looked up (the lookup
        answered), this is False.  The snapshot's store write may still be to come: it is
        queued as the book is filled, and the flusher writes it before any state dirtied
        after that (a removal's), so the store ends as the book is."""
        return (
            self.client.connected
            and self.snapshot_session == self.client.sessions
            and not self.snapshot_running
            and not self.snapshot_wanted.is_set()
            and not self.unconfirmed
            and not self.looking_up
        )

    def live(self) -> bool:
        """Whether the store's registration state of this server is kept up to date now:
        the session is up, its snapshot stored, and no registration write since was
        refused.  What the daemon marks for ``status`` (:meth:`AmiPbx._liveness`)."""
        return (
            self.client.connected
            and self.stored_session == self.client.sessions
            and self.store_failures == 0
        )

    def snapshot_coming(self) -> bool:
        """Whether this session's first snapshot is wanted or under way, and has not
        filled the book yet: a connect wants one, which may wait for the last session's
        snapshot to be stored and for the snapshots' spacing before it starts."""
        return (
            self.client.connected
            and self.snapshot_session != self.client.sessions
            and not self.snapshots_ended
            and (self.snapshot_wanted.is_set() or self.snapshot_running)
        )

    def snapshot_turn(self) -> None:
        """Wake what waits for a snapshot (see ``snapshot_turned``)."""
        self.snapshot_turned.set()
        self.snapshot_turned.clear()

    def forget_contact(self, endpoint: str, object_name: str) -> None:
        """Drop the contact ``object_name`` (deleted from astdb) from ``endpoint``'s record
        (and from its previous owner's, :attr:`previous`) and have the store written:
        Asterisk sends no event for such a deletion."""
        held = self.previous.get(endpoint)
        if held is not None:
            kept_before = tuple(c for c in held if contact_object_name(c)[0] != object_name)
            if kept_before:
                self.previous[endpoint] = kept_before
            else:
                del self.previous[endpoint]
        reg = self.book.get(endpoint)
        if reg is None:
            return
        kept = tuple(c for c in reg.contacts if contact_object_name(c)[0] != object_name)
        if len(kept) != len(reg.contacts):
            # With its last contact gone, a ``Reachable`` peer state is stale (as in a
            # snapshot that lists none): it would keep the endpoint "online".
            peer = None if not kept and reg.peer_status == "Reachable" else reg.peer_status
            self.book[endpoint] = reg._replace(contacts=kept, peer_status=peer)
            self.mark_dirty((endpoint,))

    def asterisk_now(self) -> float:
        """Asterisk's time now (epoch seconds), as its stamps tell it
        (:mod:`~provisioner.ami.clock`); this host's while none was ever seen."""
        return self.client.clock.now(time.time())

    def watch_expiries(self, regs: Iterable[EndpointRegistration]) -> None:
        """Have each contact of ``regs`` with a known expiry looked up again once it has
        passed on Asterisk's clock (:data:`EXPIRY_GRACE` after it; one already past: that
        long from now).  An entry holds its time on Asterisk's clock, and this host's
        time it was told."""
        heap = self.expiries
        first = heap[0][0] if heap else None
        now = time.time()
        soonest = self.client.clock.now(now) + EXPIRY_GRACE
        grace = EXPIRY_GRACE
        entries = [
            (at if (at := c.expires_at + grace) > soonest else soonest, reg.endpoint, now)
            for reg in regs
            for c in reg.contacts
            if c.expires_at is not None
        ]
        if len(entries) > len(heap):
            # A snapshot's: one heapify (linear), not a push each (100k of them blocked
            # the event loop for a third of a second, and Asterisk drops slow readers).
            heap.extend(entries)
            heapq.heapify(heap)
        else:
            for entry in entries:
                heapq.heappush(heap, entry)
        if heap and (first is None or heap[0][0] < first):
            self.expiry_added.set()

    def take_expired(self, now: float) -> list[str]:
        """Take off :attr:`expiries` what is due by ``now`` (this host's time; the entries
        and the contacts' expiries are read on Asterisk's clock), and return the endpoints
        to look up (at most ``LOOKUP_LIMIT``, in due order): those whose book still holds
        a contact expired by then (one told a later expiry since is not).  One phone that
        authenticated since its expiry was told is there: its expiry is made unknown
        (and written) instead; one of several contacts is not known to be that one."""
        heap, book, clock = self.expiries, self.book, self.client.clock
        asterisk_now = clock.now(now)
        due: dict[str, None] = {}
        while heap and heap[0][0] <= asterisk_now and len(due) < LOOKUP_LIMIT:
            _, endpoint, told = heapq.heappop(heap)
            reg = book.get(endpoint)
            if reg is None or not _expired(reg, asterisk_now):
                continue
            # The authentication's time is Asterisk's, the telling this host's.
            if len(reg.contacts) == 1 and (reg.last_auth_at or 0.0) >= clock.now(told):
                self.book[endpoint] = reg._replace(
                    contacts=(reg.contacts[0]._replace(expires_at=None),)
                )
                self.mark_dirty((endpoint,))
            else:
                due[endpoint] = None
        return list(due)

    def set_aside(self, reowned: Iterable[str]) -> None:
        """Take the contacts of each ``reowned`` endpoint out of the book into
        :attr:`previous` (they are its previous owner's phone's, owed removal), so the
        store files none of them under the endpoint's new owner; a ``Reachable`` peer
        state and a device state only a registered phone has go with them.  Before this
        session's snapshot is in, nothing: the snapshot lists them anew, as the removal,
        which waits for it, finds them."""
        if self.snapshot_session != self.client.sessions:
            return
        book = self.book
        for endpoint in reowned:
            reg = book.get(endpoint)
            if reg is None or not reg.contacts:
                continue
            self.previous[endpoint] = (*self.previous.get(endpoint, ()), *reg.contacts)
            peer = None if reg.peer_status == "Reachable" else reg.peer_status
            device = _without_contact(reg.device_state)
            book[endpoint] = reg._replace(contacts=(), peer_status=peer, device_state=device)
            self.mark_dirty((endpoint,))

    def rewrite_holders(self, endpoints: Sequence[str]) -> None:
        """Have the flusher write the book's state of ``endpoints`` (none known: offline,
        no contact), so the store files under each user now holding one that endpoint's
        state.  A user moved to one by an edit of the store that bypassed provisioner (an
        ``UPDATE`` of its extension) still has the state filed under its old extension,
        the old endpoint's phone shown online: writes find users by extension, and none
        of the old endpoint's reaches it any more.  Before this session's snapshot is in,
        nothing: that snapshot rewrites every user's state."""
        if not endpoints or self.snapshot_session != self.client.sessions:
            return
        book = self.book
        for endpoint in endpoints:
            if endpoint not in book:
                book[endpoint] = EndpointRegistration(endpoint)
        self.mark_dirty(endpoints)

    def rows_added(self, endpoints: Iterable[str]) -> None:
        """Realtime rows of ``endpoints`` were just committed: their phones can register
        at once, and Asterisk tracks them only after a reload.  Taken for untracked now,
        not when the change loop takes the change: it may still be sending an earlier
        change's actions (an expiry answered behind a storm), and a ``SuccessfulAuth``
        meanwhile was dropped, the registered phone shown offline until its next status
        event.  One whose ``SuccessfulAuth`` came before this (between the commit and
        now) is looked up once no status event followed it."""
        endpoints = list(endpoints)
        if self.untracked is not None:
            self.untracked.update(endpoints)
        deadline = time.monotonic() + CONFIRM_WINDOW
        for endpoint in endpoints:
            reg = self.book.get(endpoint)
            if reg is None or reg.last_auth_at is None or reg.tracked:
                continue
            if endpoint not in self.unconfirmed:
                self.unconfirmed[endpoint] = deadline
                self.unconfirmed_added.set()

    def may_be_untracked(self, endpoint: str) -> bool:
        """Whether Asterisk may not track ``endpoint`` (see :attr:`untracked`)."""
        for held in (self.untracked, self.untracked_sent):
            if held is None or endpoint in held:
                return True
        return False

    def reload_sent(self) -> Callable[[ReloadOutcome], None]:
        """A reload is being sent: the endpoints untracked until now wait for its end
        (:attr:`untracked_sent`); what to call with its outcome."""
        self.untracked_sent, self.untracked = self.untracked, set()

        def ended(outcome: ReloadOutcome) -> None:
            sent, self.untracked_sent = self.untracked_sent, set()
            if outcome.ok:
                return
            # Asterisk may not have loaded them: untracked still, with those added since.
            if sent is None or self.untracked is None:
                self.untracked = None
            else:
                self.untracked |= sent

        return ended

    def told(self) -> bool:
        """Whether the server was sent all it is owed: the last run's notes read, no
        change waiting or being applied, no expiry or removal owed, no reload waiting,
        running or to be retried, no endpoint left to verify, and the digest of the
        files the last reload loaded noted."""
        return (
            self.owed.resumed
            and self.changes.empty()
            and not (self.applying or self.owed or self.owed.awaiting)
            and not (self.reloads.pending or self.reloads.in_flight)
            and self.reload_retry is None
            and self.after_retry is None
            and not (self.after_reload or self.unverified)
            and self.loaded is None
            and not self.noting_loaded
        )

    def in_flusher_turn(self, write: Callable[[Connection], object]) -> asyncio.Future[bool]:
        """Have the flusher run ``write`` in its turn (after the batches taken before it,
        before those taken after it); what learns whether it was stored (``False`` at
        once when the flusher has ended: the daemon is stopping)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.flusher_ended:
            done.set_result(False)
            return done
        self.jobs.append((write, done))
        self.dirtied.set()
        self.flush_now.set()
        return done

    def mark_dirty(self, endpoints: Iterable[str]) -> None:
        """Have the flusher write the latest state of ``endpoints``: the first dirty one
        wakes it, ``FLUSH_BATCH`` of them have it write without waiting."""
        dirty = self.dirty
        if not dirty:
            self.dirtied.set()
        dirty.update(dict.fromkeys(endpoints))
        if len(dirty) >= FLUSH_BATCH:
            self.flush_now.set()

    def mark_one_dirty(self, endpoint: str) -> None:
        """:meth:`mark_dirty` of one endpoint (the storm's path: no tuple, no loop)."""
        dirty = self.dirty
        if not dirty:
            self.dirtied.set()
        dirty[endpoint] = None
        if len(dirty) >= FLUSH_BATCH:
            self.flush_now.set()


def _new_link(server: AsteriskServer, settings: AmiSettings) -> Link:
    """The link of one ``[[asterisk]]`` entry, not started."""
    # One estimate of the server's clock, fed by both sessions' Ping answers.
    clock = AsteriskClock()
    client = AmiClient(server, settings, clock=clock)
    # Reloads go on a session of their own, without events: Asterisk runs one
    # session's actions one after another, and a reload answers only when done
    # (95 s at 50k endpoints), so on the main session every expiry, query and
    # event would wait behind it.
    quiet = server.model_copy(update={"events": "off"})
    reload_client = AmiClient(quiet, settings, role="reload", clock=clock)
    reloads = ReloadCoordinator(reload_client, settings)
    return Link(server.name, client, reloads, PjsipOps(client), server.sorcery_caches)


@dataclass
class AmiPbx:
    """Every configured Asterisk, driven from the daemon."""

    links: list[Link]
    engine: Engine
    target_kind: str = "config"
    #: Seconds a store write may run before it counts as stuck (``daemon.stuck_after``;
    #: 0: never).
    stuck_after: float = 0.0
    #: The files a config-file reload loads (:func:`~provisioner.ami.loaded.config_files`).
    files: tuple[Path, ...] = ()
    #: Each of :attr:`files`' digest as last read, so a reload reads only those changed
    #: since (:class:`~provisioner.ami.loaded.FileDigests`).
    digests: FileDigests = field(default_factory=FileDigests, repr=False)
    #: While :meth:`run` runs: its task group (where a SIGHUP's servers start).
    _group: asyncio.TaskGroup | None = field(default=None, repr=False)
    #: :meth:`run`'s stop was set: a link started from now on starts halted.
    _halting: bool = field(default=False, repr=False)
    #: :meth:`_swap` tasks under way (held: the loop keeps only weak references).
    _swaps: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _swapping: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @classmethod
    def from_config(cls, config: Config, engine: Engine) -> AmiPbx:
        links = [_new_link(server, config.ami) for server in config.asterisk]
        pbx = cls(links, engine, stuck_after=config.daemon.stuck_after)
        pbx.follow_target(config)
        return pbx

    def follow_servers(self, config: Config) -> None:
        """Take ``config``'s ``[[asterisk]]`` entries (a SIGHUP): a server no longer named,
        or whose entry changed in any way (host, port, user, secret, caches…), is let go,
        its sessions closed and its registration state forgotten in the store
        (:func:`~provisioner.store.registrations.forget_servers`), once its tasks have
        ended (what it still owed is noted for a later run, as at a stop); a server newly
        named, or changed, is then started as at the daemon's start: connected, owed what
        its notes say, snapshotted.  The other servers are not touched.  Logs
        ``ami.servers_changed`` (``removed``, ``added``: names)."""
        if self._halting:
            return  # stopping: a server started now would only be stopped again
        wanted = {server.name: server for server in config.asterisk}
        gone = [link for link in self.links if wanted.get(link.name) != link.client.server]
        held = {link.name for link in self.links if link not in gone}
        added = [server for name, server in wanted.items() if name not in held]
        if not gone and not added:
            return
        fresh = [_new_link(server, config.ami) for server in added]
        # A changed entry's new link goes on counting the old one's sessions.
        counted = {link.name: link.totals for link in gone}
        for link in fresh:
            link.totals = counted.get(link.name, link.totals)
        self.links = [link for link in self.links if link not in gone] + fresh
        log.info(
            "ami.servers_changed",
            removed=[link.name for link in gone],
            added=[link.name for link in fresh],
        )
        for link in gone:
            link.halt.set()
        if self._group is None:
            return  # not running yet: run() starts self.links as they are then
        started = self._group.create_task(self._swap(gone, fresh))
        self._swaps.add(started)
        started.add_done_callback(self._swaps.discard)

    async def _swap(self, gone: list[Link], fresh: list[Link]) -> None:
        """End ``gone``'s tasks, forget their registration state, then start ``fresh``
        (a server of the same name starts only once the old one's writes have ended).
        One swap at a time: a second SIGHUP's waits for the first's links to end, so two
        links of one name never run at once."""
        async with self._swapping:
            await self._swap_now(gone, fresh)

    async def _swap_now(self, gone: list[Link], fresh: list[Link]) -> None:
        for link in gone:
            await asyncio.gather(*link.tasks)
        # A changed entry's state too: it was the old Asterisk's, until the new snapshot.
        names = sorted({link.name for link in gone})
        if names:
            try:
                rows = await in_worker(
                    transaction, self.engine, partial(forget_servers, names=names)
                )
            except STORE_DOWN as exc:
                # A later start forgets servers no longer configured (forget_other_servers).
                log.warning("registration.forget_failed", servers=names, error=_store_error(exc))
            else:
                log.info("registration.servers_forgotten", rows=rows, servers=names)
        for link in fresh:
            if link in self.links:
                # Started even when the daemon stops meanwhile (its halt then set by
                # _halt_all): changes handed to it are noted owed at its stop, as any
                # other link's, and told_all counts it.
                self._start(link)

    def follow_target(self, config: Config) -> None:
        """Take ``config``'s target (at the start, and when a SIGHUP builds it anew): its
        kind, and the files a reload loads, whose digest each accepted reload notes
        (:mod:`~provisioner.ami.loaded`)."""
        self.target_kind = config.target.kind
        self.files = config_files(Path(config.target.path), config.target.shards)
        self.digests.keep_only(self.files)

    # -- the daemon's interface ---------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep every link up, ingest its events and apply its changes until ``stop``
        (links taken out or put in meanwhile by :meth:`follow_servers` included)."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            for link in self.links:
                self._start(link)
            tg.create_task(self._halt_all(stop))
        self._group = None

    async def _halt_all(self, stop: asyncio.Event) -> None:
        """Once ``stop`` is set, stop every link (each runs on its own halt event, so that
        :meth:`follow_servers` can stop one alone)."""
        await stop.wait()
        self._halting = True
        for link in self.links:
            link.halt.set()

    def _start(self, link: Link) -> None:
        """Start ``link``'s sessions and loops in the running task group, until its
        :attr:`Link.halt` is set."""
        assert self._group is not None
        tg, halt = self._group, link.halt
        if self._halting:
            halt.set()
        self._subscribe(link)
        link.reloads.on_send = partial(self._sending, link)
        runs = [link.client.run(halt)]
        if link.reloads.client is not link.client:
            runs.append(link.reloads.client.run(halt))
        runs += [
            link.reloads.run(halt),
            self._flusher(link, halt),
            self._snapshots(link, halt),
            self._lookups(link, halt),
            self._expiry_checks(link, halt),
            self._changes(link, halt),
            self._note_loaded(link, halt),
            self._liveness(link, halt),
        ]
        link.tasks = [tg.create_task(run) for run in runs]

    def applied(self, change: Change, *, target_kind: str) -> None:
        """Hand ``change`` to each server's change loop; first have the store's state of
        the users now holding its added and reowned endpoints rewritten from each book
        (:meth:`Link.rewrite_holders`)."""
        self.target_kind = target_kind
        for link in self.links:
            link.set_aside(change.reowned)
            link.rewrite_holders((*change.added, *change.reowned))
            if target_kind != "config":
                link.rows_added(change.added)
            link.changes.put_nowait(change)

    def caches_unsure(self) -> None:
        """Realtime rows may have been written without their cache expiries sent (see
        :mod:`~provisioner.store.untold`): owe each server with caches their emptying
        whole, noted in the store until paid (before the last run's notes are read,
        :meth:`_resume` notes it), and take any endpoint for one Asterisk may not track
        yet (rows added, no reload asked).  Logs ``ami.caches_unsure``."""
        for link in self.links:
            if self.target_kind != "config":
                link.untracked = None
            if not link.caches or link.owed.expire_all:
                continue
            link.owed.expire_all = True
            log.info("ami.caches_unsure", server=link.name)
            if link.owed.resumed:
                note_owed(link)
                link.changes.put_nowait(Change())  # wakes the change loop: it pays

    def store_answered(self) -> None:
        """The store is back (the daemon's apply succeeded after one it failed): end each
        server's pause after failed store writes (:attr:`Link.store_back`), so what waits
        for the store is written now.  Cheap: a flag per server that has failures."""
        for link in self.links:
            if link.store_failures:
                link.store_back.set()

    def idle(self) -> bool:
        """Whether every server was sent all it is owed (:meth:`Link.told`)."""
        return all(link.told() for link in self.links)

    def writes_stuck(self) -> bool:
        """Whether a server's store write (registration state, a snapshot, a note of what
        is owed) has run past ``daemon.stuck_after`` (:meth:`_store`)."""
        return any(link.write_stuck for link in self.links)

    def told_all(self) -> bool:
        """Whether, the AMI side having stopped, every change handed to it was sent to
        every server or noted owed in the store for the next run."""
        return all(link.stop_noted for link in self.links)

    def health(self) -> dict[str, dict[str, Any]]:
        """Each server's health figures, by server name.  ``online`` counts endpoints as
        ``status`` would: a contact ``EXPIRED_AFTER`` past its expiry (on Asterisk's
        clock, :meth:`Link.asterisk_now`) counts for nothing (the book keeps it until
        someone sees to it; a session down sees to none); and as ``status`` does,
        nothing while the server's state is not live
        (:meth:`Link.live`: ``None``): the book then holds what Asterisk said before."""
        out: dict[str, dict[str, Any]] = {}
        for link in self.links:
            # Expiries are Asterisk's: judged on its clock, as its stamps tell it.
            cutoff = link.asterisk_now() - EXPIRED_AFTER.total_seconds()
            h = link.client.health()
            # Once: "live" and "online" of one record say the same thing by construction.
            live = link.live()
            out[link.name] = {
                "connected": h.connected,
                # The reload session (the main one when reloads share it).
                "reload_connected": link.reloads.client.connected,
                "last_error": h.last_error or "",
                # Of the server's name: across the links a SIGHUP made anew.
                "reconnects": link.totals.reconnects,
                "not_live": link.not_live,
                "rejected": len(link.rejected),
                "events": link.totals.events,
                "reloads": dict(link.totals.reload_results),
                "live": live,
                "online": (
                    sum(1 for reg in link.book.values() if counts_online(reg, cutoff))
                    if live
                    else None
                ),
                "store_failures": link.store_failures,
                # Snapshots failed in a row (0 once one is answered), and the last's reason.
                "snapshot_failures": link.snapshot_failures,
                "snapshot_error": link.snapshot_error,
                # Since when a store write has run, once past daemon.stuck_after.
                "write_stuck_since": link.write_since if link.write_stuck else None,
                # Cache expiries and contact removals waiting for the server (Owed);
                # emptying every cache (resumed from a note) counts as one.
                "owed": len(link.owed.expiries) + len(link.owed.removals) + link.owed.expire_all,
                # Endpoints applied, not yet asked about.
                "unverified": len(link.unverified),
                # Caches of sorcery_caches Asterisk said it does not have: edits it
                # meant to expire from them may be served stale.
                "missing_caches": sorted(link.ops.missing_caches),
            }
        return out

    # -- events in ------------------------------------------------------------------

    def _subscribe(self, link: Link) -> None:
        link.client.clock.on_move = partial(self._clock_moved, link)
        on_event = partial(self._on_event, link)
        for name in _EVENTS:
            link.client.on_event(name, on_event)
        # Each session learns Asterisk's clock anew (its snapshot Pings first): a
        # restarted Asterisk may come back with its clock set right, and the old
        # estimate would take up to two windows to age out.
        link.client.on_connected(link.client.clock.reset)
        link.client.on_connected(link.totals.add_session)
        link.client.on_connected(link.snapshot_wanted.set)
        link.client.on_disconnected(link.live_changed.set)
        # An empty change: the change loop wakes and sends what is owed to the server.
        link.client.on_connected(lambda: link.changes.put_nowait(Change()))

    def _clock_moved(self, link: Link, offset: float) -> None:
        """The estimate of ``link``'s Asterisk clock became known or moved to ``offset``
        (seconds ahead of this host's): watch the expiries anew on it, mark it for
        ``status`` now, and say once per server when it is off by more than
        ``CLOCK_SKEW_LOG`` (``ami.clock_skew``, a warning)."""
        link.clock_moved = True
        link.expiry_added.set()
        link.live_changed.set()
        if abs(offset) > CLOCK_SKEW_LOG and not link.skew_logged:
            link.skew_logged = True
            log.warning("ami.clock_skew", server=link.name, seconds=round(offset, 3))

    def _on_event(self, link: Link, msg: AmiMessage) -> None:
        """Fold one event into the book; quick and non-blocking (it runs in the reader).
        (Its stamp, the client feeds the estimate of Asterisk's clock, once per read.)"""
        event = msg.view()
        book = link.book
        endpoint: str | None
        if event.get("Event") == "ContactStatus":
            # The storm's event, folded without the general path's dispatch on the kind,
            # and always stored.
            endpoint = event.get("EndpointName") or None
            if endpoint is None:
                return
            link.totals.events += 1
            book[endpoint] = apply_contact_status(book.get(endpoint), endpoint, event)
            if link.unconfirmed:
                link.unconfirmed.pop(endpoint, None)
            link.mark_one_dirty(endpoint)
            if link.snapshot_events is not None:
                link.snapshot_events.append(event)
            return
        endpoint = endpoint_of(event)
        if endpoint is None:
            return
        link.totals.events += 1
        folded = apply_event(book.get(endpoint), event)
        if folded is None:
            return
        after = folded
        if after.tracked:
            link.unconfirmed.pop(endpoint, None)
        elif (
            event.get("Event") == "SuccessfulAuth"
            and endpoint not in link.unconfirmed
            and link.may_be_untracked(endpoint)
        ):
            # Asterisk sends no status events for endpoints added since its last
            # reload; their contacts are only visible by asking, if none follows.
            link.unconfirmed[endpoint] = time.monotonic() + CONFIRM_WINDOW
            link.unconfirmed_added.set()
        # An authentication changes nothing the store holds: at 100k phones refreshing
        # every few minutes, hundreds of writes a second for nothing.  Nor does one of an
        # endpoint new to the book (before the start's snapshot is in, every refresh): its
        # record says nothing of contacts, and written it would turn a user the last run
        # left online offline until the snapshot.  Likewise a peer or device state of an
        # endpoint new to the book before this session's snapshot is in (a call ending
        # while the start's snapshot is listed): the snapshot writes it, with contacts.
        unstored = event.get("Event") == "SuccessfulAuth" or (
            endpoint not in book and link.snapshot_session != link.client.sessions
        )
        book[endpoint] = after
        if not unstored:
            link.mark_dirty((endpoint,))
        if link.snapshot_events is not None:
            link.snapshot_events.append(event)

    async def _flusher(self, link: Link, stop: asyncio.Event) -> None:
        """Write the dirty endpoints, group-commit style: ``FLUSH_DELAY`` after the first
        one, or once the write in flight ends, whichever is later; at once when
        ``FLUSH_BATCH`` of them are dirty.  The latest state of each endpoint is written
        once, however many events changed it since the last write.

        A batch's rows are built while the previous batch is being written (the
        database works meanwhile); batches are still written one after another, in the
        order they were taken, so a later state of an endpoint is never overwritten by
        an earlier one.  Other writes (``link.jobs``: a snapshot, the post-apply
        problems) take their turn the same way, at once, without the delay, so no two
        writes of one server's registration state ever run at once."""
        writing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                await wait_first(stop, link.dirtied)
                if not link.jobs:
                    await wait_first(stop, link.flush_now, timeout=FLUSH_DELAY)
                await wait_first(stop, link.flush_now, link.store_idle)
                if stop.is_set():
                    break
                link.flush_now.clear()
                link.dirtied.clear()
                # The jobs and the dirty endpoints' states are taken at once, before any
                # wait: a snapshot filling the book while a job waits for the write in
                # flight queues its own job for the next turn, and a state dirtied after
                # it (a phone gone, a removal's contact deleted) must not be written
                # before it, to be overwritten by its older rows.
                jobs, link.jobs = link.jobs, []
                dirty, link.dirty = link.dirty, {}
                writes = self._batch_writes(link, dirty)
                for job in jobs:
                    # After the batches taken before it, before those taken after it.
                    writing = await _in_turn(link, writing, partial(self._write_job, link, *job))
                if not writes:
                    continue  # only jobs this turn
                batch = partial(self._flush, link, writes, stop)
                writing = await _in_turn(link, writing, batch)
        finally:
            if writing is not None:
                await writing
            link.flusher_ended = True
            link.flusher_done.set()
            jobs, link.jobs = link.jobs, []
            for _, done in jobs:
                if not done.done():
                    done.set_result(False)  # stopped before writing it

    def _batch_writes(
        self, link: Link, dirty: Iterable[str]
    ) -> list[tuple[Callable[[Connection], object], set[str]]]:
        """A flusher batch's writes: the rows of ``dirty`` (:func:`_batch_rows`) in parts
        (:func:`split_batch`), each made ready to write
        (:func:`~provisioner.store.registrations.endpoint_writer`; a row with no time of
        its own takes the time now, when the batch is taken), with its endpoints.  Where
        the store takes batches (SQLite, PostgreSQL) each endpoint is made into its
        batch's entry at once instead (:func:`_entry_writes`).

        Made with the cyclic garbage collector paused, and the rows let go before it
        resumes (on SQLite and PostgreSQL a part's write holds its JSON text, not its
        rows): a storm's batch is tens of thousands of tuples, and collections in the
        middle walked them, and the book's records with them, again and again.  In a 50k
        storm on PostgreSQL the collections took 1.9-3.3 µs of the event loop's CPU an
        event, 1.0-1.3 since (a full collection every 20k events or so before, at most
        one a storm since).  The rows hold no cycle: reference counting frees them as
        before."""
        with collector_paused():
            now, dialect = utcnow(), self.engine.dialect
            if dialect.name in BATCH_DIALECTS:
                return _entry_writes(link, dirty, now, dialect.name)
            states = _batch_rows(link, dirty)
            writes: list[tuple[Callable[[Connection], object], set[str]]] = [
                (endpoint_writer(dialect, link.name, part, now, counted=False), set(part))
                for part in (split_batch(states, dialect.name) if states else ())
            ]
            del states  # freed before the collector resumes
        return writes

    async def _write_job(
        self, link: Link, write: Callable[[Connection], object], done: asyncio.Future[bool]
    ) -> None:
        stored = await self._store(link, write)
        if not done.done():
            done.set_result(stored)

    async def _flush(
        self,
        link: Link,
        writes: Sequence[tuple[Callable[[Connection], object], set[str]]],
        stop: asyncio.Event,
    ) -> None:
        """One flusher write: each of ``writes`` (a part of the batch and its endpoints)
        in a transaction of its own, all at once (:func:`split_batch`).  When one fails its
        endpoints are marked dirty again (the book holds their latest state) and the
        flusher pauses, longer after each failure in a row: a database outage delays the
        registration state, it does not lose it.

        Every part is handed to its thread in this coroutine's first step, so the database
        writes while the flusher builds the next batch (:func:`_in_turn`); coroutines
        gathered would each start in a task's later step, once the flusher yields."""
        started = [self._start_store(link, write) for write, _ in writes]
        stored = await asyncio.gather(*(self._stored(link, write) for write in started))
        if all(stored):
            if link.store_failures:
                _store_recovered(link)
                link.live_changed.set()
            return
        for (_, endpoints), ok in zip(writes, stored, strict=True):
            if not ok:
                link.mark_dirty(endpoints)
        await self._store_backoff(link, stop)

    async def _store_backoff(self, link: Link, stop: asyncio.Event) -> None:
        """Count a refused registration write and pause before the next
        (``registration.store_retry``, :func:`_pause_after_failures`): a warning at the
        1st, 2nd, 4th, 8th... failure of a run and at least every ``STORE_SAY_EVERY``
        seconds, else a debug line (at the 30 s cap a store down for an hour was 240
        warnings per server, with ``registration.store_failed``)."""
        link.store_failures += 1
        link.live_changed.set()
        # Only an answer during this pause ends it: one before the failure is stale.
        link.store_back.clear()
        failures, now = link.store_failures, time.monotonic()
        loud = worth_repeating(failures, now - link.store_said_at, STORE_SAY_EVERY)
        if loud:
            link.store_said_at = now
        await _pause_after_failures(
            link,
            stop,
            log.warning if loud else log.debug,
            "registration.store_retry",
            link.store_failures,
            (STORE_RETRY_BASE, STORE_RETRY_MAX),
            link.store_back,
        )

    async def _snapshots(self, link: Link, stop: asyncio.Event) -> None:
        try:
            await self._snapshot_loop(link, stop)
        finally:
            # A removal waiting for a snapshot (remove_contacts) must not wait for ever.
            link.snapshots_ended = True
            link.snapshot_turn()

    async def _snapshot_loop(self, link: Link, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_first(link.snapshot_wanted, stop)
            if stop.is_set():
                return
            gap = snapshot_gap(link.snapshot_took) - (time.monotonic() - link.last_snapshot)
            if gap > 0:
                await sleep_unless(stop, gap)
            link.snapshot_wanted.clear()
            link.last_snapshot = time.monotonic()
            link.snapshot_running = True
            try:
                taken = await self._take_snapshot(link)
            finally:
                link.snapshot_running = False
                link.snapshot_turn()
            if stop.is_set():
                return
            if taken == "unstored":
                # Not stored: ask Asterisk again once the database had a pause (the
                # snapshot also removes contacts the events never said were gone).
                await self._store_backoff(link, stop)
                link.snapshot_wanted.set()
            elif taken == "failed_live":
                # No reconnect will want one (Asterisk refused it, as before res_pjsip
                # has loaded, or left it unanswered): ask again after a pause.
                await self._snapshot_backoff(link, stop)
                link.snapshot_wanted.set()

    async def _snapshot_backoff(self, link: Link, stop: asyncio.Event) -> None:
        """Pause before the next try of a snapshot that failed on a live session
        (``registration.snapshot_retry``: info after the first failure of a run, debug
        after the others; :func:`_pause_after_failures`)."""
        await _pause_after_failures(
            link,
            stop,
            log.info if link.snapshot_failures == 1 else log.debug,
            "registration.snapshot_retry",
            link.snapshot_failures,
            (SNAPSHOT_MIN_GAP, SNAPSHOT_RETRY_MAX),
        )

    async def _lookups(self, link: Link, stop: asyncio.Event) -> None:
        """Look up the contacts of each endpoint whose ``SuccessfulAuth`` no status event
        followed within ``CONFIRM_WINDOW``, oldest first."""
        while not stop.is_set():
            await wait_first(link.unconfirmed_added, stop)
            link.unconfirmed_added.clear()
            while link.unconfirmed and not stop.is_set():
                first = next(iter(link.unconfirmed.values()))
                if await sleep_unless(stop, first - time.monotonic()):
                    return
                await self._look_up(link, take_due(link.unconfirmed, time.monotonic()))

    async def _expiry_checks(self, link: Link, stop: asyncio.Event) -> None:
        """Look up each endpoint a contact of which has passed its expiry (see
        :data:`EXPIRY_GRACE`), until ``stop``: no event may ever say it went.  While
        the server is not connected, nothing: the reconnect's snapshot tells every
        contact (and its expiry) anew."""
        while not stop.is_set():
            link.expiry_added.clear()
            if link.clock_moved:
                # Watched on another estimate of Asterisk's clock (or on this host's, none
                # known): an expiry taken for long past would be looked up too early, or
                # one taken for far off too late.
                link.clock_moved = False
                link.expiries = []
                link.watch_expiries(link.book.values())
            heap = link.expiries
            wait = heap[0][0] - link.asterisk_now() if heap else None
            if not link.client.connected:
                # The reconnect's snapshot watches every expiry anew (expiry_added).
                await wait_first(stop, link.expiry_added, timeout=EXPIRY_GRACE)
                continue
            if wait is None or wait > 0:
                await wait_first(stop, link.expiry_added, timeout=wait)
                continue
            due = link.take_expired(time.time())
            if due:
                await self._look_up(link, due, expired=True)

    async def _look_up(self, link: Link, endpoints: list[str], *, expired: bool = False) -> None:
        """Put the contacts Asterisk has for ``endpoints`` (untracked: no event tells them)
        in the book, one ``PJSIPShowEndpoint`` each; more than ``LOOKUP_LIMIT`` of them, or
        a failed lookup, want a snapshot instead (it lists every contact at once)."""
        if len(endpoints) > LOOKUP_LIMIT or not link.client.connected:
            link.snapshot_wanted.set()
            return
        # Until each answer is in, the book misses these contacts: a removal meanwhile
        # must list every contact (remove_contacts), not trust the book.  Not so for an
        # expiry's lookup: the book holds those contacts, by the names a snapshot told.
        missing = set() if expired else set(endpoints)
        link.looking_up.update(missing)
        try:
            await self._look_up_each(link, endpoints, expired=expired)
        finally:
            link.looking_up.difference_update(missing)

    async def _look_up_each(
        self, link: Link, endpoints: list[str], *, expired: bool = False
    ) -> None:
        """Look up ``endpoints`` one by one (see :meth:`_look_up`); the first failure
        wants a snapshot instead of the rest.  ``expired``: endpoints with a contact past
        its expiry, whose answer is taken also for a tracked one (its events did not
        say the contact went, nor do they tell a refresh's new expiry)."""
        for endpoint in endpoints:
            try:
                detail = await link.ops.show_endpoint(endpoint)
            except ProvisionerError as exc:
                log.warning(
                    "registration.lookup_failed",
                    server=link.name,
                    endpoint=endpoint,
                    error=str(exc),
                )
                link.snapshot_wanted.set()
                return
            reg = link.book.get(endpoint) or EndpointRegistration(endpoint)
            if reg.tracked and not expired:
                continue  # a status event came meanwhile: the events tell its contacts
            contacts = detail.contacts if detail is not None else ()
            # Asterisk holds it (or not) now, whatever an earlier INVALID said.
            reg = reg._replace(contacts=contacts, exists=detail is not None)
            if not contacts and reg.peer_status == "Reachable":
                # Its last contact gone: a Reachable peer state is stale (as in a snapshot).
                reg = reg._replace(peer_status=None)
            link.book[endpoint] = reg
            link.watch_expiries((reg,))
            link.mark_dirty((endpoint,))
            log.debug(
                "registration.looked_up",
                server=link.name,
                endpoint=endpoint,
                contacts=len(contacts),
            )

    async def _take_snapshot(self, link: Link) -> _Snapshot:
        """Ask Asterisk for every contact and make the store hold exactly them:
        ``stored``; ``unstored`` when the store could not be written, or the flusher
        stopped first; ``failed_live`` when AMI failed on a session still up; ``failed``
        when the session was lost (the next connect takes a snapshot)."""
        session = link.client.sessions
        started = time.monotonic()
        link.snapshot_events = []
        link.listing_idle.clear()
        try:
            if link.client.clock.offset is None:
                # Asterisk's time first (a Ping's answer tells it, whatever manager.conf
                # says): the expiries listed are watched on Asterisk's clock from the
                # start, not on this host's until the ping loop's first answer.
                await link.client.send_action("Ping")
            contacts = await link.ops.show_contacts(quiet=True)
        except ProvisionerError as exc:
            # How long a failed one took (a lost connection, a refusal, a wait with no
            # read) says nothing of what a listing costs: the spacing keeps the last
            # listing's duration.
            _snapshot_failed(link, str(exc))
            live = link.client.connected and link.client.sessions == session
            return "failed_live" if live else "failed"
        finally:
            events, link.snapshot_events = link.snapshot_events, None
            link.listing_idle.set()  # its waiters resume once the book is filled (below)
        _snapshot_answered(link)
        link.snapshot_took = time.monotonic() - started
        snapshot = snapshot_from_contact_list_states(contacts)
        # Keep what events told about device and peer state; contacts come from the snapshot.
        for endpoint, reg in link.book.items():
            if endpoint not in snapshot:
                # Not listed: no contact registered, so a ``Reachable`` peer state is stale
                # (the un-registration's events may have been lost with the connection).
                snapshot[endpoint] = EndpointRegistration(
                    endpoint,
                    peer_status=None if reg.peer_status == "Reachable" else reg.peer_status,
                    device_state=_without_contact(reg.device_state),
                    exists=reg.exists,
                    tracked=reg.tracked,
                    last_change=reg.last_change,
                )
            else:
                snapshot[endpoint] = _merge(snapshot[endpoint], reg)
        # The events folded since the action was sent, again, in order, over the snapshot:
        # those Asterisk sent after the list are newer than it (and, often in the same
        # read as the list's end, were folded before this resumed); those before it
        # changed nothing the list does not already show.
        for event in events or ():
            about = endpoint_of(event)
            if about is not None:
                folded = apply_event(snapshot.get(about), event)
                if folded is not None:
                    snapshot[about] = folded
        _set_aside_again(link, snapshot)
        link.book = snapshot
        link.expiries = []  # the snapshot tells every expiry anew
        link.watch_expiries(snapshot.values())
        link.snapshot_session = session
        # In the book now (only its store write is to come): the book is complete.
        link.snapshot_running = False
        link.snapshot_turn()
        link.dirty.clear()
        states = {ep: rows(reg) for ep, reg in snapshot.items()}
        # What the snapshot changed is logged as the flusher logs it: unlogged, the
        # summaries logged last would hide the next change (seen as no change).
        _log_changes(link, ((ep, summary[0]) for ep, (_, summary) in states.items()))
        now = utcnow()
        # Written by the flusher, in turn: a batch taken before this snapshot, still being
        # written, must not land after it (nor one taken after it land before).
        stored = await link.in_flusher_turn(
            lambda conn: replace_server_snapshot(conn, link.name, states, now)
        )
        if stored:
            _store_recovered(link)
            link.stored_session = session
            link.live_changed.set()
            contacts_now = sum(len(contacts) for contacts, _ in states.values())
            log.info(
                "registration.snapshot",
                server=link.name,
                contacts=contacts_now,
                took_ms=round(link.snapshot_took * 1000, 1),
            )
        return "stored" if stored else "unstored"

    async def _liveness(self, link: Link, stop: asyncio.Event) -> None:
        """Mark in the store, for ``status``, whether ``link``'s registration state there is
        live (:meth:`Link.live`), with Asterisk's clock offset (:func:`mark_live`; marked
        again at once when it moved): ``live`` every ``LIVE_BEAT`` while it is (an old
        mark is a daemon that stopped marking: killed, hung), ``down`` as soon as it is
        not (the session lost: no event tells what the phones do meanwhile), and ``down``
        at the stop.  Marks go in the flusher's turn, so a ``live`` one lands after the
        snapshot it follows.  ``registration.live`` logs each change of the mark."""
        marked: bool | None = None
        beat = 0.0
        noted = 0.0
        while not stop.is_set():
            link.live_changed.clear()
            live = link.live()
            ahead = link.client.clock.offset or 0.0
            moved = abs(ahead - noted) > CLOCK_MOVE
            if live != marked or (live and (time.monotonic() - beat >= LIVE_BEAT or moved)):
                write = partial(mark_live, server=link.name, live=live, asterisk_ahead=ahead)
                if await link.in_flusher_turn(write):
                    if live != marked:
                        log.info("registration.live", server=link.name, live=live)
                    marked, beat, noted = live, time.monotonic(), ahead
            wait = LIVE_BEAT if live else None
            await wait_first(stop, link.live_changed, timeout=wait)
        await link.flusher_done.wait()
        if marked is False:
            return
        ahead = link.client.clock.offset or 0.0
        down = partial(mark_live, server=link.name, live=False, asterisk_ahead=ahead)
        try:
            await in_worker(transaction, self.engine, down)
        except STORE_DOWN as exc:
            # The last live mark ages out: ``status`` says unknown after ``LIVE_FOR``.
            log.warning("registration.live_not_marked", server=link.name, error=_store_error(exc))

    # -- changes out -------------------------------------------------------------------

    async def _resume(self, link: Link, stop: asyncio.Event) -> None:
        """Owe again what the last run noted owed to ``link``'s server and never saw
        done: a reload, cache expiries, contact removals (a config file's after the
        resumed reload).  A store that cannot be read is asked again after a pause,
        until ``stop``: the change loop waits for this, so that an endpoint a change
        adds again keeps its contacts (:meth:`Owed.add`) whatever the last run noted."""
        failures = 0
        while not stop.is_set():
            try:
                notes = await in_worker(_read_notes, self.engine, link.name)
            except STORE_DOWN as exc:
                failures += 1
                delay = doubling(STORE_RETRY_BASE, STORE_RETRY_MAX, failures)
                error = _store_error(exc, text=True)
                log.warning("ami.owed_unknown", server=link.name, error=error, retry_in_s=delay)
                await sleep_unless(stop, delay)
                continue
            reload = None
            if notes.reload_owed is not None:
                log.info("ami.reload_resumed", server=link.name)
                if self.target_kind != "config":
                    # Endpoints the last run added may wait for this reload to be tracked.
                    link.untracked = None
                reload = request_reload(link)
            elif self.target_kind == "config" and await self._file_not_loaded(link, notes.loaded):
                reload = request_reload(link)
            after = reload if self.target_kind == "config" else None
            resume_owed(link, notes.expiries, notes.removals, after)
            if link.owed.expire_all:
                # Owed by caches_unsure before the notes were read: noted (note_owed
                # writes nothing when the resumed note says so already).
                note_owed(link)
            return

    async def _file_not_loaded(self, link: Link, noted: str | None) -> bool:
        """Whether ``link``'s server may not have loaded the config files as they are: the
        digest of those its last accepted reload loaded (``noted``) is not theirs
        (:func:`~provisioner.ami.loaded.owes_reload`), or they cannot be read (a reload
        is then owed: it is always sound).  Logs ``ami.file_not_loaded`` then.

        A daemon killed after writing a file and before noting the reload it owes leaves
        no other trace: its next run's reconcile finds the file already as desired."""
        if noted is None:
            return False
        try:
            current = await in_worker(files_digest, self.files, self.digests)
        except OSError as exc:
            log.warning("ami.file_not_loaded", server=link.name, error=str(exc))
            return True
        if not owes_reload(noted, current):
            return False
        log.info("ami.file_not_loaded", server=link.name, noted=noted[:12], current=current[:12])
        return True

    def _sending(self, link: Link) -> Callable[[ReloadOutcome], None]:
        """A reload of ``link``'s server is about to be sent
        (:attr:`ReloadCoordinator.on_send`): what the coordinator calls with its outcome,
        which settles the endpoints it may make tracked (:meth:`Link.reload_sent`) and
        the config files' digest (:meth:`_opening`)."""
        tracked = link.reload_sent()
        loaded = self._opening(link)

        def settle(outcome: ReloadOutcome) -> None:
            tracked(outcome)
            loaded(outcome)

        return settle

    def _opening(self, link: Link) -> Callable[[ReloadOutcome], None]:
        """Take the config files' state as a reload of ``link``'s server is about to be
        sent: a file unchanged since its digest was kept is only ``stat``-ed, a changed
        one is opened (:func:`open_files`); what to call with the reload's outcome: one
        Asterisk accepted has their digest noted (:meth:`_note_loaded`), the latest
        such reload's only.  Nothing for a realtime target."""
        if self.target_kind != "config":
            return _ignore_outcome
        try:
            opened = open_files(self.files, self.digests)
        except OSError as exc:
            # Never stops the reload: only its digest goes unnoted (an older one stays).
            log.warning("ami.loaded_not_noted", server=link.name, error=str(exc))
            return _ignore_outcome

        def settle(outcome: ReloadOutcome) -> None:
            if not outcome.ok:
                opened.close()
                return
            if link.loaded is not None:
                link.loaded.close()
            link.loaded = opened
            link.loaded_wanted.set()

        return settle

    async def _note_loaded(self, link: Link, stop: asyncio.Event) -> None:
        """Until ``stop``: note the digest of the files the latest accepted reload loaded
        (``loaded_digest:<server>``, in the flusher's turn).  A digest not noted (the
        store refused it, the daemon stopped first) leaves an older one: the next start
        then owes one reload more than needed, never one less."""
        while not stop.is_set():
            await wait_first(stop, link.loaded_wanted)
            link.loaded_wanted.clear()
            if stop.is_set():
                break
            opened, link.loaded = link.loaded, None
            if opened is None:
                continue
            link.noting_loaded = True
            try:
                await self._note_digest(link, opened)
            finally:
                link.noting_loaded = False
        if link.loaded is not None:
            link.loaded.close()
            link.loaded = None

    async def _note_digest(self, link: Link, opened: OpenedFiles) -> None:
        """Note the digest of ``opened`` as what ``link``'s server loaded."""
        try:
            digest = await in_worker(opened.digest)
        except OSError as exc:
            log.warning("ami.loaded_not_noted", server=link.name, error=str(exc))
            return
        write = partial(put_state, key=loaded_digest_key(link.name), value=digest)
        if not await link.in_flusher_turn(write):
            log.warning("ami.loaded_not_noted", server=link.name, error="store write failed")

    async def _changes(self, link: Link, stop: asyncio.Event) -> None:
        """Hand each batch of changes to :func:`apply_changes` until ``stop``, then note
        what is left owed (:meth:`_note_at_stop`), whenever the stop comes: also while a
        batch is being sent, whose reload or expiries would otherwise never be noted."""
        await self._resume(link, stop)
        taken: list[Change] = []
        while not stop.is_set():
            getter = asyncio.ensure_future(link.changes.get())
            stopper = asyncio.ensure_future(stop.wait())
            # While something is owed, wake after OWED_RETRY even with no new change;
            # while endpoints wait to be verified, after VERIFY_PAUSE.
            retry = _retry(link)
            await asyncio.wait({getter, stopper}, timeout=retry, return_when=FIRST_COMPLETED)
            stopper.cancel()
            batch = [getter.result()] if getter.done() and not getter.cancelled() else []
            getter.cancel()
            if stop.is_set():
                taken = batch  # a change the getter took as the stop came
                break
            while not link.changes.empty():
                batch.append(link.changes.get_nowait())
            link.applying = True
            try:
                await apply_changes(link, batch, realtime=self.target_kind != "config")
            except ProvisionerError as exc:
                log.warning("ami.apply_failed", server=link.name, error=str(exc))
            finally:
                link.applying = False
        await self._note_at_stop(link, taken)

    async def _note_at_stop(self, link: Link, batch: list[Change]) -> None:
        """Note in the store what ``batch`` and the changes still queued at a stop owe
        the server (a reload, cache expiries, contact removals), with all else owed, once
        the flusher has ended: the next run sends it (:meth:`_resume`), where its
        reconcile alone would find the file or rows written and owe nothing.  Written
        when there is such a change, or when a note write failed or was never made (the
        flusher stopped before its turn came)."""
        while not link.changes.empty():
            batch.append(link.changes.get_nowait())
        link.stopping = True
        if link.reload_retry is not None:
            # The reload stays noted owed: the next run asks for it.
            link.reload_retry.cancel()
            link.reload_retry = None
        realtime = self.target_kind != "config"
        owes_reload = stop_owes(link, batch, realtime=realtime)
        await link.flusher_done.wait()
        if not batch and not notes_unsure(link.owed):
            link.stop_noted = True
            return
        write = final_notes(link, batch, reload=owes_reload)
        try:
            await in_worker(transaction, self.engine, write)
        except STORE_DOWN as exc:
            log.warning("ami.owed_not_noted", server=link.name, error=_store_error(exc, text=True))
            return
        link.stop_noted = True
        log.info(
            "ami.owed_noted",
            server=link.name,
            changes=len(batch),
            reload=link.reload_noted,
            expiries=len(link.owed.expiries),
            removals=len(link.owed.removals_to_note()),
        )

    # -- store writes, off the event loop ------------------------------------------------

    async def _store(self, link: Link, write: Callable[[Connection], object]) -> bool:
        """Run ``write`` in one transaction, in a thread (run again when it lost a
        deadlock: :func:`~provisioner.store.engine.transaction`); ``False`` (and a log
        line) when the store failed it (:data:`STORE_DOWN`).  Watched as an apply is: one
        waiting for a lock never granted would stop the registration state (and the
        notes of what is owed) from flowing, unseen, so past ``stuck_after`` it is
        logged (``registration.write_stuck``), and the daemon says so in the health
        record and starves the watchdog (:meth:`writes_stuck`)."""
        return await self._stored(link, self._start_store(link, write))

    def _start_store(
        self, link: Link, write: Callable[[Connection], object]
    ) -> asyncio.Future[object]:
        """:meth:`_store`'s first half: ``write`` handed to a thread now; what
        :meth:`_stored` awaits."""
        self._write_started(link)
        try:
            return start_in_worker(transaction, self.engine, write)
        except BaseException:
            self._write_ended(link)
            raise

    async def _stored(self, link: Link, started: asyncio.Future[object]) -> bool:
        """:meth:`_store`'s second half: whether the write ``started`` was stored."""
        try:
            await started
        except STORE_DOWN as exc:
            # Once per run of failures (its later ones are counted by store_retry), and
            # once per flush: its parts fail together.
            say = log.debug if link.store_failed_said else log.warning
            link.store_failed_said = True
            say("registration.store_failed", server=link.name, error=_store_error(exc))
            return False
        finally:
            self._write_ended(link)
        return True

    def _write_started(self, link: Link) -> None:
        """A store write of ``link``'s server starts: the first of a run of them is timed."""
        link.writes_running += 1
        if link.write_since is not None:
            return
        link.write_since = time.time()
        if self.stuck_after:
            loop = asyncio.get_running_loop()
            link.write_stuck_due = loop.call_later(self.stuck_after, _write_stuck, link)

    def _write_ended(self, link: Link) -> None:
        """A store write of ``link``'s server ended: with none left running, no longer
        timed, and no longer stuck (``registration.write_unstuck``)."""
        link.writes_running -= 1
        if link.writes_running:
            return
        link.write_since = None
        if link.write_stuck_due is not None:
            link.write_stuck_due.cancel()
            link.write_stuck_due = None
        if link.write_stuck:
            link.write_stuck = False
            log.info("registration.write_unstuck", server=link.name)


class _Notes(NamedTuple):
    """What the store notes of one server: the reload note, the expiries note, the
    endpoints of the removal notes and the digest of the files it last loaded."""

    reload_owed: str | None
    expiries: str | None
    removals: list[str]
    loaded: str | None


def _read_notes(engine: Engine, server: str) -> _Notes:
    """What the store notes of ``server`` (:class:`_Notes`)."""
    with reading(engine) as conn:
        reload_owed = load_state(conn, reload_owed_key(server))
        expiries = load_state(conn, owed_expiries_key(server))
        removals = load_states(conn, owed_removals_prefix(server))
        loaded = load_state(conn, loaded_digest_key(server))
    return _Notes(reload_owed, expiries, list(removals.values()), loaded)


def _store_error(exc: DBAPIError | PoolTimeout, *, text: bool = False) -> str:
    """What to log of a store failure: a database's error type (with ``text``, the
    driver's text; a registration write's quotes the phones' addresses), the pool's
    message for a pool timeout."""
    if isinstance(exc, DBAPIError):
        return str(exc.orig) if text else type(exc.orig).__name__
    return str(exc)


def _write_stuck(link: Link) -> None:
    """A store write of ``link``'s server has run past ``daemon.stuck_after``."""
    link.write_stuck_due = None
    link.write_stuck = True
    running = round(time.time() - (link.write_since or time.time()))
    log.error("registration.write_stuck", server=link.name, running_s=running)


def _ignore_outcome(_outcome: ReloadOutcome) -> None:
    """A reload's outcome nothing waits for."""


def _retry(link: Link) -> float | None:
    """Seconds the change loop waits for a change before it comes back anyway: after
    ``OWED_RETRY`` while something is owed, after ``VERIFY_PAUSE`` (or the failures'
    pause) while endpoints wait to be verified; None: only a change wakes it."""
    if not link.client.connected:
        return None
    waits = []
    # A note write the store refused is rewritten at the next round (note_owed).
    if link.owed or link.owed.notes_lost:
        waits.append(OWED_RETRY)
    if link.unverified:
        waits.append(max(VERIFY_PAUSE, link.verify_after - time.monotonic()))
    return min(waits, default=None)


async def _in_turn(
    link: Link,
    previous: asyncio.Task[None] | None,
    write: Callable[[], Coroutine[Any, Any, None]],
) -> asyncio.Task[None]:
    """Start ``write()`` once the ``previous`` write has ended; ``store_idle`` is clear
    until it ends.  Returns its task, already started."""
    if previous is not None:
        await previous
    link.store_idle.clear()
    task = asyncio.create_task(write())
    task.add_done_callback(lambda _: link.store_idle.set())
    # Let the write start (hand its transaction to the thread) before the flusher builds
    # the next batch: in a storm its waits return without yielding, and the database sat
    # idle for the whole next build.
    await asyncio.sleep(0)
    return task


def snapshot_gap(last_took: float) -> float:
    """Seconds from one snapshot's start to the next: ``SNAPSHOT_MIN_GAP``, or
    ``SNAPSHOT_GAP_FACTOR`` times the last one's duration when that is longer."""
    return max(SNAPSHOT_MIN_GAP, SNAPSHOT_GAP_FACTOR * last_took)


def split_batch(
    states: dict[str, _T], dialect: str, *, parts: int = PARALLEL_WRITES
) -> list[dict[str, _T]]:
    """``states`` (a flusher batch) in the parts written at once, each in a transaction
    of its own: on PostgreSQL, a batch of at least ``PARALLEL_MIN`` endpoints in
    ``parts`` runs of sorted endpoints (each a range of the indexes' pages), else whole.

    A storm's writes are bound by the database server, whose backend runs one
    transaction on one core: two at once wrote a 50k batch about 1.5 times as fast, a
    storm socket to store about 1.2 times (the parts' users are disjoint, so neither
    waits on the other's row locks; PostgreSQL locks rows, not the gaps between).
    SQLite has one writer at a time; on MariaDB two such writes at once deadlocked
    (InnoDB locks the gaps around the rows its deletes and inserts touch)."""
    if dialect != "postgresql" or len(states) < PARALLEL_MIN or parts < 2:
        return [states]
    ordered = sorted(states)
    size = -(-len(ordered) // parts)
    return [{ep: states[ep] for ep in ordered[i : i + size]} for i in range(0, len(ordered), size)]


def take_due(unconfirmed: dict[str, float], now: float) -> list[str]:
    """Remove from ``unconfirmed`` (endpoint -> deadline, deadlines in insertion order)
    the endpoints whose deadline is not after ``now``, and return them in that order."""
    due = []
    for endpoint, deadline in unconfirmed.items():
        if deadline > now:
            break
        due.append(endpoint)
    for endpoint in due:
        del unconfirmed[endpoint]
    return due


def snapshot_from_contact_list_states(
    contacts: Iterable[ContactState],
) -> dict[str, EndpointRegistration]:
    """Group snapshot contacts by endpoint (the AOR id is the endpoint id here)."""
    out: dict[str, EndpointRegistration] = {}
    for c in contacts:
        reg = out.get(c.aor) or EndpointRegistration(c.aor, tracked=False)
        out[c.aor] = EndpointRegistration(
            reg.endpoint, contacts=(*reg.contacts, c), tracked=reg.tracked
        )
    return out


#: Device states Asterisk gives only an endpoint with a usable contact (chan_pjsip: an
#: endpoint with none is UNAVAILABLE, one that is gone INVALID).
_DEVICE_PRESENT = frozenset({"NOT_INUSE", "INUSE", "BUSY", "RINGING", "RINGINUSE", "ONHOLD"})


def _set_aside_again(link: Link, snapshot: dict[str, EndpointRegistration]) -> None:
    """Keep out of ``snapshot`` the contacts set aside as reowned endpoints' previous
    owners' (:attr:`Link.previous`, by AOR and URI): Asterisk lists them until their
    removal deletes them, and the book's state is filed under the endpoint's new owner.
    Their peer and device states go with them, as :meth:`Link.set_aside` drops them."""
    for endpoint, held in link.previous.items():
        reg = snapshot.get(endpoint)
        if reg is None or not reg.contacts:
            continue
        gone = {(c.aor, c.uri) for c in held}
        kept = tuple(c for c in reg.contacts if (c.aor, c.uri) not in gone)
        if len(kept) == len(reg.contacts):
            continue
        peer = None if not kept and reg.peer_status == "Reachable" else reg.peer_status
        device = reg.device_state if kept else _without_contact(reg.device_state)
        snapshot[endpoint] = reg._replace(contacts=kept, peer_status=peer, device_state=device)


def _without_contact(device_state: str | None) -> str | None:
    """The device state of an endpoint a snapshot lists no contact for, from the one its
    events last said: ``UNAVAILABLE`` for a state only a registered phone has (its
    un-registration's events were lost with the connection), else unchanged."""
    return "UNAVAILABLE" if device_state in _DEVICE_PRESENT else device_state


def _expired(reg: EndpointRegistration, now: float) -> bool:
    """Whether a contact of ``reg`` has an expiry ``EXPIRY_GRACE`` or more before ``now``."""
    for contact in reg.contacts:
        if contact.expires_at is not None and contact.expires_at + EXPIRY_GRACE <= now:
            return True
    return False


def _snapshot_failed(link: Link, error: str) -> None:
    """Count a failed snapshot of ``link``'s server: ``registration.snapshot_failed`` (with
    ``error``, the reason) is a warning at the first failure of a run and at one whose
    reason differs from the failure's before it (ops who fixed a refusal learn that the
    snapshot now fails otherwise), a debug line at the others (a refusal kept up is
    retried every minute for as long as it lasts)."""
    link.snapshot_failures += 1
    changed = error != link.snapshot_error
    link.snapshot_error = error
    say = log.warning if link.snapshot_failures == 1 or changed else log.debug
    say(
        "registration.snapshot_failed",
        server=link.name,
        error=error,
        failures=link.snapshot_failures,
    )


def _snapshot_answered(link: Link) -> None:
    """Asterisk answered a snapshot of ``link``'s server: a run of failures before it
    ends, said with its count (``registration.snapshot_recovered``)."""
    if link.snapshot_failures:
        log.info(
            "registration.snapshot_recovered", server=link.name, failures=link.snapshot_failures
        )
    link.snapshot_failures = 0
    link.snapshot_error = ""


def _store_recovered(link: Link) -> None:
    """A registration write of ``link``'s server was stored: a run of failures before it
    ends, said with its count (``registration.store_recovered``)."""
    if link.store_failures:
        log.info("registration.store_recovered", server=link.name, failures=link.store_failures)
    link.store_failures = 0
    link.store_failed_said = False


async def _pause_after_failures(
    link: Link,
    stop: asyncio.Event,
    note: Callable[..., Any],
    event: str,
    failures: int,
    bounds: tuple[float, float],
    *also: asyncio.Event,
) -> None:
    """Pause after ``failures`` failures in a row: ``doubling(*bounds, failures)`` seconds,
    logged first through ``note`` (the log level's method) as ``event`` with the server,
    the failures and the pause.  The pause ends at ``stop``, as soon as a snapshot is
    wanted (a reconnect's): that snapshot is due at once, or when any of ``also`` is set."""
    delay = doubling(*bounds, failures)
    note(event, server=link.name, failures=failures, retry_in_s=delay)
    await wait_first(stop, link.snapshot_wanted, *also, timeout=delay)


def _merge(snap: EndpointRegistration, known: EndpointRegistration) -> EndpointRegistration:
    return EndpointRegistration(
        snap.endpoint,
        contacts=snap.contacts,
        peer_status=known.peer_status,
        device_state=known.device_state,
        exists=known.exists,
        tracked=known.tracked,
        last_change=known.last_change,
    )


def _batch_rows(link: Link, dirty: Iterable[str]) -> dict[str, tuple[Any, SummaryRow]]:
    """The store's rows of each of ``dirty`` still in ``link``'s book (:func:`rows`), their
    changes logged (:func:`_log_changes`)."""
    book = link.book
    states = {ep: rows(book[ep]) for ep in dirty if ep in book}
    if states:
        _log_changes(link, ((ep, summary[0]) for ep, (_, summary) in states.items()))
    return states


def _entry_writes(
    link: Link, dirty: Iterable[str], now: datetime, dialect: str
) -> list[tuple[Callable[[Connection], object], set[str]]]:
    """:meth:`AmiPbx._batch_writes` where the store takes batches (``dialect`` in
    :data:`~provisioner.store.registrations.BATCH_DIALECTS`): each of ``dirty`` still in
    ``link``'s book made into its batch entry at once (:func:`batch_entry`), their changes
    logged, then in parts (:func:`split_batch`), each a :class:`RowBatch` and the
    function that writes it, with its endpoints.  The caller pauses the collector."""
    book, stamp = link.book, time_text(now)
    entries = {ep: batch_entry(ep, book[ep], stamp) for ep in dirty if ep in book}
    if not entries:
        return []
    _log_changes(link, ((ep, entry[1]) for ep, entry in entries.items()))
    return [
        (_batch_writer(link.name, RowBatch.of_entries(list(part.values()), stamp)), set(part))
        for part in split_batch(entries, dialect)
    ]


def _batch_writer(server: str, batch: RowBatch) -> Callable[[Connection], int]:
    """The write of ``batch`` for ``server`` (:func:`write_batch`) as a function of the
    connection to write with."""
    return lambda conn: write_batch(conn, server, batch)


def _log_changes(link: Link, states: Iterable[tuple[str, str | None]]) -> None:
    """``registration.changed`` per endpoint whose summary state (``states``: endpoint and
    state pairs) changed, at most ``LOG_CHANGES_LIMIT`` per flush (the first in endpoint
    order); the rest are counted in one ``registration.changed_more`` line, so a storm
    cannot flood the log."""
    reported = link.reported
    changed: list[str] = []
    for ep, summary_state in states:
        state = summary_state or ""
        if reported.get(ep) != state:
            reported[ep] = state
            changed.append(ep)
    # Only the logged ones need sorting: a storm's flush changes thousands.
    for ep in heapq.nsmallest(LOG_CHANGES_LIMIT, changed):
        log.info("registration.changed", server=link.name, endpoint=ep, state=reported[ep])
    if len(changed) > LOG_CHANGES_LIMIT:
        log.info(
            "registration.changed_more",
            server=link.name,
            count=len(changed) - LOG_CHANGES_LIMIT,
        )
