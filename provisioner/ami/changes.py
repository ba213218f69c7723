"""What an applied change needs from one Asterisk server, and what is owed to it.

After each apply (:meth:`~provisioner.ami.pbx.AmiPbx.applied`) the daemon's change loop
hands the changes to :func:`apply_changes`, per server:

- a config-file write asks for one merged ``res_pjsip.so`` reload; a realtime change
  expires each changed object from the sorcery memory caches configured for its kind
  (endpoint, auth, aor) and asks for a reload only when endpoints were added or removed
  (Asterisk reports status only for endpoints it loaded at its last reload);
- removed endpoints' contacts are deleted from astdb (Asterisk keeps them otherwise);
- each added or updated endpoint is verified (:func:`verify_some`: looked up with
  ``PJSIPShowEndpoint``, up to ``VERIFY_LIMIT`` a round between edits, or checked
  against one ``PJSIPShowEndpoints`` listing when more than ``LISTING_OVER`` wait): one
  Asterisk rejected is logged (``pjsip.not_live``), counted and written next to the user.

Expiries and contact removals are *owed* (:class:`Owed`) until sent: one AMI could not
deliver is sent at the next connect, apply or ``OWED_RETRY``, so an outage loses none.
They are noted in the store from before they are sent until paid (:func:`note_owed`),
so a stop or a crash loses none either: the next run owes them again
(:func:`resume_owed`), although its reconcile finds the file or rows already written.
More than ``EXPIRE_ALL_OVER`` objects owed at once (a profile edit, a bulk edit, a long
outage) empty each distinct cache whole instead, one action per cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import count, islice
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from ..accounts import utcnow
from ..aio import doubling
from ..config import cache_names
from ..errors import InvalidInput
from ..logs import get_logger
from ..store.registrations import set_problems
from ..store.state import (
    KEY_MAX,
    VALUE_MAX,
    drop_state,
    put_state,
    write_states,
)
from ..targets import Change
from .errors import AmiActionFailed, AmiError
from .registration import ContactState, contact_object_name
from .reload import ReloadOutcome

if TYPE_CHECKING:
    from .pbx import Link

__all__ = [
    "EXPIRE_ALL_NOTE",
    "EXPIRE_ALL_OVER",
    "LISTING_OVER",
    "LISTING_REFUSALS_MAX",
    "NOT_LIVE_LOG_LIMIT",
    "OWED_RETRY",
    "RELOAD_RETRY_BASE",
    "RELOAD_RETRY_MAX",
    "VERIFY_LIMIT",
    "VERIFY_PAUSE",
    "AfterReload",
    "Owed",
    "apply_changes",
    "final_notes",
    "final_states",
    "loaded_digest_key",
    "note_owed",
    "note_removals",
    "note_untold_removals",
    "notes_unsure",
    "owed_expiries_key",
    "owed_removal_key",
    "owed_removals_prefix",
    "pay",
    "reload_owed_key",
    "remove_contacts",
    "request_reload",
    "resume_owed",
    "retry_reload_later",
    "stop_owes",
    "verify",
    "verify_backoff",
    "verify_some",
]

log = get_logger(__name__)

#: Seconds between tries to send what is owed to a connected server (:class:`Owed`).
OWED_RETRY = 5.0
#: Seconds before a reload that failed (busy past its retries, timed out, refused) is
#: asked for again, doubling with each failure in a row up to ``RELOAD_RETRY_MAX``.
RELOAD_RETRY_BASE = 5.0
RELOAD_RETRY_MAX = 300.0
#: Endpoints looked up one by one (PJSIPShowEndpoint) in one round of the change loop,
#: at most; the rest wait for the next round, between edits.
VERIFY_LIMIT = 200
#: More unverified endpoints than this are checked against one PJSIPShowEndpoints
#: listing (every endpoint Asterisk has: at 100k, 100k events, cheaper than 100k lookups).
LISTING_OVER = 5000
#: Seconds between two rounds of verification while endpoints wait for one.
VERIFY_PAUSE = 0.1
#: Seconds between rounds at the most while they keep failing (see :func:`verify_backoff`).
VERIFY_BACKOFF_MAX = 300.0
#: Refusals in a row (``Response: Error``) of the contact listing that owed removals
#: need before those removals are dropped (``ami.owed_dropped``): each refusal keeps them
#: owed, tried again after a pause doubling from ``OWED_RETRY`` up to
#: ``VERIFY_BACKOFF_MAX`` (about 10 minutes in all), so a privilege granted meanwhile, or
#: a passing refusal, still deletes the deleted users' registrations.
LISTING_REFUSALS_MAX = 8
#: ``pjsip.not_live`` lines per apply, at most (the rest are counted in one line).
NOT_LIVE_LOG_LIMIT = 50
#: More objects than this owed to one server: each of its caches is emptied whole
#: (``SorceryMemoryCacheExpire``, one action per cache) instead of one action per object
#: and cache.  A profile edit at 100k users changes 100k endpoints: sent one by one, that
#: many round trips would hold every later edit back for minutes, where an emptied
#: cache costs Asterisk one database read per object as it next needs it.
EXPIRE_ALL_OVER = 1000
#: The expiries note (:meth:`Owed.expiries_note`) saying "empty each cache whole".
EXPIRE_ALL_NOTE = "*"
#: The longest server name kept as is in a state key: ``owed_removal:``, it, ``:`` and
#: a 20-digit endpoint fill the key column (64); a longer one is cut and digested.
SERVER_TAG_MAX = 30
#: Numbers the changes that owe a check (see :func:`_owe_verification`).
_CHECKS_OWED = count()
#: How Asterisk answers an action no loaded module provides (yet): ``Invalid/unknown
#: command: <action>. Use Action: ListCommands to show available commands.``
_NOT_LOADED = "invalid/unknown command"


@dataclass
class Owed:
    """What an applied change still needs sent to one server: the objects (``(kind, id)``)
    to expire from its sorcery memory caches and the endpoints whose contacts to delete
    from its astdb, each in the order owed.  An action that failed for the connection's
    sake (not connected, timed out, lost) leaves its item owed, sent again at the next
    connect or apply, or after ``OWED_RETRY`` seconds: each is idempotent (an object
    expired twice, a contact already gone), so a failure never loses one.

    What is owed is also noted in the store (:func:`note_owed`) from before it is sent
    until it is paid, so a stop or a crash loses none either (:func:`resume_owed`)."""

    #: (kind, object id) of each object to expire from its kind's caches.
    expiries: dict[tuple[str, str], None] = field(default_factory=dict)
    #: Endpoint -> the stamp of its owing (see :meth:`owe_removals`).
    removals: dict[str, int] = field(default_factory=dict)
    #: Endpoints whose owed or awaited removal is of a previous owner's contacts
    #: (:attr:`Change.reowned`): no later add or update of the endpoint cancels it, the
    #: contacts are never the new owner's phone's.
    reowned: set[str] = field(default_factory=set)
    #: Each cache is owed emptying whole (a note resumed at start said so).
    expire_all: bool = False
    #: Per config-file reload not yet ended, the endpoints whose contacts its end owes.
    awaiting: list[set[str]] = field(default_factory=list)
    #: What the store notes, once the flusher has written the notes asked for so far:
    #: the expiries note's value (:meth:`expiries_note`) and the endpoints with a
    #: removal note.
    noted_expiries: str | None = None
    #: Endpoint -> the value of its removal note (:meth:`removal_notes`).
    noted_removals: dict[str, str] = field(default_factory=dict)
    #: The endpoints whose removal note this run wrote (or asked to) or resumed, and may
    #: not have seen dropped: a rewrite (:func:`_rewrite`) drops only these, never a note
    #: another writer (``sync --once``) added meanwhile for the next run to send.
    ours: set[str] = field(default_factory=set)
    #: A note write failed: the next :func:`note_owed` rewrites every note of the server.
    notes_lost: bool = False
    #: Note writes asked of the flusher whose outcome was not seen yet: one the flusher
    #: dropped as it stopped is lost although its callback has not run (see
    #: :func:`notes_unsure`).
    note_writes: set[asyncio.Future[bool]] = field(default_factory=set)
    #: The last run's notes were read (:func:`resume_owed`): until then, they are not
    #: this run's to replace.
    resumed: bool = False
    #: Contact listings refused in a row while paying :attr:`removals`, and the
    #: ``time.monotonic()`` before which they are not tried again (see
    #: :data:`LISTING_REFUSALS_MAX`).
    listing_refusals: int = 0
    removals_after: float = 0.0
    _stamps: Iterator[int] = field(default_factory=count, repr=False)

    def __bool__(self) -> bool:
        return bool(self.expiries or self.removals or self.expire_all)

    def add(self, change: Change, *, expire: bool, remove: bool = True) -> None:
        """Owe what ``change`` needs (``expire``: its changed objects' expiries;
        ``remove``: its removed and reowned endpoints' contacts, else owed later by the
        caller).  An endpoint added or updated after its removal was owed keeps its
        contacts: they are its phone's again (also when that removal awaits a reload);
        unless it was reowned (given to another user) since: those contacts stay owed."""
        if expire:
            self.expiries.update(dict.fromkeys(change.changed_objects))
        self.reowned.update(change.reowned)
        if remove:
            self.owe_removals((*change.removed, *change.reowned))
        back = [e for e in (*change.added, *change.updated) if e not in self.reowned]
        self.keep(back)
        for endpoints in self.awaiting:
            endpoints.difference_update(back)

    def owe_removals(self, endpoints: Iterable[str]) -> None:
        """Owe the contact removals of ``endpoints``, each stamped anew: a removal owed
        again while one of it is being sent is not taken for paid with it."""
        for endpoint in endpoints:
            self.removals[endpoint] = next(self._stamps)

    def keep(self, endpoints: Iterable[str]) -> None:
        """Owe no contact removal for ``endpoints`` (added or updated again), but for
        reowned ones (a previous owner's contacts)."""
        for endpoint in endpoints:
            if endpoint not in self.reowned:
                self.removals.pop(endpoint, None)

    def paid(self, endpoint: str) -> None:
        """``endpoint``'s contact removal was sent: owe it no more."""
        del self.removals[endpoint]
        if not any(endpoint in endpoints for endpoints in self.awaiting):
            self.reowned.discard(endpoint)

    def await_reload(self, endpoints: Iterable[str]) -> set[str]:
        """Note that the end of a reload asked for owes the contact removals of
        ``endpoints``; the set to hand to :meth:`reloaded` then (an endpoint added or
        updated again meanwhile leaves it)."""
        awaiting = set(endpoints)
        self.awaiting.append(awaiting)
        return awaiting

    def merge_awaiting(self, into: set[str], later: set[str]) -> None:
        """Fold ``later`` (from :meth:`await_reload`, a reload requested after the one
        ``into`` awaits) into ``into``, which then stands for both: one set per merged
        wait, however many failed reloads it spans."""
        if later is into:
            return
        into.update(later)
        self.awaiting = [a for a in self.awaiting if a is not later]

    def reloaded(self, awaiting: set[str]) -> None:
        """The reload ``awaiting`` (from :meth:`await_reload`) waited for ended: owe its
        removals now."""
        self.awaiting = [a for a in self.awaiting if a is not awaiting]
        self.owe_removals(sorted(awaiting))

    def expiries_note(self) -> str | None:
        """The note saying which expiries are owed: a JSON list of [kind, object id], or
        ``EXPIRE_ALL_NOTE`` when they are more than ``EXPIRE_ALL_OVER`` or would not fit
        the store's value (emptying each cache whole covers them all); None: none."""
        if self.expire_all or len(self.expiries) > EXPIRE_ALL_OVER:
            return EXPIRE_ALL_NOTE
        if not self.expiries:
            return None
        # Each pair takes at least 12 characters ('["aor","x"],'): skip building what
        # cannot fit.
        if 12 * len(self.expiries) > VALUE_MAX:
            return EXPIRE_ALL_NOTE
        listed = json.dumps(list(self.expiries), separators=(",", ":"))
        return listed if len(listed) <= VALUE_MAX else EXPIRE_ALL_NOTE

    def removals_to_note(self) -> set[str]:
        """The endpoints whose contact removal the store should note: those owed now and
        those awaiting a reload."""
        return set(self.removals).union(*self.awaiting)

    def removal_notes(self) -> dict[str, str]:
        """Endpoint -> the value of its removal note, for each of :meth:`removals_to_note`
        (:func:`removal_note`): a reowned one's says so."""
        return {ep: removal_note(ep, reowned=ep in self.reowned) for ep in self.removals_to_note()}


@dataclass
class AfterReload:
    """What the end of a config file's reload owes: the endpoints to verify
    (``changed``) and to verify no longer (``gone``), and the contact removals awaiting
    it (``awaiting``, a set held in :attr:`Owed.awaiting`)."""

    changed: set[str]
    gone: set[str]
    awaiting: set[str]

    def merge(self, later: AfterReload, owed: Owed) -> None:
        """Fold in ``later``, owed by a reload requested after this one's: an endpoint's
        later state wins, so the merged record owes what the two in turn would.  The
        awaiting sets merge in ``owed`` too (an endpoint added again since has already
        left both, see :meth:`Owed.add`)."""
        self.changed = (self.changed - later.gone) | later.changed
        self.gone = (self.gone - later.changed) | later.gone
        owed.merge_awaiting(self.awaiting, later.awaiting)


async def apply_changes(link: Link, batch: Sequence[Change], *, realtime: bool) -> None:
    """What the changes of ``batch`` (applied in this order) need from ``link``'s
    server (``realtime``: the target is the realtime one, else a config file).

    Cache expiries (realtime) and contact removals are owed, then sent; whatever an
    AMI failure left unsent stays owed (:class:`Owed`) and never holds back the
    reload, which is asked for either way: the coordinator keeps it for a server
    that is down.  Then the added and updated endpoints are verified: a config
    file's after its reload (its objects change only with it), realtime rows at once
    (nothing waits for their reload)."""
    changed, gone = final_states(batch)
    reloads_file = not realtime and any(c.wrote for c in batch)
    for change in batch:
        # A config file's removed endpoint lives in Asterisk until the reload: a contact
        # deleted before it could be registered again meanwhile, and would then outlive
        # the endpoint (README of ../shared/asterisk).  Its contacts go after the reload.
        link.owed.add(change, expire=realtime and bool(link.caches), remove=not reloads_file)
        if realtime and change.added and link.untracked is not None:
            # Live at once (a realtime row), tracked only after the reload asked below.
            link.untracked.update(change.added)
    # A reowned endpoint's previous owner's contacts go after the reload too: before it,
    # Asterisk still takes the previous credentials, and that phone could register again.
    reowned = {e for change in batch for e in change.reowned}
    awaiting = link.owed.await_reload(gone | reowned) if reloads_file else set[str]()
    reloads = reloads_file or (realtime and any(c.added or c.removed for c in batch))
    # Noted before anything is sent, the reload in the same write: a stop or a crash from
    # here on loses none of it, and a config file's removal is never noted without the
    # reload it waits for (resumed alone, it would be sent before that reload).  Cache
    # expiries are noted only if the sending leaves them owed: noting each edit's before
    # sending them cost two store writes per edit, contending with the next edit's apply
    # (realtime p99 7 -> 14-40 ms at 10k users), to cover a crash in the milliseconds
    # between the commit and the expiry.
    note_owed(link, reload=reloads, expiries=False)
    await pay(link)
    note_owed(link)
    if reloads_file:
        # A config file's objects change only with the reload: they are verified after
        # it.  Not awaited: edits applied while this reload waits (for its gap, for a
        # server that is down) merge into it, as their bytes are on disk before it is
        # sent, instead of each costing one more reload afterwards.
        request_reload(link, AfterReload(changed, gone, awaiting))
    else:
        if reloads:
            # The rows are live already (expired above); the reload only has Asterisk
            # report the status of added endpoints, and the next edit must not wait for
            # it (95 s at 50k endpoints, realtime slower still).
            request_reload(link)
        _owe_verification(link, changed, gone)
    await verify_some(link)


def final_states(batch: Sequence[Change]) -> tuple[set[str], set[str]]:
    """The endpoints ``batch`` (changes in the order applied) leaves added or updated,
    and those it leaves removed: an endpoint's last change decides.  Within one change
    an endpoint both removed (one user's) and added (another's) is there."""
    there: set[str] = set()
    gone: set[str] = set()
    for change in batch:
        back = {*change.added, *change.updated}
        removed = set(change.removed) - back
        there.difference_update(removed)
        gone.update(removed)
        gone.difference_update(back)
        there.update(back)
    return there, gone


def reload_owed_key(server: str) -> str:
    """The ``daemon_state`` key noting that ``server`` is owed a reload (a name too long
    for the key column cut and digested, as in every note's key)."""
    return "reload_owed:" + _server_tag(server)


def loaded_digest_key(server: str) -> str:
    """The ``daemon_state`` key noting the digest of the config files ``server`` loaded
    at its last reload the daemon saw accepted (see :mod:`provisioner.ami.loaded`)."""
    return "loaded_digest:" + _server_tag(server)


def owed_expiries_key(server: str) -> str:
    """The ``daemon_state`` key noting the cache expiries owed to ``server``."""
    return "owed_expiries:" + _server_tag(server)


def owed_removals_prefix(server: str) -> str:
    """The start of every ``daemon_state`` key noting a contact removal owed to
    ``server`` (one key per endpoint, the endpoint its value)."""
    return f"owed_removal:{_server_tag(server)}:"


def owed_removal_key(server: str, endpoint: str) -> str:
    """The ``daemon_state`` key noting that ``endpoint``'s contacts are owed removal
    from ``server``: the endpoint itself ends it, or its digest when too long."""
    prefix = owed_removals_prefix(server)
    if len(prefix) + len(endpoint) <= KEY_MAX:
        return prefix + endpoint
    return prefix + "~" + _digest(endpoint, KEY_MAX - len(prefix) - 1)


def _server_tag(server: str) -> str:
    """``server`` in a state key: itself when short enough for the key column to hold
    any of its keys (names may be 64 characters long), else its start and a digest."""
    if len(server) <= SERVER_TAG_MAX:
        return server
    return server[: SERVER_TAG_MAX - 9] + "~" + _digest(server, 8)


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


#: What starts the value of a reowned endpoint's removal note (:func:`removal_note`).
REOWNED_NOTE = "reowned:"


def removal_note(endpoint: str, *, reowned: bool = False) -> str:
    """The value of ``endpoint``'s removal note: the endpoint, after ``REOWNED_NOTE`` when
    ``reowned`` (the contacts are a previous owner's: the next run's edits of the
    endpoint must not cancel their removal, see :attr:`Owed.reowned`).  An endpoint is
    an extension (digits): no endpoint starts so."""
    return REOWNED_NOTE + endpoint if reowned else endpoint


def _noted_removal(value: str) -> tuple[str, bool]:
    """The endpoint a removal note's ``value`` names, and whether it was reowned."""
    if value.startswith(REOWNED_NOTE):
        return value[len(REOWNED_NOTE) :], True
    return value, False


def note_owed(link: Link, *, reload: bool = False, expiries: bool = True) -> None:
    """Have the store note what ``link.owed`` holds now (in the flusher's turn, one
    transaction): with ``expiries``, the expiries note put, changed or dropped; one
    removal note put per endpoint newly owed or awaiting a reload, dropped per endpoint
    paid or kept; and, with ``reload``, the reload about to be asked for (see
    :func:`request_reload`).

    Only what changed since the last call is written, so a retry while the server is
    down writes nothing and a 100k-object profile edit one row (``EXPIRE_ALL_NOTE``).
    Each write holds what was owed when it was asked for, and the flusher runs them in
    that order: the store ends with the latest, and a note is never dropped while an
    item it stands for is still owed."""
    owed = link.owed
    if owed.notes_lost:
        link.reload_noted = link.reload_noted or reload
        _rewrite_notes(link)
        return
    put: dict[str, str] = {}
    drop: list[str] = []
    if reload and not link.reload_noted:
        link.reload_noted = True
        put[reload_owed_key(link.name)] = "1"
    note = owed.expiries_note() if expiries else owed.noted_expiries
    if note != owed.noted_expiries:
        key = owed_expiries_key(link.name)
        if note is None:
            drop.append(key)
        else:
            put[key] = note
        owed.noted_expiries = note
    wanted = owed.removal_notes()
    noted = owed.noted_removals
    new = {ep for ep, note in wanted.items() if noted.get(ep) != note}
    put.update((owed_removal_key(link.name, ep), wanted[ep]) for ep in sorted(new))
    owed.ours.update(new)
    drop.extend(owed_removal_key(link.name, ep) for ep in noted.keys() - wanted.keys())
    owed.noted_removals = wanted
    if put or drop:
        _write_notes(link, partial(write_states, put=put, drop=drop))


def note_untold_removals(conn: Connection, servers: Iterable[str], change: Change) -> None:
    """Note, in the caller's transaction, the contact removals ``change`` owes each of
    ``servers`` (its removed endpoints not added back, and its reowned ones), as a
    daemon's stop notes them: a writer that tells Asterisk nothing (``sync --once``,
    ``render``) calls it, and the next daemon sends them (:func:`resume_owed`; a config
    file's after the reload its ``loaded_digest`` note owes), where its reconcile finds
    the target as desired and would owe nothing."""
    back = {*change.added, *change.updated}
    endpoints = {*(set(change.removed) - back), *change.reowned}
    note_removals(conn, servers, endpoints, reowned=change.reowned)


def note_removals(
    conn: Connection,
    servers: Iterable[str],
    endpoints: Iterable[str],
    *,
    reowned: Collection[str] = (),
) -> None:
    """Note, in the caller's transaction, the contact removals of ``endpoints`` owed to
    each of ``servers`` (those in ``reowned`` noted as a reowned endpoint's), for the
    next daemon to send (:func:`resume_owed`).  The daemon calls it before it writes a
    target removing endpoints (``Applier.before_removing``): a kill between that write and
    the AMI side's own note (:func:`note_owed`, in the flusher's turn) would otherwise
    leave the phones of a disabled or deleted user registered for good.  That note then
    puts the same keys again and drops them once paid."""
    ordered = sorted(set(endpoints))
    put = {
        owed_removal_key(s, ep): removal_note(ep, reowned=ep in reowned)
        for s in servers
        for ep in ordered
    }
    if put:
        write_states(conn, put)


def stop_owes(link: Link, batch: Sequence[Change], *, realtime: bool) -> bool:
    """Owe what the changes of ``batch``, taken at a stop and never sent, need from
    ``link``'s server, removals at once (the next run sends a config file's after its
    resumed reload); whether they need a reload."""
    for change in batch:
        link.owed.add(change, expire=realtime and bool(link.caches))
    if realtime:
        return any(c.added or c.removed for c in batch)
    return any(c.wrote for c in batch)


def final_notes(
    link: Link, batch: Sequence[Change], *, reload: bool
) -> Callable[[Connection], None]:
    """The last write of ``link``'s notes, at a stop, once the flusher has ended: every
    owed note replaced by what is owed now, and the reload noted when ``reload`` or one
    asked for earlier has not ended well (else its note dropped).

    Before the last run's notes were read (:func:`resume_owed`) nothing is dropped but
    the removal notes of endpoints ``batch`` leaves there: the last run's notes still
    stand for what they owe."""
    owed = link.owed
    link.reload_noted = link.reload_noted or reload
    if owed.resumed:
        return _rewrite(link)
    put, _drop = _notes(link)
    there, _gone = final_states(batch)
    drop = [owed_removal_key(link.name, ep) for ep in sorted(there - owed.noted_removals.keys())]
    return partial(write_states, put=put, drop=drop)


def notes_unsure(owed: Owed) -> bool:
    """Whether a note write failed, or was dropped unwritten (the flusher stopped), or
    has not ended yet: what the store notes is not known."""
    return owed.notes_lost or any(
        not done.done() or done.cancelled() or not done.result() for done in owed.note_writes
    )


def _rewrite_notes(link: Link) -> None:
    """Replace every note this run wrote for ``link``'s server with what is owed now
    (after a note write failed, what the store holds is not known)."""
    _write_notes(link, _rewrite(link))


def _rewrite(link: Link) -> Callable[[Connection], None]:
    """The write replacing the notes of ``link``'s server (owed items and the reload)
    with what is owed now: each removal note this run wrote or resumed
    (:attr:`Owed.ours`) and no longer owes is dropped; one another writer added meanwhile
    (``sync --once`` notes the removals it owes, :func:`note_untold_removals`) is kept,
    for the next run to send."""
    owed = link.owed
    put, drop = _notes(link)
    owed.ours.update(owed.noted_removals)
    gone = owed.ours - owed.noted_removals.keys()
    drop.extend(owed_removal_key(link.name, ep) for ep in sorted(gone))
    if owed.noted_expiries is None:
        drop.append(owed_expiries_key(link.name))
    return partial(write_states, put=put, drop=drop)


def _notes(link: Link) -> tuple[dict[str, str], list[str]]:
    """Every note of what is owed to ``link``'s server now (by key), taken for noted, and
    the reload note's key when no reload is owed (to drop)."""
    owed = link.owed
    owed.notes_lost = False
    owed.noted_expiries = owed.expiries_note()
    owed.noted_removals = owed.removal_notes()
    put = {owed_removal_key(link.name, ep): note for ep, note in owed.noted_removals.items()}
    if owed.noted_expiries is not None:
        put[owed_expiries_key(link.name)] = owed.noted_expiries
    key = reload_owed_key(link.name)
    if link.reload_noted:
        put[key] = "1"
        return put, []
    return put, [key]


def _write_notes(link: Link, write: Callable[[Connection], object]) -> None:
    """Have the flusher run ``write`` (a note write); when the store refuses it, or the
    flusher stops first, the next :func:`note_owed` (or the stop's :func:`final_notes`)
    rewrites every note of the server."""
    owed = link.owed
    done = link.in_flusher_turn(write)
    owed.note_writes.add(done)

    def written(done: asyncio.Future[bool]) -> None:
        owed.note_writes.discard(done)
        if done.cancelled() or not done.result():
            owed.notes_lost = True
        elif not owed.note_writes and not owed.notes_lost:
            # Every write asked for is in the store: its removal notes of this run are
            # those noted now (keeps ``ours`` as small as what is owed).
            owed.ours = set(owed.noted_removals)

    done.add_done_callback(written)


def resume_owed(
    link: Link,
    expiries: str | None,
    removals: Iterable[str],
    reload: asyncio.Future[ReloadOutcome] | None = None,
) -> None:
    """Owe again what the last run noted owed to ``link``'s server and never saw paid:
    the expiries note's value (``expiries``) and the endpoints of its removal notes
    (``removals``, the notes' values), owed once ``reload`` (a config file's reload
    resumed with them) has ended, else at once; each as a reowned endpoint's
    (:attr:`Owed.reowned`: no change of this run cancels it).  Logs
    ``ami.owed_resumed`` when there is any."""
    owed = link.owed
    noted = dict(_noted_removal(value) for value in removals)
    endpoints = sorted(noted)
    owed.resumed = True
    owed.noted_expiries = expiries
    owed.noted_removals = {ep: removal_note(ep, reowned=noted[ep]) for ep in endpoints}
    owed.ours.update(endpoints)
    # Whose contacts they are this run cannot tell (the last one knew the endpoint's
    # owner; it may be another user's now, reowned or not): no add or edit of the
    # endpoint cancels their removal, as for a reowned one's.  Its own phone registers
    # again; a stranger's would take the new owner's calls.
    owed.reowned.update(endpoints)
    if expiries is not None:
        objects = _noted_objects(expiries)
        if objects is None:
            owed.expire_all = True
        else:
            owed.expiries.update(dict.fromkeys(objects))
    if reload is not None and endpoints:
        # The endpoint lives in Asterisk until that reload (see apply_changes).
        awaiting = owed.await_reload(endpoints)
        _wait_for(link, reload, AfterReload(set(), set(endpoints), awaiting), older=True)
    else:
        owed.owe_removals(endpoints)
    if expiries is not None or endpoints:
        log.info(
            "ami.owed_resumed",
            server=link.name,
            expiries=len(owed.expiries),
            expire_all=owed.expire_all,
            removals=len(endpoints),
            after_reload=reload is not None and bool(endpoints),
        )


def _noted_objects(note: str) -> list[tuple[str, str]] | None:
    """The (kind, object id) pairs an expiries note lists; None: every cache is to be
    emptied (the note says so, or cannot be read: emptying is always sound)."""
    if note == EXPIRE_ALL_NOTE:
        return None
    try:
        pairs = json.loads(note)
    except ValueError:
        return None
    if not isinstance(pairs, list) or not all(_is_pair(p) for p in pairs):
        return None
    return [(kind, object_id) for kind, object_id in pairs]


def _is_pair(item: object) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item)


