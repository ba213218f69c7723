"""CSV export and import: no secrets out, a faithful round trip, and all-or-nothing imports."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from provisioner import credentials
from provisioner.accounts import Accounts, Policy
from provisioner.csvio import COLUMNS, _defuse, _read, _refuse, export_users, import_users
from provisioner.errors import InvalidInput
from provisioner.model import User

from .conftest import FakeClock
from .dbs import temp_database
from .helpers import GOOD_PASSWORD, cheap_argon2, user_row


@pytest.fixture(autouse=True)
def _fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_argon2(monkeypatch)


def _export(accounts: Accounts, *, deleted: bool | None = False) -> str:
    out = io.StringIO()
    export_users(accounts.list_users(deleted=deleted), out)
    return out.getvalue()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _comparable(user: User) -> dict[str, Any]:
    """What a round trip must keep: everything but ids, timestamps and secrets."""
    return {
        "username": user.username,
        "role": user.role,
        "profile": user.profile,
        "full_name": user.full_name,
        "email": user.email,
        "description": user.description,
        "extension": user.extension,
        "voice": user.voice,
        "disabled": user.disabled,
        "log_level": user.log_level,
        "messenger_sound": user.messenger_sound,
        "toast_position": user.toast_position,
        "attributes": dict(user.attributes),
    }


def _populate(accounts: Accounts) -> None:
    accounts.add_profile("tier 2", "Second line")
    accounts.add_user(
        {
            "username": "alice",
            "full_name": "=SUM(A1:A9)",  # a spreadsheet formula, kept as text
            "email": "alice@example.com",
            "profile": "agents",
            "description": '\'=HYPERLINK("x") starts with a quote',
            "transport": "wss",
            "nat": "force_rport",
            "codecs": "opus,ulaw",
            "context": "internal",
            "call_group": "1,3-5",
            "pickup_group": "2",
            "video": "always",
            "log_level": "debug",
            "messenger_sound": "off",
            "toast_position": "bottom-left",
            "attributes": {"phone": "+1 555 0100", "note": 'say "hi", then @mention'},
            "password": GOOD_PASSWORD,
        }
    )
    accounts.add_user(
        {
            "username": "Bob.B",
            "full_name": "Bøb Ñandú",
            "email": "bob@example.com",
            "profile": "tier 2",
            "description": "-minus, comma",
            "extension": "4000",
            "attributes": {"floor": "3"},
        }
    )
    accounts.add_user(
        {
            "username": "carol",
            "full_name": "Carol",
            "email": "carol@example.com",
            "profile": "agents",
        }
    )
    accounts.disable(["carol"])


def test_export_holds_no_secrets(accounts: Accounts) -> None:
    """An export lists every live user's fields but no password, SIP secret, digest or API key."""
    _populate(accounts)
    key = accounts.generate_apikey("alice")
    text = _export(accounts)
    rows = _rows(text)
    assert [r["username"] for r in rows] == ["root", "alice", "Bob.B", "carol"]
    assert list(rows[0])[: len(COLUMNS)] == list(COLUMNS)
    row = user_row(accounts.engine, "alice")
    for secret in (GOOD_PASSWORD, key, row.password_hash, row.sip_md5, row.sip_sha256):
        assert secret not in text
    assert "password" not in rows[0]
    assert "sip_secret" not in rows[0]
    assert rows[1]["attr:phone"] == "'+1 555 0100"  # defused for spreadsheets
    assert rows[1]["full_name"] == "'=SUM(A1:A9)"
    assert rows[3]["disabled"] == "yes"


@pytest.mark.parametrize("cell", ["\uff1dSUM(A1)", "\uff20x", "\uff0b1", "'\uff1dx"])
def test_a_full_width_formula_is_defused_and_comes_back(accounts: Accounts, cell: str) -> None:
    """A cell starting with a full-width ``＝ ＋ ＠`` (which some spreadsheets turn into a
    formula on input) is exported behind a ``'``, and the re-import gives back exactly
    the stored text."""
    accounts.add_user(
        {
            "username": "alice",
            "full_name": "Alice",
            "email": "alice@example.com",
            "profile": "agents",
            "attributes": {"note": cell},
            "password": GOOD_PASSWORD,
        }
    )
    text = _export(accounts)
    (alice,) = [row for row in _rows(text) if row["username"] == "alice"]
    assert alice["attr:note"] == "'" + cell
    assert import_users(accounts, text).updated == []
    assert accounts.get_user("alice").attributes["note"] == cell


