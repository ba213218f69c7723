"""`provisioner import pjsip`: a hand-written pjsip.conf becomes users, all or nothing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from provisioner import credentials
from provisioner.accounts import Accounts
from provisioner.asterisk_conf import parse
from provisioner.errors import InvalidInput
from provisioner.importer import (
    VIDEO_CODECS,
    FileKind,
    ImportPlan,
    MappedUser,
    apply_plan,
    file_kind,
    plan_import,
    read_file,
    report_lines,
)
from provisioner.model import CODECS, TRANSPORTS
from provisioner.pjsip import RenderSettings, render_user

from .dbs import temp_database
from .helpers import make_cli, user_row

SETTINGS = RenderSettings()
NAT_KEYS = ("force_rport", "rewrite_contact", "rtp_symmetric", "direct_media")
GRACE = credentials.sip_digests("grace", "asterisk", "Grace-Secret-1007")
FRANK_MD5 = credentials.sip_digests("frank", "asterisk", "Frank-Secret-1006").md5
PASSWORDS = {
    "alice": "Alice-Secret-1001",
    "bob": "Bob-Secret-1002",
    "carol.c": "Carol-Secret-1003",
    "dave_d": "Dave-Secret-1004",
}

# What a site's administrator wrote by hand over the years.
PJSIP_CONF = f"""\
; pjsip.conf of the old PBX
[global]
type=global
user_agent=OldPBX

[transport-udp]
type=transport
protocol=udp
bind=0.0.0.0:5060

[transport-tcp-lan]
type=transport
protocol=tcp
bind=10.0.0.1:5060

[transport-wss]
type=transport
protocol=wss
bind=0.0.0.0:8089

;-- the carrier, with a registration --;
[carrier]
type=registration
outbound_auth=carrier-auth
server_uri=sip:sip.carrier.example
client_uri=sip:4930123@sip.carrier.example

[carrier-auth]
type=auth
auth_type=userpass
username=4930123
password=CarrierPass99

[carrier]
type=aor
contact=sip:sip.carrier.example

[carrier]
type=endpoint
transport=transport-udp
context=from-carrier
disallow=all
allow=alaw
outbound_auth=carrier-auth
aors=carrier

[carrier-identify]
type=identify
endpoint=carrier
match=sip.carrier.example

; office phones share a template
[office-phone](!)
type=endpoint
transport=transport-udp
context=internal
disallow=all
allow=g722,ulaw,alaw
direct_media=no
force_rport=yes
rewrite_contact=yes
rtp_symmetric=yes
call_group=1
pickup_group=1

[1001](office-phone)
auth=1001-auth
aors=1001
callerid="Alice Archer" <1001>
dtmf_mode=rfc4733

[1001-auth]
type=auth
auth_type=userpass
username=alice
password={PASSWORDS["alice"]}

[1001]
type=aor
max_contacts=1
remove_existing=yes

[1002]
type=endpoint
transport=transport-tcp-lan
context=sales
disallow=all
allow=opus,speex,ulaw,vp8,h264
call_group=2-3
pickup_group=2,3
direct_media=no
force_rport=yes
rewrite_contact=yes
rtp_symmetric=no
auth=1002
aors=1002
callerid=Bob Baker <1002>

[1002]
type=auth
username=bob
password={PASSWORDS["bob"]}

[1002]
type=aor
max_contacts=2

[1003]
type=endpoint
transport=transport-wss
webrtc=yes
context=internal
disallow=all
allow=opus,ulaw
force_rport=no
rewrite_contact=yes
rtp_symmetric=yes
direct_media=no
auth=1003-auth
aors=1003

[1003-auth]
type=auth
username=carol.c
password={PASSWORDS["carol.c"]}

[1003]
type=aor
max_contacts=5

; a username our rules refuse
[1005](office-phone)
auth=1005-auth
aors=1005

[1005-auth]
type=auth
username=eve-smith
password=Eve-Secret-1005

[1005]
type=aor

; only an MD5 credential
[1006](office-phone)
auth=1006-auth
aors=1006

[1006-auth]
type=auth
auth_type=md5
username=frank
md5_cred={FRANK_MD5}

[1006]
type=aor

; digests made for our realm, as provisioner itself renders them
[1007](office-phone)
auth=1007-auth
aors=1007
callerid="Grace Green" <1007>

[1007-auth]
type=auth
auth_type=userpass
username=grace
realm=asterisk
password_digest=SHA-256:{GRACE.sha256},MD5:{GRACE.md5}
supported_algorithms_uas=SHA-256,MD5

[1007]
type=aor
"""

# ... and its pjsip_wizard.conf, whose wizards Asterisk reads from that file alone.
WIZARD_CONF = f"""\
; a wizard user
[1004]
type=wizard
accepts_auth=yes
accepts_registrations=yes
transport=transport-udp
inbound_auth/username=dave_d
inbound_auth/password={PASSWORDS["dave_d"]}
endpoint/context=internal
endpoint/allow=!all,alaw,ulaw
endpoint/callerid="Dave Dunn" <1004>
endpoint/force_rport=no
endpoint/rewrite_contact=no
endpoint/rtp_symmetric=no
endpoint/direct_media=yes
aor/max_contacts=1
"""

IMPORTED = ["alice", "bob", "carol.c", "grace"]
WIZARD_IMPORTED = ["dave_d"]


def _plan(
    text: str = PJSIP_CONF, *, generate_secrets: bool = False, read_as: FileKind = "pjsip.conf"
) -> ImportPlan:
    return plan_import(parse(text), SETTINGS, generate_secrets=generate_secrets, read_as=read_as)


def _mapped_by_callerid(callerids: Iterable[tuple[str, str]]) -> dict[str, MappedUser]:
    """The users mapped from one endpoint (with its AOR and auth ``a<ext>``, username
    ``u<ext>``) per ``(extension, callerid)``, by extension."""
    text = ""
    for ext, callerid in callerids:
        text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\nallow=ulaw\n"
        text += f"callerid={callerid}\n[{ext}]\ntype=aor\n"
        text += f"[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n"
    return {u.extension: u for u in _plan(text).users}


def _import(
    accounts: Accounts,
    text: str = PJSIP_CONF,
    *,
    dry_run: bool = False,
    read_as: FileKind = "pjsip.conf",
) -> list[str]:
    plan = _plan(text, read_as=read_as)
    result = apply_plan(
        accounts, plan, profile="agents", email_domain="pbx.example.com", dry_run=dry_run
    )
    return report_lines(plan, result)


def _unmapped(plan: ImportPlan) -> dict[tuple[str, int], str]:
    return {(u.section, u.line): u.reason for u in plan.unmapped}


def _source_endpoint(ext: str) -> dict[str, str]:
    """The effective endpoint options the source gives extension ``ext`` (templates applied)."""
    for section in parse(PJSIP_CONF + WIZARD_CONF).visible():
        opts = dict(section.options)
        if section.name == ext and opts["type"] == "endpoint":
            return opts
        if section.name == ext and opts["type"] == "wizard":
            endpoint = {
                k[len("endpoint/") :]: v for k, v in opts.items() if k.startswith("endpoint/")
            }
            return {"transport": opts["transport"], **endpoint}
    raise AssertionError(ext)


def _protocol(transport: str) -> str:
    """The protocol of a transport section of the source."""
    for section in parse(PJSIP_CONF).visible():
        if section.name == transport and dict(section.options)["type"] == "transport":
            return dict(section.options)["protocol"]
    raise AssertionError(transport)


def test_plan_maps_users_and_lists_every_other_section() -> None:
    """Endpoints (templated or not) of pjsip.conf and wizards of pjsip_wizard.conf become
    users; everything else has a reason."""
    plan = _plan()
    assert [u.username for u in plan.users] == IMPORTED
    wizards = _plan(WIZARD_CONF, read_as="pjsip_wizard.conf")
    assert ([u.username for u in wizards.users], wizards.unmapped) == (WIZARD_IMPORTED, ())
    by_name = {u.username: u for u in plan.users + wizards.users}
    assert dict(by_name["alice"].values) == {
        "username": "alice",
        "extension": "1001",
        "full_name": "Alice Archer",
        "context": "internal",
        "transport": "udp",
        "nat": "yes",
        "codecs": "g722,ulaw,alaw",
        "video": "no",
        "call_group": "1",
        "pickup_group": "1",
    }
    bob = by_name["bob"]
    assert bob.values["transport"] == "tcp"
    assert bob.values["nat"] == "force_rport"
    assert (bob.values["codecs"], bob.values["video"]) == ("opus,ulaw", "yes")
    assert bob.values["full_name"] == "Bob Baker"
    assert "codecs dropped (not supported here): speex" in bob.notes
    assert any("transport 'transport-tcp-lan' (protocol tcp)" in n for n in bob.notes)
    assert (by_name["carol.c"].values["transport"], by_name["carol.c"].values["nat"]) == (
        "wss",
        "route",
    )
    assert by_name["carol.c"].values["full_name"] == "carol.c"
    dave = by_name["dave_d"]
    assert (dave.extension, dave.values["nat"], dave.values["codecs"]) == (
        "1004",
        "no",
        "alaw,ulaw",
    )
    assert by_name["alice"].notes == (
        "ignored endpoint options: dtmf_mode",
        "aor qualify_frequency 0 becomes 60",
    )
    assert by_name["grace"].sip_secret is None
    assert by_name["grace"].digests == (GRACE.md5, GRACE.sha256)
    reasons = [str(u) for u in plan.unmapped]
    assert reasons[:4] == [
        "[global] global: global settings",
        "[transport-udp] transport: stays in Asterisk's own configuration",
        "[transport-tcp-lan] transport: stays in Asterisk's own configuration",
        "[transport-wss] transport: stays in Asterisk's own configuration",
    ]
    assert "[carrier] endpoint: sends auth (outbound_auth=): a trunk, not a user" in reasons
    assert "[carrier-auth] auth: belongs to [carrier], which is not mapped" in reasons
    assert "[carrier-identify] identify: belongs to [carrier], which is not mapped" in reasons
    assert any(r.startswith("[1005] endpoint: username 'eve-smith' must be") for r in reasons)
    assert "[1005-auth] auth: belongs to [1005], which is not mapped" in reasons
    assert any(
        r.startswith("[1006] endpoint: needs a new SIP secret: its auth has only an MD5 digest")
        for r in reasons
    )
    assert len(plan.unmapped) == 15
    # No secret in any reason, note or repr.
    dump = repr(plan) + "".join(reasons)
    assert not any(p in dump for p in [*PASSWORDS.values(), GRACE.md5, GRACE.sha256, FRANK_MD5])


def test_unmatched_nat_is_reported_not_guessed_silently() -> None:
    """Asterisk's NAT defaults match no NAT row exactly: the closest is kept and reported."""
    plan = _plan(
        "[7]\ntype=endpoint\nauth=7\naors=7\nallow=alaw\n"
        "[7]\ntype=auth\nusername=u7\npassword=Secret-777\n[7]\ntype=aor\n"
    )
    (user,) = plan.users
    assert (user.values["nat"], user.values["context"], user.values["codecs"]) == (
        "no",
        "default",
        "alaw",
    )
    assert any("differs in force_rport" in n for n in user.notes)


