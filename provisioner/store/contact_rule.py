"""A user's contacts went with its registration summary, and with the user (migrations 0011-0013).

``registrations`` (one row per contact) has no foreign key to ``users``: its check ran
once per inserted contact, and on PostgreSQL it was a fifth of the server's time of a
storm's write (3.7 of 17.6 µs an event of a 2,500-endpoint batch into a 50k store; of a
first storm, whose summaries are new, 4 of 23).  Its ``ON DELETE CASCADE`` is kept by
triggers instead: deleting a summary row (as deleting its user does, through the
summary's own foreign key, which stays) deletes that user's contacts on that server.

Every contact the store holds has its summary: the writers put an endpoint's contacts
and summary in one batch, and no statement deletes a summary and keeps its contacts.
A user hard-deleted while a batch that matched it commits leaves nothing behind: the
batch's summary upsert locks the user's summary row (an existing one) or checks the
foreign key, which locks the user (a new one), so the deletion's cascade waits for the
batch and its trigger then sees the batch's contacts (PostgreSQL, MariaDB), or the batch
finds no user (SQLite writes one at a time).

Per database:
- PostgreSQL: a row trigger on ``registration_summary`` (a cascade from ``users`` fires
  it) and a ``TRUNCATE`` trigger; the function runs with its owner's rights;
- SQLite: a row trigger on ``registration_summary``;
- MariaDB/MySQL: the same, and one on ``users``: InnoDB's cascades fire no trigger.

Migration 0014 moved each user's contacts into its summary row (``contacts``) and
dropped ``registrations`` with these triggers: a summary's contacts now go with its row.
This module is kept for the migrations that make and drop the rule (0011, 0014's
downgrade); the store at the newest revision has none of it.  The DDL is constant text
(no input is ever formatted into it).
"""

from __future__ import annotations

__all__ = [
    "CONTACT_RULE_TRIGGERS",
    "contact_rule_ddl",
    "ddl_family",
    "drop_contact_rule_ddl",
]

_FORGET = "DELETE FROM registrations WHERE user_id = OLD.user_id AND server = OLD.server"

_PG_FUNCTION = f"""CREATE OR REPLACE FUNCTION provisioner_forget_contacts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM registrations;
    ELSE
        {_FORGET};
    END IF;
    RETURN NULL;
END
$$"""

#: The triggers' names per database family, as :func:`contact_rule_ddl` makes them.
CONTACT_RULE_TRIGGERS = {
    "postgresql": ("trg_registration_summary_contacts", "trg_registration_summary_truncate"),
    "sqlite": ("trg_registration_summary_contacts",),
    "mysql": ("trg_registration_summary_contacts", "trg_users_contacts"),
}


def ddl_family(dialect: str) -> str:
    """``dialect`` as a key of :data:`CONTACT_RULE_TRIGGERS` and the name of its DDL file
    (``sql/store/<family>.sql``; MariaDB is ``mysql``); ValueError for another."""
    family = "mysql" if dialect == "mariadb" else dialect
    if family not in CONTACT_RULE_TRIGGERS:
        raise ValueError(f"no contact rule for {dialect}")
    return family


def contact_rule_ddl(dialect: str) -> list[str]:
    """The statements that make a summary's deletion (and a user's) delete its contacts."""
    family = ddl_family(dialect)
    if family == "postgresql":
        return [
            _PG_FUNCTION,
            "CREATE TRIGGER trg_registration_summary_contacts AFTER DELETE ON "
            "registration_summary FOR EACH ROW EXECUTE FUNCTION provisioner_forget_contacts()",
            "CREATE TRIGGER trg_registration_summary_truncate AFTER TRUNCATE ON "
            "registration_summary FOR EACH STATEMENT "
            "EXECUTE FUNCTION provisioner_forget_contacts()",
        ]
    if family == "sqlite":
        return [
            "CREATE TRIGGER trg_registration_summary_contacts AFTER DELETE ON "
            f"registration_summary FOR EACH ROW BEGIN {_FORGET}; END"
        ]
    # One statement per trigger body: no DELIMITER games needed.
    return [
        "CREATE TRIGGER trg_registration_summary_contacts AFTER DELETE ON "
        f"registration_summary FOR EACH ROW {_FORGET}",
        "CREATE TRIGGER trg_users_contacts AFTER DELETE ON users FOR EACH ROW "
        "DELETE FROM registrations WHERE user_id = OLD.id",
    ]


def drop_contact_rule_ddl(dialect: str) -> list[str]:
    """The statements that undo :func:`contact_rule_ddl`."""
    family = ddl_family(dialect)
    if family == "postgresql":
        return [
            "DROP TRIGGER IF EXISTS trg_registration_summary_contacts ON registration_summary",
            "DROP TRIGGER IF EXISTS trg_registration_summary_truncate ON registration_summary",
            "DROP FUNCTION IF EXISTS provisioner_forget_contacts()",
        ]
    return [f"DROP TRIGGER IF EXISTS {name}" for name in CONTACT_RULE_TRIGGERS[family]]
