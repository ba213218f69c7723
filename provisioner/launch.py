"""The ``provisioner`` console script: signals are deferred before anything is imported."""

from __future__ import annotations

from .early_signals import defer


def entry() -> None:
    """Defer SIGHUP/SIGTERM/SIGINT (:mod:`provisioner.early_signals`), then run the CLI
    (whose import alone takes a while) and exit with its code."""
    defer()
    from .cli import entry as cli_entry

    cli_entry()
