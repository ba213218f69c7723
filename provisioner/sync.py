"""One reconcile, as ``provisioner sync --once`` and ``provisioner render`` run it.

A thin shell over :class:`provisioner.applier.Applier` (the daemon's full apply):
a user that cannot be rendered is reported and keeps its last good objects; a sync
that would remove more than the configured fraction of what the target holds is
refused unless explicitly allowed, so a store that suddenly reads as empty (a wrong
URL, a truncated table) never empties the PBX.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from .applier import Applier
from .pjsip import RenderSettings, Skipped
from .targets import Change, Target

__all__ = ["SyncReport", "reconcile"]


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
) -> SyncReport:
    """Render every live user and make ``target`` hold exactly that, changing only what differs
    (with ``dry_run``, only compute the change and its diff); ``verify`` (the default)
    also undoes hand edits of the target."""
    applier = Applier(engine, target, settings, max_removal_fraction=max_removal_fraction)
    if dry_run:
        applied = applier.plan(allow_mass_removal=allow_mass_removal, verify=verify)
    else:
        # Users edited while this waited for the writers' lock are read again, not
        # written back as they were: no change feed follows them here.
        applied = applier.full(allow_mass_removal=allow_mass_removal, verify=verify, fresh=True)
    return SyncReport(
        applied.change, applied.skipped, applied.provisioned, applied.took_ms, dry_run
    )
