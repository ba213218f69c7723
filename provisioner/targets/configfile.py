"""The config-file target: every user's endpoint, auth and AOR in one ``pjsip_users.conf``.

The file is rendered from Jinja2 templates (``templates/pjsip/``, each piece
overridable from the ``target.templates`` directory), parsed back with
:mod:`provisioner.asterisk_conf` and written only if it holds exactly the
intended sections and options and no directive.  The parse-back check has a
sound fast path: a text that is a directive-free, section-free header followed
by exactly the canonical ``[id]`` / ``type=`` / ``key=value`` lines of every
user, each id, option name and value made only of characters Asterisk's loader
takes literally, is what the parser would accept; anything else (an override
changing the layout, an odd value) is parsed in full.  Under the shipped layout
each user's text (its canonical chunk) is made once, checked with all the others
in one batch, and kept for the next apply of an equal user.  Those chunks and checks
live in :mod:`.canonical`, which also reads such a file back without the parser: a
process that did not write the file itself (daemon start, ``sync --once``) finds what
it holds in about a third of the general parser's time (see README's Benchmarks).
The write is atomic (:mod:`.files`: temporary file, fsync, ``os.replace``, fsync of
the directory) and keeps the previous file as ``<name>.bak``.  Unchanged bytes are not
written at all, so the file's mtime only moves when Asterisk has something new to
reload.  A target's first full apply stages its file (:func:`.files.stage`): the
temporary file is fsynced (a large one also written) by a background thread while the
text is checked, and renamed into place only once the check passed.

:meth:`ConfigFileTarget.apply_partial` is the daemon's one-edit path
(``Target.apply_partial``): only the edited users are rendered and checked,
their chunks replace theirs in the last text this object verified (each chunk
starts with its section header and ends with a LF, so chunks cannot merge), and
the file is still rewritten whole and atomically.  One user's chunk is spliced into
the last bytes as :class:`~.pieces.Pieces` (views around the new chunk): no copy of
the others is made before the write.  At 100k users that write of ~62 MB (write and
fsync: 45-190 ms on the lab disk) is the floor of any edit.

:class:`~provisioner.targets.sharded.ShardedConfigFileTarget` (``target.shards`` >= 1)
lifts that floor: each user lives in one of N shard files, each written by a
:class:`ConfigFileTarget` of its own, and the file at ``path`` only includes them.  This
target takes over from a sharded layout (and removes its files) when shards go to 0.

What both layouts share lives beside this module: :mod:`.templating` (the Jinja2
environment), :mod:`.holdings` (what a file holds, and the change to it), :mod:`.files`
(atomic writes) and :mod:`.textdiff` (redacted diffs).  A shard file's target is driven
through :meth:`ConfigFileTarget.prepare` and :meth:`ConfigFileTarget.commit`.
"""

from __future__ import annotations

import contextlib
import re
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

from ..asterisk_conf import Parsed, Section, parse
from ..errors import AsteriskSyntaxError, RenderCheckFailed
from ..gcpause import collector_paused
from ..logs import get_logger
from ..pjsip import RenderSettings, UserObjects, auth_id, endpoint_order, sample_objects
from . import Change
from .canonical import (
    _LINES,
    _canonical_chunks,
    _chunk_text,
    _plain_join,
    canonical_chunk,
    section_ids,
)
from .files import (
    FILE_MODE,
    StagedWrite,
    publish,
    read_file,
    remove_stale_temporaries,
    stage,
    write_file,
    writers_lock,
)
from .holdings import (
    Current,
    Intended,
    all_added,
    compare,
    edited,
    endpoints_of,
    intended,
    kept_objects,
    may_name,
    refuse_foreign,
    with_kept,
)
from .pieces import Pieces
from .shards import drop_stale_backup, retire_shards, shard_directory
from .templating import MAIN_TEMPLATE, SHIPPED_TEMPLATES, Templates
from .textdiff import hide_digests, unified_diff

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "FILE_MODE",
    "MAIN_TEMPLATE",
    "SHIPPED_TEMPLATES",
    "ConfigFileTarget",
    "PendingWrite",
    "canonical_chunk",
    "check_rendered",
]

log = get_logger(__name__)


def _describe(index: int, section: Intended | Section) -> str:
    """A section's position and name for a message (never an option value)."""
    name = section[0] if isinstance(section, tuple) else section.name
    return f"section {index + 1} [{name}]"


#: How a name read back from the rendered file is shown when the intended objects do not
#: hold it: an override template may have put any value there (a digest included).
OTHER_NAME = "<other>"


def _shown(name: str, known: Collection[str]) -> str:
    """``name``, read back from the rendered file, when ``known`` holds it (a name the
    intended objects give), else :data:`OTHER_NAME`: a message never quotes a value."""
    return name if name in known else OTHER_NAME


