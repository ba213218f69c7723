"""What admins do to users and profiles: the rules of :mod:`provisioner.model` applied
to the store, each action in one transaction.

Secrets enter here and leave only as hashes; a generated secret is returned
once to the caller, which shows it once.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, RootTransaction, Table, case, delete, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from . import credentials
from .config import Config
from .errors import (
    AuthenticationError,
    ConflictError,
    Contended,
    ForbiddenError,
    InvalidInput,
    NotFoundError,
    Problem,
    ProvisionerError,
    StoreUnavailable,
)
from .logs import get_logger
from .model import (
    IMMUTABLE_FIELDS,
    Profile,
    User,
    account_state,
    as_of,
    check_profile_fields,
    is_locked,
    lock_as_of,
    merge_attributes,
    sniff_avatar,
    validate_fields,
)
from .store import queries as q
from .store.engine import blame, reading, store_unreadable, unavailable
from .store.schema import metadata, users

__all__ = [
    "Accounts",
    "Bulk",
    "Created",
    "Edited",
    "Policy",
    "all_found",
    "clash_field",
    "rerun_on_unique_clash",
    "utcnow",
]

Clock = Callable[[], datetime]
_T = TypeVar("_T")

#: Voice and preference fields that map one-to-one onto ``users`` columns.
_PLAIN_COLUMNS = (
    "full_name",
    "email",
    "description",
    "extension",
    "transport",
    "nat",
    "codecs",
    "context",
    "call_group",
    "pickup_group",
    "video",
    "log_level",
    "messenger_sound",
    "toast_position",
)
_REQUIRED_ON_ADD = ("username", "full_name", "email")
#: The columns that, cleared, revoke a user's API key (remove, delete, restore).
_NO_APIKEY: dict[str, Any] = {"apikey_hash": None, "apikey_created_at": None}
_ADD_RETRIES = 20
_EDIT_RETRIES = 3


def _unfit_actor(row: Any) -> str | None:
    """Why the user ``row`` (None: no such user) cannot act on the store, or None."""
    if row is None:
        return "names no user"
    if row.role != "admin":
        return "is not an admin"
    if row.deleted_at is not None:
        return "is in deleted members"
    if row.disabled:
        return "is disabled"
    return None


def utcnow() -> datetime:
    """Naive UTC now: the store keeps naive UTC timestamps on every backend."""
    return datetime.now(UTC).replace(tzinfo=None)


log = get_logger(__name__)

#: What a unique (or primary) key or a foreign key refusing a write looks like:
#: PostgreSQL's SQLSTATE, MariaDB/MySQL's error number, SQLite's message.
_CLASH_SQLSTATES = frozenset({"23505", "23503"})
_CLASH_ERRNOS = frozenset({1062, 1216, 1217, 1451, 1452, 1557, 1586})
_CLASH_SQLITE = ("UNIQUE constraint failed", "FOREIGN KEY constraint failed")


def is_key_clash(exc: IntegrityError) -> bool:
    """True when a unique, primary or foreign key refused the write: a concurrent writer
    took a name or an extension, or removed a row referred to, which a rerun's checks
    see.  False for a CHECK or NOT NULL refusal, which no rerun changes."""
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # MariaDB/MySQL (its SQLSTATE is a mere 23000)
        return args[0] in _CLASH_ERRNOS
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _CLASH_SQLSTATES
    return str(orig).startswith(_CLASH_SQLITE)


#: A deadlock's victim (or a serialization failure): PostgreSQL's SQLSTATEs, MariaDB/MySQL's
#: ER_LOCK_DEADLOCK.  Not a lock wait that timed out (1205), which a rerun would only wait
#: out again.
_DEADLOCK_SQLSTATES = frozenset({"40P01", "40001"})
_DEADLOCK_ERRNO = 1213


def _is_deadlock(exc: DBAPIError) -> bool:
    """True when the database ended the transaction to break a deadlock with another
    writer: nothing of it remains, and a rerun meets that writer no more."""
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # MariaDB/MySQL
        return args[0] == _DEADLOCK_ERRNO
    return getattr(orig, "sqlstate", None) in _DEADLOCK_SQLSTATES


#: The field a key names, by a part of the key's name (PostgreSQL's and MariaDB's
#: constraint names, SQLite's ``table.column`` list), and what a concurrent writer did to
#: it; the first that matches wins.  MariaDB names a primary key only ``PRIMARY``: the one
#: a write of ours can clash on is ``user_attributes``' (ids are the database's own).
_CLASH_FIELDS = (
    ("username_key", "username", "is already taken"),
    ("apikey_hash", "apikey", "clashed with another key"),
    ("extension", "extension", "is already used"),
    ("profile_id", "profile", "names a profile that was removed"),
    ("profiles", "name", "is already taken"),
    ("user_attributes_user_id", "username", "names a user that was removed"),
    ("user_attributes", "attributes", "has a key that was set meanwhile"),
    ("PRIMARY", "attributes", "has a key that was set meanwhile"),
)
_CONSTRAINT_NAME = re.compile(r"for key '([^']+)'|CONSTRAINT `([^`]+)`|constraint failed: (.+)")


def clash_field(exc: IntegrityError) -> tuple[str, str] | None:
    """The field a key clash (:func:`is_key_clash`) is on, and what a concurrent writer
    did to it, from the name of the key that refused the write; None when the database
    does not name it (SQLite's foreign keys).  The error's text (it quotes the values)
    is read, never shown."""
    orig = exc.orig
    name = getattr(getattr(orig, "diag", None), "constraint_name", None)
    if name is None:
        found = _CONSTRAINT_NAME.search(str(orig))
        name = None if found is None else next(g for g in found.groups() if g)
    if name is None:
        return None
    return next(((f, what) for part, f, what in _CLASH_FIELDS if part in name), None)


def id_table_of_clash(exc: IntegrityError) -> Table | None:
    """The table whose primary key (ids the database gives) refused a write with a
    duplicate id, as PostgreSQL names it (``pk_users``); None for any other refusal, and
    on the other databases, whose id counters move past an explicit id by themselves."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) != "23505":
        return None
    name = getattr(getattr(orig, "diag", None), "constraint_name", None) or ""
    table = metadata.tables.get(name.removeprefix("pk_")) if name.startswith("pk_") else None
    if table is None or len(table.primary_key.columns) != 1:
        return None
    (column,) = table.primary_key.columns
    return table if column.autoincrement is True else None


def rerun_on_unique_clash(
    write: Callable[[], _T], attempts: int, exhausted: ProvisionerError
) -> _T:
    """``write()`` (one whole transaction), run again when a key refuses it
    (:func:`is_key_clash`): a concurrent writer took a name or an extension between our
    check and our write, and the next run's checks see it and name the field.  When the
    clash comes back at each of ``attempts`` runs, a :class:`ConflictError` on the field
    the last clash's key names (:func:`clash_field`: ``username: is already taken (by a
    concurrent writer, at each of 20 tries); try again``), or ``exhausted`` when the
    database does not name it; any other IntegrityError is raised at once.  A run the
    database ended as a deadlock's victim (:class:`Contended`) runs again too (``exhausted``
    when the last one ends so)."""
    clash: tuple[str, str] | None = None
    for _ in range(attempts):
        try:
            return write()
        except Contended:
            clash = None
        except IntegrityError as exc:
            if not is_key_clash(exc):
                raise
            clash = clash_field(exc)
    if clash is None:
        raise exhausted
    field, what = clash
    rule = f"{what} (by a concurrent writer, at each of {attempts} tries); try again"
    raise ConflictError.one(field, rule)


@dataclass(frozen=True)
class Policy:
    """The rules that come from configuration."""

    password_policy: bool = True
    max_failed_logins: int = 5
    lock_minutes: int = 30
    ext_first: int = 1000
    ext_last: int = 9999
    realm: str = "asterisk"

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(
            password_policy=config.security.password_policy,
            max_failed_logins=config.security.max_failed_logins,
            lock_minutes=config.security.lock_minutes,
            ext_first=config.extensions.first,
            ext_last=config.extensions.last,
            realm=config.sip.realm,
        )


def all_found(usernames: Sequence[str], found: Sequence[str]) -> None:
    """:class:`NotFoundError` naming, in one message, every one of ``usernames`` that no
    username in ``found`` matches ignoring ASCII case (as usernames are unique), each
    once as first spelled: an operator fixes all the names at once, not one per run."""
    keys = {q.username_key(name) for name in found}
    missing: dict[str, str] = {}
    for name in usernames:
        if q.username_key(name) not in keys:
            missing.setdefault(q.username_key(name), name)
    if missing:
        raise NotFoundError("user", ", ".join(missing.values()))


@dataclass(frozen=True)
class Bulk:
    """What a bulk action did: the users it changed and those it found already in the
    state asked for, each by username, in the order named."""

    done: list[str]
    unchanged: list[str]


@dataclass(frozen=True)
class Edited:
    """A user after an edit, and whether the edit changed any stored value (one that
    changed none wrote nothing, as :meth:`Accounts.edit_in` says)."""

    user: User
    changed: bool


@dataclass(frozen=True)
class Created:
    """A new user and, when provisioner generated it, the SIP secret to show once."""

    user: User
    sip_secret: str | None


def _renewed_hash(password_hash: str, password: str) -> str | None:
    """A new hash of ``password`` when ``password_hash`` (which it matched) was made with
    other costs than new hashes get, else None."""
    return credentials.hash_password(password) if credentials.needs_rehash(password_hash) else None


#: Why a login to a locked account is refused.
_LOCKED = "account is locked after too many failed logins; contact an administrator"


class Accounts:
    """User and profile administration over one store.

    ``actor`` is the admin who acts (a web UI's logged-in admin, the CLI's ``--as``).
    With one, every change checks, in its own transaction, that it names an existing,
    active admin, and only the first admin may change the first admin.  Without one
    (an operator holding the store's credentials, trusted like a DBA) neither applies.
    """

    def __init__(
        self, engine: Engine, policy: Policy, clock: Clock = utcnow, *, actor: str | None = None
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.clock = clock
        self.actor = actor
        # (transaction, first admin's id) of the last lookup: see first_admin_id.
        self._first_admin: tuple[weakref.ref[RootTransaction], int] | None = None

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Connection]:
        """One transaction; database outages become :class:`StoreUnavailable`, as does any
        other database error while the store cannot be read at all (a SQLite file that is
        no database: ``DatabaseError``), told by :func:`store_unreadable`.  ``read_only``:
        one that only reads, taking no lock (:func:`reading`: on SQLite it does not hold
        the file's write lock as every other transaction does)."""
        try:
            connection = reading(self.engine) if read_only else self.engine.connect()
            with connection as conn, conn.begin():
                yield conn
        except DBAPIError as exc:
            if _is_deadlock(exc):
                # Ended to break a deadlock with another writer: run again where it can be.
                raise Contended(unavailable(exc).message) from None
            if isinstance(exc, IntegrityError):
                # A rerun (rerun_on_unique_clash) then gets an id past the rows'.
                self._catch_up_ids(exc)
            # An outage of the one connection used, the store's, needs no asking again.
            outage = isinstance(exc, (OperationalError, ProgrammingError))
            store = unavailable(exc) if outage else store_unreadable(self.engine)
            fault = blame(exc, store, None)
            if fault is not None:
                raise fault from None
            raise

    def _catch_up_ids(self, exc: IntegrityError) -> None:
        """When ``exc`` is a clash on the primary key of a table whose ids the database
        gives (``users``, ``profiles``), its id sequence is behind rows inserted with their
        own ids (PostgreSQL's only): move it past them in a transaction of its own, logged
        as ``store.id_sequence_behind`` (table, the id moved to).  A store that refuses
        the move (an account without ``UPDATE`` on the sequence) is a
        :class:`ConflictError` on ``id`` saying what to run."""
        table = id_table_of_clash(exc)
        if table is None:
            return
        try:
            with self.engine.begin() as conn:
                moved = q.catch_up_id_sequence(conn, table)
        except DBAPIError as failed:
            raise ConflictError.one(
                "id",
                f"{table.name}' id sequence is behind rows inserted with their own ids and"
                f" could not be moved past them ({type(failed.orig).__name__}); run"
                f" SELECT setval(pg_get_serial_sequence('{table.name}', 'id'),"
                f" (SELECT max(id) FROM {table.name})) as the table's owner",
            ) from None
        if moved is not None:
            log.warning("store.id_sequence_behind", table=table.name, moved_to=moved)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction for a change: with an :attr:`actor`, it is first checked to be
        an existing, active admin (:meth:`actor_id`), in the same transaction."""
        with self.transaction() as conn:
            self.actor_id(conn)
            yield conn

    # -- who acts -----------------------------------------------------------------

    def actor_id(self, conn: Connection) -> int | None:
        """The acting admin's id, None without an :attr:`actor`; :class:`ForbiddenError` on
        field ``actor`` when it names no user, a non-admin, a deleted or a disabled one."""
        if self.actor is None:
            return None
        row: Any = None
        with suppress(NotFoundError):
            row = q.fetch_user_row(conn, self.actor)
        unfit = _unfit_actor(row)
        if unfit is not None:
            raise ForbiddenError.one(
                "actor", f"{self.actor!r} {unfit}; only an existing, active admin acts"
            )
        return int(row.id)

    def first_admin_id(self, conn: Connection) -> int | None:
        """:func:`q.first_admin_id`, read from the store once per transaction of ``conn``
        once found.  Its query scans ``users`` (no index on role), so a bulk change or an
        import of N users that asked it per user read the whole table N times (a 10,000-row
        import of a 100,000-user store took minutes holding the write lock).  Once there is
        a first admin it stays the same user (see :func:`q.first_admin_id`); while there is
        none (an import whose first row adds it) it is asked again each time."""
        txn = conn.get_transaction()
        cached = self._first_admin
        if txn is not None and cached is not None and cached[0]() is txn:
            return cached[1]
        found = q.first_admin_id(conn)
        self._first_admin = None if txn is None or found is None else (weakref.ref(txn), found)
        return found

    def guard_first_admin(self, conn: Connection, row: Any, *, line: int | None = None) -> None:
        """:class:`ForbiddenError` (field ``username``) when an :attr:`actor` other than the
        first admin is about to change the user ``row`` and ``row`` is the first admin."""
        if self.actor is None or row.id != self.first_admin_id(conn):
            return
        if self.actor_id(conn) == row.id:
            return
        rule = (
            f"{row.username} is the first admin, and the first admin is edited only by "
            f"itself (not by {self.actor})"
        )
        raise ForbiddenError([Problem("username", rule, line)])

    # -- profiles -------------------------------------------------------------

    def add_profile(self, name: str, description: str = "") -> Profile:
        """Add a profile; a name taken (also by a concurrent writer) is a conflict on ``name``."""
        name, description = check_profile_fields(name, description)

        def write() -> Profile:
            with self.write() as conn:
                taken = q.profile_name_taken(conn, name)
                if taken == name:
                    raise ConflictError.one("name", f"profile {name!r} already exists")
                if taken is not None:
                    raise ConflictError.one(
                        "name",
                        f"profile {taken!r} exists and the database does not tell it apart",
                    )
                return q.insert_profile(conn, name, description, self.clock())

        return rerun_on_unique_clash(
            write,
            _EDIT_RETRIES,
            ConflictError.one("name", "kept being taken by concurrent writers; try again"),
        )

    def list_profiles(self) -> list[Profile]:
        with self.transaction() as conn:
            return q.select_profiles(conn)

    # -- reading users --------------------------------------------------------

    def get_user(self, username: str) -> User:
        """The user, live or deleted, found case-insensitively, as of now (:func:`as_of`:
        a lock that timed out is shown gone, with its failed logins)."""
        with self.transaction() as conn:
            found = q.load_users(conn, usernames=[username], deleted=None)
        if not found:
            raise NotFoundError("user", username)
        return as_of(found[0], self.clock(), self.policy.lock_minutes)

    def get_users(self, usernames: Sequence[str]) -> list[User]:
        """The users named, live or deleted, each once however often named (in any
        case), by id, as of now (as :meth:`get_user`); :class:`NotFoundError` naming
        every name that finds none (:func:`all_found`), as the bulk actions do."""
        with self.transaction() as conn:
            found = q.load_users(conn, usernames=usernames, deleted=None)
        all_found(usernames, [u.username for u in found])
        now = self.clock()
        return [as_of(u, now, self.policy.lock_minutes) for u in found]

    def list_users(
        self,
        *,
        deleted: bool | None = False,
        role: str | None = None,
        profile: str | None = None,
        state: str | None = None,
    ) -> list[User]:
        """Users, each as of now (:func:`as_of`), filtered by role, profile and state."""
        with self.transaction() as conn:
            found = q.load_users(conn, deleted=deleted)
        now = self.clock()
        return [
            u
            for u in (as_of(user, now, self.policy.lock_minutes) for user in found)
            if (role is None or u.role == role)
            and (profile is None or u.profile == profile)
            and (state is None or self.state(u, now) == state)
        ]

    def state(self, user: User, now: datetime | None = None) -> str:
        return account_state(user, now or self.clock(), self.policy.lock_minutes)

    # -- adding and editing -----------------------------------------------------

    def hashes_ahead(self, given: Iterable[object]) -> credentials.HashesAhead:
        """The hashes of the passwords in ``given`` that the password rule lets through
        (as it judges them in the change), made now, before the change's transaction
        (:class:`credentials.HashesAhead`).  Empty and refused ones are skipped: the
        change reports a refused one with its other problems and stores no hash for it."""
        clean: list[str] = []
        for password in given:
            if not isinstance(password, str) or not password:
                continue
            with suppress(InvalidInput):  # said by the change itself, with the rest
                checked = {"password": password}
                rule = self.policy.password_policy
                clean.append(validate_fields(checked, password_policy=rule)["password"])
        return credentials.HashesAhead.of(clean)

    def add_user(self, values: Mapping[str, Any]) -> Created:
        """Create a user; the extension is the lowest free one of the range unless given, and
        an attribute given an empty value is not stored (as an edit's empty value removes one).

        Two concurrent adds never share an extension or a username: the unique
        constraint rejects the slower one, which runs again with a fresh allocation and
        fresh checks, so a taken name or given extension is refused naming its field.
        """

        ahead = self.hashes_ahead([values.get("password")])

        def write() -> Created:
            with self.write() as conn:
                allocator = q.ExtensionAllocator(conn, self.policy.ext_first, self.policy.ext_last)
                user_id, secret = self.add_in(
                    conn, values, allocator, self.clock(), hashed=ahead.taker()
                )
                user = q.load_users(conn, ids=[user_id])[0]
            return Created(user, secret)

        return rerun_on_unique_clash(
            write,
            _ADD_RETRIES,
            StoreUnavailable("could not allocate an extension after repeated conflicts"),
        )

    def add_in(
        self,
        conn: Connection,
        values: Mapping[str, Any],
        allocator: q.ExtensionAllocator,
        now: datetime,
        *,
        line: int | None = None,
        hashed: Callable[[str], str] | None = None,
    ) -> tuple[int, str | None]:
        """Insert one user on ``conn`` (the caller's transaction); return its id and the
        generated SIP secret, if one was generated.  ``hashed`` gives its password's hash
        (:meth:`HashesAhead.taker`); without it the hash is made here."""
        values = dict(values)
        values.setdefault("role", "user")
        missing = {name for name in _REQUIRED_ON_ADD if values.get(name) in (None, "")}
        problems = [
            Problem(name, "is required", line) for name in _REQUIRED_ON_ADD if name in missing
        ]
        # A missing field is reported once, as required: its format rule has nothing to judge.
        present = {k: v for k, v in values.items() if v is not None and k not in missing}
        clean = self._validate(present, problems, line)
        self._check_profile(conn, clean, clean.get("role", "user"), problems, line)
        if problems:
            raise InvalidInput(problems)
        if q.username_taken(conn, clean["username"]):
            raise ConflictError(
                [
                    Problem(
                        "username",
                        "is already taken (ignoring case; a deleted user keeps its name "
                        "until purged)",
                        line,
                    )
                ]
            )
        if not self._store_has_users(conn) and clean["role"] != "admin":
            raise InvalidInput([Problem("role", "the first user must be an admin", line)])
        extension = clean.get("extension")
        if extension:
            self._check_extension_free(conn, extension, None, line)
            allocator.reserve(extension)
        else:
            extension = allocator.allocate()
            if extension is None:
                raise ConflictError(
                    [
                        Problem(
                            "extension",
                            f"no free extension left in {allocator.first}-{allocator.last}",
                            line,
                        )
                    ]
                )
        generated = None
        secret = clean.get("sip_secret")
        if not secret:
            secret = generated = credentials.generate_sip_secret()
        digests = credentials.sip_digests(clean["username"], self.policy.realm, secret)
        row: dict[str, Any] = {name: clean[name] for name in _PLAIN_COLUMNS if name in clean}
        row.update(
            role=clean["role"],
            username=clean["username"],
            username_key=q.username_key(clean["username"]),
            profile_id=clean.get("profile_id"),
            extension=extension,
            sip_realm=digests.realm,
            sip_md5=digests.md5,
            sip_sha256=digests.sha256,
            created_at=now,
            updated_at=now,
        )
        row.setdefault("description", "")
        if clean.get("password"):
            row["password_hash"] = (hashed or credentials.hash_password)(clean["password"])
            row["last_password_reset_at"] = now
        if clean.get("avatar") is not None:
            row["avatar"] = clean["avatar"]
            row["avatar_type"] = sniff_avatar(clean["avatar"])
        user_id = q.insert_user(conn, row)
        q.replace_attributes(conn, user_id, merge_attributes({}, clean.get("attributes", {})))
        return user_id, generated

    def edit_user(
        self,
        username: str,
        values: Mapping[str, Any],
        *,
        attribute_changes: Mapping[str, str] | None = None,
    ) -> Edited:
        """Change any field but role and username; a deleted user must be restored first.
        An edit giving only the values stored changes nothing and writes nothing (no
        ``updated_at``, no change-feed row): :attr:`Edited.changed` is False.

        ``attribute_changes`` sets attributes (an empty value removes one; every key is
        checked against the key rule, removed or not) over those stored, read in the
        edit's own transaction with the user's row locked: a concurrent edit of the user's
        other attributes is kept, not overwritten.  An ``attributes`` value replaces them
        all, an empty value again meaning no such attribute.

        An extension taken by a concurrent writer between the check and the write is
        refused like any taken extension (the edit runs again and its check sees it).
        """

        if attribute_changes is not None:
            validate_fields({"attributes": attribute_changes})
        ahead = self.hashes_ahead([values.get("password")])

        def write() -> Edited:
            with self.write() as conn:
                # Locked: the edit is judged on the row as committed now (a user deleted
                # or purged meanwhile is refused as such, not written or read back gone).
                row = q.fetch_user_row(conn, username, lock=True)
                wanted = dict(values)
                if attribute_changes is not None:
                    # Locked as the row is: the actor check's read may have fixed an
                    # older snapshot (MariaDB), which would lose a concurrent edit.
                    current = q.attributes_of(conn, row.id, lock=True)
                    wanted["attributes"] = merge_attributes(current, attribute_changes)
                changed = self.edit_in(conn, row, wanted, self.clock(), hashed=ahead.taker())
                return Edited(q.load_users(conn, ids=[row.id], deleted=None)[0], changed)

        return rerun_on_unique_clash(
            write,
            _EDIT_RETRIES,
            ConflictError.one(
                "username", f"{username!r} kept being changed by concurrent writers; try again"
            ),
        )

    def edit_in(
        self,
        conn: Connection,
        row: Any,
        values: Mapping[str, Any],
        now: datetime,
        *,
        line: int | None = None,
        hashed: Callable[[str], str] | None = None,
    ) -> bool:
        """Apply ``values`` to the user ``row`` on the caller's transaction; True if it changed.
        ``hashed`` gives a new password's hash, as for :meth:`add_in`.

        A change to the first admin (or any SIP secret given for it) by another
        :attr:`actor` is refused (:meth:`guard_first_admin`); an edit that changes nothing
        is not a change, so a re-imported export passes.
        """
        problems = []
        for name in IMMUTABLE_FIELDS:
            given = values.get(name)
            # Both compare ignoring ASCII case: usernames are unique so (q.username_key),
            # and the role rule itself accepts "ADMIN" as "admin".
            if given is not None and q.username_key(str(given)) != q.username_key(
                str(row._mapping[name])
            ):
                problems.append(Problem(name, "cannot be changed after creation", line))
        if problems:
            raise ForbiddenError(problems)
        if row.deleted_at is not None:
            raise ForbiddenError(
                [Problem("username", "is in deleted members; restore it before editing", line)]
            )
        present = {k: v for k, v in values.items() if v is not None and k not in IMMUTABLE_FIELDS}
        clean = self._validate(present, problems, line)
        if "profile" in present:
            self._check_profile(conn, clean, row.role, problems, line)
        if problems:
            raise InvalidInput(problems)
        if "attributes" in clean:
            clean["attributes"] = merge_attributes({}, clean["attributes"])
        update_row: dict[str, Any] = {name: clean[name] for name in _PLAIN_COLUMNS if name in clean}
        if "profile" in present:
            update_row["profile_id"] = clean.get("profile_id")
        if "extension" in clean and clean["extension"] != row.extension:
            self._check_extension_free(conn, clean["extension"], row.id, line)
        if clean.get("password"):
            update_row["password_hash"] = (hashed or credentials.hash_password)(clean["password"])
            update_row["last_password_reset_at"] = now
        if clean.get("sip_secret"):
            digests = credentials.sip_digests(row.username, self.policy.realm, clean["sip_secret"])
            update_row.update(
                sip_realm=digests.realm, sip_md5=digests.md5, sip_sha256=digests.sha256
            )
        if "avatar" in clean:
            update_row["avatar"] = clean["avatar"]
            update_row["avatar_type"] = sniff_avatar(clean["avatar"])
        changed = {k: v for k, v in update_row.items() if row._mapping.get(k) != v}
        attrs_changed = "attributes" in clean and self._attributes_differ(conn, row, clean)
        # A given SIP secret counts as a change even when it is the stored one: a refusal
        # must not tell another admin whether its guess was right.
        if changed or attrs_changed or clean.get("sip_secret"):
            self.guard_first_admin(conn, row, line=line)
        if attrs_changed:
            q.replace_attributes(conn, row.id, clean["attributes"])
        if changed or attrs_changed:
            changed["updated_at"] = now
            q.update_user(conn, row.id, changed)
        return bool(changed or attrs_changed)

    @staticmethod
    def _attributes_differ(conn: Connection, row: Any, clean: Mapping[str, Any]) -> bool:
        """True when ``clean["attributes"]`` is not what the user ``row`` holds now (a
        locking read: the transaction's snapshot may be older on MariaDB/MySQL)."""
        return bool(q.attributes_of(conn, row.id, lock=True) != clean["attributes"])

    def _validate(
        self, values: Mapping[str, Any], problems: list[Problem], line: int | None
    ) -> dict[str, Any]:
        try:
            return validate_fields(values, password_policy=self.policy.password_policy, line=line)
        except InvalidInput as exc:
            problems.extend(exc.problems)
            bad = {p.field for p in exc.problems}
            good = {k: v for k, v in values.items() if k not in bad}
            return validate_fields(good, password_policy=self.policy.password_policy, line=line)

    @staticmethod
    def _check_profile(
        conn: Connection,
        clean: dict[str, Any],
        role: str,
        problems: list[Problem],
        line: int | None,
    ) -> None:
        name = clean.pop("profile", None)
        if any(p.field == "profile" for p in problems):
            return  # given, and refused by its own rule: not also "required"
        if not name:
            if role == "user":
                problems.append(Problem("profile", "is required for role user", line))
            clean["profile_id"] = None
            return
        profile = q.profile_by_name(conn, name)
        if profile is None:
            problems.append(
                Problem("profile", f"must name an existing profile ({name!r} does not exist)", line)
            )
        else:
            clean["profile_id"] = profile.id

    @staticmethod
    def _check_extension_free(
        conn: Connection, extension: str, user_id: int | None, line: int | None
    ) -> None:
        """ConflictError (field extension) when a user other than ``user_id`` holds
        ``extension`` as the store's unique key sees it (MariaDB: ``'150 '`` for ``150``);
        a deleted holder is said to be one, as no listing of live users shows it."""
        holder = q.extension_holder(conn, extension)
        if holder is None or holder[0] == user_id:
            return
        _, owner, held, deleted = holder
        rule = f"{extension} is already used by user {owner}"
        if held != extension:
            rule = (
                f"{extension} is taken by user {owner}'s {held!r}, which the database "
                "does not tell apart"
            )
        if deleted:
            rule += f" (in deleted members: purge it to free {held})"
        raise ConflictError([Problem("extension", rule, line)])

    @staticmethod
    def _store_has_users(conn: Connection) -> bool:
        return q.has_users(conn)

    # -- state: the bulk actions ----------------------------------------------

    def _bulk(
        self, usernames: Sequence[str], change: Callable[[Connection, Any, datetime], bool]
    ) -> Bulk:
        """Apply ``change`` to every named user in one transaction, or to none; return their
        usernames, split by whether ``change`` changed the user (it returns True) or found
        it already so.  A user named more than once (in any case) is acted on and named
        once."""
        if not usernames:
            raise InvalidInput.one("username", "name at least one user")

        def write() -> Bulk:
            with self.write() as conn:
                locked = self._lock_rows(conn, usernames)
                rows: dict[int, Any] = {}
                for name in usernames:
                    if (row := locked.get(q.username_key(name))) is not None:
                        rows.setdefault(row.id, row)
                all_found(usernames, [row.username for row in rows.values()])
                now = self.clock()
                changed = {row.id: change(conn, row, now) for row in rows.values()}
            return Bulk(
                done=[r.username for r in rows.values() if changed[r.id]],
                unchanged=[r.username for r in rows.values() if not changed[r.id]],
            )

        # Run again when a deadlock with another writer (a CSV import locking the same
        # users in its rows' order) ends it.
        return rerun_on_unique_clash(
            write,
            _EDIT_RETRIES,
            ConflictError.one(
                "username", "kept being changed by concurrent writers at once; try again"
            ),
        )

    @staticmethod
    def _lock_rows(conn: Connection, usernames: Sequence[str]) -> dict[str, Any]:
        """The rows of the users named (those found), by :func:`q.username_key`, each
        locked until the transaction ends and read as committed now, not from a snapshot a
        concurrent writer has moved on from (a purge must not remove a user restored
        meanwhile).  Locked in key order whatever the names' order, so two bulk actions
        naming the same users never wait on each other's locks (a deadlock)."""
        found: dict[str, Any] = {}
        for key in sorted({q.username_key(name) for name in usernames}):
            with suppress(NotFoundError):
                found[key] = q.fetch_user_row(conn, key, lock=True)
        return found

    def _protect_first_admin(self, conn: Connection, row: Any, action: str) -> None:
        if row.id == self.first_admin_id(conn):
            raise ForbiddenError.one(
                "username", f"{row.username} is the first admin and can never be {action}"
            )

    @staticmethod
    def _not_deleted(row: Any) -> None:
        if row.deleted_at is not None:
            raise ForbiddenError.one(
                "username", f"{row.username} is in deleted members; restore it first"
            )

    def _row_to_change(self, conn: Connection, username: str) -> Any:
        """``username``'s row, locked, once :attr:`actor` may change it and it is not in
        deleted members (:class:`ForbiddenError` otherwise, :class:`NotFoundError` when
        there is no such user)."""
        row = q.fetch_user_row(conn, username, lock=True)
        self.guard_first_admin(conn, row)
        self._not_deleted(row)
        return row

    def disable(self, usernames: Sequence[str]) -> Bulk:
        def change(conn: Connection, row: Any, now: datetime) -> bool:
            self._protect_first_admin(conn, row, "disabled")
            self._not_deleted(row)
            if row.disabled:
                return False
            q.update_user(conn, row.id, {"disabled": True, "updated_at": now})
            return True

        return self._bulk(usernames, change)

    def enable(self, usernames: Sequence[str]) -> Bulk:
        def change(conn: Connection, row: Any, now: datetime) -> bool:
            self._not_deleted(row)
            if not row.disabled:
                return False
            self.guard_first_admin(conn, row)
            q.update_user(conn, row.id, {"disabled": False, "updated_at": now})
            return True

        return self._bulk(usernames, change)

    def unlock(self, usernames: Sequence[str]) -> Bulk:
        """Clear the named users' login locks and failed logins.  A user with neither as
        its next login sees them (:func:`lock_as_of`: a lock that timed out is gone) is
        unchanged, and is not written: so another admin's unlock of a first admin whose
        lock timed out is no change to refuse."""

        def change(conn: Connection, row: Any, now: datetime) -> bool:
            # A deleted member is not changed until restored (as enable and disable).
            self._not_deleted(row)
            lock = lock_as_of(row.locked_at, row.failed_logins, now, self.policy.lock_minutes)
            if lock == (None, 0):
                return False
            self.guard_first_admin(conn, row)
            q.update_user(conn, row.id, {"locked_at": None, "failed_logins": 0, "updated_at": now})
            return True

        return self._bulk(usernames, change)

    def delete(self, usernames: Sequence[str]) -> Bulk:
        """Soft delete: the user moves to deleted members, its username and extension
        reserved, and its API key revoked (cleared), so a restore brings no key back."""

        def change(conn: Connection, row: Any, now: datetime) -> bool:
            self._protect_first_admin(conn, row, "deleted")
            if row.deleted_at is not None:
                return False
            q.update_user(conn, row.id, {"deleted_at": now, **_NO_APIKEY, "updated_at": now})
            return True

        return self._bulk(usernames, change)

    def restore(self, usernames: Sequence[str]) -> Bulk:
        """Bring deleted users back, without an API key: a user deleted before delete
        revoked keys has its kept one cleared here."""

        def change(conn: Connection, row: Any, now: datetime) -> bool:
            if row.deleted_at is None:
                return False
            self.guard_first_admin(conn, row)
            q.update_user(conn, row.id, {"deleted_at": None, **_NO_APIKEY, "updated_at": now})
            return True

        return self._bulk(usernames, change)

    def purge(self, usernames: Sequence[str]) -> Bulk:
        """Remove deleted users for good, freeing their username and extension."""

        def change(conn: Connection, row: Any, now: datetime) -> bool:
            self._protect_first_admin(conn, row, "purged")
            if row.deleted_at is None:
                raise ForbiddenError.one(
                    "username", f"{row.username} is not deleted; only deleted users can be purged"
                )
            conn.execute(delete(users).where(users.c.id == row.id))
            return True

        return self._bulk(usernames, change)

    # -- secrets ----------------------------------------------------------------

    def check_password_settable(self, username: str) -> None:
        """Raise what :meth:`set_password` would refuse ``username`` for, before a password
        is asked: no such user, a deleted one, the first admin for another :attr:`actor`,
        an actor that may not act; in a read that takes no lock."""
        with self.transaction(read_only=True) as conn:
            self.actor_id(conn)
            row = q.fetch_user_row(conn, username)
            self.guard_first_admin(conn, row)
            self._not_deleted(row)

    def set_password(self, username: str, password: str) -> None:
        clean = validate_fields({"password": password}, password_policy=self.policy.password_policy)
        # Made before the transaction, which would otherwise hold the row's lock (on SQLite
        # the whole store's) for argon2's 0.1-0.3 s.
        password_hash = credentials.hash_password(clean["password"])
        with self.write() as conn:
            row = self._row_to_change(conn, username)
            now = self.clock()
            q.update_user(
                conn,
                row.id,
                {
                    "password_hash": password_hash,
                    "last_password_reset_at": now,
                    "updated_at": now,
                },
            )

    def rotate_sip_secret(self, username: str, secret: str | None = None) -> str:
        """Replace the SIP secret (generated unless given); return it to show once."""
        if secret is not None:
            secret = validate_fields({"sip_secret": secret})["sip_secret"]
        secret = secret or credentials.generate_sip_secret()
        with self.write() as conn:
            row = self._row_to_change(conn, username)
            digests = credentials.sip_digests(row.username, self.policy.realm, secret)
            q.update_user(
                conn,
                row.id,
                {
                    "sip_realm": digests.realm,
                    "sip_md5": digests.md5,
                    "sip_sha256": digests.sha256,
                    "updated_at": self.clock(),
                },
            )
        return secret

    def generate_apikey(self, username: str) -> str:
        """A new API key (replacing any old one: at most one per user); return it to show once."""
        key = credentials.generate_apikey()
        with self.write() as conn:
            row = self._row_to_change(conn, username)
            now = self.clock()
            q.update_user(
                conn,
                row.id,
                {
                    "apikey_hash": credentials.hash_apikey(key),
                    "apikey_created_at": now,
                    "updated_at": now,
                },
            )
        return key

    def remove_apikey(self, username: str) -> None:
        """Clear the user's API key; a user holding none (a deleted one included) is left
        as it is, ``updated_at`` too."""
        with self.write() as conn:
            row = q.fetch_user_row(conn, username, lock=True)
            self.guard_first_admin(conn, row)
            if row.apikey_hash is not None or row.apikey_created_at is not None:
                q.update_user(conn, row.id, {**_NO_APIKEY, "updated_at": self.clock()})

    # -- login ------------------------------------------------------------------

    def login(self, username: str, password: str) -> User:
        """Verify a login the way the platform does: count failures, lock at the limit,
        unlock by itself after ``lock_minutes``.  Raises :class:`AuthenticationError`.

        The password is verified (argon2: tens of milliseconds) outside any transaction,
        against the row as a read that takes no lock found it, so no writer waits on the
        hash (on SQLite a write transaction holds the whole file: the registration
        flusher and every other login would).  The login is then judged on the row as
        locked and read again: an account locked meanwhile (a concurrent guess's failure)
        refuses it even with the right password, and a password changed meanwhile is
        verified again, against the new one."""
        now = self.clock()
        with self.transaction(read_only=True) as conn:
            try:
                seen: Any = q.fetch_user_row(conn, username)
            except NotFoundError:
                seen = None
        if seen is None or seen.deleted_at is not None:
            # As long as a wrong password takes: timing must not tell names apart.
            credentials.spend_verification(password)
            raise AuthenticationError("invalid username or password")
        if is_locked(seen.locked_at, now, self.policy.lock_minutes):
            raise AuthenticationError(_LOCKED)
        matched = credentials.verify_password(seen.password_hash, password)
        # A right password whose hash has other costs than new ones get is hashed again
        # (outside the lock, as the verification), so that over time every stored hash
        # verifies as long as the decoy an unknown name spends.
        renewed = _renewed_hash(seen.password_hash, password) if matched else None
        refused: str | None = None
        with self.transaction() as conn:
            row = self._login_row(conn, username, seen.id)
            if is_locked(row.locked_at, now, self.policy.lock_minutes):
                raise AuthenticationError(_LOCKED)
            if row.locked_at is not None:  # the lock has expired: start afresh
                q.update_user(conn, row.id, {"locked_at": None, "failed_logins": 0})
            if row.password_hash != seen.password_hash:  # changed while it was verified
                matched = credentials.verify_password(row.password_hash, password)
            if matched:
                if row.disabled:
                    # Said only to whoever knows the password: a guess learns nothing more.
                    refused = "account is disabled; contact an administrator"
                else:
                    good: dict[str, Any] = {"failed_logins": 0}
                    if renewed is not None and row.password_hash == seen.password_hash:
                        good["password_hash"] = renewed
                    q.update_user(conn, row.id, good)
                    return q.load_users(conn, ids=[row.id])[0]
            else:
                # A disabled account's wrong passwords count too: it is no unlimited oracle.
                failures = self._count_failure(conn, row.id, now)
                refused = "invalid username or password"
                if failures >= self.policy.max_failed_logins:
                    refused = _LOCKED
        raise AuthenticationError(refused)

    @staticmethod
    def _login_row(conn: Connection, username: str, seen_id: int) -> Any:
        """The row of the user ``username`` names, locked: logins of one user are judged
        one after another, each on the count and lock the one before left.  A user
        deleted, or a name that passed to another user, since the unlocked read refuses
        the login as an unknown name does."""
        try:
            row = q.fetch_user_row(conn, username, lock=True)
        except NotFoundError:
            raise AuthenticationError("invalid username or password") from None
        if row.id != seen_id or row.deleted_at is not None:
            raise AuthenticationError("invalid username or password")
        return row

    def authenticate_apikey(self, key: str) -> User:
        """The live, enabled user holding API key ``key``, or :class:`AuthenticationError`.

        The user is found by the key's SHA-256 (:func:`credentials.hash_apikey`) through
        the unique index on ``apikey_hash``, the stored hash then compared in constant
        time.  An unknown key (a wrong, removed or replaced one) and a deleted user's key
        are refused alike, "invalid API key"; a disabled user's key is refused saying so,
        which only whoever holds the key learns (as a login names a disabled account only
        to whoever knows its password).  An API key is a 256-bit random token hashed
        with a fast hash, so every path costs one SHA-256 and one indexed lookup (an
        unknown key as long as a deleted user's): no argon2 decoy is needed.  Nothing is
        counted or locked (a key cannot be guessed); a lock from failed password logins
        does not refuse it.
        """
        digest = credentials.hash_apikey(key)
        with self.transaction() as conn:
            row = conn.execute(
                select(users.c.id, users.c.apikey_hash, users.c.disabled, users.c.deleted_at)
                .where(users.c.apikey_hash == digest)
                .limit(1)
            ).first()
            if (
                row is None
                or not credentials.same_digest(row.apikey_hash, digest)
                or row.deleted_at is not None
            ):
                raise AuthenticationError("invalid API key")
            if row.disabled:
                raise AuthenticationError("account is disabled; contact an administrator")
            return q.load_users(conn, ids=[row.id])[0]

    def _count_failure(self, conn: Connection, user_id: int, now: datetime) -> int:
        """Count one failed login and lock at the limit; return the count.  A failure
        ``lock_minutes`` or more after the one before (or after one of unknown time)
        counts afresh, so failures spread over months never add up to a lock; with
        ``lock_minutes`` 0 (admin unlock only) every failure counts until a good login."""
        # Atomic increment: concurrent failed logins all count.
        count = users.c.failed_logins + 1
        if self.policy.lock_minutes > 0:
            recent = users.c.failed_login_at > now - timedelta(minutes=self.policy.lock_minutes)
            count = case((recent, count), else_=1)
        # In this order: MySQL/MariaDB evaluate SET left to right, each assignment seeing
        # the ones before, so the count must read the previous failed_login_at.
        conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .ordered_values((users.c.failed_logins, count), (users.c.failed_login_at, now))
        )
        failures = int(
            conn.execute(
                users.select().with_only_columns(users.c.failed_logins).where(users.c.id == user_id)
            ).scalar_one()
        )
        if failures >= self.policy.max_failed_logins:
            conn.execute(
                update(users)
                .where(users.c.id == user_id, users.c.locked_at.is_(None))
                .values(locked_at=now)
            )
        return failures
