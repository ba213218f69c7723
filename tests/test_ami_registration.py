"""Registration records from the real events of registration_events.txt and show_actions.txt."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.ami.actions import parse_message_lines
from provisioner.ami.pbx import batch_entry, rows
from provisioner.ami.registration import (
    ContactState,
    EndpointRegistration,
    apply_event,
    apply_events,
    endpoint_of,
    snapshot_from_contact_list,
)
from provisioner.store.registrations import RowBatch, time_text

from .amipeer import AMI_DIR

STATE_EVENTS = ("PeerStatus", "ContactStatus", "DeviceStateChange")


def _captures() -> dict[int, list[dict[str, str]]]:
    """Capture number -> its AMI events, in recorded order (markers and notes dropped)."""
    text = (AMI_DIR / "registration_events.txt").read_text()
    out: dict[int, list[dict[str, str]]] = {}
    for chunk in re.split(r"^# capture: ", text, flags=re.MULTILINE)[1:]:
        number = int(chunk.split(":", 1)[0])
        events = []
        for block in chunk.split("\n\n"):
            lines = [line for line in block.splitlines() if not line.startswith("#")]
            message = parse_message_lines(lines)
            if message is not None and message.is_event:
                events.append(message.as_dict())
        out[number] = events
    return out


def _contact_list_items() -> list[dict[str, str]]:
    """The ContactList items of the recorded PJSIPShowContacts answer."""
    text = (AMI_DIR / "show_actions.txt").read_text()
    items = []
    for block in text.split("\n\n"):
        message = parse_message_lines(block.splitlines())
        if message is not None and message.event == "ContactList":
            items.append(message.as_dict())
    return items


def _halves(events: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split at the AMI login of the second (un-register) connection."""
    ami_logins = [
        i for i, e in enumerate(events) if e["Event"] == "SuccessfulAuth" and e["Service"] == "AMI"
    ]
    return events[: ami_logins[1]], events[ami_logins[1] :]


def test_realtime_endpoint_registers_and_unregisters() -> None:
    """Capture 1: 1001 is online with its contact after register, offline after un-register."""
    register, unregister = _halves(_captures()[1])
    after_register = apply_events({}, register)["1001"]
    assert after_register.summary == "online"
    assert after_register.peer_status == "Reachable"
    assert after_register.device_state == "NOT_INUSE"
    (contact,) = after_register.contacts
    assert (contact.aor, contact.uri, contact.status) == (
        "1001",
        "sip:1001@127.0.0.1:5070;ob",
        "NonQualified",
    )
    assert contact.rtt_usec is None
    assert after_register.last_auth_from == "127.0.0.1:5070"
    assert after_register.last_change == 1795564305.936677
    final = apply_events({"1001": after_register}, unregister)["1001"]
    assert final.summary == "offline"
    assert final.contacts == ()
    assert final.device_state == "UNAVAILABLE"


def test_untracked_endpoint_only_shows_authentications() -> None:
    """Capture 4: a realtime endpoint added without reload yields only SuccessfulAuth: unknown."""
    book = apply_events({}, _captures()[4])
    reg = book["1002"]
    assert not reg.tracked
    assert reg.summary == "unknown"
    assert reg.last_auth_from == "127.0.0.1:5074"
    assert "provisioner" not in book  # the AMI login's own SuccessfulAuth is not an endpoint


def test_register_without_contact_status_is_online() -> None:
    """Capture 5: PeerStatus Reachable and NOT_INUSE without ContactStatus still mean online."""
    register, unregister = _halves(_captures()[5])
    reg = apply_events({}, register)["1002"]
    assert reg.summary == "online"
    assert reg.contacts == ()
    assert apply_events({"1002": reg}, unregister)["1002"].summary == "offline"


def test_qualified_contact_reports_rtt() -> None:
    """Capture 8: NonQualified then Reachable with RoundtripUsec 556."""
    register, _ = _halves(_captures()[8])
    (contact,) = apply_events({}, register)["2003"].contacts
    assert contact.status == "Reachable"
    assert contact.rtt_usec == 556


