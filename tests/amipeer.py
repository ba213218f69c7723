"""A fake Asterisk AMI peer that replays the real transcripts in ../shared/asterisk/ami.

:class:`Transcripts` parses the recorded exchanges (``>>`` lines are what the lab
client sent, the rest is Asterisk's text, in several file layouts) into a map
from each recorded action to the exact bytes Asterisk answered, events included.
:class:`FakeAsterisk` is an asyncio TCP server on 127.0.0.1 that speaks AMI the
way Asterisk does (banner, CRLF, a bare LF also ends a line, lines over 1024
bytes discarded, one session's actions handled one after another) and answers by
replaying those bytes with the ActionID substituted.  It records every action it
received, as Asterisk would have parsed it, and has scriptable faults.

A few answers have no transcript and are built from facts stated in the shared
README (marked ``README:`` below): ``DBDel``, a successful
``SorceryMemoryCacheExpireObject`` and ``A reload is in progress``.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from provisioner.config import AmiSettings, AsteriskServer

__all__ = [
    "Exchange",
    "FakeAsterisk",
    "ReceivedAction",
    "Transcripts",
    "eventually",
    "fast_settings",
    "load_transcripts",
    "run",
    "running",
    "server_for",
]

# shared/ lies beside the project root (in a checkout and in CI's fresh clone).
AMI_DIR = Path(
    os.environ.get(
        "AMI_TRANSCRIPTS", Path(__file__).resolve().parents[2] / "shared" / "asterisk" / "ami"
    )
)
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
#: When the transcripts were recorded: the first recorded ContactStatus's ``Timestamp``
#: (registration_events.txt).  A replayed ``ExpirationTime`` is moved by the time since,
#: so a contact expires as long after the answer as it did after the recording (300 s),
#: not on 2026-11-24 (every replayed snapshot was otherwise of expired contacts).
RECORDED_AT = 1795564305
_HEADER = re.compile(r"^[A-Za-z0-9_-]+: ?")
_REPLY_START = ("Response:", "Event:")
_ACTION_ID_LINE = re.compile(rb"^ActionID: [^\r\n]*(\r?\n)", re.MULTILINE)


T = TypeVar("T")


class Runner(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass
class Exchange:
    """One recorded action and the bytes Asterisk answered (recorded ActionID inside)."""

    source: str
    action: tuple[tuple[str, str], ...]
    reply: bytes = b""

    @property
    def name(self) -> str:
        return next((v for k, v in self.action if k.lower() == "action"), "")

    @property
    def params(self) -> dict[str, str]:
        """The headers that identify the request (no Action, no ActionID)."""
        return {k.lower(): v for k, v in self.action if k.lower() not in ("action", "actionid")}


@dataclass
class Transcripts:
    """Every recorded exchange, plus answers and events recorded without an action."""

    exchanges: list[Exchange] = field(default_factory=list)
    orphans: list[bytes] = field(default_factory=list)

    def messages(self) -> Iterable[bytes]:
        """Every recorded message from Asterisk, one by one (CRLF, ending in a blank line)."""
        for block in [e.reply for e in self.exchanges] + self.orphans:
            for part in re.split(rb"\r?\n\r\n", block):
                if part.strip():
                    yield part.strip(b"\r\n") + b"\r\n\r\n"

    def find_message(self, *needles: str) -> bytes:
        """The first recorded message containing every one of ``needles``."""
        for message in self.messages():
            text = message.decode("utf-8", "replace")
            if all(n in text for n in needles):
                return message
        raise LookupError(f"no recorded message with {needles}")

    def candidates(self, name: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.name.lower() == name.lower() and e.reply]


def _as_crlf_messages(lines: list[str]) -> bytes:
    """LF-normalised transcript lines -> Asterisk's bytes: CRLF lines, a blank line each."""
    out, current = [], []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            out.append("\r\n".join(current) + "\r\n\r\n")
            current = []
    return "".join(out).encode()


def _action_headers(text: str) -> list[tuple[str, str]]:
    """Headers of one ``>>`` line (a header, a literal ``\\r\\n`` run, or ``Name {dict}``)."""
    text = text[2:].removeprefix(" ")
    if "\\r\\n" in text:
        return [h for part in text.split("\\r\\n") for h in _action_headers(">> " + part)]
    dict_form = re.fullmatch(r"Action: (\w+) (\{.*\})", text)
    if dict_form:
        extra = ast.literal_eval(dict_form.group(2))
        return [("Action", dict_form.group(1)), *((str(k), str(v)) for k, v in extra.items())]
    key, sep, value = text.partition(":")
    return [(key, value.removeprefix(" "))] if sep and key else []


