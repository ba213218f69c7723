"""Secrets: none reaches any output or log, whatever path the work takes.

A representative CLI workflow (in-process, debug logging), ``provisioner check`` against a
fake Asterisk, a daemon burst, a running daemon that logs into AMI and applies an edit, and
a realtime write that fails: every captured stdout, stderr and daemon log is searched for
every secret created (login passwords, SIP secrets outside their show-once line, the API
key, SHA-256/MD5 digests, password and API-key hashes, the AMI secret).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from provisioner import credentials
from provisioner.store.engine import open_engine
from provisioner.store.schema import users

from .amipeer import FakeAsterisk, in_a_thread
from .faultkit import (
    PROVISIONER,
    Daemon,
    Ran,
    cheap_hasher,
    cli,
    env,
    fake_pbx_lines,
    until,
    write_config,
)
from .helpers import secret_after

AMI_SECRET = "Ami-Only-S3cret-4711"
PASSWORDS = ["Login-Pass-One-1", "Login-Pass-Two-2", "Csv-Login-Pass-3"]
GIVEN_SIP = ["Given-Sip-Secret-A", "Given-Sip-Secret-B", "Csv-Sip-Secret-C"]


@pytest.fixture
def peer() -> Iterator[FakeAsterisk]:
    """A fake Asterisk on its own event loop thread, expecting AMI_SECRET."""
    with in_a_thread(FakeAsterisk(secret=AMI_SECRET)) as fake:
        yield fake


def _config(tmp: Path, port: int, kind: str = "config") -> Path:
    return write_config(
        tmp,
        kind=kind,
        extra=[
            "[log]",
            'level = "debug"',
            *fake_pbx_lines(port, AMI_SECRET),
        ],
    )


def _workflow(config: Path, tmp: Path) -> tuple[list[Ran], list[str]]:
    """The admin's day; returns every run and the secrets shown once."""
    runs: list[Ran] = []
    shown: list[str] = []

    def run(*args: str, input: str | None = None) -> str:
        ran = cli(config, "-v", *args, input=input)
        runs.append(ran)
        return ran.out

    run("db", "upgrade")
    run("profile", "add", "agents")
    run("user", "add", "root", "--role", "admin", "--full-name", "Root", "--email", "r@e.com")
    common = ["--profile", "agents", "--email"]
    shown.append(secret_after(run("user", "add", "alice", "--full-name", "A", *common, "a@e.com")))
    run("user", "add", "bob", "--full-name", "B", *common, "b@e.com",
        "--sip-secret", GIVEN_SIP[0], "--password", "-", input=PASSWORDS[0] + "\n")  # fmt: skip
    run("user", "passwd", "bob", input=PASSWORDS[1] + "\n")
    run("auth", "login", "bob", input=PASSWORDS[1] + "\n")
    ran = cli(config, "-v", "auth", "login", "bob", input="Wrong-Pass-9\n", check=False)
    assert ran.code == 6
    runs.append(ran)
    shown.append(secret_after(run("user", "sip-secret", "alice", "--rotate")))
    run("user", "sip-secret", "bob", "--rotate", "--secret", "-", input=GIVEN_SIP[1] + "\n")
    shown.append(secret_after(run("user", "apikey", "alice", "generate")))
    csv_file = tmp / "import.csv"
    csv_file.write_text(
        "username,full_name,email,profile,password,sip_secret\n"
        f"carol,C,c@e.com,agents,{PASSWORDS[2]},{GIVEN_SIP[2]}\n"
        "dave,D,d@e.com,agents,,\n"
    )
    shown.append(secret_after(run("user", "import", "--csv", str(csv_file))))
    for args in (
        ["user", "show", "alice", "--json"],
        ["user", "list", "--json"],
        ["user", "export", "--csv", "-"],
        ["render", "--dry-run"],
        ["sync", "--once"],
        ["user", "edit", "alice", "--nat", "yes"],
        ["render", "--dry-run"],
        ["status", "--json"],
    ):
        run(*args)
    check = cli(config, "-v", "check", check=False)
    runs.append(check)
    assert "asterisk pbx1" in check.out
    return runs, shown


