"""A unified diff of a PJSIP config file with its credentials redacted.

``render --dry-run`` and the config-file targets' ``plan`` show what a write would
change; digests must never reach a terminal or a log, so each credential option's value
is shown as ``<redacted>``, marked ``<changed>`` where it differs from the old file, and
a digest quoted anywhere else in a line (an override's comment) is ``<redacted>`` too.  The
diff is the text ``difflib.unified_diff`` gives, but computed without running difflib
over the lines both versions share at their start and end: one changed user in a 62 MB
file costs little.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path

__all__ = ["SECRET_OPTIONS", "hide_digests", "split_lines", "unified_diff"]

#: Auth options whose values are credentials: never shown in diffs or messages (an OAuth
#: auth's secret and refresh token too, as the realtime diff hides those columns).
SECRET_OPTIONS = frozenset(
    {"md5_cred", "password_digest", "password", "oauth_secret", "refresh_token"}
)

_SECTION_LINE = re.compile(r"\s*\[([^\]]*)\]")
#: 32 hex digits or more: an MD5 or SHA-256 digest, or most of one, which an override
#: template may print outside its option (a comment); nothing else a user's objects hold
#: is that long a run (an extension is at most 20 digits).
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{32,}")
#: An option line as Asterisk reads one (any byte below 33 is a blank, a leading ``\``
#: escapes the name's first character, ``+=`` appends): its name (Asterisk matches option
#: names in any case) and, after the mark, its value.
_OPTION_LINE = re.compile(r"([\x00-\x20]*\\?([A-Za-z0-9_]+)[\x00-\x20]*\+?=>?[\x00-\x20]*)(.*)")


def split_lines(text: str) -> list[str]:
    """Lines split at LF only, as Asterisk splits them (not at CR, VT, U+2028, ...)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _redacted(
    lines: list[str], others: Mapping[tuple[str, str], str], section: str = ""
) -> list[str]:
    """``lines`` (the first in ``section``) with credential values replaced; ``<changed>``
    marks one that differs from the same option of the same section in ``others``.  Any
    other run of 32 hex digits or more (a digest printed elsewhere) is replaced too."""
    out: list[str] = []
    for line in lines:
        if m := _SECTION_LINE.match(line):
            section = m.group(1)
        m = _OPTION_LINE.match(line.rstrip("\n"))
        if m and m.group(2).lower() in SECRET_OPTIONS:
            value = m.group(3)
            mark = "" if others.get((section, m.group(2).lower())) == value else " <changed>"
            line = f"{m.group(1)}<redacted>{mark}" + ("\n" if line.endswith("\n") else "")
        else:
            line = _HEX_RUN.sub("<redacted>", line)
        out.append(line)
    return out


#: Digests are indexed by their chunks of this many digits, at multiples of it: any 31 or
#: more consecutive digits of a digest hold a whole chunk.
_CHUNK = 16


#: Longer than any id a check names (an extension: at most 20 digits; ``<ext>-auth``), so
#: in a message about parsed names such a run of hex digits is (part of) a digest.
_LONG_HEX = re.compile(r"[0-9A-Fa-f]{21,}")


def hide_digests(message: str) -> str:
    """``message`` with every run of more than 20 hex digits shown as ``<redacted>``.

    For a message quoting names Asterisk's loader read from a rendered or current file
    (section, option and directive names): an override's mistake (key and value swapped,
    a value on a line of its own) can put a credential where a name is read, and no
    message may carry one."""
    return _LONG_HEX.sub("<redacted>", message)


def _digests(values: Iterable[str]) -> set[str]:
    """The chunks of the hex digests in credential ``values`` (each run of 32 or more hex
    digits, lower case, cut every :data:`_CHUNK` digits): what :func:`_unquoted` looks
    for elsewhere in a line (a few per user, where every slice would be hundreds)."""
    return {
        run[i : i + _CHUNK]
        for value in values
        for run in _HEX_RUN.findall(value.lower())
        for i in range(0, len(run) - _CHUNK + 1, _CHUNK)
    }


