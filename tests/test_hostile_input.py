"""Hostile input: no value, however crafted, adds a line, section, option, directive or AMI header.

Generated strings mix the pieces that restructure Asterisk config files, AMI actions, CSV
and SQL (CR, LF, NUL, ``;``, ``;--``, ``\\``, ``[section]``, ``(!)``, ``+=``, ``#include``,
``#exec``, quotes, SQL metacharacters) with Unicode look-alikes, control characters and
random text.  Each one is either refused with a clear error naming its field, or stored and
rendered so that the file parses back (``asterisk_conf.parse``) to exactly the intended
objects, realtime rows hold exactly the value, and AMI actions carry exactly their headers.

Most cases go through the pure functions (fast); fewer through the CLI and a real store.
``HOSTILE_EXAMPLES`` scales the long form (``pytest -m slow tests/test_hostile_input.py``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import random
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from provisioner import credentials, pjsip
from provisioner.accounts import Accounts, Policy
from provisioner.ami.actions import BANNER_PREFIX, FrameDecoder, build_action
from provisioner.asterisk_conf import parse
from provisioner.errors import InvalidInput, Problem
from provisioner.model import (
    UNDECODED_RULE,
    USER_FIELDS,
    User,
    Voice,
    undecoded,
    validate_fields,
)
from provisioner.pjsip import RenderSettings, UserObjects, check_value, render_user
from provisioner.store.engine import open_engine
from provisioner.targets.asterisk_schema import ps_auths, ps_endpoints
from provisioner.targets.configfile import ConfigFileTarget, check_rendered
from provisioner.targets.realtime import RealtimeTarget

from .faultkit import cheap_hasher, cli, endpoints, seed_store, store_url, write_config

FRAGMENTS = [
    "\r", "\n", "\r\n", "\0", "\t", "\x0b", "\x0c", "\x1b[31m", "\x7f", "\x85",
    ";", ";--", "--;", "\\", "\\n", "[section]", "[1000]", "]", "(!)", "(+)", "+=", "=>", "=",
    "#include /etc/passwd", "#exec /bin/sh", "#tryinclude x", "#", '"', "'", "`", "<", ">",
    ",", ":", " ", "  ", "' OR '1'='1", "'; DROP TABLE users; --", "%", "_", "$", "${EXTEN}",
    "\r\nAction: Originate\r\n", "\nChannel: Local/1@x", "Action: Logoff",
    "\u2028", "\u2029", "\ufeff", "\u200b", "\u202e", "\uff3b", "\uff3d", "\uff1b", "\u037e",
    "\uff03", "\u01c3", "\ud800", "é", "日本", "😀", "a", "Z", "1000", "-", ".", "+",
]  # fmt: skip

hostile = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=6).map(
    "".join
)

#: How many generated cases each property runs in CI; the long form scales these up.
LONG = int(os.environ.get("HOSTILE_EXAMPLES", "1000000"))

SETTINGS = RenderSettings()
TARGET = ConfigFileTarget(Path("/nonexistent/pjsip_users.conf"))
MD5 = "0" * 32
SHA = "0" * 64


def _ci(n: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _long(share: float) -> Callable[[Any], Any]:
    return settings(
        max_examples=max(1, int(LONG * share)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# -- pure: model rules ------------------------------------------------------------------

T = TypeVar("T")


def _attempt(call: Callable[[], T]) -> tuple[T | None, InvalidInput | None]:
    """``call()``'s result, or the :class:`InvalidInput` it raised."""
    try:
        return call(), None
    except InvalidInput as exc:
        return None, exc


TEXT_FIELDS = [f for f in USER_FIELDS if f not in ("avatar", "attributes", "messenger_sound")]


