"""The ``provisioner`` command line.

The only place that turns :class:`~provisioner.errors.ProvisionerError` into a
message on stderr and an exit code.  Commands parse options, call into
:mod:`provisioner.accounts` and friends, and print.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from . import csvio
from .accounts import Accounts, Policy, all_found
from .applier import USER_DETAIL
from .config import ENV_ACTOR, Config, command_line_secrets, display_url, load_config
from .early_signals import restore as restore_signals
from .errors import (
    ConfigError,
    ForbiddenError,
    InvalidInput,
    Problem,
    ProvisionerError,
    StoreUnavailable,
)
from .logs import configure as configure_logs
from .logs import get_logger
from .model import CODECS, LOG_LEVELS, NATS, ROLES, TOAST_POSITIONS, TRANSPORTS, VIDEOS, User
from .store.engine import driver_error, open_store_engine, store_named, transaction
from .store.untold import drop_untold, new_token, note_untold, untold_key
from .sync import SyncReport
from .visible import visible as _visible
from .visible import visible_lines as _visible_lines

if TYPE_CHECKING:
    from .importer import FileKind
    from .pjsip import Skipped

__all__ = ["main"]

log = get_logger(__name__)


class App:
    """What every command needs, built once from the config (the one ``from_config`` place)."""

    def __init__(
        self,
        config_path: str | None,
        sets: Sequence[str],
        verbose: bool,
        actor: str | None = None,
    ) -> None:
        self.config_path = config_path
        #: ``--set`` flags (with the shorthands), kept for the daemon's SIGHUP.
        self.sets = sets
        self._verbose = verbose
        #: ``--as``: the admin who acts (None: an operator trusted like a DBA).
        self.actor = actor
        self._config: Config | None = None
        self._accounts: Accounts | None = None
        #: True once the command said it makes the store (:meth:`creates_store`).
        self._creates_store = False

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path, sets=self.sets)
            configure_logs(
                self._config.log.level if self._verbose else "warning", self._config.log.format
            )
            if keys := command_line_secrets(self.sets):
                # Every local user reads a command line (ps): said at every run, the
                # daemon's start too, until the secret is moved.
                log.warning(
                    "config.secret_on_command_line",
                    keys=keys,
                    advice="every local user sees a command line (ps): give an AMI secret "
                    "as secret_file, a database password in the config file (chmod 640) "
                    "or the environment (PROVISIONER_STORE__URL)",
                )
        return self._config

    @property
    def accounts(self) -> Accounts:
        if self._accounts is None:
            cfg = self.config
            engine = open_store_engine(cfg.store.url, cfg.store, create=self._creates_store)
            self._accounts = Accounts(engine, Policy.from_config(cfg), actor=self.actor)
        return self._accounts

    def creates_store(self) -> None:
        """Say, before the store is first opened, that the command makes the store (``db
        upgrade``, ``quickstart``): a SQLite file that does not exist is then created, with
        its directories.  Every other command reads the store or writes tables only ``db
        upgrade`` makes, so a SQLite store whose file does not exist (a typo'd path) is
        refused with :class:`StoreUnavailable` naming the file, and neither it nor its
        directories are created (a stray empty store that a later ``db upgrade`` or daemon
        would use)."""
        self._creates_store = True


pass_app = click.make_pass_decorator(App)

#: A character no command name has.
_NOT_IN_NAME = re.compile(r"[^\w.-]")


class _Commands(click.Group):
    """The command group: an unknown command is named up to the first character no command
    name has, as it may be a value that lost its option (``--set store.url URL``)."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        head = _NOT_IN_NAME.split(name, maxsplit=1)[0]
        if head != name and not name.startswith("-") and self.get_command(ctx, name) is None:
            ctx.fail(f"No such command {head + '…'!r}.")
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    # Not click.Path(dir_okay=False): a directory is a file that cannot be read, which the
    # config reports (``check`` fails its config line) as it reports any.
    type=click.Path(),
    help="TOML config file (else $PROVISIONER_CONFIG, else /etc/provisioner/provisioner.toml).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config key (beats the file and the environment).",
)
@click.option("--store-url", help="Shorthand for --set store.url=URL.")
@click.option(
    "--as",
    "actor",
    metavar="USERNAME",
    envvar=ENV_ACTOR,
    help="Act as this admin (else $PROVISIONER_AS): it must be an existing, active admin, "
    "and only the first admin may change the first admin.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log events to stderr at the configured level.")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    sets: tuple[str, ...],
    store_url: str | None,
    actor: str | None,
    verbose: bool,
) -> None:
    """Turn contact-center users into live Asterisk PJSIP endpoints."""
    if ctx.invoked_subcommand != "run":
        # Only the daemon acts on the signals deferred at the start: the rest get them
        # as they would have.
        restore_signals()
    if actor is None:
        # Click drops an empty variable; a set one names an actor, and an empty name is
        # refused (as --as ''), not taken for none: that would run the command unchecked.
        actor = os.environ.get(ENV_ACTOR)
    # An empty --store-url is set, and refused: ignored, it would leave the default store.
    all_sets = [*sets, *([f"store.url={store_url}"] if store_url is not None else [])]
    ctx.obj = App(config_path, all_sets, verbose, actor)


# -- output helpers -------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    raise TypeError(type(value).__name__)


