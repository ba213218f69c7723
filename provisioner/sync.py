"""One reconcile: the store's users, rendered, made the target's content.

A user whose objects cannot be rendered is reported and skipped; the others are
applied, and the skipped user's last good objects stay where they are (the
target is told to keep them).  A sync that would remove more than a configured
fraction of what the target holds is refused unless explicitly allowed: a store
that suddenly reads as empty (a wrong URL, a truncated table) must never empty
the PBX.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from .errors import MassRemovalRefused
from .logs import get_logger
from .model import User
from .pjsip import RenderSettings, Skipped, UserObjects, render_all
from .store import queries as q
from .targets import Change, Target

__all__ = ["SyncReport", "desired_objects", "reconcile"]

log = get_logger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """The outcome of one reconcile."""

    change: Change
    skipped: tuple[Skipped, ...]
    provisioned: int
    took_ms: float
    dry_run: bool = False


def desired_objects(
    users: Sequence[User], settings: RenderSettings
) -> tuple[list[UserObjects], list[Skipped], list[str]]:
    """Render ``users``; return the objects, the skipped users and the endpoint ids to keep.

    A skipped user keeps its previous objects when its extension is still a
    plausible endpoint id, so one bad edit never takes a working phone away.
    """
    objects, skipped = render_all(users, settings)
    by_name = {u.username: u for u in users}
    keep = [
        by_name[s.username].extension
        for s in skipped
        if s.username in by_name and by_name[s.username].extension.isdigit()
    ]
    return objects, skipped, keep


def check_removals(change: Change, existing: int, max_fraction: float) -> None:
    """Refuse a change that removes more than ``max_fraction`` of ``existing`` users."""
    if existing and len(change.removed) > max_fraction * existing:
        raise MassRemovalRefused(len(change.removed), existing, max_fraction)


def reconcile(
    engine: Engine,
    target: Target,
    settings: RenderSettings,
    *,
    dry_run: bool = False,
    max_removal_fraction: float = 0.5,
    allow_mass_removal: bool = False,
    verify: bool = True,
) -> SyncReport:
    """Render every live user and make ``target`` hold exactly that, changing only what differs;
    ``verify`` (the default, as ``provisioner sync --once``) also undoes hand edits."""
    started = time.perf_counter()
    with engine.connect() as conn:
        users = q.load_users(conn, deleted=False)
    objects, skipped, keep = desired_objects(users, settings)
    for s in skipped:
        log.warning("sync.skipped", username=s.username, problems=[str(p) for p in s.problems])

    def guard(change: Change) -> None:
        if not allow_mass_removal:
            existing = change.unchanged + len(change.updated) + len(change.removed)
            check_removals(change, existing, max_removal_fraction)

    if dry_run:
        change = target.plan(objects, keep=keep, verify=verify)
        guard(change)
    else:
        change = target.apply(objects, keep=keep, guard=guard, verify=verify)
    took = (time.perf_counter() - started) * 1000
    log.info(
        "sync.applied" if not dry_run else "sync.planned",
        added=len(change.added),
        updated=len(change.updated),
        removed=len(change.removed),
        unchanged=change.unchanged,
        skipped=len(skipped),
        took_ms=round(took, 1),
    )
    return SyncReport(change, tuple(skipped), len(objects), took, dry_run)