def check_validate(field: str, value: str) -> None:
    """A value is refused naming only its field, or comes back clean of control characters."""
    clean, refused = _attempt(lambda: validate_fields({field: value}))
    if refused is not None:
        assert refused.problems
        assert {p.field for p in refused.problems} == {field}
        assert all(p.rule for p in refused.problems)
        return
    assert clean is not None
    out = clean[field]
    if isinstance(out, str):
        # U+2028/U+2029 may stay: Asterisk, AMI and CSV end lines at LF (and CR) only.
        assert not any(unicodedata.category(ch).startswith("C") for ch in out)
    if field in ("full_name", "extension", "context", "call_group", "pickup_group", "username"):
        # Whatever the rules accept is rendered, and parses back exactly.
        objects = check_render(_user(**{field: out}))
        assert objects is not None, (field, value)


@given(st.sampled_from(TEXT_FIELDS), hostile)
@_ci(1500)
def test_validate_refuses_or_cleans_every_field(field: str, value: str) -> None:
    """validate_fields refuses a hostile value naming its field, or accepts a renderable one."""
    check_validate(field, value)


@given(hostile, hostile)
@_ci(300)
def test_attribute_keys_and_values(key: str, value: str) -> None:
    """Custom attributes: a hostile key or value is refused under 'attributes'."""
    clean, refused = _attempt(lambda: validate_fields({"attributes": {key: value}}))
    if refused is not None:
        assert [p.field for p in refused.problems] == ["attributes"]
        return
    assert clean is not None
    assert clean["attributes"] == {key: value}
    assert not any(ord(ch) < 32 for ch in key + value)


# -- pure: the mapping, the file text, AMI ------------------------------------------------


def _user(**fields: str) -> User:
    """A user as another application might have written it to the store (unvalidated)."""
    voice_fields = {"context", "call_group", "pickup_group"}
    voice = Voice(**{k: v for k, v in fields.items() if k in voice_fields})  # type: ignore[arg-type]
    base = User(
        id=1,
        role="user",
        username="alice",
        full_name="Alice A",
        email="a@example.com",
        extension="1000",
        voice=voice,
        sip_md5=MD5,
        sip_sha256=SHA,
    )
    # Unvalidated on purpose: any text in any field, as hostile writers would store it.
    return replace(base, **{k: v for k, v in fields.items() if k not in voice_fields})  # type: ignore[arg-type]


def _intended(objects: UserObjects) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [(name, (("type", kind), *opts)) for name, kind, opts in objects.sections()]


def check_render(user: User) -> UserObjects | None:
    """Refused naming fields, or rendered to text that parses back to exactly its objects."""
    objects, refused = _attempt(lambda: render_user(user, SETTINGS))
    if refused is not None:
        assert refused.problems
        assert all(p.field and p.rule for p in refused.problems)
        return None
    assert objects is not None
    text = TARGET.render_text([objects])
    parsed = parse(text.encode("utf-8"))
    assert parsed.directives == ()
    assert parsed.notices == ()
    got = [(s.name, s.options) for s in parsed.sections]
    assert got == _intended(objects)
    assert all(not s.template and not s.inherits for s in parsed.sections)
    check_rendered(text.encode("utf-8"), [objects])
    endpoint = dict(objects.endpoint)
    assert endpoint["context"] == user.voice.context
    # 19 characters are at most 76 bytes: within Asterisk's 79-byte caller ID name.
    assert endpoint["callerid"].startswith(f'"{user.full_name[:19].rstrip()}')
    assert dict(objects.auth)["username"] == user.username
    return objects


RENDERED = ["full_name", "username", "extension", "context", "call_group", "pickup_group"]


@given(st.dictionaries(st.sampled_from(RENDERED), hostile, min_size=1, max_size=3))
@_ci(1000)
def test_render_refuses_or_parses_back_exactly(fields: dict[str, str]) -> None:
    """A store row with hostile values renders to exactly its three sections, or is skipped."""
    check_render(_user(**fields))


def check_ami(key: str, value: str) -> None:
    """An action is refused naming the header, or decodes to exactly the headers given."""
    action, refused = _attempt(
        lambda: build_action("PJSIPShowEndpoint", [(key, value)], action_id="prov-1")
    )
    if refused is not None:
        assert [p.field for p in refused.problems] in ([key], [repr(key)])
        return
    assert action is not None
    decoder = FrameDecoder()
    messages = decoder.feed(f"{BANNER_PREFIX}9.0.0\r\n".encode() + action.encode())
    assert len(messages) == 1
    assert messages[0].headers == (
        ("Action", "PJSIPShowEndpoint"),
        ("ActionID", "prov-1"),
        (key, value.lstrip(" ")),
    )


