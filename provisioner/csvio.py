"""Users to and from CSV: the admins' export, bulk edit and re-import.

An export never holds a secret.  An import is all-or-nothing: every row is
validated against the rules and the store inside one transaction, every bad row
is reported with its line number, field and rule, and if any row is bad the
transaction is rolled back, so nothing changes.

Columns: the fixed ones in :data:`COLUMNS`, then one ``attr:KEY`` column per
custom attribute (an empty cell means the user has no such attribute; an existing
user's attributes that no column names are kept, like any missing column).  An
import also accepts ``password`` and ``sip_secret`` columns (empty: keep the
current one, or generate a SIP secret for a new user).

Cells that a spreadsheet would run as a formula (starting with ``= + - @``, tab,
CR or LF, also after leading blanks, which spreadsheets skip, and in the full-width
forms ``＝ ＋ － ＠`` that some convert on input) are exported with a leading ``'``,
which the import removes again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .accounts import Accounts, rerun_on_unique_clash
from .errors import ConflictError, InvalidInput, NotFoundError, Problem, ProvisionerError
from .model import User, check_attributes, check_flag, merge_attributes, validate_fields
from .store import queries as q

__all__ = ["COLUMNS", "ImportResult", "export_users", "import_users"]

COLUMNS = (
    "username",
    "role",
    "profile",
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
    "disabled",
    "log_level",
    "messenger_sound",
    "toast_position",
)
SECRET_COLUMNS = ("password", "sip_secret")
ATTR_PREFIX = "attr:"
#: Runs of an import whose write a unique key refused (a concurrent writer took an
#: extension it allocated): each run checks every row afresh.
_IMPORT_ATTEMPTS = 5
_FORMULA_START = ("=", "+", "-", "@", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_BLANKS = " \t\r\n\u00a0\u3000"


def _formula_like(cell: str) -> bool:
    """Whether a spreadsheet may run ``cell`` once its leading quotes are gone: it starts
    with a tab, CR or LF, or its first character after blanks starts a formula."""
    body = cell.lstrip("'")
    return body.startswith(("\t", "\r", "\n")) or body.lstrip(_BLANKS).startswith(_FORMULA_START)


def _defuse(cell: str) -> str:
    # A cell that already looks defused ("'=x": quotes, then a formula start) gets one
    # more quote too, so that the import's single strip gives back exactly "'=x".
    return "'" + cell if _formula_like(cell) else cell


def _refuse(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and _formula_like(cell) else cell


def _cells(user: User) -> dict[str, str]:
    v = user.voice
    return {
        "username": user.username,
        "role": user.role,
        "profile": user.profile or "",
        "full_name": user.full_name,
        "email": user.email,
        "description": user.description,
        "extension": user.extension,
        "transport": v.transport,
        "nat": v.nat,
        "codecs": ",".join(v.codecs),
        "context": v.context,
        "call_group": v.call_group,
        "pickup_group": v.pickup_group,
        "video": v.video,
        "disabled": "yes" if user.disabled else "no",
        "log_level": user.log_level or "",
        "messenger_sound": "on" if user.messenger_sound else "off",
        "toast_position": user.toast_position,
    }


def export_users(users: Sequence[User], out: TextIO) -> int:
    """Write ``users`` as CSV to ``out``; return the number of rows."""
    # One column per key ignoring case (as keys are one key so), named by its first spelling.
    attr_keys: dict[str, str] = {}
    for key in sorted({k for u in users for k in u.attributes}):
        attr_keys.setdefault(key.lower(), key)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *(ATTR_PREFIX + k for k in attr_keys.values())])
    for user in users:
        cells = _cells(user)
        held = {k.lower(): v for k, v in sorted(user.attributes.items(), reverse=True)}
        row = [cells[c] for c in COLUMNS] + [held.get(k, "") for k in attr_keys]
        writer.writerow([_defuse(c) for c in row])
    return len(users)


@dataclass
class ImportResult:
    """What an import did (or, with ``dry_run``, would do)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: SIP secrets generated for new users: shown once, then gone.
    generated_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    dry_run: bool = False


class _DryRun(Exception):
    """Raised inside the import transaction to roll a valid dry run back."""


