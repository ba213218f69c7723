"""The config-file target in N shard files (``target.shards`` >= 1).

:class:`~provisioner.targets.configfile.ConfigFileTarget` rewrites its one file whole at
every edit: at 100k users ~62 MB, whose write and fsync (45-190 ms on the lab disk) is the
floor of any edit.  Here each user lives in one of N shard files, each written by a
:class:`ConfigFileTarget` of its own (a shard's header, same text, same parse-back check, same
atomic write and ``.bak``), and the file at ``path`` only ``#include``s them, so one edit
rewrites one small shard file.  :func:`config_file_target` picks the layout from the
config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConfigError, Problem, RenderCheckFailed
from ..gcpause import collector_paused
from ..logs import get_logger
from ..pjsip import UserObjects, endpoint_order
from . import Change
from .canonical import _chunk_text, _plain_join, section_ids
from .configfile import ConfigFileTarget, PendingWrite, _named_of
from .files import (
    read_file,
    real_path,
    remove_stale_in,
    remove_stale_temporaries,
    sync_directory,
    write_file,
    writers_lock,
)
from .holdings import (
    Current,
    all_added,
    compare,
    edited,
    endpoints_of,
    kept_objects,
    refuse_foreign,
    with_kept,
)
from .shards import (
    MAX_SHARDS,
    SHARD_TEMPORARIES,
    check_main,
    drop_stale_backup,
    main_text,
    retire_shards,
    shard_directory,
    shard_directory_problem,
    shard_files,
    shard_of,
)
from .templating import Templates
from .textdiff import unified_diff

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ShardedConfigFileTarget", "config_file_target"]

log = get_logger(__name__)

_T = TypeVar("_T")
#: Shard files written at once by a full apply (see ``_commit_files``), when at least
#: ``PARALLEL_FILES`` of them change.
WRITERS = 8
PARALLEL_FILES = 16
_EID = attrgetter("endpoint_id")


def config_file_target(config: Config) -> ConfigFileTarget | ShardedConfigFileTarget:
    """The config-file target configured by ``target.path``, ``target.templates`` (empty:
    none) and ``target.shards`` (0: one file; else that many shard files)."""
    settings = config.target
    if not settings.shards:
        return ConfigFileTarget.from_config(config)
    templates = Path(settings.templates) if settings.templates else None
    return ShardedConfigFileTarget(Path(settings.path), templates, shards=settings.shards)


def _stamp(directory: Path) -> tuple[int, int, int] | None:
    """``directory``'s device, inode and modification time (an entry added, removed or
    renamed moves it); None when it is gone."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns)


def _file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """The file at ``path`` (a link followed): its device, inode, modification time and
    size; None when it is gone."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _summed(changes: Iterable[Change]) -> Change:
    """The changes of several files as one: endpoint ids in render_all's order."""
    added: list[str] = []
    updated: list[str] = []
    removed: list[str] = []
    reowned: list[str] = []
    objects: list[tuple[str, str]] = []
    unchanged = 0
    wrote = False
    for change in changes:
        added += change.added
        updated += change.updated
        removed += change.removed
        reowned += change.reowned
        objects += change.changed_objects
        unchanged += change.unchanged
        wrote = wrote or change.wrote
    return Change(
        added=tuple(sorted(added, key=endpoint_order)),
        updated=tuple(sorted(updated, key=endpoint_order)),
        removed=tuple(sorted(removed, key=endpoint_order)),
        unchanged=unchanged,
        changed_objects=tuple(dict.fromkeys(objects)),
        wrote=wrote,
        reowned=tuple(sorted(reowned, key=endpoint_order)),
    )


def _discard(files: Iterable[tuple[ConfigFileTarget, PendingWrite]]) -> None:
    """Remove every staged temporary file of ``files``: they will not be committed.  When
    a wait is cut short (Ctrl-C), the files not removed yet are removed as their writes
    end, without waiting."""
    files = list(files)
    try:
        for _, pending in files:
            pending.discard()
    except BaseException:
        for _, pending in files:
            pending.abandon()
        raise