class _FileParser:
    """State machine over one transcript file (see the module docstring)."""

    def __init__(self, source: str, data: bytes, out: Transcripts) -> None:
        self.source, self.out = source, out
        self.crlf = b"\r\n" in data
        self.lines = re.split(rb"(?<=\n)", data)
        self.action: Exchange | None = None
        self.in_action = False
        self.reply_raw: list[bytes] = []

    def flush_reply(self) -> None:
        if not self.reply_raw:
            return
        if self.crlf:
            reply = b"".join(self.reply_raw)  # exact bytes, odd bare LFs included
        else:
            text = [r.decode().rstrip("\r\n") for r in self.reply_raw]
            reply = _as_crlf_messages(text)
        self.reply_raw = []
        if self.action is not None and not self.action.reply:
            self.action.reply = reply
        else:
            self.out.orphans.append(reply)

    def boundary(self) -> None:
        self.flush_reply()
        self.in_action = False
        self.action = None

    def parse(self) -> None:
        for raw in self.lines:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.line(raw, text)
        self.boundary()

    def line(self, raw: bytes, text: str) -> None:
        if text.startswith("<< "):
            text = text[3:]
            raw = raw[3:]
            if text.startswith("["):
                return self.boundary()
        if text.startswith(">>") and not text.startswith(">>>"):  # ">>>": pjsua output
            if not self.in_action:
                self.flush_reply()
                self.action = Exchange(self.source, ())
                self.out.exchanges.append(self.action)
                self.in_action = True
            assert self.action is not None
            self.action.action += tuple(_action_headers(text))
            return None
        if text.startswith(("#", "===", "--", "[")) or text.startswith("Asterisk Call Manager/"):
            if text.startswith("Asterisk Call Manager/"):
                return None
            return self.boundary()
        if self.in_action:
            if _HEADER.match(text) and not text.startswith(_REPLY_START):
                assert self.action is not None
                self.action.action += tuple(_action_headers(">> " + text))
                return None
            self.in_action = False
        if not self.reply_raw and not text.startswith(_REPLY_START):
            return None  # text between exchanges: headings, the blank after an action
        self.reply_raw.append(raw)
        return None


def load_transcripts(directory: Path = AMI_DIR) -> Transcripts:
    """Parse every ``*.txt`` transcript in ``directory``."""
    out = Transcripts()
    for path in sorted(directory.glob("*.txt")):
        _FileParser(path.name, path.read_bytes(), out).parse()
    return out


# -- the fake peer ------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedAction:
    """An action as the peer parsed it off the socket (what Asterisk would act on)."""

    headers: tuple[tuple[str, str], ...]
    connection: int

    @property
    def name(self) -> str:
        return self.get("Action")

    def get(self, key: str) -> str:
        return next((v for k, v in self.headers if k.lower() == key.lower()), "")


def _without_events(reply: bytes) -> bytes:
    """``reply`` without its events that answer no action (``Event: Reload`` after a
    reload): a session logged in with ``Events: off`` gets none.  List events carry the
    action's ActionID and stay."""
    messages = [m for m in re.split(rb"(?<=\r\n\r\n)", reply) if m]
    return b"".join(m for m in messages if not m.startswith(b"Event:") or b"\r\nActionID:" in m)


def _substitute_id(reply: bytes, action_id: str) -> bytes:
    if not action_id:
        return _ACTION_ID_LINE.sub(b"", reply)
    if not _ACTION_ID_LINE.search(reply):
        # Recorded without an ActionID: Asterisk puts it second in every message.
        reply = re.sub(rb"(?m)^((?:Response|Event): [^\r\n]*\r?\n)", rb"\1ActionID: x\r\n", reply)
    return _ACTION_ID_LINE.sub(lambda m: b"ActionID: " + action_id.encode() + m.group(1), reply)


