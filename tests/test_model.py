"""The pure rules of provisioner.model: good values pass, bad ones name their rule."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import pytest

from provisioner import credentials
from provisioner.errors import InvalidInput
from provisioner.model import (
    AVATAR_MAX_BYTES,
    User,
    Voice,
    account_state,
    check_password_policy,
    check_profile_fields,
    is_locked,
    sniff_avatar,
    validate_fields,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
GIF = b"GIF89a" + b"\x00" * 16
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>'

GOOD: list[tuple[str, Any, Any]] = [
    ("role", "admin", "admin"),
    ("role", "USER", "user"),
    ("username", "alice", "alice"),
    ("username", "Alice.Smith_2", "Alice.Smith_2"),
    ("username", "a" * 40, "a" * 40),
    ("full_name", "Zoë O'Brien", "Zoë O'Brien"),
    ("email", "alice@example.com", "alice@example.com"),
    ("email", "Bob@EXAMPLE.com", "Bob@example.com"),
    ("description", "", ""),
    ("description", "d" * 1024, "d" * 1024),
    ("extension", "1001", "1001"),
    ("extension", "0", "0"),
    ("sip_secret", "s3cret-Value!", "s3cret-Value!"),
    ("password", "x", "x"),  # the policy is off in these checks
    ("transport", "udp", "udp"),
    ("transport", "WSS", "wss"),
    ("nat", "force_rport", "force_rport"),
    ("nat", "route", "route"),
    ("codecs", "ulaw", "ulaw"),
    ("codecs", "opus,g722,ulaw", "opus,g722,ulaw"),
    ("codecs", ["alaw", "gsm"], "alaw,gsm"),
    ("codecs", "ulaw,alaw,gsm,g722,g729,opus", "ulaw,alaw,gsm,g722,g729,opus"),
    ("context", "from-sip", "from-sip"),
    ("context", "internal_2.a+b", "internal_2.a+b"),
    ("call_group", "", ""),
    ("call_group", "0", "0"),
    ("call_group", "1,3-5", "1,3-5"),
    ("pickup_group", "63", "63"),
    ("pickup_group", "0-63", "0-63"),
    ("video", "always", "always"),
    ("log_level", "debug", "debug"),
    ("log_level", "off", None),
    ("log_level", "", None),
    ("messenger_sound", "off", False),
    ("messenger_sound", "yes", True),
    ("messenger_sound", True, True),
    ("toast_position", "bottom-left", "bottom-left"),
    ("avatar", PNG, PNG),
    ("avatar", JPEG, JPEG),
    ("avatar", GIF, GIF),
    ("avatar", SVG, SVG),
    ("attributes", {"team": "blue", "floor 2": ""}, {"team": "blue", "floor 2": ""}),
]

BAD: list[tuple[str, Any, str]] = [
    ("role", "root", "must be one of admin, user"),
    ("role", "", "must be one of admin, user"),
    ("username", "", "only letters, digits, '.' and '_'"),
    ("username", "al ice", "only letters, digits, '.' and '_'"),
    ("username", "al-ice", "only letters, digits, '.' and '_'"),
    ("username", "alice@x", "only letters, digits, '.' and '_'"),
    ("username", "zoë", "only letters, digits, '.' and '_'"),
    ("username", "a" * 41, "1-40 characters"),
    ("username", "alice\n", "only letters, digits, '.' and '_'"),
    ("full_name", "", "must not be empty"),
    ("full_name", "   ", "must not be empty"),
    ("full_name", " Alice", "must not start or end with spaces"),
    ("full_name", "Alice\nB", "control characters"),
    # "Zoë" typed at a Latin-1 terminal under a UTF-8 locale: the byte F6, escaped.
    ("full_name", "Zo\udcf6", "not valid in its character set"),
    ("full_name", 'Alice "A"', "must not contain"),
    ("full_name", "Alice <a@b>", "must not contain"),
    ("full_name", "[section]", "must not contain"),
    ("full_name", "x" * 129, "at most 128"),
    ("email", "", "valid email address"),
    ("email", "alice", "valid email address"),
    ("email", "alice@", "valid email address"),
    ("email", "a b@example.com", "valid email address"),
    ("email", "alice@example.com\n", "valid email address"),
    ("description", "d" * 1025, "at most 1024"),
    ("description", "tab\there", "control characters"),
    ("extension", "", "1-20 digits"),
    ("extension", "10a", "1-20 digits"),
    ("extension", "-1", "1-20 digits"),
    ("extension", "١٢٣", "1-20 digits"),  # Arabic-Indic digits are not dialable digits
    ("extension", "1" * 21, "1-20 digits"),
    ("sip_secret", "short", "8-128 printable ASCII"),
    ("sip_secret", "has a space", "8-128 printable ASCII"),
    ("sip_secret", "x" * 129, "8-128 printable ASCII"),
    ("password", "", "must not be empty"),
    ("password", "nul\x00byte", "without control characters"),
    ("password", "Gr\udcf6n-Pass1", "not valid in its character set"),
    ("transport", "sctp", "must be one of udp, tcp, tls, ws, wss"),
    ("nat", "maybe", "must be one of yes, no, force_rport, comedia, never, route"),
    ("codecs", "", "non-empty"),
    ("codecs", "ulaw,ulaw", "distinct codecs"),
    ("codecs", "ulaw,speex", "ulaw, alaw, gsm, g722, g729, opus"),
    ("codecs", [], "non-empty"),
    ("codecs", "ulaw,,alaw", "comma-separated"),
    ("context", "", "an Asterisk context name"),
    ("context", "from sip", "an Asterisk context name"),
    ("context", "from,sip", "an Asterisk context name"),
    ("context", "from;sip", "an Asterisk context name"),
    ("context", "[from]", "an Asterisk context name"),
    ("context", "-from", "not starting with"),
    ("context", "c" * 41, "1-40"),
    ("call_group", "64", "numbers 0-63"),
    ("call_group", "5-3", "numbers 0-63"),
    ("call_group", "1, 2", "numbers 0-63"),
    ("call_group", "1,,2", "numbers 0-63"),
    ("call_group", "a", "numbers 0-63"),
    ("call_group", "-1", "numbers 0-63"),
    ("pickup_group", "1-100", "numbers 0-63"),
    ("pickup_group", ",".join(["1"] * 21), "at most 40 characters"),
    ("video", "sometimes", "must be one of yes, no, always"),
    ("log_level", "trace", "must be one of error, warning, info, debug"),
    ("messenger_sound", "loud", "must be on or off"),
    ("toast_position", "middle", "must be one of top-right"),
    ("avatar", b"BM" + b"\x00" * 16, "PNG, JPG, GIF or SVG"),
    ("avatar", b"<html><body>svg</body></html>", "PNG, JPG, GIF or SVG"),
    ("avatar", "not bytes", "must be image data"),
    ("avatar", PNG + b"\x00" * AVATAR_MAX_BYTES, "at most 8 MB"),
    ("attributes", {"": "x"}, "must be 1-64 letters"),
    ("attributes", {"bad=key": "x"}, "must be 1-64 letters"),
    ("attributes", {"k": "line\nbreak"}, "control characters"),
    ("attributes", {"k": "v" * 256}, "at most 255"),
    ("attributes", "team=blue", "KEY=VALUE pairs"),
]


@pytest.mark.parametrize(("field", "value", "clean"), GOOD)
def test_good_values_pass_and_are_normalized(field: str, value: Any, clean: Any) -> None:
    """A value that meets its field's rule passes and comes back in its canonical form."""
    assert validate_fields({field: value}) == {field: clean}


