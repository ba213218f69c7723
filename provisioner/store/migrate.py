"""Schema migrations (alembic), run programmatically: ``provisioner db upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine

from ..errors import StoreUnavailable

__all__ = ["current_revision", "downgrade", "head_revision", "known_revision", "upgrade"]

_HERE = Path(__file__).parent / "migrations"


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_HERE))
    return cfg


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revision(revision: str) -> bool:
    """Whether this version has the migration ``revision`` (a newer one may have migrated
    the store past every migration this version knows)."""
    try:
        ScriptDirectory.from_config(_alembic_config()).get_revision(revision)
    except CommandError:
        return False
    return True


def _from_known(before: str | None) -> None:
    """Raise :class:`StoreUnavailable` when the store is at a revision this version does
    not know: alembic would end in a traceback, and no migration of ours can apply."""
    if before is not None and not known_revision(before):
        raise StoreUnavailable(
            f"the store's schema is at revision {before!r}, which this provisioner does not "
            f"know (its newest is {head_revision()!r}): a newer provisioner migrated it; "
            "run that version"
        )


def current_revision(engine: Engine) -> str | None:
    """The revision the store is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Create or migrate the schema to ``revision``; return (before, after)."""
    before = current_revision(engine)
    _from_known(before)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, head_revision() if revision == "head" else revision


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str]:
    """Migrate the schema back to ``revision``; return (before, after)."""
    before = current_revision(engine)
    _from_known(before)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return before, revision