def _synth(*headers: tuple[str, str]) -> bytes:
    return ("".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()


def _lengthened(reply: bytes, items: int) -> bytes:
    """The list answer ``reply`` with ``items`` list events: its first one repeated, each
    with ``1001`` (the recorded endpoint) replaced by another number, and ``ListItems``
    told anew."""
    messages = [m + b"\r\n\r\n" for m in reply.split(b"\r\n\r\n") if m.strip()]
    head, item, tail = messages[0], messages[1], messages[-1]
    body = b"".join(item.replace(b"1001", str(100000 + i).encode()) for i in range(items))
    tail = re.sub(rb"ListItems: \d+", b"ListItems: %d" % items, tail)
    return head + body + tail


class FakeAsterisk:
    """The fake AMI peer; ``await start()``, use ``port``, ``await stop()``."""

    def __init__(
        self,
        *,
        username: str = "provisioner",
        secret: str = "lab-secret",
        transcripts: Transcripts | None = None,
        banner: bytes = BANNER,
    ) -> None:
        self.library = transcripts or load_transcripts()
        self.username, self.secret = username, secret
        #: What a new connection gets first: another service's greeting (an SSH banner),
        #: or nothing (an HTTP server waits for a request), plays a peer that is not Asterisk.
        self.banner = banner
        self.port = 0
        # Faults and knobs.
        self.login_delay = 0.0  # Asterisk waits 1 s before refusing a login
        self.reload_busy = 0  # answer "A reload is in progress" this many times
        self.reload_delay = 0.0  # seconds a successful reload takes
        #: Called with each ``res_pjsip.so`` reload as it ends well, before its answer: the
        #: moment Asterisk has read its config files (a test records their bytes then).
        self.on_reload: Callable[[ReceivedAction], None] | None = None
        # Action name (lower case) -> seconds its answer waits: as behind a storm of
        # events sent before it.
        self.delays: dict[str, float] = {}
        #: Action name (lower case) -> an event its answer waits for: the test decides
        #: when a slow action (a reload, a removal) ends, instead of guessing a delay.
        self.gates: dict[str, asyncio.Event] = {}
        self.drop_on: set[str] = set()  # close the connection on receiving these actions
        self.silent = False  # read and record, never answer (a half-open peer)
        self.prefer: dict[str, str] = {}  # action name -> text its replayed answer must hold
        #: (action name in lower case, a header value it carries) -> the ``Message`` of the
        #: ``Response: Error`` it gets instead of its answer: Asterisk refusing one action.
        self.refuse: dict[tuple[str, str], str] = {}
        #: ``PJSIPShowContacts`` lists every contact in astdb, from all recorded lists at
        #: once (each recorded list holds one phone: 1001's or 2001's).
        self.merge_contact_lists = False
        #: Action name (lower case) -> list items its answer holds: the recorded answer's
        #: first item repeated, endpoint numbered (a list of that many contacts).
        self.list_items: dict[str, int] = {}
        #: The peer's clock (epoch seconds): where replayed expirations are moved to, and
        #: the time of every stamp it sends (``Timestamp`` and ``EventTV`` of its events,
        #: ``Timestamp`` of its answers: Ping's), as Asterisk stamps with its own clock.
        self.clock: Callable[[], float] = time.time
        #: Seconds added to each replayed ``ExpirationTime`` besides the move to ``clock``:
        #: -3600 lists contacts whose expiry passed 55 minutes ago on the peer's own clock.
        self.expiry_shift = 0.0
        #: ``timestampevents`` of manager.conf: False sends events without ``Timestamp``
        #: (security events keep their ``EventTV``, Ping's answer its ``Timestamp``).
        self.timestampevents = True
        #: Sent on every connection right after a successful login's answer (a peer that
        #: breaks the protocol each time: a reconnect must not be a tight loop).
        self.after_login = b""
        #: The ``Message`` of the error every ``Challenge`` gets instead of a challenge (a
        #: peer that will not do MD5 logins, or one that wants the plain secret).
        self.challenge_refused: str | None = None
        # State replayed against.
        self._keys_by_uri = self._recorded_keys_by_uri()
        self.astdb: set[str] = set(self._keys_by_uri.values())
        self.caches = {"ep_cache"}  # sorcery_memory_cache.txt
        # What happened.
        self.received: list[ReceivedAction] = []
        self.connections = 0
        self.logins_ok = 0
        self.logins_failed = 0
        self.discarded_long_lines = 0
        #: Every MD5 challenge given (``Action: Challenge``), in order.
        self.challenges: list[str] = []
        self._writers: dict[int, asyncio.StreamWriter] = {}
        #: Connections that logged in with ``Events: off``: Asterisk sends them no event.
        self._no_events: set[int] = set()
        self._server: asyncio.Server | None = None

    # -- life -----------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._session, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every connection."""
        if self._server is not None:
            self._server.close()
            self.drop_all()
            await self._server.wait_closed()
            self._server = None

    async def restart(self, downtime: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(downtime)
        await self.start()

    def drop_all(self) -> None:
        for writer in list(self._writers.values()):
            writer.transport.abort()
        self._writers.clear()

    def _event_writers(self) -> list[asyncio.StreamWriter]:
        """The open connections that take events."""
        return [w for conn, w in self._writers.items() if conn not in self._no_events]

    def actions(self, name: str) -> list[ReceivedAction]:
        return [a for a in self.received if a.name.lower() == name.lower()]

    # -- faults sent on every open connection ----------------------------------------

    async def send_burst(self, count: int, chunk: int = 500) -> None:
        """Send ``count`` ContactStatus events (the recorded one, endpoint numbered)."""
        recorded = self.library.find_message("Event: ContactStatus\r\n", "NonQualified")
        template = self._stamped(recorded, _stamps(recorded))
        for writer in self._event_writers():
            for start in range(0, count, chunk):
                batch = b"".join(
                    template.replace(b"1001", str(100000 + i).encode())
                    for i in range(start, min(count, start + chunk))
                )
                writer.write(batch)
                await writer.drain()

    async def send_recorded(
        self, *needles: str, replace: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """Send, on every open connection, the recorded message holding all ``needles``,
        with ``replace`` byte substitutions (e.g. another endpoint's number); its recorded
        stamps (those ``replace`` left) are the peer's :attr:`clock` now."""
        message = self.library.find_message(*needles)
        recorded = _stamps(message)
        for old, new in replace:
            message = message.replace(old, new)
        message = self._stamped(message, recorded)
        self._track_registration(message)
        for writer in self._event_writers():
            writer.write(message)
            await writer.drain()

    async def send_oversized_line(self, size: int, chunk: int = 1 << 16) -> None:
        """Start an event whose one line is ``size`` bytes long (until the client hangs up)."""
        for writer in self._event_writers():
            try:
                writer.write(b"Event: Junk\r\nData: ")
                for _ in range(0, size, chunk):
                    writer.write(b"x" * chunk)
                    await writer.drain()
                writer.write(b"\r\n\r\n")
            except (ConnectionError, RuntimeError):
                continue

    async def send_stream(self, head: bytes, piece: bytes, size: int) -> None:
        """Send ``head`` then ``piece`` repeated for about ``size`` bytes, on every open
        connection, until done or the client hangs up (a peer that never ends a line or
        a message)."""
        count = max(1, (1 << 16) // len(piece))
        for writer in self._event_writers():
            try:
                writer.write(head)
                for _ in range(0, size, count * len(piece)):
                    writer.write(piece * count)
                    await writer.drain()
            except (ConnectionError, RuntimeError):
                continue

    async def send_shutdown(self) -> None:
        """Replay ``Event: Shutdown`` (shutdown_event.txt) and close, as Asterisk does."""
        event = self.library.find_message("Event: Shutdown")
        for writer in self._event_writers():
            writer.write(event)
            await writer.drain()
        self.drop_all()

    # -- one session ----------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self._writers[conn] = writer
        writer.write(self.banner)
        logged_in = False
        challenge = ""
        try:
            async for headers in self._actions(reader):
                action = ReceivedAction(headers, conn)
                self.received.append(action)
                if self.silent:
                    continue
                if action.name.lower() in {n.lower() for n in self.drop_on}:
                    return
                if action.name.lower() == "challenge" and not logged_in:
                    challenge = challenge or self._challenge(action, writer)
                    continue
                if action.name.lower() == "login":
                    logged_in = await self._login(action, writer, challenge)
                    if not logged_in:
                        return
                    if action.get("Events").lower() == "off":
                        self._no_events.add(conn)
                    continue
                if not logged_in:
                    writer.write(self._error(action, "Permission denied"))
                    continue
                answer = await self._answer(action)
                if conn in self._no_events:
                    answer = _without_events(answer)
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._writers.pop(conn, None)
            self._no_events.discard(conn)
            writer.transport.abort()

    async def _actions(
        self, reader: asyncio.StreamReader
    ) -> AsyncIterator[tuple[tuple[str, str], ...]]:
        """Parse actions as Asterisk's manager does: CRLF or bare LF ends a line; a line
        reaching 1024 bytes without an end is discarded; a blank line ends an action."""
        buf = b""
        headers: list[tuple[str, str]] = []
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            while True:
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) >= 1024:
                        self.discarded_long_lines += 1
                        buf = b""
                    break
                line, buf = buf[:end], buf[end + 1 :]
                if len(line) >= 1024:
                    self.discarded_long_lines += 1
                    continue
                text = line.removesuffix(b"\r").decode("utf-8", "replace")
                if text:
                    key, _, value = text.partition(":")
                    headers.append((key.strip(), value.lstrip(" \t")))
                elif headers:
                    yield tuple(headers)
                    headers = []

    def _challenge(self, action: ReceivedAction, writer: asyncio.StreamWriter) -> str:
        """Answer ``Challenge`` as Asterisk's manager does (``action_challenge``): with
        ``AuthType: MD5``, a random number as the session's challenge (kept for the
        session's login); without, an error and no challenge."""
        if self.challenge_refused is not None:
            writer.write(self._error(action, self.challenge_refused))
            return ""
        if action.get("AuthType").lower() != "md5":
            writer.write(self._error(action, "Must specify AuthType"))
            return ""
        challenge = str(random.randrange(1, 2**31))
        self.challenges.append(challenge)
        answer = f"Response: Success\r\nActionID: {action.get('ActionID')}\r\n"
        writer.write(f"{answer}Challenge: {challenge}\r\n\r\n".encode())
        return challenge

    def _authenticated(self, action: ReceivedAction, challenge: str) -> bool:
        """Whether ``action`` (a Login) gives this peer's username and secret: in plain
        text, or with ``AuthType: MD5`` as the MD5 of the session's challenge and the secret
        (Asterisk's ``authenticate``: lower-case hex)."""
        if action.get("Username") != self.username:
            return False
        if action.get("AuthType").lower() == "md5":
            key = hashlib.md5((challenge + self.secret).encode()).hexdigest()
            return bool(challenge) and action.get("Key") == key
        return action.get("Secret") == self.secret

    async def _login(
        self, action: ReceivedAction, writer: asyncio.StreamWriter, challenge: str
    ) -> bool:
        if self._authenticated(action, challenge):
            self.logins_ok += 1
            recorded = self.library.find_message("Response: Success", "Authentication accepted")
            # No event at all for a session that logged in with Events: off.
            quiet = action.get("Events").lower() == "off"
            booted = b"" if quiet else self.library.find_message("Event: FullyBooted")
            writer.write(_substitute_id(recorded, action.get("ActionID")) + booted)
            writer.write(self.after_login)
            await writer.drain()
            return True
        self.logins_failed += 1
        await asyncio.sleep(self.login_delay)
        refused = self.library.find_message("Response: Error", "Authentication failed")
        writer.write(_substitute_id(refused, action.get("ActionID")))
        await writer.drain()
        return False

    def _error(self, action: ReceivedAction, message: str) -> bytes:
        return _substitute_id(
            _synth(("Response", "Error"), ("ActionID", "x"), ("Message", message)),
            action.get("ActionID"),
        )

    async def _answer(self, action: ReceivedAction) -> bytes:
        name = action.name.lower()
        if name == "reload" and action.get("Module") == "res_pjsip.so":
            if self.reload_busy > 0:
                self.reload_busy -= 1
                # README: "Busy: Message: A reload is in progress".
                return self._error(action, "A reload is in progress")
            await asyncio.sleep(self.reload_delay)
        await asyncio.sleep(self.delays.get(name, 0.0))
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        values = {value for _, value in action.headers}
        for (refused, value), message in self.refuse.items():
            if refused == name and value in values:
                return self._error(action, message)
        if name == "reload" and action.get("Module") == "res_pjsip.so" and self.on_reload:
            self.on_reload(action)
        if name == "dbdel":
            # README: DBDel Family registrar Key contact/<aor>;@<hash> -> Key deleted successfully.
            key = action.get("Key")
            if action.get("Family") == "registrar" and key in self.astdb:
                self.astdb.discard(key)
                return _substitute_id(
                    _synth(
                        ("Response", "Success"),
                        ("ActionID", "x"),
                        ("Message", "Key deleted successfully"),
                    ),
                    action.get("ActionID"),
                )
            return self._error(action, "Database entry not found")
        if name == "sorcerymemorycacheexpire":
            # Not in the transcripts; Asterisk's AMI documentation: empties the cache.
            if action.get("Cache") not in self.caches:
                return self._error(action, "The provided cache does not exist")
            return _substitute_id(
                _synth(
                    ("Response", "Success"),
                    ("ActionID", "x"),
                    ("Message", "All objects were expired from the cache"),
                ),
                action.get("ActionID"),
            )
        if name == "sorcerymemorycacheexpireobject" and action.get("Cache") in self.caches:
            # README: -> Success / "The provided object was expired from the cache".
            return _substitute_id(
                _synth(
                    ("Response", "Success"),
                    ("ActionID", "x"),
                    ("Message", "The provided object was expired from the cache"),
                ),
                action.get("ActionID"),
            )
        reply = self._replay(action)
        reply = _expiring_from_now(reply, self.clock() + self.expiry_shift)
        reply = self._stamped(reply, _stamps(reply))
        items = self.list_items.get(name)
        return reply if items is None else _lengthened(reply, items)

    def _stamped(self, message: bytes, recorded: set[bytes]) -> bytes:
        """``message`` with each stamp whose value is in ``recorded`` made the peer's
        :attr:`clock` now (``EventTV`` as Asterisk writes it); without
        :attr:`timestampevents`, an event's ``Timestamp`` lines dropped (an answer keeps
        its own: Ping's always has one)."""
        now = self.clock()
        stamp = b"%.6f" % now
        tv = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"

        def restamp(match: re.Match[bytes]) -> bytes:
            name, value = match.group(1), match.group(2)
            if value not in recorded:
                return match.group(0)
            return b"\r\n%s: %s" % (name, stamp if name == b"Timestamp" else tv.encode())

        message = re.sub(rb"\r\n(Timestamp|EventTV): ([^\r\n]*)", restamp, message)
        if not self.timestampevents and message.startswith(b"Event:"):
            message = re.sub(rb"\r\nTimestamp: [^\r\n]*", b"", message)
        return message

    def _replay(self, action: ReceivedAction) -> bytes:
        """The recorded answer to the closest recorded action, ActionID substituted."""
        params = {
            k.lower(): v for k, v in action.headers if k.lower() not in ("action", "actionid")
        }
        candidates = self.library.candidates(action.name)
        wanted = self.prefer.get(action.name.lower()) or self.prefer.get(action.name)
        if wanted:
            candidates = [e for e in candidates if wanted.encode() in e.reply] or candidates
        if action.name.lower() == "pjsipshowcontacts":
            candidates = self._contacts_in_astdb(candidates)
        exact = [e for e in candidates if e.params == params]
        if exact:
            reply = exact[0].reply
        elif candidates:
            # Not recorded with these values: Asterisk's error for an unknown one,
            # with the recorded value replaced by the asked one.
            chosen = next((e for e in candidates if b"Response: Error" in e.reply), candidates[0])
            reply = chosen.reply
            for key, old in chosen.params.items():
                new = params.get(key)
                if new is not None and len(old) >= 3:
                    reply = reply.replace(old.encode(), new.encode())
        else:
            unknown = self.library.candidates("NoSuchAction")[0]
            reply = unknown.reply.replace(b"NoSuchAction", action.name.encode())
        return _substitute_id(reply, action.get("ActionID"))

    def _contacts_in_astdb(self, candidates: list[Exchange]) -> list[Exchange]:
        """A recorded contact list whose contacts are all still in astdb, else the
        recorded ``No Contacts found`` when astdb holds none."""
        if not self.astdb:
            return [e for e in candidates if b"No Contacts found" in e.reply] or candidates
        if self.merge_contact_lists:
            return [self._merged_contacts(candidates)]
        for exchange in candidates:
            names = re.findall(rb"ObjectName: ([^\r\n]*;@[0-9a-f]+)", exchange.reply)
            if names and all("contact/" + n.decode() in self.astdb for n in names):
                return [exchange]
        return candidates

    def _merged_contacts(self, candidates: list[Exchange]) -> Exchange:
        """One contact list of every recorded contact still in astdb (each once), framed
        as the first recorded list, ``ListItems`` told anew."""
        items: dict[bytes, bytes] = {}
        frame: list[bytes] = []
        for exchange in candidates:
            messages = [m + b"\r\n\r\n" for m in exchange.reply.split(b"\r\n\r\n") if m.strip()]
            for message in messages:
                name = re.search(rb"ObjectName: ([^\r\n]*;@[0-9a-f]+)", message)
                if name and "contact/" + name.group(1).decode() in self.astdb:
                    items.setdefault(name.group(1), message)
            if not frame and b"ContactListComplete" in exchange.reply:
                frame = [messages[0], messages[-1]]
        tail = re.sub(rb"ListItems: \d+", b"ListItems: %d" % len(items), frame[1])
        return Exchange("merged", (), frame[0] + b"".join(items.values()) + tail)

    def _recorded_keys_by_uri(self) -> dict[bytes, str]:
        """Each recorded contact's astdb key by its URI (ContactList events hold both)."""
        keys = {}
        for message in self.library.messages():
            match = re.search(rb"\r\nObjectName: ([^\r\n]*;@[0-9a-f]+)\r\n", message)
            uri = re.search(rb"\r\nUri: ([^\r\n]*)\r\n", message)
            if match and uri and b"Event: ContactList" in message:
                keys[uri.group(1)] = "contact/" + match.group(1).decode()
        return keys

    def _track_registration(self, message: bytes) -> None:
        """Keep astdb as Asterisk does when it sends a ``ContactStatus``: a removed
        contact's key goes, a registered one's comes back (keys as recorded)."""
        if not message.startswith(b"Event: ContactStatus\r\n"):
            return
        uri = re.search(rb"\r\nURI: ([^\r\n]*)\r\n", message)
        key = self._keys_by_uri.get(uri.group(1)) if uri else None
        if key is None:
            return
        if b"\r\nContactStatus: Removed\r\n" in message:
            self.astdb.discard(key)
        else:
            self.astdb.add(key)


# -- test helpers --------------------------------------------------------------------


def fast_settings(**overrides: float) -> AmiSettings:
    """AMI timings small enough for tests (milliseconds, not seconds)."""
    values: dict[str, float] = {
        "backoff_base": 0.02,
        "backoff_cap": 0.2,
        "login_failure_backoff": 0.5,
        "ping_interval": 5.0,
        "ping_timeout": 1.0,
        "action_timeout": 2.0,
        "reload_timeout": 5.0,
        "reload_retries": 3,
        "reload_retry_delay": 0.02,
        "reload_min_gap": 0.0,
        "reload_gap_factor": 0.0,
    }
    values.update(overrides)
    return AmiSettings.model_validate(values)


def server_for(peer: FakeAsterisk, *, secret: str | None = None, **extra: object) -> AsteriskServer:
    """An ``[[asterisk]]`` entry pointing at ``peer``."""
    return AsteriskServer.model_validate(
        {
            "name": "lab",
            "host": "127.0.0.1",
            "port": peer.port,
            "username": peer.username,
            "secret": secret if secret is not None else peer.secret,
            "timeout": 2.0,
            **extra,
        }
    )


@asynccontextmanager
async def running(*runners: Runner) -> AsyncIterator[asyncio.Event]:
    """Run each ``runner.run(stop)`` in the background; on exit set ``stop`` and join them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true, failing the test after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one test scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextmanager
def in_a_thread(fake: FakeAsterisk) -> Iterator[FakeAsterisk]:
    """``fake`` serving on an event loop of its own thread (for code that runs its own
    loop, such as a CLI command or ``asyncio.run``), stopped on the way out."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


#: A :attr:`FakeAsterisk.expiry_shift` that lists its replayed contacts expired 55
#: minutes ago on its own clock, for tests of what the daemon does with a contact whose
#: expiry passed.
AN_HOUR_AGO = -3600.0


def _stamps(message: bytes) -> set[bytes]:
    """The values of ``message``'s ``Timestamp`` and ``EventTV`` headers."""
    return set(re.findall(rb"\r\n(?:Timestamp|EventTV): ([^\r\n]*)", message))


def _expiring_from_now(reply: bytes, now: float) -> bytes:
    """``reply`` with each ``ExpirationTime`` (``PJSIPShowContacts``) and ``RegExpire``
    (``PJSIPShowEndpoint``'s contacts) moved by the time since :data:`RECORDED_AT` to
    ``now``: as long after now as it was after the recording."""
    shift = int(now) - RECORDED_AT
    return re.sub(
        rb"\r\n(ExpirationTime|RegExpire): (\d+)\r\n",
        lambda m: b"\r\n%s: %d\r\n" % (m.group(1), int(m.group(2)) + shift),
        reply,
    )
