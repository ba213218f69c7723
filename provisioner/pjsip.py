"""The pure mapping from a user to its Asterisk PJSIP objects.

No database, file or socket: ``render_user(user, settings)`` returns the
endpoint, auth and AOR options as ordered ``(option, value)`` pairs that both
writers (config file and realtime rows) consume.  Every option is written
explicitly, so the outcome never depends on Asterisk's defaults.  The table is
documented in README.md ("The PJSIP mapping").

Every value is validated again here, whatever the store holds (another
application may have written it by hand): nothing can add a line, a section,
an option, a comment or an include to a config file, or a header to an AMI
action.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidInput, Problem
from .model import (
    CODECS,
    NATS,
    TRANSPORT_NAME,
    TRANSPORT_NAME_RULE,
    TRANSPORTS,
    UNDECODED_RULE,
    VIDEOS,
    User,
    Voice,
    check_group,
    undecoded,
)

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "NAT_OPTIONS",
    "Options",
    "RenderSettings",
    "Skipped",
    "UserObjects",
    "auth_id",
    "check_value",
    "endpoint_order",
    "render_all",
    "render_user",
    "renderable_username",
    "sample_objects",
]

Options = tuple[tuple[str, str], ...]

#: NAT setting -> (force_rport, rewrite_contact, rtp_symmetric, direct_media).
NAT_OPTIONS: Mapping[str, tuple[str, str, str, str]] = {
    "yes": ("yes", "yes", "yes", "no"),
    "force_rport": ("yes", "yes", "no", "no"),
    "comedia": ("no", "no", "yes", "no"),
    "route": ("no", "yes", "yes", "no"),
    "no": ("no", "no", "no", "yes"),
    "never": ("no", "no", "no", "yes"),
}

#: ps_endpoints.callerid is VARCHAR(40): longer names are shortened in the caller ID only.
CALLERID_MAX = 40
#: Asterisk copies the caller ID's name into an 80-byte buffer (res_pjsip's
#: ``caller_id_handler``, ``char cid_name[80]``): at most 79 bytes of UTF-8 survive, and a
#: longer name is cut in the middle of a character.
CALLERID_NAME_MAX_BYTES = 79
#: The longest value written (ps_auths.realm is VARCHAR(255)); far below the
#: 8191-byte line Asterisk's config loader skips, even at 4 bytes a character.
VALUE_MAX = 255
_ID = re.compile(r"[0-9]{1,20}")
_HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}
_USERNAME = re.compile(r"[A-Za-z0-9._]{1,40}")
_CONTEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,39}")
# Anything that could end a value, start a comment, an include, a section or
# an escape in Asterisk's config syntax, or a header in an AMI action; and ``^``, the
# escape Asterisk's realtime drivers (pgsql, mysql, odbc) decode in every value they
# read (``ast_realtime_decode_chunk``): a row holding ``^3C`` is read as ``<``.
_UNSAFE = set(';[]\\"<>#^')
_CONTROL_RULE = "must not contain control characters (newline, NUL, ...)"


@dataclass(frozen=True)
class RenderSettings:
    """The configuration the mapping depends on."""

    realm: str = "asterisk"
    auth_type: str = "userpass"
    transports: Mapping[str, str] | None = None
    max_contacts: int = 1
    webrtc_max_contacts: int = 5
    qualify_frequency: int = 60
    video_codecs: tuple[str, ...] = ("vp8", "h264")

    def transport_name(self, protocol: str) -> str:
        table = self.transports or {p: f"transport-{p}" for p in TRANSPORTS}
        return table[protocol]

    @classmethod
    def from_config(cls, config: Config) -> RenderSettings:
        t = config.target
        return cls(
            realm=config.sip.realm,
            auth_type=t.auth_type,
            transports=dict(t.transports),
            max_contacts=t.max_contacts,
            webrtc_max_contacts=t.webrtc_max_contacts,
            qualify_frequency=t.qualify_frequency,
            video_codecs=tuple(t.video_codecs),
        )


@dataclass(frozen=True)
class UserObjects:
    """One user's three PJSIP objects; ids are the config sections / realtime row ids."""

    username: str
    endpoint_id: str
    endpoint: Options
    auth_id: str
    auth: Options
    aor_id: str
    aor: Options

    def sections(self) -> tuple[tuple[str, str, Options], ...]:
        """``(section id, type, options)`` in file order: endpoint, auth, aor."""
        return (
            (self.endpoint_id, "endpoint", self.endpoint),
            (self.auth_id, "auth", self.auth),
            (self.aor_id, "aor", self.aor),
        )


