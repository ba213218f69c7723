"""The sharded layout's files, pure where it can be: shard names, which shard holds a
user, where the shard files live, the main file that includes them, and the removal of
a shard set no main file includes any more.

The sharded target itself is :class:`~provisioner.targets.sharded.ShardedConfigFileTarget`;
the single-file target uses these too, to take over from a sharded layout.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

from ..asterisk_conf import Parsed, parse
from ..errors import AsteriskSyntaxError, Problem, RenderCheckFailed, TargetWriteFailed
from ..logs import get_logger
from .files import backup_of, real_path, sync_directory
from .textdiff import hide_digests

__all__ = [
    "INCLUDABLE",
    "INCLUDE_PATH_MAX",
    "MAX_SHARDS",
    "SHARD_TEMPORARIES",
    "check_main",
    "drop_stale_backup",
    "includes_of",
    "main_text",
    "retire_shards",
    "shard_directory",
    "shard_directory_problem",
    "shard_files",
    "shard_name",
    "shard_of",
]

log = get_logger(__name__)

#: The most shard files a target may have (``target.shards``).
MAX_SHARDS = 4096
#: A shard file's name: its index and the shard count, so that two counts never share a
#: name and a new count writes a whole new set beside the old one.
_SHARD_NAME = re.compile(r"([0-9]{4})-of-([0-9]{4})\.conf")
#: The temporaries of any shard file (``files.temporary`` names them so).
SHARD_TEMPORARIES = ".[0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9].conf.*.tmp"
#: What a shard directory's absolute path may hold: characters an ``#include`` argument
#: keeps literally (no comment, quote or escape mark, and none of the glob characters
#: Asterisk expands in an include: ``* ? [ ] { } ~``).
INCLUDABLE = re.compile(r"/[A-Za-z0-9/._+@,:= -]*")
#: The longest path (in bytes) Asterisk opens for an ``#include``: its loader
#: (``config_text_file_load`` in ``main/config.c``) copies the path into ``char fn[256]``,
#: so a longer one is cut short and names no file, and an ``#include`` of a missing file
#: makes Asterisk drop the whole configuration.
INCLUDE_PATH_MAX = 255


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count``, e.g. ``0007-of-0256.conf``."""
    return f"{index:04d}-of-{count:04d}.conf"


def shard_files(path: Path, count: int) -> tuple[Path, ...]:
    """The ``count`` shard files of the main file ``path``, in shard order: what its main
    file includes."""
    directory = shard_directory(path)
    return tuple(directory / shard_name(i, count) for i in range(count))


def shard_of(endpoint_id: str, count: int) -> int:
    """The shard of ``count`` that holds the user of ``endpoint_id``: CRC-32 of the id's
    UTF-8 bytes, so every process agrees (``hash()`` of a str differs between processes)."""
    return zlib.crc32(endpoint_id.encode("utf-8", "surrogatepass")) % count


def shard_directory_problem(path: Path) -> Problem | None:
    """Why the main file ``path`` cannot have a sharded layout (its shard directory cannot
    be named in an ``#include``, or its shard files' paths are longer than Asterisk opens),
    or None; pure: the constructor and ``check`` ask it."""
    directory = shard_directory(path)
    if directory == Path(os.path.abspath(path)) or not INCLUDABLE.fullmatch(str(directory)):
        return Problem(
            "target.path",
            f"the shard directory {str(directory)!r} cannot be #included by "
            "Asterisk: use letters, digits and / . _ + @ , : = - or space",
        )
    # Every shard file's name has the same length (INCLUDABLE: one byte a character).
    first = str(directory / shard_name(0, 1))
    if len(first) > INCLUDE_PATH_MAX:
        return Problem(
            "target.path",
            f"the shard files' paths (such as {first!r}) would be {len(first)} bytes, and "
            f"Asterisk's #include opens at most {INCLUDE_PATH_MAX}: use a shorter path",
        )
    return None


def shard_directory(path: Path) -> Path:
    """Where a sharded layout of the main file ``path`` keeps its shard files: ``<stem>.d``
    beside it, as an absolute path without resolving symlinks (the path Asterisk is told,
    as the operator named it: Asterisk resolves a relative ``#include`` against its own
    config directory, not against the including file's)."""
    absolute = Path(os.path.abspath(path))
    return absolute.with_name(absolute.stem + ".d")


def main_text(header: str, files: Sequence[Path]) -> str:
    """A sharded layout's main file: ``header``, a blank line, one ``#include`` per file."""
    if header and not header.endswith("\n"):
        header += "\n"
    return header + "\n" + "".join(f'#include "{path}"\n' for path in files)