def request_reload(
    link: Link, after: AfterReload | None = None, *, older: bool = False
) -> asyncio.Future[ReloadOutcome]:
    """Ask for a reload of ``link``'s server, noted in the store until one has ended
    well: a reload a SIGTERM or a crash cut off (one waiting for its gap, or for a server
    that is down) is asked for again at the next start, whose full reconcile finds the
    file or rows already written and so would owe Asterisk nothing.  ``after``: what
    the end of that reload owes (a config file's, see :func:`_wait_for`; ``older``: it
    comes from before the requests already waiting)."""
    future = link.reloads.request()
    if not link.reload_noted:
        link.reload_noted = True
        _write_notes(link, partial(put_state, key=reload_owed_key(link.name), value="1"))
    if future is not link.reload_joined:
        # The first request this future serves: later ones share it (the coordinator
        # merges requests while the reload has not started), and their callbacks would
        # only repeat these, one more pair per edit made during a long outage.
        link.reload_joined = future
        future.add_done_callback(partial(_reload_settled, link))
        future.add_done_callback(partial(_reload_ended, link))
    if after is not None:
        _wait_for(link, future, after, older=older)
    return future


def _wait_for(
    link: Link, future: asyncio.Future[ReloadOutcome], after: AfterReload, *, older: bool
) -> None:
    """Have the end of ``future`` (from :func:`request_reload`) owe ``after``: merged
    into what it owes already (an endpoint's later state wins; ``older``: ``after`` is
    the earlier of the two), so requests waiting together hold one record, as the
    failed reloads' ends do (``link.after_retry``)."""
    held = link.after_reload.get(future)
    if held is None:
        link.after_reload[future] = after
    elif older:
        after.merge(held, link.owed)
        link.after_reload[future] = after
    else:
        held.merge(after, link.owed)