@dataclass(frozen=True)
class Skipped:
    """A user that could not be rendered, and why (never a secret)."""

    username: str
    problems: tuple[Problem, ...]

    def __str__(self) -> str:
        return f"{self.username}: " + "; ".join(f"{p.field}: {p.rule}" for p in self.problems)


def renderable_username(username: str) -> bool:
    """Whether ``username`` may be an auth's ``username`` (what every rendered auth holds)."""
    return bool(_USERNAME.fullmatch(username))


def auth_id(extension: str) -> str:
    return f"{extension}-auth"


def check_value(field: str, value: str) -> Problem | None:
    """The last line of defence: a value that could restructure the output is refused, and
    one holding a byte that was not text where it was read (see :func:`undecoded`)."""
    if value.isascii():
        # Nearly every value: it holds no escape of a byte, and its control characters
        # (category Cc, the only C ones in ASCII) are what isprintable refuses, in C.
        if not value.isprintable():
            return Problem(field, _CONTROL_RULE)
    elif undecoded(value):
        return Problem(field, UNDECODED_RULE)
    elif any(unicodedata.category(ch).startswith("C") for ch in value):
        return Problem(field, _CONTROL_RULE)
    if set(value) & _UNSAFE:
        return Problem(field, "must not contain any of " + " ".join(sorted(_UNSAFE)))
    if value != value.strip():
        return Problem(field, "must not start or end with spaces")
    return None


def _callerid(full_name: str, extension: str) -> str:
    """``"Name" <extension>``, the name shortened to fit both the column (characters) and
    Asterisk's name buffer (bytes), cut between characters."""
    room = CALLERID_MAX - len(extension) - len('"" <>')
    name = full_name[: max(room, 0)]
    while len(name.encode()) > CALLERID_NAME_MAX_BYTES:
        name = name[:-1]
    return f'"{name.rstrip()}" <{extension}>'


def _checks(user: User, settings: RenderSettings) -> list[Problem]:
    v = user.voice
    problems: list[Problem] = []

    def need(ok: bool, field: str, rule: str, value: str = "") -> None:
        if undecoded(value):
            # Another writer's bytes that are not UTF-8: said so, as for every field, not
            # as a value of the wrong form (which the escape would make it look like).
            problems.append(Problem(field, UNDECODED_RULE))
        elif not ok:
            problems.append(Problem(field, rule))

    need(bool(_ID.fullmatch(user.extension)), "extension", "must be 1-20 digits", user.extension)
    need(
        renderable_username(user.username),
        "username",
        "must be 1-40 letters, digits, '.' or '_'",
        user.username,
    )
    for name, allowed in (("transport", TRANSPORTS), ("nat", NATS), ("video", VIDEOS)):
        value = getattr(v, name)
        need(value in allowed, name, "must be one of " + ", ".join(allowed), value)
    need(
        bool(v.codecs)
        and all(c in CODECS for c in v.codecs)
        and len(set(v.codecs)) == len(v.codecs),
        "codecs",
        "must be a non-empty list of distinct codecs from " + ", ".join(CODECS),
    )
    need(
        bool(_CONTEXT.fullmatch(v.context)),
        "context",
        "must be an Asterisk context name of 1-40 characters",
        v.context,
    )
    for name in ("call_group", "pickup_group"):
        group = getattr(v, name)
        need(check_group(group)[1] is None, name, "must be numbers 0-63, such as 1,3-5", group)
    if not user.full_name.strip():
        problems.append(Problem("full_name", "must not be empty"))
    elif (p := check_value("full_name", user.full_name)) is not None:
        problems.append(p)
    need(
        user.sip_realm == settings.realm,
        "sip_secret",
        f"was hashed for realm {user.sip_realm!r} but the configured realm is "
        f"{settings.realm!r}; rotate the SIP secret",
    )
    need(
        bool(_HEX["md5"].fullmatch(user.sip_md5)),
        "sip_secret",
        "has no valid MD5 digest; rotate it",
    )
    need(
        bool(_HEX["sha256"].fullmatch(user.sip_sha256)),
        "sip_secret",
        "has no valid SHA-256 digest; rotate it",
    )
    if v.transport in TRANSPORTS:
        need(
            bool(TRANSPORT_NAME.fullmatch(settings.transport_name(v.transport))),
            "transport",
            f"the configured transport name must be {TRANSPORT_NAME_RULE}",
        )
    return problems