def _unquoted(line: str, digests: set[str]) -> str:
    """``line`` with each run of more than 20 hex digits that holds a chunk of one of
    ``digests`` (in any case) replaced by ``<redacted>``: a digest quoted whole, or any 31
    of its digits.  An override may quote a credential in a comment (the only text the
    parse-back check lets it add): the redaction of option lines misses it, and a diff
    must never show one."""
    if not _LONG_HEX.search(line):
        return line

    def hide(found: re.Match[str]) -> str:
        run = found.group().lower()
        if any(run[i : i + _CHUNK] in digests for i in range(len(run) - _CHUNK + 1)):
            return "<redacted>"
        return found.group()

    return _LONG_HEX.sub(hide, line)


#: A section header line or a credential option line (as :data:`_SECTION_LINE` and
#: :data:`_OPTION_LINE` read them, one line each), found in a whole text at once: a
#: regex per line costs seconds on a large file, and most lines are neither.
_SECTION_OR_SECRET = re.compile(
    r"^(?:[^\S\n]*\[([^\]\n]*)\]"
    r"|[\x00-\x09\x0b-\x20]*\\?("
    + "|".join(sorted(SECRET_OPTIONS, key=len, reverse=True))  # the longest name first
    + r")[\x00-\x09\x0b-\x20]*\+?=>?[\x00-\x09\x0b-\x20]*(.*))",
    re.MULTILINE | re.IGNORECASE,
)


def _secrets(text: str) -> dict[tuple[str, str], str]:
    """Each credential option's value in ``text``, by (section name, lower-case option)."""
    found: dict[tuple[str, str], str] = {}
    section = ""
    for m in _SECTION_OR_SECRET.finditer(text):
        if m.group(1) is not None:
            section = m.group(1)
        else:
            found[(section, m.group(2).lower())] = m.group(3)
    return found


#: Lines of context around each hunk (difflib's default).
_CONTEXT = 3
_Opcode = tuple[str, int, int, int, int]


def _common_ends(a: list[str], b: list[str]) -> tuple[int, int]:
    """How many leading lines ``a`` and ``b`` share, then how many trailing lines of the
    rest (difflib, on such files, matches the earliest run first: the shared start)."""
    limit = min(len(a), len(b))
    head = 0
    while head < limit and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < limit - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return head, tail


def _opcodes(a: list[str], b: list[str]) -> list[_Opcode]:
    """difflib's opcodes for ``a`` -> ``b``, with the shared first and last lines matched
    without difflib (it is slow on large files) and difflib run on the rest only."""
    head, tail = _common_ends(a, b)
    a_mid, b_mid = a[head : len(a) - tail], b[head : len(b) - tail]
    codes: list[_Opcode] = [("equal", 0, head, 0, head)] if head else []
    if a_mid and b_mid:
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a_mid, b_mid).get_opcodes():
            codes.append((tag, i1 + head, i2 + head, j1 + head, j2 + head))
    elif a_mid or b_mid:  # difflib's answer, without indexing the other side
        codes.append(("delete" if a_mid else "insert", head, len(a) - tail, head, len(b) - tail))
    if tail:
        codes.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    merged: list[_Opcode] = []
    for code in codes:
        if merged and code[0] == "equal" == merged[-1][0]:
            code = ("equal", merged[-1][1], code[2], merged[-1][3], code[4])
            merged.pop()
        merged.append(code)
    return merged or [("equal", 0, 0, 0, 0)]


