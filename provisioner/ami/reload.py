"""Reloading res_pjsip without hurting Asterisk, and the other PJSIP actions.

A ``res_pjsip.so`` reload is the expensive, rare event (95 s with 50,000
endpoints in the lab), so :class:`ReloadCoordinator` makes sure that, per server:

- requests merge: any number of :meth:`~ReloadCoordinator.request` calls while a
  reload waits or runs become one pending reload, sharing one future (a reload
  already running may have read the configuration before the change, so it never
  counts for requests made while it ran);
- at most one ``Action: Reload`` / ``Module: res_pjsip.so`` is in flight;
- ``A reload is in progress`` (someone else's reload) is retried at most
  ``reload_retries`` times, the delay doubling from ``reload_retry_delay`` up to
  ``BUSY_RETRY_MAX`` (or ``reload_retry_delay`` itself, when longer);
- between two reloads there is a gap of
  ``max(reload_min_gap, reload_gap_factor * last reload's duration)``, so a slow
  Asterisk gets proportionally more rest (``reload_min_gap`` after a timed-out one,
  whose duration is unknown, and after one cut by a lost connection);
- a server that is down keeps its pending reload until it is back; a reload cut
  by a lost connection stays pending too (a reload is idempotent, and Asterisk may
  have restarted), while a timed-out one does not (it started after the requests,
  so when Asterisk finishes it, it includes them);
- every outcome is logged as ``ami.reload`` (server, module, result, took_ms).

:class:`PjsipOps` holds the other actions the provisioner needs: expiring an
object from a sorcery memory cache, asking whether an endpoint is live,
listing contacts and deleting a stale contact from astdb.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..aio import sleep_unless, wait_first
from ..config import AmiSettings
from ..errors import InvalidInput
from ..logs import get_logger
from .client import AmiClient, AmiReply
from .errors import AmiActionFailed, AmiConnectionLost, AmiNotConnected, AmiTimeout
from .registration import ContactState, contact_from_list_item, contact_from_status_detail

__all__ = [
    "EndpointDetail",
    "ExpireResult",
    "PjsipOps",
    "ReloadCoordinator",
    "ReloadOutcome",
    "ReloadResult",
]

log = get_logger(__name__)

ReloadResult = Literal["ok", "busy", "error", "timeout", "disconnected", "stopped"]
ExpireResult = Literal["expired", "not_cached", "no_such_cache"]

_IN_PROGRESS = "a reload is in progress"
#: What ``ami.cache_missing`` means for the edit: Asterisk expired nothing.
_NOT_EXPIRED = (
    "nothing expired: if sorcery.conf puts a memory cache of another name before this "
    "kind's realtime mapping, Asterisk serves the stale object until that cache expires it; "
    "make sorcery_caches name it"
)
#: Seconds at most before a retry of ``A reload is in progress`` (the delay doubles up
#: to it): ``reload_retries`` may be 100, and 2 s doubled 99 times is 10^23 years.
BUSY_RETRY_MAX = 60.0


@dataclass(frozen=True)
class ReloadOutcome:
    """What became of one reload (shared by every request merged into it)."""

    server: str
    module: str
    result: ReloadResult
    took_ms: int
    attempts: int
    #: How many requests this reload served.
    requests: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "ok"


class ReloadCoordinator:
    """Merges reload requests for one server and runs them one at a time, spaced out."""

    def __init__(
        self,
        client: AmiClient,
        settings: AmiSettings | None = None,
        *,
        module: str = "res_pjsip.so",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.settings = settings or client.settings
        self.module = module
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        # The futures of the requests waiting for a reload that has not started, the last
        # one taking every new request (see request()), and how many requests they are.
        # Usually one future (two after a reload cut by a lost connection while requests
        # were made): waiting costs O(1) however many requests a long outage sees.
        self._waiters: list[asyncio.Future[ReloadOutcome]] = []
        self._requests = 0
        self._wake = asyncio.Event()
        self._next_allowed = 0.0
        self.in_flight = False
        #: Called right before a reload's first ``Action: Reload`` is sent; what it returns
        #: is called with that reload's outcome (see :mod:`provisioner.ami.loaded`).
        self.on_send: Callable[[], Callable[[ReloadOutcome], None]] | None = None
        #: ``Action: Reload`` messages sent (retries included).
        self.actions_sent = 0
        self.last_outcome: ReloadOutcome | None = None

    @property
    def pending(self) -> int:
        """Requests waiting for a reload that has not started yet."""
        return self._requests

    def request(self) -> asyncio.Future[ReloadOutcome]:
        """Ask for a reload; the future gets the outcome of the reload that serves it.

        Requests made while one waits for a reload that has not started share its
        future (the same object is returned), so the caller can attach what waits for
        that reload once.  Never raises and never blocks; awaiting the future is optional.
        """
        if not self._waiters:
            self._waiters.append(asyncio.get_running_loop().create_future())
        self._requests += 1
        self._wake.set()
        return self._waiters[-1]

    async def run(self, stop: asyncio.Event) -> None:
        """Serve requests until ``stop`` is set; pending requests then get ``stopped``."""
        while not stop.is_set():
            await wait_first(stop, self._wake)
            if stop.is_set():
                break
            if not await self._ready(stop):
                continue
            batch, requests = self._waiters, self._requests
            self._waiters, self._requests = [], 0
            self._wake.clear()
            outcome = await self._reload(stop, requests)
            if outcome.result == "disconnected":
                # Kept for when the server is back (see the module docstring); requests
                # made meanwhile keep their own future, the last.
                self._waiters = batch + self._waiters
                self._requests += requests
                self._wake.set()
                continue
            self._resolve(batch, outcome)
        self._resolve(self._waiters, self._stopped())
        self._waiters, self._requests = [], 0

    async def _ready(self, stop: asyncio.Event) -> bool:
        """Wait for a connection and for the gap after the last reload."""
        await wait_first(stop, self.client.connected_event)
        wait = self._next_allowed - self._clock()
        if wait > 0 and await sleep_unless(stop, wait):
            return False
        return not stop.is_set() and self.client.connected

    def _resolve(self, batch: list[asyncio.Future[ReloadOutcome]], outcome: ReloadOutcome) -> None:
        for future in batch:
            if not future.done():
                future.set_result(outcome)

    def _stopped(self) -> ReloadOutcome:
        return ReloadOutcome(self.client.name, self.module, "stopped", 0, 0, self._requests)

    async def _reload(self, stop: asyncio.Event, requests: int) -> ReloadOutcome:
        """Send the reload, retrying only ``A reload is in progress``, and log the outcome."""
        self.in_flight = True
        attempts, delay = 0, self.settings.reload_retry_delay
        settle = self.on_send() if self.on_send is not None else None
        try:
            while True:
                attempts += 1
                result, message, took = await self._send_once()
                if result == "busy" and attempts <= self.settings.reload_retries:
                    self._log(result="in_progress", took=took, attempts=attempts, requests=requests)
                    if await sleep_unless(stop, delay * (0.8 + self._rng.random() * 0.4)):
                        result, message = "stopped", "stopped while waiting to retry"
                    else:
                        delay = min(
                            delay * 2, max(BUSY_RETRY_MAX, self.settings.reload_retry_delay)
                        )
                        continue
                break
        finally:
            self.in_flight = False
        self._next_allowed = self._clock() + self._gap(result, took)
        outcome = ReloadOutcome(
            self.client.name, self.module, result, round(took * 1000), attempts, requests, message
        )
        self.last_outcome = outcome
        self._log(result=result, took=took, attempts=attempts, requests=requests, message=message)
        if settle is not None:
            settle(outcome)
        return outcome

    def _gap(self, result: ReloadResult, took: float) -> float:
        """Seconds from a reload's end to the next one's start:
        ``max(reload_min_gap, reload_gap_factor * took)``, or ``reload_min_gap`` alone after
        a timeout, whose real duration is unknown (``took`` is only how long it was waited
        for).  The lab's slowest reload took 95 s (50,000 endpoints; README of
        ../shared/asterisk), so one past ``reload_timeout`` (600 s) is an Asterisk far past
        anything measured, or stuck: spaced by the factor (1,200 s) the retry of the reload
        it failed (:func:`~provisioner.ami.changes.retry_reload_later`: 5 s, doubling) waited
        20 minutes.  A next one sent while Asterisk still reloads is answered ``A reload is
        in progress`` at once, and retried on the busy backoff.  So too after a reload cut
        by a lost connection (``disconnected``): how long it ran before the cut says
        nothing of Asterisk's load, and the reload is still owed (kept pending); spaced by
        the factor, one cut 95 s into a reload by an Asterisk restart was sent again over
        3 minutes after the server was back, not when it was back."""
        if result in ("timeout", "disconnected"):
            return self.settings.reload_min_gap
        return max(self.settings.reload_min_gap, self.settings.reload_gap_factor * took)

    async def _send_once(self) -> tuple[ReloadResult, str, float]:
        started = self._clock()
        self.actions_sent += 1
        result: ReloadResult
        try:
            reply = await self.client.send_action(
                "Reload", [("Module", self.module)], timeout=self.settings.reload_timeout
            )
        except (AmiNotConnected, AmiConnectionLost) as exc:
            result, message = "disconnected", exc.reason
        except AmiTimeout as exc:
            result, message = "timeout", exc.reason
        else:
            message = reply.message
            if reply.ok:
                result = "ok"
            elif _IN_PROGRESS in message.lower():
                result = "busy"
            else:
                result = "error"
        return result, message, self._clock() - started

    def _log(
        self, *, result: str, took: float, attempts: int, requests: int, message: str = ""
    ) -> None:
        level = log.info if result in ("ok", "in_progress") else log.warning
        level(
            "ami.reload",
            server=self.client.name,
            module=self.module,
            result=result,
            took_ms=round(took * 1000),
            attempts=attempts,
            requests=requests,
            message=message,
        )


@dataclass(frozen=True)
class EndpointDetail:
    """An endpoint as Asterisk holds it right now (``PJSIPShowEndpoint``)."""

    endpoint: str
    device_state: str
    aors: tuple[str, ...]
    auths: tuple[str, ...]
    contacts: tuple[ContactState, ...]
    #: ``(ObjectType, ObjectName)`` of every object listed (endpoint, auth, aor, transport).
    objects: tuple[tuple[str, str], ...]


_HASH = re.compile(r"[A-Za-z0-9]{1,128}")


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in (p.strip() for p in value.split(",")) if part)


class PjsipOps:
    """One-shot PJSIP actions on one server; errors other than the expected ones raise."""

    def __init__(self, client: AmiClient) -> None:
        self.client = client
        #: ``The provided cache does not exist`` answers seen (a sorcery.conf mismatch).
        self.missing_cache_warnings = 0
        #: The caches Asterisk answered so for (shown in the health record).
        self.missing_caches: set[str] = set()

    async def expire(self, cache: str, object_id: str) -> ExpireResult:
        """``SorceryMemoryCacheExpireObject``: make Asterisk re-read ``object_id``.

        A cache Asterisk does not have is logged (``ami.cache_missing``) and counted,
        not raised: sent again, it would be refused again.  Nothing expired, so a memory
        cache sorcery.conf names otherwise keeps serving the old object until its own
        expiry (a cache name mistyped in ``sorcery_caches``; ``provisioner check`` says so).
        """
        reply = await self.client.send_action(
            "SorceryMemoryCacheExpireObject",
            [("Cache", cache), ("Object", object_id)],
            patient=True,
        )
        if not reply.ok and "could not be expired" in reply.message.lower():
            return "not_cached"
        return self._expired(reply, "SorceryMemoryCacheExpireObject", cache)

    async def expire_all(self, cache: str) -> ExpireResult:
        """``SorceryMemoryCacheExpire``: empty ``cache`` (Asterisk reads each object from
        the database again when it next needs it): one action for any number of changed
        objects.  A missing cache is logged and counted as by :meth:`expire`."""
        reply = await self.client.send_action(
            "SorceryMemoryCacheExpire", [("Cache", cache)], patient=True
        )
        return self._expired(reply, "SorceryMemoryCacheExpire", cache)

    def _expired(self, reply: AmiReply, action: str, cache: str) -> ExpireResult:
        """An expiry's answer: done, a missing cache (logged), or :class:`AmiActionFailed`."""
        if reply.ok:
            return "expired"
        if "cache does not exist" in reply.message.lower():
            self.missing_cache_warnings += 1
            self.missing_caches.add(cache)
            log.warning(
                "ami.cache_missing",
                server=self.client.name,
                cache=cache,
                count=self.missing_cache_warnings,
                effect=_NOT_EXPIRED,
            )
            return "no_such_cache"
        raise AmiActionFailed(self.client.name, action, reply.message)

    async def show_endpoint(self, endpoint_id: str) -> EndpointDetail | None:
        """The endpoint as Asterisk has it, or ``None`` when Asterisk does not know it.

        After a reload this is how to tell that an endpoint is live: a reload
        reports success even when it dropped an object it could not parse.
        """
        reply = await self.client.send_action(
            "PJSIPShowEndpoint", [("Endpoint", endpoint_id)], patient=True
        )
        if not reply.ok:
            if "unable to retrieve endpoint" in reply.message.lower():
                return None
            raise AmiActionFailed(self.client.name, "PJSIPShowEndpoint", reply.message)
        return _endpoint_detail(endpoint_id, reply)

    async def show_endpoints(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Every endpoint Asterisk lists (``PJSIPShowEndpoints``), by id: its AORs and
        auths.  One action for any number of endpoints (how a large apply is verified);
        ``No endpoints found`` is ``{}``."""
        reply = await self.client.send_action("PJSIPShowEndpoints", patient=True)
        if not reply.ok:
            if "no endpoints found" in reply.message.lower():
                return {}
            raise AmiActionFailed(self.client.name, "PJSIPShowEndpoints", reply.message)
        return {
            event.get("ObjectName"): (_split(event.get("Aor")), _split(event.get("Auths")))
            for event in reply.events
            if event.event == "EndpointList"
        }

    async def show_contacts(self, *, quiet: bool = False) -> list[ContactState]:
        """Every registered contact (``PJSIPShowContacts``); ``No Contacts found`` is ``[]``.
        ``quiet``: a timeout is the caller's to log (see :meth:`AmiClient.send_action`)."""
        reply = await self.client.send_action("PJSIPShowContacts", patient=True, quiet=quiet)
        if not reply.ok:
            if "no contacts found" in reply.message.lower():
                return []
            raise AmiActionFailed(self.client.name, "PJSIPShowContacts", reply.message)
        return [
            contact_from_list_item(event.as_dict())
            for event in reply.events
            if event.event == "ContactList"
        ]

    async def remove_contact(self, aor: str, contact_hash: str) -> bool:
        """Delete the contact ``<aor>;@<hash>`` from astdb (``DBDel``, Family ``registrar``).

        ``True``: deleted; ``False``: no such key.  A prefix would match nothing
        (astdb trees split on ``/``), so the full key is required.
        """
        if not aor or "/" in aor:
            raise InvalidInput.one("aor", "must be a non-empty AOR name without '/'")
        if not _HASH.fullmatch(contact_hash):
            raise InvalidInput.one("hash", "must be the contact's hash (letters and digits)")
        reply = await self.client.send_action(
            "DBDel",
            [("Family", "registrar"), ("Key", f"contact/{aor};@{contact_hash}")],
            patient=True,
        )
        if reply.ok:
            return True
        if "not found" in reply.message.lower():
            return False
        raise AmiActionFailed(self.client.name, "DBDel", reply.message)

    async def remove_contact_object(self, object_name: str) -> bool:
        """:meth:`remove_contact` by the ``ObjectName`` (``<aor>;@<hash>``) of a contact."""
        aor, sep, contact_hash = object_name.partition(";@")
        if not sep:
            raise InvalidInput.one("object_name", "must look like '<aor>;@<hash>'")
        return await self.remove_contact(aor, contact_hash)


def _endpoint_detail(endpoint_id: str, reply: AmiReply) -> EndpointDetail:
    device_state = ""
    aors: tuple[str, ...] = ()
    auths: tuple[str, ...] = ()
    contacts: list[ContactState] = []
    objects: list[tuple[str, str]] = []
    for event in reply.events:
        if event.get("ObjectType"):
            objects.append((event.get("ObjectType"), event.get("ObjectName")))
        if event.event == "EndpointDetail":
            device_state = event.get("DeviceState")
            aors, auths = _split(event.get("Aors")), _split(event.get("Auth"))
        elif event.event == "ContactStatusDetail":
            contacts.append(contact_from_status_detail(event.as_dict()))
    return EndpointDetail(endpoint_id, device_state, aors, auths, tuple(contacts), tuple(objects))
