"""One AMI connection to one Asterisk, kept up in the background.

:meth:`AmiClient.run` is the whole life of the client: connect, read the banner,
log in, then read every message promptly (Asterisk drops slow readers), ping
every ``ping_interval`` and reconnect after any loss with capped exponential
backoff and jitter, until the ``stop`` event is set.  A refused login waits
``login_failure_backoff`` (a wrong secret does not fix itself), never a tight loop,
and so does a peer that is not Asterisk (no ``Asterisk Call Manager/`` greeting:
another service on the port).  A streak of refused logins is logged as
``ami.login_failed`` once, at its first (the later ones as warnings,
``ami.login_failed_again``: an alert on the error fires once, while a log read at the
default level still shows the refusals go on); the login that ends it says how many there were
(``ami.connected`` with ``after_login_failures``).  A server down (a refused or timed-out
connection, ``ami.connect_failed``, a warning) or another service on its port
(``ami.not_asterisk``, an error) is logged at the first try of a streak only; the later
tries are counted, ``ami.still_failing`` at the 2nd, 4th, 8th... and at least every
:data:`STILL_FAILING_EVERY` seconds (each try a debug line): at the capped backoff each
try would otherwise be a line every ``backoff_cap`` seconds per session, for as long as the
server stays down.  The connection that ends the streak says how many tries failed and for
how long (``ami.connected`` with ``after_connect_failures``, ``failed_for_s``).  The
login is sent only after the greeting, and answers an MD5 challenge (:meth:`_login`) unless
the server's ``login`` is ``plain``: the secret itself never goes on the wire, to such a
peer or any other.  A line,
a message or a header count past its bound (:class:`~provisioner.ami.actions.FrameDecoder`)
is a protocol error: the connection is dropped (``ami.protocol_error`` names the bound,
never the bytes) and made again after the usual backoff; the actions in flight fail as on
any drop.  A list action's answer (``PJSIPShowContacts``), kept whole until its end, is bounded
too, by its events and their bytes (``max_list_events``, ``max_list_bytes``): past
either, that action fails with :class:`AmiProtocolError` (logged the same way) and
the session stays, the rest of the list read and let go.

Actions (:meth:`AmiClient.send_action`) are validated, sent once, and answered
with an :class:`AmiReply` or an :class:`~provisioner.ami.errors.AmiError`: on a
timeout or a lost connection the caller gets the error and the action is never
sent again by this layer.  Events without a waiting action go to the callbacks
registered with :meth:`AmiClient.on_event`, called in the reading task: they must
be quick and must not block (hand work to your own bounded queue).

Why not panoramisk's ``Manager``/``AMIProtocol``: their reconnect loop retries at
a fixed delay (a tight loop after a refused login), re-sends actions that were
pending when the connection dropped, never times a ping out (a half-open
connection stays "connected"), keeps an unbounded buffer while waiting for a
blank line, sorts headers and does not check values for CR/LF.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import socket
import time
from asyncio import FIRST_COMPLETED
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..aio import sleep_unless, wait_first, wait_task_or_event
from ..config import AmiSettings, AsteriskServer
from ..gcpause import collector_paused
from ..logs import get_logger, worth_repeating
from .actions import (
    ActionIdGenerator,
    AmiAction,
    AmiMessage,
    FrameDecoder,
    FrameTooLarge,
    NotAmiPeer,
    build_action,
)
from .clock import AsteriskClock, event_tv
from .errors import (
    AmiConnectionLost,
    AmiError,
    AmiLoginFailed,
    AmiNotAsterisk,
    AmiNotConnected,
    AmiProtocolError,
    AmiTimeout,
)

__all__ = ["AmiClient", "AmiHealth", "AmiReply", "EventCallback"]

log = get_logger(__name__)

#: A callback gets every event whose name it was registered for.
EventCallback = Callable[[AmiMessage], None]

_READ_CHUNK = 65536
#: Messages at the end of a read looked at for a stamp (:meth:`AmiClient._see_stamp`):
#: a read of list items (a snapshot's) has none, and is not searched through.
_STAMP_LOOKBACK = 4
#: A patient action (:meth:`AmiClient.send_action`) waits at most this many of its
#: timeouts in all, however long reads keep coming: a storm of 100k re-registrations
#: is read in well under a minute, the default (10 s timeouts) it gets.
PATIENCE = 6
#: Seconds at most between two ``ami.still_failing`` lines of a server that stays down
#: (the 2nd, 4th, 8th... failed try is logged too): ten minutes, as a server down for a
#: day then leaves some 150 lines per session, not 2,880 (one per 30 s ``backoff_cap``).
STILL_FAILING_EVERY = 600.0


@dataclass(frozen=True)
class AmiReply:
    """Asterisk's answer: the response and, for list actions, the events of the list.

    ``complete`` is the closing event (``ContactListComplete``) when there was a list.
    """

    response: AmiMessage
    events: tuple[AmiMessage, ...] = ()
    complete: AmiMessage | None = None

    @property
    def ok(self) -> bool:
        """``Response: Success`` (or ``Goodbye`` to a ``Logoff``)."""
        return self.response.response.lower() in ("success", "goodbye")

    @property
    def message(self) -> str:
        return self.response.message


@dataclass(frozen=True)
class AmiHealth:
    """A snapshot of one client's connection, for the daemon's health record."""

    server: str
    connected: bool
    last_error: str | None
    #: Logged-in sessions after the first one.
    reconnects: int
    sessions: int
    login_failures: int
    #: Wall-clock time (epoch seconds) the current session logged in, if connected.
    connected_since: float | None
    events_received: int
    pending_actions: int
    #: The most bytes ever buffered waiting for a line end (bounded by max_line_bytes).
    max_buffered_bytes: int


@dataclass
class _Pending:
    action: AmiAction
    future: asyncio.Future[AmiReply]
    response: AmiMessage | None = None
    events: list[AmiMessage] | None = None
    #: Wire bytes of ``events`` so far (bounded by ``max_list_bytes``).
    list_bytes: int = 0


@dataclass
class _Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: FrameDecoder
    pending: dict[str, _Pending] = field(default_factory=dict)
    #: Messages read with the login answer, handled before anything else.
    backlog: list[AmiMessage] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    #: Reads from the socket so far: the ping's sign that the connection is alive.
    reads: int = 0
    #: Called with the reason as the session closes (the client drops ``connected``).
    on_close: Callable[[str], None] | None = None

    def close(self, reason: str) -> None:
        """Close once: record why, abort the socket (a half-open peer may never ack a FIN),
        and call ``on_close``."""
        if self.closed.is_set():
            return
        self.reason = reason
        self.closed.set()
        self.writer.transport.abort()
        if self.on_close is not None:
            self.on_close(reason)


class AmiClient:
    """The AMI client for one Asterisk (one ``[[asterisk]]`` entry)."""

    def __init__(
        self,
        server: AsteriskServer,
        settings: AmiSettings | None = None,
        *,
        rng: random.Random | None = None,
        role: str = "main",
        clock: AsteriskClock | None = None,
    ) -> None:
        self.server = server
        #: The estimate of the server's clock (shared by its sessions), fed by every read:
        #: see :meth:`_take`.
        self.clock = clock or AsteriskClock()
        #: This host's time (epoch seconds) the last read from the socket returned.
        self.read_at = 0.0
        #: ``main`` (events, queries, expiries) or ``reload`` (a session of its own).
        self.role = role
        self.settings = settings or AmiSettings()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._ids = ActionIdGenerator("prov")
        self._callbacks: dict[str, list[EventCallback]] = defaultdict(list)
        #: Lower-cased event name -> its callbacks then the wildcard's, and the wildcard's
        #: alone (any other name): made as callbacks are registered, not per event.
        self._targets: dict[str, tuple[EventCallback, ...]] = {}
        self._wildcard: tuple[EventCallback, ...] = ()
        self._on_connected: list[Callable[[], None]] = []
        self._on_disconnected: list[Callable[[], None]] = []
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._last_error: str | None = None
        self._sessions = 0
        self._login_failures = 0
        #: Refused logins since the last accepted one (``ami.login_failed`` is logged at
        #: the first only; ``ami.connected`` says how many there were).
        self._failed_streak = 0
        #: The server down or not Asterisk: failed tries since the last connection that
        #: greeted as Asterisk, the event that opened the streak, its start and the
        #: last line logged of it (monotonic seconds): see :meth:`_log_unreachable`.
        self._down_streak = 0
        self._down_event = ""
        self._down_since = 0.0
        self._down_logged_at = 0.0
        self._connected_since: float | None = None
        self._events = 0
        self._high_water = 0

    @property
    def _log(self) -> Any:
        """The module's logger bound to this client's server and session role (bound at
        each use: a logging set-up made later, as by SIGHUP, applies to it too)."""
        return log.bind(server=self.name, session=self.role)

    # -- public API ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def sessions(self) -> int:
        """Sessions logged in so far (the current one included): a new one each reconnect."""
        return self._sessions

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connected_event(self) -> asyncio.Event:
        """Set while logged in (read-only for callers: never set or clear it)."""
        return self._connected

    def on_event(self, name: str, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every event named ``name`` (any case; ``*``: all)."""
        callbacks = self._callbacks
        callbacks[name.lower()].append(callback)
        wildcard = tuple(callbacks.get("*", ()))
        self._wildcard = wildcard
        self._targets = {
            key: (*targets, *wildcard) for key, targets in callbacks.items() if key != "*"
        }

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every login, before any event of that session.

        Events are lost while disconnected: use this to take a fresh snapshot
        (``PJSIPShowContacts``) from a task of your own.
        """
        self._on_connected.append(callback)

    def on_disconnected(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time a logged-in session closes, as ``connected``
        drops (from then on, events are lost until the next login)."""
        self._on_disconnected.append(callback)

    def health(self) -> AmiHealth:
        """The connection state now."""
        session = self._session
        return AmiHealth(
            server=self.name,
            connected=self.connected,
            last_error=self._last_error,
            reconnects=max(0, self._sessions - 1),
            sessions=self._sessions,
            login_failures=self._login_failures,
            connected_since=self._connected_since if self.connected else None,
            events_received=self._events,
            pending_actions=len(session.pending) if session else 0,
            max_buffered_bytes=max(self._high_water, session.decoder.high_water if session else 0),
        )

    async def send_action(
        self,
        name: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        timeout: float | None = None,
        patient: bool = False,
        quiet: bool = False,
    ) -> AmiReply:
        """Send one action and return Asterisk's answer (``Response: Error`` included).

        Raises :class:`~provisioner.errors.InvalidInput` for a header that could
        inject (validated before anything else), :class:`AmiNotConnected` when
        not logged in, :class:`AmiTimeout` after ``timeout`` (default
        ``action_timeout``) and :class:`AmiConnectionLost` when the connection
        drops first.  The action is never re-sent.

        ``patient`` (a query or an idempotent action, whose answer may sit behind a
        storm of events): the wait goes on while reads keep coming, up to ``PATIENCE``
        timeouts in all; ``timeout`` without a single read still times out.

        ``quiet``: the caller says a failure itself (as the registration snapshot does,
        once per run of failures): a timeout is logged at debug, not as a warning.
        """
        action = build_action(name, headers, action_id=self._ids())
        session = self._session
        if session is None or session.closed.is_set() or not self.connected:
            raise AmiNotConnected(self.name, f"{name} not sent: not connected")
        timeout = timeout or self.settings.action_timeout
        return await self._request(
            session, action, timeout, patient=patient, limit=PATIENCE, quiet=quiet
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a logged-in connection until ``stop`` is set, then close it and return."""
        attempt = 0
        while not stop.is_set():
            delay, attempt = await self._one_connection(stop, attempt)
            if await sleep_unless(stop, delay):
                break
        self._connected.clear()

    async def serve_once(self, stop: asyncio.Event) -> None:
        """One connection, never retried: connect and log in, raising what stopped either
        (the ``OSError`` of a refused connection at once, :class:`AmiLoginFailed` as soon
        as Asterisk answers, :class:`AmiTimeout` once the server's ``timeout`` has passed
        without a greeting), unlogged: the caller says it; then serve the session until
        ``stop`` is set or it closes.  For ``provisioner check``, where a retry would only
        stretch one answer over the whole wait and log each try."""
        try:
            session = await self._open_unless(stop)
        except AmiLoginFailed as exc:
            self._login_failures += 1
            self._last_error = exc.reason
            raise
        if session is not None:
            await self._serve(session, stop)
        self._connected.clear()

    # -- connection life ----------------------------------------------------------

    def _long_backoff(self) -> float:
        """``login_failure_backoff`` with jitter (90-110 %): after a refusal that waiting
        a little does not fix (a wrong secret, a peer that is not Asterisk)."""
        return self.settings.login_failure_backoff * (0.9 + self._rng.random() / 5)

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter (50-100 % of the step)."""
        growth = 2.0 ** min(attempt, 30)
        step = min(self.settings.backoff_cap, self.settings.backoff_base * growth)
        return step * (0.5 + self._rng.random() / 2)

    async def _one_connection(self, stop: asyncio.Event, attempt: int) -> tuple[float, int]:
        """Connect, serve until lost or stopped; return (delay before the next try, attempt)."""
        try:
            session = await self._open_unless(stop)
        except AmiLoginFailed as exc:
            self._down_streak = 0  # it answered as Asterisk: the server is back
            self._login_failures += 1
            self._failed_streak += 1
            self._last_error = exc.reason
            delay = self._long_backoff()
            # Once per streak: a wrong secret stays wrong for hours, and an alert on the
            # event (README "Logs") must fire once, not every login_failure_backoff; the
            # later tries stay visible at the default level (a warning, not debug), so
            # whoever reads the log after a rotation still sees the server refuses us.
            say = self._log.error if self._failed_streak == 1 else self._log.warning
            say(
                "ami.login_failed" if self._failed_streak == 1 else "ami.login_failed_again",
                username=self.server.username,
                failures=self._failed_streak,
                retry_in_s=round(delay, 3),
            )
            return delay, attempt + 1
        except AmiNotAsterisk as exc:
            # Another service on the port does not become Asterisk in a second either.
            self._last_error = exc.reason
            delay = self._long_backoff()
            self._log_unreachable(
                "ami.not_asterisk",
                delay,
                host=self.server.host,
                port=self.server.port,
                greeting=exc.greeting,
            )
            return delay, attempt + 1
        except AmiProtocolError as exc:
            self._last_error = exc.reason
            delay = self._backoff(attempt)
            self._log.error("ami.protocol_error", limit=exc.limit, error=exc.reason)
            return delay, attempt + 1
        except (OSError, TimeoutError, AmiError, ValueError) as exc:
            self._last_error = _describe(exc)
            delay = self._backoff(attempt)
            self._log_unreachable("ami.connect_failed", delay, error=self._last_error)
            return delay, attempt + 1
        if session is None:
            return 0.0, attempt  # stopped while connecting
        started = time.monotonic()
        await self._serve(session, stop)
        # Only a session that lived a while resets the backoff: a peer that accepts
        # the login and drops us at once must not be hammered.
        stable = time.monotonic() - started >= self.settings.backoff_cap
        next_attempt = 0 if stable else attempt + 1
        return (0.0 if stop.is_set() else self._backoff(0 if stable else attempt)), next_attempt

    def _log_unreachable(self, event: str, delay: float, **fields: Any) -> None:
        """Log a failed try of a server down (``ami.connect_failed``) or not Asterisk
        (``ami.not_asterisk``): the first of a streak (or one that fails the other way)
        as ``event`` itself, an alert firing once; the later ones as ``ami.still_failing``
        warnings at the 2nd, 4th, 8th... try and at least every
        :data:`STILL_FAILING_EVERY` seconds, else as debug lines, so the log neither
        floods nor goes quiet while the server stays down."""
        now = time.monotonic()
        self._down_streak += 1
        failures = self._down_streak
        retry_in_s = round(delay, 3)
        if failures == 1 or event != self._down_event:
            if failures == 1:
                self._down_since = now
            self._down_event, self._down_logged_at = event, now
            say = self._log.error if event == "ami.not_asterisk" else self._log.warning
            say(event, failures=failures, retry_in_s=retry_in_s, **fields)
        elif worth_repeating(failures, now - self._down_logged_at, STILL_FAILING_EVERY):
            self._down_logged_at = now
            self._log.warning(
                "ami.still_failing",
                failures=failures,
                failing_for_s=round(now - self._down_since, 1),
                error=self._last_error,
                retry_in_s=retry_in_s,
            )
        else:
            self._log.debug(f"{event}_again", failures=failures, retry_in_s=retry_in_s, **fields)

    async def _open_unless(self, stop: asyncio.Event) -> _Session | None:
        """:meth:`_open`, given up (None) when ``stop`` is set first: a host that accepts
        and never answers would otherwise hold a stop for the whole ``timeout`` (up to
        300 s), past the daemon's ``shutdown_timeout``."""
        opening = asyncio.ensure_future(self._open())
        try:
            await wait_task_or_event(opening, stop)
        finally:
            if not opening.done():
                opening.cancel()  # _open aborts its socket on the way out
        await asyncio.wait([opening])
        if opening.cancelled():
            return None
        session = opening.result()  # raises what _open raised
        if stop.is_set():
            session.close("client stopped")
            return None
        return session

    async def _open(self) -> _Session:
        """Connect, read the greeting, then log in, all within the server's ``timeout``.

        :class:`AmiNotAsterisk` when the peer's first bytes are not the AMI greeting, and
        :class:`AmiTimeout` naming the greeting when none came in time (a silent service,
        such as an HTTP server, on the port): either way the login was not sent."""
        server = self.server
        writer: asyncio.StreamWriter | None = None
        session: _Session | None = None
        try:
            async with asyncio.timeout(server.timeout):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                _probe_dead_peer(writer, self.settings)
                session = _Session(reader, writer, self._decoder())
                early = await self._greeting(session)
                await self._login(session, early)
                return session
        except TimeoutError:
            if writer is not None:
                writer.transport.abort()
            if session is not None and session.decoder.banner is None:
                raise AmiTimeout(
                    self.name, f"no AMI greeting in {server.timeout}s (is it Asterisk?)"
                ) from None
            raise
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            raise

    async def _greeting(self, session: _Session) -> list[AmiMessage]:
        """Read until the banner (``Asterisk Call Manager/...``) is in; return the
        messages that came with it (none, from a real Asterisk)."""
        messages: list[AmiMessage] = []
        while session.decoder.banner is None:
            data = await session.reader.read(_READ_CHUNK)
            if not data:
                raise AmiConnectionLost(self.name, "closed before the AMI greeting")
            messages += self._feed(session, data)
        return messages

    def _decoder(self) -> FrameDecoder:
        return FrameDecoder(
            max_line_bytes=self.settings.max_line_bytes,
            max_message_bytes=self.settings.max_message_bytes,
            max_headers=self.settings.max_headers,
        )

    async def _login(self, session: _Session, early: list[AmiMessage]) -> None:
        """Log in, by Asterisk's MD5 challenge unless the server's ``login`` is
        ``plain``.  Early events (``early``: those read with the greeting) are
        dispatched."""
        secret = self.server.secret.get_secret_value() if self.server.secret else ""
        if self.server.login == "plain":
            proof, messages = [("Secret", secret)], early
        else:
            key, messages = await self._challenged_key(session, secret, early)
            proof = [("AuthType", "MD5"), ("Key", key)]
        action = build_action(
            "Login",
            [("Username", self.server.username), *proof, ("Events", self.server.events)],
            action_id=self._ids(),
        )
        answer, messages = await self._answer_of(session, action, messages)
        if answer.response.lower() != "success":
            raise AmiLoginFailed(self.name, answer.message or "login refused")
        # FullyBooted often shares the read with the answer: keep it.
        session.backlog = messages

    async def _challenged_key(
        self, session: _Session, secret: str, early: list[AmiMessage]
    ) -> tuple[str, list[AmiMessage]]:
        """Ask for an MD5 challenge (``Challenge``, ``AuthType: MD5``) and return the
        login's ``Key``, the MD5 of the challenge and the secret, as the manager's
        ``authenticate`` checks it, with the messages read after the answer.  The secret
        itself never goes on the wire: neither whoever reads the connection nor a peer
        that greets as Asterisk (a local user who bound the port while Asterisk
        restarted) gets it, only a key for a challenge it may not use twice.  A peer that
        refuses the challenge is refused as a wrong login is: falling back to a plain
        ``Secret`` on its say would hand the secret to exactly such a peer (``login =
        "plain"`` is the operator's choice, never the peer's)."""
        ask = build_action("Challenge", [("AuthType", "MD5")], action_id=self._ids())
        answer, messages = await self._answer_of(session, ask, early)
        challenge = answer.get("Challenge") or ""
        if answer.response.lower() != "success" or not challenge:
            why = answer.message or "no challenge given"
            raise AmiLoginFailed(
                self.name,
                f'MD5 challenge refused: {why} (login = "plain" sends the secret instead)',
            )
        key = hashlib.md5((challenge + secret).encode(), usedforsecurity=False).hexdigest()
        return key, messages

    async def _answer_of(
        self, session: _Session, action: AmiAction, messages: list[AmiMessage]
    ) -> tuple[AmiMessage, list[AmiMessage]]:
        """Send ``action`` (before the login: no pending table yet) and read until its
        answer; return it and the messages read after it.  Events before it (the
        ``messages`` already read among them) are dispatched."""
        session.writer.write(action.encode())
        await session.writer.drain()
        while True:
            for index, message in enumerate(messages):
                if message.is_response and message.action_id == action.action_id:
                    return message, messages[index + 1 :]
                if message.is_event:
                    self._dispatch(message)
            data = await session.reader.read(_READ_CHUNK)
            if not data:
                raise AmiConnectionLost(self.name, "closed during login")
            messages = self._feed(session, data)

    async def _serve(self, session: _Session, stop: asyncio.Event) -> None:
        """Run the reader and the pinger until the session closes or ``stop`` is set.

        ``connected`` drops the moment the session closes (:meth:`_closed`), not once this
        has woken up: meanwhile an action would get :class:`AmiNotConnected` from a client
        that still said it was connected, and a loop waiting for ``connected`` to send it
        again would never yield to the event loop."""
        self._session = session
        self._sessions += 1
        self._connected_since = time.time()
        session.on_close = partial(self._closed, stop)
        self._connected.set()
        self._log.info(
            "ami.connected",
            host=self.server.host,
            port=self.server.port,
            banner=session.decoder.banner,
            reconnects=max(0, self._sessions - 1),
            after_login_failures=self._failed_streak,
            after_connect_failures=self._down_streak,
            failed_for_s=round(time.monotonic() - self._down_since, 1) if self._down_streak else 0,
        )
        self._failed_streak = 0
        self._down_streak = 0
        for callback in self._on_connected:
            try:
                callback()
            except Exception as exc:  # a broken hook must not stop the session
                self._log.exception("ami.callback_failed", error=_describe(exc))
        reader = asyncio.create_task(self._read_loop(session))
        pinger = asyncio.create_task(self._ping_loop(session))
        await wait_first(stop, session.closed)
        session.close("client stopped" if stop.is_set() else "closed")
        await asyncio.gather(reader, pinger)
        self._high_water = max(self._high_water, session.decoder.high_water)
        self._fail_pending(session)
        self._log.info("ami.disconnected", reason=session.reason)

    def _closed(self, stop: asyncio.Event, reason: str) -> None:
        """The session closed for ``reason``: record it (unless stopping), then drop
        ``connected``, so that anyone who sees the client disconnected (health, --check, a
        waiting test) also sees why."""
        if not stop.is_set():
            self._last_error = reason
        self._connected.clear()
        for callback in self._on_disconnected:
            try:
                callback()
            except Exception as exc:  # a broken hook must not stop the session's close
                self._log.exception("ami.callback_failed", error=_describe(exc))

    def _fail_pending(self, session: _Session) -> None:
        for pending in session.pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    AmiConnectionLost(
                        self.name, f"{pending.action.name} unanswered: {session.reason}"
                    )
                )
        session.pending.clear()

    async def _read_loop(self, session: _Session) -> None:
        """Read promptly and handle every message; ends when the session closes."""
        try:
            for message in session.backlog:
                self._handle(session, message)
            session.backlog = []
            while not session.closed.is_set():
                data = await session.reader.read(_READ_CHUNK)
                if not data:
                    session.close("connection closed by Asterisk")
                    return
                session.reads += 1
                self._take(session, data)
                # ``read`` returns without yielding while its buffer holds data: in a
                # storm this loop would keep the event loop for many reads in a row, and
                # the registration flusher and pending actions would wait on it.
                await asyncio.sleep(0)
        except AmiProtocolError as exc:
            self._log.error("ami.protocol_error", limit=exc.limit, error=exc.reason)
            session.close(exc.reason)
        except (OSError, ValueError) as exc:
            session.close(_describe(exc))

    def _take(self, session: _Session, data: bytes) -> None:
        """Decode one read (at most ``_READ_CHUNK`` bytes) and handle its messages with the
        cyclic garbage collector paused.

        The few hundred messages of a full read are all alive at once: a collection in
        the middle walked them, promoted them to older generations and so brought on
        full collections of everything the process holds (a quarter of a storm's CPU).
        They hold no cycles, so reference counting frees them as before; collections
        resume when the read is handled.  A collector paused by someone else stays so.
        """
        with collector_paused():
            messages = self._feed(session, data)
            if messages:
                self._see_stamp(messages)
            for message in messages:
                self._handle(session, message)

    def _see_stamp(self, messages: list[AmiMessage]) -> None:
        """Feed :attr:`clock` the last stamp among the last few ``messages`` of a read,
        seen at :attr:`read_at` (after the read returned, so no earlier than they came):
        a ``Timestamp`` (every event's with ``timestampevents``; every Ping answer's),
        else an ``EventTV`` (a security event's).  Asterisk sends in order, so a read's
        last stamp is its least delayed and the only one worth a look: one per read,
        not per event (a storm reads hundreds of events at once)."""
        for message in reversed(messages[-_STAMP_LOOKBACK:]):
            headers = message.view()
            stamp = headers.get("Timestamp")
            if stamp:
                self.clock.see_text(stamp, self.read_at)
                return
            told = event_tv(headers.get("EventTV"))
            if told is not None:
                self.clock.see(told, self.read_at)
                return

    def _feed(self, session: _Session, data: bytes) -> list[AmiMessage]:
        """``data`` through the session's decoder; its errors as this layer's: a bound
        passed as :class:`AmiProtocolError`, a peer that is not Asterisk as
        :class:`AmiNotAsterisk`."""
        self.read_at = time.time()
        try:
            return session.decoder.feed(data)
        except FrameTooLarge as exc:
            raise AmiProtocolError(
                self.name, f"protocol violation: {exc}", limit=exc.limit
            ) from None
        except NotAmiPeer as exc:
            raise AmiNotAsterisk(self.name, exc.greeting) from None

    async def _ping_loop(self, session: _Session) -> None:
        """``Ping`` every ``ping_interval``; ``ping_timeout`` without its answer and
        without a single read closes the session (a half-open connection).

        No ping is sent while another action is outstanding (see below).
        """
        while not await wait_first(session.closed, timeout=self.settings.ping_interval):
            if any(p.action.name != "Ping" for p in session.pending.values()):
                # Asterisk runs one session's actions one after another: a Ping queued
                # behind a 95-s reload would "time out" on a healthy connection.  The
                # outstanding action's own timeout bounds the wait instead.
                continue
            ping = build_action("Ping", (), action_id=self._ids())
            try:
                # Its answer's Timestamp feeds the clock as it is read (_see_stamp).
                await self._request(session, ping, self.settings.ping_timeout, patient=True)
            except AmiTimeout:
                self._log.warning("ami.ping_timeout", timeout_s=self.settings.ping_timeout)
                session.close(f"no answer to Ping in {self.settings.ping_timeout}s")
                return
            except AmiError:
                return

    # -- actions and messages -----------------------------------------------------

    async def _request(
        self,
        session: _Session,
        action: AmiAction,
        timeout: float,
        *,
        patient: bool = False,
        limit: float | None = None,
        quiet: bool = False,
    ) -> AmiReply:
        """Send ``action`` and return its answer, waiting at most ``timeout`` (a timeout
        logged as ``ami.action_timeout``: a warning, a debug line when ``quiet``).

        ``patient`` (the ping, queries): the wait goes on while reads keep coming, and
        only ``timeout`` without a single read times out, or ``limit`` timeouts in all
        (None: no such bound; unused without ``patient``).  Asterisk answers after every
        event it sent before the action: in a storm of re-registrations the answer can
        sit behind seconds of events still to be read, on a connection that is plainly
        alive.
        """
        future: asyncio.Future[AmiReply] = asyncio.get_running_loop().create_future()
        session.pending[action.action_id] = _Pending(action, future)
        try:
            async with asyncio.timeout(timeout):
                session.writer.write(action.encode())
                await session.writer.drain()
                if not patient:
                    return await future
            deadline = None if limit is None else time.monotonic() + limit * timeout
            return await self._answer_while_reading(session, action, future, timeout, deadline)
        except TimeoutError:
            (self._log.debug if quiet else self._log.warning)(
                "ami.action_timeout",
                action=action.name,
                action_id=action.action_id,
                timeout_s=timeout,
            )
            raise AmiTimeout(self.name, f"{action.name}: no answer in {timeout}s") from None
        except (OSError, RuntimeError) as exc:
            session.close(_describe(exc))
            raise AmiConnectionLost(self.name, f"{action.name}: {_describe(exc)}") from None
        finally:
            session.pending.pop(action.action_id, None)

    async def _answer_while_reading(
        self,
        session: _Session,
        action: AmiAction,
        answer: asyncio.Future[AmiReply],
        timeout: float,
        deadline: float | None,
    ) -> AmiReply:
        """``answer``'s result, waited for as long as each ``timeout`` sees a read and
        ``deadline`` (monotonic; None: none) has not passed; ``TimeoutError`` after
        either; :class:`AmiConnectionLost` once the session closes (its pending answers
        are failed only after the pinger has ended)."""
        closing = asyncio.ensure_future(session.closed.wait())
        try:
            while True:
                reads = session.reads
                wait = timeout if deadline is None else min(timeout, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError
                await asyncio.wait((answer, closing), timeout=wait, return_when=FIRST_COMPLETED)
                if answer.done():
                    return answer.result()
                if session.closed.is_set():
                    raise AmiConnectionLost(self.name, f"{action.name}: {session.reason}")
                if session.reads == reads:
                    # After a stall of the event loop the timeout and a read can be ready
                    # at once: the reader's turn first.
                    await asyncio.sleep(0)
                if session.reads == reads:
                    raise TimeoutError
        finally:
            closing.cancel()  # it only waits on the event

    def _handle(self, session: _Session, message: AmiMessage) -> None:
        pending = session.pending
        # Look for the ActionID only in a message holding some pending action's id: most
        # events have none, and looking up a missing header builds the message's
        # case-insensitive index (in a storm a patient Ping waits behind every event).
        if pending and message.any_value_in(pending.keys()):
            action_id = message.action_id
            waiting = pending.get(action_id) if action_id else None
            if waiting is not None and self._answer(waiting, message):
                return
        event = message.first("Event")
        if event is not None:
            self._events += 1
            name = event.lower()
            if name == "shutdown":
                self._log.warning(
                    "ami.shutdown",
                    shutdown=message.get("Shutdown"),
                    restart=message.get("Restart"),
                )
                self._dispatch(message, name)
                session.close("Asterisk shut down")
                return
            self._dispatch(message, name)
        elif message.is_response:
            # An answer to an action that already timed out: dropped, never matched anew.
            self._log.debug("ami.late_response", action_id=message.action_id)

    def _answer(self, pending: _Pending, message: AmiMessage) -> bool:
        """Give ``message`` to the waiting action; ``False`` if it is not part of its answer."""
        if pending.future.done():
            return True
        if message.is_response and pending.response is None:
            pending.response = message
            if message.get("EventList").lower() == "start":
                pending.events = []
            else:
                pending.future.set_result(AmiReply(message))
            return True
        if not (message.is_event and pending.events is not None):
            return False
        if message.get("EventList").lower() == "complete":
            assert pending.response is not None
            pending.future.set_result(
                AmiReply(pending.response, tuple(pending.events), complete=message)
            )
            return True
        pending.list_bytes += message.wire_bytes
        settings = self.settings
        if len(pending.events) >= settings.max_list_events:
            self._refuse_list(pending, "list_events", f"over {settings.max_list_events} events")
        elif pending.list_bytes > settings.max_list_bytes:
            self._refuse_list(pending, "list_bytes", f"over {settings.max_list_bytes} bytes")
        else:
            pending.events.append(message)
        return True

    def _refuse_list(self, pending: _Pending, limit: str, detail: str) -> None:
        """Fail ``pending``'s list action, past its ``limit`` (``list_events`` or
        ``list_bytes``), and let go of the events it held.  The session stays: each
        message was within its bounds, and the rest of the list is read and dropped
        (its events would go to ``on_event`` callbacks as any other once the action's
        caller has resumed, and none registers for list items)."""
        error = AmiProtocolError(self.name, f"{pending.action.name}: list {detail}", limit=limit)
        self._log.error(
            "ami.protocol_error", limit=limit, action=pending.action.name, error=error.reason
        )
        pending.events = []
        pending.future.set_exception(error)

    def _dispatch(self, event: AmiMessage, name: str | None = None) -> None:
        """Call the callbacks of ``event``'s name (``name``: it, lower-cased, when known)."""
        if name is None:
            name = event.event.lower()
        for callback in self._targets.get(name, self._wildcard):
            try:
                callback(event)
            except Exception as exc:  # a broken callback must not stop the reader
                self._log.exception(
                    "ami.callback_failed",
                    ami_event=event.event,
                    error=_describe(exc),
                )


#: Keepalive probes unanswered before the kernel gives up (``TCP_KEEPCNT``).
KEEPALIVE_PROBES = 3
_MAX_KEEPALIVE_S = 32767
_MAX_USER_TIMEOUT_MS = 2**31 - 1


def _probe_dead_peer(writer: asyncio.StreamWriter, settings: AmiSettings) -> None:
    """Have the kernel find a peer host gone without a FIN or RST (crashed, cut off):
    keepalive probes after ``ping_interval`` idle, and no more than ``ping_interval +
    ping_timeout`` without an ACK (``TCP_USER_TIMEOUT``), so the read fails and the session
    closes.  The pinger cannot: it sends no Ping while an action waits (a reload, up to
    ``reload_timeout``).  A peer whose kernel still answers (a hung Asterisk) is left to
    the action's timeout.  The TCP_* options are set where the platform has them (Linux)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    interval = math.ceil(settings.ping_timeout / KEEPALIVE_PROBES)
    silence_ms = math.ceil((settings.ping_interval + settings.ping_timeout) * 1000)
    # Linux refuses a keepalive time over 32767 s (EINVAL: no connection at all).
    options = (
        ("TCP_KEEPIDLE", min(_MAX_KEEPALIVE_S, max(1, math.ceil(settings.ping_interval)))),
        ("TCP_KEEPINTVL", min(_MAX_KEEPALIVE_S, max(1, interval))),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", min(_MAX_USER_TIMEOUT_MS, silence_ms)),
    )
    for name, value in options:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AmiError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