@given(st.sampled_from(["Endpoint", "Family", "Key", "Channel", "Variable"]), hostile)
@_ci(1000)
def test_ami_actions_gain_no_header(key: str, value: str) -> None:
    """No value puts a second header or a second action on the AMI wire."""
    check_ami(key, value)


@given(hostile)
@_ci(200)
def test_ami_header_names_are_checked(key: str) -> None:
    """A hostile header name is refused as such."""
    check_ami(key, "x")


@given(hostile, hostile)
@_ci(300)
def test_ami_messages_decoded_hold_no_nul(name: str, value: str) -> None:
    """Whatever bytes a peer sends, no decoded header name or value holds a NUL or a lone
    surrogate (no database could store it: a NUL fails a whole PostgreSQL batch)."""
    wire = f"Event: ContactStatus\r\n{name}: {value}\r\n\r\n".encode("utf-8", "surrogatepass")
    decoder = FrameDecoder()
    messages = decoder.feed(f"{BANNER_PREFIX}9.0.0\r\n".encode() + wire)
    for message in messages:
        for key, text in message.headers:
            for part in (key, text):
                assert "\0" not in part
                part.encode("utf-8")  # raises on a lone surrogate


def _sweep_value(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.7:
            parts.append(rng.choice(FRAGMENTS))
        else:
            parts.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(1, 4))))
    return "".join(parts)


SWEEP = 6000


def test_seeded_sweep_over_every_pure_property() -> None:
    """6,000 seeded random cases, each through the rules, the mapping and AMI (no shrinking,
    but cheap: the hypothesis properties above shrink what this finds)."""
    rng = random.Random(20260101)
    for _ in range(SWEEP):
        value = _sweep_value(rng)
        check_validate(rng.choice(TEXT_FIELDS), value)
        check_render(_user(**{rng.choice(RENDERED): value}))
        check_ami(rng.choice(["Endpoint", "Key", "Variable"]), value)


# -- a real store: realtime rows, the CLI, CSV ------------------------------------------------


@pytest.fixture(scope="module")
def realtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, RealtimeTarget]]:
    engine = open_engine(f"sqlite:///{tmp_path_factory.mktemp('rt') / 'rt.db'}")
    target = RealtimeTarget(engine)
    target.create_tables()
    yield engine, target
    engine.dispose()


@given(st.dictionaries(st.sampled_from(["full_name", "context", "username"]), hostile, min_size=1))
@_ci(100)
def test_realtime_rows_hold_exactly_the_value(
    realtime: tuple[Engine, RealtimeTarget], fields: dict[str, str]
) -> None:
    """A rendered user's realtime rows hold exactly the rendered values."""
    engine, target = realtime
    objects = check_render(_user(**fields))
    if objects is None:
        return
    target.apply([objects], guard=None)
    with engine.connect() as conn:
        ep = conn.execute(select(ps_endpoints).where(ps_endpoints.c.id == "1000")).one()
        auth = conn.execute(select(ps_auths).where(ps_auths.c.id == "1000-auth")).one()
    endpoint = dict(objects.endpoint)
    assert ep.callerid == endpoint["callerid"]
    assert ep.context == endpoint["context"]
    assert auth.username == dict(objects.auth)["username"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Engine]]:
    saved = credentials._hasher
    cheap_hasher()
    tmp = tmp_path_factory.mktemp("hostile")
    engine = seed_store(store_url(tmp), 0)
    config = write_config(tmp)
    yield config, engine
    engine.dispose()
    credentials._hasher = saved


_names = (f"h{i}" for i in itertools.count())