@pytest.mark.parametrize(("field", "value", "rule"), BAD)
def test_bad_values_name_field_and_rule(field: str, value: Any, rule: str) -> None:
    """A value that breaks its field's rule is refused with a problem naming the field and rule."""
    with pytest.raises(InvalidInput) as info:
        validate_fields({field: value})
    (problem,) = info.value.problems
    assert problem.field == field
    assert rule in problem.rule
    assert field in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    """Several bad fields give one error listing each field with its rule, in input order."""
    with pytest.raises(InvalidInput) as info:
        validate_fields(
            {"username": "bad name", "email": "nope", "codecs": "mp3", "extension": "x1"},
            line=7,
        )
    assert [(p.field, p.line) for p in info.value.problems] == [
        ("username", 7),
        ("email", 7),
        ("codecs", 7),
        ("extension", 7),
    ]
    assert "line 7: email: must be a valid email address" in str(info.value)


def test_unknown_field_is_reported() -> None:
    """A field the model does not know is refused by name."""
    with pytest.raises(InvalidInput, match=r"colour: is not a user field"):
        validate_fields({"colour": "red"})


@pytest.mark.parametrize(
    "password",
    ["Abcdef1!", "Correct-Horse7", "xY9~aaaa", "P@ssw0rd_long_enough", "Zz0{" + "a" * 60],
)
def test_password_policy_accepts_strong_passwords(password: str) -> None:
    """A password of 8+ characters with lower, upper, digit and a listed special passes."""
    assert check_password_policy(password) is None
    assert validate_fields({"password": password}, password_policy=True) == {"password": password}


