"""A target file's ``.bak`` holds the digests the file held: it is never wider than the
mode provisioner gives its files (0640), whatever mode the former file had."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.targets.files import FILE_MODE, atomic_write

#: A user that is not root and owns nothing here.
NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("before", "kept"), [(0o644, 0o640), (0o666, 0o640), (0o604, 0o600), (0o600, 0o600)]
)
def test_the_backup_of_a_wider_file_is_narrowed(tmp_path: Path, before: int, kept: int) -> None:
    """The .bak of a target file that others could read (made by hand, or by an older
    version) keeps no bit wider than 0640 (a narrower mode stays as it was), and holds
    the former bytes; the new file is 0640."""
    path = tmp_path / "pjsip_users.conf"
    path.write_bytes(b"; by hand\n")
    os.chmod(path, before)
    atomic_write(path, b"; new\n", backup=True)
    backup = tmp_path / "pjsip_users.conf.bak"
    assert backup.read_bytes() == b"; by hand\n"
    assert _mode(backup) == kept
    assert _mode(path) == FILE_MODE


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may reach (pytest's own are root's alone, 0700)."""
    with tempfile.TemporaryDirectory(prefix="backup-mode-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
@pytest.mark.parametrize("before", [0o644, 0o666], ids=["not-linkable", "linkable"])
def test_the_backup_of_a_file_the_writer_does_not_own_is_narrowed(
    open_dir: Path, before: int
) -> None:
    """A writer that is not the owner of the former file (root's, 0644: the kernel
    refuses it a hard link; 0666: linked, but not its to chmod) still keeps a .bak no
    wider than 0640, of its own, holding the former bytes."""
    directory = open_dir / "asterisk"
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    path = directory / "pjsip_users.conf"
    path.write_bytes(b"; root's\n")
    os.chmod(path, before)
    script = (
        "import sys; from pathlib import Path; from provisioner.targets.files import "
        "atomic_write; atomic_write(Path(sys.argv[1]), b'; new\\n', backup=True)"
    )
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    subprocess.run(
        [*as_nobody, sys.executable, "-c", script, str(path)],
        check=True,
        cwd=directory,
        timeout=60,
    )
    backup = directory / "pjsip_users.conf.bak"
    assert backup.read_bytes() == b"; root's\n"
    assert _mode(backup) == 0o640
    assert backup.stat().st_uid == NOBODY
    assert path.read_bytes() == b"; new\n"
