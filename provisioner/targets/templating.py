"""The Jinja2 templates a config file is rendered from: the shipped ones in
``templates/pjsip/``, each overridable from the ``target.templates`` directory.

:class:`Templates` is the environment over both directories, rebuilt when a template file
is added, removed or modified, and shared between targets searching the same files;
``direct`` says whether the layout templates are still the shipped ones (so the
config-file target may write each user's canonical text without Jinja).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2 import nodes

from ..asterisk_conf import parse
from ..errors import AsteriskSyntaxError, ConfigError, Problem, RenderCheckFailed
from ..logs import get_logger

__all__ = [
    "MAIN_TEMPLATE",
    "SHIPPED_TEMPLATES",
    "Templates",
    "editor_file",
    "plain_header",
    "template_files",
]


log = get_logger(__name__)


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


#: The templates laying out the users; while none is overridden or edited,
#: :meth:`ConfigFileTarget.render_text` writes their output directly.
_LAYOUT_TEMPLATES = {
    MAIN_TEMPLATE: "3e2ad2bb84bb747dfaa676e6983f95caec347208b7ceb7f2c83eae10bc14f0fc",
    "user.j2": "2d077af1fb7e2637c2b64afa544a27914421283a8fd88f85170efabff745e28f",
    "section.j2": "2bb7ac5b9e52ee9c782cc1a798c1bc82ff68c2b40d8bf6c7b0a83ddaaabd17ac",
}


#: Suffixes of the files editors write beside the one they edit: vim's swap files (when
#: not hidden), Emacs's and vim's backups, JetBrains' safe-write temporaries.
_EDITOR_SUFFIXES = (".swp", ".swo", ".swx", "~", "___jb_tmp___", "___jb_old___")
#: vim's probe of a directory before it writes there: a file named 4913 (then 5036, ...
#: while taken), made and deleted at once.
_VIM_PROBE, _VIM_PROBE_STEP = 4913, 123


def editor_file(name: str) -> bool:
    """True for the name of a file an editor keeps beside the one it edits, never a
    template: hidden (vim's ``.x.swp``, Emacs's ``.#x`` lock), a backup (``x~``), an
    autosave (``#x#``), a swap or safe-write temporary, Emacs's ``flycheck_x`` copy,
    vim's write probe (``4913``).
    Such a file neither wakes a render nor changes the templates in use."""
    if name.startswith((".", "flycheck_")) or name.endswith(_EDITOR_SUFFIXES):
        return True
    if len(name) > 1 and name.startswith("#") and name.endswith("#"):
        return True
    if not name.isdigit():
        return False
    return int(name) >= _VIM_PROBE and (int(name) - _VIM_PROBE) % _VIM_PROBE_STEP == 0


def template_files(directory: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under ``directory``, subdirectories included (an override may
    ``{% include "sub/x.j2" %}``), by its path relative to ``directory``, with its status
    (a symbolic link followed); an editor's own files and hidden subdirectories are left
    out (:func:`editor_file`).  An entry that cannot be looked at (a dangling symlink,
    or one deleted meanwhile) is left out: no template is read from it either.  A
    directory reached twice (a link loop) is read once.  :class:`OSError` only when
    ``directory`` itself cannot be read."""
    files: list[tuple[str, os.stat_result]] = []
    seen: set[tuple[int, int]] = set()

    def walk(folder: str, prefix: str) -> None:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            return
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if editor_file(entry.name):
                    continue
                try:
                    if entry.is_dir():
                        walk(entry.path, f"{prefix}{entry.name}/")
                    else:
                        files.append((prefix + entry.name, entry.stat()))
                except OSError:
                    continue

    walk(str(directory), "")
    return files


def _is_shipped(searched: list[Path], name: str) -> bool:
    """True when the loader finds ``name`` in the shipped directory, with the known content."""
    for directory in searched:
        path = directory / name
        # An entry that cannot be read too (a dangling link): the render then says so.
        if os.path.lexists(path):
            if directory != SHIPPED_TEMPLATES:
                return False
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                return False
            return digest == _LAYOUT_TEMPLATES[name]
    return False


def plain_header(header: str) -> bool:
    """True when ``header`` parses to nothing at all: no section, directive or notice
    (so no block comment is left open and no later line is hidden)."""
    try:
        parsed = parse(header.encode("utf-8"))
    except AsteriskSyntaxError:
        return False
    return not (parsed.sections or parsed.directives or parsed.notices)


def _unreadable(path: str) -> str | None:
    """Why the entry at ``path`` holds no template text (a symbolic link to nothing, a
    directory, anything but a regular file, one the process may not stat), or None for a
    regular file and for no entry at all."""
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symbolic link to nothing"
    except OSError as exc:
        return _cannot_open(exc)
    if stat.S_ISDIR(mode):
        return "is a directory"
    # Not opened: a FIFO would block the render until someone wrote to it.
    return None if stat.S_ISREG(mode) else "is not a regular file"


def _cannot_open(exc: OSError) -> str:
    """``cannot be opened: <the system's reason>``, in lower case (``permission denied``)."""
    reason = exc.strerror or type(exc).__name__
    return f"cannot be opened: {reason[:1].lower()}{reason[1:]}"


class _Loader(jinja2.FileSystemLoader):
    """Jinja's loader of template files: a file that is not UTF-8 refused by name, an
    entry that cannot be read refused by path (never passed over for the next directory's
    template of that name), and a byte-order mark starting a file dropped."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        """The template's text, without a UTF-8 byte-order mark at its start (one that
        Windows editors write: it marks the encoding, it is no text of the file, and mid-file
        Asterisk would read it as a line); :class:`RenderCheckFailed` naming the template
        and line when its bytes are not UTF-8 (an override saved as Latin-1, say), and
        naming the template, its path and why when the first directory holding an entry of
        that name cannot give its text (a dangling symbolic link, a directory, no read
        permission): Jinja's loader would render the shipped template in its place."""
        self._check_readable(template)
        try:
            source, filename, uptodate = super().get_source(environment, template)
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise RenderCheckFailed(f"template {template!r} is not UTF-8 (line {line})") from None
        except jinja2.TemplateNotFound:
            # An OSError too, but no failure here: ``include ... ignore missing`` and an
            # include of a list (the first that exists) go on without it.
            raise
        except OSError as exc:
            path = exc.filename if isinstance(exc.filename, str) else template
            raise RenderCheckFailed(
                f"template {template!r} cannot be read: {path!r} {_cannot_open(exc)}"
            ) from None
        return source.removeprefix("\ufeff"), filename, uptodate

    def _check_readable(self, template: str) -> None:
        """:class:`RenderCheckFailed` when the first entry named ``template`` in the
        searched directories is no readable regular file."""
        pieces = jinja2.loaders.split_template_path(template)
        for directory in self.searchpath:
            path = os.path.join(directory, *pieces)
            why = _unreadable(path)
            if why is not None:
                raise RenderCheckFailed(f"template {template!r} cannot be read: {path!r} {why}")
            if os.path.lexists(path):
                return


def _environment(searched: Sequence[Path]) -> jinja2.Environment:
    """A sandbox: an override template reaches no Python internals (``__class__``,
    ``__globals__``) and calls no mutating method (a :class:`jinja2.TemplateError`)."""
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=_Loader([str(d) for d in searched]),
        undefined=jinja2.StrictUndefined,
        # A config file, not HTML: escaping would corrupt it; check_rendered guards it.
        autoescape=False,
        keep_trailing_newline=True,
        # Not a stat per get_template: Templates.fresh() looks once per render.
        auto_reload=False,
    )