def _utc(value: datetime) -> datetime:
    """``value`` marked as UTC: the store keeps times in UTC without a zone, which a
    reader of the output would otherwise take for local time."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _shown_time(value: datetime) -> str:
    """A time for a table or a listing: to the second, marked UTC (as the store keeps it)."""
    return _utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_json_default, indent=2, sort_keys=False))


def _echo_json_list(items: Iterable[Any], chunk: int = 1000) -> None:
    """What :func:`_echo_json` writes for ``list(items)``, made and written ``chunk`` items
    at a time: a 100,000-user ``user list --json`` held every user's dict and the whole
    85 MB text at once (915 MB peak RSS)."""
    out: list[str] = []
    first = True
    for item in items:
        text = json.dumps(item, default=_json_default, indent=2, sort_keys=False)
        # An item of a list dumped with indent=2 is its own dump, each line indented 2.
        out.append(("[\n  " if first else ",\n  ") + text.replace("\n", "\n  "))
        first = False
        if len(out) >= chunk:
            click.echo("".join(out), nl=False)
            out.clear()
    out.append("[]" if first else "\n]")
    click.echo("".join(out))


def user_view(app: App, user: User) -> dict[str, Any]:
    """A user for display: no hashes, no digests, no avatar bytes."""
    data = asdict(user)
    for secret in ("sip_md5", "sip_sha256"):
        data.pop(secret)
    data["voice"]["codecs"] = ",".join(user.voice.codecs)
    data["attributes"] = dict(user.attributes)
    data["state"] = app.accounts.state(user)
    return data


def _table(rows: list[list[str]], header: list[str]) -> None:
    """``rows`` under ``header`` in aligned columns, each cell :func:`_visible`."""
    cells = [[_visible(str(c)) for c in row] for row in [header, *rows]]
    widths = [max(len(x) for x in col) for col in zip(*cells, strict=True)]
    # One write, not one per row: click.echo flushes each time, a system call per row
    # (a third of a 100,000-user listing's time went to them).
    click.echo(
        "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        )
    )


# -- db ---------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The user store's schema."""


@db.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create the schema, or migrate it to the newest version."""
    from .store.migrate import upgrade

    app.creates_store()
    before, after = upgrade(app.accounts.engine)
    log.info("db.upgraded", before=before, after=after)
    click.echo(f"store at revision {after}" + ("" if before == after else f" (was {before})"))


@db.command("repair")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@pass_app
def db_repair(app: App, dry_run: bool) -> None:
    """Re-create the store's lost triggers (missing, disabled, a PostgreSQL change-feed
    one left at plain ENABLE, or whose MariaDB/MySQL definer is gone) as 'db upgrade'
    made them, as the connecting account; one
    transaction on PostgreSQL and SQLite.  Running it again does nothing."""
    from .store.migrate import current_revision, head_revision
    from .store.repair import apply_repair, plan_repair

    engine = app.accounts.engine
    revision = current_revision(engine)
    if revision != head_revision():
        raise StoreUnavailable(
            f"schema at {revision or 'none'}, expected {head_revision()}: "
            "run 'provisioner db upgrade' (it makes the triggers too)"
        )
    with engine.begin() as conn:
        fixes = plan_repair(conn)
        if not dry_run:
            apply_repair(conn, fixes)
    verb = "would re-create" if dry_run else "re-created"
    for fix in fixes:
        click.echo(f"{verb} {fix.trigger} ({fix.problem})")
        if dry_run:
            for statement in fix.statements:
                click.echo(f"  {statement.splitlines()[0]}")
    if not fixes:
        click.echo("no trigger lost: nothing to do")
    elif not dry_run:
        log.info("db.triggers_repaired", triggers=[f.trigger for f in fixes])


@db.command("ddl")
@click.option("--dialect", type=click.Choice(["sqlite", "postgresql", "mysql"]), required=True)
def db_ddl(dialect: str) -> None:
    """Print the store's DDL for one database (what sql/store/ holds)."""
    from .store.ddl import store_ddl

    click.echo(store_ddl(dialect), nl=False)


# -- profiles -----------------------------------------------------------------------


@cli.group()
def profile() -> None:
    """User profiles."""


@profile.command("add")
@click.argument("name")
@click.option("--description", default="")
@pass_app
def profile_add(app: App, name: str, description: str) -> None:
    """Add a user profile."""
    p = app.accounts.add_profile(name, description)
    log.info("profile.added", profile=p.name)
    click.echo(f"added profile {p.name}")


@profile.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def profile_list(app: App, as_json: bool) -> None:
    """List user profiles."""
    found = app.accounts.list_profiles()
    if as_json:
        _echo_json([asdict(p) for p in found])
    else:
        _table([[p.name, p.description] for p in found], ["NAME", "DESCRIPTION"])


# -- users ----------------------------------------------------------------------------


