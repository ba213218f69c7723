"""Run one ``sync --once`` reconcile and SIGKILL this process at a named step of the apply.

Usage: ``python tests/crash_driver.py CONFIG STEP``.  Steps:

- ``temp_written``: the new file's temporary copy is written and fsynced, nothing renamed;
- ``backup_made``: ``<name>.bak`` replaced, the file itself not yet;
- ``renamed``: the new file renamed into place, its directory not yet fsynced;
- ``applied``: the reconcile returned (the file is complete; Asterisk not told yet);
- ``rows_written``: realtime rows of one statement written, the transaction open;
- ``before_commit``: every realtime row written, the transaction not committed;
- ``none``: no kill (exit 0).

The hooks wrap the real functions (they call them, then kill), so everything before the
kill happened exactly as in production.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from provisioner.config import load_config
from provisioner.daemon import build_target
from provisioner.pjsip import RenderSettings
from provisioner.store.engine import open_engine
from provisioner.sync import reconcile
from provisioner.targets import files, realtime


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after(module: Any, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Make ``module.name`` call the original, then die if ``when(*args)``."""
    original = getattr(module, name)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            _die()
        return result

    setattr(module, name, hooked)


def _install(step: str, target_path: str) -> None:
    if step == "temp_written":
        _after(files, "write_synced")
        _after(files, "_finish_temporary")  # a staged write's fsync (a first full apply)
    elif step == "backup_made":
        _after(files, "keep_backup")
    elif step == "renamed":

        def replaced_target(src: Any, dst: Any, **_: Any) -> bool:
            return bool(os.fspath(dst) == target_path)

        # provisioner.targets.files' ``os`` is the os module itself: hooking os.replace
        # there hooks it for the targets' renames.
        _after(os, "replace", replaced_target)
    elif step == "rows_written":
        _after(realtime, "run_many")  # every row write but COPY and JSON inserts
    elif step == "before_commit":
        _after(realtime, "_write")
    elif step not in ("applied", "none"):
        raise SystemExit(f"unknown step {step!r}")


def main(config_path: str, step: str) -> int:
    config = load_config(config_path)
    engine = open_engine(config.store.url, busy_timeout=config.store.busy_timeout)
    target = build_target(config, engine)
    _install(step, str(config.target.path))
    report = reconcile(
        engine,
        target,
        RenderSettings.from_config(config),
        max_removal_fraction=config.daemon.max_removal_fraction,
    )
    print(f"applied: added {len(report.change.added)}, removed {len(report.change.removed)}")
    if step == "applied":
        _die()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
