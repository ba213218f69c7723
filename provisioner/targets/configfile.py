"""The config-file target: every user's endpoint, auth and AOR in one ``pjsip_users.conf``.

The file is rendered from Jinja2 templates (``templates/pjsip/``, each piece
overridable from the ``target.templates`` directory), parsed back with
:mod:`provisioner.asterisk_conf` and written only if it holds exactly the
intended sections and options and no directive.  The parse-back check has a
sound fast path: a text that is a directive-free, section-free header followed
by exactly the canonical ``[id]`` / ``type=`` / ``key=value`` lines of every
user, each id, option name and value made only of characters Asterisk's loader
takes literally, is what the parser would accept; anything else (an override
changing the layout, an odd value) is parsed in full.  The write is atomic (temporary
file, fsync, ``os.replace``, fsync of the directory) and keeps the previous
file as ``<name>.bak``.  Unchanged bytes are not written at all, so the file's
mtime only moves when Asterisk has something new to reload.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import heapq
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import jinja2

from ..asterisk_conf import LINE_MAX_BYTES, Parsed, Section, parse
from ..errors import (
    AsteriskSyntaxError,
    ConfigError,
    Problem,
    RenderCheckFailed,
    TargetWriteFailed,
)
from ..pjsip import Options, UserObjects, auth_id
from . import Change

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "FILE_MODE",
    "MAIN_TEMPLATE",
    "SHIPPED_TEMPLATES",
    "ConfigFileTarget",
    "canonical_chunk",
    "check_rendered",
]


def _shipped_templates() -> Path:
    """``templates/pjsip`` at the top of a source tree or checkout (editable install),
    else where a wheel installs it (``<prefix>/share/provisioner/templates/pjsip``)."""
    source = Path(__file__).resolve().parents[2] / "templates" / "pjsip"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "provisioner" / "templates" / "pjsip"


#: The shipped templates.
SHIPPED_TEMPLATES = _shipped_templates()
MAIN_TEMPLATE = "pjsip_users.conf.j2"
#: Asterisk (group) reads the file; digests make it unfit for everyone to read.
FILE_MODE = 0o640
#: Auth options whose values are credentials: never shown in diffs or messages.
SECRET_OPTIONS = frozenset({"md5_cred", "password_digest", "password"})

#: One intended section: (name, type, options after ``type``).
_Intended = tuple[str, str, Options]


def _intended(objects: Sequence[UserObjects]) -> list[_Intended]:
    return [section for user in objects for section in user.sections()]


def _describe(index: int, section: _Intended | Section) -> str:
    """A section's position and name for a message (never an option value)."""
    name = section[0] if isinstance(section, tuple) else section.name
    return f"section {index + 1} [{name}]"


def _section_problem(index: int, want: _Intended, got: Section) -> str | None:
    name, kind, options = want
    if got.name != name:
        return f"{_describe(index, want)} came out as [{got.name}]"
    if got.template or got.inherits:
        return f"{_describe(index, want)} came out as a template or with inheritance"
    expected = (("type", kind), *options)
    if got.options == expected:
        return None
    got_names = [n for n, _ in got.options]
    want_names = [n for n, _ in expected]
    if got_names != want_names:
        return (
            f"{_describe(index, want)} has options {', '.join(got_names)} "
            f"instead of {', '.join(want_names)}"
        )
    wrong = [n for (n, v), (_, w) in zip(got.options, expected, strict=True) if v != w]
    # Only names: the values of an auth section are credentials.
    return f"{_describe(index, want)} has wrong values for {', '.join(wrong)}"


def _parse_problems(parsed: Parsed, intended: list[_Intended]) -> list[str]:
    problems = [f"line {d.line} holds a #{d.name} directive" for d in parsed.directives]
    problems += [f"line {n.line}: {n.message}" for n in parsed.notices]
    got = parsed.sections
    for index, (want, section) in enumerate(zip(intended, got, strict=False)):
        if (problem := _section_problem(index, want, section)) is not None:
            problems.append(problem)
    if len(got) != len(intended):
        problems.append(f"{len(got)} sections came out instead of {len(intended)}")
    return problems


