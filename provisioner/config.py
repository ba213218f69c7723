"""Typed settings: embedded defaults < one TOML file < environment < command-line flags.

The file is ``--config``, else ``$PROVISIONER_CONFIG``, else
``/etc/provisioner/provisioner.toml`` when it exists, else none (defaults only).
Every key can be overridden from the environment as ``PROVISIONER_<SECTION>__<KEY>``
(``PROVISIONER_STORE__URL``); ``$PROVISIONER_AS`` names the acting admin, not a key.
All problems (unknown keys, wrong types, broken rules, unreadable ``--set`` flags) are
collected and raised together as one :class:`~provisioner.errors.ConfigError`: a rule
that spans several fields is checked even when another field fails, so one run shows
everything to fix.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import os
import re
import stat
import tomllib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote_plus

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .errors import ConfigError, Problem
from .model import TRANSPORT_NAME, TRANSPORT_NAME_RULE, TRANSPORTS

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AmiSettings",
    "AsteriskServer",
    "Config",
    "cache_names",
    "caches_by_kind",
    "command_line_secrets",
    "load_config",
    "parse_sets",
    "secret_file_problem",
]

DEFAULT_CONFIG_PATH = Path("/etc/provisioner/provisioner.toml")
ENV_PREFIX = "PROVISIONER_"
ENV_CONFIG = "PROVISIONER_CONFIG"
#: The acting admin (the CLI's ``--as``): not a config key, like ``PROVISIONER_CONFIG``.
ENV_ACTOR = "PROVISIONER_AS"


class _Section(BaseModel):
    # No inf or nan (TOML has both literals, the environment gives them as text): an
    # infinite interval never fires, and NaN passes no bound yet fails every comparison.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A number is not ``true``/``false``: lax validation would take them as 1 and 0."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("must be a number, not true or false")
        return value


_M = TypeVar("_M", bound=BaseModel)

#: A broken rule found by a validator: where, relative to the model or field it checks
#: (``()`` for that model or field itself), and the rule.
_Issue = tuple[tuple[str | int, ...], str]


def _init_details(err: ErrorDetails) -> InitErrorDetails:
    """A reported error as the input that re-creates it."""
    details = InitErrorDetails(type=err["type"], loc=err["loc"], input=err["input"])
    if "ctx" in err:
        details["ctx"] = err["ctx"]
    return details


def _error(issues: Sequence[_Issue], exc: ValidationError | None = None) -> ValidationError:
    """One validation error listing ``exc``'s errors (if any), then ``issues``.

    The issues carry no input value: a rule about a secret never holds the secret.
    """
    details = [_init_details(err) for err in exc.errors()] if exc is not None else []
    details += [
        InitErrorDetails(type="value_error", loc=loc, input=None, ctx={"error": ValueError(rule)})
        for loc, rule in issues
    ]
    return ValidationError.from_exception_data(exc.title if exc else "Config", details)


def _validated(data: Any, handler: ModelWrapValidatorHandler[_M], issues: list[_Issue]) -> _M:
    """``handler(data)``; if it fails or ``issues`` is not empty, one error listing both."""
    try:
        model = handler(data)
    except ValidationError as exc:
        if not issues:
            raise
        raise _error(issues, exc) from None
    if issues:
        raise _error(issues)
    return model


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """Validates one field of ``model`` alone: its type and constraints (not its validators)."""
    info = model.model_fields[name]
    field_type: Any = (
        Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    )
    return TypeAdapter(field_type)


def _valid_inputs(model: type[BaseModel], data: Any, names: Sequence[str]) -> dict[str, Any] | None:
    """The fields ``names`` of the raw input ``data`` of ``model``, each validated alone (an
    absent one takes its default), for a rule that spans them to check even when other
    fields fail; None if one of them fails or is required and absent (its own error says
    so), or ``data`` is not a table."""
    if not isinstance(data, Mapping):
        return None
    values: dict[str, Any] = {}
    for name in names:
        info = model.model_fields[name]
        if name in data:
            try:
                values[name] = _field_adapter(model, name).validate_python(data[name])
            except ValidationError:
                return None
        elif info.is_required():
            return None
        else:
            values[name] = info.get_default(call_default_factory=True)
    return values


#: The rule a path starting with ``~`` breaks: Python opens it as a directory named ``~``.
_TILDE_RULE = "must not start with '~' (no shell expands it here): give the full path"


def _no_tilde(value: str) -> str:
    """``value``, a path, unless it starts with ``~``: no shell expands one in a TOML file,
    a unit's environment or a quoted flag, and taken as it is it names a directory ``~``
    under the working directory, where nothing else (Asterisk's #include) looks."""
    if value.startswith("~"):
        raise ValueError(_TILDE_RULE)
    return value


def _check_url(value: str) -> str:
    """``value`` if it is a database URL of a dialect SQLAlchemy has, whose driver is
    installed; the rule it breaks never quotes it (a part of its password could show)."""
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise ValueError(f"must be a SQLAlchemy database URL ({exc})") from None
    except ValueError:  # int(port): a password's unescaped '@' or ':' moved the split
        raise ValueError(
            "must be a SQLAlchemy database URL (its port is not a number; "
            "percent-encode any '@', ':' or '/' in the password)"
        ) from None
    if url.get_backend_name() == "sqlite" and (url.database or "").startswith("~"):
        raise ValueError(_TILDE_RULE)
    if url.host is not None and "@" in url.host:  # the password's tail, read as the host
        raise ValueError(
            "must be a SQLAlchemy database URL (its host holds an '@'; "
            "percent-encode any '@', ':' or '/' in the password)"
        )
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"names no database SQLAlchemy knows ({url.drivername!r})") from None
    try:
        # Here, not at the first connect: a missing driver (``mysql://`` means MySQLdb)
        # would otherwise end every command in a traceback instead of a config problem.
        dialect.import_dbapi()
    except ImportError as exc:
        raise ValueError(
            f"its driver is not installed ({dialect.name}+{dialect.driver}: {exc}); "
            "install it or name one that is, e.g. postgresql+psycopg, mysql+pymysql"
        ) from None
    with warnings.catch_warnings():
        # SQLAlchemy's warning for a parameter the driver ignores: said again (and shown)
        # when the engine is made.
        warnings.simplefilter("ignore")
        try:
            # The parameters converted for the driver (``?timeout=abc`` for a float), as
            # the engine does: here, not as a traceback from every command and the daemon.
            dialect().create_connect_args(url)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"its driver cannot take its parameters: {driver_refusal(exc, url)}"
            ) from None
    if dialect.driver == "pymysql" and not all(map(_latin1, _passwords(url))):
        # pymysql encodes the password as Latin-1 at every connect: it would fail each one
        # with a UnicodeEncodeError quoting the character and its place in the password.
        raise ValueError(
            "its password holds a character pymysql cannot send (it sends the password as "
            "Latin-1, which has no euro sign or emoji, say): set one of Latin-1 characters"
        )
    return value