def _grouped(codes: list[_Opcode], n: int = _CONTEXT) -> Iterator[list[_Opcode]]:
    """``SequenceMatcher.get_grouped_opcodes`` over ``codes``."""
    if codes[0][0] == "equal":
        tag, i1, i2, j1, j2 = codes[0]
        codes[0] = tag, max(i1, i2 - n), i2, max(j1, j2 - n), j2
    if codes[-1][0] == "equal":
        tag, i1, i2, j1, j2 = codes[-1]
        codes[-1] = tag, i1, min(i2, i1 + n), j1, min(j2, j1 + n)
    group: list[_Opcode] = []
    for tag, i1, i2, j1, j2 in codes:
        if tag == "equal" and i2 - i1 > n + n:
            group.append((tag, i1, min(i2, i1 + n), j1, min(j2, j1 + n)))
            yield group
            group = []
            i1, j1 = max(i1, i2 - n), max(j1, j2 - n)
        group.append((tag, i1, i2, j1, j2))
    if group and not (len(group) == 1 and group[0][0] == "equal"):
        yield group


def _range(start: int, stop: int) -> str:
    """difflib's unified range: ``start,length`` (1-based), ``start`` alone for one line."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"


def unified_diff(
    path: Path,
    old: bytes | None,
    new: str,
    *,
    held: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """A unified diff of the file, with credentials redacted: the text
    ``difflib.unified_diff`` gives, computed without running difflib over the lines
    both versions share at their start and end (one changed user in a large file
    costs little).

    A new credential is marked ``<changed>`` when it differs from the same option of the
    same section in ``held`` (by section name and lower-case option name: what Asterisk
    holds now, whichever file holds it), else in ``old``: a user moving to another file
    (a new shard count) keeps an unchanged credential unmarked."""
    if old is not None and old == new.encode("utf-8"):
        return ""
    old_text = old.decode("utf-8", "replace") if old is not None else ""
    a = split_lines(old_text)
    b = split_lines(new)
    groups = list(_grouped(_opcodes(a, b)))
    if not groups:
        return ""
    # Only the lines shown are redacted; a changed secret is found against all old ones.
    lo = min(g[0][1] for g in groups), min(g[0][3] for g in groups)
    hi = max(g[-1][2] for g in groups), max(g[-1][4] for g in groups)
    old_shown = _redacted(a[lo[0] : hi[0]], {}, _section_at(a, lo[0]))
    # The old text's credentials are read (a scan of the whole text) only when needed:
    # ``held`` is given by every config-file dry run.
    old_secrets = _secrets(old_text) if held is None else None
    others = held if held is not None else old_secrets or {}
    new_shown = _redacted(b[lo[1] : hi[1]], others, _section_at(b, lo[1]))
    # An unchanged secret is shown the same on both sides, so it drops out of the diff.
    old_shown = [line.replace(" <changed>", "") for line in old_shown]
    # Credentials quoted outside their option lines (an override's comments), both sides;
    # looked for only when a line shown holds a long run of hex digits (no shipped one does).
    if any(map(_LONG_HEX.search, chain(old_shown, new_shown))):
        if old_secrets is None:
            old_secrets = _secrets(old_text)
        values = chain(old_secrets.values(), _secrets(new).values(), (held or {}).values())
        digests = _digests(values)
        old_shown = [_unquoted(line, digests) for line in old_shown]
        new_shown = [_unquoted(line, digests) for line in new_shown]
    out = [f"--- {path if old is not None else '/dev/null'}\n", f"+++ {path}\n"]
    for group in groups:
        first, last = group[0], group[-1]
        out.append(f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [" " + line for line in old_shown[i1 - lo[0] : i2 - lo[0]]]
                continue
            if tag in ("replace", "delete"):
                out += ["-" + line for line in old_shown[i1 - lo[0] : i2 - lo[0]]]
            if tag in ("replace", "insert"):
                out += ["+" + line for line in new_shown[j1 - lo[1] : j2 - lo[1]]]
    return "".join(out)


def _section_at(lines: list[str], index: int) -> str:
    """The section that ``lines[index]`` belongs to (the last header before it)."""
    for line in reversed(lines[:index]):
        if m := _SECTION_LINE.match(line):
            return m.group(1)
    return ""
