"""Users from a hand-written ``pjsip.conf`` or ``pjsip_wizard.conf``:
``provisioner import pjsip FILE``.

Two halves:

* :func:`plan_import` is pure: from a parsed file (:func:`provisioner.asterisk_conf.parse`,
  which resolves templates and inheritance), read as the file Asterisk reads it as
  (:func:`file_kind`), it maps every user endpoint (in pjsip.conf an ``endpoint`` with
  its ``auth`` and ``aor`` sections, in pjsip_wizard.conf a ``type=wizard`` section that
  accepts registrations and auth) to user field values, and lists every section it
  could not map with the reason.  Per user it also keeps notes
  on what changes in the move (dropped codecs, ignored options, an inexact NAT
  combination).
* :func:`apply_plan` creates the mapped users through :class:`~provisioner.accounts.Accounts`
  in one transaction: every user is checked against the rules and the store,
  and if any one fails nothing is created (like the CSV import).  A dry run
  checks everything the same way and rolls back.

Secrets: an auth's plaintext ``password`` becomes the user's SIP secret (hashed
for our realm; never printed).  Digests cannot be turned back into a secret: a
``password_digest`` holding both SHA-256 and MD5 made for our realm (and, by
construction, the username) is carried over as it is; anything else (an MD5-only
``md5_cred`` or digest, another realm) "needs a new SIP secret".  So does a
password that breaks our SIP secret rule.  Such users are reported as not
mapped, or with ``generate_secrets`` imported with a generated secret shown
once (their phones must be given it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from . import credentials
from .accounts import Accounts, rerun_on_unique_clash
from .asterisk_conf import Parsed, Section, parse
from .errors import (
    AsteriskSyntaxError,
    ConflictError,
    InvalidInput,
    Problem,
    ProvisionerError,
)
from .model import CODECS, NATS, TRANSPORTS, check_email, check_group, validate_fields
from .pjsip import NAT_OPTIONS, RenderSettings
from .store import queries as q
from .targets.asterisk_schema import ENUM_LABELS, ps_aors, ps_auths, ps_endpoints

__all__ = [
    "PJSIP_CONF",
    "WIZARD_CONF",
    "FileKind",
    "ImportPlan",
    "ImportResult",
    "MappedUser",
    "Unmapped",
    "apply_plan",
    "file_kind",
    "plan_import",
    "read_file",
    "report_lines",
]

#: The two files Asterisk reads PJSIP user objects from: res_pjsip reads endpoints, auths,
#: AORs and the rest from pjsip.conf (and the files it #includes), never a wizard;
#: res_pjsip_config_wizard reads only ``type=wizard`` sections, only from pjsip_wizard.conf
#: (a name built into it).
PJSIP_CONF: Literal["pjsip.conf"] = "pjsip.conf"
WIZARD_CONF: Literal["pjsip_wizard.conf"] = "pjsip_wizard.conf"
FileKind = Literal["pjsip.conf", "pjsip_wizard.conf"]
#: Video codecs Asterisk knows; any of them in ``allow`` means video ``yes``.
VIDEO_CODECS = ("vp8", "vp9", "h264", "h265", "h263", "h263p", "h261", "mpeg4")
#: Asterisk's defaults for the NAT-related endpoint options (as in NAT_OPTIONS order).
_NAT_KEYS = ("force_rport", "rewrite_contact", "rtp_symmetric", "direct_media")
_NAT_DEFAULTS = ("yes", "no", "no", "yes")
#: Asterisk's default endpoint context.
_DEFAULT_CONTEXT = "default"
#: Runs of :func:`apply_plan` at most while concurrent writers keep taking its keys.
_APPLY_ATTEMPTS = 5
_DEFAULT_REALM = "asterisk"
#: A valid domain to check that a username can be an email address's local part
#: (``--email-domain`` itself is checked at apply time).
_EMAIL_PROBE_DOMAIN = "example.com"
#: Section types that are never a user, and why.
_NOT_USERS: Mapping[str, str] = {
    "transport": "stays in Asterisk's own configuration",
    "registration": "an outbound registration (a trunk)",
    "identify": "matches an endpoint by address",
    "global": "global settings",
    "system": "system settings",
    "acl": "an ACL",
    "domain_alias": "a domain alias",
    "contact": "a static contact",
    "outbound-publish": "an outbound publication",
    "inbound-publication": "an inbound publication",
    "resource_list": "a resource list",
    "phoneprov": "phone provisioning",
}
#: Options we render ourselves or read; any other is reported as ignored.
_ENDPOINT_READ = frozenset(
    {"type", "transport", "aors", "auth", "context", "disallow", "allow", "callerid"}
    | {"call_group", "pickup_group", "webrtc", *_NAT_KEYS}
)
_AUTH_READ = frozenset(
    {"type", "auth_type", "username", "password", "md5_cred", "password_digest", "realm"}
    | {"supported_algorithms_uas", "supported_algorithms_uac"}
)
_AOR_READ = frozenset({"type", "max_contacts", "remove_existing", "qualify_frequency"})
#: Asterisk's values for the AOR options provisioner renders, where the source sets none.
_AOR_DEFAULTS: Mapping[str, str] = {
    "max_contacts": "0",
    "remove_existing": "no",
    "qualify_frequency": "0",
}
_WIZARD_READ = frozenset(
    {"type", "transport", "accepts_auth", "accepts_registrations", "sends_auth"}
    | {"sends_registrations", "remote_hosts"}
)
_HEX = {"md5": re.compile(r"[0-9a-fA-F]{32}"), "sha-256": re.compile(r"[0-9a-fA-F]{64}")}
#: The options Asterisk 22 knows per object type: its realtime columns (one per option, as
#: its alembic schema has them), ``type`` and not ``id``.  An object with any other option
#: is not loaded at all ("Could not find option suitable for category ... named ...").
_KNOWN_OPTIONS: Mapping[str, frozenset[str]] = {
    kind: frozenset(column.name for column in table.columns if column.name != "id") | {"type"}
    for kind, table in (("endpoint", ps_endpoints), ("auth", ps_auths), ("aor", ps_aors))
}
#: The values Asterisk parses as ``dtmf_mode`` (case ignored); any other drops the endpoint
#: ("Error parsing dtmf_mode=...").
_DTMF_MODES = ENUM_LABELS["pjsip_dtmf_mode_values_v3"]


@dataclass(frozen=True)
class Unmapped:
    """A section that was not turned into a user, and why (never a secret)."""

    section: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"[{self.section}] {self.reason}"


@dataclass(frozen=True)
class MappedUser:
    """One user endpoint as user field values (role, profile and email come at apply time).

    ``sip_secret`` is the plaintext carried over; ``digests`` (md5, sha256) are
    carried over instead when only digests for our realm exist; with neither,
    a secret is generated.
    """

    section: str
    line: int
    values: Mapping[str, str]
    notes: tuple[str, ...] = ()
    sip_secret: str | None = field(default=None, repr=False)
    digests: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def username(self) -> str:
        return self.values["username"]

    @property
    def extension(self) -> str:
        return self.values["extension"]


@dataclass(frozen=True)
class ImportPlan:
    """What :func:`plan_import` found: users to create, sections left out, parser notices."""

    users: tuple[MappedUser, ...]
    unmapped: tuple[Unmapped, ...]
    notices: tuple[str, ...] = ()


@dataclass
class ImportResult:
    """What :func:`apply_plan` did (or, with ``dry_run``, would do)."""

    added: list[MappedUser] = field(default_factory=list)
    #: SIP secrets generated for users whose secret could not be carried over: shown once.
    generated_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    dry_run: bool = False


class _Refuse(Exception):
    """A user endpoint that cannot be mapped; the message is the reason."""


class _DryRun(Exception):
    """Raised inside the import transaction to roll a valid dry run back."""


# -- reading ----------------------------------------------------------------------------


def read_file(path: str | Path) -> Parsed:
    """Read and parse ``path``; an unreadable or unloadable file is an :class:`InvalidInput`
    naming ``FILE``.  Files with ``#include``/``#tryinclude``/``#exec`` are refused: the
    users and templates they pull in would be missing, so nothing is imported."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput.one(
            "FILE", f"cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    try:
        parsed = parse(data)
    except AsteriskSyntaxError as exc:
        raise InvalidInput(
            [Problem("FILE", f"Asterisk would refuse the whole file: {exc.rule}", exc.line)]
        ) from None
    directives = [d for d in parsed.directives if d.known]
    if directives:
        raise InvalidInput(
            [
                Problem(
                    "FILE",
                    f"#{_shown(d.name)} {_shown(d.argument or '')} is not followed; merge that "
                    "content into this file (or import it separately) first",
                    d.line,
                )
                for d in directives
            ]
        )
    return parsed