def _reload_ended(link: Link, future: asyncio.Future[ReloadOutcome]) -> None:
    """A reload requested with :func:`request_reload` ended: count it once, however many
    requests it served, and hand what its end owes to :func:`_file_reloaded`."""
    if link.reload_joined is future:
        link.reload_joined = None
    after = link.after_reload.pop(future, None)
    if future.cancelled():
        return
    outcome = future.result()
    _count_reload(link, outcome)
    if after is not None:
        _file_reloaded(link, after, outcome)


def _reload_settled(link: Link, future: asyncio.Future[ReloadOutcome]) -> None:
    """Forget the noted reload once one ended well and no other waits or runs (with no
    gap between reloads the next one is sent before this runs); ask again later for one
    that failed (:func:`retry_reload_later`)."""
    if future.cancelled():
        return
    outcome = future.result()
    if not outcome.ok:
        if outcome.result != "stopped":
            retry_reload_later(link, outcome)
        return
    link.reload_failures = 0
    if link.reload_noted and not (link.reloads.pending or link.reloads.in_flight):
        link.reload_noted = False
        _write_notes(link, partial(drop_state, key=reload_owed_key(link.name)))


def retry_reload_later(link: Link, outcome: ReloadOutcome) -> None:
    """Ask again for a reload that failed, after a pause doubling with each failure in
    a row: the file or rows are written, and without a reload Asterisk would not load
    them until some later edit asked for one.  One retry serves every request the
    failed reload merged; what waited for its end (``link.after_retry``, one record
    however many failed) waits for the retry's.  A stop cancels it (the reload stays
    noted: the next run asks for it)."""
    if link.reload_retry is not None or link.stopping:
        return  # one is armed already; or stopping: the reload stays noted for next run
    link.reload_failures += 1
    delay = doubling(RELOAD_RETRY_BASE, RELOAD_RETRY_MAX, link.reload_failures)
    log.warning(
        "ami.reload_retry",
        server=link.name,
        result=outcome.result,
        failures=link.reload_failures,
        retry_in_s=delay,
    )
    link.reload_retry = asyncio.get_running_loop().call_later(delay, _retry_reload, link)


