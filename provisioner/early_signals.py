"""Signals that arrive before the daemon's event loop handles them: noted, acted on later.

``provisioner run`` spends its first second or so importing, reading its configuration
and opening the store before :meth:`~provisioner.daemon.Daemon.install_signal_handlers`
runs.  A SIGHUP then (``systemctl reload`` or ``kill -HUP`` right after the start) would
kill it with the default action, and SIGINT would end it in a traceback.  The console
script (:mod:`provisioner.launch`) calls :func:`defer` first thing: from then on these
signals are only noted (nothing else runs in the handler), and the daemon acts on them
once its own handlers are in place (:func:`take`).  Any other command puts the previous
handlers back (:func:`restore`) and gets the signals noted meanwhile as it would have.
A ``run`` that ends before its handlers are in place (an invalid configuration) exits
with its own code: what was noted is dropped with the process.

Standard library only: this module is imported before anything heavy.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

__all__ = ["DEFERRED", "defer", "restore", "take"]

#: The signals the daemon answers: SIGHUP (reload), SIGTERM and SIGINT (stop).
DEFERRED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

#: Signals noted since :func:`defer`, in order of arrival.
_noted: list[signal.Signals] = []
#: The handlers :func:`defer` replaced (empty: not deferring).
_previous: dict[signal.Signals, Any] = {}


def _note(signum: int, _frame: FrameType | None) -> None:
    _noted.append(signal.Signals(signum))


def defer() -> None:
    """Note the :data:`DEFERRED` signals from now on instead of acting on them."""
    for sig in DEFERRED:
        previous = signal.signal(sig, _note)
        _previous.setdefault(sig, previous)


def take() -> list[signal.Signals]:
    """The signals noted so far, each once, in order of first arrival, and forget them
    (call it once handlers of one's own are installed: none is noted after that)."""
    taken = list(dict.fromkeys(_noted))
    _noted.clear()
    return taken


def restore() -> None:
    """Put back the handlers :func:`defer` replaced, then raise the signals noted and not
    taken, so that they act as they would have at their arrival.  No-op unless
    deferring."""
    if not _previous:
        return
    for sig, previous in _previous.items():
        signal.signal(sig, previous)
    _previous.clear()
    for sig in take():
        signal.raise_signal(sig)