#: CLI option -> the field name its errors name.
CLI_FIELDS = {
    "--full-name": "full_name",
    "--email": "email",
    "--description": "description",
    "--extension": "extension",
    "--sip-secret": "sip_secret",
    "--password": "password",
    "--context": "context",
    "--call-group": "call_group",
    "--pickup-group": "pickup_group",
    "--codecs": "codecs",
    "--profile": "profile",
    "--attr": "attributes",
    "username": "username",
}


def _stored(engine: Engine, username: str) -> User:
    return Accounts(engine, Policy(password_policy=False)).get_user(username)


def check_cli(config: Path, engine: Engine, option: str, value: str) -> None:
    name = next(_names)
    args = {
        "--full-name": "Agent H",
        "--email": f"{name}@example.com",
        "--profile": "agents",
    }
    if option == "--attr":
        args[option] = f"k={value}"
    elif option != "username":
        args[option] = value
    username = value if option == "username" else name
    argv = ["user", "add", *(f"{k}={v}" for k, v in args.items()), "--", username]
    ran = cli(config, *argv, check=False)
    assert "Traceback" not in ran.err
    field = CLI_FIELDS[option]
    if ran.code != 0:
        assert ran.code in (2, 3, 4), ran
        assert field.replace("attributes", "attr") in ran.err or field in ran.err, ran
        return
    user = _stored(engine, username)
    expected = {
        "full_name": user.full_name,
        "description": user.description,
        "extension": user.extension,
        "context": user.voice.context,
        "call_group": user.voice.call_group,
        "pickup_group": user.voice.pickup_group,
        "username": user.username,
        "attributes": user.attributes.get("k"),
        "profile": user.profile,
    }
    if field in expected:
        # An empty attribute value means "no such attribute".
        assert expected[field] == (value or None if field == "attributes" else value), value
    if field == "sip_secret":
        md5 = hashlib.md5(f"{username}:asterisk:{value}".encode()).hexdigest()
        assert user.sip_md5 == md5
    rendered = cli(config, "render", check=False)
    assert rendered.code == 0, rendered
    conf = config.parent / "pjsip_users.conf"
    parsed = parse(conf.read_bytes())
    assert parsed.directives == ()
    assert parsed.notices == ()
    assert len(parsed.sections) == 3 * len(endpoints(conf))
    mine = [s for s in parsed.sections if s.name == user.extension]
    name = user.full_name[: 40 - len(user.extension) - 5]
    while len(name.encode()) > 79:  # Asterisk's caller ID name buffer
        name = name[:-1]
    name = name.rstrip()
    assert dict(mine[0].options)["callerid"] == f'"{name}" <{user.extension}>'


@given(st.sampled_from(sorted(CLI_FIELDS)), hostile)
@_ci(100)
def test_cli_refuses_or_stores_exactly(store: tuple[Path, Engine], option: str, value: str) -> None:
    """Through 'user add', a hostile value is refused (exit 2-4) naming its field, or stored
    exactly and rendered into a file that parses back to whole sections."""
    check_cli(*store, option, value)


@pytest.mark.parametrize("option", sorted(CLI_FIELDS))
def test_one_megabyte_values_are_refused(store: tuple[Path, Engine], option: str) -> None:
    """A 1 MB value in any field is refused with exit 2 naming the field, no traceback."""
    config, _engine = store
    value = "x" * (1 << 20)
    args = {"--full-name": "Agent H", "--email": "mb@example.com", "--profile": "agents"}
    if option == "--attr":
        args[option] = f"k={value}"
    elif option != "username":
        args[option] = value
    username = value if option == "username" else "mb"
    ran = cli(config, "user", "add", *(f"{k}={v}" for k, v in args.items()), "--", username,
              check=False)  # fmt: skip
    assert ran.code == 2, ran.err[:300]
    assert "Traceback" not in ran.err
    field = CLI_FIELDS[option]
    assert field in ran.err or (field == "attributes" and "attr" in ran.err)


CSV_COLUMNS = ["full_name", "description", "context", "call_group", "email", "extension"]


