"""``provisioner check``'s AMI line: one login tried once, its outcome said at once (a
refused connection, a refused login), a silent host waited for its timeout; nothing
but the check's own lines printed."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .amipeer import FakeAsterisk, in_a_thread
from .faultkit import PROVISIONER, env, pbx_entry_lines, write_config

#: The [[asterisk]] entry's login timeout where a test waits it out (the shortest allowed).
TIMEOUT = 2.0
#: The login timeout where a test shows the check did NOT wait it out: long enough that a
#: process started on a loaded machine (its imports alone can take over a second) still
#: ends well inside it, so "at once" is told from "after the timeout" by a wide margin.
LONG_TIMEOUT = 15.0


#: A secret long enough that the passing line adds no note on it.
LONG_SECRET = "k3Jq9-vL2x7-Rt5mZ-8wPa"


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A real listening socket that accepts connections and never says a word."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield int(server.getsockname()[1])


def _check(
    tmp_path: Path,
    port: int,
    secret: str = "lab-secret",
    timeout: float = TIMEOUT,
    extra: tuple[str, ...] = (),
) -> tuple[str, str, float]:
    """``provisioner check`` (a real process) with one server pbx1 on ``port``, login
    timeout ``timeout`` and the ``extra`` lines of its entry: its stdout, stderr and how
    long it took (it exits 1: the store it names was never made)."""
    config = write_config(
        tmp_path,
        extra=[*pbx_entry_lines(port, secret), f"timeout = {timeout}", *extra],
    )
    config.chmod(0o600)
    started = time.monotonic()
    ran = subprocess.run(
        [PROVISIONER, "--config", str(config), "check"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    took = time.monotonic() - started
    assert ran.returncode == 1, ran
    return ran.stdout, ran.stderr, took


def _ami_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if " asterisk pbx1: " in line]
    return line


def test_a_refused_connection_fails_the_ami_line_at_once(tmp_path: Path) -> None:
    """Nothing listening on the AMI port fails the line at once with "connection
    refused", with no retry warnings on stderr (it waited the whole login timeout plus
    1 s, logging each retry)."""
    port = _closed_port()
    out, err, took = _check(tmp_path, port, timeout=LONG_TIMEOUT)
    assert _ami_line(out) == f"FAIL  asterisk pbx1: 127.0.0.1:{port}: connection refused"
    assert err == ""
    assert took < LONG_TIMEOUT, took


def test_a_silent_host_fails_the_ami_line_after_its_timeout(
    tmp_path: Path, silent_port: int
) -> None:
    """A host that accepts and never answers fails the line once its login timeout has
    passed, saying no greeting came, with nothing on stderr."""
    out, err, took = _check(tmp_path, silent_port)
    assert _ami_line(out) == (
        f"FAIL  asterisk pbx1: 127.0.0.1:{silent_port}: no AMI greeting in {TIMEOUT}s "
        "(is it Asterisk?)"
    )
    assert err == ""
    assert TIMEOUT <= took < LONG_TIMEOUT, took


def test_a_refused_login_fails_the_ami_line_when_asterisk_answers(tmp_path: Path) -> None:
    """A wrong secret fails the line with Asterisk's answer as soon as it comes, with no
    login error logged on stderr, not after the whole login timeout."""
    with in_a_thread(FakeAsterisk()) as peer:
        out, err, took = _check(tmp_path, peer.port, secret="wrong", timeout=LONG_TIMEOUT)
    assert _ami_line(out) == f"FAIL  asterisk pbx1: 127.0.0.1:{peer.port}: Authentication failed"
    assert err == ""
    assert took < LONG_TIMEOUT, took


def test_an_account_that_may_not_send_the_daemons_actions_fails_the_ami_line(
    tmp_path: Path,
) -> None:
    """An AMI account Asterisk lets in but answers ``Permission denied`` for Reload and
    DBDel (no ``system`` write privilege) fails the line naming those actions and the
    privilege to grant, rather than pass and leave every apply refused."""
    with in_a_thread(FakeAsterisk()) as peer:
        peer.refuse = {
            ("reload", "Reload"): "Permission denied",
            ("dbdel", "DBDel"): "Permission denied",
        }
        out, err, _took = _check(tmp_path, peer.port)
    assert _ami_line(out) == (
        f"FAIL  asterisk pbx1: 127.0.0.1:{peer.port} login ok, but Asterisk refuses this "
        "account Reload, DBDel (Permission denied): give it write = system in manager.conf"
    )
    assert err == ""


def test_the_privilege_check_changes_nothing_on_asterisk(tmp_path: Path) -> None:
    """An account allowed everything the daemon sends passes the line; the check's probes
    reload no module, delete no contact and name no endpoint that exists."""
    with in_a_thread(FakeAsterisk(secret=LONG_SECRET)) as peer:
        astdb = set(peer.astdb)
        out, _err, _took = _check(tmp_path, peer.port, secret=LONG_SECRET)
        sent = [dict(a.headers) for a in peer.received]
    assert _ami_line(out) == f"ok    asterisk pbx1: 127.0.0.1:{peer.port} login ok"
    assert peer.astdb == astdb
    reloads = [h for h in sent if h["Action"] == "Reload"]
    assert reloads == [{"Action": "Reload", "ActionID": reloads[0]["ActionID"],
                        "Module": "provisioner-check-probe.so"}]  # fmt: skip
    assert {h["Action"] for h in sent} >= {"PJSIPShowEndpoint", "DBDel"}


@pytest.mark.parametrize("login", ["md5", "plain"])
def test_a_short_or_plain_secret_is_noted_on_a_passing_ami_line(tmp_path: Path, login: str) -> None:
    """A login that works with a short secret (10 characters), or by ``login = plain``,
    passes its line, which says how the secret is exposed, never the secret itself."""
    with in_a_thread(FakeAsterisk()) as peer:
        out, err, _took = _check(tmp_path, peer.port, extra=(f'login = "{login}"',))
    line = _ami_line(out)
    assert line.startswith(f"ok    asterisk pbx1: 127.0.0.1:{peer.port} login ok; "), line
    if login == "plain":
        assert line.endswith("login = plain: the secret crosses the network as it is")
    else:
        assert "its secret is short (10 characters)" in line
    assert "lab-secret" not in out + err