def _retry_reload(link: Link) -> None:
    link.reload_retry = None
    waiting, link.after_retry = link.after_retry, None
    request_reload(link, waiting, older=True)


def _owe_verification(link: Link, changed: set[str], gone: set[str]) -> None:
    """Have ``changed`` endpoints verified (in order); ``gone`` ones no longer."""
    unverified = link.unverified
    for endpoint in sorted(changed):
        # A new number, at the end of the queue: a check already asked about the
        # endpoint answers for the older change only (see verify).
        unverified.pop(endpoint, None)
        unverified[endpoint] = next(_CHECKS_OWED)
    for endpoint in gone:
        unverified.pop(endpoint, None)
        link.rejected.discard(endpoint)


def _file_reloaded(link: Link, after: AfterReload, outcome: ReloadOutcome) -> None:
    """A config file's reload ended (``outcome``): owe the contact removals awaiting it
    (``after.gone``'s endpoints not added again since), and have the changed endpoints
    verified, by the change loop (woken by an empty change), unless the daemon is
    stopping (the removals stay noted in the store, for the next run).  Reloads end in
    request order, so an endpoint removed then added again keeps its contacts.  A failed
    one's ``after`` merges into ``link.after_retry`` (one record, whatever the number of
    applies made while reloads keep failing), served by the retried reload."""
    if outcome.result == "stopped":
        return
    if not outcome.ok:
        # Asterisk may not have loaded the file (or, timed out, may still be loading
        # it): the removals and checks wait for the retried reload.
        if link.after_retry is None:
            link.after_retry = after
        else:
            link.after_retry.merge(after, link.owed)
        return
    link.owed.reloaded(after.awaiting)
    link.owed.keep(after.changed)
    note_owed(link)
    _owe_verification(link, after.changed, after.gone)
    if after.changed or after.gone:
        link.changes.put_nowait(Change())