def test_an_unreachable_contact_has_no_round_trip_time() -> None:
    """A contact gone Unreachable (Asterisk says RoundtripUsec 0: no answer came) has no
    round-trip time, not one of 0 microseconds."""
    register, _ = _halves(_captures()[8])
    (reachable,) = [e for e in register if e.get("ContactStatus") == "Reachable"]
    gone = {**reachable, "ContactStatus": "Unreachable", "RoundtripUsec": "0"}
    (contact,) = apply_events({}, [*register, gone])["2003"].contacts
    assert (contact.status, contact.rtt_usec) == ("Unreachable", None)


def test_order_of_the_three_events_does_not_matter() -> None:
    """Every order of PeerStatus, ContactStatus and DeviceStateChange gives the same record."""
    for number, events in _captures().items():
        for half in _halves(events):
            state = [e for e in half if e["Event"] in STATE_EVENTS]
            if not state:
                continue
            endpoint = endpoint_of(state[0])
            assert endpoint is not None
            contact_order = [e for e in state if e["Event"] == "ContactStatus"]
            results = set()
            for order in itertools.permutations(state):
                # Two ContactStatus of one contact (NonQualified, then Reachable) keep
                # their order; only the interleaving of the three kinds varies.
                if [e for e in order if e["Event"] == "ContactStatus"] != contact_order:
                    continue
                reg = apply_events({}, order)[endpoint]
                results.add((reg.summary, reg.contacts, reg.peer_status, reg.device_state))
            assert len(results) == 1, f"capture {number}"


def test_invalid_device_state_means_no_such_device() -> None:
    """DeviceStateChange INVALID (deleted endpoint, reload) makes the endpoint offline and gone."""
    register, _ = _halves(_captures()[1])
    reg = apply_events({}, register)["1001"]
    gone = apply_event(
        reg, {"Event": "DeviceStateChange", "Device": "PJSIP/1001", "State": "INVALID"}
    )
    assert isinstance(gone, EndpointRegistration)
    assert not gone.exists
    assert gone.summary == "offline"
    assert gone.contacts == ()


def test_other_channel_types_and_unrelated_events_are_ignored() -> None:
    """Events for non-PJSIP devices or of other kinds leave the book unchanged."""
    events = [
        {"Event": "DeviceStateChange", "Device": "SIP/1001", "State": "INUSE"},
        {
            "Event": "PeerStatus",
            "ChannelType": "IAX2",
            "Peer": "IAX2/1001",
            "PeerStatus": "Reachable",
        },
        {"Event": "FullyBooted", "Status": "Fully Booted"},
    ]
    assert apply_events({}, events) == {}


def test_contact_list_snapshot_from_show_actions() -> None:
    """ContactList items of PJSIPShowContacts become records with UA, source, expiry, key."""
    book = snapshot_from_contact_list(_contact_list_items())
    assert set(book) == {"1001", "2001"}
    (contact,) = book["2001"].contacts
    assert contact.source == "127.0.0.1:5072"
    assert contact.user_agent == "PJSUA/v2.17 Linux-6.18.44 x86_64 glibc-2.36"
    assert contact.object_name is not None
    assert contact.object_name.startswith("2001;@")
    assert contact.expires_at is not None
    assert book["2001"].summary == "online"


def test_an_ipv6_phones_source_is_bracketed_as_for_its_authentication() -> None:
    """A ContactList item of a phone that registered over IPv6 (``ViaAddr`` is the bare
    address, as pjsip parses a Via host) has its source written ``[address]:port``, as
    the SuccessfulAuth of the same phone gives it, so the port can be told apart."""
    item = {**_contact_list_items()[0], "ViaAddr": "2001:db8::10", "ViaPort": "5060"}
    (contact,) = snapshot_from_contact_list([item])[item["Endpoint"]].contacts
    auth = {
        "Event": "SuccessfulAuth",
        "Service": "PJSIP",
        "AccountID": item["Endpoint"],
        "RemoteAddress": "IPV6/UDP/2001:db8::10/5060",
    }
    reg = apply_event(None, auth)
    assert reg is not None
    assert contact.source == reg.last_auth_from == "[2001:db8::10]:5060"