def _userpass_auth(*credentials: str) -> str:
    """Endpoint 1006 of frank whose ``auth_type=userpass`` auth has only ``credentials``."""
    lines = "".join(f"{line}\n" for line in credentials)
    return (
        "[1006]\ntype=endpoint\nauth=1006-auth\naors=1006\nallow=ulaw\n"
        f"[1006-auth]\ntype=auth\nauth_type=userpass\nusername=frank\n{lines}"
        "[1006]\ntype=aor\n"
    )


def test_userpass_auth_with_only_md5_cred_is_not_mapped_naming_md5_cred() -> None:
    """An ``auth_type=userpass`` auth with only ``md5_cred`` (Asterisk 22 reads it as the MD5
    digest whatever the auth_type) is not mapped for having only an MD5 digest, naming
    ``md5_cred``, not for having no password; with generate_secrets the note says the same."""
    text = _userpass_auth(f"md5_cred={FRANK_MD5}")
    assert str(_plan(text).unmapped[0]) == (
        "[1006] endpoint: needs a new SIP secret: its auth has only an MD5 digest (md5_cred;"
        " we keep SHA-256 and MD5); or import with --generate-secrets"
    )
    (frank,) = _plan(text, generate_secrets=True).users
    assert (frank.sip_secret, frank.digests) == (None, None)
    assert (
        "a new SIP secret is generated: its auth has only an MD5 digest (md5_cred;"
        " we keep SHA-256 and MD5)"
    ) in frank.notes


def test_md5_cred_beside_a_sha256_password_digest_is_carried_over() -> None:
    """``md5_cred`` with a SHA-256 ``password_digest`` for our realm gives Asterisk both
    digests, as ``password_digest`` listing both does: both are carried over."""
    digests = credentials.sip_digests("frank", "asterisk", "Frank-Secret-1006")
    (frank,) = _plan(
        _userpass_auth(f"md5_cred={digests.md5}", f"password_digest=SHA-256:{digests.sha256}")
    ).users
    assert (frank.sip_secret, frank.digests) == (None, (digests.md5, digests.sha256))


def test_a_password_beside_a_digest_of_another_secret_is_not_carried_over() -> None:
    """Asterisk 22 checks a phone against the auth's digest when it has one, not its
    ``password``: a password whose digest is not the auth's ``md5_cred`` is not what the
    phones use, so it is not carried over (not mapped, or a new secret); one whose digest it
    is, is carried over as before."""
    other = credentials.sip_digests("frank", "asterisk", "Phone-Secret-1006").md5
    stale = _userpass_auth("password=Frank-Secret-1006", f"md5_cred={other}")
    assert str(_plan(stale).unmapped[0]) == (
        "[1006] endpoint: needs a new SIP secret: its password is not the secret of its"
        " md5_cred (MD5 digest for realm 'asterisk'), which Asterisk checks instead; its auth"
        " has only an MD5 digest (md5_cred; we keep SHA-256 and MD5); or import with"
        " --generate-secrets"
    )
    (frank,) = _plan(stale, generate_secrets=True).users
    assert (frank.sip_secret, frank.digests) == (None, None)
    same = _userpass_auth("password=Frank-Secret-1006", f"md5_cred={FRANK_MD5.upper()}")
    (frank,) = _plan(same).users
    assert (frank.sip_secret, frank.digests) == ("Frank-Secret-1006", None)


def test_an_md5_auth_type_with_only_a_password_carries_the_password() -> None:
    """Asterisk 22 reads ``auth_type`` only for OAuth: an ``auth_type=md5`` auth with a
    ``password`` and no digest authenticates its phones with that password, which is
    carried over like any other (not "its auth has no password")."""
    text = _userpass_auth("password=Frank-Secret-1006").replace("=userpass", "=md5")
    (frank,) = _plan(text).users
    assert (frank.sip_secret, frank.digests) == ("Frank-Secret-1006", None)


def test_generate_secrets_imports_what_cannot_be_carried_over() -> None:
    """With generate_secrets, the MD5-only user is mapped (with a note) and gets no secret."""
    plan = _plan(generate_secrets=True)
    frank = next(u for u in plan.users if u.username == "frank")
    assert frank.sip_secret is None
    assert frank.digests is None
    assert any("a new SIP secret is generated" in n for n in frank.notes)
    assert "eve-smith" not in [u.username for u in plan.users]


def test_import_round_trips_through_render_on_every_backend(accounts: Accounts) -> None:
    """Imported users are stored with their secret's digests and render to equivalent endpoints."""
    lines = _import(accounts)
    assert lines[:2] == [
        "added alice (extension 1001)",
        "  note: ignored endpoint options: dtmf_mode",
    ]
    assert lines[-1] == "added 4 users; 15 sections not mapped"
    lines = _import(accounts, WIZARD_CONF, read_as="pjsip_wizard.conf")
    assert (lines[0], lines[-1]) == (
        "added dave_d (extension 1004)",
        "added 1 users; 0 sections not mapped",
    )
    for user in IMPORTED + WIZARD_IMPORTED:
        stored = user_row(accounts.engine, user)
        expected = (
            GRACE if user == "grace" else credentials.sip_digests(user, "asterisk", PASSWORDS[user])
        )
        assert (stored.sip_md5, stored.sip_sha256, stored.sip_realm) == (
            expected.md5,
            expected.sha256,
            "asterisk",
        )
        kept = accounts.get_user(user)
        assert (kept.role, kept.profile, kept.email) == (
            "user",
            "agents",
            f"{user}@pbx.example.com",
        )
    by_name = {SETTINGS.transport_name(p): p for p in TRANSPORTS}
    for ext in ("1001", "1002", "1003", "1004", "1007"):
        want = _source_endpoint(ext)
        imported = next(u for u in accounts.list_users() if u.extension == ext)
        got = dict(render_user(imported, SETTINGS).endpoint)
        for option in ("context", "call_group", "pickup_group", *NAT_KEYS):
            assert got[option] == want.get(option, ""), (ext, option)
        assert by_name[got["transport"]] == _protocol(want["transport"]), ext
        known = [c for c in want["allow"].split(",") if c in CODECS or c in VIDEO_CODECS]
        assert got["allow"].split(",") == known, ext


def test_dry_run_and_conflicts_change_nothing(accounts: Accounts) -> None:
    """A dry run adds nobody; one clash with the store means nobody is added."""
    lines = _import(accounts, dry_run=True)
    assert "would add bob (extension 1002)" in lines
    assert lines[-1] == "would add 4 users; 15 sections not mapped"
    assert [u.username for u in accounts.list_users()] == ["root"]
    accounts.add_user(
        {
            "username": "BOB",
            "full_name": "Another Bob",
            "email": "bob@example.com",
            "profile": "agents",
            "extension": "1003",
        }
    )
    with pytest.raises(InvalidInput) as caught:
        _import(accounts)
    rules = [str(p) for p in caught.value.problems]
    assert any(r.startswith("line ") and "[1002] username: is already taken" in r for r in rules)
    assert any("[1003] extension: 1003 is already used by user BOB" in r for r in rules)
    assert sorted(u.username for u in accounts.list_users()) == ["BOB", "root"]


