"""What a PJSIP config file holds, as objects, and how a new set of users differs from it.

Shared by the one-file target (:mod:`.configfile`) and the sharded one (:mod:`.sharded`):
:class:`Current` reads a file (or a sharded main file through its includes) into its
``(type, name) -> options``; :func:`compare` counts what an apply of some users would add,
update and remove; :func:`kept_objects` and :func:`with_kept` keep the users that could
not be rendered as the file holds them; :func:`edited` is a user-by-user edit of a list.
Pure but for :meth:`Current.of_main` and :meth:`Current.union`, which read files.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, cycle
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from ..asterisk_conf import Parsed, parse
from ..errors import AsteriskSyntaxError, ForeignTargetFile, RenderCheckFailed
from ..pjsip import Options, UserObjects, auth_id, endpoint_order
from . import Change
from .canonical import read_canonical
from .files import read_file
from .shards import includes_of
from .textdiff import SECRET_OPTIONS

__all__ = [
    "Current",
    "Intended",
    "Verified",
    "all_added",
    "broken",
    "compare",
    "edited",
    "endpoints_of",
    "intended",
    "kept_objects",
    "may_name",
    "refuse_foreign",
    "with_kept",
]

_EID = attrgetter("endpoint_id")
_IDS = attrgetter("endpoint_id", "auth_id", "aor_id")
_OPTIONS = attrgetter("endpoint", "auth", "aor")
#: The types of a user's sections, in file order.
_KINDS = ("endpoint", "auth", "aor")


class Verified(Protocol):
    """Bytes known (by the parse-back check) to hold exactly ``users``, and each user's
    canonical chunk (``""`` for none; one that is not was checked plain)."""

    @property
    def data(self) -> bytes: ...

    @property
    def users(self) -> list[UserObjects]: ...

    @property
    def chunks(self) -> list[str]: ...


#: One intended section: (name, type, options after ``type``).
Intended = tuple[str, str, Options]


def intended(objects: Sequence[UserObjects]) -> list[Intended]:
    """Every section of ``objects``, in file order: each user's endpoint, auth, AOR."""
    return [section for user in objects for section in user.sections()]


@dataclass(frozen=True)
class Current:
    """The file as it is now: its bytes (None when absent) and the objects it holds."""

    data: bytes | None
    objects: dict[tuple[str, str], Options]
    endpoints: tuple[str, ...]
    #: What the file holds that provisioner never writes (:func:`_foreign`): the types of
    #: objects other than a user's three, sections with no ``type=``, ``#include``,
    #: ``#tryinclude``, ``#exec``, a NUL byte (no text at all).
    foreign: tuple[str, ...] = ()

    @classmethod
    def of_main(
        cls,
        path: Path,
        data: bytes | None,
        shards_dir: Path | None,
        *known: Verified | None,
        strict: bool = False,
        chunks: Mapping[str, UserObjects] | None = None,
    ) -> Current:
        """What the file at ``path``, holding ``data``, gives Asterisk, parsed once (not at
        all when it is one of the ``known`` bytes, nor when it is the canonical text of
        some users, which :func:`.canonical.read_canonical` reads in a fraction of the
        time, users whose text is one of the ``known`` chunks or of ``chunks`` quickest):
        its own objects, or, when it is a main file of a sharded layout in ``shards_dir``
        (nothing but includes of shard files there), its shard files' objects.
        ``strict``: a file Asterisk could not load raises :class:`RenderCheckFailed`
        instead of holding nothing."""
        if data is None:
            return cls(None, {}, ())
        for verified in known:
            if verified is not None and verified.data == data:
                return cls.verified(data, verified.users)
        if b"\0" in data:
            # No text provisioner writes holds one (every value is checked for control
            # characters): a database (the user store's own SQLite file), an image...
            return cls(data, {}, (), (_NUL,))
        hints = _known_chunks(known)
        hints.update(chunks or {})
        canonical = read_canonical(data, hints)
        if canonical is not None:
            # Exactly what the parser would find (no directive: no include to follow).
            return cls.verified(data, canonical.users)
        try:
            parsed = parse(data)
        except AsteriskSyntaxError as exc:
            if strict:
                raise broken(path, exc) from None
            return cls(data, {}, ())  # replaced whole: everything in the new one is added
        included = None if shards_dir is None else includes_of(shards_dir, parsed)
        if included is None:
            return cls.of_parsed(data, parsed)
        return cls.union(data, included, strict=strict)

    def secrets(self) -> dict[tuple[str, str], str]:
        """The credential values held, by (section name, lower-case option name): what
        :func:`~.textdiff.unified_diff` compares a new credential with."""
        return {
            (name, option.lower()): value
            for (kind, name), options in self.objects.items()
            if kind == "auth"
            for option, value in options
            if option.lower() in SECRET_OPTIONS
        }

    @classmethod
    def union(cls, data: bytes, files: Sequence[Path], *, strict: bool = False) -> Current:
        """What a main file holding ``data`` and including ``files`` gives Asterisk: the
        files' objects together (a missing file holds none), the endpoints in render_all's
        order (as one file holds them).  ``strict``: a file Asterisk could not load raises
        :class:`RenderCheckFailed` instead of holding nothing."""
        objects: dict[tuple[str, str], Options] = {}
        endpoints: list[str] = []
        foreign: list[str] = []
        for path in files:
            current = cls.of_main(path, read_file(path), None, strict=strict)
            objects.update(current.objects)
            endpoints += current.endpoints
            foreign += current.foreign
        ordered = tuple(sorted(dict.fromkeys(endpoints), key=endpoint_order))
        return cls(data, objects, ordered, tuple(sorted(set(foreign))))

    @classmethod
    def verified(cls, data: bytes, users: list[UserObjects]) -> Current:
        """The file ``data``, known (by the parse-back check) to hold exactly ``users``:
        what :meth:`of` would find, without parsing it again."""
        # (type, id) of every section in file order, and its options, paired in C (a
        # later section of one key takes the value, the first keeps the place).
        keys = zip(cycle(_KINDS), chain.from_iterable(map(_IDS, users)))
        objects = dict(zip(keys, chain.from_iterable(map(_OPTIONS, users)), strict=True))
        return cls(data, objects, tuple(dict.fromkeys(map(_EID, users))))

    @classmethod
    def of_parsed(cls, data: bytes, parsed: Parsed) -> Current:
        """What ``data``, already parsed to ``parsed``, holds."""
        objects: dict[tuple[str, str], Options] = {}
        endpoints: list[str] = []
        for section in parsed.visible():
            options = section.options
            if not options or options[0][0] != "type":
                continue
            kind = options[0][1]
            objects[(kind, section.name)] = options[1:]
            if kind == "endpoint":
                endpoints.append(section.name)
        return cls(data, objects, tuple(dict.fromkeys(endpoints)), _foreign(parsed))