def file_kind(path: str | Path) -> FileKind:
    """Which file Asterisk reads ``path`` as, by its name: ``pjsip_wizard.conf`` is the
    wizard's; any other name is pjsip.conf or a file it includes."""
    return WIZARD_CONF if Path(path).name == WIZARD_CONF else PJSIP_CONF


# -- the pure mapping ----------------------------------------------------------------------


def _options(section: Section) -> dict[str, str]:
    """Options by lower-cased name; the last setting wins, as when Asterisk applies them."""
    return {name.lower(): value for name, value in section.options}


def _is_true(value: str | None) -> bool:
    """Asterisk's ``ast_true``."""
    return (value or "").strip().lower() in ("yes", "true", "y", "t", "1", "on")


@dataclass
class _Index:
    """The file's sections by (type, name) as Asterisk loads them: of a wizard defined more
    than once, one holding each object's options from the copy Asterisk keeps it from
    (:func:`_merge_wizard`); a section of another type defined more than once is in
    ``duplicates`` (with its lines) instead, as Asterisk loads neither copy."""

    parsed: Parsed
    #: ``[global] default_realm`` as given; "": the file's (or Asterisk's default); None:
    #: unknown (a wizard file's, see :meth:`realm`).
    default_realm: str | None = ""
    by_key: dict[tuple[str, str], Section] = field(default_factory=dict)
    used: set[tuple[str, str]] = field(default_factory=set)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)
    duplicates: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    #: A note per wizard defined more than once whose objects come from several copies.
    merged: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> Section | None:
        return self.by_key.get((kind, name))

    def find(self, kind: str, name: str) -> Section:
        """The ``kind`` section ``name`` a user endpoint refers to, or :class:`_Refuse`."""
        lines = self.duplicates.get((kind, name))
        if lines is not None:
            raise _Refuse(f"its {kind} [{name}] is {_twice(kind, lines)}")
        section = self.get(kind, name)
        if section is None:
            raise _Refuse(f"its {kind} [{name}] is not defined in this file")
        return section

    def realm(self) -> str | None:
        """The realm Asterisk challenges with for an auth that sets none: ``[global]
        default_realm`` (as given, else the file's, else Asterisk's ``asterisk``).  None
        for a wizard file not given it: its ``[global]`` lives in pjsip.conf."""
        if self.default_realm != "":
            return self.default_realm
        return self.global_options.get("default_realm") or _DEFAULT_REALM

    @cached_property
    def global_options(self) -> dict[str, str]:
        """The options of the file's ``[global]``, found once (asked per user: a scan of
        every section each time made an import of N users take N² steps)."""
        for (kind, _name), section in self.by_key.items():
            if kind == "global":
                return _options(section)
        return {}

    @cached_property
    def transports(self) -> dict[str, list[str]]:
        """The names of the file's transport sections by protocol, in file order."""
        by_protocol: dict[str, list[str]] = {}
        for (kind, name), section in self.by_key.items():
            if kind == "transport":
                protocol = _options(section).get("protocol", "udp").lower()
                by_protocol.setdefault(protocol, []).append(name)
        return by_protocol


def _type(section: Section) -> str:
    """The object type Asterisk loads ``section`` as: its first ``type=`` (a template's,
    when it inherits one), compared exactly (res_sorcery_config matches the criteria
    ``type=endpoint`` with ``strcmp``, so ``type=Endpoint`` is no endpoint)."""
    return next((value for name, value in section.options if name.lower() == "type"), "")


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass
class _Source:
    """One user endpoint's options, whether from endpoint/auth/aor sections or a wizard."""

    section: Section
    endpoint: dict[str, str]
    codec_ops: list[tuple[str, str]]
    auth: dict[str, str]
    auth_name: str
    aor_names: list[str]
    aors: list[dict[str, str]]
    notes: list[str] = field(default_factory=list)


def _ignored(kind: str, options: Iterable[str], read: frozenset[str]) -> str | None:
    extra = sorted(set(options) - read)
    return f"ignored {kind} options: {', '.join(extra)}" if extra else None


def _endpoint_source(section: Section, index: _Index) -> _Source:
    opts = _options(section)
    if opts.get("outbound_auth"):
        raise _Refuse("sends auth (outbound_auth=): a trunk, not a user")
    auths = _split(opts.get("auth", ""))
    if not auths:
        raise _Refuse("has no inbound auth (auth=): not a registering user")
    if len(auths) > 1:
        raise _Refuse("has more than one auth; a user has exactly one")
    auth_section = index.find("auth", auths[0])
    aor_names = _split(opts.get("aors", ""))
    if not aor_names:
        raise _Refuse("has no aors=: a phone could not register")
    aors = [_options(index.find("aor", name)) for name in aor_names]
    source = _Source(
        section=section,
        endpoint=opts,
        codec_ops=[
            (n.lower(), v) for n, v in section.options if n.lower() in ("allow", "disallow")
        ],
        auth=_options(auth_section),
        auth_name=auths[0],
        aor_names=aor_names,
        aors=aors,
    )
    if aor_names != [section.name]:
        # Asterisk finds the AOR of a REGISTER by the To URI's user: it must be our AOR's name.
        source.notes.append(
            f"aors {','.join(aor_names)} become the one AOR [{section.name}]: "
            f"phones register to {section.name}"
        )
    _check_loadable("endpoint", opts, "")
    _check_loadable("auth", source.auth, f"its auth [{auths[0]}] ")
    for name, aor in zip(aor_names, aors, strict=True):
        _check_loadable("aor", aor, f"its aor [{name}] ")
    for note in (
        _ignored("endpoint", opts, _ENDPOINT_READ),
        _ignored("auth", source.auth, _AUTH_READ),
        *(_ignored("aor", aor, _AOR_READ | {"contact"}) for aor in aors),
    ):
        if note:
            source.notes.append(note)
    _check_static_contacts(source.aors)
    return source


#: What a user lacks when Asterisk drops one of its objects, by object type.
_LOST = {
    "endpoint": "",
    "auth": " (no phone could authenticate)",
    "aor": " (no phone could register)",
}


