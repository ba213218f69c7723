"""pyproject.toml's dependency floors and constraints/minimum.txt, the pins the suite is
run against by ``scripts/test-min.sh``, stay one and the same list."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version  # installed with pytest, which needs it

ROOT = Path(__file__).resolve().parent.parent

#: Lint tools: run by scripts/test.sh at their latest release, never by test-min.sh.
LINT_ONLY = {"mypy", "ruff"}

_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(>=|==)\s*([0-9][0-9A-Za-z.]*)$")


def _name(text: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", text).lower()


def _parsed(requirement: str, operator: str) -> tuple[str, Version]:
    """``(name, version)`` of ``name[extras] <operator> version``; anything else fails."""
    match = _REQUIREMENT.match(requirement.strip())
    assert match is not None, f"not 'name{operator}version': {requirement!r}"
    assert match.group(3) == operator, f"not {operator}: {requirement!r}"
    return _name(match.group(1)), Version(match.group(4))


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    floors = dict(_parsed(item, ">=") for item in listed)
    return {name: version for name, version in floors.items() if name not in LINT_ONLY}


def _pins() -> dict[str, Version]:
    lines = (ROOT / "constraints" / "minimum.txt").read_text().splitlines()
    kept = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return dict(_parsed(line, "==") for line in kept)


def test_every_floor_is_pinned_in_the_minimum_constraints() -> None:
    """Each dependency's ``>=`` floor in pyproject.toml is exactly its ``==`` pin in
    constraints/minimum.txt, and neither lists a package the other does not."""
    assert _floors() == _pins()