def _csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["username", "full_name", "email", "profile",
                                             "description", "context", "call_group",
                                             "extension"])  # fmt: skip
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _export(config: Path) -> str:
    return cli(config, "user", "export", "--csv", "-").out


def _agent_rows(names: list[str], full_name: str) -> list[dict[str, str]]:
    """One valid CSV row per username in ``names``, each agent named ``full_name``."""
    return [
        {"username": n, "full_name": full_name, "email": f"{n}@example.com",
         "profile": "agents", "description": "", "context": "from-sip", "call_group": "",
         "extension": ""}
        for n in names
    ]  # fmt: skip


@given(st.integers(0, 3), st.sampled_from(CSV_COLUMNS), hostile)
@_ci(60)
def test_csv_import_refuses_whole_file_or_stores_exactly(
    store: tuple[Path, Engine], bad_row: int, column: str, value: str
) -> None:
    """A CSV with one hostile cell is refused whole (line and field named, store unchanged),
    or every row is stored with exactly the values given."""
    config, engine = store
    names = [next(_names) for _ in range(4)]
    rows = _agent_rows(names, "Csv Agent")
    rows[bad_row][column] = value
    before = _export(config)
    # Bytes as a file would hold them (a lone surrogate becomes invalid UTF-8).
    data = _csv(rows).encode("utf-8", "surrogatepass")
    ran = cli(config, "user", "import", "--csv", "-", input=data, check=False)
    assert "Traceback" not in ran.err
    if ran.code != 0:
        assert ran.code == 2, ran
        assert f"line {bad_row + 2}" in ran.err or "csv:" in ran.err, ran.err
        assert _export(config) == before
        return
    stored = _stored(engine, names[bad_row])
    got = {
        "full_name": stored.full_name,
        "description": stored.description,
        "context": stored.voice.context,
        "call_group": stored.voice.call_group,
        "extension": stored.extension,
    }
    if column in got and value != "":
        assert got[column] == value


def test_one_bad_row_in_a_hundred_changes_nothing(store: tuple[Path, Engine]) -> None:
    """100 rows, the 50th with a newline in its name: exit 2 naming line 51, nothing added."""
    config, _engine = store
    names = [next(_names) for _ in range(100)]
    rows = _agent_rows(names, "Bulk Agent")
    rows[49]["full_name"] = "Bad\n[1000]\n#exec /bin/sh"
    before = _export(config)
    ran = cli(config, "user", "import", "--csv", "-", input=_csv(rows), check=False)
    assert ran.code == 2
    assert "line 51" in ran.err
    assert "full_name" in ran.err
    assert _export(config) == before


# -- the long form -----------------------------------------------------------------------------


@pytest.mark.slow
@given(st.sampled_from(TEXT_FIELDS), hostile)
@_long(0.4)
def test_long_validate(field: str, value: str) -> None:
    """Long form of the model-rule property."""
    check_validate(field, value)


@pytest.mark.slow
@given(st.dictionaries(st.sampled_from(RENDERED), hostile, min_size=1, max_size=3))
@_long(0.35)
def test_long_render(fields: dict[str, str]) -> None:
    """Long form of the render round-trip property."""
    check_render(_user(**fields))


@pytest.mark.slow
@given(st.sampled_from(["Endpoint", "Family", "Key", "Channel", "Variable"]), hostile)
@_long(0.25)
def test_long_ami(key: str, value: str) -> None:
    """Long form of the AMI property."""
    check_ami(key, value)


def test_csv_file_that_is_not_utf8_is_refused(store: tuple[Path, Engine], tmp_path: Path) -> None:
    """A CSV file holding invalid UTF-8 (a lone surrogate, 0xff) is refused naming --csv."""
    config, _engine = store
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"username,full_name\nbob,B\xed\xa0\x80\xffob\n")
    ran = cli(config, "user", "import", "--csv", str(bad), check=False)
    assert ran.code == 2
    assert "--csv: cannot read" in ran.err
    assert "Traceback" not in ran.err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("extension", "10\udce9"),
        ("extension", "\udcff"),
        ("username", "al\udce9x"),
        ("context", "from-\udce9"),
        ("call_group", "1,\udce9"),
        ("pickup_group", "\udcff"),
    ],
)
def test_a_field_holding_undecoded_bytes_is_named_with_the_text_rule(
    field: str, value: str
) -> None:
    """A field holding bytes that were not text is refused with the rule every field gives
    such bytes, not as a value of the wrong form."""
    with pytest.raises(InvalidInput) as refused:
        render_user(_user(**{field: value}), SETTINGS)
    assert refused.value.problems == (Problem(field, UNDECODED_RULE),)


