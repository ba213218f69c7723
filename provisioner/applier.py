"""Keeps the target equal to the store: full reconciles and single-user increments.

Synchronous (database and file I/O); the daemon runs it in a worker thread so
the event loop keeps reading AMI promptly.  It remembers the rendered objects
of every user, so an edit of one user re-renders one user: the realtime target
then writes only that user's rows, and the config-file target re-renders only that
user's text and writes the file only if its bytes change (``Target.apply_partial``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import Engine

from .errors import InvalidInput, MassRemovalRefused, StaleRead
from .logs import get_logger
from .model import User
from .pjsip import (
    RenderSettings,
    Skipped,
    UserObjects,
    endpoint_order,
    is_provisioned,
    render_user,
    renderable_username,
)
from .store import queries as q
from .store.changefeed import newest_change_id
from .store.engine import reading
from .targets import Change, Target

__all__ = ["USER_DETAIL", "Applied", "Applier", "Troubles", "check_removals"]

log = get_logger(__name__)

T = TypeVar("T")

#: Reads of the users a ``fresh`` full apply makes at most (see :meth:`Applier.full`): a
#: store edited without pause never keeps ``sync --once`` from writing.
FRESH_READS = 3

#: New troubled users (a conflict, a row that cannot be rendered) an apply logs one by
#: one (``sync.conflict``, ``sync.skipped``); past that many, one summary
#: (``sync.conflicts``, ``sync.skipped_users``) counts them all (``sync --once`` still
#: prints every one).
USER_DETAIL = 10
#: What the ``sync.conflicts`` summary tells the operator to do.
CONFLICT_HINT = (
    "these users' endpoint, auth or AOR ids are rows provisioner has no ownership record "
    "of; if they are provisioner's own (its provisioner_objects table lost or emptied), "
    "`provisioner adopt --dry-run` lists the rows it can take back and `provisioner adopt` "
    "records them; otherwise give these users free extensions"
)
#: What the ``sync.skipped_users`` summary tells the operator to do.
SKIPPED_HINT = (
    "these users' rows break a rule (another writer put a value provisioner refuses); "
    "each keeps its last good endpoint, auth and AOR; `provisioner sync --once --dry-run` "
    "names every user, field and rule, and `provisioner user edit` mends a row"
)


@dataclass(frozen=True)
class TroubleEvents:
    """The log events of one kind of troubled user: one line per new user (``each``), a
    summary past :data:`USER_DETAIL` new ones, users no longer troubled (``cleared``)."""

    each: str
    summary: str
    cleared: str
    hint: str
    #: Whether the per-user lines and the summary name each user's endpoint id.
    endpoints: bool


CONFLICTS = TroubleEvents(
    "sync.conflict", "sync.conflicts", "sync.conflicts_cleared", CONFLICT_HINT, True
)
SKIPS = TroubleEvents(
    "sync.skipped", "sync.skipped_users", "sync.skipped_cleared", SKIPPED_HINT, False
)

K = TypeVar("K")


@dataclass
class Troubles(Generic[K]):
    """The users of one kind of trouble as the applies so far found them, keyed by ``K``
    (a username, a user id), and what is logged when that changes: a trouble already
    logged is not logged again at each reconcile (every 5 minutes it would repeat every
    line), and many new ones are one summary (a lost ownership table makes every user a
    conflict, a bulk tool's bad value every user skipped)."""

    events: TroubleEvents
    #: key -> (username, its problems as text), as the last apply that looked at it found.
    found: dict[K, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.found)

    def note(
        self,
        now: Mapping[K, Skipped],
        scope: Collection[K] | None,
        endpoint_of: Mapping[str, str] | None = None,
    ) -> None:
        """Remember ``now`` (found by an apply that looked at every user, or at the keys
        ``scope``) and log what changed: a user troubled anew, or otherwise than the last
        apply that looked at it found (``each`` for the first :data:`USER_DETAIL`, then
        one ``summary``), and users troubled no more (``cleared``, info).  ``endpoint_of``
        (username -> endpoint id) names their endpoints when the events do."""
        fresh = {k: (s.username, tuple(map(str, s.problems))) for k, s in now.items()}
        before = self.found
        gone = (before.keys() if scope is None else before.keys() & set(scope)) - fresh.keys()
        new = [k for k in fresh if before.get(k) != fresh[k]]
        cleared = sorted(before[k][0] for k in gone)
        # An apply that looked at everyone found the whole set.
        kept = {} if scope is None else {k: v for k, v in before.items() if k not in gone}
        self.found = kept | fresh
        self._log([fresh[k] for k in new], endpoint_of if self.events.endpoints else None)
        if cleared:
            log.info(self.events.cleared, count=len(cleared), usernames=cleared[:5])

    def _log(
        self, new: Sequence[tuple[str, tuple[str, ...]]], endpoint_of: Mapping[str, str] | None
    ) -> None:
        """Warn of the users ``new`` (username, problems): each of the first few, then one
        summary."""
        ev = self.events
        for username, problems in new[:USER_DETAIL]:
            where = {} if endpoint_of is None else {"endpoint": endpoint_of.get(username)}
            log.warning(ev.each, username=username, **where, problems=list(problems))
        if len(new) <= USER_DETAIL:
            return
        first = [username for username, _ in new[:5]]
        named = (
            {"usernames": first}
            if endpoint_of is None
            else {"endpoints": [endpoint_of.get(u, u) for u in first]}
        )
        log.warning(
            ev.summary,
            count=len(self.found),
            new=len(new),
            **named,
            not_detailed=len(new) - USER_DETAIL,
            hint=ev.hint,
        )


def check_removals(change: Change, existing: int, max_fraction: float) -> None:
    """Refuse a change that removes more than ``max_fraction`` of ``existing`` users."""
    if existing and len(change.removed) > max_fraction * existing:
        raise MassRemovalRefused(len(change.removed), existing, max_fraction)


@dataclass(frozen=True)
class Applied:
    """One apply: what changed, who was skipped, how long it took."""

    change: Change
    skipped: tuple[Skipped, ...] = ()
    took_ms: float = 0.0
    full: bool = False
    #: Users rendered into the target (skipped ones not counted).
    provisioned: int = 0


#: Who an endpoint was applied for: the user's id, when it was created, its username.
Owner = tuple[int, datetime | None, str]


@dataclass
class Applier:
    """Renders users and applies them to ``target``; holds the last rendered set in memory."""

    engine: Engine
    target: Target
    settings: RenderSettings
    max_removal_fraction: float = 0.5
    #: user id -> the objects last applied for that user.
    objects: dict[int, UserObjects] = field(default_factory=dict)
    #: user id -> endpoint id kept as it was because the user could not be rendered.
    kept: dict[int, str] = field(default_factory=dict)
    #: True once a full apply succeeded: only then does memory mirror the target.
    synced: bool = False
    #: Called with the endpoint ids an apply is about to remove (not added back), before
    #: the target is written and after its guard passed, and whether it is called from
    #: within the target's write (a full apply's guard: a realtime target holds its
    #: database's writer lock then): the daemon notes their contact removals owed there,
    #: so a kill between the write and the AMI side's own note cannot leave a disabled or
    #: deleted user's phones registered.  Blocking; an error aborts the apply before
    #: anything is written.
    before_removing: Callable[[Sequence[str], bool], None] | None = None
    #: endpoint id -> how many users' entries in ``objects`` or ``kept`` hold it (more
    #: than one only briefly, while an extension moved in the store is not yet re-rendered).
    holders: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    #: endpoint id -> the owner its objects were last applied for (:data:`Owner`: user
    #: id, when the user was created, username), kept after the endpoint is removed: an
    #: extension given to another user (or a renamed user, or a user purged and added
    #: again under its username) is then told apart from its owner coming back (see
    #: :meth:`_owned`).
    owners: dict[str, Owner] = field(default_factory=dict, init=False, repr=False)
    #: user id -> when the user was created, for each user last read: with the id, who
    #: the user is (SQLite gives a purged newest user's id to the next user added).
    _born: dict[int, datetime | None] = field(default_factory=dict, init=False, repr=False)
    #: The users whose objects a foreign row blocks, by username, as the last apply that
    #: looked at each found them.
    _conflicts: Troubles[str] = field(
        default_factory=lambda: Troubles(CONFLICTS), init=False, repr=False
    )
    #: The users that cannot be rendered (skipped), by user id, likewise.
    _skips: Troubles[int] = field(default_factory=lambda: Troubles(SKIPS), init=False, repr=False)

    def __post_init__(self) -> None:
        self._reindex()

    def desired(self) -> tuple[dict[int, UserObjects], dict[int, str], dict[int, Skipped]]:
        """Render every live user: the objects by user id, the endpoint ids kept as they
        are (users that could not be rendered keep their last good endpoint: one bad edit
        never takes a phone away, see :meth:`_last_good`), and the skipped users by id."""
        with reading(self.engine) as conn:
            users = q.load_users(conn, deleted=False)
        born = {user.id: user.created_at for user in users}
        others = self._others(born)
        self._born = born
        objects: dict[int, UserObjects] = {}
        broken: list[User] = []
        skipped: dict[int, Skipped] = {}
        for user in users:
            if not is_provisioned(user):
                continue
            try:
                objects[user.id] = render_user(user, self.settings)
            except InvalidInput as exc:
                skipped[user.id] = Skipped(user.username, exc.problems)
                broken.append(user)
        return objects, self._last_good(broken, objects.values(), others), skipped

    def _others(self, born: Mapping[int, datetime | None]) -> set[int]:
        """The ids of ``born`` (user id -> creation time, as read now) that memory knew as
        another user's: created at another time (SQLite gives a purged newest user's id
        to the next user added, and both can happen between two applies)."""
        return {uid for uid, at in born.items() if uid in self._born and self._born[uid] != at}

    def _last_good(
        self, broken: list[User], rendered: Iterable[UserObjects], others: Collection[int] = ()
    ) -> dict[int, str]:
        """The endpoint id each user of ``broken`` (live, not renderable) keeps: the one
        last applied for it, unless a ``rendered`` user holds that id now (the extension
        was validly given to another user, who wins).  A user whose id memory knew as
        another user's (``others``) keeps nothing memory holds: that was the other's.

        Memory knows it by user id once a full apply succeeded.  Before that (a fresh
        process: ``sync --once``, the daemon's start, or a new target after a SIGHUP, which
        memory does not mirror) the target tells it: each auth holds its user's username,
        so the endpoint whose auth names the broken user is its (a user renamed by another
        writer and broken at once is then not found)."""
        last: dict[int, str] = {}
        if self.synced:
            for user in broken:
                if user.id in others:
                    continue
                if (endpoint_id := self._remembered(user.id)) is not None:
                    last[user.id] = endpoint_id
        elif names := [u.username for u in broken if renderable_username(u.username)]:
            found = self.target.endpoints_of(names)
            for user in broken:
                if held := found.get(user.username):
                    last[user.id] = user.extension if user.extension in held else held[0]
        taken = {o.endpoint_id for o in rendered}
        kept: dict[int, str] = {}
        for uid, endpoint_id in last.items():
            if endpoint_id not in taken:
                kept[uid] = endpoint_id
                taken.add(endpoint_id)
        return kept

    @property
    def conflicted(self) -> int:
        """How many users a foreign row blocks now, as the applies so far found them."""
        return len(self._conflicts)

    @property
    def skipped_now(self) -> int:
        """How many users cannot be rendered now, as the applies so far found them."""
        return len(self._skips)

    def _remembered(self, uid: int) -> str | None:
        """The endpoint id memory holds for ``uid``: last rendered, or kept."""
        if (o := self.objects.get(uid)) is not None:
            return o.endpoint_id
        return self.kept.get(uid)

    def full(
        self, *, allow_mass_removal: bool = False, verify: bool = True, fresh: bool = False
    ) -> Applied:
        """Render every live user and make the target hold exactly that; ``verify`` (the
        default: startup, periodic and template reconciles) also undoes hand edits of the
        target, see :meth:`provisioner.targets.Target.apply`.

        With ``fresh`` (``sync --once``, which follows no change feed) users edited
        between the read and the writers' lock (the daemon may have applied the edit
        meanwhile) are not written back as they were read: the change feed's newest id,
        noted before the read, is looked at again once the lock is held, and a moved one
        means reading again (``sync.reread``; :data:`FRESH_READS` reads at most, the last
        one written as read)."""
        started = time.perf_counter()
        for read in range(1, FRESH_READS + 1):
            mark = self._feed_mark() if fresh and read < FRESH_READS else None
            objects, kept, skipped = self.desired()
            try:
                change = self.target.apply(
                    _ordered(objects.values()),
                    keep=kept.values(),
                    guard=self._guard(allow_mass_removal, mark, removing=True),
                    verify=verify,
                )
            except StaleRead as stale:
                log.info("sync.reread", read=read, read_at=stale.read_at, now=stale.now)
                continue
            break
        change = self._owned(change, objects.items())
        kept.update(_kept_for(change, objects))
        self.objects, self.kept, self.synced = objects, kept, True
        self._reindex()
        self._note_troubles(change.clashes, objects.values(), skipped, None)
        return self._done(change, skipped, started, full=True, provisioned=len(objects))

    def _feed_mark(self) -> int:
        """The change feed's newest id now (blocking: one query)."""
        with reading(self.engine) as conn:
            return newest_change_id(conn)

    def plan(self, *, allow_mass_removal: bool = False, verify: bool = True) -> Applied:
        """What :meth:`full` would change, with its diff; writes nothing (the same guard)."""
        started = time.perf_counter()
        objects, kept, skipped = self.desired()
        change = self.target.plan(_ordered(objects.values()), keep=kept.values(), verify=verify)
        self._guard(allow_mass_removal)(change)
        self._note_troubles(change.clashes, objects.values(), skipped, None)
        return self._done(
            change, skipped, started, full=True, provisioned=len(objects), event="sync.planned"
        )

    def users_changed(self, user_ids: Iterable[int]) -> Applied:
        """Re-render the given users (live, disabled, deleted or purged); apply the difference.

        Before a first successful full apply memory does not mirror the target, and a burst
        removing more than ``max_removal_fraction`` of what memory holds may be a lost store:
        both are handled by :meth:`full` instead, whose guard compares with the target itself
        (an increment alone would write a file holding only the users just edited).
        """
        if not self.synced:
            return self.full()
        started = time.perf_counter()
        ids = sorted(set(user_ids))
        with reading(self.engine) as conn:
            found = {u.id: u for u in q.load_users(conn, ids=ids, deleted=None)}
        others = self._others({uid: user.created_at for uid, user in found.items()})
        for uid in ids:
            _put(self._born, uid, found[uid].created_at if uid in found else None)
        # Only these users' entries are computed (None: nothing for that user); memory is
        # updated in place once the target took them, so one edit costs O(1), not O(users).
        objects: dict[int, UserObjects | None] = {}
        kept: dict[int, str | None] = {}
        skipped: dict[int, Skipped] = {}
        broken: list[int] = []
        for uid in ids:
            user = found.get(uid)
            objects[uid] = kept[uid] = None
            if user is None or not is_provisioned(user):
                continue  # purged, deleted or disabled: its objects go
            try:
                objects[uid] = render_user(user, self.settings)
            except InvalidInput as exc:
                skipped[uid] = Skipped(user.username, exc.problems)
                broken.append(uid)
        upserted = {o.endpoint_id for o in objects.values() if o is not None}
        by_these = Counter(e for i in ids for e in self._held(i))
        taken = set(upserted)
        for uid in broken:
            # full()'s rule: the last good endpoint stays unless another user holds it
            # now, rendered here or held in memory (given that extension validly: it wins).
            last = None if uid in others else self._remembered(uid)
            if last is not None and last not in taken and self.holders[last] <= by_these[last]:
                kept[uid] = last
                taken.add(last)
        held = len(self.objects) + len(self.kept)
        removing = sum(
            1
            for i in ids
            if (i in self.objects or i in self.kept) and objects[i] is None and kept[i] is None
        )
        if held and removing > self.max_removal_fraction * held:
            return self.full()
        # The users this apply looks at: those rendered now and those held before.
        looked_at = {o.username for o in objects.values() if o is not None}
        looked_at.update(o.username for i in ids if (o := self.objects.get(i)) is not None)
        change = self._apply_some(ids, objects, kept, by_these)
        change = self._owned(change, ((i, o) for i in ids if (o := objects[i]) is not None))
        kept.update(_kept_for(change, objects))
        for uid in ids:
            self._index(uid, add=False)
            _put(self.objects, uid, objects[uid])
            _put(self.kept, uid, kept[uid])
            self._index(uid, add=True)
        self._yield_kept(upserted, set(ids))
        rendered = (o for o in objects.values() if o is not None)
        self._note_troubles(change.clashes, rendered, skipped, (looked_at, ids))
        return self._done(change, skipped, started, full=False, provisioned=len(self.objects))

    def _yield_kept(self, endpoint_ids: Collection[str], besides: Collection[int]) -> None:
        """Forget the endpoint ids kept for users not in ``besides`` that are among
        ``endpoint_ids``, just applied for other users: the extension went validly to
        them, and the broken user that kept it holds it no more (so it goes when its new
        holder leaves it)."""
        if not any(self.holders[e] > 1 for e in endpoint_ids):
            return
        for uid in [u for u, e in self.kept.items() if e in endpoint_ids and u not in besides]:
            self._index(uid, add=False)
            del self.kept[uid]
            self._index(uid, add=True)

    def _guard(
        self, allow_mass_removal: bool, mark: int | None = None, *, removing: bool = False
    ) -> Callable[[Change], None]:
        """Refuses a change removing more than ``max_removal_fraction`` of the users;
        with ``mark`` (the feed's newest id before the users were read), raises
        :class:`StaleRead` when the feed has moved on since (the guard runs once the
        target holds the writers' lock, before it writes).  With ``removing`` (a change
        about to be written), then hands the endpoints it removes to
        :attr:`before_removing`."""

        def guard(change: Change) -> None:
            if mark is not None and (now := self._feed_mark()) != mark:
                raise StaleRead(mark, now)
            if not allow_mass_removal:
                existing = change.unchanged + len(change.updated) + len(change.removed)
                check_removals(change, existing, self.max_removal_fraction)
            if removing:
                back = {*change.added, *change.updated}
                self._removing([e for e in change.removed if e not in back], in_write=True)

        return guard

    def _removing(self, endpoints: Sequence[str], *, in_write: bool) -> None:
        """Tell :attr:`before_removing`, if any, of ``endpoints`` (when there are some)."""
        if endpoints and self.before_removing is not None:
            self.before_removing(endpoints, in_write)

    def _apply_some(
        self,
        ids: Collection[int],
        objects: Mapping[int, UserObjects | None],
        kept: Mapping[int, str | None],
        by_these: Counter[str],
    ) -> Change:
        """Apply the new entries of ``ids`` (memory not yet updated) to the target.

        An endpoint these users held (rendered or kept; ``by_these`` counts them) goes
        unless it is still wanted or another user in memory holds it (an extension moved to
        a user not yet re-rendered here: its endpoint id is that user's now).
        """
        upserts = [o for i in ids if (o := objects[i]) is not None]
        wanted = {o.endpoint_id for o in upserts}
        wanted |= {k for i in ids if (k := kept[i]) is not None}
        gone = [e for e in sorted(by_these.keys() - wanted) if self.holders[e] <= by_these[e]]
        self._removing(gone, in_write=False)
        return self.target.apply_partial(upserts, gone)

    def _owned(self, change: Change, applied: Iterable[tuple[int, UserObjects]]) -> Change:
        """``change`` (which applied the objects ``applied``, by user id) naming in
        ``reowned``, besides those the target found renamed in what it held, each endpoint
        it added or updated for another owner than the one last applied to it: another
        user (by id and creation time: one purged and added again under the same username
        is another user), or a new username (removed in between, so the target held
        nothing to compare): the phone registered under the previous owner's credentials
        must not keep taking its calls.  Each applied endpoint's owner is remembered from
        now on (one a foreign row blocked is not: provisioner did not write it)."""
        written = {*change.added, *change.updated}
        blocked = set(change.conflicts)
        reowned = list(change.reowned)  # the target's: renamed in what it held
        for uid, obj in applied:
            endpoint_id = obj.endpoint_id
            if endpoint_id in blocked:
                continue
            owner = (uid, self._born.get(uid), obj.username)
            last = self.owners.get(endpoint_id)
            if last is not None and last != owner and endpoint_id in written:
                reowned.append(endpoint_id)  # given to another user since it was removed
            self.owners[endpoint_id] = owner
        if not reowned:
            return change
        log.info("sync.reowned", endpoints=len(set(reowned)))
        return replace(change, reowned=tuple(sorted(set(reowned), key=endpoint_order)))

    def _held(self, uid: int) -> set[str]:
        """The endpoint ids memory holds for ``uid`` (rendered or kept)."""
        held = set()
        if (o := self.objects.get(uid)) is not None:
            held.add(o.endpoint_id)
        if (k := self.kept.get(uid)) is not None:
            held.add(k)
        return held

    def _index(self, uid: int, *, add: bool) -> None:
        """Count ``uid``'s held endpoint ids in :attr:`holders`, or take them out."""
        for endpoint_id in self._held(uid):
            if add:
                self.holders[endpoint_id] += 1
            elif self.holders[endpoint_id] > 1:
                self.holders[endpoint_id] -= 1
            else:
                self.holders.pop(endpoint_id, None)

    def _reindex(self) -> None:
        self.holders = Counter()
        for uid in self.objects.keys() | self.kept.keys():
            self._index(uid, add=True)

    def _note_troubles(
        self,
        clashes: Sequence[Skipped],
        applied: Iterable[UserObjects],
        skipped: Mapping[int, Skipped],
        scope: tuple[Collection[str], Collection[int]] | None,
    ) -> None:
        """Remember the users ``clashes`` names (blocked by a foreign row when the objects
        ``applied`` were applied) and the users ``skipped`` (not renderable), found by an
        apply that looked at every user (``scope`` None), or at these usernames and user
        ids, and log what changed (:meth:`Troubles.note`)."""
        names, ids = (None, None) if scope is None else scope
        endpoint_of = {o.username: o.endpoint_id for o in applied}
        self._conflicts.note({s.username: s for s in clashes}, names, endpoint_of)
        self._skips.note(skipped, ids)

    def _done(
        self,
        change: Change,
        skipped: Mapping[int, Skipped],
        started: float,
        *,
        full: bool,
        provisioned: int = 0,
        event: str = "sync.applied",
    ) -> Applied:
        took = (time.perf_counter() - started) * 1000
        log.info(
            event,
            full=full,
            added=len(change.added),
            updated=len(change.updated),
            removed=len(change.removed),
            unchanged=change.unchanged,
            skipped=self.skipped_now,
            conflicts=self.conflicted,
            wrote=change.wrote,
            took_ms=round(took, 1),
        )
        return Applied(change, tuple(skipped.values()), took, full, provisioned)


def _kept_for(change: Change, objects: Mapping[int, UserObjects | None]) -> dict[int, str]:
    """User id -> the endpoint the target kept for it as it was (``change.kept_for``: its
    new extension is a foreign row's), held for that user like a skipped user's last
    good one: the one-edit path then removes it with the user, at once."""
    if not change.kept_for:
        return {}
    kept_for = dict(change.kept_for)
    return {
        uid: kept_for[o.endpoint_id]
        for uid, o in objects.items()
        if o is not None and o.endpoint_id in kept_for
    }


def _put(into: dict[int, T], key: int, value: T | None) -> None:
    if value is None:
        into.pop(key, None)
    else:
        into[key] = value


def _ordered(objects: Iterable[UserObjects]) -> list[UserObjects]:
    """render_all's order (:func:`~provisioner.pjsip.endpoint_order`)."""
    return sorted(objects, key=lambda o: endpoint_order(o.endpoint_id))