def check_rendered(data: bytes, objects: Sequence[UserObjects]) -> None:
    """Raise :class:`RenderCheckFailed` unless ``data``, read as Asterisk reads it, holds
    exactly the sections of ``objects`` (names, types, options and values, in order) and
    no directive, template, inheritance or ignored line."""
    try:
        parsed = parse(data)
    except AsteriskSyntaxError as exc:
        raise RenderCheckFailed(f"the rendered file would not load: {exc.message}") from None
    _raise_problems(_parse_problems(parsed, _intended(objects)))


#: What the fast path accepts without parsing: characters Asterisk's loader takes
#: literally in a section name, an option name and a value (no comment, escape,
#: section, directive, object or append mark, no blank at either end, no control).
_PLAIN_ID = re.compile(r"[A-Za-z0-9._@+-]{1,79}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")
#: Controls but LF, C1 controls, surrogates, comment and escape marks: never in plain text.
_ODD_CHAR = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff;\\]")
#: The ASCII bytes _ODD_CHAR lets through.
_PLAIN_ASCII = bytes(b for b in range(128) if not _ODD_CHAR.match(chr(b)))
#: A value starting with a blank or '>' or ending with a blank (in a plain line the first
#: '=' ends the name); also refused (harmlessly) inside a value.
_ODD_EDGES = ("= ", "=>", " \n")
#: Below this many characters no line can reach Asterisk's 8191-byte limit (4 bytes each).
_SHORT = 2000
#: Option names and types already found plain (a few dozen in practice; bounded).
_plain_names: set[str] = set()


def _plain_name(name: str) -> bool:
    if name in _plain_names:
        return True
    if not _PLAIN_NAME.fullmatch(name):
        return False
    if len(_plain_names) < 1000:
        _plain_names.add(name)
    return True


def canonical_chunk(user: UserObjects) -> str | None:
    """The shipped templates' text for one user (each section: a blank line, ``[id]``,
    ``type=<type>``, ``key=value`` per option), or None when some id, name or value holds
    a character the fast path leaves to the parser.

    Lines of this text, after a header that leaves no block comment open, parse to
    exactly ``user.sections()``: nothing in them is a comment, escape, directive,
    template, inheritance, ``+=`` or ``=>`` mark, blank to strip or over-long line.
    Checked on the whole text: as many LFs as lines means no id, name or value holds
    one, so each line is one ``[id]`` (a plain id) or one ``name=value`` (a plain name,
    so its first ``=`` ends the name); then no odd character anywhere and no value
    starting with a blank or ``>`` or ending with a blank.
    """
    parts: list[str] = []
    lines = 0
    for name, kind, options in user.sections():
        if not (_PLAIN_ID.fullmatch(name) and _plain_name(kind)):
            return None
        # dict(options) iterates the names in C; a new name is looked at one by one.
        if not _plain_names.issuperset(dict(options)) and not all(
            _plain_name(key) for key, _ in options
        ):
            return None
        parts.append(f"\n[{name}]\ntype={kind}\n")
        parts += [f"{key}={value}\n" for key, value in options]
        lines += 3 + len(options)
    text = "".join(parts)
    if text.count("\n") != lines or any(e in text for e in _ODD_EDGES):
        return None
    if text.isascii():
        if text.encode("ascii").translate(None, _PLAIN_ASCII):
            return None  # bytes.translate deleting every plain byte: fast, in C
    elif _ODD_CHAR.search(text):
        return None
    if len(text) >= _SHORT and max(map(len, text.split("\n"))) * 4 >= LINE_MAX_BYTES:
        return None
    return text


#: The templates laying out the users; while none is overridden or edited,
#: :meth:`ConfigFileTarget.render_text` writes their output directly.
_LAYOUT_TEMPLATES = {
    MAIN_TEMPLATE: "3e2ad2bb84bb747dfaa676e6983f95caec347208b7ceb7f2c83eae10bc14f0fc",
    "user.j2": "2d077af1fb7e2637c2b64afa544a27914421283a8fd88f85170efabff745e28f",
    "section.j2": "2bb7ac5b9e52ee9c782cc1a798c1bc82ff68c2b40d8bf6c7b0a83ddaaabd17ac",
}


def _is_shipped(searched: list[Path], name: str) -> bool:
    """True when the loader finds ``name`` in the shipped directory, with the known content."""
    for directory in searched:
        path = directory / name
        if path.exists():
            if directory != SHIPPED_TEMPLATES:
                return False
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                return False
            return digest == _LAYOUT_TEMPLATES[name]
    return False


