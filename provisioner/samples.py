"""A few sample users for a first run on the embedded default store."""

from __future__ import annotations

from typing import Any

from .accounts import Accounts

__all__ = ["seed"]

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
    """Add the sample profile and users when the store has no users; return what was done."""
    if accounts.list_users(deleted=None):
        return ["store already has users; nothing seeded"]
    accounts.add_profile("agents", "Contact-center agents")
    done = []
    for sample in _SAMPLES:
        values = dict(sample)
        if values.get("role") != "admin":
            values["profile"] = "agents"
        created = accounts.add_user(values)
        done.append(
            f"seeded {created.user.username} (extension {created.user.extension}, "
            f"SIP secret shown once: {created.sip_secret})"
        )
    return done
