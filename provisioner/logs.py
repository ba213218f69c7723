"""structlog set-up: one key-value event per line, JSON off a terminal, console on one.

Secrets never reach a log: events carry names and counts, and
:func:`drop_secrets` removes any key that looks like a credential as a last
line of defence.

Records of the standard library's ``logging`` (SQLAlchemy's pool failing to reset a
connection a database dropped, asyncio's unretrieved task exception) go the same way,
rendered as structlog events with their ``logger`` name, from warnings up (their info
and debug lines are the libraries' chatter, not the daemon's): without it Python's
last-resort handler wrote them to stderr as plain text, a traceback over many lines,
in the middle of a JSON log.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure", "drop_secrets", "get_logger", "on_journal", "worth_repeating"]


def worth_repeating(count: int, since_said: float, every: float) -> bool:
    """Whether the ``count``-th failure of a streak is worth a line (again): the 1st,
    2nd, 4th, 8th... and any other once ``since_said`` seconds since the last line
    reach ``every``, so a long outage is said a few times early and then at a steady
    pace, never at every try."""
    return count & (count - 1) == 0 or since_said >= every


_SECRET_KEYS = ("password", "secret", "digest", "apikey", "api_key", "md5_cred", "token")


def drop_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of any key naming a credential with ``"[redacted]"``."""
    for key in list(event_dict):
        if any(s in key.lower() for s in _SECRET_KEYS):
            event_dict[key] = "[redacted]"
    return event_dict


class _LibraryHandler(logging.StreamHandler[TextIO]):
    """The root logger's handler that :func:`configure` installs (and replaces when
    called again, as on SIGHUP, rather than adding a second)."""


def _escaped(value: Any) -> Any:
    """``value`` with each lone surrogate in its text (and in the lists, tuples and dicts
    it holds) written as a backslash escape: one of Python's surrogate escapes (a byte
    that was not UTF-8: a file name, a SQLite store's Latin-1 row) as that byte,
    ``\\xe4``, any other as ``\\udXXX``, as the command line prints them.  JSON would
    write a lone surrogate as a ``\\udce4`` escape, which strict parsers (serde_json, as
    in Vector) refuse, dropping the whole line."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "".join(_char(ch) for ch in value)
        return value
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(item) for item in value]
    return value


def _char(ch: str) -> str:
    """``ch``, or its backslash escape when it is a lone surrogate (:func:`_escaped`)."""
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch


def escape_not_utf8(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Write each lone surrogate in the event's values as a backslash escape
    (:func:`_escaped`), so that every JSON line is UTF-8 every parser reads."""
    for key, value in event_dict.items():
        event_dict[key] = _escaped(value)
    return event_dict


_JSON = structlog.processors.JSONRenderer()


def _to_json(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """The event as one JSON line, its lone surrogates escaped first (:func:`escape_not_utf8`)."""
    return _JSON(logger, method, escape_not_utf8(logger, method, event_dict))


#: syslog's priority of each level, which journald reads off a line's ``<N>`` prefix.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def on_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal's own stream, as systemd gives a service's stdout
    and stderr: ``JOURNAL_STREAM`` names its device and inode (systemd.exec(5)), and a
    stream redirected elsewhere (a file, a pipe to another logger) has others."""
    env = os.environ if env is None else env
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return f"{found.st_dev}:{found.st_ino}" == f"{device}:{inode}"


def _with_priority(renderer: Any) -> Any:
    """``renderer`` whose lines start with their level's syslog priority (``<3>`` for an
    error): journald takes it off the line and files the line at that priority, so
    ``journalctl -p warning`` finds warnings, where every line was filed as info."""

    def render(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        priority = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{priority}>{renderer(logger, method, event_dict)}"

    return render


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog events to ``stream`` (stderr) at ``level``, as JSON or console text,
    and the standard library's log records from ``warning`` (or ``level``, if higher) up
    to the same stream in the same form; on the journal (:func:`on_journal`), each line
    with its priority."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = _to_json if as_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    if on_journal(stream):
        renderer = _with_priority(renderer)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_secrets,
    ]
    number = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_library_records(stream, renderer, shared, max(number, logging.WARNING))


def _route_library_records(stream: TextIO, renderer: Any, shared: list[Any], level: int) -> None:
    """Have the root logger write records at ``level`` and above to ``stream`` through
    ``renderer``, each one line (a traceback inside it, as ``exception``)."""
    handler = _LibraryHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str) -> Any:
    return structlog.get_logger(source=name)
