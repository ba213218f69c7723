"""The log set-up: every line a JSON object off a terminal, whoever logs it."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from provisioner.logs import configure
from provisioner.store.engine import open_engine

from .dbs import temp_database


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    """Each line written to ``stream``, parsed as JSON (failing on any that is not)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_library_log_records_are_json_lines_too() -> None:
    """A record logged through the standard library (SQLAlchemy's pool failing to reset a
    connection, with its traceback; asyncio's unretrieved task exception) is written to the
    log's stream as one JSON line with its level and logger, not as plain multi-line text."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure("info", "json", stream)
    try:
        try:
            raise ConnectionResetError("server closed the connection\nunexpectedly")
        except ConnectionResetError:
            logging.getLogger("sqlalchemy.pool.impl.QueuePool").error(
                "Exception during reset or similar", exc_info=True
            )
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("asyncio").debug("Using selector: EpollSelector")
        structlog.get_logger().info("sync.applied", added=1)
    finally:
        root.handlers[:], root.level = handlers, level
    lines = _lines(stream)
    assert [line["event"] for line in lines] == [
        "Exception during reset or similar",
        "Task exception was never retrieved",
        "sync.applied",
    ]
    pool = lines[0]
    assert (pool["level"], pool["logger"]) == ("error", "sqlalchemy.pool.impl.QueuePool")
    assert "ConnectionResetError" in str(pool["exception"])


def test_configuring_again_replaces_the_library_handler() -> None:
    """Configuring the log again (as SIGHUP does) leaves one handler for library records,
    writing to the new stream: a record is not written twice, nor to the old stream."""
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure("info", "json", first)
        configure("warning", "json", second)
        logging.getLogger("sqlalchemy.pool").warning("pool overflow")
    finally:
        root.handlers[:], root.level = handlers, level
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == ["pool overflow"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_error_logged_by_a_library_never_quotes_its_parameters(
    backend: str, tmp_path: Path
) -> None:
    """A database error from a store engine, in a library's record with its traceback (as
    SQLAlchemy's pool logs a failed reset while an INSERT's error is handled), never
    quotes the statement's parameters: a digest stays out of the log."""
    digest = "MD5:" + "24eeff0c"[::-1]  # not in the source lines a traceback quotes
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure("info", "json", stream)
    try:
        with temp_database(backend, tmp_path) as url:
            engine = open_engine(url)
            try:
                with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
                    conn.execute(text("INSERT INTO nosuch VALUES (:d)"), {"d": digest})
                try:
                    raise RuntimeError("reset failed") from caught.value
                except RuntimeError:
                    logging.getLogger("sqlalchemy.pool").error("reset", exc_info=True)
            finally:
                engine.dispose()
    finally:
        root.handlers[:], root.level = handlers, level
    assert "c0ffee42" not in str(caught.value)
    assert "no such table" in stream.getvalue() or "does not exist" in stream.getvalue()
    assert "c0ffee42" not in stream.getvalue()


def test_text_that_is_not_utf8_is_logged_as_escapes_every_json_parser_reads() -> None:
    """A value holding bytes that are not UTF-8 (a file name, a SQLite store's Latin-1 row,
    read as Python's surrogate escapes) is written as backslash escapes of those bytes, not
    as JSON escapes of lone surrogates, which strict parsers (serde_json, as in Vector)
    refuse, dropping the line; surrogate pairs (an emoji) and other text are kept."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure("info", "json", stream)
    try:
        structlog.get_logger().warning(
            "sync.skipped",
            username="k\udce4te",
            rows=[{"full_name": "\udcff\udcfe"}],
            note="caf\u00e9 \U0001f600\nnext",
        )
    finally:
        root.handlers[:], root.level = handlers, level
    (line,) = _lines(stream)
    assert line["username"] == "k\\xe4te"
    assert line["rows"] == [{"full_name": "\\xff\\xfe"}]
    assert line["note"] == "caf\u00e9 \U0001f600\nnext"
    json.dumps(line, ensure_ascii=False).encode("utf-8")  # no lone surrogate left


def test_worth_repeating_says_a_streak_at_powers_of_two_and_at_a_steady_pace() -> None:
    """A streak's failures are said at the 1st, 2nd, 4th, 8th... and at any other once the
    pause since the last line reaches the pace, never otherwise."""
    from provisioner.logs import worth_repeating

    said = [n for n in range(1, 40) if worth_repeating(n, 1.0, 60.0)]
    assert said == [1, 2, 4, 8, 16, 32]
    assert worth_repeating(37, 60.0, 60.0)
    assert not worth_repeating(37, 59.9, 60.0)


def test_on_the_journal_each_line_starts_with_its_syslog_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where stderr is the journal's stream (JOURNAL_STREAM names its device and inode), each
    line, a library's too, starts with its level's syslog priority, then the JSON object;
    any other stream gets the JSON alone."""
    path = tmp_path / "journal"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with path.open("w") as stream:
            found = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino}")
            configure("debug", "auto", stream)
            log = structlog.get_logger(source="test")
            log.debug("a.debug")
            log.info("an.info")
            log.warning("a.warning")
            log.error("an.error")
            logging.getLogger("sqlalchemy.pool").error("a library's error")
        lines = path.read_text().splitlines()
        assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>"]
        assert [json.loads(line[3:])["level"] for line in lines] == [
            "debug",
            "info",
            "warning",
            "error",
            "error",
        ]
        other = tmp_path / "other"
        with other.open("w") as stream:
            configure("info", "auto", stream)
            structlog.get_logger(source="test").warning("a.warning")
        assert json.loads(other.read_text())["event"] == "a.warning"
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.reset_defaults()  # not left writing to the closed files