def driver_refusal(exc: Exception, url: URL | str) -> str:
    """``<error type>: <first line of its message>``: what may be shown of a driver's (or
    SQLAlchemy's) refusal of the parameters ``url`` gives it, each password the URL holds
    shown as ``***`` should the message quote it; a character that cannot be encoded
    (a password's, in its place) is never quoted."""
    if isinstance(exc, UnicodeError):
        encoding = getattr(exc, "encoding", "")
        return f"{type(exc).__name__}: the {encoding} codec: {getattr(exc, 'reason', '')}"
    said = (str(exc).splitlines() or [""])[0]
    parsed = make_url(url) if isinstance(url, str) else url
    for password in sorted(_passwords(parsed), key=len, reverse=True):
        if password:
            said = said.replace(password, "***")
    return f"{type(exc).__name__}: {said}"


def _passwords(url: URL) -> list[str]:
    """Every password ``url`` gives its driver: the one before the ``@`` and the values of
    the query parameters that may hold one (``?password=``, ``?passwd=``)."""
    given = [url.password] if url.password is not None else []
    for key, values in url.query.items():
        if key.lower() in ("password", "passwd"):
            given += [values] if isinstance(values, str) else list(values)
    return given


def _latin1(text: str) -> bool:
    """Whether Latin-1 holds every character of ``text``."""
    return all(ord(ch) < 256 for ch in text)


#: Query parameters a driver may take as a password (libpq's ``password`` and
#: ``sslpassword``, pymysql's ``passwd``): SQLAlchemy passes every one to the driver's
#: ``connect()``, and its ``hide_password`` hides only the password before the ``@``.
_SECRET_QUERY = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)


def display_url(url: str) -> str:
    """A database URL fit to print or log: its password, if any, shown as ``***``, and so
    is the value of each query parameter that may hold one (``?password=``)."""
    if not url:
        return url
    parsed = make_url(url)
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    pairs = [
        f"{quote_plus(key)}={'***' if _SECRET_QUERY.search(key) else quote_plus(value)}"
        for key, values in sorted(parsed.query.items())
        for value in ((values,) if isinstance(values, str) else values)
    ]
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


class _UrlSection(_Section):
    """A section holding a database ``url``, whose password its repr never shows."""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, display_url(value) if name == "url" else value


#: The longest SQLite busy timeout, in seconds: SQLite keeps it as a C ``int`` of
#: milliseconds, and a larger one (or ``inf``, which TOML allows) becomes 0, no wait at all,
#: or fails the first connect.
MAX_BUSY_TIMEOUT = (2**31 - 1) // 1000


#: The most connections a process keeps open to a database (SQLAlchemy may open 10 more
#: for a burst): far above what a database serves by default (PostgreSQL's
#: ``max_connections`` is 100, MariaDB's 151), so only a typo is refused.
MAX_POOL_SIZE = 1000
#: The longest wait for a pooled connection, in seconds (an hour, as the AMI timeouts).
MAX_POOL_TIMEOUT = 3600


class StoreSettings(_UrlSection):
    """Where the user store lives, and how each process connects to it."""

    url: str = "sqlite:///var/provisioner.db"
    #: Seconds a SQLite writer waits for another writer's lock before failing.
    busy_timeout: float = Field(default=10.0, gt=0, le=MAX_BUSY_TIMEOUT)
    #: Connections a process keeps open to the store (and to a realtime ``target.url``);
    #: SQLAlchemy's default.
    pool_size: int = Field(default=5, ge=1, le=MAX_POOL_SIZE)
    #: Seconds a thread waits for a connection when all are taken before failing;
    #: SQLAlchemy's default.
    pool_timeout: float = Field(default=30.0, gt=0, le=MAX_POOL_TIMEOUT)

    _url = field_validator("url")(_check_url)


#: Ten years: a longer lock overflows the date arithmetic (``0`` already means "until unlocked").
MAX_LOCK_MINUTES = 10 * 366 * 24 * 60
#: The largest extension: an extension is 1 to 20 digits.
MAX_EXTENSION = 10**20 - 1


class SecuritySettings(_Section):
    """The security suite: password policy and login lockout."""

    password_policy: bool = True
    max_failed_logins: int = Field(default=5, ge=1, le=1000)
    #: Minutes after which a locked account unlocks by itself; 0 means only an admin unlocks.
    lock_minutes: int = Field(default=30, ge=0, le=MAX_LOCK_MINUTES)


class ExtensionSettings(_Section):
    """The range new extensions are allocated from (lowest free number first)."""

    first: int = Field(default=1000, ge=0, le=MAX_EXTENSION)
    last: int = Field(default=9999, ge=0, le=MAX_EXTENSION)

    @model_validator(mode="wrap")
    @classmethod
    def _ordered(
        cls, data: Any, handler: ModelWrapValidatorHandler[ExtensionSettings]
    ) -> ExtensionSettings:
        """``last`` is at least ``first``: checked even when another key fails."""
        bounds = _valid_inputs(cls, data, ("first", "last"))
        issues: list[_Issue] = []
        if bounds is not None and bounds["last"] < bounds["first"]:
            issues.append((("last",), f"must be at least extensions.first ({bounds['first']})"))
        return _validated(data, handler, issues)