def _user_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``user add`` and ``user edit`` share."""
    options = [
        click.option("--full-name"),
        click.option("--email"),
        click.option("--profile"),
        click.option(
            "--password",
            help="Login password ('-' reads it from stdin). Prefer 'user passwd': "
            "a password on the command line is visible to other local users.",
        ),
        click.option("--extension"),
        click.option("--sip-secret", help="SIP secret ('-' reads it from stdin); else generated."),
        click.option("--transport", type=click.Choice(TRANSPORTS, case_sensitive=False)),
        click.option("--nat", type=click.Choice(NATS, case_sensitive=False)),
        click.option("--codecs", help="Ordered comma list of " + ", ".join(CODECS) + "."),
        click.option("--context"),
        click.option("--call-group"),
        click.option("--pickup-group"),
        click.option("--video", type=click.Choice(VIDEOS, case_sensitive=False)),
        click.option("--description"),
        click.option("--log-level", type=click.Choice([*LOG_LEVELS, "off"], case_sensitive=False)),
        click.option("--messenger-sound", type=click.Choice(["on", "off"], case_sensitive=False)),
        click.option("--toast-position", type=click.Choice(TOAST_POSITIONS, case_sensitive=False)),
        click.option("--avatar", type=click.Path(dir_okay=False, exists=True, path_type=Path)),
        click.option(
            "--attr",
            "attrs",
            multiple=True,
            metavar="KEY=VALUE",
            help="Custom attribute; repeatable. KEY= (empty) sets none; on edit it removes KEY.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _read_avatar(path: Path) -> bytes:
    from .model import AVATAR_MAX_BYTES

    with path.open("rb") as fh:
        data = fh.read(AVATAR_MAX_BYTES + 1)
    return data


def _stdin_line() -> str:
    """One line of stdin without its line end, read in stdin's encoding (the locale's, as
    a prompt reads it).  A byte that is not in it (``ö`` sent as Latin-1 to a UTF-8
    locale) is kept as Python's escape of it, for the field's rule to refuse or a login to
    find wrong: stdin's text layer is strict under a UTF-8 locale (a traceback)."""
    line = sys.stdin.buffer.readline().decode(sys.stdin.encoding or "utf-8", "surrogateescape")
    return line.rstrip("\r\n")


def _stdin_secret(value: str | None, name: str) -> str | None:
    """``value``, or for ``-`` the secret read from stdin: one line when stdin is a pipe,
    asked for as ``name`` with the echo off and confirmed when it is a terminal (typed
    there, the line would show on the screen and stay in its scrollback)."""
    if value != "-":
        return value
    if sys.stdin.isatty():
        return str(click.prompt(name, hide_input=True, confirmation_prompt=True))
    return _stdin_line()


def _parse_attrs(attrs: Sequence[str]) -> dict[str, str]:
    """The ``--attr KEY=VALUE`` flags as a dict; an item without ``=`` or a key given twice
    is refused (field ``attr``): which of two values was meant cannot be guessed."""
    out: dict[str, str] = {}
    for item in attrs:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput.one("attr", f"{item!r} must look like KEY=VALUE")
        if key in out:
            raise InvalidInput.one("attr", f"key {key!r} given twice")
        out[key] = value
    return out


def _field_values(opts: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in opts.items() if v is not None and k not in ("attrs", "avatar")}
    for secret, name in (("password", "Password"), ("sip_secret", "SIP secret")):
        if secret in values:
            values[secret] = _stdin_secret(values[secret], name)
    if opts.get("avatar") is not None:
        values["avatar"] = _read_avatar(opts["avatar"])
    return values


@cli.group()
def user() -> None:
    """Users: add, edit, list, and their state."""


@user.command("add")
@click.argument("username")
@click.option(
    "--role", type=click.Choice(ROLES, case_sensitive=False), default="user", show_default=True
)
@_user_options
@pass_app
def user_add(app: App, /, username: str, role: str, **opts: Any) -> None:
    """Add a user; the extension is the lowest free one of the range unless given."""
    values = _field_values(opts)
    values.update(username=username, role=role)
    if opts["attrs"]:
        values["attributes"] = _parse_attrs(opts["attrs"])
    created = app.accounts.add_user(values)
    log.info("user.added", username=created.user.username, extension=created.user.extension)
    click.echo(
        f"added {created.user.username} (id {created.user.id}, extension {created.user.extension})"
    )
    if created.sip_secret:
        click.echo(f"SIP secret (shown once): {created.sip_secret}")


@user.command("edit")
@click.argument("username")
@_user_options
@pass_app
def user_edit(app: App, /, username: str, **opts: Any) -> None:
    """Change any field but role and username."""
    values = _field_values(opts)
    # Merged with the stored attributes in the edit's transaction (a read here, then a
    # write in another transaction, would lose a concurrent edit of other attributes).
    changes = _parse_attrs(opts["attrs"]) if opts["attrs"] else None
    if not values and changes is None:
        raise InvalidInput.one("options", "name at least one field to change")
    edited = app.accounts.edit_user(username, values, attribute_changes=changes)
    fields = sorted([*values, *(["attributes"] if changes is not None else [])])
    # As the bulk commands and the import say: a user already so was not written.
    log.info("user.edited", username=edited.user.username, fields=fields, changed=edited.changed)
    click.echo(f"{'updated' if edited.changed else 'unchanged'}: {edited.user.username}")


@user.command("show")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def user_show(app: App, username: str, as_json: bool) -> None:
    """Show one user (never a secret)."""
    from .store.registrations import user_problems

    found = app.accounts.get_user(username)
    data = user_view(app, found)
    with app.accounts.transaction() as conn:
        # What the check after an apply found: an endpoint Asterisk does not hold.
        data["registration_problems"] = user_problems(conn, found.id)
    if as_json:
        _echo_json(data)
        return
    voice = data.pop("voice")
    attrs = data.pop("attributes")
    problems = data.pop("registration_problems")
    for key, value in [*data.items(), *voice.items()]:
        shown = _shown_time(value) if isinstance(value, datetime) else value
        click.echo(f"{key:24} {'' if shown is None else _visible(str(shown))}")
    for key, value in attrs.items():
        click.echo(_visible(f"{'attr:' + key:24} {value}"))
    for server, problem in problems.items():
        click.echo(_visible(f"{'problem:' + server:24} {problem}"))


