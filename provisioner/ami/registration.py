"""Registration state per endpoint, from AMI events and ``PJSIPShowContacts``: pure.

Inputs are plain mappings with Asterisk's exact header names (an
:class:`~provisioner.ami.actions.AmiMessage` ``as_dict()`` or a dict from a test):

- ``ContactStatus``: ``URI``, ``ContactStatus`` (``NonQualified`` on register,
  ``Created`` on older Asterisk, ``Reachable``/``Unreachable`` with qualify,
  ``Removed`` on un-register), ``AOR``,
  ``EndpointName``, ``RoundtripUsec``, ``Timestamp``;
- ``PeerStatus``: ``ChannelType: PJSIP``, ``Peer: PJSIP/<endpoint>``, ``PeerStatus``;
- ``DeviceStateChange``: ``Device: PJSIP/<endpoint>``, ``State`` (``INVALID``: no
  such device, as after deleting an endpoint and reloading);
- ``SuccessfulAuth`` with ``Service: PJSIP``: ``AccountID`` (the endpoint),
  ``RemoteAddress`` (``IPV4/UDP/<ip>/<port>``): the only sign of a REGISTER from an
  endpoint Asterisk does not track yet (added since the last reload); its time is its
  ``Timestamp``, else its ``EventTV`` (a security event has one whatever
  ``timestampevents`` says);
- ``ContactList`` items of ``PJSIPShowContacts``: ``ObjectName`` (``<aor>;@<hash>``),
  ``Endpoint``, ``Uri``, ``UserAgent``, ``ViaAddr``, ``ViaPort``, ``ExpirationTime``,
  ``Status``, ``RoundtripUsec``.

The three state events arrive in a varying order; each updates only its own part
of the record, so any order gives the same result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from .clock import event_tv

__all__ = [
    "ContactState",
    "EndpointRegistration",
    "Summary",
    "apply_contact_status",
    "apply_event",
    "apply_events",
    "contact_from_list_item",
    "contact_from_status_detail",
    "contact_object_name",
    "counts_online",
    "derived_object_name",
    "endpoint_of",
    "snapshot_from_contact_list",
    "summarize",
]

Summary = Literal["online", "offline", "unreachable", "unknown"]

#: Contact statuses that mean the phone does not answer (or is gone): any other means it
#: is there (Reachable, NonQualified: registered and not qualified, Unknown, and Created:
#: what Asterisk before NonQualified says of a new contact).  The store's ``status``
#: reads its contacts by the same rule (:func:`provisioner.store.registrations.summarize`).
_DOWN = frozenset({"Unreachable", "Removed"})
#: Contact statuses that say the contact was just created (registered anew): its expiry
#: is a new one, which no event tells.
_CREATED = frozenset({"NonQualified", "Created"})
_PJSIP_PREFIX = "PJSIP/"


# Records are named tuples: immutable values as frozen dataclasses were, built ~3x
# faster (a frozen dataclass's ``__init__`` sets each field through
# ``object.__setattr__``), and a storm builds two records per event.
class ContactState(NamedTuple):
    """One registered contact of an endpoint."""

    aor: str
    uri: str
    status: str
    #: Round-trip time in microseconds; ``None`` when not measured (``N/A``, unqualified).
    rtt_usec: int | None = None
    user_agent: str | None = None
    #: ``ip:port`` the REGISTER came from (``ViaAddr:ViaPort``).
    source: str | None = None
    #: Epoch seconds the registration expires, when known (``ExpirationTime``).
    expires_at: int | None = None
    #: ``<aor>;@<hash>``: the astdb key suffix needed to delete the contact.
    object_name: str | None = None


class EndpointRegistration(NamedTuple):
    """What is known about one endpoint's registration."""

    endpoint: str
    contacts: tuple[ContactState, ...] = ()
    peer_status: str | None = None
    device_state: str | None = None
    #: ``False`` once Asterisk said ``INVALID``: no such device (deleted and reloaded).
    exists: bool = True
    #: ``True`` once a status event came: Asterisk tracks this endpoint.
    tracked: bool = False
    last_auth_at: float | None = None
    last_auth_from: str | None = None
    #: Asterisk's ``Timestamp`` of the last event that changed this record.
    last_change: float | None = None

    @property
    def summary(self) -> Summary:
        return summarize(self)


