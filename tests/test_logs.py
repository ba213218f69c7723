"""The log set-up: every line a JSON object off a terminal, whoever logs it."""

from __future__ import annotations

import io
import json
import logging

import structlog

from provisioner.logs import configure


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