@user.command("list")
@click.option("--deleted", is_flag=True, help="List deleted members instead.")
@click.option("--role", type=click.Choice(ROLES, case_sensitive=False))
@click.option("--profile")
@click.option("--state", type=click.Choice(["active", "disabled", "locked"]))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def user_list(
    app: App,
    deleted: bool,
    role: str | None,
    profile: str | None,
    state: str | None,
    as_json: bool,
) -> None:
    """List users."""
    found = app.accounts.list_users(deleted=deleted, role=role, profile=profile, state=state)
    if as_json:
        _echo_json_list(user_view(app, u) for u in found)
        return
    rows = [
        [
            str(u.id),
            u.username,
            u.role,
            u.profile or "",
            u.extension,
            app.accounts.state(u),
            u.full_name,
        ]
        for u in found
    ]
    _table(rows, ["ID", "USERNAME", "ROLE", "PROFILE", "EXTENSION", "STATE", "FULL NAME"])


def _bulk_command(name: str, doc: str) -> None:
    @user.command(name, help=doc)
    @click.argument("usernames", nargs=-1, required=True)
    @pass_app
    def command(app: App, usernames: tuple[str, ...]) -> None:
        result = getattr(app.accounts, name)(list(usernames))
        log.info(f"user.{name}", usernames=result.done, unchanged=result.unchanged)
        # Those already in the state asked for are named apart: nothing was done to them.
        if result.done:
            click.echo(f"{name}: " + ", ".join(result.done))
        if result.unchanged:
            click.echo("unchanged: " + ", ".join(result.unchanged))


_bulk_command("disable", "Disable users (reversible); all or none.")
_bulk_command("enable", "Enable disabled users; all or none.")
_bulk_command("unlock", "Unlock users locked after failed logins; all or none.")
_bulk_command("delete", "Move users to deleted members (restorable); all or none.")
_bulk_command("restore", "Bring deleted members back; all or none.")
_bulk_command("purge", "Remove deleted members for good; all or none.")


def _read_new_password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("New password", hide_input=True, confirmation_prompt=True))
    return _stdin_line()


@user.command("passwd")
@click.argument("username")
@pass_app
def user_passwd(app: App, username: str) -> None:
    """Set a user's login password (prompted, or one line on stdin)."""
    # Refused before the prompt: nobody types a new password twice for a mistyped name.
    app.accounts.check_password_settable(username)
    app.accounts.set_password(username, _read_new_password())
    log.info("user.password_set", username=username)
    click.echo(f"password set for {username}")


@user.command("sip-secret")
@click.argument("username")
@click.option("--rotate", is_flag=True, required=True, help="Replace the SIP secret.")
@click.option("--secret", help="Use this secret ('-' reads stdin) instead of generating one.")
@pass_app
def user_sip_secret(app: App, username: str, rotate: bool, secret: str | None) -> None:
    """Rotate a user's SIP secret; the new one is shown once."""
    given = _stdin_secret(secret, "SIP secret")
    new = app.accounts.rotate_sip_secret(username, given)
    log.info("user.sip_secret_rotated", username=username)
    click.echo(f"SIP secret rotated for {username}")
    if given is None:
        click.echo(f"SIP secret (shown once): {new}")


@user.command("apikey")
@click.argument("username")
@click.argument("action", type=click.Choice(["generate", "remove"]))
@pass_app
def user_apikey(app: App, username: str, action: str) -> None:
    """Generate (shown once; replaces any old key) or remove a user's API key."""
    if action == "generate":
        key = app.accounts.generate_apikey(username)
        log.info("user.apikey_generated", username=username)
        click.echo(f"API key (shown once): {key}")
    else:
        app.accounts.remove_apikey(username)
        log.info("user.apikey_removed", username=username)
        click.echo(f"API key removed for {username}")


@user.command("export")
@click.option(
    "--csv", "csv_path", required=True, type=click.Path(dir_okay=False), help="'-' for stdout."
)
@click.argument("usernames", nargs=-1)
@pass_app
def user_export(app: App, csv_path: str, usernames: tuple[str, ...]) -> None:
    """Export users (all live ones, or those named) to CSV; no secrets."""
    if usernames:
        # A user named twice (in any case) is one row: a repeated row would not re-import.
        # By id, as a full export: the first admin comes first, as an empty store needs.
        # Every missing name is refused before the file is opened: no partial file.
        found = app.accounts.get_users(usernames)
        deleted = [u.username for u in found if u.deleted_at is not None]
        if deleted:
            # An export re-imports as is; a deleted member's row would be refused.
            raise ForbiddenError(
                [
                    Problem("username", f"{name} is in deleted members; restore it first")
                    for name in deleted
                ]
            )
    else:
        found = app.accounts.list_users()
    with _open_out(csv_path) as out:
        count = csvio.export_users(found, out)
    if csv_path != "-":
        click.echo(f"exported {count} users to {csv_path}")


#: How a CSV export writes what UTF-8 cannot encode: only the escape of a byte that was not
#: text where it was read (U+DC80 to U+DCFF), shown as ``\udce9``.
_NOT_UTF8 = "backslashreplace"