@pytest.mark.parametrize("cell", [' =HYPERLINK("x")', "\u00a0\u3000+cmd", "\n=1+1", "\t-2", "''@x"])
def test_a_formula_behind_blanks_or_a_line_feed_is_defused_and_read_back(cell: str) -> None:
    """A cell that starts a formula only after blanks (which spreadsheets skip) or a line
    feed, as a row written by hand in SQL may hold, is exported behind a ``'`` and read
    back as it was; a cell that merely starts with blanks is left alone."""
    assert _defuse(cell) == "'" + cell
    assert _refuse(_defuse(cell)) == cell
    assert _defuse("  plain text") == "  plain text"
    assert _refuse("' plain") == "' plain"


def test_reimport_of_an_export_changes_nothing(accounts: Accounts, clock: FakeClock) -> None:
    """Importing an unedited export reports every user unchanged and leaves the store as it was."""
    _populate(accounts)
    before = [_comparable(u) for u in accounts.list_users()]
    stamps = [u.updated_at for u in accounts.list_users()]
    clock.advance(minutes=5)
    result = import_users(accounts, _export(accounts))
    assert result.added == []
    assert result.updated == []
    assert result.unchanged == ["root", "alice", "Bob.B", "carol"]
    assert [_comparable(u) for u in accounts.list_users()] == before
    assert [u.updated_at for u in accounts.list_users()] == stamps


def test_round_trip_into_a_fresh_store(
    accounts: Accounts, backend: str, tmp_path: Path, policy: Policy, clock: FakeClock
) -> None:
    """An export imported into an empty store of the same backend recreates the same users."""
    from provisioner.store.engine import open_engine
    from provisioner.store.migrate import upgrade

    _populate(accounts)
    text = _export(accounts)
    with temp_database(backend, tmp_path / "other") as url:
        engine: Engine = open_engine(url)
        try:
            upgrade(engine)
            other = Accounts(engine, policy, clock)
            other.add_profile("agents")
            other.add_profile("tier 2")
            result = import_users(other, text)
            assert result.added == ["root", "alice", "Bob.B", "carol"]
            assert set(result.generated_secrets) == set(result.added)
            assert [_comparable(u) for u in other.list_users()] == [
                _comparable(u) for u in accounts.list_users()
            ]
            assert other.get_user("root").id == 1
        finally:
            engine.dispose()


def test_an_extension_a_later_row_gives_is_not_allocated_to_an_earlier_row(
    accounts: Accounts,
) -> None:
    """A row without an extension never takes the number a later row of the file asks
    for: the file imports as written, whatever its row order."""
    text = (
        "username,full_name,email,profile,extension\n"
        "dave,Dave,dave@example.com,agents,\n"
        "gina,Gina,gina@example.com,agents,101\n"
    )
    result = import_users(accounts, text)
    assert result.added == ["dave", "gina"]
    assert accounts.get_user("gina").extension == "101"
    assert accounts.get_user("dave").extension == "102"