def _auth_options(user: User, settings: RenderSettings) -> Options:
    if settings.auth_type == "md5":
        return (
            ("auth_type", "md5"),
            ("username", user.username),
            ("realm", settings.realm),
            ("md5_cred", user.sip_md5),
        )
    return (
        ("auth_type", "userpass"),
        ("username", user.username),
        ("realm", settings.realm),
        ("password_digest", f"SHA-256:{user.sip_sha256},MD5:{user.sip_md5}"),
        ("supported_algorithms_uas", "SHA-256,MD5"),
        ("supported_algorithms_uac", "SHA-256,MD5"),
    )


def render_user(user: User, settings: RenderSettings) -> UserObjects:
    """Map one user to its endpoint, auth and AOR, or raise :class:`InvalidInput`
    naming every field that cannot be rendered safely."""
    problems = _checks(user, settings)
    if problems:
        raise InvalidInput(problems)
    v = user.voice
    ext = user.extension
    webrtc = v.transport in ("ws", "wss")
    codecs = list(v.codecs)
    if v.video != "no":
        codecs += [c for c in settings.video_codecs if c not in codecs]
    force_rport, rewrite_contact, rtp_symmetric, direct_media = NAT_OPTIONS[v.nat]
    if webrtc:
        # A browser's media (DTLS-SRTP, ICE) ends at Asterisk: it can never go direct.
        direct_media = "no"
    endpoint: Options = (
        ("transport", settings.transport_name(v.transport)),
        ("aors", ext),
        ("auth", auth_id(ext)),
        ("context", v.context),
        ("disallow", "all"),
        ("allow", ",".join(codecs)),
        ("callerid", _callerid(user.full_name, ext)),
        ("call_group", v.call_group),
        ("pickup_group", v.pickup_group),
        ("direct_media", direct_media),
        ("force_rport", force_rport),
        ("rewrite_contact", rewrite_contact),
        ("rtp_symmetric", rtp_symmetric),
        ("webrtc", "yes" if webrtc else "no"),
    )
    aor: Options = (
        ("max_contacts", str(settings.webrtc_max_contacts if webrtc else settings.max_contacts)),
        ("remove_existing", "yes"),
        ("qualify_frequency", str(settings.qualify_frequency)),
    )
    rendered = UserObjects(
        username=user.username,
        endpoint_id=ext,
        endpoint=endpoint,
        auth_id=auth_id(ext),
        auth=_auth_options(user, settings),
        aor_id=ext,
        aor=aor,
    )
    _final_check(rendered)
    return rendered