#: Environments (and whether the layout is the shipped one) by (directories searched,
#: their files' names, mtimes and sizes); the last few used, across targets.
_ENVIRONMENTS: dict[tuple[Any, ...], tuple[jinja2.Environment, bool]] = {}
_ENVIRONMENTS_KEPT = 8
_ENVIRONMENTS_LOCK = threading.Lock()


class Templates:
    """The Jinja2 environment over the template directories (the override directory, then
    the shipped one), rebuilt whenever a file in them is added, removed or modified.

    A sharded target's files share one: one apply renders every file with one version of
    the templates, and the files are looked at once per apply (:meth:`hold`), not per file.
    """

    def __init__(self, templates_dir: Path | None) -> None:
        if templates_dir is not None and not templates_dir.is_dir():
            raise ConfigError(
                [Problem("target.templates", f"{str(templates_dir)!r} is not a directory")]
            )
        self.searched = [
            *([templates_dir] if templates_dir is not None else []),
            SHIPPED_TEMPLATES,
        ]
        #: The override directory (``target.templates``), and whether it was found gone.
        self._override = templates_dir
        self._override_missing = False
        #: The last header checked by plain_header, and the answer.
        self._header_seen: tuple[str, bool] = ("", False)
        #: Inside hold(), and whether the files were looked at since it began.
        self._holding = False
        self._looked = False
        self._stamp = self._template_stamp()
        self._rebuild()

    def _rebuild(self) -> None:
        """The Environment for the template files as they are now (shared with every other
        target that searches the same directories holding the same files: compiling the
        templates costs as much as rendering a thousand users); direct rendering only while
        the layout templates are ours."""
        key = (tuple(self.searched), self._stamp)
        with _ENVIRONMENTS_LOCK:  # targets may be built and used in several threads
            found = _ENVIRONMENTS.pop(key, None)
            if found is None:
                env = _environment(self.searched)
                shipped = all(_is_shipped(self.searched, name) for name in _LAYOUT_TEMPLATES)
                found = (env, shipped)
            _ENVIRONMENTS[key] = found  # the most recently used last
            while len(_ENVIRONMENTS) > _ENVIRONMENTS_KEPT:
                del _ENVIRONMENTS[next(iter(_ENVIRONMENTS))]
        self.env, self.direct = found

    def _template_stamp(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """Path, device, inode, mtime and size of every file in the template directories
        and their subdirectories (:func:`template_files`; the inode: a file renamed over
        another of the same size and mtime is new)."""
        stamp: list[tuple[str, int, int, int, int]] = []
        for directory in self.searched:
            with contextlib.suppress(OSError):
                for name, info in template_files(directory):
                    stamp.append(
                        (
                            os.path.join(directory, name),
                            info.st_dev,
                            info.st_ino,
                            info.st_mtime_ns,
                            info.st_size,
                        )
                    )
        return tuple(sorted(stamp))

    def reload(self) -> None:
        """Read the templates afresh at the next render (never from the shared cache: a
        file can be replaced keeping its mtime and size)."""
        self._stamp = self._template_stamp()
        with _ENVIRONMENTS_LOCK:
            _ENVIRONMENTS.pop((tuple(self.searched), self._stamp), None)
        self._rebuild()

    def fresh(self) -> jinja2.Environment:
        """The Environment, rebuilt first when the template files changed since the last
        look (inside :meth:`hold`, only the first call looks)."""
        if self._holding:
            if self._looked:
                return self.env
            self._looked = True
        stamp = self._template_stamp()
        self._look_at_override()
        if stamp != self._stamp:
            self._stamp = stamp
            self._rebuild()
        return self.env

    def _look_at_override(self) -> None:
        """Log the override directory's disappearance (``templates.directory_missing``, a
        warning) and its return (``templates.directory_back``), once each.  The loader
        skips a missing directory, so renders fall back to the shipped templates: an
        operator must hear of it, the more so as a restart refuses the configuration."""
        if self._override is None:
            return
        missing = not self._override.is_dir()
        if missing == self._override_missing:
            return
        self._override_missing = missing
        if missing:
            log.warning(
                "templates.directory_missing",
                path=str(self._override),
                rendering_with="the shipped templates",
                on_restart="target.templates is refused until the directory is back",
            )
        else:
            log.info("templates.directory_back", path=str(self._override))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, look at the template files at the first render only."""
        if self._holding:
            yield
            return
        self._holding, self._looked = True, False
        try:
            yield
        finally:
            self._holding = False

    @contextlib.contextmanager
    def templating(self) -> Iterator[jinja2.Environment]:
        """The fresh Environment; a template that fails to compile or render (a Jinja error,
        or a Python one raised by its code) becomes :class:`RenderCheckFailed`, naming the
        template and line (never the error's message)."""
        try:
            yield self.fresh()
        except jinja2.TemplateSyntaxError as exc:
            line = f"{exc.name or exc.filename or '?'} line {exc.lineno}"
            raise RenderCheckFailed(f"template {line}: {exc.message}") from None
        except jinja2.TemplatesNotFound as exc:
            tried = ", ".join(repr(str(name)) for name in exc.templates)
            raise RenderCheckFailed(f"none of templates {tried} found") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderCheckFailed(f"template {exc.name!r} not found") from None
        except RenderCheckFailed:
            raise  # already says which template (one that is not UTF-8)
        except Exception as exc:
            # A Jinja error, or Python's (ZeroDivisionError, TypeError) raised by an
            # override's expression; an error of this code (no template in its traceback)
            # goes on as it is.
            where = self._where(exc.__traceback__)
            if where is None and not isinstance(exc, jinja2.TemplateError):
                raise
            # Not the message: it could quote a value.
            failed = f"templates failed to render ({type(exc).__name__})"
            raise RenderCheckFailed(failed if where is None else f"{failed} at {where}") from None

    def _where(self, trace: TracebackType | None) -> str | None:
        """``<name> line <n>``: the innermost frame of ``trace`` running a template file
        of the searched directories (Jinja names a template's frames after its file);
        None when no frame does."""
        where = None
        while trace is not None:
            path = Path(trace.tb_frame.f_code.co_filename)
            # A subdirectory's template too: named by its path below the directory.
            for directory in self.searched:
                if path.is_relative_to(directory) and path != directory:
                    where = f"{path.relative_to(directory)} line {trace.tb_lineno}"
                    break
            trace = trace.tb_next
        return where

    def compile_all(self) -> None:
        """Compile every template a render may load (the shipped names, wherever the
        loader finds them, each ``*.j2`` file of the override directory and its
        subdirectories but an editor's own, such as swap files, and every template
        these name in an include, import or extends) without rendering it (that takes
        users); :class:`RenderCheckFailed` names the first that fails (a syntax error,
        bytes that are not UTF-8) and its line, or a template one of them names that
        does not exist and the one naming it."""
        names = {path.name for path in SHIPPED_TEMPLATES.glob("*.j2")}
        if self.searched[0] != SHIPPED_TEMPLATES:
            with contextlib.suppress(OSError):
                found = template_files(self.searched[0])  # an editor's files left out
                names.update(name for name, _info in found if name.endswith(".j2"))
        with self.templating() as env:
            todo = sorted(names)
            done = set(todo)
            while todo:
                name = todo.pop(0)
                env.get_template(name)
                for used in _used_templates(env, name):
                    if used not in done:
                        done.add(used)
                        todo.append(used)

    def plain_header(self, header: str) -> bool:
        """:func:`plain_header`, remembered for the last header asked about."""
        seen, plain = self._header_seen
        if seen != header or not seen:
            plain = plain_header(header)
            self._header_seen = (header, plain)
        return plain


def _used_templates(env: jinja2.Environment, name: str) -> list[str]:
    """The templates a render of ``name`` loads by the constant names of its includes,
    imports and extends: of an include of a list, the first that exists; none of one
    marked ``ignore missing`` that does not exist; none of a name computed as it renders.
    :class:`RenderCheckFailed` when a named template (every one of a list) does not
    exist, naming it and ``name``: only a render reaching that line would say so."""
    assert env.loader is not None
    tree = env.parse(env.loader.get_source(env, name)[0], name)
    used: list[str] = []
    loading = (nodes.Extends, nodes.FromImport, nodes.Import, nodes.Include)
    for node in tree.find_all(loading):
        assert isinstance(node, loading)
        choices = _constant_names(node.template)
        if not choices:
            continue  # computed as it renders: nothing to look for now
        present = [choice for choice in choices if _exists(env, choice)]
        if present:
            used.append(present[0])
        elif not getattr(node, "ignore_missing", False):
            if len(choices) == 1:
                raise RenderCheckFailed(f"template {choices[0]!r} not found (in {name})")
            tried = ", ".join(repr(choice) for choice in choices)
            raise RenderCheckFailed(f"none of templates {tried} found (in {name})")
    return used


def _constant_names(node: nodes.Expr) -> list[str]:
    """The template names ``node`` gives as text constants (one, or a list or tuple of
    them); none when any is computed."""
    items = node.items if isinstance(node, (nodes.List, nodes.Tuple)) else [node]
    names = [item.value for item in items if isinstance(item, nodes.Const)]
    if len(names) != len(items) or not all(isinstance(n, str) for n in names):
        return []
    return names


def _exists(env: jinja2.Environment, name: str) -> bool:
    """Whether the loader finds a template ``name`` (one it finds but cannot read is
    found: compiling it names why)."""
    assert env.loader is not None
    try:
        env.loader.get_source(env, name)
    except jinja2.TemplateNotFound:
        return False
    except RenderCheckFailed:
        return True
    return True