def test_bad_files_import_nothing(tmp_path: Path) -> None:
    """Unreadable files, includes and files Asterisk would refuse are errors naming FILE."""
    missing = tmp_path / "missing.conf"
    with pytest.raises(InvalidInput) as caught:
        read_file(missing)
    assert caught.value.problems[0].field == "FILE"
    included = tmp_path / "inc.conf"
    included.write_text(PJSIP_CONF + "#include pjsip_more.conf\n", encoding="utf-8")
    with pytest.raises(InvalidInput) as caught:
        read_file(included)
    (problem,) = caught.value.problems
    assert (problem.field, "#include pjsip_more.conf" in problem.rule) == ("FILE", True)
    broken = tmp_path / "broken.conf"
    broken.write_text("[1001\ntype=endpoint\n", encoding="utf-8")
    with pytest.raises(InvalidInput) as caught:
        read_file(broken)
    assert caught.value.problems[0].field == "FILE"


def test_cli_import_pjsip(tmp_path: Path) -> None:
    """The command prints each user and unmapped section, never a secret, and exits 0; when
    it adds users, a last line says to delete their hand-written sections."""
    conf = tmp_path / "pjsip.conf"
    conf.write_text(PJSIP_CONF, encoding="utf-8")
    with temp_database("sqlite", tmp_path) as url:
        cli = make_cli(url, tmp_path, "[security]\npassword_policy = false\n")
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        cli.ok(
            "user", "add", "root", "--role", "admin", "--full-name", "Root", "--email", "r@x.org"
        )
        base = ["import", "pjsip", str(conf), "--email-domain", "pbx.example.com"]
        bad = cli(*base, "--profile", "nobody")
        assert bad.code == 2
        assert "--profile: must name an existing profile" in bad.err
        dry = cli.ok(*base, "--profile", "agents", "--dry-run")
        assert "would add alice (extension 1001)" in dry
        assert dry.splitlines()[-1].startswith(
            f"next: delete the sections of the users to be imported from {conf} as Asterisk"
        )
        carrier = "[carrier-identify] identify: belongs to [carrier], which is not mapped"
        assert f"not mapped: {carrier}" in dry
        assert "alice" not in cli.ok("user", "list")
        out = cli.ok(*base, "--profile", "agents", "--generate-secrets")
        assert "added frank (extension 1006)" in out
        assert "SIP secret for frank (shown once): " in out
        assert "added 5 users; 12 sections not mapped" in out
        # Left in place, they would make Asterisk refuse every endpoint (a duplicate object).
        assert f"next: delete the sections of the users imported from {conf}" in out
        assert "defined twice" in out
        assert "alice" in cli.ok("user", "list")
        transcript = "".join(cli.transcript)
        assert not any(p in transcript for p in [*PASSWORDS.values(), GRACE.md5, FRANK_MD5])


def test_report_escapes_bytes_that_are_not_utf8_or_printable(tmp_path: Path) -> None:
    """Section names with non-UTF-8 bytes or control characters are printed escaped, so the
    report (and any secret it shows once) is printed whole after the import."""
    conf = tmp_path / "pjsip.conf"
    conf.write_bytes(
        b"[10\xff02]\ntype=endpoint\n\n[\x1b[2Jx]\ntype=endpoint\n\n"
        b"[1006]\ntype=endpoint\nauth=1006-auth\naors=1006\nallow=ulaw\n"
        b"[1006-auth]\ntype=auth\nauth_type=md5\nusername=frank\nmd5_cred="
        + FRANK_MD5.encode()
        + b"\n[1006]\ntype=aor\n"
    )
    with temp_database("sqlite", tmp_path) as url:
        cli = make_cli(url, tmp_path)
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        cli.ok(
            "user", "add", "root", "--role", "admin", "--full-name", "Root", "--email", "r@x.org"
        )
        out = cli.ok(
            "import",
            "pjsip",
            str(conf),
            "--profile",
            "agents",
            "--email-domain",
            "x.org",
            "--generate-secrets",
        )
        conf.write_bytes(b'#include "more\xff.conf"\n')
        refused = cli(
            "import", "pjsip", str(conf), "--profile", "agents", "--email-domain", "x.org"
        )
    assert (refused.code, "#include more\\xff.conf is not followed" in refused.err) == (2, True)
    assert "not mapped: [10\\xff02] endpoint: has no inbound auth" in out
    assert "not mapped: [\\x1b[2Jx] endpoint: has no inbound auth" in out
    assert "\x1b" not in out
    assert "SIP secret for frank (shown once): " in out


def test_report_escapes_bidi_controls_of_section_names(tmp_path: Path) -> None:
    """A section name holding a right-to-left override (which a bidi terminal would apply
    to the rest of the line) is printed with it escaped."""
    conf = tmp_path / "pjsip.conf"
    conf.write_text("[tr\u202eunk]\ntype=endpoint\n", encoding="utf-8")
    with temp_database("sqlite", tmp_path) as url:
        cli = make_cli(url, tmp_path)
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        out = cli.ok("import", "pjsip", str(conf), "--profile", "agents", "--email-domain", "x.org")
    assert "not mapped: [tr\\u202eunk] endpoint: has no inbound auth" in out
    assert "\u202e" not in out


def test_aors_other_than_the_extension_are_reported() -> None:
    """An endpoint whose AORs are not exactly one named after it keeps one AOR named after
    the extension, and the note says where phones must now register."""
    auth = "[a{n}]\ntype=auth\nusername=u{n}\npassword=Secret-{n}00\n"
    text = (
        "[7001]\ntype=endpoint\nauth=a7001\naors=7001,desk\nallow=ulaw\n"
        "[7001]\ntype=aor\n[desk]\ntype=aor\n" + auth.format(n=7001)
    )
    text += "[7002]\ntype=endpoint\nauth=a7002\naors=bob\nallow=ulaw\n[bob]\ntype=aor\n"
    text += auth.format(n=7002)
    text += "[7003]\ntype=endpoint\nauth=a7003\naors=7003\nallow=ulaw\n[7003]\ntype=aor\n"
    text += auth.format(n=7003)
    notes = {u.extension: [n for n in u.notes if n.startswith("aors ")] for u in _plan(text).users}
    assert notes == {
        "7001": ["aors 7001,desk become the one AOR [7001]: phones register to 7001"],
        "7002": ["aors bob become the one AOR [7002]: phones register to 7002"],
        "7003": [],
    }


def test_a_callerid_name_our_rules_refuse_is_reported() -> None:
    """A callerid whose name (as Asterisk reads it) our full-name rule refuses gives a note,
    and the username as the full name."""
    cases = (
        ("7101", '"Al \\"Big\\" Smith" <7101>', 'Al "Big" Smith'),
        ("7102", "\"O'Brien", "\"O'Brien"),
    )
    users = _mapped_by_callerid((ext, callerid) for ext, callerid, _ in cases)
    for ext, _, name in cases:
        assert users[ext].values["full_name"] == f"u{ext}"
        assert any(
            n.startswith(f"callerid name {name!r} must not contain")
            and n.endswith("; the username is the full name")
            for n in users[ext].notes
        ), users[ext].notes


def test_an_import_racing_another_writer_for_a_username_reports_it(accounts: Accounts) -> None:
    """An import whose username another writer takes meanwhile runs again and reports the
    clash on that user, never a database error, and adds nobody."""
    from sqlalchemy import Connection

    from .helpers import insert_user_copy, while_another_writer_holds

    def hold(conn: Connection) -> None:
        insert_user_copy(conn, "root", "bob", "5555")

    raised = while_another_writer_holds(accounts, hold, lambda: _import(accounts))
    assert isinstance(raised, InvalidInput), repr(raised)
    assert any("username: is already taken" in str(p) for p in raised.problems)
    assert sorted(u.username for u in accounts.list_users()) == ["bob", "root"]


def test_codecs_separated_by_bars_are_read_as_asterisk_reads_them() -> None:
    """``allow=ulaw|alaw`` imports both codecs: Asterisk splits codec lists at ``|`` and ``,``."""
    (user,) = _plan(
        "[7201]\ntype=endpoint\nauth=a7201\naors=7201\ndisallow=all\nallow=g722|ulaw, alaw\n"
        "disallow=alaw|gsm\n[7201]\ntype=aor\n"
        "[a7201]\ntype=auth\nusername=u7201\npassword=Secret-7201\n"
    ).users
    assert user.values["codecs"] == "g722,ulaw"
    assert not any("dropped" in note for note in user.notes)


