"""A parser of Asterisk's config-file syntax that sees what Asterisk would see.

Pure: :func:`parse` takes the bytes (or text) of one file and returns plain
data.  It follows the rules of Asterisk's own loader (``main/config.c``, as of
Asterisk 22), written afresh from its documented and observed behaviour:

* Lines end at LF only (a CR is part of the line; trailing CRs are blanks).  A
  NUL byte ends the line early.  A line of 8191 bytes or more (without its LF)
  is skipped whole.  A UTF-8 byte-order mark on line 1 is ignored.
* ``;`` starts a comment to the end of the line; ``\\;`` is a literal ``;``
  (the backslash is dropped).  ``;--`` opens a block comment and ``--;`` closes
  it; they nest (at most 128 deep).  ``;---`` is a plain comment.  A ``--;``
  outside any block comment is a trap: the line is kept whole (``;`` included)
  and Asterisk ignores every following line until the next ``;--``.
* Bytes below 33 (space, tab, CR, other controls) are blanks and are stripped
  from both ends of lines, names and values.
* ``[name]`` starts a section (named up to the first ``]``, unstripped, cut to
  79 bytes; anything after ``]`` that is not ``(`` is ignored).  ``[name](...)``
  takes a comma list: ``!`` makes a template (hidden from modules),
  ``+`` appends to the earlier non-template section of that name (``+filter``, such as
  ``+type=aor``, to the first one whose options match the filter), any other
  item copies the options of the first earlier section (or template) of that
  name, case-insensitively; an empty item copies the very first section.
* ``name = value`` and ``name => value`` (the ``>`` only marks an "object") set
  an option; names and values are stripped of blanks.  A leading ``\\`` escapes
  the first character of the name.  ``name += more`` appends ``more``
  (unstripped on the left) to the value of the last option with exactly that
  name, and stores it in the first option whose name and value match that one
  case-insensitively; with no such option it is a plain ``name = more``.
* ``#include``, ``#tryinclude`` and ``#exec`` (any case) are directives; they
  are reported, never followed.  Unknown ``#words`` are reported too.

Anything Asterisk refuses to load raises :class:`AsteriskSyntaxError` (it drops
the whole file); anything it only warns about is returned as a :class:`Notice`.

Why not ``asterisk.config`` from pyst2: it knows none of escapes, block
comments, templates, inheritance, ``+=`` or directives (``[a](!)`` and
``#include`` raise ``ParseError``), leaves ``=`` values unstripped, splits
lines on CR too, and reads files itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import AsteriskSyntaxError

__all__ = [
    "DIRECTIVES",
    "LINE_MAX_BYTES",
    "MAX_NESTED_COMMENTS",
    "NAME_MAX_BYTES",
    "Directive",
    "Notice",
    "Parsed",
    "Section",
    "parse",
]

#: A line this long or longer (in bytes, without its LF) is skipped by Asterisk.
LINE_MAX_BYTES = 8191
#: Section names are cut to this many bytes.
NAME_MAX_BYTES = 79
#: Deeper nesting of ``;--`` makes Asterisk's loader spin forever; we refuse it.
MAX_NESTED_COMMENTS = 128
#: The directives Asterisk acts on (anything else after ``#`` is ignored with a warning).
DIRECTIVES = ("include", "tryinclude", "exec")

_BOM = b"\xef\xbb\xbf"
_TERMINATOR = "\0"


@dataclass(frozen=True)
class Section:
    """One ``[name]`` section as Asterisk holds it after loading.

    ``options`` are ``(name, value)`` pairs in order, including those copied
    from ``inherits`` (first) and any ``+=`` / ``(+)`` changes.
    """

    name: str
    line: int
    template: bool = False
    inherits: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Directive:
    """A ``#name argument`` line; ``name`` is lower-cased, ``argument`` unquoted (or None)."""

    name: str
    argument: str | None
    line: int

    @property
    def known(self) -> bool:
        """True for the directives Asterisk acts on: include, tryinclude, exec."""
        return self.name in DIRECTIVES


@dataclass(frozen=True)
class Notice:
    """A line Asterisk loads with a warning (usually by ignoring it)."""

    line: int
    message: str
    #: The message quoting nothing from the text (see :attr:`AsteriskSyntaxError.plain`);
    #: empty: the message quotes nothing.
    plain_text: str = ""

    @property
    def plain(self) -> str:
        """The message, quoting nothing from the text."""
        return self.plain_text or self.message


