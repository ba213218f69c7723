"""Pure AMI wire format: building and validating actions, bounded parsing of replies."""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from panoramisk.message import Message

from provisioner.ami import AmiClient
from provisioner.ami import actions as actions_module
from provisioner.ami.actions import (
    _CONTACT_STATUS_NAMES,
    MAX_ACTION_LINE_BYTES,
    MAX_HEADERS,
    MAX_LINE_BYTES,
    MAX_MESSAGE_BYTES,
    ActionIdGenerator,
    AmiMessage,
    FrameDecoder,
    FrameTooLarge,
    NotAmiPeer,
    build_action,
    parse_message_lines,
)
from provisioner.config import AmiSettings
from provisioner.errors import InvalidInput

from .amipeer import FakeAsterisk, Transcripts, fast_settings, load_transcripts, server_for

T = TypeVar("T")
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
NASTY = [
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    ":",
    " ",
    "Action: Originate",
]
values = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(NASTY)), max_size=6).map("".join)


def test_action_keeps_header_order_and_crlf() -> None:
    """An action is Action, ActionID, then the headers in the caller's order, CRLF-ended."""
    action = build_action("Reload", [("Module", "res_pjsip.so"), ("B", "2")], action_id="id-1")
    assert action.encode() == (
        b"Action: Reload\r\nActionID: id-1\r\nModule: res_pjsip.so\r\nB: 2\r\n\r\n"
    )


@pytest.mark.parametrize(
    "bad", ["a\rb", "a\nb", "a\r\nAction: Originate", "nul\x00", "tab\t", "\x85"]
)
def test_control_characters_are_refused_naming_the_header(bad: str) -> None:
    """CR, LF, NUL and any other control character in a value raise InvalidInput for that header."""
    with pytest.raises(InvalidInput) as caught:
        build_action("DBDel", [("Family", "registrar"), ("Key", bad)], action_id="1")
    assert [p.field for p in caught.value.problems] == ["Key"]


def test_bad_names_reserved_headers_and_long_lines_are_refused() -> None:
    """Header names with ':' or spaces, Action/ActionID as headers and >1024-byte lines fail."""
    with pytest.raises(InvalidInput):
        build_action("Ping", [("Bad: Name", "x")], action_id="1")
    with pytest.raises(InvalidInput):
        build_action("Ping", [("ActionID", "x")], action_id="1")
    with pytest.raises(InvalidInput):
        build_action("Ping\r\nAction: Originate", [], action_id="1")
    fits = "x" * (MAX_ACTION_LINE_BYTES - len("Key: ") - 2)
    build_action("DBDel", [("Key", fits)], action_id="1")
    with pytest.raises(InvalidInput):
        build_action("DBDel", [("Key", fits + "x")], action_id="1")


def test_secrets_are_masked_for_logs() -> None:
    """loggable() never shows the Secret value."""
    action = build_action("Login", [("Username", "u"), ("Secret", "s3cret")], action_id="1")
    assert "s3cret" not in repr(action.loggable())


def test_action_ids_are_unique() -> None:
    """Two generators never produce the same ActionID."""
    first, second = ActionIdGenerator(), ActionIdGenerator()
    ids = {first() for _ in range(100)} | {second() for _ in range(100)}
    assert len(ids) == 200


@given(key=st.sampled_from(["Key", "Variable", "X-Y", "Bad Name", "A:B", ""]), value=values)
def test_built_actions_are_exactly_one_action_on_the_wire(key: str, value: str) -> None:
    """Any value either raises or yields exactly one action with exactly its headers."""
    try:
        action = build_action("DBDel", [(key, value)], action_id="id-1")
    except InvalidInput:
        return
    # Asterisk ends lines at LF (with or without CR) and actions at a blank line.
    wire = action.encode().decode().replace("\r\n", "\n")
    actions = [a for a in wire.split("\n\n") if a]
    assert len(actions) == 1
    assert actions[0].split("\n") == ["Action: DBDel", "ActionID: id-1", f"{key}: {value}"]