class SipSettings(_Section):
    """SIP identity: the digest realm the stored secrets are hashed with."""

    realm: str = Field(default="asterisk", pattern=r"^[A-Za-z0-9._-]{1,64}$")


class TargetSettings(_UrlSection):
    """Where and how users are rendered as PJSIP objects."""

    kind: Literal["config", "realtime"] = "config"
    path: str = Field(default="var/pjsip_users.conf", min_length=1)
    #: Realtime database; empty means the user store itself.
    url: str = ""
    #: A directory whose templates override the shipped ones, file by file.
    templates: str = ""
    #: Config file only: the site's pjsip.conf, which ``#include``s ``path``; ``check``
    #: reads it (and what it includes) for that include and for objects it defines that
    #: ``path`` defines too.  Empty: ``pjsip.conf`` beside ``path``, when there is one.
    pjsip_conf: str = ""
    #: Config file only: 0 writes every user into ``path``; N (1-4096) writes them into N
    #: shard files under ``<path stem>.d/``, which ``path`` includes (one edit rewrites one).
    shards: int = Field(default=0, ge=0, le=4096)
    auth_type: Literal["userpass", "md5"] = "userpass"
    max_contacts: int = Field(default=1, ge=1, le=100)
    webrtc_max_contacts: int = Field(default=5, ge=1, le=100)
    qualify_frequency: int = Field(default=60, ge=0, le=86400)
    video_codecs: tuple[Literal["vp8", "vp9", "h264", "h263", "h263p"], ...] = ("vp8", "h264")
    transports: dict[str, str] = Field(
        default_factory=lambda: {
            "udp": "transport-udp",
            "tcp": "transport-tcp",
            "tls": "transport-tls",
            "ws": "transport-ws",
            "wss": "transport-wss",
        }
    )

    @field_validator("url")
    @classmethod
    def _url_or_empty(cls, value: str) -> str:
        return _check_url(value) if value else value

    @property
    def own_database(self) -> str | None:
        """The realtime target's own database URL, None when there is none (a config file,
        or realtime rows in the user store's database)."""
        return self.url if self.kind == "realtime" and self.url else None

    _paths = field_validator("path", "templates", "pjsip_conf")(_no_tilde)

    @field_validator("video_codecs")
    @classmethod
    def _video_codecs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """At least one codec, each once (an empty list would give video users no video)."""
        if not value:
            raise _error([((), "must list at least one video codec")])
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise _error([((), f"must not repeat a codec ({', '.join(repeated)})")])
        return value

    @field_validator("transports")
    @classmethod
    def _transport_names(cls, value: dict[str, str]) -> dict[str, str]:
        """The shipped names, overridden by ``value``; every unknown protocol and bad name
        is reported."""
        value = {**cls.model_fields["transports"].get_default(call_default_factory=True), **value}
        issues = [
            ((), rule) for proto, name in value.items() if (rule := _transport_rule(proto, name))
        ]
        if issues:
            raise _error(issues)
        return value


def _transport_rule(proto: str, name: str) -> str | None:
    """The rule the transport table entry ``proto = name`` breaks, if any."""
    if proto not in TRANSPORTS:
        return f"{proto!r} is not a transport (udp, tcp, tls, ws, wss)"
    if not TRANSPORT_NAME.fullmatch(name):
        return f"transport name for {proto} must be {TRANSPORT_NAME_RULE}"
    return None


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``auto``: console style on a terminal, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"


#: AMI header values must not carry control characters (they would inject headers): the
#: C1 ones too, as the AMI client refuses every value with one (``ami.actions._CONTROL``).
_AMI_VALUE = r"^[^\x00-\x1f\x7f-\x9f]{1,200}$"


#: What Asterisk strips from both ends of a manager.conf value (``ast_strip``): every
#: character below 33 (space, tab, CR, LF, other controls).
_ASTERISK_BLANKS = "".join(map(chr, range(33)))


def _read_secret(
    secret: SecretStr | None, secret_file: Path | None
) -> tuple[SecretStr | None, list[_Issue]]:
    """The AMI secret given inline or read from ``secret_file`` (one line; a leading UTF-8
    byte order mark dropped), without the blanks at its ends (the file's line end too), or
    the rules broken; no rule quotes the secret or the file's content.

    Blanks at the ends go because Asterisk drops them from manager.conf's ``secret =``: a
    secret that kept one could never log in.  Blanks inside are kept."""
    if (secret is None) == (secret_file is None):
        return None, [(("secret",), "give exactly one of secret and secret_file")]
    where = "secret"
    if secret_file is not None:
        where = "secret_file"
        if str(secret_file).startswith("~"):
            return None, [((where,), _TILDE_RULE)]
        try:
            text, broken = _read_secret_file(secret_file)
        except (OSError, UnicodeDecodeError) as exc:
            return None, [((where,), f"cannot read {str(secret_file)!r}: {type(exc).__name__}")]
        if broken is not None:
            return None, [((where,), f"{str(secret_file)!r} {broken}")]
        secret = SecretStr(text)
    assert secret is not None
    secret = SecretStr(secret.get_secret_value().strip(_ASTERISK_BLANKS))
    if not re.fullmatch(_AMI_VALUE, secret.get_secret_value()):
        return None, [((where,), "the secret must be 1-200 characters without control characters")]
    return secret, []


#: The most bytes a ``secret_file`` may hold: a secret is at most 200 characters (up to
#: 800 bytes of UTF-8), with room for a byte order mark and line ends.
MAX_SECRET_FILE_BYTES = 4096