def _check_loadable(kind: str, options: Mapping[str, str], whose: str, prefix: str = "") -> None:
    """:class:`_Refuse` when Asterisk would not load this ``kind`` object at all: it has an
    option Asterisk does not know, or (an endpoint) a ``dtmf_mode`` it cannot parse.
    ``whose`` starts the reason (``its auth [a1] ``); ``prefix`` is how a wizard spells
    the options (``endpoint/``)."""
    # "@name" is a sorcery extended field, which any object takes.
    unknown = sorted(n for n in set(options) - _KNOWN_OPTIONS[kind] if not n.startswith("@"))
    if unknown:
        shown = ", ".join(prefix + name for name in unknown)
        plural = "options" if len(unknown) > 1 else "an option"
        raise _Refuse(
            f"{whose}has {shown}, {plural} Asterisk does not know, so it loads no such "
            f"{kind}{_LOST[kind]}"
        )
    dtmf = options.get("dtmf_mode")
    if kind == "endpoint" and dtmf is not None and dtmf.lower() not in _DTMF_MODES:
        raise _Refuse(
            f"{whose}{prefix}dtmf_mode {dtmf!r} is none of {', '.join(_DTMF_MODES)}: "
            f"Asterisk loads no such endpoint"
        )
    why = _auth_unparsed(options) if kind == "auth" else None
    if why is not None:
        raise _Refuse(f"{whose}{prefix}{why}: Asterisk loads no such auth{_LOST[kind]}")
    for option, high in _AOR_NUMBERS.items() if kind == "aor" else ():
        value = options.get(option)
        number = None if value is None else _c_uint(value)
        if value is not None and (number is None or number > high):
            raise _Refuse(
                f"{whose}{prefix}{option} {value!r} is no number 0-{high}: "
                f"Asterisk loads no such aor{_LOST[kind]}"
            )


#: The digest algorithms Asterisk 22 takes (pjproject's IANA names, case ignored), with
#: the length of a digest's hex text.
_DIGEST_LENGTHS = {"md5": 32, "sha-256": 64, "sha-512-256": 64}


def _auth_unparsed(options: Mapping[str, str]) -> str | None:
    """What of an auth Asterisk cannot parse, so it loads no such auth, or None (never
    quoting a digest): a ``md5_cred`` or ``password_digest`` item (``ALGORITHM:digest``, or
    a bare MD5 one) naming an algorithm it does not know or whose digest is not that
    algorithm's length (``password_digest_handler``), or a ``supported_algorithms_uas`` or
    ``_uac`` item naming one."""
    for option in ("md5_cred", "password_digest"):
        for item in _split(options.get(option, "")):
            name, colon, digest = item.partition(":")
            if not colon:
                name, digest = "MD5", item
            name = name.strip(_C_BLANKS)
            length = _DIGEST_LENGTHS.get(name.lower())
            if length is None:
                return f"{option} names {name!r}, no digest algorithm Asterisk knows"
            if len(digest.strip(_C_BLANKS)) != length:
                return f"{option} holds no {name.upper()} digest ({length} characters)"
    for option in ("supported_algorithms_uas", "supported_algorithms_uac"):
        for name in _split(options.get(option, "")):
            if name.lower() not in _DIGEST_LENGTHS:
                return f"{option} names {name!r}, no digest algorithm Asterisk knows"
    return None


#: The AOR numbers we read, with the largest value Asterisk takes (``OPT_UINT_T``).
_AOR_NUMBERS = {"max_contacts": 2**32 - 1, "qualify_frequency": 86400}
#: What ``strtoul(text, &end, 0)`` reads whole: hexadecimal, octal or decimal.
_C_UINT = re.compile(r"[ \t\n\v\f\r]*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _c_uint(text: str) -> int | None:
    """``text`` as Asterisk's ``ast_parse_arg(PARSE_UINT32)`` reads it (``strtoul`` base 0,
    every character used, no minus sign), or None when it refuses it."""
    m = _C_UINT.fullmatch(text)
    if m is None:
        return None
    digits = m.group(1)
    if digits[:2].lower() == "0x":
        return int(digits[2:], 16)
    return int(digits, 8) if digits.startswith("0") else int(digits)


def _check_static_contacts(aors: Iterable[Mapping[str, str]]) -> None:
    if any(aor.get("contact") for aor in aors):
        raise _Refuse("its aor has a static contact (contact=): a trunk or a fixed device")


def _wizard_source(section: Section) -> _Source:
    opts = _options(section)
    if _is_true(opts.get("sends_auth")) or _is_true(opts.get("sends_registrations")):
        raise _Refuse("sends auth or registrations: a trunk, not a user")
    if opts.get("remote_hosts"):
        raise _Refuse("has remote_hosts: a trunk or a fixed device")
    if not _is_true(opts.get("accepts_auth")):
        raise _Refuse("does not accept auth (accepts_auth=yes): not a registering user")
    if not _is_true(opts.get("accepts_registrations")):
        raise _Refuse("does not accept registrations (accepts_registrations=yes)")
    parts, codec_ops, other = _wizard_parts(section)
    endpoint = parts["endpoint"]
    auth = parts["inbound_auth"]
    if "username" not in auth:
        # handle_auth logs "must have 'inbound_auth/username'" and creates no auth.
        raise _Refuse("has no inbound_auth/username: Asterisk's wizard creates no auth for it")
    if not auth["username"]:
        raise _Refuse("its inbound_auth/username is empty: a phone could not authenticate")
    # The wizard creates its objects from these options: one it cannot apply is not created.
    _check_loadable("endpoint", endpoint, "", "endpoint/")
    _check_loadable("auth", auth, "its ", "inbound_auth/")
    _check_loadable("aor", parts["aor"], "its ", "aor/")
    source = _Source(section, endpoint, codec_ops, auth, "", [], [parts["aor"]])
    for note in (
        _ignored("wizard", other, frozenset()),
        _ignored("endpoint", endpoint, _ENDPOINT_READ),
        _ignored("inbound_auth", auth, _AUTH_READ),
        _ignored("aor", parts["aor"], _AOR_READ | {"contact"}),
    ):
        if note:
            source.notes.append(note)
    _check_static_contacts(source.aors)
    return source


#: The object prefixes of a wizard's options that provisioner reads.
_WIZARD_PARTS = ("endpoint", "inbound_auth", "outbound_auth", "aor")


def _wizard_parts(
    section: Section,
) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]], list[str]]:
    """``(options by object prefix, the endpoint's codec operations, other options)`` of a
    wizard, as its objects get them; the endpoint's include the wizard's ``transport``."""
    parts: dict[str, dict[str, str]] = {prefix: {} for prefix in _WIZARD_PARTS}
    codec_ops = []
    other: list[str] = []
    for name, value in section.options:
        # The wizard finds its own options case-insensitively but takes object options by
        # their exact prefix (ast_begins_with): Endpoint/context is none of them.
        prefix, slash, option = name.partition("/")
        if not slash:
            if prefix.lower() not in _WIZARD_READ:
                other.append(prefix.lower())
            continue
        if prefix not in parts or not option:
            other.append(name)
            continue
        option = option.lower()
        parts[prefix][option] = value
        if prefix == "outbound_auth":
            other.append(name)  # read only to know whether Asterisk creates it
        if prefix == "endpoint" and option in ("allow", "disallow"):
            codec_ops.append((option, value))
    # Asterisk's wizard appends its own transport= (the last one it has) after the endpoint/
    # options, so it overrides endpoint/transport (res_pjsip_config_wizard.c, handle_endpoint).
    transport = _options(section).get("transport", "")
    if transport:
        parts["endpoint"]["transport"] = transport
    return parts, codec_ops, other


def _wizard_makes(section: Section) -> dict[str, bool | None]:
    """What one copy of a wizard does to each of its user objects when Asterisk applies it
    (res_pjsip_config_wizard.c, per object type): True, the copy's object replaces any
    earlier one; False, it cannot be created (logged) and an earlier one stands; None, the
    copy deletes it (an inbound auth without ``accepts_auth``)."""
    opts = _options(section)
    parts, codec_ops, _ = _wizard_parts(section)

    def creates(kind: str, options: Mapping[str, str], ops: Iterable[tuple[str, str]]) -> bool:
        try:
            _check_loadable(kind, options, "")
            for op, value in ops:
                _check_codec_list(op, value)
        except _Refuse:
            return False
        return True

    auth: bool | None
    outbound = parts["outbound_auth"]
    if _is_true(opts.get("sends_auth")) and not (
        "username" in outbound and creates("auth", outbound, ())
    ):
        auth = False  # handle_auths gives up before the inbound auth
    elif not _is_true(opts.get("accepts_auth")):
        auth = None
    else:
        inbound = parts["inbound_auth"]
        auth = "username" in inbound and creates("auth", inbound, ())
    return {
        "endpoint": creates("endpoint", parts["endpoint"], codec_ops),
        "aor": creates("aor", parts["aor"], ()),
        "auth": auth,
    }