@functools.cache
def _transcripts() -> Transcripts:
    return load_transcripts()


def _recorded(*needles: str) -> bytes:
    return _transcripts().find_message(*needles)


def test_extra_blank_line_after_errors_is_skipped() -> None:
    """Asterisk's 'Message: ...\\n\\r\\n\\r\\n' (responses_and_errors.txt) is one message."""
    data = _transcripts().candidates("SorceryMemoryCacheExpireObject")[0].reply
    assert b"exist\n\r\n\r\n" in data
    decoder = FrameDecoder()
    messages = decoder.feed(BANNER + data + _recorded("Ping: Pong"))
    assert [m.message or m.get("Ping") for m in messages] == [
        "The provided cache does not exist",
        "Pong",
    ]


@given(cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=8))
def test_chunking_does_not_change_the_messages(cuts: list[int]) -> None:
    """However the stream is split into reads, the same messages come out."""
    data = BANNER + _transcripts().candidates("PJSIPShowEndpoint")[0].reply
    whole = FrameDecoder().feed(data)
    decoder = FrameDecoder()
    pieces, last = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    assert [m for piece in pieces for m in decoder.feed(piece)] == whole


def test_parser_agrees_with_panoramisk_on_recorded_messages() -> None:
    """On every recorded reply our headers equal panoramisk's Message.from_line parse."""
    for raw in _transcripts().messages():
        ours = FrameDecoder().feed(BANNER + raw)
        if not ours or ours[0].get("Response") in ("Follows", "Fail"):
            continue
        theirs = Message.from_line(raw.decode().strip())
        if theirs is None:
            continue
        assert ours[0].event == theirs.event
        for key, value in ours[0].headers:
            if len(ours[0].get_all(key)) == 1 and value:
                # panoramisk keeps what follows ": " verbatim; Asterisk's values match.
                assert theirs[key].strip() == value.strip()


def test_oversized_line_raises_with_bounded_buffer() -> None:
    """A 10 MB line raises FrameTooLarge once past the bound; the buffer never grows past it."""
    decoder = FrameDecoder(max_line_bytes=65536)
    decoder.feed(BANNER + b"Event: Junk\r\nData: ")
    chunk = b"x" * 65536
    fed = 0

    def feed_ten_megabytes() -> None:
        nonlocal fed
        for _ in range(160):
            fed += 1
            decoder.feed(chunk)

    with pytest.raises(FrameTooLarge):
        feed_ten_megabytes()
    assert fed <= 2
    assert decoder.high_water <= 2 * 65536


def test_oversized_message_raises() -> None:
    """A message whose lines add up past max_message_bytes raises FrameTooLarge."""
    decoder = FrameDecoder(max_line_bytes=2048, max_message_bytes=4096)
    line = b"Output: " + b"y" * 1000 + b"\r\n"
    with pytest.raises(FrameTooLarge):
        decoder.feed(BANNER + b"Event: X\r\n" + line * 5)


@pytest.mark.parametrize("split", [False, True])
def test_a_message_over_the_bound_in_bytes_raises_however_few_its_characters(
    split: bool,
) -> None:
    """max_message_bytes counts the bytes on the wire: a message of 2-byte characters
    (2,440 characters, 4,850 bytes) passes a 4,096-byte bound, whole in one read or not."""
    decoder = FrameDecoder(max_line_bytes=2048, max_message_bytes=4096)
    line = b"Output: " + "\u00e9".encode() * 600 + b"\r\n"
    wire = BANNER + b"Event: X\r\n" + line * 4 + b"\r\n"
    cut = len(BANNER) + 2000 if split else 0
    decoder.feed(wire[:cut])
    with pytest.raises(FrameTooLarge):
        decoder.feed(wire[cut:])


def _fed_in(decoder: FrameDecoder, wire: bytes, chunk: int) -> list[AmiMessage]:
    """The messages ``decoder`` makes of ``wire`` fed ``chunk`` bytes at a time."""
    return [m for i in range(0, len(wire), chunk) for m in decoder.feed(wire[i : i + chunk])]


