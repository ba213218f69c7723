"""``provisioner check``: can this configuration work?  One line per check, no side effects.

Each check returns ``(name, ok, detail)``; the CLI prints them and exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.exc import DBAPIError

from .config import (
    AsteriskServer,
    Config,
    cache_names,
    config_file_problem,
    display_url,
    secret_file_problem,
)
from .errors import ConfigError, ForeignTargetFile, InvalidInput, RenderCheckFailed, UrlRefused
from .health import HealthUnreadable, read_health
from .store.changefeed import missing_definers, trigger_problems
from .store.engine import driver_error, open_store_engine, sqlite_file
from .store.migrate import current_revision, head_revision, known_revision
from .store.repair import REPAIR_COMMAND
from .store.schema import users

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .ami import AmiClient

__all__ = ["Check", "run_checks"]

Check = tuple[str, bool, str]
#: A check's result: a line, or (for a check that may have nothing to say) None.
_C = TypeVar("_C", Check, Check | None)


def _absent(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist (opening it would create it,
    and a check has no side effects), else None."""
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def _store(config: Config) -> Check:
    if (path := _absent(config.store.url)) is not None:
        return ("store", False, f"no database at {path}: run 'provisioner db upgrade'")
    engine = open_store_engine(config.store.url, config.store, create=False)
    try:
        revision = current_revision(engine)
        if revision is not None and not known_revision(revision):
            return (
                "store",
                False,
                f"schema at {revision}, newer than this provisioner's {head_revision()}: "
                "a newer provisioner migrated it; run that version",
            )
        if revision is None:
            return ("store", False, "no schema yet: run 'provisioner db upgrade'")
        if revision != head_revision():
            return (
                "store",
                False,
                f"schema at {revision}, expected {head_revision()}: run 'provisioner db upgrade'",
            )
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(users)).scalar_one()
            lost = _trigger_losses(conn)
        if lost:
            return ("store", False, "; ".join(lost))
        if (too_open := _readable_by_others(config.store.url)) is not None:
            return ("store", False, too_open)
        return ("store", True, f"{display_url(config.store.url)}: {count} users")
    except DBAPIError as exc:
        return ("store", False, f"cannot open: {driver_error(exc)}")
    except UrlRefused as exc:
        return ("store", False, "; ".join(map(str, exc.problems)))
    finally:
        engine.dispose()


def _readable_by_others(url: str) -> str | None:
    """What a SQLite store file others may read needs (one made before provisioner made
    them 0640, or chmodded since); None when it is not so, or no SQLite file."""
    path = sqlite_file(url)
    if path is None or not os.stat(path).st_mode & 0o004:
        return None
    return (
        f"{path} is readable by others, and it holds the SIP digests (with one, anyone "
        "registers as that phone): chmod 640 it, and its -wal and -shm files"
    )


def _trigger_losses(conn: Connection) -> list[str]:
    """What the store's triggers (the change feed's) need, one
    entry per kind of loss; [] when nothing is lost or it cannot be told."""
    out = []
    if orphans := missing_definers(conn):
        out.append(_orphaned_triggers(orphans))
    if silent := trigger_problems(conn):
        out.append(_silent_triggers(silent))
    return out


def _orphaned_triggers(definers: Sequence[str]) -> str:
    """What a store whose change triggers' definers were dropped needs (MariaDB/MySQL)."""
    return (
        f"the change triggers' definer {', '.join(definers)} is no longer an account: "
        "every write to users, attributes and profiles is refused; create that account "
        "again (with INSERT on changes), or re-create the triggers as an existing one: "
        f"run '{REPAIR_COMMAND}' as that account"
    )


def _silent_triggers(problems: Sequence[str]) -> str:
    """What a store whose change feed lost a trigger needs."""
    return (
        f"change feed trigger {', '.join(problems)}: edits through it reach the daemon "
        f"only at its next full reconcile; run '{REPAIR_COMMAND}'"
    )


