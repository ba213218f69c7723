"""The site's ``pjsip.conf`` around the config-file target: whether it reaches the target
by ``#include``, and which endpoints, auths and AORs its own sections define that the
target defines too.

Why it matters: Asterisk's config wizard (``res_sorcery_config``) refuses a type's whole
configuration when two sections define the same object of that type ("configuration
contains a duplicate object") and keeps what it had: from then on no reload adds,
changes or removes an endpoint (a disabled user's phone keeps working), and at the next
start of Asterisk none is loaded at all.  A site that ran ``import pjsip`` and kept the
hand-written sections it imported is in exactly that state once it includes the target.

Files are read as Asterisk reads them (:func:`~provisioner.asterisk_conf.parse`), one at a
time: a template inherited from another file is not followed, so a section whose
``type=`` comes only from such a template is not counted (a rare layout).  ``#include``
and ``#tryinclude`` are followed (a relative path against the including file's
directory, as Asterisk's own config directory holds ``pjsip.conf``; wildcards as glob
patterns), at most :data:`MAX_DEPTH` deep; ``#exec`` output cannot be known and is said
as unread.  Pure but for reading files; nothing here writes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..asterisk_conf import parse
from ..errors import AsteriskSyntaxError

__all__ = ["Defined", "SiteFiles", "duplicates", "read_site", "target_objects"]

#: The object types the target writes, as ``type=`` names them.
OBJECT_TYPES = frozenset({"endpoint", "aor", "auth"})
#: How deep ``#include`` is followed (Asterisk itself stops loops by its own means).
MAX_DEPTH = 8


@dataclass(frozen=True)
class Defined:
    """An object a section defines: its type, its id, and where (file and line)."""

    type: str
    name: str
    file: str
    line: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.name)


@dataclass
class SiteFiles:
    """What a walk from one file through its includes found."""

    #: Whether an include led to the target file (never read as the site's own).
    reaches_target: bool = False
    #: The endpoints, auths and AORs the walked files define, in file and line order.
    defined: list[Defined] = field(default_factory=list)
    #: Files (or ``#exec`` lines) that could not be read, each with the reason.
    unread: list[str] = field(default_factory=list)
    #: Why the first file itself could not be read (None: it was read).
    root_unread: str | None = None


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (by inode where both exist, else by path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _included(base: Path, argument: str) -> list[Path]:
    """The files an ``#include`` of ``argument`` in a file of directory ``base`` reads:
    a relative path against ``base``, a wildcard as a glob (sorted, as Asterisk's glob
    sorts them); a path without a match is itself (read, and said unread when absent)."""
    path = Path(argument) if os.path.isabs(argument) else base / argument
    if glob.has_magic(str(path)):
        return [Path(p) for p in sorted(glob.glob(str(path)))]
    return [path]


def _sections(path: Path, data: bytes) -> Iterator[Defined]:
    """The objects of the types in :data:`OBJECT_TYPES` the text ``data`` of ``path``
    defines: each non-template section's first ``type=`` (an inherited one first)."""
    for section in parse(data).visible():
        kind = next((value for name, value in section.options if name == "type"), None)
        if kind in OBJECT_TYPES:
            yield Defined(kind, section.name, str(path), section.line)


def _unread(found: SiteFiles, why: str, depth: int) -> None:
    """Note a file not read (the first one's reason apart, at depth 0)."""
    found.unread.append(why)
    if depth == 0:
        found.root_unread = why


def _walk(path: Path, target: Path | None, found: SiteFiles, depth: int, seen: set[str]) -> None:
    """Read ``path`` into ``found``, then the files it includes (the target, when met,
    only marked as reached)."""
    if target is not None and _same_file(path, target):
        found.reaches_target = True
        return
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    try:
        data = path.read_bytes()
        parsed = parse(data)
        found.defined.extend(_sections(path, data))
    except OSError as exc:
        _unread(found, f"{path}: {exc.strerror or exc}", depth)
        return
    except AsteriskSyntaxError as exc:
        _unread(found, f"{path}: line {exc.line}: {exc.plain} (Asterisk refuses the file)", depth)
        return
    for directive in parsed.directives:
        if directive.name == "exec":
            found.unread.append(f"{path} line {directive.line}: #exec (its output is not known)")
        elif directive.name in ("include", "tryinclude") and directive.argument:
            if depth >= MAX_DEPTH:
                found.unread.append(f"{path} line {directive.line}: includes nested too deep")
                continue
            for included in _included(path.parent, directive.argument):
                if directive.name == "tryinclude" and not included.exists():
                    continue  # Asterisk goes on without it, and so does the walk
                _walk(included, target, found, depth + 1, seen)


def read_site(pjsip_conf: Path, target: Path) -> SiteFiles:
    """Walk the site's ``pjsip_conf`` and what it includes, the ``target`` file (and its
    shards) left out: whether it is reached, and what the site's own files define."""
    found = SiteFiles()
    _walk(pjsip_conf, target, found, 0, set())
    return found


#: A section of the target as provisioner writes it: its header, then ``type=`` first.
_TARGET_SECTION = re.compile(rb"^\[([^\]\n]+)\]\n(?:;[^\n]*\n)*type=(endpoint|auth|aor)$", re.M)
#: Any section header.
_HEADER = re.compile(rb"^\[", re.M)
#: An include in the target's main file (of a shard file).
_TARGET_INCLUDE = re.compile(rb'^#include\s+"?([^"\n]+)"?\s*$', re.M)


def target_objects(target: Path) -> set[tuple[str, str]]:
    """The ``(type, id)`` of every endpoint, auth and AOR the target file and the shard
    files it includes define (empty when it does not exist yet).  Read by pattern, not
    by the parser: provisioner wrote these files, each passed the parse-back check, and
    their sections all start ``[id]`` then ``type=``; the parser took 27 s at 100k users."""
    found: set[tuple[str, str]] = set()
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return found
    files = [data]
    for include in _TARGET_INCLUDE.finditer(data):
        with contextlib.suppress(FileNotFoundError):
            files.append((target.parent / include.group(1).decode()).read_bytes())
    for text in files:
        sections = _TARGET_SECTION.findall(text)
        if len(sections) != len(_HEADER.findall(text)):
            # Not the shipped layout (an override template put an option first): parse.
            walked = SiteFiles()
            _walk(target, None, walked, 0, set())
            return {d.key for d in walked.defined}
        found.update((kind.decode(), name.decode("utf-8", "replace")) for name, kind in sections)
    return found


def duplicates(site: SiteFiles, ours: set[tuple[str, str]]) -> list[Defined]:
    """The site's own sections that define an object the target defines too."""
    return [d for d in site.defined if d.key in ours]