@contextmanager
def _open_out(path: str) -> Iterator[TextIO]:
    """``path`` opened for writing, UTF-8 (``-``: stdout, flushed at the end); a file or stdout
    that cannot be made or written (a missing directory, no permission, a full disk) is
    invalid input naming ``--csv``.  A byte that was not UTF-8 in the store (another
    application's Latin-1, read as its escape) is written as the text ``\udce9``, not a
    traceback half-way through the file."""
    try:
        if path == "-" and sys.stdout.isatty():
            # Shown on a terminal, not saved: a full name another writer stored with an
            # escape sequence is escaped, as every listing escapes it (piped, the CSV
            # keeps the exact text a re-import needs).
            shown = io.StringIO()
            yield shown
            click.echo(_visible_lines(shown.getvalue()), nl=False)
            return
        if path == "-":
            with _utf8_stdout() as out:
                yield out
            return
        with _whole_file(path) as fh:
            yield fh
    except OSError as exc:
        raise InvalidInput.one("--csv", f"cannot write {path!r}: {exc.strerror or exc}") from None


@contextmanager
def _whole_file(path: str) -> Iterator[TextIO]:
    """``path`` opened for writing UTF-8 text, which it holds only once all of it is written:
    the text goes to a file beside it, renamed over it at the end (keeping an existing
    file's mode), so a write that fails (a full disk) leaves the file as it was, never cut
    short.  A path that is no regular file (``/dev/stdout``, a FIFO) is written as is."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        with open(path, "w", encoding="utf-8", errors=_NOT_UTF8, newline="") as fh:
            yield fh
        return
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(part, "x", encoding="utf-8", errors=_NOT_UTF8, newline="") as fh:
            yield fh
        if target.exists():
            shutil.copymode(target, part)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


@contextmanager
def _utf8_stdout() -> Iterator[TextIO]:
    """stdout as UTF-8 text whatever the locale, flushed at the end: what a CSV file is
    written in and every import reads, so ``--csv - > users.csv`` under a Latin-1 terminal
    re-imports too (its own encoding would make bytes no import reads, or fail on a name
    it cannot encode)."""
    sys.stdout.flush()
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors=_NOT_UTF8, newline="")
    try:
        yield out
        out.flush()
    finally:
        # stdout's own buffer stays open for whatever the command prints next.
        out.detach()


def _csv_text(raw: bytes, csv_path: str) -> str:
    """A CSV file's text: UTF-8, with or without the byte-order mark Excel writes.  A file
    that is not (Excel's plain "CSV" is in Windows' charset) is refused on the line of its
    first byte that is not UTF-8, naming that byte, not its offset in the file."""
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        rule = (
            f"cannot read {csv_path!r}: not UTF-8 (byte 0x{body[exc.start]:02X}); "
            'save it as "CSV UTF-8"'
        )
        raise InvalidInput([Problem("--csv", rule, line)]) from None


@user.command("import")
@click.option(
    "--csv", "csv_path", required=True, type=click.Path(dir_okay=False), help="'-' for stdin."
)
@click.option("--dry-run", is_flag=True, help="Check every row, change nothing.")
@pass_app
def user_import(app: App, csv_path: str, dry_run: bool) -> None:
    """Add or update users from CSV: every row valid, or nothing changes."""
    try:
        # stdin as bytes too: its text layer is strict under a UTF-8 locale (a traceback).
        raw = sys.stdin.buffer.read() if csv_path == "-" else Path(csv_path).read_bytes()
    except OSError as exc:
        raise InvalidInput.one("--csv", f"cannot read {csv_path!r}: {exc}") from None
    text = _csv_text(raw, csv_path)
    total = max(text.count("\n") - 1, 0)
    if sys.stderr.isatty() and total > 100:
        with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
            last = [0]

            def step(done: int) -> None:
                bar.update(done - last[0])
                last[0] = done

            result = csvio.import_users(app.accounts, text, dry_run=dry_run, progress=step)
    else:
        result = csvio.import_users(app.accounts, text, dry_run=dry_run)
    log.info(
        "user.imported",
        added=len(result.added),
        updated=len(result.updated),
        unchanged=len(result.unchanged),
        dry_run=dry_run,
    )
    prefix = "would add" if dry_run else "added"
    click.echo(
        f"{prefix} {len(result.added)}, "
        f"{'would update' if dry_run else 'updated'} {len(result.updated)}, "
        f"unchanged {len(result.unchanged)}"
    )
    for name, secret in result.generated_secrets.items():
        click.echo(f"SIP secret for {name} (shown once): {secret}")


# -- auth -------------------------------------------------------------------------------


@cli.group()
def auth() -> None:
    """The platform's login check."""


@auth.command("login")
@click.argument("username")
@pass_app
def auth_login(app: App, username: str) -> None:
    """Verify a password (prompt, or one line on stdin); lock after too many failures."""
    if sys.stdin.isatty():
        password = str(click.prompt("Password", hide_input=True))
    else:
        password = _stdin_line()
    found = app.accounts.login(username, password)
    log.info("auth.login", username=found.username)
    click.echo(_visible(f"welcome, {found.full_name}"))


# -- rendering and syncing ------------------------------------------------------------------


