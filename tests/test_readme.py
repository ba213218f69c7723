"""README's claims that can be checked mechanically: named log events and metrics, config
keys and bounds, environment overrides, exit codes, the NAT table, the command block."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import annotated_types
import click

from provisioner.cli import cli
from provisioner.config import AsteriskServer, Config
from provisioner.errors import ProvisionerError
from provisioner.pjsip import NAT_OPTIONS

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
    assert len(names) == 12
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


def _upper_bound(section: str, key: str) -> float:
    """The ``le`` bound of the config key ``section.key``."""
    model: Any = Config.model_fields[section].annotation
    info = model.model_fields[key]
    bound: Any = next(m.le for m in info.metadata if isinstance(m, annotated_types.Le))
    return float(bound)


#: README's units for the bounds it states, in seconds or bytes.
_UNITS = {"s": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


def test_every_upper_bound_readme_states_is_the_config_bound() -> None:
    """Each bound of README's "Every duration has an upper bound" sentence is the key's ``le``."""
    text = _paragraph("Every duration has an upper bound", "Only a file that cannot")
    text = re.sub(r"\([^)]*\)", "", text)  # "(a day)", "(at least 64 KiB)"
    pending: list[str] = []
    stated: dict[str, float] = {}
    for key, number, unit in re.findall(
        r"`([a-z_]+\.[a-z_]+)`|\b(\d[\d,]*)\s*(s|KiB|MiB|GiB)?\b", text
    ):
        if key:
            pending.append(key)
        elif pending:
            stated.update(dict.fromkeys(pending, int(number.replace(",", "")) * _UNITS[unit]))
            pending = []
    assert len(stated) == 25
    assert not pending
    wrong = {
        key: (value, _upper_bound(*key.split(".")))
        for key, value in stated.items()
        if _upper_bound(*key.split(".")) != value
    }
    assert wrong == {}


def test_readme_nat_table_is_the_mapping() -> None:
    """README's NAT table has a row per NAT setting, equal to ``pjsip.NAT_OPTIONS``."""
    table = _paragraph("| NAT | force_rport", "\n\n")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["NAT", "force_rport", "rewrite_contact", "rtp_symmetric", "direct_media"]
    assert {row[0]: tuple(row[1:]) for row in rows[2:]} == dict(NAT_OPTIONS)


def test_readme_exit_codes_are_the_errors_codes() -> None:
    """The exit codes README lists (2 to 10) are those of provisioner's errors, 1 aside."""
    listed = _paragraph("exits non-zero (", "`provisioner check` exits 1")
    codes = {int(n) for n in re.findall(r"(?:\(|, )(\d+) ", listed)}

    def subclasses(cls: type[ProvisionerError]) -> set[type[ProvisionerError]]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(sub) for sub in found))

    raised = {cls.exit_code for cls in subclasses(ProvisionerError)} - {1}
    assert codes == raised == set(range(2, 11))


def _env_names() -> set[str]:
    """Every ``PROVISIONER_<SECTION>__<KEY>`` README or the systemd unit names."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text += (ROOT / "systemd" / "provisioner.service").read_text(encoding="utf-8")
    return set(re.findall(r"\bPROVISIONER_[A-Z0-9]+(?:__[A-Z0-9_]+)+", text))


def test_every_environment_override_readme_names_is_a_key() -> None:
    """Each ``PROVISIONER_<SECTION>__<KEY>`` named in README or the unit is a config key."""
    names = _env_names()
    assert len(names) >= 5
    unknown = []
    for name in sorted(names):
        model: Any = Config
        for part in name.removeprefix("PROVISIONER_").lower().split("__"):
            if part.isdigit() and model is Config.model_fields["asterisk"].annotation:
                model = AsteriskServer
                continue
            field = getattr(model, "model_fields", {}).get(part)
            if field is None:
                unknown.append(name)
                break
            model = field.annotation
    assert unknown == []


def _command_lines() -> list[list[str]]:
    """The words of each ``provisioner ...`` line of README's command block (continuation
    lines joined, comments dropped)."""
    block = _paragraph("```sh\nprovisioner db upgrade", "```\n\n")
    block = block.replace("\\\n", " ")
    return [
        line.split("#")[0].split()[1:]
        for line in block.splitlines()
        if line.startswith("provisioner ")
    ]


def test_every_flag_of_readme_command_block_is_an_option_of_its_command() -> None:
    """Each command README's command block shows exists, and each ``--flag`` it gives it."""
    missing = []
    lines = _command_lines()
    assert len(lines) > 20
    for words in lines:
        commands: list[click.Command] = [cli]
        for word in words:
            group = commands[0]
            if not isinstance(group, click.Group) or word.startswith(("-", "[")):
                break
            found = [group.commands.get(name) for name in word.split("|")]
            if None in found:
                break
            commands = [c for c in found if c is not None]
        flags = set(re.findall(r"(--[a-z][a-z-]*)", " ".join(words)))
        for command in commands:
            assert command is not cli, words
            known = {opt for param in command.params for opt in param.opts}
            missing += [(command.name, flag) for flag in sorted(flags - known)]
    assert missing == []