# -- what reaches the admin's terminal ---------------------------------------------------------

#: An escape sequence that would write the admin's clipboard (OSC 52), then one clearing the
#: screen: what another writer could store in a row that a command later prints.
TERMINAL_ATTACK = "\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J"


def _stored_by_hand(engine: Engine, who: str, **values: str) -> None:
    """Set ``values`` on user ``who``'s row in plain SQL, as another writer would."""
    from provisioner.store.schema import users

    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.username == who).values(**values))


def test_a_sync_report_prints_no_terminal_escape_from_a_row(tmp_path: Path) -> None:
    """A username written by hand with escape sequences is printed escaped in the skipped
    line of render and sync, never as the sequence the terminal would act on."""
    engine = seed_store(store_url(tmp_path), 1)
    config = write_config(tmp_path)
    _stored_by_hand(engine, "u0", username="u0" + TERMINAL_ATTACK)
    engine.dispose()
    for args in (["render"], ["sync", "--once"]):
        ran = cli(config, *args, check=False)
        assert ran.code == 0, ran
        assert "skipped u0\\x1b]52;c;" in ran.err
        assert "\x1b" not in ran.err + ran.out
        assert "\x07" not in ran.err + ran.out


def test_a_login_welcome_prints_no_terminal_escape_from_a_row(tmp_path: Path) -> None:
    """A full name written by hand with escape sequences is welcomed escaped."""
    engine = seed_store(store_url(tmp_path), 0)
    Accounts(engine, Policy(password_policy=False)).set_password("root", "Root-pass-1")
    _stored_by_hand(engine, "root", full_name="Root" + TERMINAL_ATTACK)
    engine.dispose()
    ran = cli(write_config(tmp_path), "auth", "login", "root", input="Root-pass-1\n")
    assert ran.out == "welcome, Root\\x1b]52;c;cm0gLXJmIH4K\\x07\\x1b[2J\n"


# -- Asterisk's realtime escapes -----------------------------------------------------------


@pytest.mark.parametrize("name", ["Boss^22 ^3C911^3E", "Al^3Bice", "Cut^00here", "Caret^"])
def test_a_full_name_with_a_caret_is_refused_where_realtime_would_decode_it(name: str) -> None:
    """Asterisk's realtime drivers (pgsql, mysql, odbc) decode ``^XX`` in every value they
    read (``^22`` a quote, ``^3B`` a semicolon, ``^00`` the end): a full name holding a
    caret is refused by the rules and at render, not written to be read as another."""
    with pytest.raises(InvalidInput) as by_rules:
        validate_fields({"full_name": name})
    assert [p.field for p in by_rules.value.problems] == ["full_name"]
    with pytest.raises(InvalidInput) as at_render:
        render_user(_user(full_name=name), SETTINGS)
    assert [p.field for p in at_render.value.problems] == ["full_name"]


def test_a_dry_run_diff_prints_no_terminal_escape_from_a_row(tmp_path: Path) -> None:
    """A realtime row's column edited by hand to hold escape sequences is shown escaped in
    ``render --dry-run``'s diff (its old value), never as the sequence itself."""
    engine = seed_store(store_url(tmp_path), 1)
    config = write_config(tmp_path, kind="realtime")
    cli(config, "render")
    with engine.begin() as conn:
        conn.execute(ps_endpoints.update().values(callerid="x" + TERMINAL_ATTACK))
    engine.dispose()
    ran = cli(config, "render", "--dry-run")
    assert "x\\x1b]52;c;" in ran.out
    assert "\x1b" not in ran.out
    assert "\x07" not in ran.out


