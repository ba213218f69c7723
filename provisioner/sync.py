"""One reconcile, as ``provisioner sync --once`` and ``provisioner render`` run it.

A thin shell over :class:`provisioner.applier.Applier` (the daemon's full apply):
a user that cannot be rendered is reported and keeps its last good objects; a sync
that would remove more than the configured fraction of what the target holds is
refused unless explicitly allowed, so a store that suddenly reads as empty (a wrong
URL, a truncated table) never empties the PBX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from .applier import Applier
from .pjsip import RenderSettings, Skipped, endpoint_order
from .targets import Change, Target
from .targets.realtime import Adoption, RealtimeTarget

__all__ = ["SyncReport", "adopt", "reconcile"]


@dataclass(frozen=True)
class SyncReport:
    """The outcome of one reconcile."""

    change: Change
    skipped: tuple[Skipped, ...]
    provisioned: int
    took_ms: float
    dry_run: bool = False


def reconcile(
    engine: Engine,
    target: Target,
    settings: RenderSettings,
    *,
    dry_run: bool = False,
    max_removal_fraction: float = 0.5,
    allow_mass_removal: bool = False,
    verify: bool = True,
    before_removing: Callable[[Sequence[str], bool], None] | None = None,
) -> SyncReport:
    """Render every live user and make ``target`` hold exactly that, changing only what differs
    (with ``dry_run``, only compute the change and its diff); ``verify`` (the default)
    also undoes hand edits of the target; ``before_removing`` is the applier's
    (:attr:`Applier.before_removing`)."""
    applier = Applier(
        engine,
        target,
        settings,
        max_removal_fraction=max_removal_fraction,
        before_removing=before_removing,
    )
    if dry_run:
        applied = applier.plan(allow_mass_removal=allow_mass_removal, verify=verify)
    else:
        # Users edited while this waited for the writers' lock are read again, not
        # written back as they were: no change feed follows them here.
        applied = applier.full(allow_mass_removal=allow_mass_removal, verify=verify, fresh=True)
    return SyncReport(
        applied.change, applied.skipped, applied.provisioned, applied.took_ms, dry_run
    )


def adopt(
    engine: Engine, target: RealtimeTarget, settings: RenderSettings, *, dry_run: bool = False
) -> Adoption:
    """Render every live user and record as provisioner's the realtime rows that hold
    exactly those users' objects (:meth:`RealtimeTarget.adopt`); users that cannot be
    rendered are not looked at (their rows stay as they are)."""
    objects, _kept, _skipped = Applier(engine, target, settings).desired()
    ordered = sorted(objects.values(), key=lambda o: endpoint_order(o.endpoint_id))
    return target.adopt(ordered, dry_run=dry_run)