def summarize(reg: EndpointRegistration) -> Summary:
    """``online``, ``unreachable`` (contacts, none answering), ``offline`` or ``unknown``.

    ``unknown``: nothing but authentications seen (an endpoint Asterisk does not
    track yet); ask ``PJSIPShowContacts`` to know.
    """
    if not reg.exists:
        return "offline"
    if reg.contacts:
        for c in reg.contacts:  # a loop, not any(<generator>): this runs per endpoint per flush
            if c.status not in _DOWN:
                return "online"
        return "unreachable"
    if reg.peer_status == "Reachable":
        return "online"
    if reg.peer_status is not None or reg.device_state is not None:
        return "offline"
    return "unknown"


def counts_online(reg: EndpointRegistration, cutoff: float) -> bool:
    """Whether ``reg`` counts as online as ``status`` reads the store: its summary is
    ``online`` and, when it has contacts, one of those answering has no expiry or one
    at or after ``cutoff`` (epoch seconds): a contact whose expiry passed before it was
    seen to by no one, and counts for nothing."""
    # One pass, not summary() then the contacts again: the health record asks this of
    # every endpoint each time it is written.
    if not reg.exists:
        return False
    if not reg.contacts:
        return reg.peer_status == "Reachable"  # as a server's "online" row
    for c in reg.contacts:
        if c.status not in _DOWN and (c.expires_at is None or c.expires_at >= cutoff):
            return True
    return False


#: The largest integer the store's columns (64-bit) hold.
_MAX_INT = 2**63 - 1


def _int_or_none(value: str | None) -> int | None:
    """``value`` as an integer; ``None`` for none, ``N/A`` and what a 64-bit column cannot
    hold (the store's write raised on it, killing the flusher)."""
    try:
        number = int(value) if value not in (None, "") else None
    except ValueError:
        return None  # "N/A"
    return number if number is not None and -_MAX_INT <= number <= _MAX_INT else None


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


#: The last second a date holds (9999-12-31 23:59:59 UTC): the store writes times as dates.
_LAST_EPOCH = 253402300799


def _expiry(value: str | None) -> int | None:
    """A contact's expiry (whole epoch seconds) as :func:`_epoch_or_none` takes it."""
    seconds = _int_or_none(value)
    return None if seconds is None or _epoch_or_none(seconds) is None else seconds


def _epoch_or_none(value: float | None) -> float | None:
    """``value`` (epoch seconds) when a date can hold it (1970 to year 9999), else
    ``None``, as if not told: NaN, an infinity or year 10000 made building the store's
    rows raise, and with it the flusher or the snapshot (and the whole AMI side)."""
    if value is not None and 0 <= value <= _LAST_EPOCH:  # False for NaN
        return value
    return None


def _pjsip_name(value: str) -> str | None:
    """``PJSIP/1001`` -> ``1001``; anything else is not ours."""
    if value.startswith(_PJSIP_PREFIX) and len(value) > len(_PJSIP_PREFIX):
        return value[len(_PJSIP_PREFIX) :]
    return None


def _address(remote: str) -> str | None:
    """``IPV4/UDP/127.0.0.1/5070`` -> ``127.0.0.1:5070`` (IPv6 gets brackets)."""
    parts = remote.split("/")
    if len(parts) != 4:
        return None
    family, _proto, host, port = parts
    return f"[{host}]:{port}" if family.upper() == "IPV6" else f"{host}:{port}"


def _via_source(host: str, port: str) -> str | None:
    """``ViaAddr`` and ``ViaPort`` as ``host:port``; an IPv6 address (bare in a Via, as
    pjsip parses it) in brackets, as :func:`_address` writes it."""
    if host and port:
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    return host or None


def endpoint_of(event: Mapping[str, str]) -> str | None:
    """The endpoint an event is about, or ``None`` when the event is not one of ours."""
    kind = event.get("Event", "")
    if kind == "ContactStatus":
        return event.get("EndpointName") or None
    if kind == "PeerStatus":
        if event.get("ChannelType", "PJSIP") != "PJSIP":
            return None
        return _pjsip_name(event.get("Peer", ""))
    if kind == "DeviceStateChange":
        return _pjsip_name(event.get("Device", ""))
    if kind == "SuccessfulAuth":
        return (event.get("AccountID") or None) if event.get("Service") == "PJSIP" else None
    if kind == "ContactList":
        return event.get("Endpoint") or None
    return None


def _with_contact(reg: EndpointRegistration, contact: ContactState) -> EndpointRegistration:
    """Put ``contact`` in place of the one with the same AOR and URI (or add it)."""
    return reg._replace(contacts=_contacts_with(reg.contacts, contact))