def test_import_is_all_or_nothing_and_reports_every_bad_row(accounts: Accounts) -> None:
    """One bad row means nothing is applied; each bad row is reported by line, field and rule."""
    accounts.add_user(
        {"username": "alice", "full_name": "Alice", "email": "a@example.com", "profile": "agents"}
    )
    text = (
        "username,full_name,email,profile,extension,codecs,disabled\n"
        "dave,Dave,dave@example.com,agents,,ulaw,no\n"  # line 2: fine
        "alice,Alice Changed,a@example.com,agents,,ulaw,no\n"  # line 3: fine (an update)
        "bad name,Eve,not-an-email,agents,,mp3,no\n"  # line 4: three problems
        "frank,Frank,frank@example.com,ghosts,12x,ulaw,maybe\n"  # line 5: three problems
        "root,Root,root@example.com,,,ulaw,yes\n"  # line 6: first admin disabled
        "DAVE,Dave Again,dave@example.com,agents,,ulaw,no\n"  # line 7: repeats line 2
        "gina,Gina,gina@example.com,agents,101,ulaw,no\n"  # line 8: alice holds 101
    )
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, text)
    found = sorted((p.line, p.field) for p in info.value.problems)
    assert found == [
        (4, "codecs"),
        (4, "email"),
        (4, "username"),
        (5, "disabled"),
        (5, "extension"),
        (5, "profile"),
        (6, "disabled"),
        (7, "username"),
        (8, "extension"),
    ]
    message = str(info.value)
    assert "line 4: email: must be a valid email address" in message
    assert "line 6: disabled: the first admin can never be disabled" in message
    assert "line 7: username: repeats line 2" in message
    assert "line 8: extension: 101 is already used by user alice" in message
    # Nothing applied: dave absent, alice unchanged, root enabled.
    assert [u.username for u in accounts.list_users(deleted=None)] == ["root", "alice"]
    assert accounts.get_user("alice").full_name == "Alice"
    assert not accounts.get_user("root").disabled


def test_dry_run_checks_and_changes_nothing(accounts: Accounts) -> None:
    """A valid dry run reports what it would do, applies nothing, and shows no secret."""
    text = "username,full_name,email,profile\ndave,Dave,dave@example.com,agents\n"
    result = import_users(accounts, text, dry_run=True)
    assert result.dry_run
    assert result.added == ["dave"]
    assert result.generated_secrets == {}
    assert [u.username for u in accounts.list_users()] == ["root"]


def test_import_adds_updates_and_sets_secrets(accounts: Accounts) -> None:
    """New rows are added with allocated extensions, old ones updated, secret columns hashed."""
    accounts.add_user(
        {"username": "alice", "full_name": "Alice", "email": "a@example.com", "profile": "agents"}
    )
    text = (
        "username,full_name,email,profile,password,sip_secret,attr:team,disabled\n"
        f"ALICE,Alice A,a@example.com,agents,{GOOD_PASSWORD},,blue,yes\n"
        "bob,Bob,bob@example.com,agents,,Bob-Secret-1,,\n"
    )
    result = import_users(accounts, text)
    assert result.updated == ["alice"]
    assert result.added == ["bob"]
    assert result.generated_secrets == {}  # bob's secret was given
    alice = accounts.get_user("alice")
    assert alice.full_name == "Alice A"
    assert alice.attributes == {"team": "blue"}
    assert alice.disabled
    assert credentials.verify_password(
        user_row(accounts.engine, "alice").password_hash, GOOD_PASSWORD
    )
    bob = accounts.get_user("bob")
    assert bob.extension == "102"
    assert bob.attributes == {}
    assert (
        user_row(accounts.engine, "bob").sip_md5
        == credentials.sip_digests("bob", "asterisk", "Bob-Secret-1").md5
    )


def test_secret_cells_keep_a_leading_quote(accounts: Accounts) -> None:
    """A secret cell keeps its leading quote: secrets are never exported, so never quoted."""
    secret, password = "'-Secret123", "'=" + GOOD_PASSWORD
    text = (
        "username,full_name,email,profile,password,sip_secret\n"
        f"bob,Bob,bob@example.com,agents,{password},{secret}\n"
    )
    import_users(accounts, text)
    row = user_row(accounts.engine, "bob")
    assert row.sip_md5 == credentials.sip_digests("bob", "asterisk", secret).md5
    assert credentials.verify_password(row.password_hash, password)
    assert accounts.get_user("bob").full_name == "Bob"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [(1, "header")]),
        ("full_name,email\nA,a@example.com\n", [(1, "username")]),
        ("username,colour\nalice,red\n", [(1, "colour")]),
        ("username,username\na,b\n", [(1, "header")]),
        ("username,full_name\nalice\n", [(2, "row")]),
    ],
)
def test_malformed_files_are_refused(text: str, expected: list[tuple[int, str]]) -> None:
    """An empty file, unknown or repeated columns, no username column or a short row is refused."""
    with pytest.raises(InvalidInput) as info:
        _read(io.StringIO(text))
    assert [(p.line, p.field) for p in info.value.problems] == expected