def _read_secret_file(path: Path) -> tuple[str, str | None]:
    """The text of ``path`` (a leading UTF-8 byte order mark dropped) and None, or ``""``
    and why it is refused: not a regular file, or larger than
    :data:`MAX_SECRET_FILE_BYTES`.  Raises :class:`OSError` or :class:`UnicodeDecodeError`
    when it cannot be read.

    Opened without blocking and judged by the open descriptor: a named pipe would wait
    for a writer at ``open``, and a device (``/dev/zero``) be read forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "", "is not a regular file"
        data = b""
        # A read may return less than asked for (a network file system): read to the end,
        # or one byte past the cap.
        while len(data) <= MAX_SECRET_FILE_BYTES:
            chunk = os.read(fd, MAX_SECRET_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE_BYTES:
        return "", f"is larger than {MAX_SECRET_FILE_BYTES} bytes"
    return data.decode("utf-8-sig"), None


def secret_file_problem(path: Path) -> str | None:
    """Why the AMI ``secret_file`` at ``path`` is too open, as ssh judges a private key
    (others may read it, or group or others may write it), with the chmod that fixes it;
    None when it is not.  Raises :class:`OSError` when the file cannot be looked at.

    Not a load error: a file that worked before an upgrade keeps working; ``check``
    fails it and the daemon warns at start."""
    mode = path.stat().st_mode
    if mode & 0o022:
        broken = "is writable by group or others"
    elif mode & 0o004:
        broken = "is readable by others"
    else:
        return None
    return f"secret_file {path} {broken}: chmod 600 (or 640 with a group)"


def config_file_problem(path: Path) -> str | None:
    """Why the config file at ``path`` is too open: others may read it and it holds a
    secret itself (an ``[[asterisk]]`` entry's ``secret``, a password in ``store.url`` or
    ``target.url``), named by its key, never its value; None when it is not so.  Raises
    :class:`OSError` when the file cannot be looked at.

    Not a load error, as for ``secret_file``: ``check`` fails it."""
    if not path.stat().st_mode & 0o004:
        return None
    data, problem = _read_file(path)
    holds = [] if problem is None else [f"what it held when read ({problem.rule})"]
    secrets, urls = _secrets_in(data)
    holds += secrets + [f"the password of {url}" for url in urls]
    if not holds:
        return None
    return (
        f"{path} is readable by others and holds {', '.join(holds)}: chmod 640 it (or 600), "
        "or move the secret out of it (secret_file, the environment)"
    )


def command_line_secrets(sets: Sequence[str]) -> list[str]:
    """The keys of the ``--set`` flags (``--store-url`` is one) that give a secret: an
    ``[[asterisk]]`` entry's ``secret`` (by its own key, or in the whole list or entry as
    JSON) or a password in ``store.url`` or ``target.url``; never a value.  A command line
    is read by every local user (``ps``, ``/proc/PID/cmdline``) and stays in a unit file
    or a shell's history, where a ``secret_file`` or the environment does not show it."""
    tree, _unread = parse_sets(sets)
    secrets, urls = _secrets_in(tree)
    return secrets + urls