def test_a_wizards_own_transport_overrides_its_endpoint_transport(tmp_path: Path) -> None:
    """A wizard's ``transport=`` wins over its ``endpoint/transport=``, as Asterisk's wizard
    appends it after the endpoint options."""
    conf = tmp_path / "pjsip_wizard.conf"
    conf.write_text(
        "[7301]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/transport=transport-udp\ntransport=transport-tcp\nendpoint/allow=ulaw\n"
        "inbound_auth/username=u7301\ninbound_auth/password=Secret-7301\n",
        encoding="utf-8",
    )
    (user,) = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf)).users
    assert user.values["transport"] == "tcp"


def test_aor_options_the_move_changes_are_noted() -> None:
    """An AOR option the rendered AOR sets otherwise (max_contacts, remove_existing,
    qualify_frequency, Asterisk's defaults where unset) is noted, never changed silently."""
    auth = "[a{n}]\ntype=auth\nusername=u{n}\npassword=Secret-{n}00\n"
    text = "[7401]\ntype=endpoint\nauth=a7401\naors=7401\nallow=ulaw\n" + auth.format(n=7401)
    text += "[7401]\ntype=aor\nmax_contacts=2\nremove_existing=no\nqualify_frequency=60\n"
    text += "[7402]\ntype=endpoint\nauth=a7402\naors=7402\nallow=ulaw\n" + auth.format(n=7402)
    text += "[7402]\ntype=aor\nmax_contacts=1\nremove_existing=yes\nqualify_frequency=60\n"
    text += "[7403]\ntype=endpoint\nauth=a7403\naors=7403\nallow=ulaw\nwebrtc=yes\n"
    text += auth.format(n=7403) + "[7403]\ntype=aor\nmax_contacts=1\nremove_existing=yes\n"
    notes = {u.extension: [n for n in u.notes if n.startswith("aor ")] for u in _plan(text).users}
    assert notes == {
        "7401": ["aor max_contacts 2 becomes 1", "aor remove_existing no becomes yes"],
        "7402": [],
        "7403": ["aor max_contacts 1 becomes 5", "aor qualify_frequency 0 becomes 60"],
    }


def test_an_aor_number_asterisk_cannot_parse_leaves_the_user_not_mapped() -> None:
    """``max_contacts``/``qualify_frequency`` are read as Asterisk reads them (``strtoul``
    base 0: ``0x2`` is 2, ``010`` is 8); one it refuses (no number, negative, empty,
    ``qualify_frequency`` over 86400) drops the AOR, so the user is not mapped, with why."""
    auth = "[a{n}]\ntype=auth\nusername=u{n}\npassword=Secret-{n}00\n"
    text = ""
    for n, aor in (
        (7451, "max_contacts=abc"),
        (7452, "max_contacts=-1"),
        (7453, "max_contacts="),
        (7454, "qualify_frequency=86401"),
        (7455, "max_contacts=0x2\nqualify_frequency=010"),
        (7456, "max_contacts=0\nqualify_frequency=0"),
    ):
        text += f"[{n}]\ntype=endpoint\nauth=a{n}\naors={n}\nallow=ulaw\n" + auth.format(n=n)
        text += f"[{n}]\ntype=aor\n{aor}\n"
    plan = _plan(text)
    user, zero = plan.users
    assert zero.extension == "7456"
    assert [n for n in user.notes if n.startswith("aor ")] == [
        "aor max_contacts 2 becomes 1",
        "aor remove_existing no becomes yes",
        "aor qualify_frequency 8 becomes 60",
    ]
    reasons = [str(u) for u in plan.unmapped if u.reason.startswith("endpoint")]
    tail = "Asterisk loads no such aor (no phone could register)"
    assert reasons == [
        f"[7451] endpoint: its aor [7451] max_contacts 'abc' is no number 0-4294967295: {tail}",
        f"[7452] endpoint: its aor [7452] max_contacts '-1' is no number 0-4294967295: {tail}",
        f"[7453] endpoint: its aor [7453] max_contacts '' is no number 0-4294967295: {tail}",
        f"[7454] endpoint: its aor [7454] qualify_frequency '86401' is no number 0-86400: {tail}",
    ]


def test_a_transport_of_the_file_is_read_by_its_protocol_even_under_one_of_our_names() -> None:
    """An endpoint's transport defined in the file is mapped by that section's protocol,
    though its name is one of ours for another protocol: the file's ``transport-tcp`` that
    is UDP imports as udp (noted), since its phones speak UDP."""
    text = "[transport-tcp]\ntype=transport\nprotocol=UDP\nbind=0.0.0.0\n"
    text += "[7481]\ntype=endpoint\nauth=a7481\naors=7481\nallow=ulaw\ntransport=transport-tcp\n"
    text += "[a7481]\ntype=auth\nusername=u7481\npassword=Secret-7481\n[7481]\ntype=aor\n"
    (user,) = _plan(text).users
    assert user.values["transport"] == "udp"
    assert (
        "transport 'transport-tcp' (protocol udp) becomes 'transport-udp' from [target.transports]"
    ) in user.notes


def test_group_lists_with_blanks_after_commas_are_read_as_asterisk_reads_them() -> None:
    """``call_group = 1, 3-5`` imports as 1,3-5: Asterisk skips the blanks around each item."""
    text = "[7501]\ntype=endpoint\nauth=a7501\naors=7501\nallow=ulaw\n"
    text += "call_group = 1, 3-5\npickup_group=2 ,4\n[7501]\ntype=aor\n"
    text += "[a7501]\ntype=auth\nusername=u7501\npassword=Secret-7501\n"
    (user,) = _plan(text).users
    assert (user.values["call_group"], user.values["pickup_group"]) == ("1,3-5", "2,4")


def test_additions_filtered_by_type_are_imported(tmp_path: Path) -> None:
    """``[7551](+type=endpoint)`` adds to the endpoint, not the AOR of the same name, as
    Asterisk does; the file is imported, not refused."""
    conf = tmp_path / "pjsip.conf"
    conf.write_text(
        "[7551]\ntype=aor\n[7551]\ntype=endpoint\nauth=a7551\naors=7551\nallow=ulaw\n"
        "[a7551]\ntype=auth\nusername=u7551\npassword=Secret-7551\n"
        "[7551](+type=endpoint)\ncontext=sales\n[7551](+type=aor)\nmax_contacts=1\n",
        encoding="utf-8",
    )
    (user,) = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf)).users
    assert (user.username, user.values["context"]) == ("u7551", "sales")
    assert not [note for note in user.notes if note.startswith("aor max_contacts")]


def test_group_items_asterisk_ignores_are_dropped_and_reported_not_the_user() -> None:
    """A call/pickup group item Asterisk ignores (not a number, above 63) is left out and
    noted by field, a range is cut to what Asterisk reads; the user is still imported."""
    text = "[7511]\ntype=endpoint\nauth=a7511\naors=7511\nallow=ulaw\n"
    text += "call_group=1,x,3\npickup_group=70,2-5,60-99,5-3\n[7511]\ntype=aor\n"
    text += "[a7511]\ntype=auth\nusername=u7511\npassword=Secret-7511\n"
    (user,) = _plan(text).users
    assert (user.values["call_group"], user.values["pickup_group"]) == ("1,3", "2-5,60-63")
    assert "call_group: 'x' dropped (as Asterisk reads the list)" in user.notes
    assert (
        "pickup_group: '70' dropped; '60-99' read as 60-63; '5-3' dropped "
        "(as Asterisk reads the list)"
    ) in user.notes


def test_endpoints_asterisk_drops_for_an_unknown_option_or_value_are_not_mapped() -> None:
    """An endpoint, auth or AOR with an option Asterisk does not know, or a ``dtmf_mode``
    it cannot parse, is not loaded by Asterisk ("Could not create an object"), so its user
    is reported as not mapped with the reason, not imported; known options are not."""

    def user(ext: str, endpoint: str = "", auth: str = "", aor: str = "") -> str:
        return (
            f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\nallow=ulaw\n{endpoint}"
            f"[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n{auth}"
            f"[{ext}]\ntype=aor\n{aor}"
        )

    text = (
        user("7701", endpoint="no_such_option=1\n")
        + user("7702", endpoint="dtmf_mode=bogus\n")
        + user("7703", auth="nonce_lifetimes=32\n")
        + user("7704", aor="max_contact=2\n")
        + user("7705", endpoint="dtmf_mode=RFC4733\nlanguage=de\n", auth="nonce_lifetime=32\n")
    )
    plan = _plan(text)
    assert [u.username for u in plan.users] == ["u7705"]
    wizards = _plan(
        "[7706]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "inbound_auth/username=u7706\ninbound_auth/password=Secret-7706\n"
        "endpoint/allow=ulaw\nendpoint/no_such_option=1\n",
        read_as="pjsip_wizard.conf",
    )
    assert wizards.users == ()
    reasons = [str(u) for u in plan.unmapped + wizards.unmapped]
    drops = "Asterisk does not know, so it loads no such"
    assert f"[7701] endpoint: has no_such_option, an option {drops} endpoint" in reasons
    assert (
        "[7702] endpoint: dtmf_mode 'bogus' is none of rfc4733, inband, info, auto, "
        "auto_info: Asterisk loads no such endpoint"
    ) in reasons
    assert (
        f"[7703] endpoint: its auth [a7703] has nonce_lifetimes, an option {drops} auth "
        "(no phone could authenticate)"
    ) in reasons
    assert (
        f"[7704] endpoint: its aor [7704] has max_contact, an option {drops} aor "
        "(no phone could register)"
    ) in reasons
    assert f"[7706] wizard: has endpoint/no_such_option, an option {drops} endpoint" in reasons