def _stored_secrets(url: str) -> list[str]:
    """Every digest and hash the store holds, as they would look in a leak."""
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    users.c.sip_md5, users.c.sip_sha256, users.c.password_hash, users.c.apikey_hash
                )
            ).all()
    finally:
        engine.dispose()
    return [v for row in rows for v in row if v]


def _assert_clean(texts: dict[str, str], never: list[str], shown_once: list[str]) -> None:
    everything = "\n".join(texts.values())
    for secret in never:
        for name, content in texts.items():
            assert secret not in content, f"{secret[:6]}... leaked into {name}"
    for secret in shown_once:
        assert everything.count(secret) == 1, f"{secret[:6]}... shown {everything.count(secret)}x"


def test_no_secret_in_cli_daemon_or_check_output(tmp_path: Path, peer: FakeAsterisk) -> None:
    """CLI workflow, check, a daemon burst and a running daemon (AMI login, an edit, a
    reload): no password, given SIP secret, digest, hash or AMI secret in any output; each
    generated secret exactly once."""
    saved = credentials._hasher
    cheap_hasher()
    try:
        config = _config(tmp_path, peer.port)
        runs, shown = _workflow(config, tmp_path)
    finally:
        credentials._hasher = saved
    url = f"sqlite:///{tmp_path / 'store.db'}"
    texts = {f"cli run {i}": r.out + r.err for i, r in enumerate(runs)}

    burst = subprocess.run(
        [PROVISIONER, "--config", str(config), "run", "--burst"],
        capture_output=True, text=True, env=env(), timeout=60,
    )  # fmt: skip
    assert burst.returncode == 0, burst.stderr
    texts["daemon burst"] = burst.stdout + burst.stderr

    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        until(lambda: peer.logins_ok >= 2, 10, "daemon AMI login")  # check logged in first
        reloads = len(peer.actions("Reload"))
        cli(config, "user", "edit", "bob", "--nat", "force_rport")
        until(lambda: len(peer.actions("Reload")) > reloads, 10, "reload after the edit")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    texts["daemon log"] = (tmp_path / "daemon.log").read_text()
    texts["health"] = (tmp_path / "state" / "health.json").read_text()

    stored = _stored_secrets(url)
    assert len(stored) >= 13  # 5 users x 2 digests, 2 password hashes, 1 API-key hash
    never = [*PASSWORDS, *GIVEN_SIP, AMI_SECRET, *stored]
    _assert_clean(texts, never, shown)


def test_failing_realtime_write_prints_no_digest(tmp_path: Path, peer: FakeAsterisk) -> None:
    """A realtime write the database refuses: the CLI says so in one line (exit 7) and the
    daemon logs sync.failed, neither quoting a digest or a traceback."""
    config = _config(tmp_path, peer.port, kind="realtime")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for args in (
        ["db", "upgrade"],
        ["user", "add", "root", "--role", "admin", "--full-name", "R", "--email", "r@e.com"],
        ["sync", "--once"],
    ):
        cli(config, *args)
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse_auths BEFORE UPDATE ON ps_auths "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        )
    engine.dispose()
    rotated = cli(config, "user", "sip-secret", "root", "--rotate")
    secret = secret_after(rotated.out)

    ran = cli(config, "-v", "sync", "--once", check=False)
    assert ran.code == 7
    assert "database error: IntegrityError: refused by the test" in ran.err
    # A database error is retried (the store may come back): never ready, never a leak.
    daemon = Daemon(config, tmp_path / "daemon.log").start(wait_ready=False)
    try:
        until(lambda: daemon.failed_tries() >= 2, 10, "sync.failed, retried")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert "refused by the test" in log
    texts = {"cli": ran.out + ran.err, "daemon log": log}
    never = [secret, *_stored_secrets(url)[:2], "Traceback", "[parameters:"]
    _assert_clean(texts, never, [])