def _merge_wizard(copies: list[Section]) -> tuple[Section, str | None, list[Unmapped]]:
    """A wizard defined more than once, as Asterisk holds it: its wizard applies every copy
    in turn, per object type, so each object (endpoint, aor, inbound auth) is the one of
    the last copy it could create it from.  Returns the section to read (the endpoint's
    copy, with the aor/ and inbound_auth/ options of the copies those come from), a note
    when they come from several copies, and a reason for every other copy.  With no
    endpoint or aor created from any copy, the last copy is read (its refusal says why)."""
    standing: dict[str, int | None] = {"endpoint": None, "aor": None, "auth": None}
    for number, copy in enumerate(copies):
        for kind, made in _wizard_makes(copy).items():
            if made is not False:
                standing[kind] = number if made else None
    last = len(copies) - 1
    endpoint_copy = standing["endpoint"]
    if endpoint_copy is None or standing["aor"] is None:
        endpoint_copy = last
        standing = {kind: last for kind in standing}
    first: int = endpoint_copy
    primary = copies[first]
    moved = {"aor": "aor/", "auth": "inbound_auth/"}
    options = [(n, v) for n, v in primary.options if not n.startswith(tuple(moved.values()))]
    for kind, prefix in moved.items():
        source = standing[kind]
        if source is not None:
            options += [(n, v) for n, v in copies[source].options if n.startswith(prefix)]
    merged = Section(primary.name, primary.line, options=tuple(options))
    reasons = []
    for number, copy in enumerate(copies):
        if number == first:
            continue
        kept = [kind for kind in ("aor", "auth") if standing[kind] == number]
        if kept:
            verb = "is" if len(kept) == 1 else "are"
            why = f"its {' and '.join(kept)} {verb} read with the wizard of line {primary.line}"
        else:
            why = f"replaced by the wizard of line {primary.line} (Asterisk applies each in turn)"
        reasons.append(Unmapped(copy.name, copy.line, f"wizard: {why}"))
    note = None
    if set(standing.values()) != {last}:
        by_copy: dict[int | None, list[str]] = {}
        for kind, source_copy in standing.items():
            by_copy.setdefault(source_copy, []).append(kind)
        said: list[str] = []
        for source_copy, kinds in by_copy.items():
            whose = "none" if source_copy is None else f"line {copies[source_copy].line}'s"
            verb = ("is " if len(kinds) == 1 else "are ") if not said else ""
            said.append(f"its {' and '.join(kinds)} {verb}{whose}")
        times = "twice" if len(copies) == 2 else f"{len(copies)} times"
        lines = ", ".join(str(copy.line) for copy in copies)
        note = (
            f"wizard defined {times} (lines {lines}): {', '.join(said)} (Asterisk applies "
            "each copy in turn; a copy it cannot create an object from leaves the earlier one)"
        )
    return merged, note, reasons


def _rule(name: str, value: str) -> str | None:
    """The model's rule ``value`` breaks as field ``name``, or None."""
    try:
        validate_fields({name: value})
    except InvalidInput as exc:
        return exc.problems[0].rule
    return None


def _full_name(source: _Source, username: str, extension: str) -> str:
    """The callerid's name (the username when it has none or our rules refuse it, noted);
    a callerid number other than the extension is noted."""
    name, number = _callerid_parts(source.endpoint.get("callerid", ""))
    if number and number != extension:
        source.notes.append(f"callerid number {number} becomes the extension {extension}")
    if not name:
        return username
    if (rule := _rule("full_name", name)) is not None:
        source.notes.append(f"callerid name {name!r} {rule}; the username is the full name")
        return username
    return name


def _callerid_parts(callerid: str) -> tuple[str, str]:
    """``(name, number)`` as Asterisk splits a callerid (``ast_callerid_split``): the number
    runs from the last ``<`` to the last ``>`` after it (or to the end), the name is what
    precedes it, without one pair of surrounding quotes and with ``\\`` escapes undone
    (and, here, without blanks around it); with no ``<``, a phone number is the number
    and anything else the name."""
    start = callerid.rfind("<")
    if start < 0:
        phone = _phone_number(callerid)
        return ("", phone) if phone is not None else (_unquoted(callerid), "")
    number = callerid[start + 1 :]
    if (end := number.rfind(">")) >= 0:
        number = number[:end]
    return _unquoted(callerid[:start]), _shrunk(number)


def _unquoted(text: str) -> str:
    """``ast_strip_quoted`` then ``ast_unescape_quoted``, stripped."""
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1]
    return re.sub(r"\\(.?)", r"\1", text).strip()


def _shrunk(text: str) -> str:
    """``ast_shrink_phone_number``: spaces, parentheses and dashes dropped, and dots but a
    last one."""
    return text[:-1].translate(str.maketrans("", "", "() -.")) + text[-1:].strip("() -")


def _phone_number(text: str) -> str | None:
    """``text`` as the number Asterisk reads from a callerid without ``<>``: shrunk
    (:func:`_shrunk`), then only digits, ``*``, ``#`` and ``+`` (``ast_isphonenumber``);
    else None."""
    kept = _shrunk(text)
    return kept if kept and all(ch in "0123456789*#+" for ch in kept) else None


def _codecs(source: _Source, settings: RenderSettings) -> tuple[str, str]:
    """``(codecs, video)``: our audio codecs in the source's order, video if any video codec.
    An endpoint allowing no codec at all (no ``allow``, or everything disallowed again) is
    :class:`_Refuse`: Asterisk's endpoint has none (it has no default), so its phones could
    make no call, and a user always has one; the migrating engineer chooses them."""
    for op, value in source.codec_ops:
        _check_codec_list(op, value)
    offered: list[str] = []
    for op, value in source.codec_ops:
        items = _codec_items(value)
        if value.startswith("(") and value.endswith(")"):
            # Asterisk's own list form: allow=(a|b) first drops every codec,
            # disallow=(a|b) first allows every one.
            items = ["!all", *_codec_items(value[1:-1])]
        for item in items:
            allow = op == "allow"
            if item.startswith("!"):
                allow, item = not allow, item[1:]
            name = item.split(":", 1)[0].strip().lower()
            if name == "all":
                if allow:
                    offered += [c for c in (*CODECS, *VIDEO_CODECS) if c not in offered]
                    source.notes.append("allow=all becomes our audio codecs and video")
                else:
                    offered = []
            elif allow and name not in offered:
                offered.append(name)
            elif not allow and name in offered:
                offered.remove(name)
    if not offered:
        raise _Refuse(
            "allows no codec: Asterisk gives it none, so its phones could make no call "
            "(add allow= to import it)"
        )
    audio = [c for c in offered if c in CODECS]
    video = [c for c in offered if c in VIDEO_CODECS]
    dropped = [c for c in offered if c not in CODECS and c not in VIDEO_CODECS]
    if dropped:
        patched = [c for c in dropped if c in _PATCHED_CODECS]
        them = "it" if len(patched) == 1 else "them"
        why = (
            f" ({', '.join(patched)}: only an Asterisk patched for AMR has {them}; stock "
            f"Asterisk 22 loads no endpoint allowing {them})"
            if patched
            else ""
        )
        source.notes.append(f"codecs dropped (not supported here): {', '.join(dropped)}{why}")
    return ",".join(audio), "yes" if video else "no"


