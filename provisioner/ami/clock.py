"""Asterisk's clock as this host sees it: pure.

Contact expiries (``ExpirationTime``) are epoch seconds on Asterisk's clock, and a
host's clock may be minutes off another's.  Asterisk tells its time in what it stamps:
every event's ``Timestamp`` (epoch, microseconds) when ``manager.conf`` has
``timestampevents = yes``, the ``EventTV`` of security events (``SuccessfulAuth``)
always, and the answer to ``Ping`` (``Timestamp``) always.

A stamp seen on arrival gives a lower bound of the offset (Asterisk's clock minus this
host's): the stamp was made before it arrived, so ``stamp - arrival`` is the offset
less the delay (network, Asterisk's queue, this reader's queue), and no delay is
negative.  The estimate is the largest such bound seen in a recent window (the least
delayed stamp), so a storm's queueing lowers no estimate.  Memory is two numbers: the
best bound of the current window of ``window`` seconds and of the one before (dropped
when the current one started more than a window after it ended); the estimate is the
better of the two, so a clock set right on either host is followed within two windows.

No offset is taken for absurd: a host whose clock is a day (or years) off stamps its
contact expiries on that same clock, and only the offset reads them right; ignoring a
large one would bring back exactly the expired-live-phones it is there to prevent.
Only a stamp that is no time at all (not a number, before 1970, past year 9999) is
ignored.  A large offset is logged instead (``ami.clock_skew``, by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime

__all__ = ["MOVE", "WINDOW", "AsteriskClock", "event_tv"]

#: Seconds of samples each of the estimate's two windows covers.
WINDOW = 60.0
#: The estimate moving by more than this many seconds (or being known at last) is told
#: (:attr:`AsteriskClock.on_move`): expiry checks scheduled by the old one are redone.
MOVE = 1.0
#: The last second a date holds (9999-12-31 23:59:59 UTC).
_LAST_EPOCH = 253402300799.0
_NONE = -math.inf


def event_tv(value: str | None) -> float | None:
    """An ``EventTV`` (``2026-11-24T23:51:45.410+0000``) as epoch seconds, or ``None``
    when it is no such time."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # no offset: not a time this code can place
    return moment.timestamp()


class AsteriskClock:
    """The estimate of one Asterisk server's clock offset (see the module doc)."""

    __slots__ = ("_current", "_ends", "_previous", "_told", "on_move", "window")

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        #: Called with the new estimate when it is first known, and each time it moves
        #: by more than ``MOVE`` from the one last told.
        self.on_move: Callable[[float], None] | None = None
        self._current = _NONE
        self._previous = _NONE
        #: This host's time the current window ends.
        self._ends = _NONE
        self._told: float | None = None

    def reset(self) -> None:
        """Forget every stamp (a new session: Asterisk may have come back on another
        clock, or another host answers); the next stamp is told as a first one."""
        self._current = self._previous = self._ends = _NONE
        self._told = None

    @property
    def offset(self) -> float | None:
        """Seconds Asterisk's clock is ahead of this host's (negative: behind); ``None``
        when no stamp was ever seen."""
        best = self._current if self._current > self._previous else self._previous
        return None if best == _NONE else best

    def now(self, local: float) -> float:
        """Asterisk's time when this host's is ``local``: ``local`` itself when no stamp
        was ever seen (this host's clock taken for Asterisk's)."""
        best = self._current if self._current > self._previous else self._previous
        return local if best == _NONE else local + best

    def see_text(self, text: str, arrived: float) -> None:
        """:meth:`see` of a ``Timestamp`` header's text (anything not a number ignored).
        Called once per socket read, not per event: the second call costs nothing."""
        try:
            stamp = float(text)
        except ValueError:
            return
        self.see(stamp, arrived)

    def see(self, stamp: float, arrived: float) -> None:
        """Take ``stamp`` (Asterisk's epoch seconds), seen at ``arrived`` (this host's
        epoch seconds, read after the stamp's bytes were)."""
        if not 0.0 <= stamp <= _LAST_EPOCH:  # False for NaN
            return
        sample = stamp - arrived
        if arrived >= self._ends:
            self._roll(arrived)
        if sample > self._current:
            self._current = sample
            self._check()

    def _roll(self, arrived: float) -> None:
        """Start a new window at ``arrived``; the current one becomes the previous when
        it ended less than a window ago (an older one says nothing of now)."""
        recent = arrived < self._ends + self.window
        self._previous = self._current if recent else _NONE
        self._current = _NONE
        self._ends = arrived + self.window

    def _check(self) -> None:
        best = self._current if self._current > self._previous else self._previous
        told = self._told
        if told is None or abs(best - told) > MOVE:
            self._told = best
            if self.on_move is not None:
                self.on_move(best)