def _print_report(report: SyncReport) -> None:
    change = report.change
    verb = "would be " if report.dry_run else ""
    click.echo(
        f"{verb}added {len(change.added)}, {verb}updated {len(change.updated)}, "
        f"{verb}removed {len(change.removed)}, unchanged {change.unchanged}, "
        f"skipped {len(report.skipped)} ({report.took_ms:.0f} ms)"
    )
    # A username or a foreign row's id comes from whoever wrote the table: escaped.
    for clash in change.clashes:
        click.echo(_visible(f"conflict: {clash}; user skipped"), err=True)
    _many_troubled(
        len(change.clashes),
        "conflict with rows provisioner has no record of",
        "if they are its own (provisioner_objects lost), see `provisioner adopt --dry-run`",
    )
    for skipped in report.skipped:
        click.echo(_visible(f"skipped {skipped}"), err=True)
    _many_troubled(
        len(report.skipped),
        f"skipped ({_by_field(report.skipped)})",
        "their rows break a rule (field and rule on each line above; another writer's "
        "value), `provisioner user show USERNAME` shows a row, `provisioner user edit "
        "USERNAME` mends it",
    )


def _many_troubled(count: int, what: str, todo: str) -> None:
    """Past :data:`~.applier.USER_DETAIL` users of one kind of trouble (each printed on
    its own line already), one line ``<count> users <what>: <todo>`` on stderr, so the
    operator facing a whole store of them (lost ownership records, a bulk tool's bad
    value) is told the cause and the command, not only a wall of lines."""
    if count > USER_DETAIL:
        click.echo(f"{count} users {what}: {todo}", err=True)


def _by_field(skipped: Sequence[Skipped]) -> str:
    """How many of the ``skipped`` users break a rule in each field, most first
    (``extension: 28, email: 2``); a user is counted once per field."""
    counts = Counter(field for s in skipped for field in {p.field for p in s.problems})
    return ", ".join(f"{field}: {n}" for field, n in sorted(counts.items(), key=_most_first))