@pytest.mark.parametrize("chunk", [1, 100, 65536])
def test_a_message_of_exactly_max_message_bytes_passes_however_it_is_read(chunk: int) -> None:
    """A message whose lines with their CR LF are exactly max_message_bytes passes, in one
    read or many; one byte more raises FrameTooLarge either way."""
    body = b"Event: X\r\n" + (b"Output: " + b"z" * 90 + b"\r\n") * 40  # 4,010 bytes
    exact = body + b"Data: " + b"w" * (4096 - len(body) - 8) + b"\r\n"  # 4,096 bytes
    decoder = FrameDecoder(max_line_bytes=2048, max_message_bytes=4096)
    assert [m.event for m in _fed_in(decoder, BANNER + exact + b"\r\n", chunk)] == ["X"]
    over = exact.replace(b"Data: ", b"Data: w") + b"\r\n"
    with pytest.raises(FrameTooLarge):
        _fed_in(decoder, over, chunk)


def test_non_ami_peer_is_refused() -> None:
    """A first line that is not the AMI banner is refused."""
    with pytest.raises(ValueError, match="not an AMI peer"):
        FrameDecoder().feed(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(
    ("first", "greeting"),
    [
        (b"SSH-2", "SSH-2"),
        (b"\x16\x03\x01\x02", "\\x16\\x03\\x01\\x02"),
        (b"Asterisk Cx", "Asterisk Cx"),
    ],
)
def test_a_greeting_that_cannot_become_the_banner_is_refused_without_a_line_end(
    first: bytes, greeting: str
) -> None:
    """The first bytes that differ from the banner raise NotAmiPeer at once (no wait for a
    line end that may never come), with a printable excerpt of them."""
    with pytest.raises(NotAmiPeer) as refused:
        FrameDecoder().feed(first)
    assert refused.value.greeting == greeting


def test_a_banner_in_pieces_is_taken() -> None:
    """A banner that arrives a few bytes at a time is not refused before its line ends."""
    decoder = FrameDecoder()
    for at in range(0, len(BANNER), 3):
        assert decoder.feed(BANNER[at : at + 3]) == []
    assert decoder.banner == BANNER.decode().strip()
    assert decoder.feed(b"Event: X\r\n\r\n")[0].event == "X"


@pytest.mark.parametrize("split", [False, True])
def test_a_message_of_too_many_header_lines_raises(split: bool) -> None:
    """A message of max_headers lines passes; one line more raises FrameTooLarge naming the
    header bound, whole in one read or not."""
    decoder = FrameDecoder(max_headers=128)
    ok = b"Event: X\r\n" + b"A: b\r\n" * 127 + b"\r\n"
    assert len(decoder.feed(BANNER + ok)[0].headers) == 128
    wire = b"Event: X\r\n" + b"A: b\r\n" * 128 + b"\r\n"
    cut = 300 if split else 0
    decoder.feed(wire[:cut])
    with pytest.raises(FrameTooLarge) as refused:
        decoder.feed(wire[cut:])
    assert refused.value.limit == "headers"
    assert "A: b" not in str(refused.value)


def test_the_largest_recorded_messages_pass_the_default_bounds_many_times_over() -> None:
    """Every recorded Asterisk message is within a tenth of each default bound (the
    margin the defaults claim), and the configuration's defaults are those bounds."""
    for raw in _transcripts().messages():
        assert max(len(line) + 2 for line in raw.split(b"\r\n")) * 10 <= MAX_LINE_BYTES
        assert len(raw) * 10 <= MAX_MESSAGE_BYTES
        assert raw.count(b"\r\n") * 10 <= MAX_HEADERS
    settings = AmiSettings()
    assert (settings.max_line_bytes, settings.max_message_bytes, settings.max_headers) == (
        MAX_LINE_BYTES,
        MAX_MESSAGE_BYTES,
        MAX_HEADERS,
    )


def test_the_default_list_bounds_hold_200k_contacts_of_the_recorded_size() -> None:
    """Twice 100,000 contacts, each the size of the recorded ContactList event, are within
    the default max_list_bytes and max_list_events."""
    item = _transcripts().find_message("Event: ContactList\r\n")
    settings = AmiSettings()
    assert 200_000 * len(item) <= settings.max_list_bytes
    assert settings.max_list_events >= 200_000


@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_each_decoded_message_knows_its_size_on_the_wire(chunk: int) -> None:
    """Every recorded message, fed whole or in pieces, comes out with wire_bytes equal to
    its lines with their CR LF (what max_message_bytes counts), the blank line not."""
    raws = list(_transcripts().messages())
    decoded = _fed_in(FrameDecoder(), BANNER + b"".join(raws), chunk)
    assert [m.wire_bytes for m in decoded] == [len(raw) - 2 for raw in raws]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_line_bytes", 32 << 20),
        ("max_message_bytes", 128 << 20),
        ("max_headers", 1 << 20),
        ("max_list_bytes", 2 << 30),
        ("max_list_events", 100_000_000),
    ],
)
def test_the_bounds_cannot_be_configured_away(key: str, value: int) -> None:
    """A bound configured past its ceiling is refused, so memory stays bounded."""
    with pytest.raises(ValueError, match=key):
        AmiSettings.model_validate({key: value})