def _contacts_with(
    contacts: tuple[ContactState, ...], contact: ContactState
) -> tuple[ContactState, ...]:
    """``contacts`` with ``contact`` in place of the one with the same AOR and URI (or
    added); without it when its status is ``Removed``."""
    if not contacts:
        return () if contact.status == "Removed" else (contact,)
    aor, uri = contact.aor, contact.uri
    if len(contacts) == 1:
        # A storm's case (a phone registering again): no list of the others.
        (old,) = contacts
        if old.uri != uri or old.aor != aor:
            return contacts if contact.status == "Removed" else (old, contact)
        return () if contact.status == "Removed" else (_merged(contact, old),)
    # One pass (this runs per event): the other contacts, and the one replaced.
    others: list[ContactState] = []
    found = None
    for c in contacts:
        if c.uri == uri and c.aor == aor:
            found = c
        else:
            others.append(c)
    if contact.status == "Removed":
        return tuple(others)
    if found is not None:
        contact = _merged(contact, found)
    return (*others, contact)


def _merged(contact: ContactState, old: ContactState) -> ContactState:
    """``contact`` (a status event's) in place of ``old`` (the same AOR and URI): a status
    event carries no user agent or expiry, so what the snapshot said is kept; but a
    contact created anew (its un-registration's event lost) has a new expiry, and the old
    one, passed, would make it "expired" in ``status``.  Built as :data:`_record` builds
    (a storm after an Asterisk restart replaces every contact)."""
    aor, uri, status, rtt, agent, source, expires_at, name = contact
    if expires_at is None and status not in _CREATED:
        expires_at = old.expires_at
    values = (
        aor,
        uri,
        status,
        rtt,
        agent or old.user_agent,
        source or old.source,
        expires_at,
        name or old.object_name,
    )
    return _record(ContactState, values)


#: ``tuple.__new__`` of a record class and its values in field order: what the named
#: tuple's own ``__new__`` (a Python function, with defaults) does, at a third of the
#: cost, for the two records a storm's event builds.
_record = tuple.__new__


def _contact_from_status(event: Mapping[str, str]) -> ContactState:
    get = event.get
    status = get("ContactStatus", "")
    # Only a contact that answered has a round trip: an Unreachable one says 0.
    rtt = _int_or_none(get("RoundtripUsec")) if status == "Reachable" else None
    values = (get("AOR", ""), get("URI", ""), status, rtt, None, None, None, None)
    return _record(ContactState, values)


def _stamp(value: str | None) -> float | None:
    """``_epoch_or_none(_float_or_none(value))``: an event's ``Timestamp`` in one call."""
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 <= number <= _LAST_EPOCH else None


def apply_contact_status(
    current: EndpointRegistration | None, endpoint: str, event: Mapping[str, str]
) -> EndpointRegistration:
    """:func:`apply_event` of a ``ContactStatus`` event about ``endpoint`` (its non-empty
    ``EndpointName``): the storm's event, so one contact and one record are built, with no
    chain of ``replace`` calls and no second look at the event's kind."""
    contact = _contact_from_status(event)
    stamp = _stamp(event.get("Timestamp"))
    if current is None:
        contacts = () if contact.status == "Removed" else (contact,)
        first = (endpoint, contacts, None, None, True, True, None, None, stamp or None)
        return _record(EndpointRegistration, first)
    last = current.last_change
    values = (
        current.endpoint,
        _contacts_with(current.contacts, contact),
        current.peer_status,
        current.device_state,
        True,
        True,
        current.last_auth_at,
        current.last_auth_from,
        # _latest, inline: the later of the two times, either may be unknown.
        max(stamp, last) if stamp and last else (stamp or last or None),
    )
    return _record(EndpointRegistration, values)


def _latest(stamp: float | None, last: float | None) -> float | None:
    """The later of two event times (either may be unknown), whatever order events came in."""
    return max(stamp, last) if stamp and last else (stamp or last or None)