def test_a_first_contact_status_gives_one_contact_and_the_events_time() -> None:
    """A first recorded ContactStatus of an endpoint gives a tracked, existing record with
    exactly that contact (status, and RTT only when measured) and the event's Timestamp."""
    seen = 0
    for events in _captures().values():
        for event in events:
            if event["Event"] != "ContactStatus" or event["ContactStatus"] == "Removed":
                continue
            endpoint = endpoint_of(event)
            assert endpoint == event["EndpointName"]
            reg = apply_event(None, event)
            assert reg is not None
            measured = event["ContactStatus"] == "Reachable"
            rtt = int(event["RoundtripUsec"]) if measured else None
            contact = ContactState(event["AOR"], event["URI"], event["ContactStatus"], rtt)
            assert (reg.endpoint, reg.contacts, reg.exists, reg.tracked) == (
                endpoint,
                (contact,),
                True,
                True,
            )
            assert reg.last_change == float(event["Timestamp"])
            seen += 1
    assert seen >= 2


def _snapshot_contact_then(status: str, rtt_usec: str) -> tuple[ContactState, ContactState]:
    """Endpoint 1001's one contact as the recorded snapshot gives it, and as it is after a
    ContactStatus event of that contact saying ``status`` with ``rtt_usec``."""
    before = snapshot_from_contact_list(_contact_list_items())["1001"]
    (old,) = before.contacts
    event = {
        "Event": "ContactStatus",
        "URI": old.uri,
        "ContactStatus": status,
        "AOR": old.aor,
        "EndpointName": "1001",
        "RoundtripUsec": rtt_usec,
    }
    after = apply_event(before, event)
    assert after is not None
    (new,) = after.contacts
    return old, new


def test_status_event_keeps_what_the_snapshot_said() -> None:
    """A ContactStatus of a snapshot's contact keeps its user agent, source, expiry and key."""
    old, new = _snapshot_contact_then("Reachable", "812")
    assert (new.status, new.rtt_usec) == ("Reachable", 812)
    assert (new.user_agent, new.source, new.expires_at, new.object_name) == (
        old.user_agent,
        old.source,
        old.expires_at,
        old.object_name,
    )


def test_a_contact_registered_anew_drops_the_snapshots_expiry() -> None:
    """A NonQualified ContactStatus (a contact created: registered anew, its
    un-registration's events lost) of a snapshot's contact keeps its user agent, source
    and key, but not its expiry, a new one no event tells."""
    old, new = _snapshot_contact_then("NonQualified", "0")
    assert old.expires_at is not None
    assert (new.status, new.expires_at) == ("NonQualified", None)
    assert (new.user_agent, new.source, new.object_name) == (
        old.user_agent,
        old.source,
        old.object_name,
    )


def test_a_second_contact_goes_beside_the_first_and_a_removal_takes_only_its_own() -> None:
    """A ContactStatus of another URI of the endpoint adds a contact beside the one held;
    a Removed of a URI the endpoint does not hold leaves its contact, one of a URI it
    holds takes only that contact."""

    def status(uri: str, state: str) -> dict[str, str]:
        return {
            "Event": "ContactStatus",
            "EndpointName": "1001",
            "AOR": "1001",
            "URI": uri,
            "ContactStatus": state,
        }

    one, two = "sip:1001@10.0.0.1:5060", "sip:1001@10.0.0.2:5060"
    book = apply_events({}, [status(one, "NonQualified")])
    assert [c.uri for c in book["1001"].contacts] == [one]
    assert [c.uri for c in apply_events(book, [status(two, "Removed")])["1001"].contacts] == [one]
    both = apply_events(book, [status(two, "Reachable")])
    assert [(c.uri, c.status) for c in both["1001"].contacts] == [
        (one, "NonQualified"),
        (two, "Reachable"),
    ]
    assert [c.uri for c in apply_events(both, [status(one, "Removed")])["1001"].contacts] == [two]
    assert apply_events(book, [status(one, "Removed")])["1001"].contacts == ()