class _Wire:
    """A fake Asterisk and a logged-in client on a background event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.peer = FakeAsterisk()
        self.call(self.peer.start())
        self.client = AmiClient(server_for(self.peer), fast_settings())
        self.stop = asyncio.Event()
        self.runner = asyncio.run_coroutine_threadsafe(self.client.run(self.stop), self.loop)
        self.call(self._connected())

    async def _connected(self) -> None:
        await asyncio.wait_for(self.client.connected_event.wait(), 5)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.runner.result(timeout=5)
        self.call(self.peer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def wire() -> Iterator[_Wire]:
    wire = _Wire()
    yield wire
    wire.close()


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["UserEvent", "DBDel", "Ping"]), key=st.text(max_size=8), value=values)
def test_no_value_adds_a_header_or_action_on_the_wire(
    wire: _Wire, name: str, key: str, value: str
) -> None:
    """Over TCP, the peer sees exactly the one action with exactly the headers sent, or none."""
    before = len(wire.peer.received)
    try:
        wire.call(wire.client.send_action(name, [(key, value)]))
        sent = True
    except InvalidInput:
        sent = False
    wire.call(wire.client.send_action("Ping"))  # a round trip: everything before it arrived
    received = wire.peer.received[before:]
    assert [a.name for a in received] == ([name, "Ping"] if sent else ["Ping"])
    assert wire.peer.discarded_long_lines == 0
    if sent:
        headers = received[0].headers
        assert [k for k, _ in headers] == ["Action", "ActionID", key]
        # Asterisk skips blanks after the colon; nothing else may differ.
        assert headers[2][1] == value.lstrip(" ")


@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_a_decoded_message_is_the_value_of_its_headers(chunk: int) -> None:
    """Every recorded message, fed whole or in pieces, equals, hashes and prints as the
    message built from its headers, and none of its attributes can be set."""
    raws = list(_transcripts().messages())
    decoded = _fed_in(FrameDecoder(), BANNER + b"".join(raws), chunk)
    assert len(decoded) == len(raws)
    for message in decoded:
        built = AmiMessage(message.headers)
        assert message == built
        assert hash(message) == hash(built)
        assert repr(message) == repr(built) == f"AmiMessage(headers={message.headers!r})"
        assert message.as_dict() == dict(reversed(message.headers))
        for name in ("headers", "wire_bytes", "other"):
            with pytest.raises(AttributeError):
                setattr(message, name, ())


def test_repeated_and_odd_headers_keep_their_order_and_first_value() -> None:
    """A message with a name repeated (in any case) or a line that is no header keeps
    every header in wire order, and a lookup in another spelling gives the first of that name."""
    wire = b"Event: X\r\nChanVariable: a\r\nchanvariable: b\r\nno header\r\nCHANVARIABLE: c\r\n\r\n"
    (message,) = FrameDecoder().feed(BANNER + wire)
    assert message.headers == (
        ("Event", "X"),
        ("ChanVariable", "a"),
        ("chanvariable", "b"),
        ("Output", "no header"),
        ("CHANVARIABLE", "c"),
    )
    assert message.get("ChanVariable") == message.get("chanVARIABLE") == "a"
    assert message.first("chanVariable") == "a"
    assert message.first("Missing") is None
    assert message.get_all("chanvariable") == ["a", "b", "c"]
    assert message.any_value_in({"b"})
    assert not message.any_value_in({"z"})


def test_a_name_in_two_spellings_is_found_by_either_and_first_of_that_spelling() -> None:
    """A message holding ``event`` then ``Event`` answers each spelling with its own value
    and any other spelling with the first in wire order (the documented exception)."""
    (message,) = FrameDecoder().feed(
        b"Asterisk Call Manager/11.0.0\r\nevent: A\r\nEvent: B\r\nX: 1\r\n\r\n"
    )
    assert message.headers == (("event", "A"), ("Event", "B"), ("X", "1"))
    assert (message.get("event"), message.get("Event"), message.get("EVENT")) == ("A", "B", "A")
    assert message.get_all("EVENT") == ["A", "B"]


#: The header names in the order the fast path expects them: the module's own, so that
#: ``st.just`` keeps reaching that path whatever order it is given.
_STATUS_NAMES = list(_CONTACT_STATUS_NAMES)
#: Any value a line can hold: no LF (it ends the line) and no NUL (it becomes U+FFFD).
_LINE_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\x00"), max_size=12
)


class _WholeMatches:
    """A stand-in for the decoder's whole-message pattern that counts its matches."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.matched = 0

    def fullmatch(self, text: str) -> re.Match[str] | None:
        match = self.pattern.fullmatch(text)
        self.matched += match is not None
        return match