def _plain_header(header: str) -> bool:
    """True when ``header`` parses to nothing at all: no section, directive or notice
    (so no block comment is left open and no later line is hidden)."""
    try:
        parsed = parse(header.encode("utf-8"))
    except AsteriskSyntaxError:
        return False
    return not (parsed.sections or parsed.directives or parsed.notices)


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise RenderCheckFailed(
            "the rendered file does not hold exactly the intended objects: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class _Verified:
    """Bytes that passed :func:`check_rendered` for these intended sections."""

    data: bytes
    intended: list[_Intended]
    #: No two intended sections share a (type, name): each user's three objects are its own.
    distinct: bool = False


def _read(path: Path) -> bytes | None:
    """The bytes of the file at ``path``; None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TargetWriteFailed(f"cannot read {str(path)!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class _Current:
    """The file as it is now: its bytes (None when absent) and the objects it holds."""

    data: bytes | None
    objects: dict[tuple[str, str], Options]
    endpoints: tuple[str, ...]

    @classmethod
    def read(cls, path: Path, *known: _Verified | None) -> _Current:
        """The file at ``path``; not parsed again when it holds one of the ``known`` bytes."""
        return cls.of_bytes(_read(path), *known)

    @classmethod
    def of_bytes(cls, data: bytes | None, *known: _Verified | None) -> _Current:
        """The file holding ``data`` (None: absent); not parsed when it is ``known``."""
        if data is None:
            return cls(None, {}, ())
        for verified in known:
            if verified is not None and verified.data == data:
                return cls.verified(data, verified.intended)
        return cls.of(data)

    @classmethod
    def verified(cls, data: bytes, intended: list[_Intended]) -> _Current:
        """The file ``data``, known (by :func:`check_rendered`) to hold exactly ``intended``:
        what :meth:`of` would find, without parsing it again."""
        objects: dict[tuple[str, str], Options] = {}
        endpoints: list[str] = []
        for name, kind, options in intended:
            objects[(kind, name)] = options
            if kind == "endpoint":
                endpoints.append(name)
        return cls(data, objects, tuple(dict.fromkeys(endpoints)))

    @classmethod
    def of(cls, data: bytes) -> _Current:
        try:
            sections = parse(data).visible()
        except AsteriskSyntaxError:
            # A broken file is simply replaced; everything in the new one counts as added.
            sections = ()
        objects: dict[tuple[str, str], Options] = {}
        endpoints: list[str] = []
        for section in sections:
            options = section.options
            if not options or options[0][0] != "type":
                continue
            kind = options[0][1]
            objects[(kind, section.name)] = options[1:]
            if kind == "endpoint":
                endpoints.append(section.name)
        return cls(data, objects, tuple(dict.fromkeys(endpoints)))


def _compare(current: _Current, objects: Sequence[UserObjects]) -> Change:
    added: list[str] = []
    updated: list[str] = []
    changed: list[tuple[str, str]] = []
    unchanged = 0
    for user in objects:
        kinds = [(kind, name, options) for name, kind, options in user.sections()]
        differing = [(k, n) for k, n, o in kinds if current.objects.get((k, n)) != o]
        if ("endpoint", user.endpoint_id) not in current.objects:
            added.append(user.endpoint_id)
        elif differing:
            updated.append(user.endpoint_id)
        else:
            unchanged += 1
        changed += differing
    wanted = {user.endpoint_id for user in objects}
    wanted_objects = {(k, n) for user in objects for n, k, _ in user.sections()}
    removed = [e for e in current.endpoints if e not in wanted]
    changed += [key for key in current.objects if key not in wanted_objects]
    return Change(
        added=tuple(added),
        updated=tuple(updated),
        removed=tuple(removed),
        unchanged=unchanged,
        changed_objects=tuple(dict.fromkeys(changed)),
    )


_SECTION_LINE = re.compile(r"\s*\[([^\]]*)\]")
_OPTION_LINE = re.compile(r"(\s*([A-Za-z0-9_]+)\s*=>?\s*)(.*)")


def _lines(text: str) -> list[str]:
    """Lines split at LF only, as Asterisk splits them (not at CR, VT, U+2028, ...)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _redacted(lines: list[str], others: dict[tuple[str, str], str], section: str = "") -> list[str]:
    """``lines`` (the first in ``section``) with credential values replaced; ``<changed>``
    marks one that differs from the same option of the same section in ``others``."""
    out: list[str] = []
    for line in lines:
        if m := _SECTION_LINE.match(line):
            section = m.group(1)
        m = _OPTION_LINE.match(line.rstrip("\n"))
        if m and m.group(2) in SECRET_OPTIONS:
            value = m.group(3)
            mark = "" if others.get((section, m.group(2))) == value else " <changed>"
            line = f"{m.group(1)}<redacted>{mark}" + ("\n" if line.endswith("\n") else "")
        out.append(line)
    return out


def _secrets(lines: list[str]) -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    section = ""
    for line in lines:
        if m := _SECTION_LINE.match(line):
            section = m.group(1)
        m = _OPTION_LINE.match(line.rstrip("\n"))
        if m and m.group(2) in SECRET_OPTIONS:
            found[(section, m.group(2))] = m.group(3)
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


def _diff(path: Path, old: bytes | None, new: str) -> str:
    """A unified diff of the file, with credentials redacted: the text
    ``difflib.unified_diff`` gives, computed without running difflib over the lines
    both versions share at their start and end (one changed user in a large file
    costs little)."""
    if old is not None and old == new.encode("utf-8"):
        return ""
    a = _lines(old.decode("utf-8", "replace")) if old is not None else []
    b = _lines(new)
    groups = list(_grouped(_opcodes(a, b)))
    if not groups:
        return ""
    # Only the lines shown are redacted; a changed secret is found against all old ones.
    lo = min(g[0][1] for g in groups), min(g[0][3] for g in groups)
    hi = max(g[-1][2] for g in groups), max(g[-1][4] for g in groups)
    old_shown = _redacted(a[lo[0] : hi[0]], {}, _section_at(a, lo[0]))
    new_shown = _redacted(b[lo[1] : hi[1]], _secrets(a), _section_at(b, lo[1]))
    # An unchanged secret is shown the same on both sides, so it drops out of the diff.
    old_shown = [line.replace(" <changed>", "") for line in old_shown]
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


@contextlib.contextmanager
def _temporary(directory: Path, name: str) -> Iterator[Path]:
    """A new empty file in ``directory``; removed on exit unless it was renamed away."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


#: A temporary file older than this was left by a writer that died (SIGKILL, power loss).
STALE_TEMP_SECONDS = 300.0


def _remove_stale_temporaries(path: Path, now: float | None = None) -> list[Path]:
    """Delete temporary files of ``path`` that a killed writer left behind; return them.

    Only files named like :func:`_temporary` makes them and older than
    :data:`STALE_TEMP_SECONDS`, so a concurrent writer's live file is never touched.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - candidate.stat().st_mtime > STALE_TEMP_SECONDS:
                candidate.unlink()
                removed.append(candidate)
    return removed


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_backup(path: Path, backup: Path) -> None:
    """Make ``backup`` the current ``path`` (a hard link, else a copy), replacing it atomically."""
    with _temporary(path.parent, backup.name) as temp:
        temp.unlink()
        try:
            os.link(path, temp)
        except OSError:
            # No hard links here (some network or FUSE file systems): copy instead.
            shutil.copy2(path, temp)
        os.replace(temp, backup)


def _replace_file(path: Path, data: bytes, *, backup: bool) -> None:
    """Atomically make ``path`` hold ``data``, keeping the old file as ``<name>.bak``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary(path.parent, path.name) as temp:
        _write_synced(temp, data)
        if backup:
            _keep_backup(path, path.with_name(path.name + ".bak"))
        os.replace(temp, path)
    _fsync_directory(path.parent)


class ConfigFileTarget:
    """Writes all users' PJSIP objects to one config file (see the module docstring)."""

    def __init__(self, path: Path, templates_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.templates_dir = templates_dir
        if templates_dir is not None and not templates_dir.is_dir():
            raise ConfigError(
                [Problem("target.templates", f"{str(templates_dir)!r} is not a directory")]
            )
        #: The last bytes that passed the parse-back check, and what they hold.
        self._verified: _Verified | None = None
        #: canonical_chunk of the users last checked (only those: it never grows stale).
        self._chunks: dict[UserObjects, str | None] = {}
        self._searched = [
            *([templates_dir] if templates_dir is not None else []),
            SHIPPED_TEMPLATES,
        ]
        self._stamp = self._template_stamp()
        self._rebuild()
        _remove_stale_temporaries(self.path)

    def _rebuild(self) -> None:
        """A new Environment; direct rendering only while the layout templates are ours."""
        self._env = self._environment()
        self._direct = all(_is_shipped(self._searched, name) for name in _LAYOUT_TEMPLATES)

    def _environment(self) -> jinja2.Environment:
        return jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(d) for d in self._searched]),
            undefined=jinja2.StrictUndefined,
            # A config file, not HTML: escaping would corrupt it; check_rendered guards it.
            autoescape=False,  # noqa: S701
            keep_trailing_newline=True,
            # Not a stat per get_template: _fresh_environment looks once per render.
            auto_reload=False,
        )

    def _template_stamp(self) -> tuple[tuple[str, int, int], ...]:
        """Name, mtime and size of every file in the template directories."""
        stamp: list[tuple[str, int, int]] = []
        for directory in self._searched:
            with contextlib.suppress(OSError), os.scandir(directory) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        info = entry.stat()
                        stamp.append((entry.path, info.st_mtime_ns, info.st_size))
        return tuple(sorted(stamp))

    def reload_templates(self) -> None:
        """Read the templates afresh at the next render (also done by itself whenever a
        file in the template directories is added, removed or modified)."""
        self._stamp = self._template_stamp()
        self._rebuild()

    def _fresh_environment(self) -> jinja2.Environment:
        """The Environment, rebuilt first when the template files changed since the last look."""
        stamp = self._template_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._rebuild()
        return self._env

    @classmethod
    def from_config(cls, config: Config) -> ConfigFileTarget:
        """The target configured by ``target.path`` and ``target.templates`` (empty: none)."""
        templates = config.target.templates
        return cls(Path(config.target.path), Path(templates) if templates else None)

    def render_text(self, objects: Sequence[UserObjects]) -> str:
        """The file's text for ``objects``, in their order; pure (templates aside)."""
        try:
            env = self._fresh_environment()
            users = list(objects)
            chunks = self._chunks_of(users) if self._direct else [None]
            if None in chunks:
                return env.get_template(MAIN_TEMPLATE).render(users=users)
            # The shipped layout, unchanged, renders exactly the canonical chunks (tested):
            # only the header goes through Jinja, and each user's text is cached.
            header = env.get_template("header.j2").render(users=users)
            return header + "".join(cast(list[str], chunks))
        except jinja2.TemplateSyntaxError as exc:
            where = f"{exc.name or exc.filename or '?'} line {exc.lineno}"
            raise RenderCheckFailed(f"template {where}: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderCheckFailed(f"template {exc.name!r} not found") from None
        except jinja2.TemplateError as exc:
            # Not the message: it could quote a value.
            raise RenderCheckFailed(f"templates failed to render ({type(exc).__name__})") from None

    def _desired(
        self, objects: Sequence[UserObjects], keep: Collection[str]
    ) -> tuple[_Current | None, list[UserObjects], str]:
        """The current file (None: not needed to find the kept users, not read yet), the
        objects the new file must hold (``objects`` plus the kept users' current objects)
        and its text."""
        if not keep:
            return None, list(objects), self.render_text(objects)
        current = _Current.read(self.path, self._verified)
        desired = _with_kept(objects, _kept_objects(current, keep, objects))
        return current, desired, self.render_text(desired)

    def plan(
        self, objects: Sequence[UserObjects], *, keep: Collection[str] = (), verify: bool = False
    ) -> Change:
        """What :meth:`apply` would change, with a unified diff (credentials redacted);
        writes nothing.  ``keep``: endpoint ids whose current objects stay as they are."""
        current, desired, text = self._desired(objects, keep)
        if current is None:
            current = _Current.read(self.path, self._verified)
        return replace(_compare(current, desired), diff=_diff(self.path, current.data, text))

    def _check(self, data: bytes, text: str, desired: list[UserObjects]) -> _Verified:
        """:func:`check_rendered`, skipped for the bytes last verified for the same objects
        and taken by the fast path (see the module docstring) where it applies.  Returns
        what was verified."""
        intended = _intended(desired)
        known = self._verified
        if known is not None and known.data == data and known.intended == intended:
            return known
        if not self._canonical(text, desired):
            check_rendered(data, desired)
        distinct = len({(kind, name) for name, kind, _ in intended}) == len(intended)
        self._verified = _Verified(data, intended, distinct)
        return self._verified

    def _chunks_of(self, users: list[UserObjects]) -> list[str | None]:
        """:func:`canonical_chunk` of each user, cached for the users of the last call."""
        cache = self._chunks
        chunks = [cache[u] if u in cache else canonical_chunk(u) for u in users]
        self._chunks = dict(zip(users, chunks, strict=True))
        return chunks

    def _canonical(self, text: str, desired: list[UserObjects]) -> bool:
        """True when ``text`` is a plain header followed by every user's canonical chunk."""
        chunks = self._chunks_of(desired)
        if None in chunks:
            return False
        tail = "".join(cast(list[str], chunks))
        return text.endswith(tail) and _plain_header(text[: len(text) - len(tail)])

    def apply(
        self,
        objects: Sequence[UserObjects],
        *,
        keep: Collection[str] = (),
        guard: Callable[[Change], None] | None = None,
        verify: bool = False,
    ) -> Change:
        """Render, check and atomically write the file holding ``objects`` and the current
        objects of the ``keep`` endpoint ids.

        ``guard`` sees the change first and may raise to abort.  Nothing is written when
        the bytes are unchanged, the guard raises or the check fails
        (:class:`RenderCheckFailed`).  The change has no diff (only :meth:`plan` makes one).
        """
        previous = self._verified
        current, desired, text = self._desired(objects, keep)
        data = text.encode("utf-8")
        verified = self._check(data, text, desired)
        if current is None:
            # Read after the check: a file holding the bytes verified now or at the last
            # apply (the usual case: the file as we wrote it) is not parsed.
            old = _read(self.path)
            if old == data and verified.distinct:
                # The file holds the verified bytes, three distinct objects per user:
                # nothing is added, updated or removed (what _compare finds, quicker).
                change = Change(unchanged=len(desired))
                if guard is not None:
                    guard(change)
                return change
            current = _Current.of_bytes(old, verified, previous)
        change = _compare(current, desired)
        if guard is not None:
            guard(change)
        if current.data == data:
            return change
        try:
            _replace_file(self.path, data, backup=current.data is not None)
        except OSError as exc:
            raise TargetWriteFailed(f"cannot write {str(self.path)!r}: {exc.strerror}") from None
        return replace(change, wrote=True)


def _kept_objects(
    current: _Current, keep: Collection[str], objects: Sequence[UserObjects]
) -> list[UserObjects]:
    """The current objects of each kept endpoint id that is not rendered anew.

    A kept user is found by its endpoint section and the ``auth`` and ``aors`` it
    names; one whose three objects are not all in the file has nothing to keep.
    """
    rendered = {user.endpoint_id for user in objects}
    kept: list[UserObjects] = []
    for endpoint_id in dict.fromkeys(keep):
        endpoint = current.objects.get(("endpoint", endpoint_id))
        if endpoint_id in rendered or endpoint is None:
            continue
        named = dict(endpoint)
        auth_name = named.get("auth", auth_id(endpoint_id))
        aor_name = named.get("aors", endpoint_id)
        auth = current.objects.get(("auth", auth_name))
        aor = current.objects.get(("aor", aor_name))
        if auth is None or aor is None:
            continue
        kept.append(
            UserObjects(
                username=dict(auth).get("username", ""),
                endpoint_id=endpoint_id,
                endpoint=endpoint,
                auth_id=auth_name,
                auth=auth,
                aor_id=aor_name,
                aor=aor,
            )
        )
    return kept


def _order(user: UserObjects) -> tuple[int, str]:
    """render_all's order: by extension length, then extension."""
    return (len(user.endpoint_id), user.endpoint_id)


def _with_kept(objects: Sequence[UserObjects], kept: list[UserObjects]) -> list[UserObjects]:
    """``objects`` in their order, with the kept users merged in where render_all puts them."""
    if not kept:
        return list(objects)
    return list(heapq.merge(objects, sorted(kept, key=_order), key=_order))