def test_sorcery_extended_options_are_not_taken_for_unknown_ones() -> None:
    """An ``@name`` option is a sorcery extended field, which Asterisk loads on any object:
    the user is imported (the option noted as ignored), not reported as dropped."""
    text = "[7711]\ntype=endpoint\nauth=a7711\naors=7711\nallow=ulaw\n@team=sales\n"
    text += "[a7711]\ntype=auth\nusername=u7711\npassword=Secret-7711\n@x=1\n"
    text += "[7711]\ntype=aor\n@y=2\n"
    (user,) = _plan(text).users
    assert "ignored endpoint options: @team" in user.notes


def test_a_section_is_the_type_asterisk_loads_it_as(tmp_path: Path) -> None:
    """A section's type is its first ``type=`` (an inherited one first), matched exactly:
    ``type=Endpoint`` is no endpoint, and a later ``type=aor`` does not make one an AOR."""
    conf = tmp_path / "pjsip.conf"
    conf.write_text(
        "[phone](!)\ntype=endpoint\nallow=ulaw\n"
        "[7601]\ntype=Endpoint\nauth=a7601\naors=7601\nallow=ulaw\n"
        "[7601]\ntype=aor\n[a7601]\ntype=auth\nusername=u7601\npassword=Secret-7601\n"
        "[7602](phone)\nauth=a7602\naors=7602\n"
        "[a7602]\ntype=auth\nusername=u7602\npassword=Secret-7602\n"
        "[7602](phone)\ntype=aor\nmax_contacts=1\n",
        encoding="utf-8",
    )
    plan = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf))
    assert plan.users == ()
    reasons = [str(u) for u in plan.unmapped]
    assert "[7601] Endpoint: not a user object" in reasons
    twice = "[7602] endpoint: defined twice (lines 15, 22): Asterisk loads no endpoint from "
    assert reasons.count(twice + "a file that defines one more than once") == 2
    assert "[a7602] auth: belongs to [7602], which is not mapped" in reasons


def test_a_wizard_without_an_inbound_auth_username_is_not_mapped(tmp_path: Path) -> None:
    """A wizard that accepts auth but has no ``inbound_auth/username`` is reported, not
    given its id as the username: Asterisk's wizard creates no auth for it (it logs "must
    have 'inbound_auth/username'"), so no phone can register to it."""
    conf = tmp_path / "pjsip_wizard.conf"
    conf.write_text(
        "[7701]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/password=Secret-7701\n",
        encoding="utf-8",
    )
    plan = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf))
    assert plan.users == ()
    assert [str(u) for u in plan.unmapped] == [
        "[7701] wizard: has no inbound_auth/username: Asterisk's wizard creates no auth for it"
    ]


def test_a_parenthesised_codec_list_replaces_the_codecs_as_asterisk_reads_it() -> None:
    """``allow=(ulaw|alaw)`` (the form Asterisk prints codec lists in) first drops every
    codec and ``disallow=(g722)`` first allows every one, as Asterisk applies them; the
    parentheses never reach a codec name."""
    text = ""
    for ext, codecs in (
        ("7801", "disallow=all\nallow=g722\nallow=(ulaw|alaw)\n"),
        ("7802", "allow=ulaw\ndisallow=(g722|vp8|h264)\n"),
    ):
        text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\n{codecs}[{ext}]\ntype=aor\n"
        text += f"[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n"
    users = {u.extension: u for u in _plan(text).users}
    assert (users["7801"].values["codecs"], users["7801"].values["video"]) == ("ulaw,alaw", "no")
    assert (users["7802"].values["codecs"], users["7802"].values["video"]) == (
        "ulaw,alaw,gsm,g729,opus",
        "yes",
    )
    assert not any("dropped" in n for u in users.values() for n in u.notes)


def test_a_username_that_makes_no_email_address_is_not_mapped_and_the_rest_import(
    accounts: Accounts,
) -> None:
    """A username our username rule allows but no email address can start with (``a..b``,
    ``.ann``) is reported as not mapped, naming its section and the email rule, and the
    other users are imported: it does not block the whole import at apply time."""
    text = ""
    for ext, name in (("7901", "u7901"), ("7902", "a..b"), ("7903", ".ann")):
        text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\nallow=ulaw\n"
        text += f"[{ext}]\ntype=aor\n[a{ext}]\ntype=auth\nusername={name}\npassword=Secret-{ext}\n"
    lines = _import(accounts, text)
    assert "added u7901 (extension 7901)" in lines
    refused = [line for line in lines if " endpoint: " in line]
    assert [line.split(" endpoint: ")[0] for line in refused] == [
        "not mapped: [7902]",
        "not mapped: [7903]",
    ]
    assert all("makes no valid email address" in line for line in refused), refused
    assert sorted(u.username for u in accounts.list_users()) == ["root", "u7901"]


def test_a_section_defined_twice_is_read_as_asterisk_reads_it() -> None:
    """An endpoint, auth or AOR defined twice is not mapped from either copy (Asterisk
    refuses such a file: "configuration contains a duplicate object"), nor is the endpoint
    that uses it; of a wizard defined twice the last copy is imported, as Asterisk's
    wizard applies each copy in turn."""
    auth = "[a{n}]\ntype=auth\nusername=u{n}\npassword=Secret-{n}\n"
    endpoint = "[{n}]\ntype=endpoint\nauth=a{n}\naors={n}\nallow=ulaw\n"
    aor = "[{n}]\ntype=aor\n"
    text = endpoint.format(n=8001) + endpoint.format(n=8001) + auth.format(n=8001)
    text += aor.format(n=8001)
    text += endpoint.format(n=8002) + auth.format(n=8002) + aor.format(n=8002) * 2
    text += endpoint.format(n=8003) + auth.format(n=8003) + aor.format(n=8003)
    wizard = (
        "[8004]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/username={u}\ninbound_auth/password=Secret-8004\n"
    )
    plan = _plan(text)
    assert [(u.username, u.extension) for u in plan.users] == [("u8003", "8003")]
    wizards = _plan(wizard.format(u="first") + wizard.format(u="last"), read_as="pjsip_wizard.conf")
    assert [(u.username, u.extension) for u in wizards.users] == [("last", "8004")]
    twice = "defined twice (lines {}): Asterisk loads no {} from a file that defines one more "
    twice += "than once"
    assert [str(u) for u in plan.unmapped] == [
        "[8001] endpoint: " + twice.format("1, 6", "endpoint"),
        "[8001] endpoint: " + twice.format("1, 6", "endpoint"),
        "[a8001] auth: belongs to [8001], which is not mapped",
        "[8001] aor: belongs to [8001], which is not mapped",
        "[8002] endpoint: its aor [8002] is " + twice.format("26, 28", "aor"),
        "[a8002] auth: belongs to [8002], which is not mapped",
        "[8002] aor: " + twice.format("26, 28", "aor"),
        "[8002] aor: " + twice.format("26, 28", "aor"),
    ]
    assert [str(u) for u in wizards.unmapped] == [
        "[8004] wizard: replaced by the wizard of line 8 (Asterisk applies each in turn)",
    ]


def test_a_webrtc_endpoints_nat_is_read_without_direct_media() -> None:
    """A ws/wss endpoint's NAT row is chosen by force_rport, rewrite_contact and
    rtp_symmetric alone (WebRTC users always render ``direct_media=no``): without
    direct media it imports as nat=no with no note; with it, a note says it is dropped."""
    text = ""
    for ext, direct in (("8101", "no"), ("8102", "yes")):
        text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\nallow=opus\nwebrtc=yes\n"
        text += "transport=transport-wss\nforce_rport=no\nrewrite_contact=no\nrtp_symmetric=no\n"
        text += f"direct_media={direct}\n[{ext}]\ntype=aor\nmax_contacts=5\nremove_existing=yes\n"
        text += (
            f"qualify_frequency=60\n[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n"
        )
    users = {u.extension: u for u in _plan(text).users}
    assert [(u.values["transport"], u.values["nat"]) for u in users.values()] == [("wss", "no")] * 2
    assert users["8101"].notes == ()
    assert users["8102"].notes == ("direct_media=yes becomes no: WebRTC media cannot go direct",)