def _target(config: Config) -> Check:
    t = config.target
    if t.kind == "config":
        from .targets.files import backup_of, real_path

        # The writer's directory: that of the file a link at target.path leads to (the
        # link stays, its file is replaced); missing directories are made at the first write.
        directory = real_path(Path(os.path.abspath(t.path))).parent
        existing = _nearest_existing(directory)
        if not existing.is_dir():
            return ("target", False, f"{existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            return ("target", False, f"directory {existing} is not writable")
        if Path(t.path).exists() and not Path(t.path).is_file():
            # The writer reads the file there to compare, then renames a new one over it:
            # a directory (or a device) fails every apply.
            return ("target", False, f"{t.path} is not a regular file")
        backup = backup_of(Path(os.path.abspath(t.path)))
        if backup.exists() and not backup.is_file():
            # Each write replaces it with the file it replaces: a directory there fails them.
            return (
                "target",
                False,
                f"{backup} is not a regular file (each write keeps the previous file there)",
            )
        if (foreign := _foreign_problem(Path(os.path.abspath(t.path)))) is not None:
            return ("target", False, foreign)
        if (broken := _templates_problem(config)) is not None:
            return ("target", False, broken)
        if not t.shards:
            note = _size_note(t.path)
            return ("target", True, f"config file {t.path} (directory writable{note})")
        from .targets.shards import shard_directory, shard_directory_problem

        if (problem := shard_directory_problem(Path(t.path))) is not None:
            return ("target", False, f"{problem.field}: {problem.rule}")
        shards = shard_directory(Path(t.path))
        # Absent, it is made beside the main file (checked above) at the first apply.
        if shards.exists() and not (shards.is_dir() and os.access(shards, os.W_OK)):
            return ("target", False, f"shard directory {shards} is not a writable directory")
        return (
            "target",
            True,
            f"config file {t.path} including {t.shards} shard files in {shards} "
            "(directories writable)",
        )
    url = t.url or config.store.url
    if (path := _absent(url)) is not None:
        return _absent_realtime(path, own=bool(t.url))
    field = "target.url" if t.url else "store.url"
    engine = open_store_engine(url, config.store, create=False, field=field)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
        missing = {"ps_endpoints", "ps_auths", "ps_aors"} - names
        if missing:
            # Not a failure: the first write (sync, run) creates them.
            absent = ", ".join(sorted(missing))
            return ("target", True, f"realtime tables {absent} absent: the first write makes them")
        if lacking := _lacking_columns(engine, config):
            return ("target", False, lacking)
        return ("target", True, "realtime tables present")
    except DBAPIError as exc:
        return ("target", False, f"cannot open realtime database: {driver_error(exc)}")
    except UrlRefused as exc:
        return ("target", False, "; ".join(map(str, exc.problems)))
    finally:
        engine.dispose()


#: How many duplicate objects the pjsip.conf line names before it counts the rest.
_NAMED_DUPLICATES = 5


#: The one-file layout's size from which ``check`` names the sharded layout: every edit
#: writes, fsyncs and renames the whole file, about 1.1 ms a MB here (62 MB at 100k users:
#: 70 ms), so from 16 MB (about 25k users) an edit costs more than the sharded layout's
#: few milliseconds by an order of magnitude.
LARGE_FILE_BYTES = 16 * 1024 * 1024


def _size_note(path: str) -> str:
    """A note for the target line when the one file at ``path`` is large, else ``""``."""
    try:
        size = os.stat(path).st_size
    except OSError:  # absent (the first write makes it) or unreadable: said elsewhere
        return ""
    if size < LARGE_FILE_BYTES:
        return ""
    megabytes = size / (1024 * 1024)
    return (
        f"; its {megabytes:.1f} MB are rewritten whole at each edit: target.shards (64 "
        "at 100k users) splits it so that an edit writes one shard (README: Sharded layout)"
    )


def _pjsip_conf(config: Config) -> Check | None:
    """The line of the site's pjsip.conf around a config-file target
    (:mod:`~provisioner.targets.site`): it must reach the target by ``#include`` and
    define none of the target's endpoints, auths and AORs itself.  None for a realtime
    target, and for a default path (``pjsip.conf`` beside the target) where no file is."""
    from .targets.site import duplicates, read_site, target_objects

    t = config.target
    if t.kind != "config":
        return None
    target = Path(os.path.abspath(t.path))
    conf = Path(os.path.abspath(t.pjsip_conf)) if t.pjsip_conf else target.with_name("pjsip.conf")
    if not t.pjsip_conf and not conf.exists():
        return None
    site = read_site(conf, target)
    if site.root_unread is not None:
        return ("pjsip.conf", False, f"cannot read {site.root_unread}")
    if not site.reaches_target:
        return (
            "pjsip.conf",
            False,
            f"{conf} does not #include {t.path} (nor does any file it includes): Asterisk"
            f" never reads the users; add '#include {target}' to it",
        )
    clashes = duplicates(site, target_objects(target))
    if clashes:
        named = ", ".join(
            f"{d.type} {d.name} ({d.file} line {d.line})" for d in clashes[:_NAMED_DUPLICATES]
        )
        more = len(clashes) - _NAMED_DUPLICATES
        return (
            "pjsip.conf",
            False,
            f"{len(clashes)} hand-written object(s) that {t.path} defines too: {named}"
            + (f" and {more} more" if more > 0 else "")
            + ": Asterisk refuses a configuration with a duplicate object and keeps the"
            " endpoints it had, so no reload adds, changes or removes one; delete the"
            " hand-written sections (users 'import pjsip' made are provisioned now)",
        )
    unread = f"; not read: {'; '.join(site.unread)}" if site.unread else ""
    return ("pjsip.conf", True, f"{conf} includes {t.path}, no object defined twice{unread}")


def _lacking_columns(engine: Engine, config: Config) -> str | None:
    """Why every apply would fail on realtime tables an older Asterisk made, lacking a
    column the mapping writes (:func:`~provisioner.targets.realtime.lacking_columns`), or
    None."""
    from .pjsip import RenderSettings
    from .targets.realtime import lacking_columns

    try:
        with engine.connect() as conn:
            lacking = lacking_columns(conn, RenderSettings.from_config(config))
    except InvalidInput:
        return None  # settings no user renders under: every user says why, by field
    if not lacking:
        return None
    way_out = "upgrade them to Asterisk's schema (its alembic scripts)"
    if any(name.startswith("ps_auths.") for name in lacking):
        # Asterisk before 20.12, 21.7 and 22.2 has no digest columns: md5_cred is its form.
        way_out += ', or set [target] auth_type = "md5" (Asterisk older than 20.12, 21.7, 22.2)'
    return (
        f"realtime tables lack {', '.join(lacking)}, which the mapping writes: every apply "
        f"would fail; {way_out}"
    )


def _absent_realtime(path: Path, *, own: bool) -> Check:
    """The target line for a realtime SQLite file ``path`` that does not exist (looked at,
    not made: a check changes nothing).  Its ``own`` file (``target.url``) passes when the
    first write (sync, run) can make it and its directories, as a config file's does; the
    user store's (``target.url`` empty) waits for ``db upgrade``, as the store line says."""
    where = f"no realtime database at {path}"
    if not own:
        return ("target", False, f"{where} (the user store's): run 'provisioner db upgrade'")
    existing = _nearest_existing(Path(os.path.abspath(path)).parent)
    cannot = f"{where}, and the first write cannot make it:"
    if not existing.is_dir():
        return ("target", False, f"{cannot} {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        return ("target", False, f"{cannot} directory {existing} is not writable")
    makes = f"the first write makes it (directory {existing} writable)"
    return ("target", True, f"{where} yet: {makes}")


def _nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (``/`` at the last)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


#: A line that may make a file hold what provisioner never writes: a ``type=`` other than a
#: user's three, a directive, or a section not followed at once by its ``type=``.  Only a
#: file with one is parsed (a 100k-user file takes seconds to read in full; scanning it
#: for these, well under one).
_MAYBE_FOREIGN = re.compile(
    rb"^[\x00-\x20]*(?:#|type[\x00-\x20]*=>?[\x00-\x20]*"
    rb"(?!(?:endpoint|auth|aor)[\x00-\x09\x0b-\x20]*$)"
    rb"|\[[^\n]*\n(?![\x00-\x20]*type[\x00-\x20]*=))",
    re.MULTILINE,
)


def _foreign_problem(path: Path) -> str | None:
    """The refusal every apply would give (:class:`~provisioner.errors.ForeignTargetFile`)
    when the file at ``path`` holds what provisioner never writes (Asterisk's own
    pjsip.conf named by a mistaken ``target.path``), or None; None too for a file this
    user may not read (a monitoring user: the daemon's own user may)."""
    from .targets.holdings import Current, refuse_foreign
    from .targets.shards import shard_directory

    try:
        data = path.read_bytes()
    except OSError:  # absent (the first write makes it), or not this user's to read
        return None
    if b"\0" not in data and _MAYBE_FOREIGN.search(data) is None:
        return None
    try:
        refuse_foreign(path, Current.of_main(path, data, shard_directory(path)))
    except ForeignTargetFile as exc:
        return exc.message
    return None


def _templates_problem(config: Config) -> str | None:
    """Why the config-file target's templates cannot be loaded (an override directory that
    is not one, as building the target would say: ``run`` exits 2 for it), compiled (a
    template with a syntax error or not UTF-8) or render a good file (sample users'
    text must parse back to exactly them), all of which every apply refuses; or None."""
    from .pjsip import RenderSettings
    from .targets.configfile import check_templates

    t = config.target
    settings = RenderSettings.from_config(config)

    try:
        check_templates(Path(t.templates) if t.templates else None, settings)
    except ConfigError as exc:
        return "; ".join(str(problem) for problem in exc.problems)
    except RenderCheckFailed as exc:
        return exc.message
    return None


#: Characters below which an AMI secret is called short: the MD5 login's key is a hash
#: of the challenge and the secret, which whoever reads the connection can try guesses
#: against offline, as fast as MD5 runs.
SHORT_SECRET = 16


def _secret_notes(server: AsteriskServer) -> str:
    """What a passing login line adds about how the secret is exposed, never the secret."""
    secret = server.secret.get_secret_value() if server.secret else ""
    if server.login == "plain":
        return "; login = plain: the secret crosses the network as it is"
    if len(secret) < SHORT_SECRET:
        return (
            f"; its secret is short ({len(secret)} characters): one read off the wire can"
            f" be guessed offline from the login's key; use {SHORT_SECRET} or more random ones"
        )
    return ""


async def _login(server: AsteriskServer, config: Config) -> Check:
    """:func:`_login_once`'s line, a passing one with :func:`_secret_notes` added."""
    name, passed, detail = await _login_once(server, config)
    return (name, passed, detail + _secret_notes(server) if passed else detail)


async def _login_once(server: AsteriskServer, config: Config) -> Check:
    """The line of one login to ``server``, tried once (:meth:`AmiClient.serve_once`): a
    refused connection or login fails it at once, a host that never answers once its
    ``timeout`` has passed; then, with a realtime target, its caches are asked for."""
    from .ami import AmiClient, AmiError

    client = AmiClient(server, config.ami)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(client.serve_once(stop))
    try:
        name, where = f"asterisk {server.name}", f"{server.host}:{server.port}"
        logged_in = asyncio.ensure_future(client.connected_event.wait())
        # Opening is bounded by the server's timeout; the second more is a backstop.
        await asyncio.wait(
            [runner, logged_in], timeout=server.timeout + 1.0, return_when=asyncio.FIRST_COMPLETED
        )
        logged_in.cancel()
        if not client.connected:
            return (name, False, f"{where}: {_not_logged_in(runner, client)}")
        try:
            denied = await _denied_actions(client)
        except AmiError as exc:
            return (name, False, f"{where} login ok; privileges: {exc}")
        if denied:
            detail = (
                f"{where} login ok, but Asterisk refuses this account {', '.join(denied)} "
                f"({_DENIED}): give it write = system in manager.conf"
            )
            return (name, False, detail)
        caches = cache_names(server.sorcery_caches)
        if config.target.kind == "realtime" and caches:
            try:
                missing = await _missing_caches(client, caches)
            except AmiError as exc:
                return (name, False, f"{where} login ok; caches: {exc}")
            if missing:
                detail = f"{where} login ok, but no sorcery memory cache named {', '.join(missing)}"
                return (name, False, detail + " (see sorcery.conf)")
            return (name, True, f"{where} login ok, caches found")
        return (name, True, f"{where} login ok")
    finally:
        stop.set()
        await asyncio.wait([runner])
        refusals = (OSError, TimeoutError, AmiError, ValueError)  # said on the line
        if not runner.cancelled() and not isinstance(runner.exception(), refusals):
            runner.result()  # a bug: raised, not turned into a line


def _not_logged_in(runner: asyncio.Future[None], client: AmiClient) -> str:
    """Why ``client``'s one login (``runner``) did not get in: a refused connection as
    ``connection refused``, the AMI layer's reason, the system's words for another socket
    error, or the session's end (closed at once after the login)."""
    from .ami import AmiError

    exc = runner.exception() if runner.done() and not runner.cancelled() else None
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, AmiError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return f"no answer to the login in {client.server.timeout}s"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    return client.health().last_error or "no answer"


#: The asterisk line when no server is configured: nothing fails, but it is said.
NO_ASTERISK: Check = (
    "asterisk",
    True,
    "no [[asterisk]] server configured (no login to check; no Asterisk is told of changes)",
)


async def _logins(config: Config) -> list[Check]:
    """Each server's :func:`_login`, all at once (servers that do not answer cost one
    login timeout, not one each), in the config's order; :data:`NO_ASTERISK` for none."""
    if not config.asterisk:
        return [NO_ASTERISK]
    return list(await asyncio.gather(*(_login(server, config) for server in config.asterisk)))


#: The object a cache is asked to expire to learn whether the cache exists: no object has
#: this id, so nothing is expired (Asterisk answers that it could not be).
_PROBE_OBJECT = "provisioner-check-probe"

#: Asterisk's answer to an action the account's ``write`` privileges do not cover
#: (../shared/asterisk/ami/least_privilege_user.txt: ``Command``, ``Originate``).
_DENIED = "Permission denied"

#: One harmless action per kind the daemon sends, each naming what does not exist, so
#: that an account allowed it changes nothing (../shared/asterisk/ami/
#: responses_and_errors.txt): ``Reload`` of no module (``No such module``), a
#: ``PJSIPShowEndpoint`` of no endpoint (``Unable to retrieve endpoint``), a ``DBDel`` of no
#: contact (``Database entry not found``).  Asterisk answers ``Permission denied``
#: instead to an account without the privilege; ``write = system`` allows all of them
#: (the least privilege that is enough, ../shared/asterisk/README.md).
_PRIVILEGE_PROBES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Reload", (("Module", f"{_PROBE_OBJECT}.so"),)),
    ("PJSIPShowEndpoint", (("Endpoint", _PROBE_OBJECT),)),
    ("DBDel", (("Family", "registrar"), ("Key", f"contact/{_PROBE_OBJECT};@"))),
)


async def _denied_actions(client: AmiClient) -> list[str]:
    """The actions of :data:`_PRIVILEGE_PROBES` Asterisk answers ``Permission denied``
    on ``client``'s session, in order; an AMI failure (the session lost) raises."""
    denied = []
    for action, headers in _PRIVILEGE_PROBES:
        reply = await client.send_action(action, headers)
        if not reply.ok and reply.message.strip().lower() == _DENIED.lower():
            denied.append(action)
    return denied


async def _missing_caches(client: AmiClient, caches: Sequence[str]) -> list[str]:
    """The configured caches Asterisk says it does not have: with a wrong name every
    realtime edit would stay invisible behind the real cache until the object's lifetime
    ends."""
    from .ami import PjsipOps

    ops = PjsipOps(client)
    return [cache for cache in caches if await ops.expire(cache, _PROBE_OBJECT) == "no_such_cache"]


def _secret_files(config: Config) -> Iterator[Check]:
    """A failed config check per ``secret_file`` others may read or group or others may
    write (:func:`secret_file_problem`), or that cannot be looked at any more."""
    for server in config.asterisk:
        if server.secret_file is None:
            continue
        try:
            problem = secret_file_problem(server.secret_file)
        except OSError as exc:
            problem = f"cannot look at secret_file {server.secret_file}: {exc.strerror or exc}"
        if problem is not None:
            yield ("config", False, problem)


def _config_file(config: Config) -> Iterator[Check]:
    """A failed config line for a config file others may read that holds a secret itself
    (:func:`config_file_problem`), or that cannot be looked at any more."""
    if config.source is None:
        return
    try:
        problem = config_file_problem(Path(config.source))
    except OSError as exc:
        problem = f"cannot look at {config.source}: {exc.strerror or exc}"
    if problem is not None:
        yield ("config", False, problem)


def _health(config: Config) -> Iterator[Check]:
    """The daemon line, from its health record: failed when the record is unreadable or
    the daemon unhealthy; passed, saying so, when there is no record (no daemon has run
    on this state_dir yet: a check before the first start is no failure)."""
    state_dir = Path(config.daemon.state_dir)
    try:
        health = read_health(state_dir)
    except HealthUnreadable as exc:
        yield ("daemon", False, f"health record unreadable: {exc}")
        return
    if health is None:
        detail = "no daemon has run with this state_dir (nothing to check)"
        yield ("daemon", True, f"no health record in {state_dir}: {detail}")
        return
    problems = health.problems(time.time(), max_age=60.0)
    said = problems or [f"pid {health.pid}, healthy", *health.notes()]
    yield ("daemon", not problems, "; ".join(said))


def _looking(check: Callable[[Config], _C], name: str, config: Config) -> _C | Check:
    """``check(config)``, or the check ``name`` failed when a path it looks at cannot be
    looked at (a directory a monitoring user may not search): never a traceback."""
    try:
        return check(config)
    except OSError as exc:
        where = f"{str(exc.filename)!r}: " if exc.filename else ""
        return (name, False, f"cannot look at {where}{exc.strerror or exc}")


def run_checks(config: Config) -> list[Check]:
    """Every check, in order: config (and the config file or a secret_file too open), store,
    target (and the site's pjsip.conf around a config file), each Asterisk login, the
    daemon's health."""
    checks: list[Check] = [("config", True, config.source or "embedded defaults")]
    checks.extend(_config_file(config))
    checks.extend(_secret_files(config))
    checks.append(_looking(_store, "store", config))
    checks.append(_looking(_target, "target", config))
    if (site := _looking(_pjsip_conf, "pjsip.conf", config)) is not None:
        checks.append(site)
    checks.extend(asyncio.run(_logins(config)))
    checks.extend(_health(config))
    return checks
