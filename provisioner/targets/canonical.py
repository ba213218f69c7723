"""The canonical text of users' PJSIP objects, written and read back without the parser.

A user's *canonical chunk* is the shipped templates' text for it: for each of its
endpoint, auth and AOR a blank line, ``[id]``, ``type=<type>`` and one ``key=value`` line
per option.  When every id, option name and value is made only of characters
Asterisk's loader takes literally (:func:`_plain_join` says which), the lines of a
chunk, after a header that parses to nothing (:func:`~.templating.plain_header`),
parse to exactly the user's sections: the config-file target writes such text without
parsing it back (see :mod:`.configfile`).

:func:`read_canonical` is the same in reverse, for a process that did not write the file
itself (daemon start, ``sync --once``): it splits a file's text cheaply into sections
(at each line starting with ``[``; ``key=value`` lines), groups them into users, makes
their canonical chunks again and compares them with the file's text.  Only when the
file is exactly a plain header followed by those chunks, each canonical, does it return
the users: they are then, by the writer's fast path, exactly what the general parser
(:func:`provisioner.asterisk_conf.parse`) reads; anything else (a hand edit, a comment,
a template, an include, odd bytes, CRLF) is declined, to be parsed in full.  The split
need not be right for odd text: whatever it yields must still make the file's exact
bytes again, so a wrong split can only decline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, itemgetter

from ..asterisk_conf import LINE_MAX_BYTES
from ..pjsip import UserObjects
from .templating import plain_header

__all__ = ["Canonical", "canonical_chunk", "read_canonical"]

#: What the fast path accepts without parsing: characters Asterisk's loader takes
#: literally in a section name, an option name and a value (no comment, escape,
#: section, directive, object or append mark, no blank at either end, no control).
_PLAIN_ID = re.compile(r"[A-Za-z0-9._@+-]{1,79}")
#: Ids joined by LF, each plain (an id holds no LF, so the split is unambiguous).
_PLAIN_IDS = re.compile(r"[A-Za-z0-9._@+-]{1,79}(?:\n[A-Za-z0-9._@+-]{1,79})*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")
#: Controls but LF, C1 controls, surrogates, comment and escape marks: never in plain text.
_ODD_CHAR = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff;\\]")
#: The ASCII bytes _ODD_CHAR lets through, LF left out.
_PLAIN_BUT_LF = bytes(b for b in range(128) if b != 0x0A and not _ODD_CHAR.match(chr(b)))
#: A value starting with a blank or '>' or ending with a blank (in a plain line the first
#: '=' ends the name): "= ", "=>" or " \n" anywhere (also refused, harmlessly, inside a
#: value).  Each pattern starts with one literal character, rare in such files, that the
#: regex engine finds by a quick scan: one pass each, where ``in`` took ~3x as long.
_ODD_EDGES = (re.compile(r" (?:(?=\n)|(?<== ))"), re.compile(r">(?<==>)"))
#: The bytes of those patterns, and '"' (which opens a caller ID's name, so its blanks do
#: not follow the option's '=' once the letters between are gone): kept, with LF and the
#: odd bytes, when an ASCII text is boiled down for its checks (see :func:`_plain_join`).
_MARKS = b' =>"'
_PLAIN_BUT_MARKS = bytes(b for b in _PLAIN_BUT_LF if b not in _MARKS)
#: :data:`_ODD_EDGES` for the boiled-down bytes.
_ODD_EDGE_MARKS = (re.compile(rb" (?:(?=\n)|(?<== ))"), re.compile(rb">(?<==>)"))
#: Below this many characters no line can reach Asterisk's 8191-byte limit (4 bytes each).
_SHORT = 2000
#: Option names and types already found plain (a few dozen in practice; bounded).
_plain_names: set[str] = set()
#: The three sections' ids and options of a user, read in C.
_IDS = attrgetter("endpoint_id", "auth_id", "aor_id")
_OPTIONS = attrgetter("endpoint", "auth", "aor")
_PAIR = "=".join
_LINES = "\n".join


def _plain_name(name: str) -> bool:
    if name in _plain_names:
        return True
    if not _PLAIN_NAME.fullmatch(name):
        return False
    if len(_plain_names) < 1000:
        _plain_names.add(name)
    return True


def _chunk_text(user: UserObjects) -> str:
    """The shipped templates' text for one user (each section: a blank line, ``[id]``,
    ``type=<type>``, ``key=value`` per option), unchecked."""
    endpoint, auth, aor = user.endpoint, user.auth, user.aor
    if endpoint and auth and aor:
        # One f-string, each option line made in C: the usual case, by far the quickest.
        return (
            f"\n[{user.endpoint_id}]\ntype=endpoint\n{_LINES(map(_PAIR, endpoint))}\n"
            f"\n[{user.auth_id}]\ntype=auth\n{_LINES(map(_PAIR, auth))}\n"
            f"\n[{user.aor_id}]\ntype=aor\n{_LINES(map(_PAIR, aor))}\n"
        )
    return "".join(
        f"\n[{name}]\ntype={kind}\n" + "".join(f"{key}={value}\n" for key, value in options)
        for name, kind, options in user.sections()
    )


def _plain_join(
    users: Sequence[UserObjects],
    texts: Sequence[str],
    joined: str | None = None,
    start: int = 0,
    data: bytes | None = None,
    ids: Sequence[str] | None = None,
) -> str | None:
    """The texts joined (``joined``, when given, is that join after ``start`` characters
    of something else, a header, left unchecked; ``data``, when given, is ``joined``
    encoded as UTF-8) when every ``texts[i]`` (:func:`_chunk_text` of ``users[i]``) is
    canonical (after a header that leaves no block comment open, its lines parse to
    exactly ``users[i].sections()``), else None.

    Each property is checked on all texts at once, in C, and holds for the whole batch
    exactly when it holds for each text (every text starts with LF and ends with LF, so no
    odd pair of characters spans two): every id plain; every option name plain (its first
    ``=`` ends the name; types are the three fixed words); as many LFs as lines, so no id,
    name or value holds one and each line is one ``[id]`` or one ``name=value``; no odd
    character anywhere; no value starting with a blank or ``>`` or ending with a blank;
    no line long enough to reach Asterisk's limit.  The checks read ``joined`` and ``data``
    in place (from ``start`` on): no copy of a large file's text is made for them.
    ``ids``, when given, is :func:`section_ids` of ``users`` (made once for this and
    the caller's own use).
    """
    if not users:
        return "" if joined is None else joined
    every_id = _LINES(chain.from_iterable(map(_IDS, users)) if ids is None else ids)
    if not _PLAIN_IDS.fullmatch(every_id):
        return None
    options = list(chain.from_iterable(map(_OPTIONS, users)))
    try:
        # dict() reads the names in C, and refuses anything but (name, value) pairs.
        names = dict(chain.from_iterable(options))
    except (TypeError, ValueError):
        return None
    if not _plain_names.issuperset(names) and not all(map(_plain_name, names)):
        return None
    text = "".join(texts) if joined is None else joined
    lines = 9 * len(users) + sum(map(len, options))
    if text.isascii():
        # bytes.translate deleting every plain byte but LF and the marks (fast, in C)
        # keeps the LFs, the marks and the odd bytes in order, a tenth of the text: the
        # texts hold no odd byte and one LF a line exactly when their part of it is
        # ``lines`` LFs once the marks are gone too (one pass for both: counting the LFs
        # apart took as long as this).
        raw = text.encode("ascii") if data is None else data
        marks = raw.translate(None, _PLAIN_BUT_MARKS)
        head = len(raw[:start].translate(None, _PLAIN_BUT_MARKS)) if start else 0
        if marks[head:].translate(None, _MARKS) != b"\n" * lines:
            return None
        # Two bytes next to each other in the text are next to each other in ``marks``
        # when both are kept: a text with an odd edge has one there too.  The converse
        # fails only for a blank after an '=' with a letter between (a value "a b"): the
        # text itself is searched then.
        if any(edge.search(marks, head) for edge in _ODD_EDGE_MARKS) and any(
            edge.search(text, start) for edge in _ODD_EDGES
        ):
            return None
    elif (
        text.count("\n", start) != lines
        or _ODD_CHAR.search(text, start)
        # A match starts with its literal character, at ``start`` or later: in the texts.
        or any(edge.search(text, start) for edge in _ODD_EDGES)
    ):
        return None
    if max(map(len, texts)) >= _SHORT and any(
        max(map(len, t.split("\n"))) * 4 >= LINE_MAX_BYTES for t in texts if len(t) >= _SHORT
    ):
        return None
    return text


def section_ids(users: Sequence[UserObjects]) -> list[str]:
    """The ids of every user's sections in file order: endpoint, auth and AOR of each."""
    return list(chain.from_iterable(map(_IDS, users)))


def _all_plain(users: Sequence[UserObjects], texts: Sequence[str]) -> bool:
    """True when :func:`_plain_join` finds every text canonical."""
    return _plain_join(users, texts) is not None


def _canonical_chunks(users: Sequence[UserObjects]) -> tuple[list[str], str | None]:
    """:func:`canonical_chunk` of each user, ``""`` for one that has none, and their
    concatenation when none is ``""``; checked in one batch (see :func:`_plain_join`),
    user by user only when the batch holds an odd one."""
    try:
        texts = list(map(_chunk_text, users))
    except TypeError:  # a value that is not a str: leave it to Jinja and the parser
        return [canonical_chunk(user) or "" for user in users], None
    joined = _plain_join(users, texts)
    if joined is not None:
        return texts, joined
    if len(users) == 1:
        return [""], None
    return [t if _all_plain((u,), (t,)) else "" for u, t in zip(users, texts, strict=True)], None


def canonical_chunk(user: UserObjects) -> str | None:
    """The shipped templates' text for one user (each section: a blank line, ``[id]``,
    ``type=<type>``, ``key=value`` per option), or None when some id, name or value holds
    a character the fast path leaves to the parser.

    Lines of this text, after a header that leaves no block comment open, parse to
    exactly ``user.sections()``: nothing in them is a comment, escape, directive,
    template, inheritance, ``+=`` or ``=>`` mark, blank to strip or over-long line
    (see :func:`_all_plain`).
    """
    try:
        text = _chunk_text(user)
    except TypeError:
        return None
    return text if _all_plain((user,), (text,)) else None


#: A header longer than this is not looked at by :func:`read_canonical` (generated
#: headers are a few lines; a long one is left, with the file, to the parser).
HEADER_MAX = 1 << 16
#: Where a section of a canonical text starts: the blank line before it ends, its
#: ``[id]`` line begins (the text splits into the header, then one piece per section).
_SECTION_START = "\n["
#: Where a canonical section's id ends, its ``type=`` line begins.
_ID_END = "]\n"
#: One ``name=value`` line (the first ``=`` ends the name), as (name, value).
_OPTION_LINE = re.compile(r"([^=\n]*)=([^\n]*)\n")
#: The first option of a user's three sections, in file order.
_TYPES = (("type", "endpoint"), ("type", "auth"), ("type", "aor"))
_FIRST = itemgetter(0)
_AFTER_FIRST = itemgetter(slice(1, None))


@dataclass(frozen=True)
class Canonical:
    """A text that is exactly ``header`` followed by every user's canonical chunk."""

    header: str
    users: list[UserObjects]
    chunks: list[str]


def read_canonical(data: bytes, known: Mapping[str, UserObjects] | None = None) -> Canonical | None:
    """The header, users and chunks of ``data`` when it is UTF-8 text made of a plain
    header (at most :data:`HEADER_MAX` characters) and the canonical chunks of users,
    each section's type the one of its place (endpoint, auth, AOR); else None.

    What it returns is what Asterisk reads from ``data``: the general parser finds
    exactly the sections of those users, in order, and nothing else (see the module
    docstring).  Most of its time is the split of every option line (re.findall).
    ``known``: canonical chunks (each checked plain, as every non-empty chunk a target
    holds is) and their users: a user's text equal to one of them is that user, its
    lines not split at all (a file a few edits away from ``known``: read ~5x faster)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pieces = text.split(_SECTION_START)
    header = pieces[0]
    if len(header) > HEADER_MAX or not plain_header(header):
        return None
    if known:
        return _read_known(data, text, pieces, known)
    users = _users(pieces[1:])
    if users is None:
        return None
    chunks = list(map(_chunk_text, users))
    start = len(header)
    # The chunks made again are the file's text after the header, character for
    # character (equal lengths, and the text from ``start`` starts with their join).
    if sum(map(len, chunks)) != len(text) - start or not text.startswith("".join(chunks), start):
        return None
    if _plain_join(users, chunks, text, start, data) is None:
        return None
    return Canonical(pieces[0], users, chunks)


def _read_known(
    data: bytes, text: str, pieces: list[str], known: Mapping[str, UserObjects]
) -> Canonical | None:
    """:func:`read_canonical` of ``text`` (``data`` decoded, split into ``pieces``, its
    header plain) with ``known`` chunks: the text after the header, cut every three
    pieces (one user's), is a list of texts that join to exactly it; each one a known
    chunk is that chunk's user (a canonical chunk, plain: see ``known``), the others are
    read as :func:`read_canonical` reads a whole text.  Every text canonical and plain,
    after a plain header: the whole is (the checks hold for a batch exactly when they
    hold for each text)."""
    body = pieces[1:]
    if len(body) % 3:
        return None
    # "" + "\n[" + three pieces: exactly one user's text, cut out of the file.
    chunks = list(map(_SECTION_START.join, zip(repeat(""), body[::3], body[1::3], body[2::3])))
    found = list(map(known.get, chunks))
    missing = [at for at, user in enumerate(found) if user is None]
    if missing:
        users = _users([piece for at in missing for piece in body[3 * at : 3 * at + 3]])
        if users is None:
            return None
        made = list(map(_chunk_text, users))
        if made != [chunks[at] for at in missing] or _plain_join(users, made) is None:
            return None
        for at, user in zip(missing, users, strict=True):
            found[at] = user
    return Canonical(pieces[0], [user for user in found if user is not None], chunks)


def _users(pieces: list[str]) -> list[UserObjects] | None:
    """The users of ``pieces`` (a text split at :data:`_SECTION_START`, the header left
    out) read as canonical sections (``id]``, ``type=<type>``, ``name=value`` lines),
    three a user: endpoint, auth and AOR, in that order; None when they do not come so.
    Other text gives users whose canonical text differs from it.  Read in C, piece by
    piece: no Python code runs per line or per section."""
    if not pieces:
        return []
    if len(pieces) % 3:
        return None
    ids, _, bodies = zip(*map(str.partition, pieces, repeat(_ID_END)), strict=True)
    found = list(map(_OPTION_LINE.findall, bodies))
    try:
        types = list(map(_FIRST, found))
    except IndexError:  # a piece with no option line, not even its type
        return None
    if types != list(_TYPES) * (len(pieces) // 3):
        return None
    options = list(map(tuple, map(_AFTER_FIRST, found)))
    auths = options[1::3]
    # As kept_objects reads it.
    usernames = [dict(auth).get("username", "") for auth in auths]
    return list(
        map(
            UserObjects,
            usernames,
            ids[::3],
            options[::3],
            ids[1::3],
            auths,
            ids[2::3],
            options[2::3],
        )
    )