def test_a_csv_export_to_a_terminal_prints_no_terminal_escape(tmp_path: Path) -> None:
    """``user export --csv -`` onto a terminal shows a full name written by hand with escape
    sequences escaped; piped, the CSV keeps the exact text, for a re-import."""
    import pty
    import subprocess

    from .faultkit import PROVISIONER, env

    engine = seed_store(store_url(tmp_path), 1)
    _stored_by_hand(engine, "u0", full_name="Agent" + TERMINAL_ATTACK)
    engine.dispose()
    config = write_config(tmp_path)
    argv = [PROVISIONER, "--config", str(config), "user", "export", "--csv", "-"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=slave, stderr=subprocess.PIPE, env=env(), timeout=60)
        os.close(slave)
        shown = b""
        while chunk := _read_pty(master):
            shown += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    assert b"Agent\\x1b]52;c;" in shown
    assert b"\x1b" not in shown
    assert b"\x07" not in shown
    piped = subprocess.run(argv, capture_output=True, env=env(), timeout=60, check=True)
    assert ("Agent" + TERMINAL_ATTACK).encode() in piped.stdout


def _read_pty(fd: int) -> bytes:
    """What is left to read on a pty's master side (b"" at its end: EIO once closed)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_every_character_is_judged_by_its_unicode_category_whatever_the_fast_path() -> None:
    """A rendered value holding any character of category C (control, format, surrogate,
    private, unassigned), ASCII or not, is refused as a control character, one holding
    an undecodable byte's escape as such, and any other character passes: the check that
    takes an ASCII value in one pass refuses exactly what the per-character one does."""
    for code in range(0x110000):
        ch = chr(code)
        escape = 0xDC80 <= code <= 0xDCFF
        assert undecoded(f"a{ch}b") is escape
        problem = check_value("f", f"a{ch}b")
        if escape:
            assert problem == Problem("f", UNDECODED_RULE)
        elif unicodedata.category(ch).startswith("C"):
            assert problem is not None
            assert problem.rule.startswith("must not contain control characters")
        elif ch in ';[]\\"<>#^':
            assert problem is not None
            assert problem.rule.startswith("must not contain any of")
        else:
            assert problem is None, hex(code)


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("context", "from-sip", None),
        ("context", "fr\u00e9-sip", None),
        ("callerid", '"Ren\u00e9 M" <1001>', None),
        ("context", "a\x07b", "must not contain control characters"),
        ("context", "a\u200bb", "must not contain control characters"),
        ("context", "a\udc80b", UNDECODED_RULE),
        ("context", "a;b", "must not contain any of"),
        ("callerid", '"a#b" <1001>', "must not contain any of"),
        ("context", "ab ", "must not start or end with spaces"),
        ("allow", "u" * (pjsip.VALUE_MAX + 1), f"must be at most {pjsip.VALUE_MAX} characters"),
    ],
)
def test_the_output_s_last_check_refuses_exactly_the_value_that_breaks_a_rule(
    option: str, value: str, rule: str | None
) -> None:
    """The output's last check passes a user whose ids and values are all plain (in one
    pass) and refuses exactly the one value that breaks a rule, naming its option, as
    when it checked each value alone."""
    plain = render_user(
        User(
            id=1,
            role="user",
            username="u1",
            full_name="U",
            email="u@example.com",
            voice=Voice(),
            extension="1001",
            sip_md5="0" * 32,
            sip_sha256="0" * 64,
        ),
        RenderSettings(),
    )
    endpoint = tuple((k, value if k == option else v) for k, v in plain.endpoint)
    assert option in dict(endpoint)
    if rule is None:
        pjsip._final_check(replace(plain, endpoint=endpoint))
        return
    with pytest.raises(InvalidInput) as refused:
        pjsip._final_check(replace(plain, endpoint=endpoint))
    assert [(p.field, p.rule[: len(rule)]) for p in refused.value.problems] == [(option, rule)]
