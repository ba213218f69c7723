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
More than ``EXPIRE_ALL_OVER`` objects owed at once (a profile edit, a bulk edit, a long
outage) empty each distinct cache whole instead, one action per cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING

from ..accounts import utcnow
from ..config import cache_names
from ..logs import get_logger
from ..store.registrations import set_problems
from ..store.state import drop_state, put_state
from ..targets import Change
from .errors import AmiActionFailed, AmiError
from .registration import contact_object_name
from .reload import ReloadOutcome

if TYPE_CHECKING:
    from .pbx import Link

__all__ = [
    "EXPIRE_ALL_OVER",
    "LISTING_OVER",
    "NOT_LIVE_LOG_LIMIT",
    "OWED_RETRY",
    "VERIFY_LIMIT",
    "VERIFY_PAUSE",
    "Owed",
    "apply_changes",
    "pay",
    "reload_owed_key",
    "remove_contacts",
    "request_reload",
    "verify",
    "verify_backoff",
    "verify_some",
]

log = get_logger(__name__)

#: Seconds between tries to send what is owed to a connected server (:class:`Owed`).
OWED_RETRY = 5.0
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
#: ``pjsip.not_live`` lines per apply, at most (the rest are counted in one line).
NOT_LIVE_LOG_LIMIT = 50
#: More objects than this owed to one server: each of its caches is emptied whole
#: (``SorceryMemoryCacheExpire``, one action per cache) instead of one action per object
#: and cache.  A profile edit at 100k users changes 100k endpoints: sent one by one, that
#: many round trips would hold every later edit back for minutes, where an emptied
#: cache costs Asterisk one database read per object as it next needs it.
EXPIRE_ALL_OVER = 1000


@dataclass
class Owed:
    """What an applied change still needs sent to one server: the objects (``(kind, id)``)
    to expire from its sorcery memory caches and the endpoints whose contacts to delete
    from its astdb, each in the order owed.  An action that failed for the connection's
    sake (not connected, timed out, lost) leaves its item owed, sent again at the next
    connect or apply, or after ``OWED_RETRY`` seconds: each is idempotent (an object
    expired twice, a contact already gone), so a failure never loses one."""

    expiries: dict[tuple[str, str], None] = field(default_factory=dict)
    removals: dict[str, None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.expiries or self.removals)

    def add(self, change: Change, *, expire: bool, remove: bool = True) -> None:
        """Owe what ``change`` needs (``expire``: its changed objects' expiries;
        ``remove``: its removed endpoints' contacts, else owed later by the caller).  An
        endpoint added or updated after its removal was owed keeps its contacts: they
        are its phone's again."""
        if expire:
            self.expiries.update(dict.fromkeys(change.changed_objects))
        if remove:
            self.removals.update(dict.fromkeys(change.removed))
        self.keep((*change.added, *change.updated))

    def keep(self, endpoints: Iterable[str]) -> None:
        """Owe no contact removal for ``endpoints`` (added or updated again)."""
        for endpoint in endpoints:
            self.removals.pop(endpoint, None)


async def apply_changes(link: Link, batch: Sequence[Change], *, realtime: bool) -> None:
    """What the changes of ``batch`` (applied in this order) need from ``link``'s
    server (``realtime``: the target is the realtime one, else a config file).

    Cache expiries (realtime) and contact removals are owed, then sent; whatever an
    AMI failure left unsent stays owed (:class:`Owed`) and never holds back the
    reload, which is asked for either way: the coordinator keeps it for a server
    that is down.  Then the added and updated endpoints are verified: a config
    file's after its reload (its objects change only with it), realtime rows at once
    (nothing waits for their reload)."""
    added = set[str]().union(*(c.added for c in batch))
    updated = set[str]().union(*(c.updated for c in batch))
    removed = set[str]().union(*(c.removed for c in batch))
    reloads_file = not realtime and any(c.wrote for c in batch)
    for change in batch:
        # A config file's removed endpoint lives in Asterisk until the reload: a contact
        # deleted before it could be registered again meanwhile, and would then outlive
        # the endpoint (README of ../shared/asterisk).  Its contacts go after the reload.
        link.owed.add(change, expire=realtime and bool(link.caches), remove=not reloads_file)
    await pay(link)
    if reloads_file:
        # A config file's objects change only with the reload: they are verified after
        # it.  Not awaited: edits applied while this reload waits (for its gap, for a
        # server that is down) merge into it, as their bytes are on disk before it is
        # sent, instead of each costing one more reload afterwards.
        reloaded = partial(_file_reloaded, link, added | updated, removed - added - updated)
        request_reload(link).add_done_callback(reloaded)
    else:
        if realtime and (added or removed):
            # The rows are live already (expired above); the reload only has Asterisk
            # report the status of added endpoints, and the next edit must not wait for
            # it (95 s at 50k endpoints, realtime slower still).
            request_reload(link).add_done_callback(partial(_reload_done, link))
        _owe_verification(link, added | updated, removed - added - updated)
    await verify_some(link)


def reload_owed_key(server: str) -> str:
    """The ``daemon_state`` key noting that ``server`` is owed a reload."""
    return "reload_owed:" + server


