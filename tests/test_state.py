"""The daemon's notes in ``daemon_state`` (what is owed to each Asterisk) on every backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import Connection, select
from structlog.testing import capture_logs

from provisioner.ami.changes import (
    EXPIRE_ALL_NOTE,
    loaded_digest_key,
    owed_expiries_key,
    owed_removal_key,
    owed_removals_prefix,
    reload_owed_key,
)
from provisioner.store.engine import open_engine, reading, transaction
from provisioner.store.migrate import upgrade
from provisioner.store.schema import daemon_state
from provisioner.store.state import (
    KEY_MAX,
    VALUE_MAX,
    load_state,
    load_states,
    put_state,
    write_states,
)
from provisioner.store.untold import PREFIX, drop_untold, new_token, note_untold, untold_key

from .dbs import BACKENDS, temp_database

#: The longest server name the config allows, and the longest endpoint (extension).
LONG_SERVER = "s" * 64
LONG_ENDPOINT = "9" * 20


def test_every_note_key_fits_the_key_column() -> None:
    """Each owed note's key, for the longest server name and endpoint, fits daemon_state.key,
    and two long names sharing their start get distinct keys."""
    other = "s" * 63 + "t"
    keys = [
        reload_owed_key(LONG_SERVER),
        owed_expiries_key(LONG_SERVER),
        owed_removal_key(LONG_SERVER, LONG_ENDPOINT),
        owed_removal_key(LONG_SERVER, "x" * 80),
    ]
    assert max(map(len, keys)) <= KEY_MAX
    assert owed_removals_prefix(LONG_SERVER) != owed_removals_prefix(other)
    assert owed_removal_key("pbx1", "1001") == "owed_removal:pbx1:1001"
    assert reload_owed_key("pbx1") == "reload_owed:pbx1"  # as noted by earlier versions


@pytest.mark.parametrize("backend", BACKENDS)
def test_owed_notes_are_written_found_by_server_and_dropped(backend: str, tmp_path: Path) -> None:
    """Many notes go in one write, a server's removal notes are found by their prefix
    (an '_' in its name matching only itself) and dropped by key, on every backend."""
    with temp_database(backend, tmp_path) as url:
        engine = open_engine(url)
        try:
            upgrade(engine)
            endpoints = [str(100000 + i) for i in range(1200)] + [LONG_ENDPOINT]
            put = {owed_removal_key(LONG_SERVER, ep): ep for ep in endpoints}
            put[owed_removal_key("pbx_1", "1001")] = "1001"
            put[owed_removal_key("pbxx1", "1002")] = "1002"
            put[owed_expiries_key(LONG_SERVER)] = EXPIRE_ALL_NOTE
            transaction(engine, lambda conn: write_states(conn, put))
            dropped = [owed_removal_key(LONG_SERVER, ep) for ep in endpoints[:600]]
            transaction(engine, lambda conn: write_states(conn, {}, dropped))
            with reading(engine) as conn:
                found = load_states(conn, owed_removals_prefix(LONG_SERVER))
                assert sorted(found.values()) == sorted(endpoints[600:])
                assert list(load_states(conn, owed_removals_prefix("pbx_1")).values()) == ["1001"]
                assert load_state(conn, owed_expiries_key(LONG_SERVER)) == EXPIRE_ALL_NOTE
                assert list(load_states(conn, owed_removals_prefix("pbxx1")).values()) == ["1002"]
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_untold_markers_are_found_taken_over_and_dropped(backend: str, tmp_path: Path) -> None:
    """A writer's marker is found by the next writer; a daemon taking them over drops
    the others as it notes its own, which alone it drops at a clean stop, on every
    backend."""
    with temp_database(backend, tmp_path) as url:
        engine = open_engine(url)
        try:
            upgrade(engine)
            sync, daemon, later = new_token(), new_token(), new_token()
            assert len({sync, daemon, later}) == 3
            assert transaction(engine, partial(note_untold, token=sync, who="sync")) == []
            found = transaction(
                engine, partial(note_untold, token=daemon, who="daemon", take_over=True)
            )
            assert found == [untold_key(sync)]
            with reading(engine) as conn:
                assert load_states(conn, PREFIX) == {untold_key(daemon): "daemon"}
            assert transaction(engine, partial(note_untold, token=later, who="x" * 999)) == [
                untold_key(daemon)
            ]
            transaction(engine, partial(drop_untold, keys=[untold_key(daemon), "untold:gone"]))
            with reading(engine) as conn:
                assert load_states(conn, PREFIX) == {untold_key(later): "x" * VALUE_MAX}
        finally:
            engine.dispose()


def test_an_untold_key_fits_the_key_column() -> None:
    """A marker's key fits daemon_state.key; a token too long for it is refused."""
    assert len(untold_key(new_token())) <= KEY_MAX
    with pytest.raises(ValueError, match="untold token"):
        untold_key("t" * KEY_MAX)


def _hold(conn: Connection, key: str, put: Callable[..., None], how: str) -> None:
    """In ``conn``'s open transaction, make writers of ``key`` wait until it ends: ``put``
    (a first writer, not committed yet), or ``lock`` (a locking read of the key: on
    MariaDB, for a key not kept, the gap lock a first writer's read or delete takes)."""
    if how == "put":
        put(conn, value="held")
    else:
        conn.execute(select(daemon_state.c.key).where(daemon_state.c.key == key).with_for_update())


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
@pytest.mark.parametrize("kept", [False, True], ids=["new", "kept"])
@pytest.mark.parametrize("how", ["put", "lock"])
@pytest.mark.parametrize("writer", ["put_state", "write_states"])
def test_two_writers_putting_one_key_at_once_both_succeed(
    backend: str, kept: bool, how: str, writer: str, tmp_path: Path
) -> None:
    """Two transactions putting the same key at once (the daemon noting what a server
    loaded while a ``sync --once`` notes it unknown, each in its own transaction) both
    commit, one after the other, without a duplicate key or a deadlock, the key holding
    the last one's value."""
    key = loaded_digest_key("pbx")

    def put(conn: Connection, *, value: str) -> None:
        if writer == "put_state":
            put_state(conn, key, value)
        else:
            write_states(conn, {key: value})

    with temp_database(backend, tmp_path) as url:
        engine = open_engine(url)
        errors: list[BaseException] = []

        def other(value: str) -> None:
            try:
                transaction(engine, partial(put, value=value))
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        try:
            upgrade(engine)
            if kept:
                transaction(engine, partial(put, value="before"))
            threads = [threading.Thread(target=other, args=(v,)) for v in ("a", "b")]
            with capture_logs() as logs:
                with engine.connect() as holder, holder.begin():
                    _hold(holder, key, put, how)
                    for thread in threads:
                        thread.start()
                    time.sleep(0.5)  # both wait for the holder's transaction
                for thread in threads:
                    thread.join(30)
            assert [type(e).__name__ for e in errors] == []
            # Nor did they deadlock (MariaDB's victim run again): they waited, in turn.
            assert [e for e in logs if e["event"] == "store.conflict_retry"] == []
            with reading(engine) as conn:
                assert load_state(conn, key) in {"a", "b"}
        finally:
            engine.dispose()