#: The codec (format) names Asterisk 22 knows (main/codec_builtin.c, matched ignoring case).
_ASTERISK_CODECS = frozenset(
    {"codec2", "g723", "ulaw", "alaw", "gsm", "g726", "g726aal2", "adpcm", "lpc10", "g729"}
    | {"slin", "slin12", "slin16", "slin24", "slin32", "slin44", "slin48", "slin96", "slin192"}
    | {"speex", "speex16", "speex32", "ilbc", "g722", "siren7", "siren14", "g719", "opus"}
    | {"jpeg", "png", "h261", "h263", "h263p", "h264", "h265", "mpeg4", "vp8", "vp9"}
    | {"red", "t140", "t38", "none", "silk8", "silk12", "silk16", "silk24", "all"}
)
#: Codecs only an Asterisk patched for them has (traud/asterisk-amr adds both to
#: main/codec_builtin.c): stock Asterisk drops an endpoint allowing them, so a site whose
#: phones use them runs such an Asterisk.  Read as known codecs, dropped with a note.
_PATCHED_CODECS = frozenset({"amr", "amrwb"})
#: What ``sscanf("%d")`` reads from a packetization: the number at its start.
_SCAN_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")
#: Asterisk's blanks (``ast_strip``): every byte below 33.
_C_BLANKS = "".join(map(chr, range(33)))


def _check_codec_list(op: str, value: str) -> None:
    """:class:`_Refuse` when Asterisk cannot read this ``allow``/``disallow`` value
    (``ast_format_cap_update_by_allow_disallow`` fails, so it loads no such endpoint): an
    item (between ``,`` or ``|``, blanks stripped, after a ``!``) that is empty or names no
    codec it knows, or whose packetization after the last ``:`` is no number or negative.
    An empty ``disallow`` is read as nothing."""
    if op == "disallow" and not value:
        return
    inner = value[1:-1] if value.startswith("(") and value.endswith(")") else value
    for item in (part.strip(_C_BLANKS) for part in re.split(r"[,|]", inner)):
        name, colon, framing = item.removeprefix("!").rpartition(":")
        if not colon:
            name, framing = framing, ""
        number = _SCAN_INT.match(framing)
        why = None
        if framing and (number is None or int(number.group(1)) < 0):
            why = f"gives {name} a packetization ({framing!r}) that is no number 0 or more"
        elif not name:
            why = "has an empty item"
        elif name.lower() not in _ASTERISK_CODECS | _PATCHED_CODECS:
            why = f"names {name!r}, no codec Asterisk knows"
        if why is not None:
            raise _Refuse(f"{op} {value!r} {why}: Asterisk loads no such endpoint")


def _codec_items(value: str) -> list[str]:
    """The codec names of one ``allow``/``disallow`` value, split as Asterisk splits them
    (``ast_format_cap_update_by_allow_disallow``): at ``,`` and at ``|``."""
    return [item.strip() for item in re.split(r"[,|]", value) if item.strip()]


def _note_aor_changes(source: _Source, protocol: str, settings: RenderSettings) -> None:
    """Note each AOR option the user's rendered AOR sets otherwise than the source's AORs
    (``max_contacts=2`` becoming 1 takes a second phone's registration away)."""
    webrtc = protocol in ("ws", "wss")
    # What provisioner.pjsip.render_user writes for this user's AOR.
    rendered = {
        "max_contacts": str(settings.webrtc_max_contacts if webrtc else settings.max_contacts),
        "remove_existing": "yes",
        "qualify_frequency": str(settings.qualify_frequency),
    }
    for option, ours in rendered.items():
        theirs = sorted({_aor_value(aor, option) for aor in source.aors})
        if theirs != [ours]:
            # res_pjsip_registrar answers a REGISTER to an AOR of max_contacts 0 with 403.
            why = (
                " (at 0 Asterisk refused every REGISTER with 403: no phone could register to it)"
                if option == "max_contacts" and "0" in theirs
                else ""
            )
            source.notes.append(f"aor {option} {','.join(theirs)} becomes {ours}{why}")


def _aor_value(aor: Mapping[str, str], option: str) -> str:
    """``option``'s effective value in one source AOR, spelled as the renderer spells it."""
    value = aor.get(option, _AOR_DEFAULTS[option])
    if option == "remove_existing":
        return "yes" if _is_true(value) else "no"
    number = _c_uint(value)  # _check_loadable refused what Asterisk cannot parse
    return value if number is None else str(number)


def _groups(source: _Source, name: str) -> str:
    """The call or pickup group list ``name`` as Asterisk reads it (``ast_get_group``), which
    never refuses an endpoint for it: each comma item is read with ``sscanf("%d-%d")``,
    skipping blanks, so ``1, 3-5`` is groups 1 and 3-5; an item that is no number, or
    whose groups all lie outside 0-63, is ignored, and a range is cut to 0-63.  Items read
    exactly as written are kept as written; every other one is noted by field."""
    value = source.endpoint.get(name, "")
    if not value:
        return value
    kept: list[str] = []
    changes: list[str] = []
    start = 0
    for item in value.split(","):
        start, read = _group_item(item, start)
        shown = item.strip()
        if read is None:
            changes.append(f"{shown!r} dropped")
            continue
        if read != shown or not _GROUP_ITEM.fullmatch(shown):
            changes.append(f"{shown!r} read as {read}")
        if read not in kept:
            kept.append(read)
    if changes:
        source.notes.append(f"{name}: {'; '.join(changes)} (as Asterisk reads the list)")
    return ",".join(kept)


#: An item our group rule takes as written (the model checks its bounds).
_GROUP_ITEM = re.compile(r"[0-9]{1,2}(?:-[0-9]{1,2})?")
_SCAN_RANGE = re.compile(r"\s*([+-]?[0-9]+)-\s*([+-]?[0-9]+)")
_SCAN_ONE = re.compile(r"\s*([+-]?[0-9]+)")


def _group_item(item: str, start: int) -> tuple[int, str | None]:
    """``(start, groups)``: one group item as ``ast_get_group`` reads it, as ``N`` or
    ``N-M`` within 0-63, or None when it sets no group; ``start`` is the number the
    previous item read, which an empty item reuses (``sscanf`` returns EOF there, which
    Asterisk takes as success)."""
    if not item.strip():
        low = high = start
    elif m := _SCAN_RANGE.match(item):
        low, high = int(m.group(1)), int(m.group(2))
    elif m := _SCAN_ONE.match(item):
        low = high = int(m.group(1))
    else:
        return start, None
    start = low
    low, high = max(low, 0), min(high, 63)
    if low > high:
        return start, None
    return start, str(low) if low == high else f"{low}-{high}"


def _transport(source: _Source, index: _Index, settings: RenderSettings) -> str:
    name = source.endpoint.get("transport", "")
    webrtc = _is_true(source.endpoint.get("webrtc"))
    if not name:
        protocol = _unnamed_transport(source, index, webrtc)
    else:
        protocol = _transport_protocol(name, source, index, settings)
    if webrtc and protocol not in ("ws", "wss"):
        source.notes.append(f"webrtc=yes dropped: WebRTC is enabled only on ws/wss, not {protocol}")
    if not webrtc and protocol in ("ws", "wss"):
        source.notes.append(f"webrtc enabled: every {protocol} user gets WebRTC")
    return protocol