@dataclass(frozen=True)
class Parsed:
    """The result of :func:`parse`: sections (templates included), directives, notices."""

    sections: tuple[Section, ...]
    directives: tuple[Directive, ...]
    notices: tuple[Notice, ...]

    def visible(self) -> tuple[Section, ...]:
        """The sections modules see: every one but templates."""
        return tuple(s for s in self.sections if not s.template)


@dataclass
class _Category:
    name: str
    line: int
    template: bool = False
    inherits: list[str] = field(default_factory=list)
    options: list[list[str]] = field(default_factory=list)


@dataclass
class _State:
    categories: list[_Category] = field(default_factory=list)
    directives: list[Directive] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    current: _Category | None = None
    depth: int = 0


# The work is done on bytes decoded as Latin-1: one character per byte, so
# lengths, "below 33" and "signed char" tests are exactly Asterisk's byte tests.


#: Asterisk's blanks: every byte below 33.
_BLANKS = "".join(map(chr, range(33)))


def _strip(text: str) -> str:
    """Strip Asterisk's blanks (bytes below 33) from both ends."""
    return text.strip(_BLANKS)


def _fold(text: str) -> bytes:
    """ASCII-only case folding, as ``strcasecmp`` does in the C locale."""
    return text.encode("latin-1").lower()


def _decoded(text: str) -> str:
    """Latin-1 work text back to real text (bytes that are not UTF-8 become escapes)."""
    if text.isascii():
        return text
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def _chunk(raw: bytes, pos: int) -> tuple[bytes, int]:
    """What one ``fgets`` into an 8192-byte buffer returns, and where the next starts."""
    limit = min(pos + LINE_MAX_BYTES, len(raw))
    newline = raw.find(b"\n", pos, limit)
    stop = limit if newline < 0 else newline + 1
    return raw[pos:stop], stop


def _visible(chunk: bytes) -> bytes:
    """The part of a chunk C string functions see: up to the first NUL."""
    return chunk.split(b"\0", 1)[0]


def _too_long(text: bytes) -> bool:
    return len(text) == LINE_MAX_BYTES and not text.endswith(b"\n")


