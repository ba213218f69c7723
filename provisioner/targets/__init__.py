"""Writers that put rendered PJSIP objects where Asterisk reads them.

Both targets take the full desired set (``Sequence[UserObjects]`` from
:func:`provisioner.pjsip.render_all`) and change only what differs, atomically.
``plan`` computes the change and a human-readable diff without writing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..pjsip import Skipped, UserObjects

__all__ = ["Change", "Target"]


@dataclass(frozen=True)
class Change:
    """What an apply did (or a plan would do), counted per user (endpoint id).

    ``updated`` holds endpoint ids any of whose three objects changed;
    ``changed_objects`` names each changed object as ``(kind, id)`` with kind
    ``endpoint``, ``auth`` or ``aor`` (what a cache expiry needs).
    """

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: int = 0
    changed_objects: tuple[tuple[str, str], ...] = ()
    #: A unified diff (config file) or a per-row diff (realtime); filled by ``plan``.
    diff: str = field(default="", repr=False)
    #: True when bytes or rows were actually written.
    wrote: bool = False
    #: Endpoint ids left alone because an object of theirs belongs to someone else
    #: (a realtime row provisioner did not create); reported, never overwritten.
    conflicts: tuple[str, ...] = ()
    #: The same users by username, each with the foreign rows that block it (field
    #: ``extension``, the rule naming the table and the row's id).
    clashes: tuple[Skipped, ...] = ()
    #: Endpoint ids added or updated for another auth username than the one last applied
    #: to them (the extension passed to another user, or its user renamed): the contacts
    #: registered under the previous credentials are owed removal, as a removed
    #: endpoint's are.  Filled by the applier, which remembers each endpoint's owner.
    reowned: tuple[str, ...] = ()
    #: ``(blocked endpoint id, kept endpoint id)`` per user of ``conflicts`` that keeps
    #: the endpoint last written for it under its previous extension (moved onto a
    #: foreign row): the applier holds it for that user, so it goes when the user does.
    kept_for: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.removed)


class Target(Protocol):
    """A place PJSIP objects are written to."""

    def plan(
        self, objects: Sequence[UserObjects], *, keep: Collection[str] = (), verify: bool = False
    ) -> Change:
        """What :meth:`apply` would change, with a diff; writes nothing."""
        ...

    def apply(
        self,
        objects: Sequence[UserObjects],
        *,
        keep: Collection[str] = (),
        guard: Callable[[Change], None] | None = None,
        verify: bool = False,
    ) -> Change:
        """Make the target hold exactly ``objects`` (among what provisioner owns).

        ``keep`` names endpoint ids whose current objects stay as they are (users
        that could not be rendered this time).  ``guard`` sees the computed
        change before anything is written and may raise to abort it.  ``verify``
        also finds and undoes hand edits a target's fast path would not see
        (realtime rows; the config file is always compared whole).
        """
        ...

    def endpoints_of(self, usernames: Collection[str]) -> dict[str, list[str]]:
        """The endpoint ids among what provisioner holds here whose auth's ``username`` is
        one of ``usernames``, by username, in endpoint order: the users they were applied
        for, as the target itself records it (for a process that applied nothing yet)."""
        ...

    def apply_partial(self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]) -> Change:
        """Write ``upserts`` and remove the objects of endpoint ids ``removed_ids``, every
        other user's objects staying as they are (the daemon's one-edit path; an id in
        both is upserted).  The change names these users only."""
        ...