def _unnamed_transport(source: _Source, index: _Index, webrtc: bool) -> str:
    """The protocol of an endpoint without ``transport=``.  Asterisk serves such an
    endpoint's phones on whichever transport they use (it sends to a phone on the protocol
    its contact names), while a user is on one protocol: the one the file's transports
    speak (of ws and wss, with ``webrtc=yes``); when they speak several, or the file has
    none, udp (wss with WebRTC), noted, as phones on another protocol must move."""
    usable = ("ws", "wss") if webrtc else TRANSPORTS
    by_protocol = {p: names for p, names in index.transports.items() if p in usable}
    fallback = "wss" if webrtc else "udp"
    if len(by_protocol) == 1:
        ((protocol, names),) = by_protocol.items()
        if protocol != fallback:
            which = "WebRTC protocol" if webrtc else "protocol"
            source.notes.append(
                f"no transport=: {protocol}, the one {which} of this file's transports "
                f"({', '.join(names)})"
            )
        return protocol
    move = f"imported as {fallback}, so phones on another protocol must move to {fallback}"
    if by_protocol:
        shown = ", ".join(p for p in TRANSPORTS if p in by_protocol)
        source.notes.append(
            f"no transport=: Asterisk serves its phones on any of this file's transports "
            f"({shown}); {move}"
        )
    else:
        which = "ws or wss transport" if webrtc else "transport"
        source.notes.append(f"no transport= and no {which} in this file: {move}")
    return fallback


def _transport_protocol(name: str, source: _Source, index: _Index, settings: RenderSettings) -> str:
    """The protocol of the endpoint's transport ``name``: the ``protocol=`` of the file's
    transport section of that name, whatever we call ours (its phones speak that one),
    noted when our name for it differs; else the protocol ``[target.transports]`` gives
    that name (when two share it, the first listed)."""
    defined = index.get("transport", name)
    if defined is None:
        # Reversed: when two protocols share a name, the first one listed wins.
        table = {settings.transport_name(p): p for p in reversed(TRANSPORTS)}
        found = table.get(name)
    else:
        found = _options(defined).get("protocol", "udp").lower()
    if found not in TRANSPORTS:
        raise _Refuse(
            f"transport {name!r} is neither in [target.transports] nor a transport of "
            "this file with protocol udp, tcp, tls, ws or wss"
        )
    assert found is not None
    if settings.transport_name(found) != name:
        source.notes.append(
            f"transport {name!r} (protocol {found}) becomes "
            f"{settings.transport_name(found)!r} from [target.transports]"
        )
    return found


def _nat(source: _Source, protocol: str) -> str:
    """The NAT row closest to the source's four NAT options (noted when none matches).  A
    ws/wss user always renders ``direct_media=no``, so for it that option is not compared
    (and a ``direct_media=yes`` is noted as dropped)."""
    given = tuple(
        "yes" if _is_true(source.endpoint.get(k, d)) else "no"
        for k, d in zip(_NAT_KEYS, _NAT_DEFAULTS, strict=True)
    )
    keys: tuple[str, ...] = _NAT_KEYS
    if protocol in ("ws", "wss"):
        keys = _NAT_KEYS[:3]
        if given[3] == "yes":
            source.notes.append("direct_media=yes becomes no: WebRTC media cannot go direct")

    def distance(nat: str) -> int:
        return sum(
            a != b for k, a, b in zip(_NAT_KEYS, NAT_OPTIONS[nat], given, strict=True) if k in keys
        )

    best = min(NATS, key=distance)  # ties: the first in NATS ("no" before "never")
    if distance(best):
        shown = ", ".join(f"{k}={v}" for k, v in zip(_NAT_KEYS, given, strict=True) if k in keys)
        differ = [
            k
            for k, a, b in zip(_NAT_KEYS, NAT_OPTIONS[best], given, strict=True)
            if a != b and k in keys
        ]
        source.notes.append(
            f"NAT options ({shown}) match no NAT setting; imported as the closest, "
            f"nat={best} (differs in {', '.join(differ)})"
        )
    return best


def _secret(
    source: _Source, index: _Index, settings: RenderSettings, generate: bool
) -> tuple[str | None, tuple[str, str] | None]:
    """``(plaintext secret, carried digests)``; both None means "generate one"."""
    auth = source.auth
    auth_type = auth.get("auth_type", "userpass").lower()
    if auth_type not in ("userpass", "digest", "md5"):
        raise _Refuse(f"auth_type {auth_type} cannot be migrated")
    # Asterisk 22 reads auth_type only for OAuth: an md5 auth with a password and no digest
    # checks its phones against the password (ast_sip_auth_get_creds).
    password = auth.get("password", "")
    realm = auth.get("realm") or index.realm()
    stale = _stale_digest(auth, password, realm, index) if password else None
    need: str
    if password and stale is None:
        if _rule("sip_secret", password) is None:
            return password, None
        need = "its password breaks the SIP secret rule (8-128 printable ASCII, no spaces)"
    else:
        digests = _digests(auth)
        if not digests:
            need = "its auth has no password"
        elif len(digests) == 1:
            ((algorithm, (_, where)),) = digests.items()
            shown = algorithm.upper()
            need = f"its auth has only an {shown} digest ({where}; we keep SHA-256 and MD5)"
        elif realm is None:
            need = (
                "its digests are for the realm of pjsip.conf's [global] default_realm, "
                "which a wizard file does not hold (give it with --default-realm)"
            )
        elif realm != settings.realm:
            need = f"its digests were made for realm {realm!r}, ours is {settings.realm!r}"
        else:
            return None, (digests["md5"][0].lower(), digests["sha-256"][0].lower())
        if stale is not None:
            need = f"{stale}; {need}"
    if not generate:
        raise _Refuse(f"needs a new SIP secret: {need}; or import with --generate-secrets")
    source.notes.append(f"a new SIP secret is generated: {need}")
    return None, None


def _stale_digest(
    auth: Mapping[str, str], password: str, realm: str | None, index: _Index
) -> str | None:
    """Why ``password`` is not the secret the auth's phones use, or None when it is.  Asterisk
    22 checks a phone, for each algorithm it challenges with (the auth's
    ``supported_algorithms_uas``, else ``[global] default_auth_algorithms_uas``, else MD5),
    against the auth's digest for that algorithm when it has one, and against the password
    only when it has none (``ast_sip_auth_get_creds``): a digest of another secret (a
    ``md5_cred`` left from an older password) is what the phones match.  With the realm
    unknown (None: a wizard file's) the digest is compared for Asterisk's default realm,
    which a match proves and a mismatch, said so, does not disprove."""
    challenged = _split(
        auth.get("supported_algorithms_uas")
        or index.global_options.get("default_auth_algorithms_uas", "")
    ) or ["MD5"]
    ours = credentials.sip_digests(auth.get("username", ""), realm or _DEFAULT_REALM, password)
    expected = {"md5": ours.md5, "sha-256": ours.sha256}
    for algorithm, (digest, where) in _digests(auth).items():
        if algorithm in {a.lower() for a in challenged} and digest.lower() != expected[algorithm]:
            shown = (
                repr(realm)
                if realm is not None
                else f"{_DEFAULT_REALM!r}, unless pjsip.conf's [global] default_realm is "
                "another (give it with --default-realm)"
            )
            return (
                f"its password is not the secret of its {where} ({algorithm.upper()} digest "
                f"for realm {shown}), which Asterisk checks instead"
            )
    return None