def request_reload(link: Link) -> asyncio.Future[ReloadOutcome]:
    """Ask for a reload of ``link``'s server, noted in the store until one has ended
    well: a reload a SIGTERM or a crash cut off (one waiting for its gap, or for a server
    that is down) is asked for again at the next start, whose full reconcile finds the
    file or rows already written and so would owe Asterisk nothing."""
    future = link.reloads.request()
    if not link.reload_noted:
        link.reload_noted = True
        link.in_flusher_turn(partial(put_state, key=reload_owed_key(link.name), value="1"))
    future.add_done_callback(partial(_reload_settled, link))
    return future


def _reload_settled(link: Link, future: asyncio.Future[ReloadOutcome]) -> None:
    """Forget the noted reload once one ended well and no other waits."""
    if future.cancelled() or not future.result().ok:
        return
    if link.reload_noted and not link.reloads.pending:
        link.reload_noted = False
        link.in_flusher_turn(partial(drop_state, key=reload_owed_key(link.name)))


def _owe_verification(link: Link, changed: set[str], gone: set[str]) -> None:
    """Have ``changed`` endpoints verified (in order); ``gone`` ones no longer."""
    unverified = link.unverified
    unverified.update(dict.fromkeys(sorted(changed)))
    for endpoint in gone:
        unverified.pop(endpoint, None)


def _file_reloaded(
    link: Link, changed: set[str], gone: set[str], future: asyncio.Future[ReloadOutcome]
) -> None:
    """A config file's reload ended: count it, owe the removed endpoints' contact
    removals, and have the changed endpoints verified, by the change loop (woken by an
    empty change), unless the daemon is stopping.  Reloads end in request order, so an
    endpoint removed then added again keeps its contacts."""
    if future.cancelled():
        return
    outcome = future.result()
    _count_reload(link, outcome)
    if outcome.result == "stopped":
        return
    link.owed.removals.update(dict.fromkeys(sorted(gone)))
    link.owed.keep(changed)
    _owe_verification(link, changed, gone)
    if changed or gone:
        link.changes.put_nowait(Change())


def _count_reload(link: Link, outcome: ReloadOutcome) -> None:
    link.reload_results[outcome.result] = link.reload_results.get(outcome.result, 0) + 1


def _reload_done(link: Link, future: asyncio.Future[ReloadOutcome]) -> None:
    if not future.cancelled():
        _count_reload(link, future.result())


async def pay(link: Link) -> None:
    """Send what is owed to this server, oldest first, until an action fails for the
    connection's sake (the rest would fail alike): that one and the rest stay owed.
    One Asterisk refuses (``Response: Error``) is logged and dropped: sent again, it
    would be refused again."""
    owed = link.owed
    try:
        if len(owed.expiries) > EXPIRE_ALL_OVER:
            await _expire_all(link)
        await _expire_owed(link)
        if owed.removals:
            with _refusal_logged(link, "remove_contacts", ",".join(owed.removals)):
                await remove_contacts(link, owed.removals.keys())
            owed.removals.clear()
    except AmiError as exc:
        log.warning(
            "ami.owed",
            server=link.name,
            expiries=len(owed.expiries),
            removals=len(owed.removals),
            error=str(exc),
        )


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


async def remove_contacts(link: Link, removed: Collection[str]) -> None:
    """Asterisk keeps a deleted endpoint's registrations: delete them from astdb, and
    from the book (the store then shows the phones offline).

    While the book holds every contact (:meth:`Link.book_complete`) the removed
    endpoints' contacts are deleted by name, without listing every contact of the
    server: at 100k registered phones ``PJSIPShowContacts`` is 100k events, seconds
    every later edit would wait behind.  Otherwise, or when a name derived from a status
    event's URI was not in astdb, every contact is listed and the removed AORs' deleted.
    """
    if link.book_complete() and await _remove_known(link, removed):
        return
    for c in await link.ops.show_contacts():
        if c.aor in removed and c.object_name:
            await _remove_one(link, c.aor, c.object_name)


async def _remove_known(link: Link, removed: Collection[str]) -> bool:
    """Delete the book's contacts of the ``removed`` endpoints (each its own AOR); False
    when a derived name was not found (then the caller lists them all)."""
    found = True
    for endpoint in removed:
        reg = link.book.get(endpoint)
        for contact in reg.contacts if reg is not None else ():
            name, derived = contact_object_name(contact)
            if not await _remove_one(link, contact.aor, name) and derived:
                found = False
    return found


async def _remove_one(link: Link, aor: str, object_name: str) -> bool:
    """DBDel one contact; whether astdb held it.  The book forgets it either way."""
    deleted = await link.ops.remove_contact_object(object_name)
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
        link.unverified.pop(endpoint, None)
    if not problems:
        return
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
    return float(min(VERIFY_BACKOFF_MAX, OWED_RETRY * 2 ** max(0, failures - 1)))


@contextmanager
def _refusal_logged(link: Link, what: str, item: str) -> Iterator[None]:
    """Within the block, an action Asterisk refused (:class:`AmiActionFailed`) is logged
    (``ami.owed_refused``) and swallowed: the owed item it was for is done with."""
    try:
        yield
    except AmiActionFailed as exc:
        log.warning(
            "ami.owed_refused", server=link.name, what=what, item=item, error=exc.asterisk_message
        )