def _section_problem(index: int, want: Intended, got: Section, ids: Collection[str]) -> str | None:
    """What is wrong with the ``index``-th section ``got``, read back, against ``want``, or
    None; names only ids among ``ids`` and option names ``want`` has."""
    name, kind, options = want
    if got.name != name:
        return f"{_describe(index, want)} came out as [{_shown(got.name, ids)}]"
    if got.template or got.inherits:
        return f"{_describe(index, want)} came out as a template or with inheritance"
    expected = (("type", kind), *options)
    if got.options == expected:
        return None
    got_names = [n for n, _ in got.options]
    want_names = [n for n, _ in expected]
    if got_names != want_names:
        shown = [_shown(n, want_names) for n in got_names]
        return (
            f"{_describe(index, want)} has options {', '.join(shown)} "
            f"instead of {', '.join(want_names)}"
        )
    wrong = [n for (n, v), (_, w) in zip(got.options, expected, strict=True) if v != w]
    # Only names: the values of an auth section are credentials.
    return f"{_describe(index, want)} has wrong values for {', '.join(wrong)}"


def _parse_problems(parsed: Parsed, intended: list[Intended]) -> list[str]:
    """Every way ``parsed`` differs from ``intended``, quoting no text of the file but
    names ``intended`` holds and the directives Asterisk knows."""
    problems = [
        f"line {d.line} holds a #{d.name if d.known else OTHER_NAME} directive"
        for d in parsed.directives
    ]
    problems += [f"line {n.line}: {n.plain}" for n in parsed.notices]
    got = parsed.sections
    ids = {want[0] for want in intended}
    for index, (want, section) in enumerate(zip(intended, got, strict=False)):
        if (problem := _section_problem(index, want, section, ids)) is not None:
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
        raise RenderCheckFailed(f"the rendered file would not load: {exc.plain_message}") from None
    _raise_problems(_parse_problems(parsed, intended(objects)))


def check_templates(templates_dir: Path | None, settings: RenderSettings) -> None:
    """Raise what an apply would raise when the templates (``templates_dir`` over the
    shipped ones) cannot make a good file: :class:`~provisioner.errors.ConfigError` for a
    directory that is not one, :class:`RenderCheckFailed` for one that does not compile
    (:meth:`Templates.compile_all`) or renders sample users, in one file and in a shard
    file, into text that does not parse back to exactly them (no ``user`` macro, a
    section dropped, a directive added).  Writes nothing.  Blocking (reads the files)."""
    templates = Templates(templates_dir)
    templates.compile_all()
    users = sample_objects(settings)
    with templates.templating() as env:
        for shard in (False, True):
            text = env.get_template(MAIN_TEMPLATE).render(users=users, shard=shard)
            check_rendered(text.encode("utf-8"), users)


def _raise_problems(problems: list[str]) -> None:
    """Raise :class:`RenderCheckFailed` listing ``problems``, with no digest: they quote
    names the parser read, where an override's mistake may have put a credential."""
    if problems:
        raise RenderCheckFailed(
            "the rendered file does not hold exactly the intended objects: "
            + hide_digests("; ".join(problems))
        )


_EID = attrgetter("endpoint_id")
_AUTH_ID = attrgetter("auth_id")
_AOR_ID = attrgetter("aor_id")


#: What :func:`provisioner.pjsip.auth_id` appends to an endpoint id (were it ever more than
#: a suffix, :meth:`_State.named_ids` would find no state named so: slower, still right).
_AUTH_SUFFIX = auth_id("")


#: A line that is an ``#include`` or ``#tryinclude`` directive.
_INCLUDE = re.compile(rb"^[ \t]*#[ \t]*(?:try)?include", re.MULTILINE)


def _named_of(ids: list[str]) -> list[str] | None:
    """:meth:`_State.named_ids` of users whose section ids (:func:`.canonical.section_ids`)
    are ``ids``, each one plain (so none holds a LF and equal joins mean equal ids): the
    one list the canonical checks read, read three ways."""
    if not ids:
        return []
    endpoints = ids[0::3]
    fits = (
        ids[2::3] == endpoints
        and len(set(endpoints)) == len(endpoints)
        and _LINES(ids[1::3]) == f"{_AUTH_SUFFIX}\n".join(endpoints) + _AUTH_SUFFIX
    )
    return endpoints if fits else None


