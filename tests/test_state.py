"""The daemon's notes in ``daemon_state`` (what is owed to each Asterisk) on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.ami.changes import (
    EXPIRE_ALL_NOTE,
    owed_expiries_key,
    owed_removal_key,
    owed_removals_prefix,
    reload_owed_key,
)
from provisioner.store.engine import open_engine, reading, transaction
from provisioner.store.migrate import upgrade
from provisioner.store.state import (
    KEY_MAX,
    drop_states_under,
    load_state,
    load_states,
    write_states,
)

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
    (an '_' in its name matching only itself) and dropped together, on every backend."""
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
            transaction(engine, lambda conn: drop_states_under(conn, "owed_removal:pbx_1:"))
            with reading(engine) as conn:
                assert load_states(conn, owed_removals_prefix("pbx_1")) == {}
                assert list(load_states(conn, owed_removals_prefix("pbxx1")).values()) == ["1002"]
        finally:
            engine.dispose()
