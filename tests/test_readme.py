"""README's named log events and metrics are the ones the code emits and serves."""

from __future__ import annotations

import re
from pathlib import Path

from provisioner.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _paragraph(start: str, end: str) -> str:
    """README's text from ``start`` up to the next ``end``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin = text.index(start)
    return text[begin : text.index(end, begin)]


def _source() -> str:
    """Every module of the provisioner package, joined."""
    files = sorted((ROOT / "provisioner").rglob("*.py"))
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


def _config_keys() -> set[str]:
    """Every ``section.key`` of the configuration, which README also writes in backticks."""
    keys: set[str] = set()
    for name, info in Config.model_fields.items():
        fields = getattr(info.annotation, "model_fields", {})
        keys.update(f"{name}.{key}" for key in fields)
    return keys


def test_every_log_event_readme_names_is_emitted() -> None:
    """Each event of README's "Named events" list is a quoted string in provisioner/."""
    names = re.findall(r"`([a-z_]+\.[a-z_]+)`", _paragraph("Named events", "**Checks.**"))
    events = [name for name in names if name not in _config_keys()]
    assert len(events) > 20
    source = _source()
    assert [event for event in events if f'"{event}"' not in source] == []


def test_every_metric_readme_names_is_served() -> None:
    """Each metric of README's "Metrics" paragraph is registered in provisioner/metrics.py."""
    names = re.findall(r"`(provisioner_[a-z_]+)", _paragraph("**Metrics.**", "\n\n"))
    assert len(names) == 8
    source = (ROOT / "provisioner" / "metrics.py").read_text(encoding="utf-8")
    served = [re.sub(r"_total$", "", name) for name in names]
    assert [name for name in served if f'"{name}"' not in source] == []


def test_every_section_dotted_name_readme_writes_is_a_key_or_an_event() -> None:
    """Each `section.name` README writes is a config key, an emitted event, a module or a def."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = set(Config.model_fields)
    names = {n for n in re.findall(r"`([a-z_]+\.[a-z_]+)`", text) if n.split(".")[0] in sections}
    source = _source()
    known = _config_keys()
    unknown = [
        name
        for name in sorted(names)
        if name not in known
        and f'"{name}"' not in source
        and not name.endswith(".py")
        and f"def {name.split('.')[1]}(" not in source
    ]
    assert unknown == []