@dataclass
class _State:
    """Bytes that passed the parse-back check, and the users they hold, in order."""

    #: The bytes: pieces after an edit spliced a user's chunk in (see :mod:`.pieces`).
    body: bytes | Pieces
    users: list[UserObjects]
    #: Each user's canonical chunk (``""`` for none).
    chunks: list[str]
    #: The header when ``data`` is exactly it followed by all the chunks, each canonical,
    #: and it parses to nothing (what :meth:`ConfigFileTarget.apply_partial` edits); else None.
    header: str | None = None
    #: Characters of the text ``data`` encodes (as many as bytes: it is all ASCII); -1: unknown.
    chars: int = -1
    _distinct: bool | None = field(default=None, repr=False)
    _named: list[str] | None = field(default=None, repr=False)
    _named_known: bool = field(default=False, repr=False)
    _ordered: list[str] | None = field(default=None, repr=False)
    _ordered_known: bool = field(default=False, repr=False)

    @property
    def data(self) -> bytes:
        """The bytes in one buffer (pieces are joined once, the first time this is read:
        comparisons with a file's bytes are for full applies, not for an edit)."""
        body = self.body
        return body.tobytes() if isinstance(body, Pieces) else body

    def named_ids(self) -> list[str] | None:
        """The endpoint ids when they are distinct, hold no LF, and every user names its
        AOR ``<id>`` and its auth ``<id>-auth`` as render_all does (so each user's objects
        are its own); else None.  Found once per state, in C."""
        if not self._named_known:
            users = self.users
            ids = list(map(_EID, users))
            auths = _LINES(map(_AUTH_ID, users))
            fits = not ids or (
                # No id holds a LF, so equal joins mean equal ids, one by one.
                _LINES(ids).count("\n") == len(ids) - 1 == auths.count("\n")
                and len(set(ids)) == len(ids)
                and list(map(_AOR_ID, users)) == ids
                and auths == f"{_AUTH_SUFFIX}\n".join(ids) + _AUTH_SUFFIX
            )
            self._named, self._named_known = (ids if fits else None), True
        return self._named

    @property
    def distinct(self) -> bool:
        """No two sections share a (type, name): each user's three objects are its own."""
        if self._distinct is None:
            self._distinct = self.named_ids() is not None or all(
                len(set(map(get, self.users))) == len(self.users)
                for get in (_EID, _AUTH_ID, _AOR_ID)
            )
        return self._distinct

    def ordered_ids(self) -> list[str] | None:
        """:meth:`named_ids` when they are also in render_all's order (by length, then as
        text: so a user is found by bisection); else None."""
        if not self._ordered_known:
            ids = self.named_ids()
            # A stable sort by length of the sorted ids is render_all's order.
            fits = ids is not None and sorted(sorted(ids), key=len) == ids
            self._ordered, self._ordered_known = (ids if fits else None), True
        return self._ordered


@dataclass(frozen=True)
class PendingWrite:
    """An apply of one file, worked out and checked, nothing written yet: what
    :meth:`ConfigFileTarget.commit` writes and reports."""

    change: Change
    #: What the file holds once committed.
    state: _State
    #: The bytes differ from the file's: write them.
    write: bool
    #: A file is there: keep it as ``<name>.bak``.
    backup: bool
    #: The bytes already being written to a temporary file (only :meth:`apply` stages).
    staged: StagedWrite | None = None

    def discard(self) -> None:
        """Remove the staged temporary file, if any: this write will not be committed."""
        if self.staged is not None:
            self.staged.discard()

    def abandon(self) -> None:
        """:meth:`discard` without waiting for the staged write (its file removed when it
        ends): for a caller being interrupted."""
        if self.staged is not None:
            self.staged.abandon()


