"""Users, profiles, Voice settings and their rules.

Pure: no database, file or socket.  Each ``check_*`` function takes a raw value
and returns ``(clean_value, None)`` or ``(None, rule)`` where ``rule`` is the
sentence an admin reads.  :func:`validate_fields` runs them over a dict of
changes and reports every broken rule at once.

The rules are deliberately stricter than what Asterisk would accept: every
value here may end up in ``pjsip.conf``, a realtime row or an AMI action, so
nothing that could start a line, a section, a comment or a directive gets in.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from email_validator import EmailNotValidError, validate_email

from .errors import InvalidInput, Problem

__all__ = [
    "CODECS",
    "LOG_LEVELS",
    "NATS",
    "ROLES",
    "TOAST_POSITIONS",
    "TRANSPORTS",
    "UNDECODED_RULE",
    "USER_FIELDS",
    "VIDEOS",
    "Profile",
    "User",
    "Voice",
    "account_state",
    "as_of",
    "check_flag",
    "check_password_policy",
    "lock_as_of",
    "merge_attributes",
    "sniff_avatar",
    "undecoded",
    "validate_fields",
]

ROLES = ("admin", "user")
TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")
#: The name of a transport object in Asterisk (config ``target.transports``):
#: ``ps_endpoints.transport`` is VARCHAR(40), so a longer name would fail every realtime apply.
TRANSPORT_NAME_MAX = 40
TRANSPORT_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{TRANSPORT_NAME_MAX}}}")
TRANSPORT_NAME_RULE = f"1-{TRANSPORT_NAME_MAX} letters, digits, '_', '.' or '-'"
NATS = ("yes", "no", "force_rport", "comedia", "never", "route")
CODECS = ("ulaw", "alaw", "gsm", "g722", "g729", "opus")
VIDEOS = ("yes", "no", "always")
LOG_LEVELS = ("error", "warning", "info", "debug")
TOAST_POSITIONS = (
    "top-right",
    "top-left",
    "top-center",
    "bottom-right",
    "bottom-left",
    "bottom-center",
)
AVATAR_MAX_BYTES = 8 * 1024 * 1024
PASSWORD_SPECIALS = "~!@#$%^&-_=+[{]}"  # noqa: S105 (a character class, not a password)

DEFAULT_CONTEXT = "from-sip"
DEFAULT_CODECS = ("ulaw", "alaw")

# 40: the auth username column (ps_auths.username) is VARCHAR(40).
_USERNAME = re.compile(r"[A-Za-z0-9._]{1,40}")
_EXTENSION = re.compile(r"[0-9]{1,20}")
# Asterisk context names: no spaces, brackets, commas, semicolons or pipes
# (dialplan separators); 40 is ps_endpoints.context's width.
_CONTEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,39}")
_GROUP_ITEM = re.compile(r"([0-9]{1,2})(?:-([0-9]{1,2}))?")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
_ATTR_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
_SIP_SECRET = re.compile(r"[\x21-\x7e]{8,128}")
# Characters that end or restructure a value in pjsip.conf, a CSV cell or a
# callerid string, and ``^``, which Asterisk's realtime drivers read as the start of a
# ``^XX`` escape (``^22`` a quote, ``^00`` the value's end); refused in free text that is
# ever rendered.
_NAME_FORBIDDEN = set('"<>;\\[]#^')


def _has_control(value: str) -> bool:
    """True when ``value`` holds a control, format, surrogate or unassigned character."""
    return any(unicodedata.category(ch).startswith("C") for ch in value)


#: The rule a value breaks when it holds a byte its source could not decode.
UNDECODED_RULE = (
    "must be text: it holds a byte that is not valid in its character set "
    "(the terminal's, or UTF-8 in the store)"
)


#: Python's escape of a byte that was not text (see :func:`undecoded`).
_UNDECODED = re.compile("[\udc80-\udcff]")


def undecoded(value: str) -> bool:
    """True when ``value`` holds Python's escape of a byte that was not text in the
    charset it was read in (a command-line argument or a line of stdin typed at a Latin-1
    terminal under a UTF-8 locale; a SQLite value another application wrote in Latin-1,
    read by :func:`~provisioner.store.engine.escaping_bytes_not_utf8`): U+DC80 to U+DCFF,
    as ``surrogateescape`` makes them.  Searched in C; an ASCII value (nearly every one)
    holds none."""
    return not value.isascii() and _UNDECODED.search(value) is not None


Checker = Callable[[Any], tuple[Any, str | None]]


def _text(max_len: int, *, required: bool, forbidden: set[str] | None = None) -> Checker:
    """A checker for one line of free text: no control characters, bounded length."""

    def check(value: Any) -> tuple[Any, str | None]:
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None, "must be text"
        if required and not value.strip():
            return None, "must not be empty"
        if len(value) > max_len:
            return None, f"must be at most {max_len} characters"
        if value != value.strip():
            return None, "must not start or end with spaces"
        if undecoded(value):
            return None, UNDECODED_RULE
        if _has_control(value):
            return None, "must not contain control characters (newline, tab, NUL, ...)"
        if forbidden and set(value) & forbidden:
            return None, "must not contain any of " + " ".join(sorted(forbidden))
        return value, None

    return check


def _choice(options: tuple[str, ...]) -> Checker:
    def check(value: Any) -> tuple[Any, str | None]:
        if isinstance(value, str) and value.lower() in options:
            return value.lower(), None
        return None, "must be one of " + ", ".join(options)

    return check


def _optional_choice(options: tuple[str, ...]) -> Checker:
    """One of ``options`` or off (None): ``off`` in any case, as the options are read, or
    empty (an export's cell for off)."""

    def check(value: Any) -> tuple[Any, str | None]:
        if value is None or (isinstance(value, str) and value.lower() in ("", "off")):
            return None, None
        if isinstance(value, str) and value.lower() in options:
            return value.lower(), None
        return None, "must be one of " + ", ".join(options) + ", or off"

    return check


def _pattern(pattern: re.Pattern[str], rule: str) -> Checker:
    def check(value: Any) -> tuple[Any, str | None]:
        if isinstance(value, str) and pattern.fullmatch(value):
            return value, None
        return None, rule

    return check


def check_flag(value: Any) -> tuple[Any, str | None]:
    """On/off: accepts booleans and true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value, None
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True, None
    if text in ("0", "false", "no", "off"):
        return False, None
    return None, "must be on or off (true/false, yes/no, 1/0)"


def check_email(value: Any) -> tuple[Any, str | None]:
    """A syntactically valid address (no DNS lookup), normalized, at most 254 characters."""
    if not isinstance(value, str) or not value:
        return None, "must be a valid email address"
    if len(value) > 254 or _has_control(value):
        return None, "must be a valid email address"
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        return None, f"must be a valid email address ({exc})"
    return result.normalized, None


def check_codecs(value: Any) -> tuple[Any, str | None]:
    """An ordered, non-empty list of distinct codecs; accepts ``"a,b"`` or a sequence."""
    rule = (
        "must be an ordered, non-empty, comma-separated list of distinct codecs from "
        + ", ".join(CODECS)
    )
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        return None, rule
    clean = []
    for item in items:
        if not isinstance(item, str):
            return None, rule
        name = item.strip().lower()
        if name not in CODECS or name in clean:
            return None, rule
        clean.append(name)
    return ",".join(clean), None


def check_group(value: Any) -> tuple[Any, str | None]:
    """Asterisk group syntax: numbers 0-63, comma lists and ascending ranges; empty is none."""
    rule = (
        "must be numbers 0-63 as a comma list with ranges, such as 1,3-5 "
        "(at most 40 characters, or empty)"
    )
    if value is None or value == "":
        return "", None
    if not isinstance(value, str) or len(value) > 40:  # ps_endpoints.call_group is VARCHAR(40)
        return None, rule
    for item in value.split(","):
        m = _GROUP_ITEM.fullmatch(item)
        if not m:
            return None, rule
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if not (0 <= low <= high <= 63):
            return None, rule
    return value, None


def check_password_policy(password: str) -> str | None:
    """The security suite's password rule, or None when ``password`` meets it."""
    ok = (
        len(password) >= 8
        and any(c.islower() for c in password)
        and any(c.isupper() for c in password)
        and any(c.isdigit() for c in password)
        and any(c in PASSWORD_SPECIALS for c in password)
    )
    if ok:
        return None
    return (
        "must be at least 8 characters with a lowercase letter, an uppercase letter, "
        f"a digit and one of {PASSWORD_SPECIALS}"
    )


def check_password_basic(value: Any) -> tuple[Any, str | None]:
    """Any password: 1 to 1024 characters, no control characters."""
    if not isinstance(value, str) or not value:
        return None, "must not be empty"
    if undecoded(value):
        return None, UNDECODED_RULE
    if len(value) > 1024 or _has_control(value):
        return None, "must be at most 1024 characters, without control characters"
    return value, None


def sniff_avatar(data: bytes) -> str | None:
    """The avatar's MIME type judged by its content, or None if it is no PNG, JPEG, GIF or SVG."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith((b"<?xml", b"<svg", b"<!--", b"<!DOCTYPE svg")) and re.search(
        rb"<svg[\s>]", head
    ):
        return "image/svg+xml"
    return None


def check_avatar(value: Any) -> tuple[Any, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, bytes):
        return None, "must be image data"
    if len(value) > AVATAR_MAX_BYTES:
        return None, "must be at most 8 MB"
    if sniff_avatar(value) is None:
        return None, "must be a PNG, JPG, GIF or SVG image (checked by content)"
    return value, None


def check_attributes(value: Any) -> tuple[Any, str | None]:
    """Custom attributes: keys of letters, digits, space, ``_ . -``; single-line values."""
    if not isinstance(value, Mapping):
        return None, "must be KEY=VALUE pairs"
    clean: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _ATTR_KEY.fullmatch(key) or key != key.strip():
            return None, (
                f"key {key!r} must be 1-64 letters, digits, spaces, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        text, rule = _text(255, required=False)(val)
        if rule:
            return None, f"value of {key!r} {rule}"
        clean[key] = text
    seen: dict[str, str] = {}
    for key in clean:
        # MariaDB/MySQL's collation makes the stored keys unique ignoring case; so they are
        # on every database, and two spellings of one key in one change say two things.
        if (other := seen.setdefault(key.lower(), key)) != key:
            return None, (
                f"keys {other!r} and {key!r} are one key (attribute keys are unique ignoring case)"
            )
    return clean, None


_CHECKS: dict[str, Checker] = {
    "role": _choice(ROLES),
    "profile": _text(64, required=False),
    "full_name": _text(128, required=True, forbidden=_NAME_FORBIDDEN),
    "username": _pattern(_USERNAME, "must be 1-40 characters, only letters, digits, '.' and '_'"),
    "email": check_email,
    "description": _text(1024, required=False),
    "extension": _pattern(_EXTENSION, "must be 1-20 digits"),
    "sip_secret": _pattern(_SIP_SECRET, "must be 8-128 printable ASCII characters without spaces"),
    "password": check_password_basic,
    "transport": _choice(TRANSPORTS),
    "nat": _choice(NATS),
    "codecs": check_codecs,
    "context": _pattern(
        _CONTEXT,
        "must be 1-40 letters, digits, '_', '.', '+' or '-' (an Asterisk context name), "
        "not starting with '.', '+' or '-'",
    ),
    "call_group": check_group,
    "pickup_group": check_group,
    "video": _choice(VIDEOS),
    "log_level": _optional_choice(LOG_LEVELS),
    "messenger_sound": check_flag,
    "toast_position": _choice(TOAST_POSITIONS),
    "avatar": check_avatar,
    "attributes": check_attributes,
}

#: Every field an admin may set when adding a user, in display order.
USER_FIELDS = tuple(_CHECKS)

#: Fields fixed at creation.
IMMUTABLE_FIELDS = ("role", "username")


def validate_fields(
    values: Mapping[str, Any], *, password_policy: bool = False, line: int | None = None
) -> dict[str, Any]:
    """Check every given field; return the clean values or raise one :class:`InvalidInput`
    listing every broken rule."""
    clean: dict[str, Any] = {}
    problems: list[Problem] = []
    for name, value in values.items():
        check = _CHECKS.get(name)
        if check is None:
            problems.append(Problem(name, "is not a user field", line))
            continue
        result, rule = check(value)
        if rule is None and name == "password" and password_policy:
            rule = check_password_policy(result)
        if rule is not None:
            problems.append(Problem(name, rule, line))
        else:
            clean[name] = result
    if problems:
        raise InvalidInput(problems)
    return clean


def check_profile_fields(name: Any, description: Any) -> tuple[str, str]:
    """Validate a profile's name and description, reporting both problems at once."""
    problems = []
    clean_name, rule = _pattern(
        _PROFILE_NAME,
        "must be 1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit",
    )(name)
    if rule or (isinstance(name, str) and name != name.strip()):
        problems.append(Problem("name", rule or "must not end with spaces"))
    clean_desc, rule = _text(1024, required=False)(description)
    if rule:
        problems.append(Problem("description", rule))
    if problems:
        raise InvalidInput(problems)
    return clean_name, clean_desc


@dataclass(frozen=True)
class Voice:
    """A user's Voice tab: what becomes the SIP endpoint."""

    transport: str = "udp"
    nat: str = "no"
    codecs: tuple[str, ...] = DEFAULT_CODECS
    context: str = DEFAULT_CONTEXT
    call_group: str = ""
    pickup_group: str = ""
    video: str = "no"


@dataclass(frozen=True)
class Profile:
    id: int
    name: str
    description: str


@dataclass(frozen=True)
class User:
    """A user as the store holds it, without the password hash or API key hash.

    ``sip_md5``/``sip_sha256`` are the digests of ``username:sip_realm:secret``;
    they are what Asterisk verifies, never the secret itself.
    """

    id: int
    role: str
    username: str
    full_name: str
    email: str
    extension: str
    voice: Voice
    profile: str | None = None
    description: str = ""
    sip_realm: str = "asterisk"
    sip_md5: str = field(default="", repr=False)
    sip_sha256: str = field(default="", repr=False)
    disabled: bool = False
    failed_logins: int = 0
    locked_at: datetime | None = None
    deleted_at: datetime | None = None
    log_level: str | None = None
    messenger_sound: bool = True
    toast_position: str = "top-right"
    avatar_type: str | None = None
    has_apikey: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_password_reset_at: datetime | None = None


def is_locked(locked_at: datetime | None, now: datetime, lock_minutes: int) -> bool:
    """A login lock holds until an admin unlocks or ``lock_minutes`` pass (0: admin only)."""
    if locked_at is None:
        return False
    if lock_minutes <= 0:
        return True
    return now < locked_at + timedelta(minutes=lock_minutes)


def lock_as_of(
    locked_at: datetime | None, failed_logins: int, now: datetime, lock_minutes: int
) -> tuple[datetime | None, int]:
    """A login lock and failed-login count as the next login sees them at ``now``: a lock
    that has timed out is gone, and its failed logins with it (the login starts the count
    afresh); anything else is as stored."""
    if locked_at is None or is_locked(locked_at, now, lock_minutes):
        return locked_at, failed_logins
    return None, 0


def as_of(user: User, now: datetime, lock_minutes: int) -> User:
    """``user`` as its next login sees it at ``now`` (:func:`lock_as_of`), so a view shows
    no lock time and no count beside an active state."""
    locked_at, failed = lock_as_of(user.locked_at, user.failed_logins, now, lock_minutes)
    if (locked_at, failed) == (user.locked_at, user.failed_logins):
        return user
    return replace(user, locked_at=locked_at, failed_logins=failed)


def account_state(user: User, now: datetime, lock_minutes: int) -> str:
    """``deleted``, ``disabled``, ``locked`` or ``active``, in that precedence."""
    if user.deleted_at is not None:
        return "deleted"
    if user.disabled:
        return "disabled"
    if is_locked(user.locked_at, now, lock_minutes):
        return "locked"
    return "active"


def merge_attributes(current: Mapping[str, str], changes: Mapping[str, str]) -> dict[str, str]:
    """``current`` attributes with ``changes`` applied: a value sets its key, an empty one
    removes it; keys ``changes`` does not name stay as they are.  Keys are one key ignoring
    case: a change sets (or removes) the key stored in any case, which keeps its spelling
    (so an export, one column per key, re-imports as is)."""
    merged = dict(current)
    for key, value in changes.items():
        stored = [k for k in merged if k.lower() == key.lower()]
        for name in stored:
            del merged[name]
        if value != "":
            merged[stored[0] if stored else key] = value
    return merged