def _count_reload(link: Link, outcome: ReloadOutcome) -> None:
    link.totals.add_reload(outcome.result)


async def pay(link: Link) -> None:
    """Send what is owed to this server, oldest first, until an action fails for the
    connection's sake (the rest would fail alike): that one and the rest stay owed.
    One Asterisk refuses (``Response: Error``), or the action validator does, is logged
    and dropped alone, the others still sent: each expiry and each contact's DBDel
    stands on its own.  Such a refusal is not retried: Asterisk refuses these only for
    good (no such cache, a privilege missing, a value it cannot take); a busy reload is
    retried by the reload coordinator, which owns reloads.  A contact listing refused
    is not one item's: the removals it was for stay owed, tried again after a pause, and
    are dropped only after :data:`LISTING_REFUSALS_MAX` refusals in a row
    (:func:`_listing_refused`)."""
    owed = link.owed
    try:
        if owed.expire_all or len(owed.expiries) > EXPIRE_ALL_OVER:
            await _expire_all(link)
        await _expire_owed(link)
        if owed.removals and time.monotonic() >= owed.removals_after:
            await _pay_removals(link)
    except AmiError as exc:
        log.warning(
            "ami.owed",
            server=link.name,
            expiries=len(owed.expiries),
            removals=len(owed.removals),
            error=str(exc),
        )