def _publish_each(files: list[tuple[ConfigFileTarget, PendingWrite]]) -> list[Change]:
    """Commit ``files``, each staged (or not to be written), one after the other: each
    waits only for its own write, done or under way, and is renamed into place.  As
    with the writer threads, a failure does not stop the others (so none is left
    staged); the first is raised once all are committed.  An interruption leaves
    none staged either: what is left is removed as its write ends."""
    changes: list[Change] = []
    failure: Exception | None = None
    for at, (target, pending) in enumerate(files):
        try:
            changes.append(target.commit(pending, sync_directory=False))
        except Exception as exc:  # raised below, once the others are in place
            failure = failure or exc
        except BaseException:
            for _, left in files[at + 1 :]:
                left.abandon()
            raise
    if failure is not None:
        raise failure
    return changes


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A :class:`RenderCheckFailed` raised within names the shard file ``path``."""
    try:
        yield
    except RenderCheckFailed as exc:
        raise RenderCheckFailed(f"{path.name}: {exc}") from None


@dataclass(frozen=True)
class _Layout:
    """A full apply of a sharded target, worked out and checked, nothing written yet."""

    change: Change
    #: Each shard file's own apply, in shard order.
    files: list[tuple[ConfigFileTarget, PendingWrite]]
    #: The main file's bytes, and its current ones (None: absent).
    main: bytes
    old_main: bytes | None


class ShardedConfigFileTarget:
    """The config-file target in ``shards`` files (``target.shards`` >= 1).

    The user of endpoint id E lives in shard file ``shard_of(E, shards)`` under
    :func:`shard_directory`; each shard file is exactly what :class:`ConfigFileTarget`
    writes for its users (a shard's header, the same sections in the same order, the same
    parse-back check, atomic write and ``.bak``), so the shard files together hold what
    the single file would.  The main file at ``path`` holds the header and one
    ``#include`` of each shard file by its absolute path, in order.

    One edit re-renders, checks and rewrites only the shard files of the users it
    touches: at 100k users and 1,024 shards a ~60 kB file instead of ~62 MB.

    Crash safety: an apply that changes several shards is not atomic across them, but
    each user lives in exactly one shard and each shard file is replaced atomically, so
    every user is either wholly old or wholly new.  A new shard count writes the whole
    new set first, then switches the main file atomically, then deletes the old set, so
    Asterisk never reads a mix that loses or duplicates a user.  A full apply (the
    daemon's start-up reconcile) repairs whatever a crash left: it rewrites every shard
    that differs, finishes a switch, and removes the files of other counts and stale
    temporaries.
    """

    def __init__(self, path: Path, templates_dir: Path | None = None, *, shards: int) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigError([Problem("target.shards", f"must be 1-{MAX_SHARDS} when sharded")])
        self.path = Path(path)
        self.templates_dir = templates_dir
        self.shards = shards
        self.directory = shard_directory(self.path)
        #: The shard files, in shard order: what the main file includes.
        self.files = shard_files(self.path, shards)
        #: Each shard file's name -> its index (see :meth:`_missing`).
        self._indexes = {file.name: i for i, file in enumerate(self.files)}
        #: The shard directory's stamp (:func:`_stamp`) when every shard file was last
        #: known there (listed, or just written by an edit): unchanged, an edit need not
        #: list the directory again (~0.9 ms at 1,024 shards) to know none was deleted.
        self._complete: tuple[int, int, int] | None = None
        if (problem := shard_directory_problem(self.path)) is not None:
            raise ConfigError([problem])
        self._templates = Templates(templates_dir)
        #: Shard index -> the target writing that file, made when first needed.
        self._targets: dict[int, ConfigFileTarget] = {}
        #: The main file's bytes once this object found or wrote it including this set,
        #: and its :func:`_file_stamp` then (an edit restats it, ~2 µs, to notice it gone).
        self._main: bytes | None = None
        self._main_stamp: tuple[int, int, int, int] | None = None
        remove_stale_temporaries(self.path)
        remove_stale_in(self.directory, SHARD_TEMPORARIES)

    def reload_templates(self) -> None:
        """Read the templates afresh at the next render (also done by itself whenever a
        file in the template directories is added, removed or modified)."""
        self._templates.reload()

    def file_of(self, endpoint_id: str) -> Path:
        """The shard file that holds the user of ``endpoint_id``."""
        return self.files[shard_of(endpoint_id, self.shards)]

    def _file(self, index: int) -> ConfigFileTarget:
        target = self._targets.get(index)
        if target is None:
            target = ConfigFileTarget(
                self.files[index],
                self.templates_dir,
                shared_templates=self._templates,
                # A new shard file: Asterisk reads it as it reads the main file.
                new_owner_of=(self.path, self.directory),
                shard=True,
            )
            self._targets[index] = target
        return target

    def _groups(self, users: Iterable[UserObjects]) -> list[list[UserObjects]]:
        """``users`` by shard, each list in their order."""
        return self._by_shard(users, _EID)

    def _kept_by_shard(self, keep: Collection[str]) -> list[list[str]]:
        """The endpoint ids ``keep`` by shard."""
        return self._by_shard(keep, str)

    def _by_shard(self, items: Iterable[_T], endpoint_of: Callable[[_T], str]) -> list[list[_T]]:
        count = self.shards
        groups: list[list[_T]] = [[] for _ in range(count)]
        for item in items:
            groups[shard_of(endpoint_of(item), count)].append(item)
        return groups

    def _main_data(self) -> bytes:
        """The main file's bytes, checked (:func:`check_main`).  Its header is rendered for
        no user, so the file changes only with the templates or the shard count."""
        with self._templates.templating() as env:
            header = env.get_template("header.j2").render(users=[], shard=False)
        data = main_text(header, self.files).encode("utf-8")
        check_main(data, self.files)
        return data

    def _current(self, data: bytes | None, *, strict: bool = False) -> Current:
        """What the main file holding ``data`` gives Asterisk: the objects of the shard files
        it includes (of any count), or, when it is not a sharded main file (the single-file
        layout), its own.  ``strict`` and a file holding what provisioner never writes: as
        for :meth:`ConfigFileTarget._current`."""
        current = Current.of_main(self.path, data, self.directory, strict=strict)
        return refuse_foreign(self.path, current)

    def _prepared(
        self, index: int, users: list[UserObjects], keep: Collection[str], *, count: bool = True
    ) -> tuple[ConfigFileTarget, PendingWrite]:
        """Shard ``index``'s target and its apply of ``users``, worked out, not written."""
        target = self._file(index)
        with _naming(target.path):
            return target, target.prepare(users, keep, count=count)

    def _prepare(self, objects: Sequence[UserObjects], keep: Collection[str]) -> _Layout:
        """Every shard file rendered and checked, the change counted; nothing put in place
        (a new set's files are staged, see :meth:`_fresh_files`: the caller commits or
        discards the layout).  A shard that fails its check raises, no staged file left,
        so nothing at all is written (as for one file)."""
        main = self._main_data()
        old_main = read_file(self.path)
        if old_main == main:
            # Asterisk reads this set: each shard is compared with its own file.
            files = self._found_files(objects) if self._cold(keep) else None
            if files is None:
                keeps = self._kept_by_shard(keep)
                groups = enumerate(self._groups(objects))
                files = [self._prepared(i, group, keeps[i]) for i, group in groups]
            return _Layout(_summed(p.change for _, p in files), files, main, old_main)
        # A first apply, a new shard count, or the single-file layout before: the change is
        # counted against what the current main file gives Asterisk.
        current = self._current(old_main)
        desired = with_kept(objects, kept_objects(current, keep, objects))
        files, ids = self._fresh_files(desired)
        try:
            if old_main is None:
                # Asterisk holds none of them: every user is added, counted as the one-file
                # target counts its first apply, with the section ids its check made (a
                # second pass over 100k users cost 0.2 s: finding them distinct again).
                named = ids is not None and _named_of(ids) is not None
                change = all_added(desired, distinct=named, ids=ids)
            else:
                change = compare(current, desired)
        except BaseException:
            _discard(files)
            raise
        return _Layout(change, files, main, old_main)

    def _fresh_files(
        self, desired: list[UserObjects]
    ) -> tuple[list[tuple[ConfigFileTarget, PendingWrite]], list[str] | None]:
        """Every shard file's apply of ``desired`` (each change left empty), and the users'
        section ids when the check made them (None: it did not).  Whatever it raises, no
        staged temporary file is left.

        The users' canonical chunks are made in ``desired``'s order and split by shard;
        each shard's target renders and checks its header and stages its file
        (:meth:`ConfigFileTarget.prepare_chunks`: written and fsynced by other threads,
        invisible to Asterisk); then every chunk is checked in one batch, in
        ``desired``'s order, exactly as the one-file target checks its file, while those
        writes run.  Made and checked shard by shard, every user's objects were read in
        an order scattered over memory (a shard's users are spread over all of them), and
        all shards cost more CPU than the one file.  Chunks the check refuses (a value
        left to the parser) or a layout override: the staged files are discarded and
        every shard prepared the general way; a shard whose header is not plain: that
        shard (rendered, and parsed back unless canonical, by its own target)."""
        chunks = self._chunks(desired)
        if chunks is None:
            return self._general_files(desired), None
        files: list[tuple[ConfigFileTarget, PendingWrite]] = []
        try:
            self._chunk_files(desired, chunks, files, background=True)
            ids = section_ids(desired)
            if _plain_join(desired, chunks, ids=ids) is None:
                _discard(files)
                return self._general_files(desired), None
        except BaseException:
            _discard(files)
            raise
        return files, ids

    def _cold(self, keep: Collection[str]) -> bool:
        """True when no shard's target has verified any bytes yet (a new object: a
        restart, ``sync --once``) and no user is kept as its file holds it: a full apply
        then takes :meth:`_found_files`.  A target that has (the daemon's later full
        applies) finds each shard's users equal to those it verified, with no chunk made
        (~0.05 s at 100k users, against ~0.7 s for every chunk and check)."""
        return not keep and not any(target.verified for target in self._targets.values())

    def _found_files(
        self, users: Sequence[UserObjects]
    ) -> list[tuple[ConfigFileTarget, PendingWrite]] | None:
        """Every shard file's apply of ``users`` into the files this set's main file
        includes, each change counted; None when the chunks are not all canonical (or the
        layout is overridden): the caller then prepares each shard the general way.

        As :meth:`_fresh_files` does, every user's chunk is made and checked in one batch
        in the users' order (shard by shard, those reads miss the cache: 1.17-1.19 s of CPU
        at 100k users and 64 shards, against 0.64 s for the one file); then each shard's
        target compares its header and chunks with its file's bytes, the one file's
        shortcut (a file holding exactly the verified bytes is not parsed), and counts
        its change.  Nothing is staged: a file found unchanged is not written at all."""
        desired = list(users)
        chunks = self._chunks(desired)
        if chunks is None:
            return None
        ids = section_ids(desired)
        if _plain_join(desired, chunks, ids=ids) is None:
            return None
        # Distinct as a whole means distinct in each shard: no shard finds it again.
        distinct = _named_of(ids) is not None
        files: list[tuple[ConfigFileTarget, PendingWrite]] = []
        self._chunk_files(desired, chunks, files, count=True, distinct=distinct)
        return files

    def _chunk_files(
        self,
        users: list[UserObjects],
        chunks: list[str],
        files: list[tuple[ConfigFileTarget, PendingWrite]],
        *,
        background: bool = False,
        count: bool = False,
        distinct: bool = False,
    ) -> None:
        """Append to ``files`` each shard's apply of its share of ``users`` (whose canonical
        chunks are ``chunks``), in shard order, by :meth:`ConfigFileTarget.prepare_chunks`
        with ``background``, ``count`` and ``distinct``; a shard whose header is not plain
        prepared by its own target, the general way.  Appended one by one, so a caller
        that discards ``files`` when this raises discards what was staged before."""
        users_by, chunks_by = self._split(users, chunks)
        for index, (group, texts) in enumerate(zip(users_by, chunks_by, strict=True)):
            target = self._file(index)
            with _naming(target.path):
                pending = target.prepare_chunks(
                    group, texts, background=background, count=count, distinct=distinct
                )
            if pending is None:
                files.append(self._prepared(index, group, (), count=count))
            else:
                files.append((target, pending))

    def _general_files(
        self, desired: list[UserObjects]
    ) -> list[tuple[ConfigFileTarget, PendingWrite]]:
        """Every shard file's apply of ``desired`` by its own target's :meth:`prepare`."""
        groups = enumerate(self._groups(desired))
        return [self._prepared(i, group, (), count=False) for i, group in groups]

    def _chunks(self, users: list[UserObjects]) -> list[str] | None:
        """Each user's text under the shipped layout (:func:`.canonical._chunk_text`, not
        checked yet); None when the layout templates are overridden or a value is not a
        str (left to Jinja and the parser)."""
        if not self._templates.direct:
            return None
        try:
            return list(map(_chunk_text, users))
        except TypeError:
            return None

    def _split(
        self, users: list[UserObjects], chunks: list[str]
    ) -> tuple[list[list[UserObjects]], list[list[str]]]:
        """``users`` and their ``chunks`` by shard, each list in their order."""
        count = self.shards
        users_by: list[list[UserObjects]] = [[] for _ in range(count)]
        chunks_by: list[list[str]] = [[] for _ in range(count)]
        for user, chunk in zip(users, chunks, strict=True):
            at = shard_of(user.endpoint_id, count)
            users_by[at].append(user)
            chunks_by[at].append(chunk)
        return users_by, chunks_by

    def _commit(self, layout: _Layout) -> Change:
        switching = layout.main != layout.old_main
        changes = self._commit_files(layout.files, sync=switching)
        wrote = any(change.wrote for change in changes)
        if switching:
            # Every shard file of this set is on disk, fsynced: only now does the main file
            # name them, in one atomic replace (whose directory fsync also makes the shard
            # directory's entry durable when it sits beside the main file; beside a
            # symbolic link at path, the link's directory is fsynced first).
            if self._beside_a_link():
                sync_directory(self.directory.parent)
            write_file(self.path, layout.main, backup=layout.old_main is not None)
            wrote = True
        self._main, self._main_stamp = layout.main, _file_stamp(self.path)
        # The main file names only this set now: other counts' files (the set before a
        # switch, or one a crash cut short) can go.
        drop_stale_backup(self.path, retire_shards(self.path, self.shards))
        return replace(layout.change, wrote=wrote)

    def _beside_a_link(self) -> bool:
        """True when the shard directory is not in the directory the main file is replaced
        in (``path`` is a symbolic link into another directory)."""
        main_dir = os.path.realpath(real_path(self.path).parent)
        return os.path.realpath(self.directory.parent) != main_dir

    def _commit_files(
        self, files: list[tuple[ConfigFileTarget, PendingWrite]], *, sync: bool = False
    ) -> list[Change]:
        """Write the shard files' pending applies, then fsync the shard directory once
        (not once per file: 1,024 of them cost ~0.25 s) before anything names them:
        when a file was written, or always with ``sync`` (the main file is about to name
        them: files found in place may be a killed writer's renames, not yet durable).

        Many files are written by ``WRITERS`` threads at once: each write waits on its
        fsync, and the disk serves several at once (1,024 files of 60 kB: 0.2-0.36 s
        against 0.43-0.63 s one after another).  Each file is its own target's, so the
        threads share nothing; the first failure is raised once every write has ended,
        and the main file, written after, then names nothing new.  Files a first apply
        staged (:meth:`_fresh_files`) are being written already: each is only renamed,
        one after the other, once its own write has ended."""
        if all(pending.staged is not None for _, pending in files if pending.write):
            changes = _publish_each(files)
        elif sum(pending.write for _, pending in files) < PARALLEL_FILES:
            changes = [target.commit(pending, sync_directory=False) for target, pending in files]
        else:
            # Leaving the block waits for every write.
            with ThreadPoolExecutor(WRITERS, thread_name_prefix="shard-write") as pool:
                running = [pool.submit(t.commit, p, sync_directory=False) for t, p in files]
            changes = [future.result() for future in running]
        if sync or any(change.wrote for change in changes):
            sync_directory(self.directory)
        return changes

    def plan(
        self, objects: Sequence[UserObjects], *, keep: Collection[str] = (), verify: bool = False
    ) -> Change:
        """What :meth:`apply` would change, with the unified diffs of the main file (when it
        would change) and of each shard file that would change; writes nothing."""
        with self._templates.hold():
            main = self._main_data()
            old_main = read_file(self.path)
            if old_main == main:
                keeps = self._kept_by_shard(keep)
                changes = [
                    self._file(i).plan(group, keep=keeps[i])
                    for i, group in enumerate(self._groups(objects))
                ]
                return replace(_summed(changes), diff="".join(c.diff for c in changes))
            current = self._current(old_main)
            desired = with_kept(objects, kept_objects(current, keep, objects))
            diffs = [unified_diff(self.path, old_main, main.decode("utf-8"))]
            # Each new shard file against the credentials Asterisk holds now, in whichever
            # file of the old layout: an unchanged one is not marked <changed>.
            held = current.secrets()
            for i, group in enumerate(self._groups(desired)):
                text = self._file(i).render_text(group)
                diffs.append(unified_diff(self.files[i], read_file(self.files[i]), text, held=held))
            return replace(compare(current, desired), diff="".join(diffs))

    def endpoints_of(self, usernames: Collection[str]) -> dict[str, list[str]]:
        """The endpoint ids of every file the main file includes (or of the main file
        itself, in the single-file layout) whose auth's ``username`` is one of
        ``usernames``, by username (see :func:`.holdings.endpoints_of`).  Under this set's
        main file only the shard files that may name one of them are parsed (see
        :meth:`ConfigFileTarget.endpoints_of`)."""
        main = read_file(self.path)
        if not usernames or main is None:
            return {}
        if main != self._main_data():
            # Another layout or shard count: read as Asterisk reads it now.
            return endpoints_of(self._current(main), usernames)
        found: dict[str, list[str]] = {}
        for index in range(self.shards):
            for name, ids in self._file(index).endpoints_of(usernames).items():
                found.setdefault(name, []).extend(ids)
        return {name: sorted(ids, key=endpoint_order) for name, ids in found.items()}

    def apply(
        self,
        objects: Sequence[UserObjects],
        *,
        keep: Collection[str] = (),
        guard: Callable[[Change], None] | None = None,
        verify: bool = False,
    ) -> Change:
        """Make the shard files hold ``objects`` and the current objects of the ``keep``
        endpoint ids, and the main file include them (see the class docstring).

        Every shard file is rendered and checked before any is written: one that fails
        raises :class:`RenderCheckFailed` naming it, and nothing is written.  ``guard``
        sees the change of all files together and may raise to abort.  Only the files
        whose bytes differ are written; ``Change.wrote`` says whether any was.  All of it
        holds the main file's writers' lock (:func:`.files.writers_lock`), the guard's look
        included: a second writer reads what this one wrote."""
        with writers_lock(self.path):
            return self._apply(objects, keep, guard)

    def _apply(
        self,
        objects: Sequence[UserObjects],
        keep: Collection[str] = (),
        guard: Callable[[Change], None] | None = None,
    ) -> Change:
        """:meth:`apply`, the writers' lock held by the caller."""
        # The collector paused as for one file: at 100k users its passes over the users'
        # chunks and lists being built cost a large part of a full apply's CPU.
        with self._templates.hold(), collector_paused():
            layout = self._prepare(objects, keep)
        try:
            if guard is not None:
                guard(layout.change)
        except BaseException:
            _discard(layout.files)
            raise
        return self._commit(layout)

    def apply_partial(self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]) -> Change:
        """:meth:`ConfigFileTarget.apply_partial` on the shard files of these users only:
        the other shard files are not read, checked or written, nor is the main file (once
        this object knows it includes this set).  Every touched shard is checked before
        any is written.  A main file that does not include this set (another shard count
        or layout) makes this a full :meth:`apply` of the edited current users.  Holds the
        writers' lock as :meth:`apply` does."""
        with writers_lock(self.path):
            return self._apply_partial(upserts, removed_ids)

    def _apply_partial(self, upserts: Sequence[UserObjects], removed_ids: Sequence[str]) -> Change:
        """:meth:`apply_partial`, the writers' lock held by the caller."""
        with self._templates.hold():
            main_gone = self._main_gone()
            if not main_gone and not self._includes_this_set():
                return self._apply(edited(self._file_users(), upserts, removed_ids))
            count = self.shards
            edits: dict[int, tuple[list[UserObjects], list[str]]] = {}
            for user in upserts:
                edits.setdefault(shard_of(user.endpoint_id, count), ([], []))[0].append(user)
            for endpoint_id in removed_ids:
                edits.setdefault(shard_of(endpoint_id, count), ([], []))[1].append(endpoint_id)
            files: list[tuple[ConfigFileTarget, PendingWrite]] = []
            missing = self._missing()
            if missing:
                gone = [self.files[i].name for i in sorted(missing)]
                log.warning("target.shards_missing", directory=str(self.directory), files=gone)
            for index in sorted(edits):
                target = self._file(index)
                with _naming(target.path):
                    pending = target.prepare_partial(*edits[index])
                if index in missing and not pending.write:
                    pending = replace(pending, write=True, backup=False)  # the same bytes, gone
                files.append((target, pending))
            restored = sorted(missing - edits.keys())
            for index in restored:
                again = self._file(index).prepare_restore()
                if again is None:
                    # Never read by this object: its users are known from no file.
                    return self._apply(edited(self._file_users(), upserts, removed_ids))
                files.append((self._file(index), again))
        change = _summed(self._commit_files(files, sync=main_gone))
        self._complete = _stamp(self.directory)  # every shard file is there again
        if main_gone and self._main is not None:
            # Only now: every file it includes is on disk (written above if it was gone).
            if self._beside_a_link():
                sync_directory(self.directory.parent)
            write_file(self.path, self._main, backup=False)
            self._main_stamp = _file_stamp(self.path)
            change = replace(change, wrote=True)
        # As for one file, every user not added or updated counts as unchanged: those of
        # the shard files this object has read (all of them after a full apply, as in
        # the daemon; a fresh object reads only the shards it edits).
        others = sum(
            t.known_users for i, t in self._targets.items() if i not in edits and i not in restored
        )
        return replace(change, unchanged=change.unchanged + others)

    def _missing(self) -> set[int]:
        """The shards whose file the main file includes but is gone (a shard directory
        removed by hand): an edit writes them again, or the reload it asks for would find
        a missing include, and Asterisk drops the whole configuration for one.  The
        directory is listed only when its stamp moved since every file was known there
        (a deletion moves it; so do this object's own writes, after which it is taken)."""
        stamp = _stamp(self.directory)
        if stamp is not None and stamp == self._complete:
            return set()
        try:
            present = set(os.listdir(self.directory))
        except FileNotFoundError:
            present = set()
        missing = {self._indexes[name] for name in self._indexes.keys() - present}
        self._complete = None if missing else stamp
        return missing

    def _main_gone(self) -> bool:
        """True when the main file this object wrote or found including this set is gone
        (deleted by hand): an edit writes it again, as it writes missing shard files,
        rather than leave Asterisk without any endpoint until the next full reconcile.
        Logs ``target.main_missing``.  Before this object knew the file: False (the
        edit then becomes a full apply of what the files hold)."""
        if self._main is None or os.path.exists(self.path):
            return False
        log.warning("target.main_missing", path=str(self.path), restored="at this edit")
        return True

    def _includes_this_set(self) -> bool:
        """True when the main file includes exactly this set: read once, then again only
        when its stamp (:func:`_file_stamp`) moved (replaced or edited by hand)."""
        stamp = _file_stamp(self.path)
        if self._main is not None and stamp == self._main_stamp:
            return True
        main = self._main_data()
        if read_file(self.path) != main:
            self._main = self._main_stamp = None
            return False
        self._main, self._main_stamp = main, stamp
        return True

    def _file_users(self) -> list[UserObjects]:
        """Every user the current main file gives Asterisk (see ConfigFileTarget's); the
        shard files this object knows the main file includes when it was deleted (read as
        none, every shard file would be written with the edited users alone)."""
        data = read_file(self.path)
        current = self._current(self._main if data is None else data, strict=True)
        return kept_objects(current, current.endpoints, ())

    def render_files(self, objects: Sequence[UserObjects]) -> dict[Path, str]:
        """Each file's text for ``objects``: the main file, then every shard file."""
        with self._templates.hold():
            texts = {self.path: self._main_data().decode("utf-8")}
            for i, group in enumerate(self._groups(objects)):
                texts[self.files[i]] = self._file(i).render_text(group)
        return texts