def _read(source: TextIO) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    reader = csv.reader(source)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput([Problem("header", "the file is empty", 1)]) from None
    except csv.Error as exc:
        raise InvalidInput([Problem("csv", str(exc), 1)]) from None
    if header:
        # A UTF-8 byte-order mark, as Excel saves CSV, is no part of the first column's
        # name (the CLI reads files as utf-8-sig; text handed in here may still hold it).
        header[0] = header[0].removeprefix("\ufeff")
    header = [h.strip() for h in header]
    problems = []
    known = set(COLUMNS) | set(SECRET_COLUMNS)
    for name in header:
        if name.startswith(ATTR_PREFIX):
            # Checked here, not only with a cell's value: an empty cell removes the key.
            _, rule = check_attributes({name[len(ATTR_PREFIX) :]: ""})
            if rule is not None:
                problems.append(Problem(name, rule, 1))
        elif name not in known:
            problems.append(Problem(name or "(empty)", "is not a known column", 1))
    if len(set(header)) != len(header):
        problems.append(Problem("header", "has a repeated column", 1))
    attr_columns: dict[str, str] = {}
    for name in header:
        # Attribute keys are one key ignoring case (see model.check_attributes).
        first = (
            attr_columns.setdefault(name.lower(), name) if name.startswith(ATTR_PREFIX) else name
        )
        if first != name:
            problems.append(Problem(name, f"repeats column {first}", 1))
    if "username" not in header:
        problems.append(Problem("username", "column is required", 1))
    if problems:
        raise InvalidInput(problems)
    rows = []
    try:
        # A row is named by the line it starts on (a quoted cell may hold line breaks).
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                problems.append(
                    Problem("row", f"has {len(cells)} cells, the header has {len(header)}", line)
                )
                continue
            # Secrets are never exported, so never quoted: a leading ' is part of the secret.
            rows.append(
                (
                    line,
                    {
                        h: c if h in SECRET_COLUMNS else _refuse(c)
                        for h, c in zip(header, cells, strict=True)
                    },
                )
            )
    except csv.Error as exc:
        problems.append(Problem("csv", str(exc), reader.line_num))
    if problems:
        raise InvalidInput(problems)
    return header, rows


def _values(header: Sequence[str], cells: dict[str, str]) -> dict[str, Any]:
    """A row's cells as user field values; empty secret cells mean "keep".  ``attributes``
    (when the header has ``attr:`` columns) maps each named key to its cell, empty for
    "remove"."""
    values: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    has_attrs = False
    for name in header:
        cell = cells[name]
        if name.startswith(ATTR_PREFIX):
            has_attrs = True
            attrs[name[len(ATTR_PREFIX) :]] = cell
        elif name in SECRET_COLUMNS:
            if cell != "":
                values[name] = cell
        elif name == "disabled":
            values[name] = cell
        elif name == "extension" and cell == "":
            continue  # new user: allocate; existing user: keep
        elif name == "role" and cell == "":
            # As a missing column: an existing user keeps its role (an empty cell is no
            # change of it), a new user gets the default role, as 'user add' gives.
            continue
        else:
            values[name] = cell
    if has_attrs:
        values["attributes"] = attrs
    return values