def _secrets_in(tree: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The keys in a raw (not yet validated) config ``tree`` that give a secret: the
    ``asterisk.N.secret`` keys of the entries that have one (``asterisk`` as a list of
    entries, or as a table by index, as ``--set`` flags make it), and the
    ``store.url`` / ``target.url`` keys whose URL gives a password."""
    servers = tree.get("asterisk")
    entries: Iterable[tuple[Any, Any]] = ()
    if isinstance(servers, list):
        entries = enumerate(servers)
    elif isinstance(servers, Mapping):
        entries = servers.items()
    secrets = [
        f"asterisk.{index}.secret"
        for index, server in entries
        if isinstance(server, Mapping) and server.get("secret")
    ]
    urls: list[str] = []
    for section in ("store", "target"):
        table = tree.get(section)
        url = table.get("url") if isinstance(table, Mapping) else None
        if isinstance(url, str) and url and _may_hold_password(url):
            urls.append(f"{section}.url")
    return secrets, urls


def _may_hold_password(url: str) -> bool:
    """Whether the database ``url`` gives a password (one that does not parse may: an
    unescaped ``@`` in its password is one reason not to)."""
    try:
        return any(_passwords(make_url(url)))
    except (ArgumentError, ValueError):
        return True


#: The object kinds a sorcery memory cache can front (``<kind>/cache`` in sorcery.conf).
CACHE_KINDS = ("endpoint", "auth", "aor")
_CACHE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def caches_by_kind(value: object) -> dict[str, tuple[str, ...]]:
    """``sorcery_caches`` as kind -> distinct cache names, kinds without a cache left out:
    a list (or tuple) names caches that front every kind, a table maps each kind to a
    name or a list of names.  Raises :class:`ValueError` naming every bad kind and name."""
    if isinstance(value, list | tuple):
        names, problems = _names_in(value, "")
        by_kind = dict.fromkeys(CACHE_KINDS, names)
    elif isinstance(value, Mapping):
        by_kind, problems = _cache_table(value)
    else:
        by_kind, problems = {}, ["must be a list of cache names or a table of them by kind"]
    if problems:
        raise ValueError("; ".join(problems))
    return {kind: names for kind, names in by_kind.items() if names}


def _cache_table(table: Mapping[object, object]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """A ``sorcery_caches`` table as kind -> cache names, and every problem found."""
    by_kind: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for kind, entry in table.items():
        if kind not in CACHE_KINDS:
            problems.append(f"{kind!r} is not a kind a cache fronts ({', '.join(CACHE_KINDS)})")
        names, bad = _names_in([entry] if isinstance(entry, str) else entry, f" ({kind})")
        by_kind[str(kind)] = names
        problems += bad
    return by_kind, problems


def _names_in(entry: object, where: str) -> tuple[tuple[str, ...], list[str]]:
    """The distinct cache names of the list ``entry``, and a problem for each bad one
    (``where`` follows the name in it, naming its kind)."""
    if not isinstance(entry, list | tuple):
        return (), [f"caches{where} must be a cache name or a list of them"]
    problems = [
        f"cache name {name!r}{where} must be 1-64 letters, digits, '_.-'"
        for name in entry
        if not (isinstance(name, str) and _CACHE_NAME.fullmatch(name))
    ]
    return tuple(dict.fromkeys(n for n in entry if isinstance(n, str))), problems


def cache_names(by_kind: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Every distinct cache name of ``by_kind`` (kind -> names), in order."""
    return tuple(dict.fromkeys(name for names in by_kind.values() for name in names))


#: The shortest ``[[asterisk]]`` ``timeout``: Asterisk answers a wrong secret after
#: 1 s, on top of the connect and the banner.
MIN_LOGIN_TIMEOUT = 2.0


class AsteriskServer(_Section):
    """One Asterisk reached over AMI (TOML ``[[asterisk]]``).

    Exactly one of ``secret`` and ``secret_file`` is given; the file is read once,
    here, at start-up (one line; blanks at the ends, as Asterisk drops them from
    manager.conf, and the line end dropped) and the secret is only
    ever held as a :class:`~pydantic.SecretStr`, so no repr or log shows it.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    host: str = Field(pattern=r"^[A-Za-z0-9_.:\[\]-]{1,253}$")
    port: int = Field(default=5038, ge=1, le=65535)
    username: str = Field(pattern=_AMI_VALUE)
    secret: SecretStr | None = None
    secret_file: Path | None = None
    #: Seconds allowed to connect, read the banner and log in; at least
    #: ``MIN_LOGIN_TIMEOUT``: Asterisk refuses a wrong secret only after a deliberate
    #: 1 s delay, and a login timed out before that took the short connect-failure
    #: backoff, not ``login_failure_backoff``.
    timeout: float = Field(default=5.0, ge=MIN_LOGIN_TIMEOUT, le=300)
    #: Event classes asked for at login; Asterisk grants at most the user's ``read``.
    events: str = Field(default="system,call,security", pattern=r"^[a-z,]{1,200}$")
    #: How the login proves the secret: ``md5`` answers Asterisk's MD5 challenge, so the
    #: secret never goes on the wire (AMI is plain TCP); ``plain`` sends it as ``Secret``
    #: (the form of ``../shared/asterisk``'s recorded login), only for a manager or an AMI
    #: proxy in front of it that does not offer challenges.
    login: Literal["md5", "plain"] = "md5"
    #: The sorcery memory caches (``name=`` in sorcery.conf) in front of the realtime
    #: tables, as kind -> cache names: TOML gives a table (``{endpoint = "ep_cache",
    #: aor = ["aor_cache"]}``; a kind left out has no cache) or a list of names, each
    #: then fronting every kind.  A changed object is expired from its kind's caches.
    sorcery_caches: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    _caches = field_validator("sorcery_caches", mode="before")(caches_by_kind)

    @field_validator("host")
    @classmethod
    def _connectable(cls, value: str) -> str:
        """A name or an address as a connect takes it: an IPv6 address without brackets,
        and no ``:port`` (``port`` is its own key); either would never resolve."""
        if ":" in value or "[" in value or "]" in value:
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                raise ValueError(
                    "must be a host name or an IP address (IPv6 without brackets), with no "
                    "':port' (port is a key of its own)"
                ) from None
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _one_secret(
        cls, data: Any, handler: ModelWrapValidatorHandler[AsteriskServer]
    ) -> AsteriskServer:
        """Exactly one of ``secret`` and ``secret_file``, read and checked even when other
        fields fail, so one error lists every problem of the entry."""
        given = _valid_inputs(cls, data, ("secret", "secret_file"))
        if given is None:  # not a table, or a secret field's own error says what is wrong
            return handler(data)
        secret, issues = _read_secret(given["secret"], given["secret_file"])
        if secret is not None:
            data = {**data, "secret": secret}
        return _validated(data, handler, issues)


class AmiSettings(_Section):
    """Timing and size knobs of the AMI layer (TOML ``[ami]``), all in seconds or bytes."""

    #: Reconnect delay: ``min(backoff_cap, backoff_base * 2**attempt)``, with jitter.
    backoff_base: float = Field(default=0.5, gt=0, le=60)
    backoff_cap: float = Field(default=30.0, gt=0, le=3600)
    #: Delay after ``Authentication failed``: much longer, a wrong secret stays wrong.
    login_failure_backoff: float = Field(default=120.0, gt=0, le=86400)
    #: A ``Ping`` every so often; no answer within ``ping_timeout`` drops the connection.
    ping_interval: float = Field(default=10.0, gt=0, le=86400)
    ping_timeout: float = Field(default=5.0, gt=0, le=600)
    #: Default time an action may take before its caller gets an error.
    action_timeout: float = Field(default=10.0, gt=0, le=3600)
    #: A res_pjsip reload took 95 s with 50,000 endpoints in the lab.
    reload_timeout: float = Field(default=600.0, gt=0, le=86400)
    #: ``A reload is in progress``: retried this many times, ``reload_retry_delay`` doubling.
    reload_retries: int = Field(default=5, ge=0, le=100)
    reload_retry_delay: float = Field(default=2.0, gt=0, le=3600)
    #: Gap between two reloads: ``max(reload_min_gap, reload_gap_factor * last reload's time)``.
    #: The factor spares a slow Asterisk; the minimum only caps quick reloads at two a
    #: second, and stays under 1 s so that an edit right after a reload is live within 1 s.
    reload_min_gap: float = Field(default=0.5, ge=0, le=86400)
    reload_gap_factor: float = Field(default=2.0, ge=0, le=100)
    #: A peer line, message or message's header count past these drops the connection
    #: (``ami.protocol_error``).  The defaults are ``provisioner.ami.actions``'
    #: ``MAX_LINE_BYTES``, ``MAX_MESSAGE_BYTES`` and ``MAX_HEADERS`` (why: there; not
    #: imported, as that package imports this module); the upper bounds keep memory
    #: bounded whatever the configuration says.
    max_line_bytes: int = Field(default=65536, ge=1024, le=16 << 20)
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    max_headers: int = Field(default=4096, ge=128, le=65536)
    #: One list action's answer (``PJSIPShowContacts``) is kept whole until its end: at
    #: most this many events and this many bytes (as ``max_message_bytes`` counts them)
    #: of events; past either, the action fails (``ami.protocol_error``), the session
    #: stays.  A real ``ContactList`` event is about 520 bytes (100,000 contacts: 52 MB,
    #: 2.5 times under the default) and some 8 times that as Python objects.
    max_list_events: int = Field(default=1_000_000, ge=1, le=10_000_000)
    max_list_bytes: int = Field(default=128 << 20, ge=64 << 10, le=1 << 30)


class DaemonSettings(_Section):
    """The long-running service (TOML ``[daemon]``); times in seconds."""

    #: An edit arriving while the daemon is idle is applied at once.  Edits that arrive
    #: while an apply runs make a burst: it is applied once no new edit came for
    #: ``quiet`` seconds, or ``max_wait`` after the apply ended at the latest.
    quiet: float = Field(default=0.05, ge=0, le=10)
    max_wait: float = Field(default=0.5, gt=0, le=60)
    #: SQLite where inotify is missing (not Linux): how often the newest change id is
    #: read (Linux sleeps until the database files are written).
    sqlite_poll: float = Field(default=0.005, gt=0, le=5)
    #: A full reconcile every so often heals any drift (0: never).
    reconcile_interval: float = Field(default=300.0, ge=0, le=604800)
    #: MariaDB/MySQL have no notifications: the change table is polled this often (and
    #: PostgreSQL's, while its LISTEN connection is down).  A quarter second, so an edit
    #: there is live well within a second (at 1 s, the wait alone could take all of
    #: it); a poll that finds nothing new is one indexed read.
    poll_interval: float = Field(default=0.25, gt=0, le=60)
    #: How long a hole in the change ids may stay open before it counts as rolled back.
    cursor_grace: float = Field(default=30.0, gt=0, le=86400)
    #: SIGTERM: time to finish the apply in progress before tasks are cancelled.
    shutdown_timeout: float = Field(default=10.0, gt=0, le=600)
    #: An apply (a reconcile, an edit's, with its cursor save), or a registration write
    #: of the AMI side, running longer than this counts as stuck: the systemd watchdog
    #: is no longer fed (systemd restarts the daemon) and the health record says so.
    #: 0: never.
    stuck_after: float = Field(default=300.0, ge=0, le=86400)
    #: A sync removing more than this fraction of the provisioned users is refused.
    max_removal_fraction: float = Field(default=0.5, gt=0, le=1)
    #: Where the health record is written (``provisioner check`` reads it); never empty,
    #: which would quietly be the working directory.
    state_dir: str = Field(default="var", min_length=1)
    #: Prometheus metrics on 127.0.0.1:<port>; 0 disables them.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    _state_dir = field_validator("state_dir")(_no_tilde)


class Config(_Section):
    """The whole configuration, validated at once."""

    store: StoreSettings = StoreSettings()
    security: SecuritySettings = SecuritySettings()
    extensions: ExtensionSettings = ExtensionSettings()
    sip: SipSettings = SipSettings()
    target: TargetSettings = TargetSettings()
    log: LogSettings = LogSettings()
    ami: AmiSettings = AmiSettings()
    daemon: DaemonSettings = DaemonSettings()
    #: TOML ``[[asterisk]]``: every Asterisk to keep in step.
    asterisk: tuple[AsteriskServer, ...] = ()
    #: The file the settings came from, if any (not a TOML key).
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="wrap")
    @classmethod
    def _unique_servers(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        """Every ``[[asterisk]]`` has its own name: checked even when an entry fails."""
        entries = data.get("asterisk") if isinstance(data, Mapping) else None
        return _validated(data, handler, _name_clashes(entries))


def _entry_name(entry: object) -> object:
    """The name an ``[[asterisk]]`` entry (raw table or validated) gives, if any."""
    if isinstance(entry, AsteriskServer):
        return entry.name
    return entry.get("name") if isinstance(entry, Mapping) else None


def _name_clashes(entries: object) -> list[_Issue]:
    """Each ``[[asterisk]]`` entry whose name an earlier entry already took, case ignored:
    the name keys the store's rows (registrations, daemon_state), which MariaDB's default
    collation compares ignoring case."""
    if not isinstance(entries, list | tuple):
        return []
    first: dict[str, tuple[int, str]] = {}
    issues: list[_Issue] = []
    for index, name in enumerate(map(_entry_name, entries)):
        if not isinstance(name, str):
            continue
        if (taken := first.get(name.casefold())) is not None:
            where, spelt = taken
            rule = "every [[asterisk]] needs its own name (case ignored)"
            issues.append((("asterisk", index, "name"), f"{rule}: asterisk.{where} is {spelt!r}"))
        first.setdefault(name.casefold(), (index, name))
    return issues


#: Fields of :class:`Config` that are not settings a file, env or flag may set.
_NOT_SETTINGS = ("source",)


def _resolve_path(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """The file to read: ``path``, else ``$PROVISIONER_CONFIG``, else the system file
    unless it surely does not exist (one whose existence cannot be told, behind a
    directory this user may not search, is read, and its reading fails)."""
    if path:
        return Path(path)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    try:
        absent = not DEFAULT_CONFIG_PATH.exists()
    except OSError:  # EACCES: Path.exists() only swallows "no such file"
        absent = False
    return None if absent else DEFAULT_CONFIG_PATH


#: Where the values of the environment and ``--set`` came from, by key path (the variable's
#: name, or ``the command line``: ``--set`` or its shorthand ``--store-url``); a value of
#: the file or a default has none.
_Origins = dict[tuple[str, ...], str]


def _put(
    tree: dict[str, Any], keys: list[str], raw: str, origins: _Origins, origin: str
) -> str | None:
    """Set ``raw`` at ``keys`` in ``tree`` (noting ``origin`` for it in ``origins``), decoded
    as JSON when it starts with ``[``, ``{`` or ``"`` (a list, a table or a quoted string,
    from the environment or ``--set``); why it is not JSON, else None (the error names a
    position, never the value)."""
    if not raw.startswith(("[", "{", '"')):
        _set_path(tree, keys, raw)
        _note_origin(origins, tuple(keys), raw, origin)
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return str(exc)
    _set_path(tree, keys, value)
    _note_origin(origins, tuple(keys), value, origin)
    return None


def _note_origin(origins: _Origins, path: tuple[str, ...], value: Any, origin: str) -> None:
    """Note that ``value`` at ``path`` came from ``origin``, as a later layer's value is
    merged over an earlier one: a table key by key, anything else replacing what was at
    ``path`` and below it."""
    origins.pop(path, None)
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _note_origin(origins, (*path, str(key)), item, origin)
        return
    for known in [p for p in origins if p[: len(path)] == path or path[: len(p)] == p]:
        del origins[known]
    origins[path] = origin


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``value`` at ``keys`` in ``tree``, making tables on the way; a list met on the
    way (given whole by an earlier flag or variable) is entered where the next key indexes
    one of its entries, else replaced by a table, as any other value is."""
    node: dict[str, Any] | list[Any] = tree
    for key, after in itertools.pairwise(keys):
        child = node[int(key)] if isinstance(node, list) else node.get(key)
        if isinstance(child, dict) or (isinstance(child, list) and _holds_index(child, after)):
            node = child
        else:
            table: dict[str, Any] = {}
            _store(node, key, table)
            node = table
    _store(node, keys[-1], value)


def _holds_index(node: list[Any], key: str) -> bool:
    """Whether the list ``node`` has an entry at index ``key``."""
    return key.isdigit() and int(key) < len(node)


def _store(node: dict[str, Any] | list[Any], key: str, value: Any) -> None:
    """``node[key] = value``, ``key`` an index when ``node`` is a list (one it holds)."""
    if isinstance(node, list):
        node[int(key)] = value
    else:
        node[key] = value


def _env_overrides(
    env: Mapping[str, str], origins: _Origins
) -> tuple[dict[str, Any], list[Problem]]:
    """``PROVISIONER_<SECTION>__<KEY>`` variables as nested overrides (``[``/``{``/``"``
    values decoded as JSON, others kept as strings; each value's variable noted in
    ``origins``), and the variables that cannot be read: a ``[``/``{``/``"`` value that is
    not JSON, named as a ``--set`` flag is, never its value.  Blanks around a value are
    dropped, as a ``--set`` flag's are (:func:`parse_sets`)."""
    tree: dict[str, Any] = {}
    problems = []
    # By name: problems in a stable order, and a whole table's variable before its keys'.
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_ACTOR):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        # Blanks around the value (an env file's " config", its CRLF line end) dropped as
        # --set drops them: a value that must keep them is given quoted, as JSON.
        if (unread := _put(tree, keys, raw.strip(), origins, name)) is not None:
            problems.append(Problem(name, f"the value is not valid JSON ({unread})"))
    return tree, problems


def _merge(
    base: dict[str, Any],
    top: Mapping[str, Any],
    problems: list[Problem],
    origins: _Origins,
    path: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``top`` merged over ``base``: a table key by key; a table whose keys are all list
    indexes (``asterisk.0.port`` from ``--set`` or ``PROVISIONER_ASTERISK__0__PORT``)
    into those entries of the list below it, each index past its end a problem in
    ``problems``; anything else replacing what was there."""
    out = dict(base)
    for key, value in top.items():
        here = (*path, str(key))
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, problems, origins, here)
        elif _indexes(value):
            out[key] = _merge_entries(out.get(key), value, problems, origins, here)
        else:
            out[key] = value
    return out


def _indexes(value: object) -> bool:
    """Whether ``value`` is a table keyed by list indexes only (no setting is named so)."""
    return isinstance(value, Mapping) and bool(value) and all(str(k).isdigit() for k in value)


def _merge_entries(
    base: object,
    top: Mapping[str, Any],
    problems: list[Problem],
    origins: _Origins,
    path: tuple[str, ...],
) -> list[Any]:
    """The list ``base`` with each entry ``top`` indexes merged over (a table key by key,
    else replaced); an index with no entry is a problem naming where it came from."""
    entries = list(base) if isinstance(base, list | tuple) else []
    for index, value in top.items():
        here = (*path, str(index))
        position = int(index)
        if position >= len(entries):
            rule = (
                f"there is no entry {position} to change (the list has {len(entries)}):"
                " give the whole list as JSON"
            )
            origin = _origin(origins, _first_origin(origins, here))
            problems.append(Problem(".".join(here), f"{rule} (from {origin})" if origin else rule))
            continue
        entry = entries[position]
        if isinstance(value, Mapping) and isinstance(entry, dict):
            entries[position] = _merge(entry, value, problems, origins, here)
        else:
            entries[position] = value
    return entries


def _first_origin(origins: _Origins, path: tuple[str, ...]) -> tuple[str, ...]:
    """The first noted key path under ``path`` (an index's keys: ``asterisk.3.port``), or
    ``path`` itself when none is."""
    return next((p for p in sorted(origins) if p[: len(path)] == path), path)


def _problems(exc: ValidationError, origins: _Origins) -> list[Problem]:
    """One problem per error, naming the variable or ``--set`` its value came from."""
    problems = []
    for err in exc.errors():
        path = tuple(str(part) for part in err["loc"])
        key = ".".join(path) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "is not a known setting"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        origin = _origin(origins, path) or _table_origin(origins, path, err["input"])
        msg = _shape_rule(err, origin) or msg
        if origin is not None:
            msg = f"{msg} (from {origin})"
        problems.append(Problem(key, msg))
    return problems


#: How a list and a table are written where a variable or ``--set`` gives them.
_AS_JSON = {"list": '["a", "b"]', "table": '{"key": "value"}'}


def _shape_rule(err: ErrorDetails, origin: str | None) -> str | None:
    """What a list or table key given something else must be, and how to write it (TOML's
    ``[[asterisk]]``, JSON in a variable or ``--set``), in place of pydantic's 'Input should
    be a valid tuple'; None for any other error."""
    want = {"tuple_type": "list", "list_type": "list", "dict_type": "table"}.get(err["type"])
    given = err["input"]
    if want is None:
        return None
    if want == "list" and isinstance(given, Mapping):
        if origin is not None:
            return "must be a list, not a table (as JSON: [...], each entry {...})"
        toml = " (in TOML, write each entry as [[asterisk]])" if err["loc"] == ("asterisk",) else ""
        return f"must be a list, not a table{toml}"
    if isinstance(given, str) and origin is not None:
        return f"must be a {want} (from the environment or --set, as JSON: {_AS_JSON[want]})"
    return f"must be a {want}"


def _table_origin(origins: _Origins, path: tuple[str, ...], value: object) -> str | None:
    """Where the table ``value`` at ``path`` came from when one variable or ``--set`` gave
    every key of it (its origin is noted key by key: a JSON table given where a list
    belongs); None when the file gave some, or several sources did."""
    if not isinstance(value, Mapping) or not value:
        return None
    found = {
        origin
        for key in value
        for noted, origin in origins.items()
        if noted[: len(path) + 1] == (*path, str(key))
    }
    covered = all(
        any(noted[: len(path) + 1] == (*path, str(key)) for noted in origins) for key in value
    )
    return found.pop() if covered and len(found) == 1 else None


def _origin(origins: _Origins, path: tuple[str, ...]) -> str | None:
    """Where the value at ``path`` came from: the origin of it or of the nearest table or
    list holding it; None for the file's values and defaults."""
    for end in range(len(path), 0, -1):
        if (origin := origins.get(path[:end])) is not None:
            return origin
    return None


#: A character no ``--set`` key has (sections and keys are words, a list index digits).
_NOT_IN_KEY = re.compile(r"[^\w.-]")


def parse_sets(
    sets: Sequence[str], origins: _Origins | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """``--set section.key=value`` flags as nested overrides (each noted in ``origins`` as
    ``the command line``), and the flags that cannot be read (not ``key=value``, a key with a
    character no key has, or a ``[``/``{``/``"`` value that is not JSON); other values stay
    strings, so ``key="value"`` (quotes no shell removed) is ``value``, as the environment
    reads it.  Blanks around the key and the value are dropped.
    A later flag wins; ``a=1`` then ``a.b=2`` makes ``a`` a table.  A problem shows a flag's
    key, never its value (it may hold a secret)."""
    origins = {} if origins is None else origins
    tree: dict[str, Any] = {}
    problems = []
    for item in sets:
        key, sep, value = item.partition("=")
        # Blanks around either side are dropped, as TOML drops them around ``=``: a value
        # that must keep them is given quoted, as JSON (``key=" x"``).
        key, value = key.strip(), value.strip()
        # Up to the first character no key has: a ':' typed for the '=' puts the value
        # (a URL's password) in the key.
        head = _NOT_IN_KEY.split(key, maxsplit=1)[0]
        shown = repr(head + ("…" if head != key else "") + ("=…" if sep else ""))
        parts = [p for p in key.split(".") if p]
        if not sep or not parts or head != key:
            problems.append(Problem("--set", f"{shown} must look like section.key=value"))
            continue
        if (unread := _put(tree, parts, value, origins, "the command line")) is not None:
            problems.append(Problem("--set", f"{shown}: the value is not valid JSON ({unread})"))
    return tree, problems


def _read_file(file: Path | None) -> tuple[dict[str, Any], Problem | None]:
    """The TOML file's tables (none without a file), or the problem that stops its reading;
    a UTF-8 byte order mark (some editors write one) is not part of the TOML."""
    if file is None:
        return {}, None
    try:
        return tomllib.loads(file.read_text(encoding="utf-8-sig")), None
    except FileNotFoundError:
        return {}, Problem("config", f"file {str(file)!r} does not exist")
    except OSError as exc:
        return {}, Problem("config", f"cannot read {str(file)!r}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        return {}, Problem("config", f"cannot read {str(file)!r}: {exc}")
    except tomllib.TOMLDecodeError as exc:
        return {}, Problem("config", f"{str(file)!r} is not valid TOML: {exc}")


def _validate(data: dict[str, Any], origins: _Origins) -> tuple[Config | None, list[Problem]]:
    """``data`` as a :class:`Config`, or None and every problem it has (naming where a
    value of the environment or ``--set`` came from, by ``origins``)."""
    # ``source`` is a field for bookkeeping only: as input it is an unknown key.
    problems = [Problem(key, "is not a known setting") for key in _NOT_SETTINGS if key in data]
    data = {k: v for k, v in data.items() if k not in _NOT_SETTINGS}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        return None, problems + _problems(exc, origins)
    return (None if problems else config), problems


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> Config:
    """Build the :class:`Config` from defaults, the TOML file, the environment, ``overrides``
    (nested dicts from command-line flags) and ``sets`` (raw ``--set`` flags), or raise
    :class:`ConfigError` listing every problem of them all (when the file cannot be read or
    parsed, or ``path`` is empty: that problem and the unreadable ``--set`` flags and
    variables; ``$PROVISIONER_CONFIG`` set but blank is such a problem too)."""
    env = os.environ if env is None else env
    file = _resolve_path(path, env)
    env_origins: _Origins = {}
    flag_origins: _Origins = {}
    flags, problems = parse_sets(sets, flag_origins)
    env_tree, env_problems = _env_overrides(env, env_origins)
    problems += env_problems
    data: dict[str, Any] = {}
    file_problem: Problem | None = None
    if path is not None and not str(path):  # named, as nothing: not "no --config" at all
        file_problem = Problem("config", "the file name is empty")
    elif path is None and ENV_CONFIG in env and not env[ENV_CONFIG].strip():
        # Set, to nothing (a unit's unexpanded variable): not "no PROVISIONER_CONFIG",
        # whose fall back to the defaults would run on a store and a target of their own.
        file_problem = Problem(
            ENV_CONFIG,
            f"is set but empty: name the file, or unset it to read {DEFAULT_CONFIG_PATH}"
            " (if it exists)",
        )
    else:
        data, file_problem = _read_file(file)
    if file_problem is not None:
        raise ConfigError([*problems, file_problem])
    # ``overrides`` come from a caller's own code: a value of theirs names no source (the
    # one before it, from the environment, no longer holds).
    origins = env_origins
    for key, value in (overrides or {}).items():
        _note_origin(origins, (key,), value, "")
    origins = {path: origin for path, origin in origins.items() if origin}
    for flag_path, origin in flag_origins.items():
        _note_origin(origins, flag_path, None, origin)
    merged: list[Problem] = []
    for layer in (env_tree, overrides or {}, flags):
        data = _merge(data, layer, merged, origins)
    config, invalid = _validate(data, origins)
    if problems or merged or config is None:
        raise ConfigError(problems + merged + invalid)
    return config.model_copy(update={"source": str(file) if file else None})
