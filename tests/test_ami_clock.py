"""The estimate of Asterisk's clock from the stamps it sends (provisioner.ami.clock)."""

from __future__ import annotations

import math

import pytest

from provisioner.ami.clock import MOVE, AsteriskClock, event_tv

from .amipeer import load_transcripts


def test_with_no_stamp_seen_asterisks_time_is_this_hosts() -> None:
    """Before any stamp, the offset is unknown and Asterisk's time is taken for this host's."""
    clock = AsteriskClock()
    assert clock.offset is None
    assert clock.now(1000.0) == 1000.0


def test_the_least_delayed_stamp_sets_the_offset() -> None:
    """Of stamps seen late by varying delays, the offset is the one least delayed
    (stamp minus arrival, the largest): a queue's delay lowers no estimate."""
    clock = AsteriskClock()
    clock.see(1600.0, 1000.05)  # 600 s ahead, seen 50 ms late
    clock.see(1601.0, 1003.0)  # seen 2 s late, behind a storm
    clock.see_text("1602.000000", 1002.01)
    assert clock.offset == pytest.approx(599.99)
    assert clock.now(2000.0) == pytest.approx(2599.99)


def test_a_clock_set_right_is_followed_within_two_windows() -> None:
    """An offset that shrinks (Asterisk's clock set right) replaces the old one once the
    old one's window and the next have passed; not before."""
    clock = AsteriskClock(window=60.0)
    clock.see(1600.0, 1000.0)
    clock.see(1065.0, 1065.0)  # set right; the last window's 600 s still stands
    assert clock.offset == pytest.approx(600.0)
    clock.see(1130.0, 1130.0)
    assert clock.offset == pytest.approx(0.0)


def test_an_old_window_says_nothing_of_now() -> None:
    """After a silence longer than a window, the first stamp alone sets the offset."""
    clock = AsteriskClock(window=60.0)
    clock.see(1600.0, 1000.0)
    clock.see(4400.0, 5000.0)
    assert clock.offset == pytest.approx(-600.0)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-5", "1e12", "", "N/A", "1e400"])
def test_a_stamp_that_is_no_time_is_ignored(text: str) -> None:
    """A Timestamp that is not a number, or no date (before 1970, past year 9999), is
    ignored: the offset stays unknown."""
    clock = AsteriskClock()
    clock.see_text(text, 1000.0)
    clock.see(float(text) if text not in ("", "N/A") else math.nan, 1000.0)
    assert clock.offset is None


def test_a_move_is_told_when_first_known_and_past_the_threshold_only() -> None:
    """``on_move`` gets the estimate when first known, and again only once it moved by
    more than ``MOVE`` seconds from the one it last got."""
    told: list[float] = []
    clock = AsteriskClock()
    clock.on_move = told.append
    clock.see(1000.0, 1000.5)
    clock.see(1000.0, 1000.2)
    clock.see(1002.0, 1000.0)
    assert told == pytest.approx([-0.5, 2.0])
    assert MOVE < 2.5


def test_event_tv_of_the_recorded_security_events_is_their_timestamp() -> None:
    """The EventTV of every recorded event that has one is its Timestamp, to the
    millisecond (what Asterisk prints); an EventTV with no offset, or none, is no time."""
    seen = 0
    for message in load_transcripts().messages():
        text = message.decode()
        headers = dict(line.split(": ", 1) for line in text.split("\r\n") if ": " in line)
        if "EventTV" in headers and "Timestamp" in headers:
            tv = event_tv(headers["EventTV"])
            assert tv is not None
            assert abs(tv - float(headers["Timestamp"])) < 0.002
            seen += 1
    assert seen > 5
    assert event_tv("2026-11-24T23:51:45.410") is None
    assert event_tv("") is None
    assert event_tv("yesterday") is None


def test_a_reset_clock_knows_nothing_and_tells_the_next_stamp() -> None:
    """After ``reset`` the offset is unknown, and the next stamp is told as a first one."""
    told: list[float] = []
    clock = AsteriskClock()
    clock.on_move = told.append
    clock.see(1600.0, 1000.0)
    clock.reset()
    assert clock.offset is None
    clock.see(1000.0, 1000.0)
    assert told == pytest.approx([600.0, 0.0])
    assert clock.offset == pytest.approx(0.0)