class ConfigFileTarget:
    """Writes all users' PJSIP objects to one config file (see the module docstring).

    ``shared_templates`` is for :class:`ShardedConfigFileTarget` only: each of its shard
    files is one such target, rendering with the sharded target's templates; its
    ``new_owner_of`` (the main file, the shard directory) gives a new shard file their
    owner and group.
    """

    def __init__(
        self,
        path: Path,
        templates_dir: Path | None = None,
        *,
        shared_templates: Templates | None = None,
        new_owner_of: Sequence[Path] = (),
        shard: bool = False,
    ) -> None:
        self.path = Path(path)
        #: A shard file of a sharded layout: its header (``shard`` in the templates) says
        #: the main file includes it, not pjsip.conf.
        self.shard = shard
        #: Whose owner and group the file takes when first written (:func:`atomic_write`).
        self.new_owner_of = tuple(new_owner_of)
        self.templates_dir = templates_dir
        self._templates = shared_templates or Templates(templates_dir)
        #: Where a sharded layout of this path keeps its files (None for a shard file): a
        #: main file that such a layout left is read through its includes, and those files
        #: are deleted once this target's file no longer includes them.
        self._shards_dir = shard_directory(self.path) if shared_templates is None else None
        #: The last bytes that passed the parse-back check, and what they hold.
        self._verified: _State | None = None
        #: What the file holds as this object last wrote or found it (apply_partial's base).
        self._state: _State | None = None
        #: Endpoint id -> (user, canonical chunk) of the users last verified, built when
        #: first needed after each check (so it holds only those: it never grows stale).
        self._cache: dict[str, tuple[UserObjects, str]] | None = None
        #: The file as :meth:`endpoints_of` read it, for the apply that follows (reading
        #: 100k users costs seconds of CPU); taken by the next :meth:`_current`.
        self._looked: Current | None = None
        if shared_templates is None:
            remove_stale_temporaries(self.path)

    @property
    def known_users(self) -> int:
        """How many users the file holds as this object last wrote or found it (0 before
        it has: a sharded target counts the unchanged users of the files it did not edit)."""
        return 0 if self._state is None else len(self._state.users)

    @property
    def verified(self) -> bool:
        """This object has verified some bytes for its file (read, written or checked)."""
        return self._verified is not None

    @property
    def _direct(self) -> bool:
        """The layout templates are the shipped ones: users' text is their canonical chunks."""
        return self._templates.direct

    def reload_templates(self) -> None:
        """Read the templates afresh at the next render (also done by itself whenever a
        file in the template directories is added, removed or modified)."""
        self._templates.reload()

    @classmethod
    def from_config(cls, config: Config) -> ConfigFileTarget:
        """The one-file target of ``target.path`` and ``target.templates`` (empty: none);
        :func:`~provisioner.targets.sharded.config_file_target` picks the layout."""
        settings = config.target
        templates = Path(settings.templates) if settings.templates else None
        return cls(Path(settings.path), templates)

    def render_text(self, objects: Sequence[UserObjects]) -> str:
        """The file's text for ``objects``, in their order; pure (templates aside)."""
        return self._render(list(objects))[0]

    def _render(self, users: list[UserObjects]) -> tuple[str, list[str], str | None]:
        """The file's text for ``users``, each user's canonical chunk (``""`` for none),
        and the header when the text is exactly that header followed by every chunk."""
        with self._templates.templating() as env:
            chunks, joined = self._chunks_of(users)
            if self._direct and "" not in chunks:
                # The shipped layout, unchanged, renders exactly the canonical chunks (tested):
                # only the header goes through Jinja, and each user's text is cached.
                header = env.get_template("header.j2").render(users=users, shard=self.shard)
                if joined is None:
                    # One join with the header (at 100k users each copy is 62 MB).
                    return "".join(chain((header,), chunks)), chunks, header
                return header + joined, chunks, header
            text = env.get_template(MAIN_TEMPLATE).render(users=users, shard=self.shard)
        if "" not in chunks:
            # An override may still have laid the users out exactly as the shipped one.
            tail = "".join(chunks)
            if text.endswith(tail):
                return text, chunks, text[: len(text) - len(tail)]
        return text, chunks, None

    def _chunks_of(self, users: Sequence[UserObjects]) -> tuple[list[str], str | None]:
        """:func:`canonical_chunk` of each user (``""`` for none), and their concatenation
        when all were made now, none ``""``.  A user equal to one of the last verified file
        is taken from there; the others are made in one batch."""
        cache = self._cache
        if cache is None:
            known = self._verified
            pairs = zip(known.users, known.chunks, strict=True) if known is not None else ()
            cache = self._cache = {user.endpoint_id: (user, chunk) for user, chunk in pairs}
        if not cache:
            return _canonical_chunks(users)
        chunks: list[str] = []
        missing: list[int] = []
        for user in users:
            hit = cache.get(user.endpoint_id)
            if hit is not None and (hit[0] is user or hit[0] == user):
                chunks.append(hit[1])
            else:
                missing.append(len(chunks))
                chunks.append("")
        if len(missing) == len(chunks):
            return _canonical_chunks(users)
        if missing:
            made, _ = _canonical_chunks([users[i] for i in missing])
            for i, chunk in zip(missing, made, strict=True):
                chunks[i] = chunk
        return chunks, None

    def _current(
        self,
        data: bytes | None,
        *known: _State | None,
        strict: bool = False,
        chunks: Mapping[str, UserObjects] | None = None,
    ) -> Current:
        """The objects a file holding ``data`` gives Asterisk (not parsed when it is one of
        the ``known`` bytes; see :meth:`Current.of_main` for ``chunks``).  A main file that
        a sharded layout left (nothing but includes of its shard files) gives its shard
        files' objects.  ``strict``: a file Asterisk could not load raises
        :class:`RenderCheckFailed` instead of holding nothing.  A file holding what
        provisioner never writes (a transport, an ``#include``: Asterisk's own pjsip.conf)
        raises :class:`~provisioner.errors.ForeignTargetFile`: it is never replaced."""
        looked, self._looked = self._looked, None
        if looked is not None and not strict and looked.data == data:
            return looked
        current = Current.of_main(
            self.path, data, self._shards_dir, *known, strict=strict, chunks=chunks
        )
        return refuse_foreign(self.path, current)

    def _desired(
        self, objects: Sequence[UserObjects], keep: Collection[str]
    ) -> tuple[Current | None, list[UserObjects]]:
        """The current file (None: not needed to find the kept users, not read yet) and the
        objects the new file must hold (``objects`` plus the kept users' current objects)."""
        if not keep:
            return None, list(objects)
        data = read_file(self.path)
        hints = None
        if self._direct and data is not None and self._state is None and self._verified is None:
            # A new target object (a restart, sync --once): the file mostly holds these
            # users (a few skipped or changed), whose chunks spare splitting its lines (at
            # 100k users ~3 s to read it, ~0.5 s so; the chunks cost ~0.3 s, and are made
            # again by the render, as they were before).
            users = list(objects)
            hints = {c: u for u, c in zip(users, self._chunks_of(users)[0], strict=True) if c}
        current = self._current(data, self._state, self._verified, chunks=hints)
        return current, with_kept(objects, kept_objects(current, keep, objects))

    def plan(
        self, objects: Sequence[UserObjects], *, keep: Collection[str] = (), verify: bool = False
    ) -> Change:
        """What :meth:`apply` would change, with a unified diff (credentials redacted);
        writes nothing.  ``keep``: endpoint ids whose current objects stay as they are."""
        current, desired = self._desired(objects, keep)
        text = self._render(desired)[0]
        if current is None:
            current = self._current(read_file(self.path), self._state, self._verified)
        diff = unified_diff(self.path, current.data, text, held=current.secrets())
        return replace(compare(current, desired), diff=diff)

    def endpoints_of(self, usernames: Collection[str]) -> dict[str, list[str]]:
        """The file's endpoint ids whose auth's ``username`` is one of ``usernames``, by
        username (see :func:`.holdings.endpoints_of`); a file Asterisk could not load holds
        none.  The file is parsed only when it may name one of them or include files (and
        not when it holds the bytes this object last verified); the apply that follows
        then takes that parse rather than making its own."""
        data = read_file(self.path)
        if not usernames or data is None:
            return {}
        # Only a main file's target follows includes (of a sharded layout's files).
        includes = self._shards_dir is not None and _INCLUDE.search(data) is not None
        if not (includes or may_name(data, usernames)):
            return {}
        current = self._current(data, self._state, self._verified)
        if not includes:
            # What it holds is the bytes' alone (no shard file read): the same bytes
            # read again by the apply mean the same objects.
            self._looked = current
        return endpoints_of(current, usernames)

    def _verify(self, users: list[UserObjects]) -> _State:
        """The file for ``users``, rendered and parse-checked: :func:`check_rendered`, or
        only the canonical chunks' checks when the text is a plain header followed by every
        user's canonical chunk (see the module docstring).  The bytes last verified for
        the same users, under the same templates, are neither rendered nor checked again."""
        known = self._verified
        if known is not None and known.header is not None and known.users == users:
            with self._templates.templating() as env:
                if self._direct and known.header == (
                    env.get_template("header.j2").render(users=users, shard=self.shard)
                ):
                    return known
        text, chunks, header = self._render(users)
        data = text.encode("utf-8")
        if known is not None and known.data == data and known.users == users:
            return known
        if header is None or not self._templates.plain_header(header):
            check_rendered(data, users)
            header = None
        self._verified = _State(data, users, chunks, header, len(text))
        self._cache = None
        return self._verified

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
        All of it holds the writers' lock (:meth:`_writing`), the guard's look included.
        """
        with self._writing():
            with collector_paused():
                pending = self._prepare(objects, keep, count=True, stage=True)
            try:
                if guard is not None:
                    guard(pending.change)
            except BaseException:
                pending.discard()
                raise
            return self.commit(pending, full=True)

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """The writers' lock of the file (:func:`.files.writers_lock`), held from before
        the current file is read to after the new one is in place, so a second writer (the
        daemon and ``sync --once``) reads what the first wrote rather than replacing a newer
        file with text it rendered before.  A shard file's target (driven by a sharded
        target, which holds the main file's lock for all its files) takes none."""
        if self._shards_dir is None:
            return contextlib.nullcontext()
        return writers_lock(self.path, new_owner_of=self.new_owner_of)

    def prepare(
        self, objects: Sequence[UserObjects], keep: Collection[str], *, count: bool = True
    ) -> PendingWrite:
        """:meth:`apply` up to the write: the file rendered and checked, the change counted
        (not ``count``: left empty, for a caller that counts it against other files).
        Runs with the garbage collector paused (see
        :func:`~provisioner.gcpause.collector_paused`)."""
        with collector_paused():
            return self._prepare(objects, keep, count=count)

    def _prepare(
        self,
        objects: Sequence[UserObjects],
        keep: Collection[str],
        *,
        count: bool,
        stage: bool = False,
    ) -> PendingWrite:
        """:meth:`prepare`, the collector as the caller left it.  ``stage`` (for
        :meth:`apply`, which commits or discards what it gets): the first full apply of
        this object may stage its bytes (see :meth:`_prepare_staged`)."""
        current, desired = self._desired(objects, keep)
        if stage and current is None and count and self._verified is None and self._direct:
            return self._prepare_staged(desired)
        state = self._verify(desired)
        if current is None:
            # Read after the check: a file holding the bytes verified now or at the last
            # apply (the usual case: the file as we wrote it) is not parsed.
            old = read_file(self.path)
            if not count:
                return PendingWrite(
                    Change(), state, write=old != state.data, backup=old is not None
                )
            change = self._counted(old, state)
        else:
            old = current.data
            change = compare(current, desired)
        return PendingWrite(change, state, write=old != state.data, backup=old is not None)

    def prepare_chunks(
        self,
        users: list[UserObjects],
        chunks: list[str],
        *,
        background: bool = False,
        count: bool = False,
        distinct: bool = False,
    ) -> PendingWrite | None:
        """:meth:`prepare` (the change left empty, as with ``count`` false) of ``users``
        whose canonical chunks are ``chunks``, made with :func:`.canonical._chunk_text`:
        only the header is rendered and checked here (:meth:`.Templates.plain_header`);
        the file is that header followed by the chunks, exactly what :meth:`_verify`
        accepts without parsing it once the chunks are found canonical.

        That check is the caller's, and it must pass before :meth:`commit` (it may run
        after this: :func:`.canonical._plain_join` of these chunks, alone or in a batch
        with other users': the checks hold for a batch exactly when they hold for each
        text); until then nothing here counts as verified.  ``background``: bytes that
        differ from the file's are staged (:func:`.files.stage` with ``batch``), to be
        committed or discarded by the caller whatever happens.  ``count``: the change is
        counted against the file (as :meth:`prepare` counts it; a file holding exactly
        these bytes is not parsed), for a caller whose check has passed already;
        ``distinct``: the caller knows no two of these users share a section (see
        :attr:`_State.distinct`).  None when the layout templates are not the shipped
        ones or the header is not plain: the caller then prepares these users the
        general way."""
        if not self._direct:
            return None
        with self._templates.templating() as env:
            header = env.get_template("header.j2").render(users=users, shard=self.shard)
        if not self._templates.plain_header(header):
            return None
        text = "".join(chain((header,), chunks))
        data = text.encode("utf-8")
        state = _State(data, users, chunks, header, len(text), _distinct=distinct or None)
        old = read_file(self.path)
        change = self._counted(old, state) if count else Change()
        staged = None
        if background and old != data:
            staged = stage(self.path, data, new_owner_of=self.new_owner_of, batch=True)
        return PendingWrite(change, state, old != data, old is not None, staged)

    def _counted(
        self, old: bytes | None, state: _State, ids: Sequence[str] | None = None
    ) -> Change:
        """The change from a file holding ``old`` (None: no file) to one holding ``state``
        (``ids``: its users' :func:`.canonical.section_ids`, when made already)."""
        if old == state.data and state.distinct:
            # The file holds the verified bytes, three distinct objects per user:
            # nothing is added, updated or removed (what compare finds, quicker).
            return Change(unchanged=len(state.users))
        if old is None:
            return all_added(state.users, distinct=state.distinct, ids=ids)
        return compare(self._current(old, state, self._state), state.users)

    def _prepare_staged(self, users: list[UserObjects]) -> PendingWrite:
        """:meth:`_prepare` of a first full apply under the shipped layout, its bytes
        staged when they differ from the file's (:func:`.files.stage`): the temporary
        file's fsync (and a large file's write) runs in the background, the GIL released,
        while this thread checks the text and counts the change (1k users: the fsync's
        0.5-4 ms, the 6 MB write of 10k, the 62 MB write and fsync of 100k).  Nothing is
        visible before :meth:`commit` publishes it; a text the canonical checks do not
        accept is unstaged and goes the general way (rendered through the templates and
        parsed back in full)."""
        with self._templates.templating() as env:
            header = env.get_template("header.j2").render(users=users, shard=self.shard)
        try:
            texts = list(map(_chunk_text, users))
        except TypeError:  # a value that is not a str: leave it to Jinja and the parser
            return self._prepare(users, (), count=True)
        # One text, one encoding of it: at 100k users each copy is 62 MB.
        text = "".join(chain((header,), texts))
        data = text.encode("utf-8")
        old = read_file(self.path)
        staged = None
        if old != data:
            staged = stage(self.path, data, new_owner_of=self.new_owner_of)
        try:
            # Every section id, made once for the checks, the ids' names and the count.
            ids = section_ids(users)
            plain = _plain_join(users, texts, text, len(header), data, ids) is not None
            if not (plain and self._templates.plain_header(header)):
                if staged is not None:
                    staged.discard()
                    staged = None
                return self._prepare(users, (), count=True)
            state = self._verified = _State(
                data, users, texts, header, len(text), _named=_named_of(ids), _named_known=True
            )
            self._cache = None
            change = self._counted(old, state, ids)
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        return PendingWrite(change, state, old != data, old is not None, staged)

    def commit(
        self, pending: PendingWrite, *, full: bool = False, sync_directory: bool = True
    ) -> Change:
        """Write what :meth:`prepare` or :meth:`prepare_partial` worked out (atomically,
        only when the bytes differ); the file then holds ``pending.state``.
        ``sync_directory``: as for :func:`atomic_write`.

        After a write or a ``full`` apply, a main file's target deletes the shard files a
        sharded layout of it left (the file now includes none of them; a full apply also
        finishes a switch back that a crash cut short).  A ``full`` apply under the shipped
        layout also finds the ids' order (:meth:`_State.ordered_ids`) the next edit needs."""
        change = pending.change
        staged = pending.staged
        if pending.write and staged is not None and staged.data is pending.state.body:
            publish(staged, self.path, backup=pending.backup, sync_directory=sync_directory)
            change = replace(change, wrote=True)
        elif pending.write:
            pending.discard()
            write_file(
                self.path,
                pending.state.body,
                backup=pending.backup,
                sync_directory=sync_directory,
                new_owner_of=self.new_owner_of,
            )
            change = replace(change, wrote=True)
        else:
            pending.discard()
        if self._verified is not pending.state:
            # An edit's state, checked chunk by chunk rather than by _verify.
            self._verified = pending.state
            self._cache = None
        self._state = pending.state
        if full and self._direct and pending.state.header is not None:
            # What the first edit after it needs, found now rather than in that edit (two
            # sorts of the ids: ~10 ms at 100k users), once the file is in place.
            pending.state.ordered_ids()
        if self._shards_dir is not None and (pending.write or full):
            drop_stale_backup(self.path, retire_shards(self.path, None))
        return change

    def apply_partial(self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]) -> Change:
        """Write ``upserts`` (new or changed users, each put where render_all's order puts
        it) and remove the users of endpoint ids ``removed_ids``, every other user staying
        as this target last applied it (the daemon's one-edit path; an id in both is
        upserted).  Before any apply, the others are what the current file holds.

        Only these users are rendered and checked: their canonical chunks replace theirs
        in the last verified text (see :func:`.canonical._plain_join` for why chunks cannot merge).
        Whenever that does not apply (an override of the layout, a user with no canonical
        chunk, ids not named and ordered as render_all does), the edited list of users
        goes through :meth:`apply`.  The change counts and names these users only.
        """
        with self._writing():
            with self._templates.hold():  # the template files looked at once, not per render
                pending = self.prepare_partial(upserts, removed_ids)
            return self.commit(pending)

    def prepare_partial(
        self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]
    ) -> PendingWrite:
        """:meth:`apply_partial` up to the write."""
        state = self._state
        if state is None:
            return self.prepare(edited(self._file_users(), upserts, removed_ids), ())
        self._templates.fresh()  # an edited template is no longer the shipped one
        ids = state.ordered_ids() if self._direct and state.header is not None else None
        edit = _Edit.of(state, ids, upserts, removed_ids) if ids is not None else None
        if edit is None:
            return self.prepare(edited(state.users, upserts, removed_ids), ())
        change = edit.change()
        if change.empty:
            # The same bytes: equal objects (perhaps new ones) for these users.
            return PendingWrite(change, replace(state, users=edit.users), write=False, backup=True)
        with self._templates.templating() as env:
            header = env.get_template("header.j2").render(users=edit.users, shard=self.shard)
        if header != state.header and not self._templates.plain_header(header):
            return self.prepare(edit.users, ())
        body, chars, differs = _edited_body(state, edit, header)
        new = _State(
            body,
            edit.users,
            edit.chunks,
            header,
            chars,
            _distinct=True,
            _named=edit.ids,
            _named_known=True,
            _ordered=edit.ids,
            _ordered_known=True,
        )
        return PendingWrite(change, new, write=differs, backup=self.path.exists())

    def prepare_restore(self) -> PendingWrite | None:
        """The file as this object last wrote or found it, to write again because it was
        deleted (a shard file removed by hand); None when this object holds none yet."""
        state = self._state
        if state is None:
            return None
        return PendingWrite(Change(unchanged=len(state.users)), state, write=True, backup=False)

    def _file_users(self) -> list[UserObjects]:
        """Every user the current file holds (three objects found for an endpoint).

        A file Asterisk could not load is refused, not read as empty: an edit of a few
        users must never write a file without all the others."""
        current = self._current(read_file(self.path), self._verified, strict=True)
        return kept_objects(current, current.endpoints, ())