#: What a file holding a NUL byte is said to hold (:attr:`Current.foreign`).
_NUL = "a NUL byte: no text file, maybe a database such as the user store's"


#: What a file with a section lacking ``type=`` (an extensions.conf context, a TOML table)
#: is said to hold.
_TYPELESS = "sections with no type=, no PJSIP objects: a dialplan, another program's file"


#: A type or directive name fit to quote (a PJSIP type is a short word); any other shows
#: as ``<other>``: a file not provisioner's may hold anything there.
_QUOTABLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}")


def _foreign(parsed: Parsed) -> tuple[str, ...]:
    """What ``parsed`` holds that no file provisioner writes holds: ``objects of type
    global, transport`` (of every type but endpoint, auth and aor), sections with no
    ``type=`` at all, and each directive Asterisk acts on (``#include``); empty for a
    file of users only."""
    kinds = {
        options[0][1] if _QUOTABLE.fullmatch(options[0][1]) else "<other>"
        for section in parsed.visible()
        if (options := section.options) and options[0][0] == "type" and options[0][1] not in _KINDS
    }
    held = [f"objects of type {', '.join(sorted(kinds))}"] if kinds else []
    if any(not s.options or s.options[0][0] != "type" for s in parsed.visible()):
        held.append(_TYPELESS)
    held += sorted({f"#{d.name}" for d in parsed.directives if d.known})
    return tuple(held)


def refuse_foreign(path: Path, current: Current) -> Current:
    """``current``, the file at ``path``, unless it holds what provisioner never writes
    (Asterisk's own pjsip.conf, named by a mistaken ``target.path``):
    :class:`~provisioner.errors.ForeignTargetFile` then, before anything is written."""
    if current.foreign:
        raise ForeignTargetFile(str(path), current.foreign)
    return current


def _known_chunks(known: Iterable[Verified | None]) -> dict[str, UserObjects]:
    """Each canonical chunk of ``known`` and its user (a file being replaced mostly holds
    the users of the text that replaces it: see :func:`.canonical.read_canonical`)."""
    return {
        chunk: user
        for verified in known
        if verified is not None
        for user, chunk in zip(verified.users, verified.chunks, strict=True)
        if chunk
    }