def apply_event(
    current: EndpointRegistration | None, event: Mapping[str, str]
) -> EndpointRegistration | None:
    """The endpoint's record after ``event``; ``current`` unchanged if the event is not ours."""
    endpoint = endpoint_of(event)
    if endpoint is None:
        return current
    kind = event.get("Event", "")
    if kind == "ContactStatus":
        return apply_contact_status(current, endpoint, event)
    stamp = _epoch_or_none(_float_or_none(event.get("Timestamp")))
    reg = current if current is not None else EndpointRegistration(endpoint)
    latest = _latest(stamp, reg.last_change)
    if kind == "PeerStatus":
        peer = event.get("PeerStatus") or None
        exists = reg.exists or peer == "Reachable"
        # After INVALID, an Unreachable says nothing of tracking: the endpoint is gone.
        reg = reg._replace(peer_status=peer, tracked=exists, exists=exists)
    elif kind == "DeviceStateChange":
        state = event.get("State") or None
        # INVALID: Asterisk has no such device any more; its contacts are not "online".
        # Nor does it track it: added again (realtime), it sends no status event until a
        # reload, and its phone's registration is seen only by looking it up.
        gone = state == "INVALID"
        reg = reg._replace(
            device_state=state,
            exists=not gone,
            tracked=not gone,
            contacts=() if gone else reg.contacts,
        )
    elif kind == "SuccessfulAuth":
        # Not a change of the registration's state (a refresh authenticates too): the
        # last change stays that of the last status event.  Without timestampevents a
        # security event still tells its time: EventTV.
        when = stamp or _epoch_or_none(event_tv(event.get("EventTV")))
        return reg._replace(
            last_auth_at=when or reg.last_auth_at,
            last_auth_from=_address(event.get("RemoteAddress", "")),
        )
    elif kind == "ContactList":
        reg = _with_contact(reg, contact_from_list_item(event))
    return reg._replace(last_change=latest)


def apply_events(
    book: Mapping[str, EndpointRegistration], events: Iterable[Mapping[str, str]]
) -> dict[str, EndpointRegistration]:
    """Fold ``events`` into a copy of ``book`` (endpoint -> record)."""
    out = dict(book)
    for event in events:
        endpoint = endpoint_of(event)
        if endpoint is None:
            continue
        updated = apply_event(out.get(endpoint), event)
        if updated is not None:
            out[endpoint] = updated
    return out


def contact_from_list_item(item: Mapping[str, str]) -> ContactState:
    """A ``ContactList`` event of ``PJSIPShowContacts`` as a :class:`ContactState`."""
    object_name = item.get("ObjectName", "")
    aor = object_name.split(";@", 1)[0] if ";@" in object_name else item.get("AOR", "")
    via, port = item.get("ViaAddr", ""), item.get("ViaPort", "")
    return ContactState(
        aor=aor,
        uri=item.get("Uri", ""),
        status=item.get("Status", ""),
        rtt_usec=_int_or_none(item.get("RoundtripUsec")),
        user_agent=item.get("UserAgent") or None,
        source=_via_source(via, port),
        expires_at=_expiry(item.get("ExpirationTime")),
        object_name=object_name or None,
    )


def contact_object_name(contact: ContactState) -> tuple[str, bool]:
    """The contact's AMI ``ObjectName`` (``<aor>;@<hash>``, its astdb key after
    ``contact/``) and whether it was derived rather than told.

    A snapshot (``ContactList``, ``ContactStatusDetail``) tells it; a ``ContactStatus``
    event tells only the AOR and URI, and the name is then made as res_pjsip makes it
    when it creates the contact: the AOR's id, ``;@``, the MD5 of the URI it stores (the
    one its events report).  The recorded ``ContactList`` in ``../shared/asterisk``
    agrees: ``1001;@4647304968688045788916f1ea15a2ae`` for
    ``sip:1001@127.0.0.1:5070;ob``.  A caller deleting by a derived name still checks
    that it was found."""
    if contact.object_name:
        return contact.object_name, False
    return derived_object_name(contact.aor, contact.uri), True


def derived_object_name(aor: str, uri: str) -> str:
    """The ``ObjectName`` res_pjsip gives the contact of ``aor`` at ``uri``
    (:func:`contact_object_name`)."""
    return f"{aor};@{hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()}"


def snapshot_from_contact_list(
    items: Iterable[Mapping[str, str]],
) -> dict[str, EndpointRegistration]:
    """Endpoint -> record from a whole ``PJSIPShowContacts`` answer (the truth right now)."""
    out: dict[str, EndpointRegistration] = {}
    for item in items:
        endpoint = endpoint_of({**item, "Event": "ContactList"})
        if endpoint is None:
            continue
        reg = out.get(endpoint) or EndpointRegistration(endpoint)
        out[endpoint] = _with_contact(reg, contact_from_list_item(item))
    return out


def contact_from_status_detail(item: Mapping[str, str]) -> ContactState:
    """A ``ContactStatusDetail`` event (of ``PJSIPShowEndpoint``) as a :class:`ContactState`."""
    return ContactState(
        aor=item.get("AOR", ""),
        uri=item.get("URI", ""),
        status=item.get("Status", ""),
        rtt_usec=_int_or_none(item.get("RoundtripUsec")),
        user_agent=item.get("UserAgent") or None,
        source=item.get("ViaAddress") or None,
        expires_at=_expiry(item.get("RegExpire")),
        object_name=item.get("ID") or None,
    )