def _digests(auth: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The digests ``auth`` gives Asterisk, by algorithm (``md5``, ``sha-256``), each with
    the option it came from.  ``md5_cred`` is the MD5 one whatever the ``auth_type``:
    Asterisk (since 20.12, 21.7, 22.2, which read ``password_digest``) parses it as a
    ``password_digest`` item without an algorithm, so under ``userpass`` it is a digest,
    not "no password".  An MD5 item of ``password_digest`` is read after it."""
    found: dict[str, tuple[str, str]] = {}
    md5 = auth.get("md5_cred", "")
    if _HEX["md5"].fullmatch(md5):
        found["md5"] = (md5, "md5_cred")
    for item in _split(auth.get("password_digest", "")):
        algorithm, _, digest = item.partition(":")
        pattern = _HEX.get(algorithm.strip().lower())
        if pattern is not None and pattern.fullmatch(digest.strip()):
            found[algorithm.strip().lower()] = (digest.strip(), "password_digest")
    return found


def _map_source(
    source: _Source, index: _Index, settings: RenderSettings, generate: bool
) -> MappedUser:
    section = source.section
    extension = section.name
    if (rule := _rule("extension", extension)) is not None:
        raise _Refuse(f"its id is not an extension: {rule}")
    username = source.auth.get("username", "")
    if not username:
        raise _Refuse(f"its auth [{source.auth_name}] has no username")
    if (rule := _rule("username", username)) is not None:
        raise _Refuse(f"username {username!r} {rule}")
    # The email is <username>@<--email-domain>: a username no address can start with
    # (a..b, .ann) is left out here rather than failing the whole import at apply time.
    if (rule := check_email(f"{username}@{_EMAIL_PROBE_DOMAIN}")[1]) is not None:
        why = rule.removeprefix("must be a valid email address").strip()
        raise _Refuse(f"username {username!r} makes no valid email address {why}".rstrip())
    values = {
        "username": username,
        "extension": extension,
        "full_name": _full_name(source, username, extension),
        "context": source.endpoint.get("context") or _DEFAULT_CONTEXT,
        "transport": _transport(source, index, settings),
    }
    values["nat"] = _nat(source, values["transport"])
    values["codecs"], values["video"] = _codecs(source, settings)
    _note_aor_changes(source, values["transport"], settings)
    if (rule := _rule("context", values["context"])) is not None:
        raise _Refuse(f"context {values['context']!r} {rule}")
    for name in ("call_group", "pickup_group"):
        group, rule = check_group(_groups(source, name))
        if rule is not None:
            raise _Refuse(f"{name} {rule}")
        values[name] = group
    secret, digests = _secret(source, index, settings, generate)
    return MappedUser(
        section=section.name,
        line=section.line,
        values=values,
        notes=tuple(source.notes),
        sip_secret=secret,
        digests=digests,
    )


def _twice(kind: str, lines: tuple[int, ...]) -> str:
    """Why a ``kind`` object defined on each of ``lines`` is not read (``defined twice ...``)."""
    times = "twice" if len(lines) == 2 else f"{len(lines)} times"
    shown = ", ".join(map(str, lines))
    return (
        f"defined {times} (lines {shown}): "
        f"Asterisk loads no {kind} from a file that defines one more than once"
    )


def _not_read_from(kind: str, read_as: FileKind) -> str | None:
    """Why Asterisk never applies a ``kind`` section of the file ``read_as`` (None when it
    does): a wizard only from pjsip_wizard.conf, and nothing else from that file."""
    if read_as == PJSIP_CONF and kind == "wizard":
        return (
            f"a wizard in {PJSIP_CONF}: Asterisk reads wizards only from {WIZARD_CONF} "
            f"(if this file is the wizard's, import it with --read-as {WIZARD_CONF})"
        )
    if read_as == WIZARD_CONF and kind != "wizard":
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        return f"{article} {kind} in {WIZARD_CONF}: Asterisk reads only wizards from {WIZARD_CONF}"
    return None


def _build_index(
    parsed: Parsed, unmapped: list[Unmapped], read_as: FileKind, default_realm: str | None
) -> _Index:
    """Index the sections as Asterisk loads them from the file ``read_as``: a section of a
    type Asterisk never reads from that file is only reported.  A file defining an object
    of one type twice (res_sorcery_config: "configuration contains a duplicate object")
    loads no object of that type, so no copy is read; the config wizard applies each copy
    of a wizard in turn (:func:`_merge_wizard`)."""
    # A wizard file holds no [global] (Asterisk reads that from pjsip.conf): its default
    # realm is unknown unless given.
    index = _Index(parsed, default_realm or (None if read_as == WIZARD_CONF else ""))
    copies: dict[tuple[str, str], list[Section]] = {}
    for section in parsed.visible():
        key = (_type(section), section.name)
        if not key[0]:
            unmapped.append(Unmapped(section.name, section.line, "has no type="))
        elif (why := _not_read_from(key[0], read_as)) is not None:
            unmapped.append(Unmapped(section.name, section.line, f"{key[0]}: {why}"))
        else:
            copies.setdefault(key, []).append(section)
    for key, sections in copies.items():
        kind = key[0]
        if len(sections) == 1:
            index.by_key[key] = sections[0]
            continue
        if kind == "wizard":
            index.by_key[key], note, reasons = _merge_wizard(sections)
            if note is not None:
                index.merged[key[1]] = note
            unmapped.extend(reasons)
            continue
        index.duplicates[key] = tuple(s.line for s in sections)
        reason = f"{kind}: {_twice(kind, index.duplicates[key])}"
        unmapped.extend(Unmapped(s.name, s.line, reason) for s in sections)
    for (kind, name), sections in copies.items():
        if kind not in ("endpoint", "registration"):
            continue
        for opts in map(_options, sections):
            for ref in _split(opts.get("auth", "")) + _split(opts.get("outbound_auth", "")):
                index.owner.setdefault(("auth", ref), name)
            for ref in _split(opts.get("aors", "")):
                index.owner.setdefault(("aor", ref), name)
    return index


def _claim(
    mapped: MappedUser, seen: dict[str, MappedUser], seen_users: dict[str, MappedUser]
) -> None:
    if (other := seen.get(mapped.extension)) is not None:
        raise _Refuse(f"extension {mapped.extension} is also [{other.section}] (line {other.line})")
    if (other := seen_users.get(mapped.username.lower())) is not None:
        raise _Refuse(f"username {mapped.username!r} is also [{other.section}] (line {other.line})")
    seen[mapped.extension] = mapped
    seen_users[mapped.username.lower()] = mapped


def plan_import(
    parsed: Parsed,
    settings: RenderSettings,
    *,
    generate_secrets: bool = False,
    read_as: FileKind = PJSIP_CONF,
    default_realm: str | None = None,
) -> ImportPlan:
    """Map every user endpoint of ``parsed`` to user values; list every other section.

    Pure.  ``settings`` gives the transport names (reverse lookup), the realm
    digests must match to be carried over, and the video codecs.  ``read_as`` is the
    file Asterisk reads ``parsed`` as (:func:`file_kind`): its user endpoints are the
    endpoints of pjsip.conf, or the wizards of pjsip_wizard.conf.  ``default_realm`` is
    the site's ``[global] default_realm``, the realm of an auth's digests where it sets no
    ``realm``; without it, that of the file's ``[global]`` (or Asterisk's ``asterisk``), and
    none of a wizard file, which has no ``[global]``: its digests are then not carried over.
    """
    unmapped: list[Unmapped] = []
    index = _build_index(parsed, unmapped, read_as, default_realm)
    users: list[MappedUser] = []
    seen: dict[str, MappedUser] = {}
    seen_users: dict[str, MappedUser] = {}
    for (kind, name), section in index.by_key.items():
        if kind not in ("endpoint", "wizard"):
            continue
        try:
            source = (
                _endpoint_source(section, index) if kind == "endpoint" else _wizard_source(section)
            )
            if kind == "wizard" and name in index.merged:
                source.notes.insert(0, index.merged[name])
            mapped = _map_source(source, index, settings, generate_secrets)
            _claim(mapped, seen, seen_users)
        except _Refuse as exc:
            unmapped.append(Unmapped(name, section.line, f"{kind}: {exc}"))
            continue
        users.append(mapped)
        index.used.add(("auth", source.auth_name))
        index.used.update(("aor", ref) for ref in source.aor_names)
    imported = {u.section: u.username for u in users}
    for (kind, name), section in index.by_key.items():
        if kind in ("endpoint", "wizard") or (kind, name) in index.used:
            continue
        reason = _reason(kind, name, index)
        if kind == "identify":
            reason = _identify_reason(section, imported, index) or reason
        unmapped.append(Unmapped(name, section.line, reason))
    unmapped.sort(key=lambda u: u.line)
    notices = tuple(f"line {n.line}: {n.message}" if n.line else n.message for n in parsed.notices)
    overridden = _realm_overridden(index, default_realm)
    return ImportPlan(tuple(users), tuple(unmapped), notices + overridden)


def _realm_overridden(index: _Index, default_realm: str | None) -> tuple[str, ...]:
    """A notice when ``default_realm`` (``--default-realm``) is not the file's own ``[global]
    default_realm``: the option wins, and the realm digests were taken for is said, not
    silently changed."""
    own = index.global_options.get("default_realm")
    if not default_realm or not own or own == default_realm:
        return ()
    line = next(section.line for (kind, _), section in index.by_key.items() if kind == "global")
    return (
        f"--default-realm {default_realm!r} overrides the file's [global] default_realm "
        f"{own!r} (line {line}): digests of auths that set no realm are taken as made for "
        f"{default_realm!r}",
    )


def _identify_reason(section: Section, imported: Mapping[str, str], index: _Index) -> str | None:
    """Why an identify is left out, by the endpoint it names (None when it names none).  Of
    an endpoint imported as a user: it matched that phone by its address, which a user does
    not carry; the phone is then found by its SIP user, as every registering phone is.  Of
    an endpoint not mapped: it goes with that endpoint, whatever kept it out (a trunk's, or
    a phone's refused for another reason)."""
    endpoint = _options(section).get("endpoint", "").strip()
    if not endpoint:
        return None
    username = imported.get(endpoint)
    if username is None:
        if index.get("endpoint", endpoint) is None and ("endpoint", endpoint) not in (
            index.duplicates
        ):
            return (
                f"identify: matches [{endpoint}] by address, an endpoint this file does not define"
            )
        return f"identify: belongs to [{endpoint}], which is not mapped"
    return (
        f"identify: matches imported user {username} ([{endpoint}]) by address; matching by "
        f"address is not carried over (its phones are found by their SIP user, {endpoint})"
    )


def _reason(kind: str, name: str, index: _Index) -> str:
    if kind in _NOT_USERS:
        return f"{kind}: {_NOT_USERS[kind]}"
    if kind in ("auth", "aor"):
        owner = index.owner.get((kind, name))
        if owner is not None:
            return f"{kind}: belongs to [{owner}], which is not mapped"
        return f"{kind}: not used by any endpoint"
    return f"{kind}: not a user object"


# -- applying ------------------------------------------------------------------------------


def apply_plan(
    accounts: Accounts,
    plan: ImportPlan,
    *,
    profile: str,
    email_domain: str,
    dry_run: bool = False,
) -> ImportResult:
    """Create every planned user (role ``user``, ``profile``, email ``<username>@<email_domain>``)
    in one transaction.

    Raises :class:`InvalidInput` (or a subclass) listing every user that breaks
    a rule or clashes with the store, with its section's line; then nothing has
    changed.  With ``dry_run`` everything is checked and rolled back.  When a
    concurrent writer takes an extension or a name the import meant to write, the
    import runs again from the first user, so it allocates past it or reports the
    clash on its user, never a database error.
    """
    return rerun_on_unique_clash(
        lambda: _apply_once(accounts, plan, profile, email_domain, dry_run),
        _APPLY_ATTEMPTS,
        ConflictError.one("import", "other writers kept taking the same extensions; try again"),
    )


def _apply_once(
    accounts: Accounts, plan: ImportPlan, profile: str, email_domain: str, dry_run: bool
) -> ImportResult:
    """One run of :func:`apply_plan`, in one transaction."""
    result = ImportResult(dry_run=dry_run)
    problems: list[Problem] = []
    _, rule = check_email(f"user@{email_domain}")
    if rule is not None:
        problems.append(Problem("--email-domain", f"{email_domain!r} {rule}"))
    try:
        with accounts.write() as conn:
            if q.profile_by_name(conn, profile) is None:
                problems.append(
                    Problem("--profile", f"must name an existing profile ({profile!r} does not)")
                )
            if plan.users and not q.has_users(conn):
                # Said once here, not as "the first user must be an admin" on every user.
                problems.append(
                    Problem(
                        "import",
                        "the store has no user yet and its first user must be an admin, "
                        "while imported users are of role user: add the admin first "
                        "(provisioner user add NAME --role admin ...)",
                    )
                )
            if problems:
                raise InvalidInput(problems)
            allocator = q.ExtensionAllocator(
                conn, accounts.policy.ext_first, accounts.policy.ext_last
            )
            now = accounts.clock()
            for user in plan.users:
                try:
                    _add(accounts, conn, user, profile, email_domain, allocator, now, result)
                except ProvisionerError as exc:
                    problems.extend(_as_problems(exc, user))
            if problems:
                raise InvalidInput(problems)
            if dry_run:
                raise _DryRun
    except _DryRun:
        result.generated_secrets.clear()
    return result


def _add(
    accounts: Accounts,
    conn: Any,
    user: MappedUser,
    profile: str,
    email_domain: str,
    allocator: q.ExtensionAllocator,
    now: Any,
    result: ImportResult,
) -> None:
    values: dict[str, Any] = {
        **user.values,
        "role": "user",
        "profile": profile,
        "email": f"{user.username}@{email_domain}",
    }
    if user.sip_secret:
        values["sip_secret"] = user.sip_secret
    user_id, generated = accounts.add_in(conn, values, allocator, now, line=user.line)
    if user.digests is not None:
        md5, sha256 = user.digests
        q.update_user(
            conn,
            user_id,
            {"sip_realm": accounts.policy.realm, "sip_md5": md5, "sip_sha256": sha256},
        )
    elif generated:
        result.generated_secrets[user.username] = generated
    result.added.append(user)


def _as_problems(exc: ProvisionerError, user: MappedUser) -> list[Problem]:
    where = f"[{user.section}] "
    if isinstance(exc, InvalidInput):
        return [Problem(where + p.field, p.rule, user.line) for p in exc.problems]
    return [Problem(where.strip(), exc.message, user.line)]


def report_lines(plan: ImportPlan, result: ImportResult) -> list[str]:
    """What the command prints: one line per user (with its notes), per unmapped section,
    per parser notice, per generated secret (shown once), and a summary.  Never a
    carried-over secret."""
    verb = "would add" if result.dry_run else "added"
    lines = []
    for user in result.added:
        lines.append(f"{verb} {user.username} (extension {user.extension})")
        lines.extend(f"  note: {note}" for note in user.notes)
    lines.extend(f"not mapped: {u}" for u in plan.unmapped)
    lines.extend(f"notice: {n}" for n in plan.notices)
    for name, secret in result.generated_secrets.items():
        lines.append(f"SIP secret for {name} (shown once): {secret}")
    lines.append(f"{verb} {len(result.added)} users; {len(plan.unmapped)} sections not mapped")
    return [_shown(line) for line in lines]


def _shown(text: str) -> str:
    """``text`` safe to print on any terminal and in strict UTF-8: a byte of the file that
    was not UTF-8 becomes ``\\xNN`` and a control character its ``repr`` escape; the rest
    is kept."""
    return "".join(_shown_char(ch) for ch in text) if not text.isprintable() else text


def _shown_char(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{ord(ch) - 0xDC00:02x}"
    if unicodedata.category(ch).startswith("C"):
        return repr(ch)[1:-1]
    return ch
