"""Text from outside shown as characters, never acted on: every control character, and
every invisible one that changes how the rest of a line is shown, as its escape.

The command line prints text a phone sent (its user agent) or another writer stored with
it; systemd's notify message carries a STATUS that may quote a refused file's key, where
a line break would start another ``KEY=VALUE`` of the message.
"""

from __future__ import annotations

import re

__all__ = ["visible", "visible_lines"]

#: C0 controls, DEL and C1 controls (ESC, BEL, CR, CSI...): what a terminal acts on; and
#: the invisible characters that change how the rest of a line is shown: bidi marks,
#: embeddings, overrides and isolates (a bidi terminal would show the rest of a ``status``
#: row reversed), zero-width characters and the Unicode line and paragraph separators.
_INVISIBLE = r"\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
_TERMINAL_CONTROL = re.compile(rf"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")
#: :data:`_TERMINAL_CONTROL` but the line feed: what a multi-line text may not hold.
_TERMINAL_CONTROL_BUT_LF = re.compile(rf"[\x00-\x09\x0b-\x1f\x7f-\x9f{_INVISIBLE}]")


def _escape(match: re.Match[str]) -> str:
    """The matched character as ``\\xNN`` (below U+0100) or ``\\uNNNN``."""
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character as its ``\\xNN`` escape (and each character of
    :data:`_TERMINAL_CONTROL` above U+00FF as ``\\uNNNN``): text a phone sent (its user
    agent) or another writer stored reaches the terminal as characters, never as escape
    sequences it would act on (clear the screen, write the clipboard, hide lines) nor as
    marks that reorder or hide what follows; and it is one line."""
    return _TERMINAL_CONTROL.sub(_escape, text)


def visible_lines(text: str) -> str:
    """``text`` escaped as :func:`visible` does, but its line feeds kept: a diff quotes
    rows and files others may have written."""
    return _TERMINAL_CONTROL_BUT_LF.sub(_escape, text)