def test_a_wizard_setting_transport_again_uses_its_last_one(tmp_path: Path) -> None:
    """A wizard that sets ``transport=`` again over its template's is on the last one, as
    Asterisk's wizard reads each of its own options (``ast_variable_find_last_in_list``)."""
    conf = tmp_path / "pjsip_wizard.conf"
    conf.write_text(
        "[phone](!)\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "transport=transport-udp\nendpoint/allow=ulaw\n"
        "[8201](phone)\ntransport=transport-tcp\n"
        "inbound_auth/username=u8201\ninbound_auth/password=Secret-8201\n",
        encoding="utf-8",
    )
    (user,) = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf)).users
    assert user.values["transport"] == "tcp"


def test_wizard_object_prefixes_are_matched_in_lower_case_as_asterisk_matches_them(
    tmp_path: Path,
) -> None:
    """``Endpoint/context=`` or ``Inbound_Auth/username=`` is no object option for
    Asterisk's wizard (it matches the ``endpoint/`` and ``inbound_auth/`` prefixes
    exactly): such lines are reported as ignored, and a wizard whose username is only
    spelled so has no auth and is not mapped."""
    conf = tmp_path / "pjsip_wizard.conf"
    conf.write_text(
        "[8301]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\nEndpoint/context=sales\n"
        "inbound_auth/username=u8301\ninbound_auth/password=Secret-8301\n"
        "[8302]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\nInbound_Auth/username=u8302\ninbound_auth/password=Secret-8302\n",
        encoding="utf-8",
    )
    plan = plan_import(read_file(conf), SETTINGS, read_as=file_kind(conf))
    (user,) = plan.users
    assert (user.extension, user.values["context"]) == ("8301", "default")
    assert "ignored wizard options: Endpoint/context" in user.notes
    assert [str(u) for u in plan.unmapped] == [
        "[8302] wizard: has no inbound_auth/username: Asterisk's wizard creates no auth for it"
    ]


def test_a_bare_phone_number_callerid_is_a_number_as_asterisk_reads_it() -> None:
    """``callerid=+49 (30) 123-45`` is a number, not a name, as Asterisk reads a callerid
    without ``<>`` (blanks, parentheses and dashes dropped, then digits, ``+``, ``*``,
    ``#``): the full name is the username and the number is noted."""
    callerids = (("8401", "+49 (30) 123-45"), ("8402", "*1001#"), ("8403", "Ann 2"))
    users = _mapped_by_callerid(callerids)
    assert {e: u.values["full_name"] for e, u in users.items()} == {
        "8401": "u8401",
        "8402": "u8402",
        "8403": "Ann 2",
    }
    assert "callerid number +493012345 becomes the extension 8401" in users["8401"].notes
    assert "callerid number *1001# becomes the extension 8402" in users["8402"].notes


def test_a_callerid_is_split_into_name_and_number_as_asterisk_splits_it() -> None:
    """A callerid is read as Asterisk reads it: the number runs from the last ``<`` to the
    last ``>`` after it (or to the end, so a missing ``>`` is no error, and text after it
    is dropped), the name is what precedes it without one pair of quotes."""
    cases = (
        ("8501", "Alice Archer <8501", "Alice Archer"),
        ("8502", '"Bob Baker" <8502> desk', "Bob Baker"),
        ("8503", "Carol <Office> <8503>", "u8503"),
    )
    users = _mapped_by_callerid((ext, callerid) for ext, callerid, _ in cases)
    assert {e: u.values["full_name"] for e, u in users.items()} == {e: n for e, _, n in cases}
    assert not any("number" in n for u in users.values() for n in u.notes)
    assert any(n.startswith("callerid name 'Carol <Office>' must") for n in users["8503"].notes)


def test_a_wizard_with_an_empty_inbound_auth_username_is_reported_by_that_option() -> None:
    """A wizard whose ``inbound_auth/username=`` is empty is not mapped, and the reason
    names that option (not an auth section the file does not have)."""
    plan = _plan(
        "[8601]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/username=\ninbound_auth/password=Secret-8601\n",
        read_as="pjsip_wizard.conf",
    )
    assert plan.users == ()
    assert [str(u) for u in plan.unmapped] == [
        "[8601] wizard: its inbound_auth/username is empty: a phone could not authenticate"
    ]


def _no_transport_user(transports: str, ext: str, extra: str = "") -> MappedUser:
    """The user mapped from endpoint ``ext`` without ``transport=`` in a file whose transport
    sections have the ``transports`` protocols (comma-separated, may be empty)."""
    text = "".join(
        f"[t-{p}]\ntype=transport\nprotocol={p}\nbind=0.0.0.0:{5060 + i}\n"
        for i, p in enumerate(_split_list(transports))
    )
    text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\nallow=ulaw\n{extra}"
    text += f"[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n[{ext}]\ntype=aor\n"
    (user,) = _plan(text).users
    return user


def _split_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def test_an_endpoint_without_a_transport_is_imported_on_the_protocol_its_phones_can_use() -> None:
    """An endpoint without ``transport=`` (Asterisk then serves its phones on any of the
    file's transports) is imported on the one protocol the file's transports speak, and
    when they speak several, or the file has none, on udp (wss with webrtc) with a note."""
    tls = _no_transport_user("TLS", "7601")
    assert tls.values["transport"] == "tls"
    assert "no transport=: tls, the one protocol of this file's transports (t-TLS)" in tls.notes
    udp = _no_transport_user("udp", "7602")
    assert udp.values["transport"] == "udp"
    assert not [n for n in udp.notes if "transport" in n]
    several = _no_transport_user("udp,tcp,tls", "7603")
    assert several.values["transport"] == "udp"
    assert (
        "no transport=: Asterisk serves its phones on any of this file's transports "
        "(udp, tcp, tls); imported as udp, so phones on another protocol must move to udp"
    ) in several.notes
    none = _no_transport_user("", "7604")
    assert none.values["transport"] == "udp"
    assert (
        "no transport= and no transport in this file: imported as udp, so phones on "
        "another protocol must move to udp"
    ) in none.notes
    browser = _no_transport_user("udp,ws", "7605", "webrtc=yes\n")
    assert browser.values["transport"] == "ws"
    assert "no transport=: ws, the one WebRTC protocol of this file's transports (t-ws)" in (
        browser.notes
    )
    stranded = _no_transport_user("udp", "7606", "webrtc=yes\n")
    assert stranded.values["transport"] == "wss"
    assert (
        "no transport= and no ws or wss transport in this file: imported as wss, so phones "
        "on another protocol must move to wss"
    ) in stranded.notes


def test_a_codec_list_asterisk_cannot_read_leaves_the_user_not_mapped() -> None:
    """An ``allow``/``disallow`` item Asterisk cannot read (a name it has no codec for, an
    empty item, a bad packetization) makes it load no such endpoint, so its user is not
    mapped; names it knows but we do not support are only dropped, as before."""
    tail = "Asterisk loads no such endpoint"
    cases = {
        "7651": ("allow=ulaw,g729a", "allow 'ulaw,g729a' names 'g729a', no codec Asterisk knows"),
        "7652": ("allow=ulaw,alaw,", "allow 'ulaw,alaw,' has an empty item"),
        "7653": ("allow=ulaw:abc", "allow 'ulaw:abc' gives ulaw a packetization"),
        "7654": ("allow=ulaw\ndisallow=ulaw alaw", "disallow 'ulaw alaw' names 'ulaw alaw'"),
        "7655": ("allow=", "allow '' has an empty item"),
        "7656": ("allow=ULAW,Alaw:20,g726,ulaw:\ndisallow=", ""),
        "7657": ("allow=(ulaw|g722)\ndisallow=!opus", ""),
    }
    text = ""
    for ext, (codecs, _) in cases.items():
        text += f"[{ext}]\ntype=endpoint\nauth=a{ext}\naors={ext}\n{codecs}\n[{ext}]\ntype=aor\n"
        text += f"[a{ext}]\ntype=auth\nusername=u{ext}\npassword=Secret-{ext}\n"
    plan = _plan(text)
    reasons = {u.section: u.reason for u in plan.unmapped if u.reason.startswith("endpoint:")}
    for ext, (_, reason) in cases.items():
        if reason:
            assert reasons[ext].startswith(f"endpoint: {reason}"), reasons.get(ext)
            assert reasons[ext].endswith(tail), reasons[ext]
    users = {u.extension: u for u in plan.users}
    assert sorted(users) == ["7656", "7657"]
    assert users["7656"].values["codecs"] == "ulaw,alaw"
    assert "codecs dropped (not supported here): g726" in users["7656"].notes
    assert users["7657"].values["codecs"] == "ulaw,g722,opus"


def _cli_import(tmp_path: Path, text: str, *extra: str, name: str = "pjsip.conf") -> str:
    """What ``provisioner import pjsip`` prints for ``text`` written to a real file ``name``,
    imported into a new real SQLite store (profile ``agents``)."""
    conf = tmp_path / name
    conf.write_text(text, encoding="utf-8")
    with temp_database("sqlite", tmp_path) as url:
        cli = make_cli(url, tmp_path, "[security]\npassword_policy = false\n")
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        cli.ok("user", "add", "root", "--role", "admin", "--full-name", "R", "--email", "r@x.org")
        return cli.ok(
            "import", "pjsip", str(conf), "--profile", "agents", "--email-domain", "x.org", *extra
        )