def _edited_body(state: _State, edit: _Edit, header: str) -> tuple[bytes | Pieces, int, bool]:
    """The bytes (and characters) of ``header`` and the edited chunks, and whether they
    differ from ``state``'s.  One user put or removed in an all-ASCII file with the same
    header: ``state``'s bytes with that user's chunk spliced in (no copy of the others,
    see :mod:`.pieces`), differing exactly when the chunk does."""
    if len(edit.ops) == 1 and header == state.header and len(state.body) == state.chars:
        at, old, new = edit.ops[0]
        if new.isascii():
            start = len(header) + sum(map(len, islice(state.chunks, at)))
            body = Pieces.of(state.body).splice(start, start + len(old), new.encode("ascii"))
            return body, state.chars - len(old) + len(new), old != new
    text = header + "".join(edit.chunks)
    data = text.encode("utf-8")
    return data, len(text), data != state.data


@dataclass
class _Edit:
    """A state's users, chunks and endpoint ids after some users were put or removed, and
    what changed (as :func:`~.holdings.compare` counts it: each object is its own user's)."""

    users: list[UserObjects]
    chunks: list[str]
    ids: list[str]
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    #: Updated endpoints whose auth username changed (see :attr:`Change.reowned`).
    reowned: list[str] = field(default_factory=list)
    #: Each chunk replaced, as (index at the time, old chunk, new chunk); ``""`` for none.
    ops: list[tuple[int, str, str]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        state: _State,
        ids: list[str],
        upserts: Sequence[UserObjects],
        removed_ids: Iterable[str],
    ) -> _Edit | None:
        """``state`` (its endpoint ids ``ids``, see :meth:`_State.ordered_ids`) edited; None
        when some upsert is not named as render_all names it or has no canonical chunk."""
        latest = {user.endpoint_id: user for user in upserts}
        put = list(latest.values())
        chunks, _ = _canonical_chunks(put)
        for user, chunk in zip(put, chunks, strict=True):
            if not chunk or user.auth_id != auth_id(user.endpoint_id):
                return None
            if user.aor_id != user.endpoint_id:
                return None
        edit = cls(list(state.users), list(state.chunks), list(ids))
        for endpoint_id in dict.fromkeys(removed_ids):
            if endpoint_id not in latest:
                edit.remove(endpoint_id)
        for user, chunk in zip(put, chunks, strict=True):
            edit.put(user, chunk)
        return edit

    def _find(self, endpoint_id: str) -> tuple[int, bool]:
        """Where ``endpoint_id`` is or would go, and whether it is there."""
        at = bisect_left(self.ids, endpoint_order(endpoint_id), key=endpoint_order)
        return at, at < len(self.ids) and self.ids[at] == endpoint_id

    def remove(self, endpoint_id: str) -> None:
        at, found = self._find(endpoint_id)
        if found:
            gone = self.users[at]
            self.ops.append((at, self.chunks[at], ""))
            del self.users[at], self.chunks[at], self.ids[at]
            self.removed.append(endpoint_id)
            self.changed += [(kind, name) for name, kind, _ in gone.sections()]

    def put(self, user: UserObjects, chunk: str) -> None:
        at, found = self._find(user.endpoint_id)
        self.ops.append((at, self.chunks[at] if found else "", chunk))
        if not found:
            self.users.insert(at, user)
            self.chunks.insert(at, chunk)
            self.ids.insert(at, user.endpoint_id)
            self.added.append(user.endpoint_id)
            self.changed += [(kind, name) for name, kind, _ in user.sections()]
            return
        was = self.users[at].sections()
        differing = [
            (kind, name)
            for (name, kind, options), (_, _, before) in zip(user.sections(), was, strict=True)
            if options != before
        ]
        if differing:
            self.updated.append(user.endpoint_id)
            self.changed += differing
            if self.users[at].username != user.username:
                self.reowned.append(user.endpoint_id)
        self.users[at] = user
        self.chunks[at] = chunk

    def change(self) -> Change:
        """The change; every user not added or updated counts as unchanged."""
        return Change(
            added=tuple(self.added),
            updated=tuple(self.updated),
            removed=tuple(self.removed),
            unchanged=len(self.users) - len(self.added) - len(self.updated),
            changed_objects=tuple(dict.fromkeys(self.changed)),
            reowned=tuple(self.reowned),
        )