def check_main(data: bytes, files: Sequence[Path]) -> None:
    """Raise :class:`RenderCheckFailed` unless ``data``, read as Asterisk reads it, is one
    ``#include`` of each of ``files``, in order, and nothing else: no section, no other
    directive, no line Asterisk would skip."""
    try:
        parsed = parse(data)
    except AsteriskSyntaxError as exc:
        raise RenderCheckFailed(f"the main file would not load: {exc.plain_message}") from None
    # No name nor other text of the file is quoted: its header comes from a template an
    # override may make print any value, a digest included.
    problems = [f"line {s.line} holds a section" for s in parsed.sections]
    problems += [f"line {n.line}: {n.plain}" for n in parsed.notices]
    got = [(d.name, d.argument) for d in parsed.directives]
    if got != [("include", str(path)) for path in files]:
        problems.append(
            f"it has {len(got)} directives instead of one #include of each of the "
            f"{len(files)} shard files, in order"
        )
    if problems:
        raise RenderCheckFailed(
            "the main file does not include exactly the shard files: "
            + hide_digests("; ".join(problems))
        )


def includes_of(directory: Path, parsed: Parsed) -> list[Path] | None:
    """The files the main file ``parsed`` includes when it is what a sharded layout writes
    (nothing but ``#include`` lines of shard files in ``directory``); else None."""
    if parsed.sections or parsed.notices or not parsed.directives:
        return None
    files: list[Path] = []
    for directive in parsed.directives:
        path = Path(directive.argument or "")
        if directive.name != "include" or path.parent != directory:
            return None
        if not _SHARD_NAME.fullmatch(path.name):
            return None
        files.append(path)
    return files


def retire_shards(main: Path, count: int | None) -> list[Path]:
    """Delete the shard files of the main file ``main`` (in its :func:`shard_directory`,
    with their ``.bak``) of every shard count but ``count`` (None: all of them, then the
    directory if that leaves it empty); return them.  Only ever called once the main file
    includes none of them, and only once that main file is durable: the directory it is
    in (where a symbolic link at ``main`` leads) is fsynced first.

    Leftovers are harmless (Asterisk reads only what the main file includes), so a file
    that cannot be deleted is logged, not raised: the apply that switched the main file
    still reports its change, and the next full apply tries again."""
    directory = shard_directory(main)
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("target.cleanup_failed", path=str(directory), error=exc.strerror)
        return []
    removed: list[Path] = []
    retired = [name for name in names if _retired(name, count)]
    if retired and _main_file_synced(main):
        removed = [path for path in (directory / name for name in retired) if _delete(path)]
    if count is None:
        with contextlib.suppress(OSError):  # not empty: it holds files that are not ours
            directory.rmdir()
    return removed


#: Bytes of a main file's backup read for the shard files it names: a sharded layout's
#: main file is a header and its includes; a one-file layout's (megabytes) names none.
BACKUP_HEAD = 1 << 20


def drop_stale_backup(main: Path, removed: Sequence[Path]) -> bool:
    """Delete ``main``'s ``.bak`` when it includes one of the shard files ``removed`` (by
    :func:`retire_shards`): restored by hand, it would name a missing file, and Asterisk
    drops its whole configuration for one missing include.  Logged as
    ``target.backup_dropped``; a failure is logged, not raised (as a leftover shard)."""
    names = {path.name.encode() for path in removed if not path.name.endswith(".bak")}
    if not names:
        # Nothing removed (every full apply of a one-file layout): no backup to read.
        return False
    backup = backup_of(main)
    try:
        with backup.open("rb") as handle:
            head = handle.read(BACKUP_HEAD)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("target.cleanup_failed", path=str(backup), error=exc.strerror)
        return False
    if not any(name in head for name in names) or not _delete(backup):
        return False
    log.info("target.backup_dropped", path=str(backup), reason="it includes deleted shard files")
    return True


def _retired(name: str, count: int | None) -> bool:
    """True for the name of a shard file (or its ``.bak``) of a count other than ``count``."""
    found = _SHARD_NAME.fullmatch(name.removesuffix(".bak"))
    return found is not None and int(found.group(2)) != count


def _main_file_synced(main: Path) -> bool:
    """fsync the directory the main file ``main`` was replaced in (where a symbolic link
    at ``main`` leads: not the link's own, beside the shard directory); False (logged) if
    that fails.  The writer that replaced the main file may have been killed before its
    own fsync: were the shard files' removal durable and not the main file's replacement,
    a power loss would bring back a main file including missing files, and Asterisk drops
    the whole configuration for one missing include."""
    directory = real_path(main).parent
    try:
        sync_directory(directory)
    except TargetWriteFailed as exc:
        log.warning("target.cleanup_failed", path=str(directory), error=str(exc))
        return False
    return True


def _delete(path: Path) -> bool:
    """Unlink ``path``; False when it is gone already or cannot be (logged)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("target.cleanup_failed", path=str(path), error=exc.strerror)
        return False
    return True