async def _pay_removals(link: Link) -> None:
    """Delete the owed removals' contacts (:func:`remove_contacts`) and owe them no more;
    a contact listing Asterisk refuses leaves them owed (:func:`_listing_refused`)."""
    owed = link.owed
    # A copy: a reload ending meanwhile (_file_reloaded) owes more, which this send
    # neither iterates over nor takes for paid.
    sending = dict(owed.removals)
    item = ",".join(sending)
    with _refusal_logged(link, "remove_contacts", item):
        try:
            await remove_contacts(link, sending.keys())
        except AmiActionFailed as exc:
            # Each DBDel's refusal is logged and dropped alone (_remove_one): this is the
            # listing's, which every removal sent needed.
            if _listing_refused(link, item, len(sending), exc):
                return
    owed.listing_refusals = 0
    owed.removals_after = 0.0
    for endpoint, stamp in sending.items():
        if owed.removals.get(endpoint) == stamp:
            owed.paid(endpoint)


def _listing_refused(link: Link, item: str, removals: int, exc: AmiActionFailed) -> bool:
    """Asterisk refused the contact listing the owed ``removals`` (endpoints ``item``)
    needed: logged (``ami.owed_refused``, ``what`` ``list_contacts``); True while they
    stay owed, tried again after a pause that doubles (:data:`LISTING_REFUSALS_MAX`),
    False once refused that many times in a row: then dropped, saying so
    (``ami.owed_dropped``: the phones of those users stay registered until their
    contacts expire)."""
    owed = link.owed
    owed.listing_refusals += 1
    tries = owed.listing_refusals
    error = exc.asterisk_message
    log.warning(
        "ami.owed_refused",
        server=link.name,
        what="list_contacts",
        item=item,
        error=error,
        refusals=tries,
    )
    if tries < LISTING_REFUSALS_MAX:
        owed.removals_after = time.monotonic() + doubling(OWED_RETRY, VERIFY_BACKOFF_MAX, tries)
        return True
    log.error(
        "ami.owed_dropped",
        server=link.name,
        what="remove_contacts",
        removals=removals,
        refusals=tries,
        error=error,
    )
    return False


