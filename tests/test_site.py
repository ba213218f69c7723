"""The site's pjsip.conf around the config-file target: its #include of the target and
the endpoints, auths and AORs it defines that the target defines too (which makes
Asterisk refuse the type's whole configuration), read from real files, and the
``check`` line that says so."""

from __future__ import annotations

from pathlib import Path

from provisioner.targets.site import duplicates, read_site, target_objects

from .faultkit import cli, endpoints, seed_store, store_url, write_config

TARGET = """\
[1001]
type=endpoint
aors=1001
auth=1001-auth

[1001-auth]
type=auth
username=alice

[1001]
type=aor
max_contacts=1

[1002]
type=endpoint
"""


def _target(tmp_path: Path) -> Path:
    path = tmp_path / "pjsip_users.conf"
    path.write_text(TARGET)
    return path


def test_a_hand_written_copy_of_a_provisioned_object_is_found_with_its_place(
    tmp_path: Path,
) -> None:
    """Sections of pjsip.conf that define an endpoint, auth or AOR the target defines
    (by type and id) are named with their file and line; a trunk, another type of the same
    name, a template and the target's own sections are not."""
    target = _target(tmp_path)
    conf = tmp_path / "pjsip.conf"
    conf.write_text(
        "[transport-udp]\ntype=transport\nprotocol=udp\n\n"
        "[1001]\ntype=endpoint\ncontext=old\n\n"  # line 5: imported, never deleted
        "[1001-auth](!)\ntype=auth\n\n"  # a template: no object
        "[ep-tpl](!)\ntype=aor\n\n"
        "[1001](ep-tpl)\nmax_contacts=2\n\n"  # line 15: an AOR by its template's type
        "[1002]\ntype=identify\n\n"  # another type: no clash
        "[provider]\ntype=endpoint\n\n"
        f"#include {target.name}\n"
    )
    site = read_site(conf, target)
    assert site.reaches_target
    assert site.unread == []
    found = [(d.type, d.name, d.line) for d in duplicates(site, target_objects(target))]
    assert found == [("endpoint", "1001", 5), ("aor", "1001", 15)]


def test_includes_are_followed_relative_and_by_wildcard_and_their_faults_said(
    tmp_path: Path,
) -> None:
    """An ``#include`` is read relative to the including file and as a glob; a missing
    ``#tryinclude`` is skipped as Asterisk skips it, a missing ``#include``, an
    ``#exec`` and a file Asterisk would refuse are said unread; a loop ends."""
    target = _target(tmp_path)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("[1002]\ntype=endpoint\n")
    (tmp_path / "conf.d" / "b.conf").write_text("#include ../pjsip.conf\n[x\n")
    conf = tmp_path / "pjsip.conf"
    conf.write_text(
        "#include conf.d/*.conf\n"
        "#tryinclude absent.conf\n"
        "#include missing.conf\n"
        '#exec "/usr/local/bin/make-pjsip"\n'
        f'#include "{target}"\n'
    )
    site = read_site(conf, target)
    assert site.reaches_target
    assert [d.key for d in duplicates(site, target_objects(target))] == [("endpoint", "1002")]
    assert len(site.unread) == 3, site.unread
    assert site.root_unread is None  # pjsip.conf itself was read
    assert "b.conf: line 2: " in site.unread[0]
    assert site.unread[1] == f"{tmp_path / 'missing.conf'}: No such file or directory"
    assert "line 4: #exec" in site.unread[2]


def test_a_target_reached_only_through_a_symbolic_link_counts_as_reached(tmp_path: Path) -> None:
    """An include of a link to the target reaches it (it is never read as the site's
    own file); a pjsip.conf that includes nothing of it does not."""
    target = _target(tmp_path)
    (tmp_path / "users.conf").symlink_to(target)
    conf = tmp_path / "pjsip.conf"
    conf.write_text("#include users.conf\n")
    site = read_site(conf, target)
    assert (site.reaches_target, site.defined) == (True, [])
    conf.write_text("[global]\ntype=global\n")
    assert not read_site(conf, target).reaches_target


def _synced(tmp_path: Path, target_lines: str = "") -> tuple[Path, Path, str]:
    """A store of a few users synced once into a config-file target (``target_lines``
    added to its ``[target]``): the config, the target file and one of its endpoint ids."""
    seed_store(store_url(tmp_path), 2).dispose()
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[target]\n", f"[target]\n{target_lines}"))
    cli(config, "sync", "--once")
    target = tmp_path / "pjsip_users.conf"
    return config, target, endpoints(target)[0]


def _site_line(config: Path) -> str | None:
    ran = cli(config, "check", check=False)
    lines = [line for line in ran.out.splitlines() if " pjsip.conf: " in line]
    return lines[0] if lines else None


def test_check_fails_a_pjsip_conf_that_redefines_a_provisioned_endpoint(tmp_path: Path) -> None:
    """``check`` fails its pjsip.conf line for a hand-written endpoint the target defines
    too, naming it, its place and the fix; passes it once the section is gone; says
    nothing without a pjsip.conf beside the target."""
    config, target, endpoint = _synced(tmp_path)
    assert _site_line(config) is None
    conf = tmp_path / "pjsip.conf"
    conf.write_text(f"[{endpoint}]\ntype=endpoint\ncontext=old\n\n#include {target.name}\n")
    line = _site_line(config)
    assert line is not None
    assert line.startswith("FAIL  pjsip.conf: 1 hand-written object(s) that ")
    assert f"endpoint {endpoint} ({conf} line 1)" in line
    assert "duplicate object" in line
    conf.write_text(f"#include {target.name}\n")
    assert _site_line(config) == (
        f"ok    pjsip.conf: {conf} includes {target}, no object defined twice"
    )


def test_check_fails_a_named_pjsip_conf_that_never_includes_the_target(tmp_path: Path) -> None:
    """A ``target.pjsip_conf`` that includes nothing leading to the target fails the line
    (Asterisk would never read the users); one that does not exist fails it too."""
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    conf = elsewhere / "pjsip.conf"
    config, target, _ = _synced(tmp_path, f'pjsip_conf = "{conf}"\n')
    line = _site_line(config)
    assert line == f"FAIL  pjsip.conf: cannot read {conf}: No such file or directory"
    conf.write_text("[global]\ntype=global\n")
    line = _site_line(config)
    assert line is not None
    assert line.startswith(f"FAIL  pjsip.conf: {conf} does not #include {target}")


def test_a_target_rendered_by_an_override_in_another_layout_is_read_by_the_parser(
    tmp_path: Path,
) -> None:
    """A target whose sections do not start with ``type=`` (an override template's
    layout) is read by the parser instead of the pattern: its objects are all found."""
    target = tmp_path / "pjsip_users.conf"
    target.write_text("[1001]\ncontext=a\ntype=endpoint\n\n[1001]\ntype=aor\n")
    assert target_objects(target) == {("endpoint", "1001"), ("aor", "1001")}