def import_users(
    accounts: Accounts,
    source: TextIO | str,
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Add or update (by username) every user in the CSV, all in one transaction.

    Raises :class:`InvalidInput` listing every bad row's line, field and rule;
    then nothing has changed.  With ``dry_run`` everything is checked and rolled back.
    When a concurrent writer takes an extension or a name the import meant to write,
    the import runs again from the first row, so it allocates past it or reports the
    clash on its row, never a database error.  With an acting admin
    (:attr:`Accounts.actor`) a row that would change the first admin is refused, on its
    line, unless that admin is the first admin itself (unchanged rows pass).
    """
    if isinstance(source, str):
        source = io.StringIO(source)
    header, rows = _read(source)
    takers = _hash_takers(accounts, rows, dry_run)
    return rerun_on_unique_clash(
        lambda: _import_rows(accounts, header, rows, dry_run, progress, takers()),
        _IMPORT_ATTEMPTS,
        ConflictError.one("csv", "other writers kept taking the same extensions; try again"),
    )


def _hash_takers(
    accounts: Accounts, rows: Sequence[tuple[int, dict[str, str]]], dry_run: bool
) -> Callable[[], Callable[[str], str]]:
    """What gives each run of the import its passwords' hashes: those of the file's
    password cells, made now (:meth:`Accounts.hashes_ahead`); for a dry run, which is
    rolled back, none (argon2 takes 0.1-0.3 s a password, for nothing kept)."""
    if dry_run:
        return lambda: _unhashed
    return accounts.hashes_ahead(cells.get("password") for _line, cells in rows).taker


def _unhashed(password: str) -> str:
    """What a dry run stores for a password: no hash (it is rolled back)."""
    return ""


def _import_rows(
    accounts: Accounts,
    header: Sequence[str],
    rows: Sequence[tuple[int, dict[str, str]]],
    dry_run: bool,
    progress: Callable[[int], None] | None,
    hashed: Callable[[str], str],
) -> ImportResult:
    """One run of the import in one transaction (see :func:`import_users`); ``hashed``
    gives the passwords' hashes, made before it (:meth:`Accounts.hashes_ahead`)."""
    result = ImportResult(dry_run=dry_run)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        with accounts.write() as conn:
            # Parked first, so the numbers that rows move users off are free to allocate.
            _park_moving_extensions(conn, rows)
            allocator = q.ExtensionAllocator(
                conn, accounts.policy.ext_first, accounts.policy.ext_last
            )
            # Every extension the file gives is kept from the rows that have one
            # allocated, whatever their order: an earlier row must not take the number
            # a later row asks for (the file could then not be imported as written).
            for _line, cells in rows:
                if cells.get("extension"):
                    allocator.reserve(cells["extension"])
            repeated = _repeated_extensions(rows)
            if rows and not q.has_users(conn):
                _admin_row_first(rows)
            now = accounts.clock()
            for done, (line, cells) in enumerate(rows, 1):
                key = q.username_key(cells.get("username", ""))
                if key in seen:
                    problems.append(Problem("username", f"repeats line {seen[key]}", line))
                    continue
                if key:  # an empty one names no user: each such row is refused as required
                    seen[key] = line
                if line in repeated:
                    problems.append(repeated[line])
                    continue
                try:
                    _apply_row(accounts, conn, header, cells, line, allocator, now, result, hashed)
                except ProvisionerError as exc:
                    problems.extend(_as_problems(exc, line))
                if progress is not None:
                    progress(done)
            if problems:
                raise InvalidInput(problems)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    if dry_run:
        result.generated_secrets.clear()
    return result


def _admin_row_first(rows: Sequence[tuple[int, dict[str, str]]]) -> None:
    """Refuse, with one problem, a file for a store with no user yet whose first row adds
    no admin: every row before the admin's would fail "the first user must be an admin",
    one line each, never saying what to do."""
    admins = [line for line, cells in rows if cells.get("role", "").lower() == "admin"]
    if admins and admins[0] == rows[0][0]:
        return
    rule = "the store has no user yet and its first user must be an admin"
    if admins:
        rule += f": put the admin's row (line {admins[0]}) first"
    else:
        rule += (
            ", while no row of the file adds one: add the admin first "
            "(provisioner user add NAME --role admin ...)"
        )
    raise InvalidInput.one("csv", rule)


def _given_extension(cells: dict[str, str]) -> str | None:
    """The row's extension cell when it is a valid extension, else None (none given, or
    one that the row's own checks refuse)."""
    cell = cells.get("extension", "")
    try:
        return str(validate_fields({"extension": cell})["extension"]) if cell else None
    except InvalidInput:
        return None


def _repeated_extensions(rows: Sequence[tuple[int, dict[str, str]]]) -> dict[int, Problem]:
    """A problem on field ``extension`` for every row giving an extension that another row
    of the file gives too, naming the other rows' lines (two users cannot end with one
    number); the same problems whatever the rows' order."""
    lines: dict[str, list[int]] = {}
    for line, cells in rows:
        extension = _given_extension(cells)
        if extension is not None:
            lines.setdefault(extension, []).append(line)
    repeated: dict[int, Problem] = {}
    for extension, given in lines.items():
        for line in given if len(given) > 1 else ():
            others = ", ".join(str(n) for n in given if n != line)
            where = "lines" if len(given) > 2 else "line"
            rule = f"{extension} is also given on {where} {others}"
            repeated[line] = Problem("extension", rule, line)
    return repeated


def _park_moving_extensions(conn: Any, rows: Sequence[tuple[int, dict[str, str]]]) -> None:
    """Move every existing user whose row gives it another extension off its current one,
    to a placeholder no valid extension equals, before any row is applied.

    So the rows are checked against the file's final state, not against the store half
    way through it: a swap (alice takes bob's number, bob alice's) or a chain applies in
    any row order, while a number still held at the end (by a user the file leaves on
    it) is refused.  Every parked user's row then writes its new extension or is
    refused, and any refusal rolls the whole import back, so no placeholder is kept.
    """
    moving = {
        cells["username"]: extension
        for _line, cells in rows
        if (extension := _given_extension(cells)) is not None and cells.get("username")
    }
    held = q.extensions_by_username(conn, moving, lock=True)
    for username, extension in moving.items():
        found = held.get(q.username_key(username))
        if found is not None and found[1] != extension:
            q.update_user(conn, found[0], {"extension": f"moving-{found[0]}"})


def _apply_row(
    accounts: Accounts,
    conn: Any,
    header: Sequence[str],
    cells: dict[str, str],
    line: int,
    allocator: q.ExtensionAllocator,
    now: Any,
    result: ImportResult,
    hashed: Callable[[str], str],
) -> None:
    """Add or update the row's user; :class:`InvalidInput` naming every rule the row
    breaks, its ``disabled`` cell's beside its fields'."""
    values = _values(header, cells)
    disabled = values.pop("disabled", None)
    problems: list[Problem] = []
    if disabled not in (None, "") and (rule := check_flag(disabled)[1]) is not None:
        problems.append(Problem("disabled", rule, line))
        disabled = None  # the fields are still checked
    try:
        _apply_fields(accounts, conn, values, line, allocator, now, result, disabled, hashed)
    except InvalidInput as exc:
        problems[:0] = exc.problems
    if problems:
        raise InvalidInput(problems)


def _apply_fields(
    accounts: Accounts,
    conn: Any,
    values: dict[str, Any],
    line: int,
    allocator: q.ExtensionAllocator,
    now: Any,
    result: ImportResult,
    disabled: str | None,
    hashed: Callable[[str], str],
) -> None:
    """Add or update the row's user from ``values``, then set its ``disabled`` cell."""
    username = values.get("username", "")
    try:
        # Locked, and its attributes read with a locking read (which sees what is
        # committed now, not the transaction's snapshot): a concurrent edit of the
        # user's other attributes is kept, not overwritten with what the import read.
        row = q.fetch_user_row(conn, username, lock=True) if username else None
    except NotFoundError:
        row = None
    if "attributes" in values:
        stored = {} if row is None else q.attributes_of(conn, row.id, lock=True)
        values["attributes"] = merge_attributes(stored, values["attributes"])
    if row is None:
        user_id, secret = accounts.add_in(conn, values, allocator, now, line=line, hashed=hashed)
        if secret:
            result.generated_secrets[username] = secret
        result.added.append(username)
        if disabled not in (None, ""):
            _set_disabled(accounts, conn, user_id, disabled, line, now)
        return
    if "extension" in values and values["extension"] != row.extension:
        allocator.reserve(values["extension"])
    changed = accounts.edit_in(conn, row, values, now, line=line, hashed=hashed)
    if disabled not in (None, ""):
        changed = _set_disabled(accounts, conn, row.id, disabled, line, now, row) or changed
    (result.updated if changed else result.unchanged).append(row.username)


def _set_disabled(
    accounts: Accounts,
    conn: Any,
    user_id: int,
    cell: str,
    line: int,
    now: Any,
    row: Any = None,
) -> bool:
    flag, rule = check_flag(cell)
    if rule is not None:
        raise InvalidInput([Problem("disabled", rule, line)])
    if row is not None and bool(row.disabled) == flag:
        return False
    if flag and user_id == accounts.first_admin_id(conn):
        raise InvalidInput([Problem("disabled", "the first admin can never be disabled", line)])
    if row is not None:
        accounts.guard_first_admin(conn, row, line=line)
    q.update_user(conn, user_id, {"disabled": flag, "updated_at": now})
    return True


def _as_problems(exc: ProvisionerError, line: int) -> Iterable[Problem]:
    if isinstance(exc, InvalidInput):
        return [Problem(p.field, p.rule, line) for p in exc.problems]
    return [Problem("row", exc.message, line)]
