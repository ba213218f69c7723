"""The store works on every backend."""

from provisioner.accounts import Accounts


def test_add_and_read_back(accounts: Accounts) -> None:
    """A user added on any backend reads back with its fields and the lowest free extension."""
    created = accounts.add_user(
        {"username": "Alice", "full_name": "Alice A", "email": "a@example.com", "profile": "agents"}
    )
    assert created.user.extension == "101"
    assert created.sip_secret
    assert accounts.get_user("alice").full_name == "Alice A"