def test_an_identify_of_an_imported_phone_is_reported_as_that_phones(tmp_path: Path) -> None:
    """An identify whose endpoint is imported as a user is reported as that user's address
    match, not carried over, rather than as a trunk's."""
    text = (
        "[8101]\ntype=endpoint\nauth=a8101\naors=8101\nallow=ulaw\n[8101]\ntype=aor\n"
        "[a8101]\ntype=auth\nusername=u8101\npassword=Secret-8101\n"
        "[8101-ip]\ntype=identify\nendpoint=8101\nmatch=192.0.2.10\n"
        "[trunk]\ntype=endpoint\nallow=ulaw\n"
        "[trunk-ip]\ntype=identify\nendpoint=trunk\nmatch=198.51.100.1\n"
    )
    out = _cli_import(tmp_path, text)
    assert "added u8101 (extension 8101)" in out
    assert (
        "not mapped: [8101-ip] identify: matches imported user u8101 ([8101]) by address; "
        "matching by address is not carried over (its phones are found by their SIP user, "
        "8101)"
    ) in out
    assert "not mapped: [trunk-ip] identify: belongs to [trunk], which is not mapped" in out


def test_an_identify_of_a_phone_not_imported_is_reported_as_that_endpoints(
    tmp_path: Path,
) -> None:
    """An identify whose endpoint is not mapped (for whatever reason) is reported as
    belonging to that endpoint, not as a trunk's."""
    text = (
        "[8111]\ntype=endpoint\nauth=a8111\naors=8111\nallow=ulaw\n[8111]\ntype=aor\n"
        "[a8111]\ntype=auth\nauth_type=md5\nusername=u8111\nmd5_cred=" + FRANK_MD5 + "\n"
        "[8111-ip]\ntype=identify\nendpoint=8111\nmatch=192.0.2.11\n"
        "[elsewhere-ip]\ntype=identify\nendpoint=elsewhere\nmatch=192.0.2.12\n"
    )
    out = _cli_import(tmp_path, text)
    assert "not mapped: [8111] endpoint: needs a new SIP secret" in out, out
    assert "not mapped: [8111-ip] identify: belongs to [8111], which is not mapped" in out
    assert (
        "not mapped: [elsewhere-ip] identify: matches [elsewhere] by address, "
        "an endpoint this file does not define"
    ) in out
    assert "a trunk" not in out


def test_an_endpoint_allowing_no_codec_is_not_mapped_however_it_says_so(tmp_path: Path) -> None:
    """An endpoint with no ``allow`` and one whose ``disallow=all`` leaves nothing allowed
    both give Asterisk's endpoint no codec: both are not mapped, for the same reason."""
    user = "[{n}]\ntype=endpoint\nauth=a{n}\naors={n}\n{codecs}[{n}]\ntype=aor\n"
    user += "[a{n}]\ntype=auth\nusername=u{n}\npassword=Secret-{n}\n"
    text = user.format(n=8201, codecs="") + user.format(n=8202, codecs="disallow=all\n")
    text += user.format(n=8203, codecs="allow=ulaw\ndisallow=ulaw\n")
    text += user.format(n=8204, codecs="allow=ulaw\n")
    wizard = (
        "[8205]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "inbound_auth/username=u8205\ninbound_auth/password=Secret-8205\n"
    )
    (tmp_path / "wizard").mkdir()
    wizards = _cli_import(tmp_path / "wizard", wizard, name="pjsip_wizard.conf")
    out = _cli_import(tmp_path, text)
    why = "allows no codec: Asterisk gives it none, so its phones could make no call"
    for ext, kind in (("8201", "endpoint"), ("8202", "endpoint"), ("8203", "endpoint")):
        assert f"not mapped: [{ext}] {kind}: {why}" in out, out
    assert f"not mapped: [8205] wizard: {why}" in wizards, wizards
    assert out.splitlines()[0] == "added u8204 (extension 8204)"
    assert "added 1 users;" in out


def test_a_wizard_defined_again_keeps_the_objects_asterisk_keeps_from_each_copy(
    tmp_path: Path,
) -> None:
    """Of a wizard defined twice, each object (endpoint, auth, aor) is the one of the last
    copy Asterisk's wizard creates it from: a later copy it creates no auth from (no
    inbound_auth/username) leaves the earlier copy's auth standing, with the later
    endpoint; a later copy without accepts_auth deletes the auth and gives an endpoint
    without one."""
    wizard = "[{n}]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
    first = wizard + "endpoint/allow=ulaw\nendpoint/context=first\n"
    first += "inbound_auth/username=u{n}\ninbound_auth/password=Secret-{n}\n"
    text = first.format(n=8301)  # lines 1-8
    text += wizard.format(n=8301) + "endpoint/allow=alaw\nendpoint/context=second\n"  # 9-14
    text += "inbound_auth/password=Other-8301\n"  # 15
    text += first.format(n=8302)  # 16-23
    text += "[8302]\ntype=wizard\naccepts_registrations=yes\nendpoint/allow=ulaw\n"  # 24-27
    text += first.format(n=8303)  # 28-35
    text += wizard.format(n=8303) + "endpoint/allow=ulaw\nendpoint/bogus=1\n"  # 36-41
    text += "inbound_auth/username=v8303\ninbound_auth/password=Secret-8303b\n"  # 42-43
    out = _cli_import(tmp_path, text, "--dry-run", name="pjsip_wizard.conf")
    plan = plan_import(
        read_file(tmp_path / "pjsip_wizard.conf"), SETTINGS, read_as="pjsip_wizard.conf"
    )
    users = {u.extension: u for u in plan.users}
    assert sorted(users) == ["8301", "8303"], out
    one = users["8301"]
    assert (one.username, one.line, one.values["context"], one.values["codecs"]) == (
        "u8301",
        9,
        "second",
        "alaw",
    )
    assert one.sip_secret == "Secret-8301"
    assert (
        "wizard defined twice (lines 1, 9): its endpoint and aor are line 9's, its auth "
        "line 1's (Asterisk applies each copy in turn; a copy it cannot create an object "
        "from leaves the earlier one)"
    ) in one.notes
    three = users["8303"]
    assert (three.username, three.line, three.values["context"]) == ("v8303", 28, "first")
    assert three.sip_secret == "Secret-8303b"
    reasons = _unmapped(plan)
    assert reasons[("8301", 1)] == "wizard: its auth is read with the wizard of line 9"
    assert reasons[("8303", 36)] == "wizard: its aor and auth are read with the wizard of line 28"
    assert reasons[("8302", 24)].startswith("wizard: does not accept auth")
    assert reasons[("8302", 16)] == (
        "wizard: replaced by the wizard of line 24 (Asterisk applies each in turn)"
    )
    assert "would add u8301 (extension 8301)" in out


def test_each_file_is_read_for_the_objects_asterisk_reads_from_it(tmp_path: Path) -> None:
    """A wizard in pjsip.conf and an endpoint (or any other non-wizard section) in
    pjsip_wizard.conf are reported as never read by Asterisk, not imported; a file of
    another name is read as pjsip.conf unless --read-as says it is the wizard's file."""
    endpoint = (
        "[8401]\ntype=endpoint\nauth=a8401\naors=8401\nallow=ulaw\n[8401]\ntype=aor\n"
        "[a8401]\ntype=auth\nusername=u8401\npassword=Secret-8401\n"
    )
    wizard = (
        "[8402]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/username=u8402\ninbound_auth/password=Secret-8402\n"
    )
    transport = "[udp]\ntype=transport\nprotocol=udp\n"
    dirs = [tmp_path / d for d in ("pjsip", "wizard", "other", "forced")]
    for d in dirs:
        d.mkdir()
    text = endpoint + wizard + transport
    pjsip = _cli_import(dirs[0], text)
    wizards = _cli_import(dirs[1], text, name="pjsip_wizard.conf")
    other = _cli_import(dirs[2], text, name="wizards.conf")
    forced = _cli_import(dirs[3], text, "--read-as", "pjsip_wizard.conf", name="wizards.conf")
    in_pjsip = "a wizard in pjsip.conf: Asterisk reads wizards only from pjsip_wizard.conf"
    for out in (pjsip, other):
        assert "added u8401 (extension 8401)" in out, out
        assert f"not mapped: [8402] wizard: {in_pjsip}" in out, out
        assert "u8402" not in out
        assert "added 1 users; 2 sections not mapped" in out
    only = "in pjsip_wizard.conf: Asterisk reads only wizards from pjsip_wizard.conf"
    for out in (wizards, forced):
        assert "added u8402 (extension 8402)" in out, out
        assert f"not mapped: [8401] endpoint: an endpoint {only}" in out, out
        assert f"not mapped: [8401] aor: an aor {only}" in out, out
        assert f"not mapped: [a8401] auth: an auth {only}" in out, out
        assert f"not mapped: [udp] transport: a transport {only}" in out, out
        assert "u8401" not in out
        assert "added 1 users; 4 sections not mapped" in out


