"""The error hierarchy.

Every error carries what went wrong as data (the field and the rule it broke),
so callers can report it, test it, or turn it into JSON.  Library code raises
these; only :mod:`provisioner.cli` turns them into messages and exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AsteriskSyntaxError",
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "Contended",
    "ForbiddenError",
    "ForeignTargetFile",
    "InvalidInput",
    "MassRemovalRefused",
    "NotFoundError",
    "Problem",
    "ProvisionerError",
    "RealtimeUnavailable",
    "RenderCheckFailed",
    "ServiceFailed",
    "StaleRead",
    "StoreUnavailable",
    "TargetWriteFailed",
    "UrlRefused",
]


@dataclass(frozen=True)
class Problem:
    """One broken rule: the field (or config key) and the rule it broke.

    ``line`` is set when the problem comes from a numbered input line (a CSV row).
    """

    field: str
    rule: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.field}: {self.rule}"


class ProvisionerError(Exception):
    """Base of every error provisioner raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ProvisionerError):
    """Input that breaks one or more rules; all of them are reported at once."""

    exit_code = 2
    headline = "invalid input"

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def one(cls, field: str, rule: str) -> InvalidInput:
        return cls([Problem(field, rule)])


class ConfigError(InvalidInput):
    """The configuration breaks one or more rules (``field`` is the config key)."""

    headline = "invalid configuration"


class UrlRefused(ConfigError):
    """A database driver refused the parameters a URL (the problem's field: ``store.url``
    or ``target.url``) gives it at a connect, before any byte reached a server (an unknown
    argument, a value it cannot take): no retry and no edit of the users mends it."""


class ConflictError(InvalidInput):
    """The input is valid alone but clashes with what the store holds (a taken name)."""

    exit_code = 4
    headline = "conflict with the store"


class ForbiddenError(InvalidInput):
    """The action is never allowed on this record (the first admin, a live user's purge)."""

    exit_code = 5
    headline = "not allowed"


class NotFoundError(ProvisionerError):
    """A named record does not exist."""

    exit_code = 3

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} not found")


class AuthenticationError(ProvisionerError):
    """A login was refused (wrong password, locked, disabled or deleted account)."""

    exit_code = 6


class StoreUnavailable(ProvisionerError):
    """The user store cannot be reached or used."""

    exit_code = 7


class Contended(StoreUnavailable):
    """The user store ended a change as the victim of a concurrent writer's (a deadlock, a
    lock wait timed out): nothing of it remains, and running it again is the answer, which
    the changes that can meet one do (:func:`provisioner.accounts.rerun_on_unique_clash`).
    Exit code 7, as the store's other failures."""


class RealtimeUnavailable(StoreUnavailable):
    """A realtime target's own database (``target.url``, not the user store) cannot be
    reached or used; the message names it, its password hidden.  Exit code 7, as the
    store's."""

    field = "target.url"


class MassRemovalRefused(ProvisionerError):
    """A sync would remove more than the configured fraction of the provisioned users."""

    exit_code = 8

    def __init__(self, removing: int, existing: int, max_fraction: float) -> None:
        self.removing = removing
        self.existing = existing
        self.max_fraction = max_fraction
        super().__init__(
            f"refusing to remove {removing} of {existing} provisioned users "
            f"(more than {max_fraction:.0%}); if the store really lost them on purpose, "
            "run 'provisioner sync --once --allow-mass-removal'"
        )


class AsteriskSyntaxError(ProvisionerError):
    """Text that Asterisk would refuse to load as a whole (its config parser gives up).

    ``line`` is the 1-based line number; ``rule`` says what is wrong without quoting
    any option value (values may be secrets), but may quote a section's name from the
    text; ``plain`` says it quoting nothing from the text (for text provisioner rendered,
    where an override template may have put any value, a digest included, in a name).
    """

    def __init__(self, line: int, rule: str, plain: str | None = None) -> None:
        self.line = line
        self.rule = rule
        self.plain = rule if plain is None else plain
        super().__init__(f"line {line}: {rule}")

    @property
    def plain_message(self) -> str:
        """The message quoting nothing from the text: ``line N: <plain>``."""
        return f"line {self.line}: {self.plain}"


class RenderCheckFailed(ProvisionerError):
    """The rendered config file does not parse back to exactly the intended objects.

    Nothing was written.  The message names sections and options, never values.
    """

    exit_code = 8


class TargetWriteFailed(ProvisionerError):
    """The target could not be read or written (permissions, disk full, ...)."""

    exit_code = 9


class ForeignTargetFile(TargetWriteFailed):
    """The file at ``target.path`` holds objects or directives provisioner never writes
    (``held``: their types and directive names, never a value): no file of provisioner's,
    such as Asterisk's own pjsip.conf named by mistake.  Nothing was written: replacing it
    with the users would take from Asterisk what it holds (its transports, say)."""

    def __init__(self, path: str, held: tuple[str, ...]) -> None:
        self.field = "target.path"
        self.path = path
        self.held = held
        super().__init__(
            f"refusing to replace {path!r}: it holds what provisioner never writes "
            f"({'; '.join(held)}), so it is no file of provisioner's (is target.path "
            "Asterisk's own pjsip.conf?); point target.path at a file of its own that "
            "pjsip.conf #includes, or move this one away: nothing written"
        )


class StaleRead(ProvisionerError):
    """The users a full apply rendered were edited before it got the writers' lock (the
    change feed moved on): it writes nothing and reads them again."""

    def __init__(self, read_at: int, now: int) -> None:
        self.read_at = read_at
        self.now = now
        super().__init__(f"the users changed (changes {read_at} -> {now}) while waiting")


class ServiceFailed(ProvisionerError):
    """A task of the daemon (a wake-up source, the AMI side, the template watcher) ended
    with an unexpected error: the daemon stopped, so that systemd's
    ``Restart=on-failure`` brings up a whole one instead of one running without it."""

    exit_code = 10