@pytest.mark.parametrize(
    "password",
    [
        "Abcde1!",  # 7 characters
        "abcdefg1!",  # no uppercase
        "ABCDEFG1!",  # no lowercase
        "Abcdefgh!",  # no digit
        "Abcdefgh1",  # no special
        "Abcdefg1 ",  # a space is not a listed special
        "Abcdefg1/",  # '/' is not a listed special
    ],
)
def test_password_policy_refuses_weak_passwords(password: str) -> None:
    """A password missing length, a lower, an upper, a digit or a listed special is refused."""
    rule = check_password_policy(password)
    assert rule is not None
    assert "at least 8 characters" in rule
    with pytest.raises(InvalidInput, match=r"password: must be at least 8 characters"):
        validate_fields({"password": password}, password_policy=True)
    # With the security suite off, any non-empty password is accepted.
    assert validate_fields({"password": password}, password_policy=False)["password"] == password


def test_avatar_is_judged_by_content_not_name() -> None:
    """PNG bytes are an image whatever they are called; text called .png is not."""
    assert sniff_avatar(PNG) == "image/png"
    assert sniff_avatar(JPEG) == "image/jpeg"
    assert sniff_avatar(GIF) == "image/gif"
    assert sniff_avatar(b"\xef\xbb\xbf  <svg width='1'/>") == "image/svg+xml"
    assert sniff_avatar(b"<!-- c --><svg>") == "image/svg+xml"
    assert sniff_avatar(b"<?xml version='1.0'?><html/>") is None
    assert sniff_avatar(b"hello.png") is None


def test_avatar_at_exactly_8_mb_is_accepted() -> None:
    """An avatar of exactly 8 MB passes the size rule."""
    data = PNG + b"\x00" * (AVATAR_MAX_BYTES - len(PNG))
    assert validate_fields({"avatar": data})["avatar"] is data


@pytest.mark.parametrize(
    ("name", "description", "fields"),
    [
        ("", "", ["name"]),
        (" agents", "", ["name"]),
        ("agents ", "", ["name"]),
        ("-agents", "", ["name"]),
        ("a" * 65, "", ["name"]),
        ("agents", "x" * 1025, ["description"]),
        ("bad/name", "line\nbreak", ["name", "description"]),
    ],
)
def test_profile_rules(name: str, description: str, fields: list[str]) -> None:
    """A bad profile name or description is refused, both reported at once."""
    with pytest.raises(InvalidInput) as info:
        check_profile_fields(name, description)
    assert [p.field for p in info.value.problems] == fields