def test_store_rows_carry_what_the_snapshot_said() -> None:
    """pbx.rows gives a contact's key, URI, status, user agent, source, RTT and expiry (the
    store's UTC text) and the endpoint's summary."""
    reg = snapshot_from_contact_list(_contact_list_items())["2001"]
    (contact,) = reg.contacts
    assert contact.expires_at is not None
    contact_rows, summary = rows(reg)
    expires = datetime.fromtimestamp(contact.expires_at, UTC).replace(tzinfo=None)
    assert contact_rows == (
        (
            contact.object_name,
            contact.uri,
            contact.status,
            "PJSUA/v2.17 Linux-6.18.44 x86_64 glibc-2.36",
            "127.0.0.1:5072",
            contact.rtt_usec,
            time_text(expires),
            None,
        ),
    )
    assert summary[:3] == ("online", reg.device_state or "", "")


def test_an_endpoint_known_by_nothing_is_stored_offline() -> None:
    """An endpoint whose state is unknown is stored as offline, with no contact."""
    assert rows(EndpointRegistration("100000")) == ((), ("offline", "", "", None))


@pytest.mark.parametrize("expiry", ["253402300800", "99999999999999", "-99999999999999"])
def test_an_expiry_no_date_can_hold_is_stored_as_unknown(expiry: str) -> None:
    """A listed contact whose ExpirationTime no date can hold (past year 9999, before 1) has no
    expiry, and its store rows can be built: rows() raised, killing the snapshot's write."""
    items = [{**item, "ExpirationTime": expiry} for item in _contact_list_items()]
    reg = snapshot_from_contact_list(items)["2001"]
    (contact,) = reg.contacts
    assert contact.expires_at is None
    contact_rows, _summary = rows(reg)
    assert contact_rows[0][6] is None


# Texts around the store's sizes (a contact id of 255, a URI of 512, a source of 128):
# short ones, and long ones that differ only past what the column keeps.
_TEXTS = st.one_of(
    st.sampled_from(["", "1001", "sip:1001@10.0.0.1:5060", 'a"b\\c\u00e9\n']),
    st.builds(
        lambda n, tail: "x" * n + tail,
        st.sampled_from([31, 32, 127, 128, 254, 255, 511, 512]),
        st.sampled_from("ab"),
    ),
)
_CONTACTS = st.builds(
    ContactState,
    aor=st.sampled_from(["1001", "1002"]),
    uri=_TEXTS,
    status=st.one_of(
        st.sampled_from(["NonQualified", "Reachable", "Unreachable", "Removed", "Created"]), _TEXTS
    ),
    rtt_usec=st.one_of(st.none(), st.integers(0, 2**40)),
    user_agent=st.one_of(st.none(), _TEXTS),
    source=st.one_of(st.none(), _TEXTS),
    expires_at=st.one_of(st.none(), st.integers(0, 253402300799)),
    object_name=st.one_of(st.none(), _TEXTS),
)
_RECORDS = st.builds(
    EndpointRegistration,
    endpoint=st.just("1001"),
    contacts=st.lists(_CONTACTS, max_size=3).map(tuple),
    peer_status=st.sampled_from([None, "Reachable", "Unreachable"]),
    device_state=st.sampled_from([None, "NOT_INUSE", "INVALID"]),
    exists=st.booleans(),
    tracked=st.booleans(),
    last_change=st.one_of(st.none(), st.floats(0, 253402300799)),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["1001", "1002", "1003", "2001"]), _RECORDS, max_size=4))
def test_a_batch_made_from_the_records_is_the_one_made_from_their_rows(
    book: dict[str, EndpointRegistration],
) -> None:
    """The flusher's batch made from each record at once (batch_entry, RowBatch.of_entries)
    is the very batch RowBatch.of makes from the same records' rows."""
    now = datetime(2026, 12, 7, 17, 40, 1, 250000)
    stamp = time_text(now)
    entries = [batch_entry(ep, reg, stamp) for ep, reg in book.items()]
    assert RowBatch.of_entries(entries, stamp) == RowBatch.of(
        {ep: rows(reg) for ep, reg in book.items()}, now
    )
