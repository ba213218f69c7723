"""Registration state in the store: ``write_endpoints`` on every backend."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, select

from bench.common import seed_store
from provisioner.store.registrations import (
    ContactRecord,
    SummaryRecord,
    replace_server_snapshot,
    set_problems,
    status_rows,
    write_endpoints,
)
from provisioner.store.schema import registration_summary, registrations

NOW = datetime(2026, 5, 1, 12, 0, 0, 123456)
SEEN = datetime(2026, 5, 1, 11, 59, 58, 654321)


def _state(ep: str, status: str) -> tuple[list[ContactRecord], SummaryRecord]:
    contact = ContactRecord(
        "pbx1", ep, f"{ep};@abc", f"sip:{ep}@10.0.0.1:5060", status, "Phone/1", "", 1234, SEEN, SEEN
    )
    return [contact], SummaryRecord("pbx1", ep, "online", "NOT_INUSE", changed_at=SEEN)


def test_write_endpoints_replaces_rows_and_round_trips_values(engine: Engine) -> None:
    """Contacts and summaries of known endpoints are replaced; values and times read back."""
    seed_store(engine, 3)
    with engine.begin() as conn:
        assert write_endpoints(conn, "pbx1", {"100000": _state("100000", "Unknown")}, NOW) == 1
    states = {ep: _state(ep, "NonQualified") for ep in ("100000", "100001", "trunk")}
    with engine.begin() as conn:
        assert write_endpoints(conn, "pbx1", states, NOW) == 2
    with engine.connect() as conn:
        rows = conn.execute(select(registrations).order_by(registrations.c.user_id)).all()
        sums = conn.execute(select(registration_summary)).all()
        people = {p["extension"]: p for p in status_rows(conn)}
    assert [(r.user_id, r.status, r.rtt_usec, r.expires_at, r.changed_at) for r in rows] == [
        (1, "NonQualified", 1234, SEEN, SEEN),
        (2, "NonQualified", 1234, SEEN, SEEN),
    ]
    assert sorted((s.user_id, s.state, s.device_state, s.changed_at) for s in sums) == [
        (1, "online", "NOT_INUSE", SEEN),
        (2, "online", "NOT_INUSE", SEEN),
    ]
    assert people["100000"]["state"] == "online"
    assert people["100002"]["state"] == "offline"


def test_snapshot_replaces_every_contact_and_problems_are_kept(engine: Engine) -> None:
    """A snapshot leaves exactly its contacts for the server; a problem lands in the summary."""
    seed_store(engine, 3)
    with engine.begin() as conn:
        write_endpoints(conn, "pbx1", {"100002": _state("100002", "Reachable")}, NOW)
        snapshot = [_state(ep, "NonQualified")[0][0] for ep in ("100000", "100001", "trunk")]
        assert replace_server_snapshot(conn, "pbx1", snapshot, NOW) == 2
        assert set_problems(conn, "pbx1", {"100000": "rejected", "100002": ""}, NOW) == 2
    with engine.connect() as conn:
        rows = conn.execute(select(registrations.c.user_id, registrations.c.changed_at)).all()
        sums = conn.execute(select(registration_summary.c.user_id, registration_summary.c.problem))
        problems = sorted(tuple(r) for r in sums)
    assert sorted(tuple(r) for r in rows) == [(1, SEEN), (2, SEEN)]
    assert problems == [(1, "rejected"), (3, "")]
