"""Errors of the AMI layer, all :class:`~provisioner.errors.ProvisionerError`.

An action that did not get its answer raises one of these; it is never sent again
by the client, because AMI actions (a reload, a delete) are not known to be
idempotent at this layer: the caller decides.
"""

from __future__ import annotations

from ..errors import ProvisionerError

__all__ = [
    "AmiActionFailed",
    "AmiConnectionLost",
    "AmiError",
    "AmiLoginFailed",
    "AmiNotAsterisk",
    "AmiNotConnected",
    "AmiProtocolError",
    "AmiTimeout",
]


class AmiError(ProvisionerError):
    """Something went wrong talking to one Asterisk over AMI."""

    exit_code = 8

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.reason = message


class AmiNotConnected(AmiError):
    """No logged-in connection right now; the action was not sent."""


class AmiConnectionLost(AmiError):
    """The connection closed after the action was sent and before its answer came."""


class AmiTimeout(AmiError):
    """The action was sent but no (complete) answer came in time."""


class AmiProtocolError(AmiError):
    """The peer broke the protocol: a line, a message or a header count past its bound
    (:attr:`limit`: ``line``, ``message`` or ``headers``: the connection is dropped), or
    a list action's answer past its count or its bytes (``list_events``, ``list_bytes``:
    that action fails, the session stays)."""

    def __init__(self, server: str, message: str, *, limit: str = "") -> None:
        super().__init__(server, message)
        self.limit = limit


class AmiNotAsterisk(AmiError):
    """The peer did not greet as Asterisk (``Asterisk Call Manager/...``): another
    service on that port.  The login was not sent; :attr:`greeting` is a printable
    excerpt of what it sent."""

    def __init__(self, server: str, greeting: str) -> None:
        super().__init__(server, f"not Asterisk: first line {greeting!r}, no AMI greeting")
        self.greeting = greeting


class AmiLoginFailed(AmiError):
    """Asterisk refused the login (``Authentication failed``)."""


class AmiActionFailed(AmiError):
    """Asterisk answered ``Response: Error``; :attr:`reason` holds its ``Message``."""

    def __init__(self, server: str, action: str, message: str) -> None:
        super().__init__(server, f"{action}: {message}")
        self.action = action
        self.asterisk_message = message