async def _expire_owed(link: Link) -> None:
    """Expire each owed object, oldest first, from the caches of its kind only, and owe
    it no more.  A cache gets each id once per call: a user's endpoint and AOR share an
    id, and a cache listed for every kind would otherwise get it twice."""
    owed = link.owed
    sent: set[tuple[str, str]] = set()
    while owed.expiries:
        kind, object_id = owed_key = next(iter(owed.expiries))
        for cache in link.caches.get(kind, ()):
            if (cache, object_id) not in sent:
                sent.add((cache, object_id))
                with _refusal_logged(link, "expire", object_id):
                    await link.ops.expire(cache, object_id)
        del owed.expiries[owed_key]


async def _expire_all(link: Link) -> None:
    """Empty each of the server's distinct caches once, then owe no expiry (emptied caches
    hold none of the objects).  A connection failure leaves them all owed: emptying
    again is harmless."""
    owed = link.owed
    caches = cache_names(link.caches)
    for cache in caches:
        with _refusal_logged(link, "expire_all", cache):
            await link.ops.expire_all(cache)
    log.info(
        "ami.caches_expired", server=link.name, caches=list(caches), objects=len(owed.expiries)
    )
    owed.expiries.clear()
    owed.expire_all = False


async def remove_contacts(link: Link, removed: Collection[str]) -> None:
    """Asterisk keeps a deleted endpoint's registrations: delete them from astdb, and
    from the book (the store then shows the phones offline).

    While the book holds every contact (:meth:`Link.book_complete`) the removed
    endpoints' contacts are deleted by name, without listing every contact of the
    server: at 100k registered phones ``PJSIPShowContacts`` is 100k events, seconds
    every later edit would wait behind.  Otherwise, or when a name derived from a status
    event's URI was not in astdb, every contact is listed and the removed AORs' deleted.
    A snapshot's listing under way is waited for instead, and its book used: a listing
    of its own at the same time would double Asterisk's work.  So is the session's first
    snapshot (a reconnect's) while it is wanted and not started yet: it may wait for the
    last session's snapshot to be stored, and for the snapshots' spacing.  One that
    fails (or a lost session) ends the wait: then the removal lists on its own.
    """
    while link.snapshot_coming():
        await link.snapshot_turned.wait()
    if not link.book_complete() and link.snapshot_events is not None:
        await link.listing_idle.wait()  # it always ends: answered, timed out or cut
    if link.book_complete() and await _remove_known(link, removed):
        return
    for c in await _listed_contacts(link):
        if c.aor in removed and c.object_name:
            await _remove_one(link, c.aor, c.object_name)


async def _listed_contacts(link: Link) -> list[ContactState]:
    """Every contact of the server (``PJSIPShowContacts``).  Asterisk accepts a login
    before res_pjsip has loaded (``FullyBooted`` comes later) and answers that it does not
    know the action: that is no refusal for good, so it raises a plain :class:`AmiError`,
    which leaves the removals owed (:func:`pay`), where a refusal counts towards dropping
    them (:func:`_listing_refused`)."""
    try:
        return await link.ops.show_contacts()
    except AmiActionFailed as exc:
        if _NOT_LOADED not in exc.asterisk_message.lower():
            raise
        raise AmiError(link.name, f"PJSIPShowContacts: {exc.asterisk_message}") from None


async def _remove_known(link: Link, removed: Collection[str]) -> bool:
    """Delete the book's contacts of the ``removed`` endpoints (each its own AOR); False
    when a derived name was not found, or when the book no longer knows an endpoint's
    contacts (Asterisk said it ``INVALID``, which takes them from the book, though astdb
    keeps them: a config file's removal comes after the reload, and the reload's events
    may come before its answer): then the caller lists them all."""
    found = True
    for endpoint in removed:
        # A reowned endpoint's previous owner's contacts, set aside from the book.
        for contact in link.previous.get(endpoint, ()):
            name, derived = contact_object_name(contact)
            if not await _remove_one(link, contact.aor, name) and derived:
                found = False
        reg = link.book.get(endpoint)
        if reg is not None and not reg.exists:
            found = False
            continue
        for contact in reg.contacts if reg is not None else ():
            name, derived = contact_object_name(contact)
            if not await _remove_one(link, contact.aor, name) and derived:
                found = False
    return found


async def _remove_one(link: Link, aor: str, object_name: str) -> bool:
    """DBDel one contact; whether astdb held it.  The book forgets it either way, but for
    a DBDel refused (logged ``ami.owed_refused`` and dropped alone, so the other owed
    contacts are still deleted): astdb keeps that one, and True is answered, as a
    listing would only find it and be refused again."""
    deleted: bool | None = None
    with _refusal_logged(link, "remove_contact", object_name):
        deleted = await link.ops.remove_contact_object(object_name)
    if deleted is None:
        return True
    log.info("registration.removed", server=link.name, aor=aor, deleted=deleted)
    link.forget_contact(aor, object_name)
    return deleted


