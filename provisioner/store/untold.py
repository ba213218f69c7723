"""Writers that may leave Asterisk untold: markers kept in ``daemon_state``.

Realtime rows are live in Asterisk only once their cache expiries are sent (where
Asterisk keeps a sorcery memory cache).  The daemon notes expiries owed only when sending
them failed (:func:`~provisioner.ami.changes.note_owed`; noting each edit's before
sending cost two store writes per edit), so a daemon killed between committing rows and
sending their expiries, or a ``sync --once`` (which tells Asterisk nothing), leaves
objects the caches may serve stale until their own lifetime ends, which the next run's
reconcile cannot see: it finds the rows as desired and owes nothing.

So each writer notes a marker of its own (``untold:<token>``) before its first write.
A daemon takes the markers it finds over (drops them in the same transaction: its own
stands for them) and owes each server's caches emptied whole: Asterisk then reads each
object again as it next needs it, which is always sound.  It drops its own marker only
when it stopped having told Asterisk everything (sent, or noted owed for the next run);
otherwise the next daemon finds it.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection

from sqlalchemy import Connection

from .state import KEY_MAX, VALUE_MAX, drop_state, load_states, put_state

__all__ = ["PREFIX", "drop_untold", "new_token", "note_untold", "untold_key"]

#: The keys' prefix: ``untold:<token>``.
PREFIX = "untold:"


def new_token() -> str:
    """A token no other writer holds (a marker's key is unique to its writer)."""
    return secrets.token_hex(16)


def untold_key(token: str) -> str:
    """The key of the marker of the writer holding ``token``."""
    key = PREFIX + token
    if len(key) > KEY_MAX:
        raise ValueError(f"untold token: at most {KEY_MAX - len(PREFIX)} characters")
    return key


def note_untold(conn: Connection, token: str, who: str, *, take_over: bool = False) -> list[str]:
    """Note, in the caller's transaction, that the writer holding ``token`` (``who``:
    what it is, for an operator reading the table) may write what Asterisk is not told
    of yet; the keys of the other writers' markers, left by writers that did not tell
    Asterisk everything.  With ``take_over`` they are dropped: this writer's own marker
    stands for them from now on."""
    own = untold_key(token)
    found = sorted(key for key in load_states(conn, PREFIX) if key != own)
    if take_over:
        drop_untold(conn, found)
    put_state(conn, own, who[:VALUE_MAX])
    return found


def drop_untold(conn: Connection, keys: Collection[str]) -> None:
    """Drop the markers of ``keys`` (one not kept is skipped), in the caller's transaction."""
    for key in keys:
        drop_state(conn, key)