def compare(current: Current, objects: Sequence[UserObjects]) -> Change:
    """What making the file hold exactly ``objects`` changes against ``current``: users
    added (no endpoint there), updated (some object differs) and removed (an endpoint
    there and not wanted), the unchanged count, and every (type, name) that differs."""
    added: list[str] = []
    updated: list[str] = []
    reowned: list[str] = []
    changed: list[tuple[str, str]] = []
    unchanged = 0
    for user in objects:
        kinds = [(kind, name, options) for name, kind, options in user.sections()]
        differing = [(k, n) for k, n, o in kinds if current.objects.get((k, n)) != o]
        if ("endpoint", user.endpoint_id) not in current.objects:
            added.append(user.endpoint_id)
        elif differing:
            updated.append(user.endpoint_id)
            if ("auth", user.auth_id) in differing and renamed(current, user):
                reowned.append(user.endpoint_id)
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
        reowned=tuple(reowned),
    )


def renamed(current: Current, user: UserObjects) -> bool:
    """Whether ``current`` holds ``user``'s auth with another ``username`` (the extension
    went to another user, or its user was renamed): the contacts registered under the
    previous credentials are owed removal."""
    before = current.objects.get(("auth", user.auth_id))
    return before is not None and dict(before).get("username") != user.username


def all_added(
    users: Sequence[UserObjects], *, distinct: bool = False, ids: Sequence[str] | None = None
) -> Change:
    """What :func:`compare` finds against nothing at all: every user added (``distinct``:
    no two sections share an id, so none needs dropping from ``changed_objects``).
    ``ids``: the users' section ids in file order (endpoint, auth, AOR of each), when the
    caller has them already."""
    # (kind, id) of every section, in file order, made in C.
    if ids is None:
        keys = zip(cycle(_KINDS), chain.from_iterable(map(_IDS, users)))
        added = tuple(map(_EID, users))
    else:
        keys = zip(cycle(_KINDS), ids)
        added = tuple(ids[0 :: len(_KINDS)])
    return Change(
        added=added,
        changed_objects=tuple(keys) if distinct else tuple(dict.fromkeys(keys)),
    )


def broken(path: Path, exc: AsteriskSyntaxError) -> RenderCheckFailed:
    """Why the file at ``path``, which Asterisk could not load, cannot be edited."""
    return RenderCheckFailed(
        f"cannot edit {str(path)!r} user by user: it does not load "
        f"({exc.plain_message}); apply every user instead"
    )


def kept_objects(
    current: Current, keep: Collection[str], objects: Sequence[UserObjects]
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


#: An option ``username`` as a file may spell it, and its value as usernames are made:
#: a look before a parse finds every auth username the parse would (and more).
_USERNAME_OPTION = re.compile(rb"username\s*=>?\s*([A-Za-z0-9._]+)", re.IGNORECASE)


def may_name(data: bytes | None, usernames: Collection[str]) -> bool:
    """Whether the file holding ``data`` may hold an auth of one of ``usernames`` (False:
    surely none): one scan of the bytes, where a parse costs ~0.1 ms a user."""
    if not data:
        return False
    wanted = {name.encode() for name in usernames}
    return any(value in wanted for value in _USERNAME_OPTION.findall(data))


def endpoints_of(current: Current, usernames: Collection[str]) -> dict[str, list[str]]:
    """The endpoint ids in ``current`` whose auth's ``username`` is one of ``usernames``
    (each auth holds its user's username), by username, in the file's order: which users
    the file's endpoints belong to, for a process that has not applied them itself."""
    wanted = set(usernames)
    found: dict[str, list[str]] = {}
    if not wanted:
        return found
    for endpoint_id in current.endpoints:
        named = dict(current.objects.get(("endpoint", endpoint_id), ()))
        auth = current.objects.get(("auth", named.get("auth", auth_id(endpoint_id))))
        username = None if auth is None else dict(auth).get("username")
        if username in wanted:
            found.setdefault(username, []).append(endpoint_id)
    return found


def _order(user: UserObjects) -> tuple[int, str]:
    """render_all's order of users (:func:`~provisioner.pjsip.endpoint_order`)."""
    return endpoint_order(user.endpoint_id)


def with_kept(objects: Sequence[UserObjects], kept: list[UserObjects]) -> list[UserObjects]:
    """``objects`` in their order, with the kept users merged in where render_all puts them."""
    if not kept:
        return list(objects)
    return list(heapq.merge(objects, sorted(kept, key=_order), key=_order))


def edited(
    users: Sequence[UserObjects], upserts: Sequence[UserObjects], removed_ids: Iterable[str]
) -> list[UserObjects]:
    """``users`` without the endpoint ids ``removed_ids`` and those of ``upserts``, with
    ``upserts`` (the last of each endpoint id) merged in where render_all puts them."""
    latest = {user.endpoint_id: user for user in upserts}
    gone = set(removed_ids) | latest.keys()
    return with_kept([u for u in users if u.endpoint_id not in gone], list(latest.values()))