@pytest.mark.parametrize("column", ["attr:[x]", "attr:", "attr: team"])
def test_an_attribute_column_whose_key_breaks_the_key_rule_is_refused_on_line_1(
    column: str,
) -> None:
    """An ``attr:`` column naming a key the key rule refuses is refused on the header's
    line, even when every cell is empty (as 'user edit --attr KEY=' refuses it)."""
    with pytest.raises(InvalidInput) as info:
        _read(io.StringIO(f"username,{column}\nalice,\n"))
    assert [(p.line, p.field) for p in info.value.problems] == [(1, column)]
    assert "must be 1-64 letters" in info.value.problems[0].rule


def test_attribute_columns_leave_other_attributes_alone(accounts: Accounts) -> None:
    """An import sets or (empty cell) removes only the attributes its columns name; an
    existing user's other attributes are kept."""
    accounts.add_user(
        {
            "username": "alice",
            "full_name": "Alice",
            "email": "a@example.com",
            "profile": "agents",
            "attributes": {"agent ID": "A-100", "floor": "3", "team": "red"},
        }
    )
    text = "username,attr:team,attr:floor,attr:desk\nalice,blue,,7\n"
    result = import_users(accounts, text)
    assert result.updated == ["alice"]
    assert accounts.get_user("alice").attributes == {
        "agent ID": "A-100",
        "team": "blue",
        "desk": "7",
    }
    assert import_users(accounts, text).unchanged == ["alice"]


def _alice_101_bob_102(accounts: Accounts) -> None:
    for name, extension in (("alice", "101"), ("bob", "102")):
        accounts.add_user(
            {
                "username": name,
                "full_name": name.title(),
                "email": f"{name}@example.com",
                "profile": "agents",
                "extension": extension,
            }
        )


def _extensions(accounts: Accounts) -> dict[str, str]:
    return {u.username: u.extension for u in accounts.list_users()}


@pytest.mark.parametrize(
    ("body", "final"),
    [
        ("alice,102\nbob,101\n", {"alice": "102", "bob": "101"}),
        ("bob,101\nalice,102\n", {"alice": "102", "bob": "101"}),
        ("alice,150\nbob,101\n", {"alice": "150", "bob": "101"}),
        ("bob,101\nalice,150\n", {"alice": "150", "bob": "101"}),
        ("dave,101\nalice,150\n", {"alice": "150", "bob": "102", "dave": "101"}),
    ],
    ids=["swap", "swap-reversed", "chain", "chain-reversed", "new-user-takes-a-freed-one"],
)
def test_an_import_whose_final_extensions_are_distinct_applies_in_any_row_order(
    accounts: Accounts, body: str, final: dict[str, str]
) -> None:
    """Rows that swap or pass on extensions apply in one transaction whatever their order:
    each is checked against the file's final state, not against the rows before it."""
    _alice_101_bob_102(accounts)
    header = "username,extension,full_name,email,profile\n"
    text = header + "".join(
        f"{r},{r.split(',')[0]},{r.split(',')[0]}@example.com,agents\n" for r in body.splitlines()
    )
    import_users(accounts, text)
    assert _extensions(accounts) == {"root": "100", **final}


@pytest.mark.parametrize("body", ["alice,150\ndave,\n", "dave,\nalice,150\n"])
def test_a_row_without_an_extension_gets_the_one_another_row_moves_a_user_off(
    accounts: Accounts, body: str
) -> None:
    """A new user without an extension gets the lowest number free once the file is applied,
    the one a row moves an existing user off included, whatever the rows' order."""
    _alice_101_bob_102(accounts)
    header = "username,extension,full_name,email,profile\n"
    text = header + "".join(
        f"{r},{r.split(',')[0]},{r.split(',')[0]}@example.com,agents\n" for r in body.splitlines()
    )
    import_users(accounts, text)
    assert _extensions(accounts) == {"root": "100", "alice": "150", "bob": "102", "dave": "101"}