def test_profile_good_values() -> None:
    """A profile name of letters, digits, spaces and ``_ . -`` with a description passes."""
    assert check_profile_fields("Tier 2.support_a-b", "Second line") == (
        "Tier 2.support_a-b",
        "Second line",
    )


def _user(**kwargs: Any) -> User:
    base: dict[str, Any] = {
        "id": 2,
        "role": "user",
        "username": "u",
        "full_name": "U",
        "email": "u@example.com",
        "extension": "100",
        "voice": Voice(),
    }
    return User(**{**base, **kwargs})


def test_account_state_precedence_and_lock_expiry() -> None:
    """State is deleted over disabled over locked over active; a lock expires after its minutes."""
    now = datetime(2026, 1, 1, 12, 0)
    locked_at = now - timedelta(minutes=10)
    assert account_state(_user(), now, 15) == "active"
    assert account_state(_user(locked_at=locked_at), now, 15) == "locked"
    assert account_state(_user(locked_at=locked_at), now, 10) == "active"
    assert account_state(_user(locked_at=locked_at), now, 0) == "locked"  # 0: admin only
    assert account_state(_user(locked_at=locked_at, disabled=True), now, 15) == "disabled"
    assert account_state(_user(disabled=True, deleted_at=now), now, 15) == "deleted"
    assert is_locked(None, now, 15) is False


def test_voice_defaults() -> None:
    """A new user's Voice settings default to udp, no NAT, ulaw+alaw, from-sip, no video."""
    assert Voice() == Voice("udp", "no", ("ulaw", "alaw"), "from-sip", "", "", "no")


def test_sip_digests_are_ha1_of_username_realm_secret() -> None:
    """The SIP digests are MD5 and SHA-256 of ``username:realm:secret`` (RFC 7616 HA1)."""
    d = credentials.sip_digests("alice", "asterisk", "s3cret")
    assert d.realm == "asterisk"
    assert d.md5 == hashlib.md5(b"alice:asterisk:s3cret").hexdigest()
    assert d.sha256 == hashlib.sha256(b"alice:asterisk:s3cret").hexdigest()


def test_generated_secrets_are_random_and_well_formed() -> None:
    """Generated SIP secrets pass the SIP secret rule; API keys are long, random and hashed."""
    secrets = {credentials.generate_sip_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert validate_fields({"sip_secret": s}) == {"sip_secret": s}
    key = credentials.generate_apikey()
    assert key.startswith("pk_")
    assert len(key) > 40
    assert credentials.hash_apikey(key) != key
    assert len(credentials.hash_apikey(key)) == 64


def test_password_hash_is_argon2_and_verifies() -> None:
    """A login password is stored as an argon2 hash that verifies only the right password."""
    h = credentials.hash_password("Correct-Horse7")
    assert h.startswith("$argon2id$")
    assert "Correct-Horse7" not in h
    assert credentials.verify_password(h, "Correct-Horse7")
    assert not credentials.verify_password(h, "wrong")
    assert not credentials.verify_password(None, "anything")
    assert not credentials.verify_password("not-a-hash", "anything")


def test_log_level_off_is_taken_in_any_case_as_the_levels_are() -> None:
    """A log level is read in any case, "off" as well as the levels (a CSV cell "OFF" or
    "Off" means off, as "DEBUG" means debug); a bad one's rule names off too."""
    for value in ("off", "OFF", "Off"):
        assert validate_fields({"log_level": value}) == {"log_level": None}
    assert validate_fields({"log_level": "DEBUG"}) == {"log_level": "debug"}
    with pytest.raises(InvalidInput) as info:
        validate_fields({"log_level": "trace"})
    assert info.value.problems[0].rule == "must be one of error, warning, info, debug, or off"