def _most_first(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def _reconcile(
    app: App, *, kind: str | None, dry_run: bool, allow_mass_removal: bool
) -> SyncReport:
    """One reconcile of the store into the configured target (``kind`` overriding its kind)."""
    config = app.config
    if kind is not None and kind != config.target.kind:
        config = config.model_copy(
            update={"target": config.target.model_copy(update={"kind": kind})}
        )
    engine = app.accounts.engine
    with store_named(engine, config.target.own_database):
        return _reconcile_with(
            app, config, engine, dry_run=dry_run, allow_mass_removal=allow_mass_removal
        )


def _reconcile_with(
    app: App, config: Config, engine: Engine, *, dry_run: bool, allow_mass_removal: bool
) -> SyncReport:
    """:func:`_reconcile` once ``config`` is settled, on the store's ``engine``: the target
    made, a marker noted for realtime rows, the reconcile, and what it owes the daemon."""
    from .daemon import build_target, removal_noter
    from .pjsip import RenderSettings
    from .sync import reconcile

    target = build_target(config, engine, writes=not dry_run)
    servers = [server.name for server in config.asterisk]
    # Realtime rows this command writes reach Asterisk's caches only when a daemon
    # empties them: a marker kept until then (kept too if the apply fails half-way).
    marker = config.target.kind == "realtime" and not dry_run
    token = new_token()
    if marker:
        who = f"{click.get_current_context().command_path} pid {os.getpid()}"
        note = partial(note_untold, token=token, who=who)
        transaction(engine, note)
    report = reconcile(
        engine,
        target,
        RenderSettings.from_config(config),
        dry_run=dry_run,
        max_removal_fraction=config.daemon.max_removal_fraction,
        allow_mass_removal=allow_mass_removal,
        # The contacts of endpoints it removes: noted owed before it writes (a kill
        # between its write and a note after it would lose them), and again below.
        before_removing=removal_noter(engine, lambda: target, lambda: servers),
    )
    if marker and not report.change.wrote:
        transaction(engine, partial(drop_untold, keys=[untold_key(token)]))
    if config.target.kind == "config" and report.change.wrote and config.asterisk:
        from .ami.loaded import note_unknown

        # Asterisk is not told: the next daemon must reload, whatever the bytes now.
        servers = [server.name for server in config.asterisk]
        transaction(engine, partial(note_unknown, servers=servers))
    if not dry_run and config.asterisk:
        from .ami.changes import note_untold_removals

        # Nor of the phones registered to endpoints removed or given to another user:
        # the next daemon deletes their contacts.
        servers = [server.name for server in config.asterisk]
        transaction(engine, partial(note_untold_removals, servers=servers, change=report.change))
    return report


@cli.command()
@click.option(
    "--target", "kind", type=click.Choice(["config", "realtime"]), help="Override target.kind."
)
@click.option("--dry-run", is_flag=True, help="Print the diff and the counts; write nothing.")
@click.option("--allow-mass-removal", is_flag=True, help="Apply even if most users would go.")
@pass_app
def render(app: App, kind: str | None, dry_run: bool, allow_mass_removal: bool) -> None:
    """Render every live user into the target (a config file or realtime rows)."""
    report = _reconcile(app, kind=kind, dry_run=dry_run, allow_mass_removal=allow_mass_removal)
    if dry_run and report.change.diff:
        click.echo(_visible_lines(report.change.diff), nl=not report.change.diff.endswith("\n"))
    _print_report(report)


@cli.command()
@click.option("--once", is_flag=True, required=True, help="One full reconcile, then exit.")
@click.option("--dry-run", is_flag=True, help="Print the counts; write nothing.")
@click.option("--allow-mass-removal", is_flag=True, help="Apply even if most users would go.")
@pass_app
def sync(app: App, once: bool, dry_run: bool, allow_mass_removal: bool) -> None:
    """Reconcile the store into the configured target once; print the counts."""
    report = _reconcile(app, kind=None, dry_run=dry_run, allow_mass_removal=allow_mass_removal)
    _print_report(report)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be adopted; write nothing.")
@pass_app
def adopt(app: App, dry_run: bool) -> None:
    """Take back realtime rows exactly as provisioner writes them for a current user (its
    ownership records lost): record them as provisioner's; list those that differ."""
    from .daemon import build_target
    from .pjsip import RenderSettings
    from .sync import adopt as adopt_rows
    from .targets.realtime import RealtimeTarget

    config = app.config
    engine = app.accounts.engine
    with store_named(engine, config.target.own_database):
        target = build_target(config, engine, writes=not dry_run)
        if not isinstance(target, RealtimeTarget):
            rule = "must be realtime: adopt records ownership of realtime rows (a file has none)"
            raise InvalidInput.one("target.kind", rule)
        found = adopt_rows(engine, target, RenderSettings.from_config(config), dry_run=dry_run)
    verb = "would adopt" if dry_run else "adopted"
    for user in found.adopted:
        rows = ", ".join(f"{table} {oid}" for table, oid in user.rows)
        click.echo(_visible(f"{verb} {user.endpoint_id} ({user.username}): {rows}"))
    for foreign in found.left:
        reasons = "; ".join(foreign.reasons)
        # The reasons quote the foreign row's differing column: anyone's text.
        click.echo(_visible(f"left foreign {foreign.endpoint_id} ({foreign.username}): {reasons}"))
    count = sum(len(user.rows) for user in found.adopted)
    click.echo(
        f"{verb} {_users(len(found.adopted))} ({count} rows); "
        f"{_users(len(found.left))} left foreign"
    )


def _users(count: int) -> str:
    return f"{count} user" if count == 1 else f"{count} users"


@cli.command()
@click.option(
    "--burst", is_flag=True, help="Apply pending changes once (and tell Asterisk), then exit."
)
@pass_app
def run(app: App, burst: bool) -> None:
    """The long-running service: watch the store, apply, tell Asterisk, read registrations."""
    import asyncio

    from .daemon import Daemon

    config = app.config
    configure_logs(config.log.level, config.log.format)
    # The raw flags, read again on SIGHUP as at start (a problem then names the command line).
    # A burst ends at its first failure: a store it created would be a stray empty file.
    daemon = Daemon.from_config(
        config, config_path=app.config_path, sets=app.sets, creates_store=not burst
    )
    asyncio.run(daemon.serve(burst=burst))


@cli.command()
@click.argument("usernames", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def status(app: App, usernames: tuple[str, ...], as_json: bool) -> None:
    """Registration state read back from Asterisk: who is online, with what phone."""
    from .store.registrations import status_rows

    with app.accounts.transaction() as conn:
        servers = [server.name for server in app.config.asterisk]
        rows = status_rows(conn, list(usernames) or None, servers=servers)
    # Names match ignoring ASCII case, so ``alice ALICE`` is one user, found once.
    all_found(usernames, [r["username"] for r in rows])
    if as_json:
        _echo_json(rows)
        return
    table = []
    for r in rows:
        contacts = ", ".join(c["uri"] + _contact_note(c) for c in r["contacts"])
        last = _shown_time(r["last_change"]) if r["last_change"] else ""
        problem = _problems(r["servers"])
        row = [r["extension"], r["username"], r["state"], contacts, r["user_agent"], last, problem]
        table.append(row)
    header = ["EXTENSION", "USERNAME", "STATE", "CONTACTS", "USER AGENT", "LAST CHANGE", "PROBLEM"]
    _table(table, header)


def _problems(servers: Sequence[Mapping[str, Any]]) -> str:
    """What the check after an apply recorded next to a user, per server
    (``<server>: <why>``): an endpoint Asterisk does not hold as rendered is shown, not
    left for ``--json`` alone (a phone that can never register looks merely offline)."""
    return "; ".join(f"{s['server']}: {s['problem']}" for s in servers if s.get("problem"))


def _contact_note(contact: Mapping[str, Any]) -> str:
    """What ``status`` says after a contact's URI: expired, or last known of a server whose
    state no one reads now (``stale``)."""
    if contact["stale"]:
        return f" (last known, {contact['server']} not read)"
    return " (expired)" if contact["expired"] else ""


@cli.command()
@click.option(
    "--config-only",
    is_flag=True,
    help="Only load and validate the configuration, as a running daemon's SIGHUP would "
    "(the unit's ExecReload runs this first, so that reloading an invalid file fails).",
)
@pass_app
def check(app: App, config_only: bool) -> None:
    """Check the config, the store, the target and each AMI login; exit 1 if any fails."""
    from .checks import run_checks

    try:
        config = app.config
    except ConfigError as exc:
        # Still one line per check and exit 1, as for any failed check: the config
        # check failed (once per problem), and nothing else can be checked without it.
        for problem in exc.problems:
            click.echo(_visible(f"FAIL  config: {problem}"))
        raise click.exceptions.Exit(1) from None
    if config_only:
        click.echo(_visible(f"ok    config: {config.source or 'embedded defaults'}"))
        return
    results = run_checks(config)
    for name, ok, detail in results:
        # A detail may quote a health record, a path or an AMI peer's greeting.
        click.echo(_visible(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}"))
    if not all(ok for _, ok, _ in results):
        raise click.exceptions.Exit(1)


# -- import -----------------------------------------------------------------------------


@cli.group("import")
def import_group() -> None:
    """Create users from another system's configuration."""


@import_group.command("pjsip")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--profile", required=True, help="Existing profile for every imported user.")
@click.option(
    "--email-domain", required=True, help="Emails become USERNAME@DOMAIN (the site's domain)."
)
@click.option(
    "--generate-secrets",
    is_flag=True,
    help="Users whose secret cannot be carried over get a new one (shown once).",
)
@click.option(
    "--read-as",
    type=click.Choice(["pjsip.conf", "pjsip_wizard.conf"]),
    help="Read FILE as Asterisk reads this file (endpoints from pjsip.conf, wizards only "
    "from pjsip_wizard.conf); default: by FILE's name, pjsip.conf unless it is "
    "pjsip_wizard.conf.",
)
@click.option(
    "--default-realm",
    metavar="REALM",
    help="The site's pjsip.conf [global] default_realm: the realm of digests of auths "
    "that set no realm; default: FILE's [global] (else 'asterisk'); a wizard file has none.",
)
@click.option("--dry-run", is_flag=True, help="Check everything, change nothing.")
@pass_app
def import_pjsip(
    app: App,
    file: str,
    profile: str,
    email_domain: str,
    generate_secrets: bool,
    read_as: FileKind | None,
    default_realm: str | None,
    dry_run: bool,
) -> None:
    """Create users from a hand-written pjsip.conf or pjsip_wizard.conf: all or nothing;
    print what was not mapped."""
    from . import importer
    from .pjsip import RenderSettings

    kind = read_as or importer.file_kind(file)
    plan = importer.plan_import(
        importer.read_file(file),
        RenderSettings.from_config(app.config),
        generate_secrets=generate_secrets,
        read_as=kind,
        default_realm=default_realm,
    )
    result = importer.apply_plan(
        app.accounts, plan, profile=profile, email_domain=email_domain, dry_run=dry_run
    )
    log.info(
        "user.imported_pjsip",
        read_as=kind,
        added=len(result.added),
        unmapped=len(plan.unmapped),
        dry_run=dry_run,
    )
    for line in importer.report_lines(plan, result):
        click.echo(line)
    if result.added:
        # Asterisk refuses a type whose config defines an object twice, keeping the old
        # endpoints: the imported sections must go as the generated file comes in.
        click.echo(
            f"next: delete the sections of the users {'to be ' if dry_run else ''}imported"
            f" from {_visible(file)} as Asterisk starts reading the generated file: an"
            " endpoint, auth or AOR defined twice makes it refuse them all ('provisioner"
            " check' finds any left)"
        )


# -- quickstart ---------------------------------------------------------------------------


@cli.command()
@pass_app
def quickstart(app: App) -> None:
    """Create the store (with sample users if it has none), list them, render them once."""
    from .samples import seed
    from .store.migrate import upgrade

    app.creates_store()
    upgrade(app.accounts.engine)
    for line in seed(app.accounts):
        click.echo(line)
    click.echo(f"store: {display_url(app.config.store.url)}")
    ctx = click.get_current_context()
    ctx.invoke(user_list, deleted=False, role=None, profile=None, state=None, as_json=False)
    report = _reconcile(app, kind=None, dry_run=False, allow_mass_removal=False)
    where = app.config.target.path if app.config.target.kind == "config" else "realtime rows"
    click.echo(f"rendered {report.provisioned} users into {where}")


# -- entry point ----------------------------------------------------------------------------


def _report(exc: ProvisionerError) -> int:
    """Print ``exc`` on stderr, each line :func:`_visible` (a rule or message may quote a
    stored name, a file's path or a server's words), and return its exit code."""
    if isinstance(exc, InvalidInput):
        click.echo(f"error: {exc.headline}", err=True)
        for p in exc.problems:
            click.echo(_visible(f"  {p}"), err=True)
    else:
        click.echo(_visible(f"error: {exc.message}"), err=True)
    return exc.exit_code


def _escape_what_stdout_cannot_show() -> None:
    """Text stdout's charset lacks (a CJK or emoji full name under a Latin-1 locale) is
    printed as backslash escapes, as stderr prints it, not a traceback half-way through a
    listing.  (Click itself already writes UTF-8 where the locale says ASCII; a CSV export
    to stdout is UTF-8 whatever the locale, and JSON is ASCII.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return (and, as a console script, exit with) its exit code."""
    _escape_what_stdout_cannot_show()
    try:
        # Without standalone mode click returns (not raises) a command's Exit code.
        code = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ProvisionerError as exc:
        return _report(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except DBAPIError as exc:
        # Never str(exc) or a traceback: they quote the statement's parameters (digests).
        click.echo(_visible(f"error: database error: {driver_error(exc)}"), err=True)
        return StoreUnavailable.exit_code
    return code if isinstance(code, int) else 0


def entry() -> None:
    """Run the CLI and exit with its code (a signal noted at the start and taken by no
    one, e.g. while ``run`` failed on its configuration, does not replace it)."""
    sys.exit(main())