def _lines(raw: bytes) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` per physical line; ``None`` for a skipped over-long line."""
    if b"\0" not in raw:
        split = raw.split(b"\n")
        if max(map(len, split)) < LINE_MAX_BYTES:
            # No NUL and no over-long line: each line is simply the text up to its LF
            # (the LF itself, a blank, is left out).
            if split[-1] == b"":
                split.pop()
            if split and split[0].startswith(_BOM):
                split[0] = split[0][len(_BOM) :]
            yield from enumerate(split, 1)
            return
    pos, lineno = 0, 0
    while pos < len(raw):
        lineno += 1
        chunk, pos = _chunk(raw, pos)
        text = _visible(chunk)
        if _too_long(text):
            # The rest of the line is read and dropped, chunk by chunk.
            while pos < len(raw):
                chunk, pos = _chunk(raw, pos)
                rest = _visible(chunk)
                if not _too_long(rest):
                    break
            yield lineno, None
            continue
        if lineno == 1 and text.startswith(_BOM):
            text = text[len(_BOM) :]
        yield lineno, text


def _find(buf: list[str], char: str, start: int) -> int:
    """Index of ``char`` in the C string starting at ``start`` (or of its end for NUL); -1."""
    for i in range(start, len(buf)):
        if buf[i] == char:
            return i
        if buf[i] == _TERMINATOR:
            return -1
    return -1


def _uncomment(line: str, depth: int, lineno: int) -> tuple[str | None, int]:
    """Remove comments from one line, given the block-comment depth before it.

    Returns the text to process (None when the line lies inside a block
    comment) and the depth after it.  The line is handled as Asterisk does, as
    a C string edited in place: a comment start ends the kept text with a NUL,
    and text after a block comment's end is moved up to join it.
    """
    semicolon = line.find(";")
    if semicolon < 0:
        return (line if depth == 0 else None), depth
    if (
        depth == 0
        and line[semicolon - 1 : semicolon] not in ("\\", "-")
        and line[semicolon + 1 : semicolon + 3] != "--"
    ):
        return line[:semicolon], depth  # a plain comment to the end of the line
    buf = [*line, _TERMINATOR]
    start: int | None = 0 if depth == 0 else None
    pos = 0
    while (i := _find(buf, ";", pos)) >= 0:
        if i > pos and buf[i - 1] == "\\":
            del buf[i - 1]  # an escaped ';' is kept, without its backslash
            pos = i
        elif buf[i + 1] == "-" and buf[i + 2] == "-" and buf[i + 3] != "-":
            if depth >= MAX_NESTED_COMMENTS:
                raise AsteriskSyntaxError(lineno, "block comments nested too deep")
            buf[i] = _TERMINATOR
            pos = i + 3
            depth += 1
        elif i >= pos + 2 and buf[i - 1] == "-" and buf[i - 2] == "-":
            # Asterisk does not check that a block comment is open: a stray
            # "--;" makes the depth negative and hides the following lines.
            depth -= 1
            pos = i + 1
            if depth == 0:
                if start is None:
                    start = pos
                else:
                    end = _find(buf, _TERMINATOR, start)
                    buf[end:] = buf[pos:]
                    pos = end
        elif depth == 0:
            buf[i] = _TERMINATOR
            pos = i
        else:
            pos = i + 1
    if start is None:
        return None, depth
    return "".join(buf[start : _find(buf, _TERMINATOR, start)]), depth


def _first_category(state: _State, name: str, *, templates: bool) -> _Category | None:
    """The first section named ``name`` (any name when empty), case-insensitively."""
    wanted = _fold(name)
    for cat in state.categories:
        if name and _fold(cat.name) != wanted:
            continue
        if templates or not cat.template:
            return cat
    return None


def _split_quoted(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` as ``ast_strsep`` with ``AST_STRSEP_STRIP`` splits it: not
    inside quotes nor right after a backslash; each piece stripped of blanks and of one
    pair of surrounding quotes."""
    pieces, start, quotes, i = [], 0, "", 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char in "'\"":
            quotes = quotes[:-1] if quotes.endswith(char) else quotes + char
        elif char == sep and not quotes:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return [_unquote(_strip(piece)) for piece in pieces]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]:
        return text[1:-1]
    return text


def _search(pattern: str, text: str) -> bool | None:
    """Whether the regular expression ``pattern`` occurs in ``text``; None if it is no
    regular expression.  Asterisk uses POSIX extended expressions; Python's agree on
    everything a filter is written with (``type=aor``, ``default_.*=36[0-9]+``)."""
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return None


def _expression_matches(cat: _Category, expression: str) -> tuple[bool, bool]:
    """``(matched, templates allowed)`` for one ``name=value`` expression of a filter."""
    parts = _split_quoted(expression, "=")
    if len(parts) < 2:
        return False, False  # no '=': Asterisk stops reading the filter, which then fails
    name, value = parts[0], parts[1]
    if name == "TEMPLATES":
        if value.lower() == "include":
            return True, cat.template
        return value.lower() == "restrict" and cat.template, cat.template
    for opt_name, opt_value in cat.options:
        if _search(name, opt_name) and _search(value, opt_value):
            return True, False
    return False, False


def _filter_matches(cat: _Category, filter_text: str) -> bool:
    """Asterisk's ``does_category_match`` for the filter of a ``(+filter)`` addition: every
    ``&``-joined ``name=value`` expression (both regular expressions, searched in an
    option's name and value) matches one option, and a template only with
    ``TEMPLATES=include`` (or ``restrict``)."""
    if not filter_text:
        return not cat.template
    templates_ok = False
    for expression in _split_quoted(filter_text, "&"):
        matched, allowed = _expression_matches(cat, expression)
        if not matched:
            return False
        templates_ok |= allowed
    return not cat.template or templates_ok


def _addition_target(state: _State, name: str, filter_text: str) -> _Category | None:
    """The section ``[name](+filter)`` adds to: the first of that name (case-insensitively)
    that ``filter_text`` matches."""
    wanted = _fold(name)
    for cat in state.categories:
        if (not name or _fold(cat.name) == wanted) and _filter_matches(cat, filter_text):
            return cat
    return None


def _section_header(state: _State, text: str, lineno: int) -> None:
    close = text.find("]")
    if close < 0:
        raise AsteriskSyntaxError(lineno, "section header has no closing ']'")
    name = text[1:close][:NAME_MAX_BYTES]
    new: _Category | None = _Category(name, lineno)
    current = new
    assert current is not None
    rest = text[close + 1 :]
    if rest.startswith("("):
        end = rest.find(")")
        if end < 0:
            raise AsteriskSyntaxError(lineno, "section header has no closing ')'")
        for item in rest[1:end].split(","):
            if item == "!":
                current.template = True
            elif item.startswith("+"):
                found = _addition_target(state, name, item[1:])
                if found is None:
                    raise AsteriskSyntaxError(
                        lineno,
                        f"addition to section {_decoded(name)!r}, which does not exist",
                        "addition to a section that does not exist",
                    )
                if new is not None:
                    found.template |= new.template
                    found.options.extend(new.options)
                    new = None
                current = found
            else:
                base = _first_category(state, item, templates=True)
                if base is None:
                    raise AsteriskSyntaxError(
                        lineno,
                        f"inheritance from section {_decoded(item)!r}, which does not exist",
                        "inheritance from a section that does not exist",
                    )
                copies = [[n, v] for n, v in base.options]  # base may be current itself
                current.inherits.append(base.name)
                current.options.extend(copies)
    if new is not None:
        state.categories.append(new)
    state.current = current


def _directive(state: _State, text: str, lineno: int) -> None:
    body = text[1:]
    end = 0
    # The word ends at a blank or, char being signed, at a byte of 128 or more.
    while end < len(body) and "!" <= body[end] < "\x80":
        end += 1
    word = body[:end]
    argument: str | None = _strip(body[end + 1 :]) if end < len(body) else None
    if not argument:
        argument = None
    name = _fold(word).decode("latin-1")
    if name not in DIRECTIVES:
        state.notices.append(
            Notice(
                lineno,
                f"unknown directive '#{_decoded(word)}' (ignored)",
                "unknown directive (ignored)",
            )
        )
    elif argument is None:
        state.notices.append(Notice(lineno, f"directive '#{name}' has no argument (ignored)"))
    if argument is not None and argument[0] in '"<':
        closer = '"' if argument[0] == '"' else ">"
        if argument.endswith(closer):
            argument = argument[1:-1]
    state.directives.append(
        Directive(_decoded(name), None if argument is None else _decoded(argument), lineno)
    )


def _add_option(state: _State, cat: _Category, name: str, value: str, lineno: int) -> None:
    if not name:
        state.notices.append(Notice(lineno, "option without a name (ignored)"))
        return
    cat.options.append([name, value])


def _append_option(state: _State, cat: _Category, name: str, more: str, lineno: int) -> None:
    """``name += more``: see the module docstring for Asterisk's exact rule."""
    last = next((opt for opt in reversed(cat.options) if opt[0] == name), None)
    if last is None:
        _add_option(state, cat, name, _strip(more), lineno)
        return
    old_name, old_value = last
    joined = _strip(old_value + more)
    for opt in cat.options:
        if _fold(opt[0]) == _fold(old_name) and (
            not old_value or _fold(opt[1]) == _fold(old_value)
        ):
            opt[0], opt[1] = old_name, joined
            return


def _option(state: _State, text: str, lineno: int) -> None:
    cat = state.current
    if cat is None:
        raise AsteriskSyntaxError(lineno, "option outside any section")
    escaped = text.startswith("\\")
    body = text[1:] if escaped else text
    if escaped and (not body or body[0] < "!" or body[0] >= "\x80"):
        raise AsteriskSyntaxError(lineno, "invalid escape at the start of the line")
    skip = 1 if escaped else 0
    eq = body.find("=", skip)
    if eq < 0:
        state.notices.append(Notice(lineno, "line without '=' (ignored)"))
    elif eq > skip and body[eq - 1] == "+":
        _append_option(state, cat, _strip(body[: eq - 1]), body[eq + 1 :], lineno)
    else:
        value = body[eq + 1 :]
        if value.startswith(">"):
            value = value[1:]
        _add_option(state, cat, _strip(body[:eq]), _strip(value), lineno)


def _process(state: _State, text: str, lineno: int) -> None:
    if text.startswith("["):
        _section_header(state, text, lineno)
    elif text.startswith("#"):
        _directive(state, text, lineno)
    else:
        _option(state, text, lineno)


def _result(state: _State) -> Parsed:
    sections = tuple(
        Section(
            name=_decoded(cat.name),
            line=cat.line,
            template=cat.template,
            inherits=tuple(_decoded(n) for n in cat.inherits),
            options=tuple((_decoded(n), _decoded(v)) for n, v in cat.options),
        )
        for cat in state.categories
    )
    return Parsed(sections, tuple(state.directives), tuple(state.notices))


def parse(data: bytes | str) -> Parsed:
    """Parse one Asterisk config file's content; text is taken as its UTF-8 encoding.

    Raises :class:`AsteriskSyntaxError` where Asterisk would refuse the whole file.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    state = _State()
    for lineno, line in _lines(raw):
        if line is None:
            state.notices.append(Notice(lineno, f"line of {LINE_MAX_BYTES}+ bytes (skipped)"))
            continue
        kept, state.depth = _uncomment(line.decode("latin-1"), state.depth, lineno)
        if kept is None:
            continue
        text = _strip(kept)
        if text:
            _process(state, text, lineno)
    if state.depth > 0:
        state.notices.append(Notice(0, "unterminated block comment"))
    elif state.depth < 0:
        state.notices.append(Notice(0, "stray '--;' hid the lines after it"))
    return _result(state)
