"""A few sample users for a first run on the embedded default store."""

from __future__ import annotations

from typing import Any

from .accounts import Accounts, rerun_on_unique_clash
from .errors import ConflictError
from .store import queries as q

__all__ = ["seed"]

_PROFILE = "agents"

_SAMPLES: list[dict[str, Any]] = [
    {
        "username": "admin",
        "role": "admin",
        "full_name": "First Admin",
        "email": "admin@example.com",
    },
    {
        "username": "alice",
        "full_name": "Alice Agent",
        "email": "alice@example.com",
        "codecs": "opus,ulaw,alaw",
        "attributes": {"agent ID": "A-100"},
    },
    {
        "username": "bob.smith",
        "full_name": "Bob Smith",
        "email": "bob@example.com",
        "nat": "yes",
        "call_group": "1",
        "pickup_group": "1-3",
    },
    {
        "username": "carol_web",
        "full_name": "Carol WebRTC",
        "email": "carol@example.com",
        "transport": "wss",
        "codecs": "opus",
        "video": "yes",
    },
]


def seed(accounts: Accounts) -> list[str]:
    """Add the sample profile and users when the store has no users; return what was done.

    All in one transaction: a sample that cannot be added (no free extension left) leaves
    the store as it was.  A profile ``agents`` the store already holds is used as it is.
    """
    return rerun_on_unique_clash(
        lambda: _seed_once(accounts),
        _SEED_ATTEMPTS,
        ConflictError.one("quickstart", "other writers kept changing the store; try again"),
    )


#: Runs of the seeding when a concurrent writer takes a name or an extension first.
_SEED_ATTEMPTS = 5


def _seed_once(accounts: Accounts) -> list[str]:
    """One run of :func:`seed`, in one transaction."""
    with accounts.write() as conn:
        if q.load_users(conn, deleted=None):
            return ["store already has users; nothing seeded"]
        now = accounts.clock()
        profile = q.profile_name_taken(conn, _PROFILE)
        if profile is None:
            profile = q.insert_profile(conn, _PROFILE, "Contact-center agents", now).name
        allocator = q.ExtensionAllocator(conn, accounts.policy.ext_first, accounts.policy.ext_last)
        added = []
        for sample in _SAMPLES:
            values = dict(sample)
            if values.get("role") != "admin":
                values["profile"] = profile
            added.append(accounts.add_in(conn, values, allocator, now))
        created = q.load_users(conn, ids=[user_id for user_id, _ in added])
    return [
        f"seeded {user.username} (extension {user.extension}, SIP secret shown once: {secret})"
        for user, (_, secret) in zip(created, added, strict=True)
    ]