@settings(max_examples=300)
@given(
    values=st.lists(_LINE_TEXT, min_size=7, max_size=7),
    blanks=st.lists(st.sampled_from(["", " ", "  "]), min_size=7, max_size=7),
    names=st.just(_STATUS_NAMES) | st.permutations(_STATUS_NAMES),
    event=st.sampled_from(["ContactStatus", "ContactStatusDetail", "contactstatus"]),
    extra=st.sampled_from([[], ["Foo: bar"], ["AOR: again"], ["no header"]]),
)
def test_a_contact_status_decodes_as_the_general_parser_parses_it(
    values: list[str], blanks: list[str], names: list[str], event: str, extra: list[str]
) -> None:
    """A ContactStatus-like message (the storm's shape matched whole, or any other order,
    name, spacing or extra line) decodes to the headers, in order, that the line-by-line
    parser gives its lines; the storm's shape, and only it, takes the whole-message
    match."""
    lines = [f"Event: {event}"]
    lines += [f"{n}:{b}{v}" for n, b, v in zip(names, blanks, values, strict=True)] + extra
    whole = _WholeMatches(actions_module._CONTACT_STATUS)
    actions_module._CONTACT_STATUS = whole  # type: ignore[assignment]
    try:
        (message,) = FrameDecoder().feed(BANNER + "\r\n".join(lines).encode() + b"\r\n\r\n")
    finally:
        actions_module._CONTACT_STATUS = whole.pattern
    storm = event == "ContactStatus" and names == _STATUS_NAMES and not extra
    assert whole.matched == storm
    expected = parse_message_lines(lines)
    assert expected is not None
    assert message.headers == expected.headers
    first: dict[str, str] = {}
    for name, value in expected.headers:
        first.setdefault(name, value)
    assert message.as_dict() == first