_BOTH_GIVE_150 = (
    "line 2: extension: 150 is also given on line 3; line 3: extension: 150 is also given on line 2"
)
_BOTH_GIVE_102 = _BOTH_GIVE_150.replace("150", "102")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("alice,150\nbob,150\n", _BOTH_GIVE_150),
        ("bob,150\nalice,150\n", _BOTH_GIVE_150),
        ("alice,102\n", "line 2: extension: 102 is already used by user bob"),
        ("alice,102\nbob,102\n", _BOTH_GIVE_102),
        ("bob,102\nalice,102\n", _BOTH_GIVE_102),
        ("alice,102\nbob,\n", "line 2: extension: 102 is already used by user bob"),
        ("bob,\nalice,102\n", "line 3: extension: 102 is already used by user bob"),
    ],
)
def test_an_import_whose_final_extensions_repeat_is_refused_naming_the_rows(
    accounts: Accounts, body: str, problem: str
) -> None:
    """A file that would leave one extension on two users is refused in any row order, on
    field extension naming the rows (or the user keeping it), and nothing is applied."""
    _alice_101_bob_102(accounts)
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, "username,extension\n" + body)
    assert str(info.value) == problem
    assert _extensions(accounts) == {"root": "100", "alice": "101", "bob": "102"}


def test_an_export_saved_with_a_byte_order_mark_imports_as_without(accounts: Accounts) -> None:
    """CSV text that starts with a UTF-8 byte-order mark (as Excel saves it) imports as
    the same text without the mark: its first column is still ``username``."""
    result = import_users(accounts, "\ufeff" + _export(accounts))
    assert result.unchanged == [u.username for u in accounts.list_users()]


def test_rows_with_an_empty_username_are_each_refused_as_required(accounts: Accounts) -> None:
    """Each row whose username cell is empty is refused as such ("is required"), not as a
    repeat of the first such row."""
    text = "username,full_name,email,profile\n,A,a@example.com,agents\n,B,b@example.com,agents\n"
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, text)
    assert [(p.line, p.field, p.rule) for p in info.value.problems] == [
        (2, "username", "is required"),
        (3, "username", "is required"),
    ]


@pytest.mark.parametrize(
    ("admin_row", "rule"),
    [
        (
            "",
            "the store has no user yet and its first user must be an admin, while no row "
            "of the file adds one: add the admin first (provisioner user add NAME --role "
            "admin ...)",
        ),
        (
            "root,Root,root@example.com,,admin\n",
            "the store has no user yet and its first user must be an admin: put the "
            "admin's row (line 4) first",
        ),
    ],
)
def test_an_import_into_a_store_without_users_says_once_that_the_admin_comes_first(
    engine: Engine, policy: Policy, clock: FakeClock, admin_row: str, rule: str
) -> None:
    """Into a store with no user yet, a file whose first row is no admin is refused with
    one problem saying where the admin must come from, not one "the first user must be
    an admin" per row."""
    accounts = Accounts(engine, policy, clock)
    accounts.add_profile("agents")
    text = (
        "username,full_name,email,profile,role\n"
        "dave,Dave,dave@example.com,agents,\n"
        "gina,Gina,gina@example.com,agents,user\n"
    ) + admin_row
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, text)
    assert [(p.line, p.field, p.rule) for p in info.value.problems] == [(None, "csv", rule)]
    assert accounts.list_users() == []
    # The file with its admin row first imports as it is.
    if admin_row:
        first = "\n".join([text.splitlines()[0], admin_row.strip(), *text.splitlines()[1:3]])
        assert import_users(accounts, first + "\n").added == ["root", "dave", "gina"]


def test_a_bad_disabled_cell_is_reported_beside_the_rows_other_problems(
    accounts: Accounts,
) -> None:
    """A row breaking a field's rule and the disabled cell's is refused naming both, for an
    existing user and a new one alike: every broken rule of a row at once, not one per run."""
    accounts.add_user(
        {"username": "alice", "full_name": "Alice", "email": "a@example.com", "profile": "agents"}
    )
    text = (
        "username,full_name,email,profile,disabled\n"
        "alice,Alice,not-an-email,agents,maybe\n"
        "bob,Bob,not-an-email,agents,maybe\n"
    )
    with pytest.raises(InvalidInput) as info:
        import_users(accounts, text)
    found = sorted((p.line, p.field) for p in info.value.problems)
    assert found == [(2, "disabled"), (2, "email"), (3, "disabled"), (3, "email")]
    assert "line 2: disabled: must be on or off (true/false, yes/no, 1/0)" in str(info.value)