async def verify_some(link: Link) -> None:
    """Verify endpoints of ``link.unverified``, oldest first: all of them against one
    ``PJSIPShowEndpoints`` listing when they are more than ``LISTING_OVER`` (a first
    start, a bulk import), else up to ``VERIFY_LIMIT`` looked up one by one, so a bulk
    edit's check never holds the next edit's expiries back by more than one such
    round (the change loop comes back for the rest between edits)."""
    backlog = link.unverified
    if not backlog or time.monotonic() < link.verify_after:
        return
    if len(backlog) > LISTING_OVER:
        await verify(link, list(backlog), listing=True)
    else:
        await verify(link, list(islice(backlog, VERIFY_LIMIT)))


async def verify(link: Link, endpoints: list[str], *, listing: bool = False) -> None:
    """Ask Asterisk whether each of ``endpoints`` is live as rendered (``listing``: from
    one ``PJSIPShowEndpoints``, else one ``PJSIPShowEndpoint`` each); log and count each
    that is not (``pjsip.not_live``), record every answer next to its user and take
    the answered ones off ``link.unverified``.  An AMI failure leaves the rest
    unverified (``pjsip.verify_failed``), for a later round: a check, not a write."""
    problems: dict[str, str] = {}
    owed = {endpoint: link.unverified.get(endpoint) for endpoint in endpoints}
    try:
        await (_verify_listed if listing else _verify_each)(link, endpoints, problems)
    except AmiError as exc:
        # A check only: what was answered is recorded; the rest waits for a later round,
        # after a pause that grows while rounds keep failing (a refusal does not fix
        # itself, and must not be asked again ten times a second).
        link.verify_failures += 1
        pause = verify_backoff(link.verify_failures)
        link.verify_after = time.monotonic() + pause
        log.warning(
            "pjsip.verify_failed",
            server=link.name,
            unverified=len(link.unverified) - len(problems),
            retry_in_s=pause,
            error=str(exc),
        )
    else:
        link.verify_failures = 0
    for endpoint in problems:
        # Changed again while Asterisk answered: this answer may predate that change.
        if link.unverified.get(endpoint) == owed[endpoint]:
            link.unverified.pop(endpoint, None)
    if not problems:
        return
    for endpoint, problem in problems.items():
        (link.rejected.add if problem else link.rejected.discard)(endpoint)
    _held_again(link, [ep for ep, problem in problems.items() if not problem])
    not_live = [(ep, problem) for ep, problem in problems.items() if problem]
    link.not_live += len(not_live)
    for endpoint, problem in not_live[:NOT_LIVE_LOG_LIMIT]:
        log.warning("pjsip.not_live", server=link.name, endpoint=endpoint, problem=problem)
    if len(not_live) > NOT_LIVE_LOG_LIMIT:
        log.warning(
            "pjsip.not_live_more", server=link.name, more=len(not_live) - NOT_LIVE_LOG_LIMIT
        )
    now = utcnow()
    # In the flusher's turn: never beside a batch of the same server (on MariaDB two
    # writes at once can deadlock).  Not awaited: the next change's reload or expiry
    # must not wait behind a registration write (a refused one is logged by the flusher).
    write = partial(set_problems, server=link.name, problems=problems, now=now)
    link.in_flusher_turn(write)


def _held_again(link: Link, live: Iterable[str]) -> None:
    """Take each of ``live`` (endpoints Asterisk was just found to hold) for existing in
    ``link``'s book again, whatever an earlier ``INVALID`` said (deleted, then added
    again): a snapshot listing its phone's contact then counts it online.  Until such
    an answer, contacts a snapshot lists for an endpoint said ``INVALID`` are a deleted
    endpoint's, which Asterisk keeps until they expire."""
    for endpoint in live:
        reg = link.book.get(endpoint)
        if reg is not None and not reg.exists:
            link.book[endpoint] = reg._replace(exists=True)
            link.mark_dirty((endpoint,))


_NOT_HELD = "Asterisk does not hold this endpoint (rejected? see Asterisk's log)"
_INCOMPLETE = "Asterisk holds the endpoint without its AOR or auth (rejected object?)"


async def _verify_each(link: Link, endpoints: list[str], problems: dict[str, str]) -> None:
    """Put each endpoint's problem (``""``: live) in ``problems``, one
    ``PJSIPShowEndpoint`` each; an AMI failure raises, the answers so far kept."""
    for endpoint in endpoints:
        detail = await link.ops.show_endpoint(endpoint)
        problems[endpoint] = _problem(None if detail is None else (detail.aors, detail.auths))


async def _verify_listed(link: Link, endpoints: list[str], problems: dict[str, str]) -> None:
    """Put each endpoint's problem (``""``: live) in ``problems``, from one
    ``PJSIPShowEndpoints`` listing; an AMI failure raises."""
    listed = await link.ops.show_endpoints()
    for endpoint in endpoints:
        problems[endpoint] = _problem(listed.get(endpoint))


def _problem(held: tuple[tuple[str, ...], tuple[str, ...]] | None) -> str:
    """Why an endpoint Asterisk holds with these AORs and auths (None: not at all) is not
    live as rendered; ``""`` when it is."""
    if held is None:
        return _NOT_HELD
    aors, auths = held
    return "" if aors and auths else _INCOMPLETE


def verify_backoff(failures: int) -> float:
    """Seconds before verifying again after ``failures`` failed rounds in a row."""
    return doubling(OWED_RETRY, VERIFY_BACKOFF_MAX, failures)


@contextmanager
def _refusal_logged(link: Link, what: str, item: str) -> Iterator[None]:
    """Within the block, an action Asterisk refused (:class:`AmiActionFailed`), or one
    the action validator refused to build (:class:`InvalidInput`: a value that cannot go
    on the wire), is logged (``ami.owed_refused``) and swallowed: the owed item it was for
    is done with (sent again, it would be refused again, and hold back all else owed)."""
    try:
        yield
    except AmiActionFailed as exc:
        log.warning(
            "ami.owed_refused", server=link.name, what=what, item=item, error=exc.asterisk_message
        )
    except InvalidInput as exc:
        log.warning("ami.owed_refused", server=link.name, what=what, item=item, error=str(exc))