def _plain_output(objects: UserObjects) -> bool:
    """True when :func:`_final_check` finds nothing, told in C for all of a user's ids and
    values at once: their text ASCII, printable (no control character, see
    :func:`check_value`) and free of unsafe characters, each one without a blank at
    either end, and no value longer than :data:`VALUE_MAX`."""
    options = (*objects.endpoint, *objects.auth, *objects.aor)
    values = [value for _option, value in options]
    # The callerid quotes and angle brackets are ours, around a checked name.
    checked = [
        value[1 : value.rfind('"')] if option == "callerid" else value for option, value in options
    ]
    every = [objects.endpoint_id, objects.auth_id, objects.aor_id, *checked]
    text = "".join(every)
    return (
        text.isascii()
        and text.isprintable()
        and _UNSAFE.isdisjoint(text)
        and list(map(str.strip, every)) == every
        and max(map(len, values), default=0) <= VALUE_MAX
    )


def _final_check(objects: UserObjects) -> None:
    """Belt and braces: every id and value of the output is checked once more (all at
    once when they are plain, see :func:`_plain_output`; one by one otherwise, to name
    each problem)."""
    if _plain_output(objects):
        return
    problems = []
    for section, _kind, options in objects.sections():
        if (p := check_value("extension", section)) is not None:
            problems.append(p)
        for option, value in options:
            # The callerid quotes and angle brackets are ours, around a checked name.
            checked = value[1 : value.rfind('"')] if option == "callerid" else value
            if (p := check_value(option, checked)) is not None:
                problems.append(p)
            elif len(value) > VALUE_MAX:
                # Asterisk skips a config line of 8191+ bytes whole, dropping the object.
                problems.append(Problem(option, f"must be at most {VALUE_MAX} characters"))
    if problems:
        raise InvalidInput(problems)


def is_provisioned(user: User) -> bool:
    """Disabled and deleted users have no PJSIP objects; a login lock keeps the phone working."""
    return not user.disabled and user.deleted_at is None


def sample_objects(settings: RenderSettings) -> list[UserObjects]:
    """Two users rendered with ``settings``, for checks that must see what a real user's
    objects hold without reading the store: a plain one first, then a WebRTC one with
    video, so every option a user may have is there.  Their digests are zeros: nothing
    secret."""
    samples = [
        ("1000", "sample.one", "Sample One", Voice()),
        ("1001", "sample_two", "Sample Two", Voice(transport="wss", video="yes")),
    ]
    return [
        render_user(
            User(
                id=0,
                role="user",
                username=username,
                full_name=full_name,
                email=f"{username}@example.com",
                extension=extension,
                voice=voice,
                sip_realm=settings.realm,
                sip_md5="0" * 32,
                sip_sha256="0" * 64,
            ),
            settings,
        )
        for extension, username, full_name, voice in samples
    ]


def render_all(
    users: Iterable[User], settings: RenderSettings
) -> tuple[list[UserObjects], list[Skipped]]:
    """Render every provisioned user, in extension order; report (not raise) the ones that fail.

    Two users claiming one extension (possible only when another writer bypassed
    the store's constraint) are both skipped rather than one silently winning.
    """
    good: dict[str, UserObjects] = {}
    skipped: list[Skipped] = []
    clashes: set[str] = set()
    for user in users:
        if not is_provisioned(user):
            continue
        try:
            objects = render_user(user, settings)
        except InvalidInput as exc:
            skipped.append(Skipped(user.username, exc.problems))
            continue
        if objects.endpoint_id in good or objects.endpoint_id in clashes:
            clashes.add(objects.endpoint_id)
            other = good.pop(objects.endpoint_id, None)
            rule = f"extension {objects.endpoint_id} is claimed by more than one user"
            for name in filter(None, (other.username if other else None, objects.username)):
                skipped.append(Skipped(name, (Problem("extension", rule),)))
            continue
        good[objects.endpoint_id] = objects
    ordered = sorted(good.values(), key=lambda o: endpoint_order(o.endpoint_id))
    return ordered, skipped


def endpoint_order(endpoint_id: str) -> tuple[int, str]:
    """The sort key of :func:`render_all`'s order: by length, then as text (so numeric
    extensions of any length come out in numeric order)."""
    return (len(endpoint_id), endpoint_id)
