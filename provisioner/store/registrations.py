"""Registration state in the store: each phone's contacts and a summary per user and server.

Written in batches (one transaction per batch, however many events it holds),
so a storm of re-registrations after an Asterisk restart costs a few
transactions, not thousands.  Endpoints are matched to users by extension;
events for endpoints that are no user (trunks) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, or_, select, tuple_

from .schema import registration_summary, registrations, users

__all__ = [
    "ContactRecord",
    "SummaryRecord",
    "apply_batch",
    "replace_server_snapshot",
    "status_rows",
    "summarize",
]

_CHUNK = 500


@dataclass(frozen=True)
class ContactRecord:
    """One contact of an endpoint on one server; ``status`` ``Removed`` deletes it."""

    server: str
    endpoint: str
    contact_id: str
    uri: str
    status: str
    user_agent: str = ""
    source: str = ""
    rtt_usec: int | None = None
    expires_at: datetime | None = None
    changed_at: datetime | None = None


@dataclass(frozen=True)
class SummaryRecord:
    """An endpoint's state on one server: online, offline or unreachable, and its device state.

    ``None`` fields keep what the store holds (an event carries only part of the picture).
    """

    server: str
    endpoint: str
    state: str | None = None
    device_state: str | None = None
    problem: str | None = None
    changed_at: datetime | None = None


def _user_ids(conn: Connection, endpoints: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(endpoints))
    out: dict[str, int] = {}
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        rows = conn.execute(
            select(users.c.extension, users.c.id).where(users.c.extension.in_(chunk))
        )
        out.update({r.extension: r.id for r in rows})
    return out


def _contact_row(uid: int, c: ContactRecord, now: datetime) -> dict[str, Any]:
    return {
        "user_id": uid,
        "server": c.server,
        "contact_id": c.contact_id[:255],
        "uri": c.uri[:512],
        "status": c.status[:32],
        "user_agent": c.user_agent[:255],
        "source": c.source[:128],
        "rtt_usec": c.rtt_usec,
        "expires_at": c.expires_at,
        "changed_at": c.changed_at or now,
    }


def apply_batch(
    conn: Connection,
    contacts: Sequence[ContactRecord],
    summaries: Sequence[SummaryRecord],
    now: datetime,
) -> int:
    """Write a batch of contact and summary changes on the caller's transaction.

    The last record for a key wins.  Returns how many records matched a user.
    """
    ids = _user_ids(conn, [c.endpoint for c in contacts] + [s.endpoint for s in summaries])
    last_contact = {
        (ids[c.endpoint], c.server, c.contact_id[:255]): c for c in contacts if c.endpoint in ids
    }
    _delete_keys(conn, list(last_contact))
    rows = [
        _contact_row(key[0], c, now)
        for key, c in last_contact.items()
        if c.status not in ("Removed", "removed")
    ]
    if rows:
        conn.execute(insert(registrations), rows)
    merged = _merge_summaries(conn, ids, summaries, now)
    if merged:
        keys = list(merged)
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            conn.execute(
                delete(registration_summary).where(
                    or_(
                        *(
                            and_(
                                registration_summary.c.user_id == u,
                                registration_summary.c.server == s,
                            )
                            for u, s in chunk
                        )
                    )
                )
            )
        conn.execute(insert(registration_summary), list(merged.values()))
    return len(last_contact) + len(merged)


def _delete_keys(conn: Connection, keys: list[tuple[int, str, str]]) -> None:
    cols = tuple_(registrations.c.user_id, registrations.c.server, registrations.c.contact_id)
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        conn.execute(delete(registrations).where(cols.in_(chunk)))


def _merge_summaries(
    conn: Connection, ids: dict[str, int], summaries: Sequence[SummaryRecord], now: datetime
) -> dict[tuple[int, str], dict[str, Any]]:
    wanted = {(ids[s.endpoint], s.server) for s in summaries if s.endpoint in ids}
    current: dict[tuple[int, str], dict[str, Any]] = {}
    keys = sorted(wanted)
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        cols = tuple_(registration_summary.c.user_id, registration_summary.c.server)
        for r in conn.execute(select(registration_summary).where(cols.in_(chunk))):
            current[(r.user_id, r.server)] = dict(r._mapping)
    for s in summaries:
        if s.endpoint not in ids:
            continue
        key = (ids[s.endpoint], s.server)
        row = current.get(key) or {
            "user_id": key[0],
            "server": s.server,
            "state": "offline",
            "device_state": "",
            "problem": "",
            "changed_at": now,
        }
        if s.state is not None:
            row["state"] = s.state[:16]
        if s.device_state is not None:
            row["device_state"] = s.device_state[:32]
        if s.problem is not None:
            row["problem"] = s.problem[:255]
        row["changed_at"] = s.changed_at or now
        current[key] = row
    return {k: v for k, v in current.items() if k in wanted}


def replace_server_snapshot(
    conn: Connection, server: str, contacts: Sequence[ContactRecord], now: datetime
) -> int:
    """Make the store's contacts for ``server`` exactly ``contacts`` (a fresh AMI snapshot)."""
    conn.execute(delete(registrations).where(registrations.c.server == server))
    ids = _user_ids(conn, [c.endpoint for c in contacts])
    rows = {
        (ids[c.endpoint], c.contact_id[:255]): _contact_row(ids[c.endpoint], c, now)
        for c in contacts
        if c.endpoint in ids
    }
    if rows:
        conn.execute(insert(registrations), list(rows.values()))
    return len(rows)


def summarize(contact_statuses: Sequence[str], server_states: Sequence[str]) -> str:
    """online when a contact is usable; unreachable when contacts exist but none answers."""
    if any(st not in ("Unreachable", "Removed") for st in contact_statuses):
        return "online"
    if contact_statuses or "unreachable" in server_states:
        return "unreachable"
    return "online" if "online" in server_states else "offline"


def status_rows(conn: Connection, usernames: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per live user: extension, username, summary per server and contacts, for ``status``."""
    query = select(users.c.id, users.c.extension, users.c.username).where(
        users.c.deleted_at.is_(None)
    )
    if usernames:
        query = query.where(users.c.username_key.in_([u.lower() for u in usernames]))
    people = conn.execute(query.order_by(users.c.extension)).all()
    ids = [p.id for p in people]
    summaries: dict[int, list[dict[str, Any]]] = {}
    contacts: dict[int, list[dict[str, Any]]] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        for r in conn.execute(
            select(registration_summary).where(registration_summary.c.user_id.in_(chunk))
        ):
            summaries.setdefault(r.user_id, []).append(dict(r._mapping))
        for r in conn.execute(select(registrations).where(registrations.c.user_id.in_(chunk))):
            contacts.setdefault(r.user_id, []).append(dict(r._mapping))
    out = []
    for p in people:
        sums = summaries.get(p.id, [])
        cons = contacts.get(p.id, [])
        state = summarize([c["status"] for c in cons], [s["state"] for s in sums])
        changed = [x["changed_at"] for x in sums + cons]
        out.append(
            {
                "extension": p.extension,
                "username": p.username,
                "state": state,
                "servers": sums,
                "contacts": cons,
                "user_agent": cons[0]["user_agent"] if cons else "",
                "last_change": max(changed) if changed else None,
            }
        )
    return out