def test_a_wizard_files_digests_are_carried_only_for_a_realm_it_was_given(tmp_path: Path) -> None:
    """A wizard's digests are made for pjsip.conf's ``[global] default_realm`` unless it
    sets ``inbound_auth/realm``, and a wizard file cannot say which realm that is: they are
    not carried over for a guessed ``asterisk`` (phones would get 401s), but for the realm
    ``--default-realm`` names, which our realm must equal."""
    site = credentials.sip_digests("u8901", "pbx.example.com", "Secret-8901")
    text = (
        "[8901]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/username=u8901\n"
        f"inbound_auth/password_digest=SHA-256:{site.sha256},MD5:{site.md5}\n"
    )
    for run in ("guessed", "other"):
        (tmp_path / run).mkdir()
    guessed = _cli_import(tmp_path / "guessed", text, name="pjsip_wizard.conf")
    assert (
        "not mapped: [8901] wizard: needs a new SIP secret: its digests are for the realm of "
        "pjsip.conf's [global] default_realm, which a wizard file does not hold (give it with "
        "--default-realm); or import with --generate-secrets"
    ) in guessed
    other = _cli_import(
        tmp_path / "other", text, "--default-realm", "pbx.example.com", name="pjsip_wizard.conf"
    )
    assert (
        "not mapped: [8901] wizard: needs a new SIP secret: its digests were made for realm "
        "'pbx.example.com', ours is 'asterisk'; or import with --generate-secrets"
    ) in other
    (user,) = plan_import(
        parse(text),
        RenderSettings(realm="pbx.example.com"),
        read_as="pjsip_wizard.conf",
        default_realm="pbx.example.com",
    ).users
    assert user.digests == (site.md5, site.sha256)


def test_amr_codecs_of_a_patched_asterisk_are_dropped_not_refused(tmp_path: Path) -> None:
    """``allow=amr`` or ``amrwb`` works only on an Asterisk patched for AMR (stock Asterisk 22
    has no such codec and drops the endpoint), so a site whose phones use them runs one: the
    user is imported with its other codecs and a note, not refused as unloadable."""
    text = (
        "[9001]\ntype=endpoint\nauth=a9001\naors=9001\ndisallow=all\nallow=amrwb,AMR,ulaw\n"
        "[9001]\ntype=aor\n[a9001]\ntype=auth\nusername=u9001\npassword=Secret-9001\n"
    )
    out = _cli_import(tmp_path, text)
    assert "added u9001 (extension 9001)" in out
    assert (
        "  note: codecs dropped (not supported here): amrwb, amr (amrwb, amr: only an Asterisk "
        "patched for AMR has them; stock Asterisk 22 loads no endpoint allowing them)"
    ) in out
    (user,) = _plan(text).users
    assert user.values["codecs"] == "ulaw"


def test_an_aor_without_max_contacts_is_noted_as_one_no_phone_could_register_to() -> None:
    """Asterisk answers a REGISTER to an AOR whose ``max_contacts`` is 0 (its default) with
    403: the note on the user, whose AOR takes a phone, says that no phone could register
    before, not only that a number changed."""
    text = (
        "[9101]\ntype=endpoint\nauth=a9101\naors=9101\nallow=ulaw\n[9101]\ntype=aor\n"
        "[a9101]\ntype=auth\nusername=u9101\npassword=Secret-9101\n"
    )
    (user,) = _plan(text).users
    assert (
        "aor max_contacts 0 becomes 1 (at 0 Asterisk refused every REGISTER with 403: "
        "no phone could register to it)"
    ) in user.notes


def test_a_wizard_password_is_checked_against_its_md5_cred_for_the_realm_given() -> None:
    """A wizard's password beside an ``md5_cred`` is carried over when it is that digest's
    secret for the realm given with ``--default-realm``; without it, a digest that is not
    the password's for ``asterisk`` leaves the user not mapped, the reason naming the realm
    it was checked for and the option."""
    md5 = credentials.sip_digests("u9201", "pbx.example.com", "Secret-9201").md5
    text = (
        "[9201]\ntype=wizard\naccepts_auth=yes\naccepts_registrations=yes\n"
        "endpoint/allow=ulaw\ninbound_auth/username=u9201\n"
        f"inbound_auth/password=Secret-9201\ninbound_auth/md5_cred={md5}\n"
    )
    guessed = plan_import(parse(text), SETTINGS, read_as="pjsip_wizard.conf")
    assert guessed.users == ()
    assert (
        "its password is not the secret of its md5_cred (MD5 digest for realm 'asterisk', "
        "unless pjsip.conf's [global] default_realm is another (give it with "
        "--default-realm)), which Asterisk checks instead"
    ) in str(guessed.unmapped[0])
    (user,) = plan_import(
        parse(text), SETTINGS, read_as="pjsip_wizard.conf", default_realm="pbx.example.com"
    ).users
    assert (user.sip_secret, user.digests) == ("Secret-9201", None)


def test_an_auth_whose_digests_or_algorithms_asterisk_cannot_parse_is_not_mapped() -> None:
    """Asterisk drops an auth (so no phone authenticates) whose ``md5_cred`` or
    ``password_digest`` item is no digest of its algorithm's length or names an algorithm
    it does not know, or whose ``supported_algorithms_uas``/``_uac`` names one: its user
    is not mapped, as for any object Asterisk does not load, and the digest is never
    printed."""
    good = credentials.sip_digests("frank", "asterisk", "Frank-Secret-1006")
    cases = {
        f"md5_cred={good.md5[:31]}": "md5_cred holds no MD5 digest (32 characters)",
        f"password_digest=SHA-256:{good.sha256}0": (
            "password_digest holds no SHA-256 digest (64 characters)"
        ),
        f"password_digest=SHA1:{good.md5}": (
            "password_digest names 'SHA1', no digest algorithm Asterisk knows"
        ),
        "supported_algorithms_uas=SHA256,MD5": (
            "supported_algorithms_uas names 'SHA256', no digest algorithm Asterisk knows"
        ),
    }
    for line, why in cases.items():
        plan = _plan(_userpass_auth("password=Frank-Secret-1006", line))
        assert plan.users == (), line
        reason = str(plan.unmapped[0])
        assert reason == (
            f"[1006] endpoint: its auth [1006-auth] {why}: Asterisk loads no such auth"
            " (no phone could authenticate)"
        ), line
    accepted = _userpass_auth(
        "password=Frank-Secret-1006",
        f"password_digest= md5:{good.md5} , SHA-256:{good.sha256}",
        "supported_algorithms_uas=sha-256, MD5",
    )
    (frank,) = _plan(accepted).users
    assert frank.sip_secret == "Frank-Secret-1006"


def test_an_import_into_a_store_without_an_admin_says_so_once(tmp_path: Path) -> None:
    """A store's first user must be an admin and an import adds users of role ``user``: into
    a store with no user yet it is refused with one line saying to add the admin first, not
    one "the first user must be an admin" per user of the file."""
    conf = tmp_path / "pjsip.conf"
    conf.write_text(PJSIP_CONF, encoding="utf-8")
    with temp_database("sqlite", tmp_path) as url:
        cli = make_cli(url, tmp_path)
        cli.ok("db", "upgrade")
        cli.ok("profile", "add", "agents")
        refused = cli(
            "import", "pjsip", str(conf), "--profile", "agents", "--email-domain", "x.org"
        )
    assert refused.code == 2
    assert refused.err.splitlines()[1:] == [
        "  import: the store has no user yet and its first user must be an admin, while "
        "imported users are of role user: add the admin first (provisioner user add NAME "
        "--role admin ...)"
    ]


def test_a_default_realm_given_against_the_files_own_is_noted(tmp_path: Path) -> None:
    """``--default-realm`` wins over the file's own ``[global] default_realm``, and a notice
    says so, naming both and the realm digests of auths without ``realm`` were taken for;
    none is printed when the two agree."""
    text = (
        "[global]\ntype=global\ndefault_realm=site.example.com\n"
        "[9301]\ntype=endpoint\nauth=a9301\naors=9301\nallow=ulaw\n[9301]\ntype=aor\n"
        "max_contacts=1\n[a9301]\ntype=auth\nusername=u9301\npassword=Secret-9301\n"
    )
    for run in ("other", "same"):
        (tmp_path / run).mkdir()
    other = _cli_import(tmp_path / "other", text, "--default-realm", "pbx.example.com")
    assert (
        "notice: --default-realm 'pbx.example.com' overrides the file's [global] "
        "default_realm 'site.example.com' (line 1): digests of auths that set no realm are "
        "taken as made for 'pbx.example.com'"
    ) in other.splitlines(), other
    same = _cli_import(tmp_path / "same", text, "--default-realm", "site.example.com")
    assert "notice:" not in same, same
