"""Pieces: bytes edited by splicing views, written without a joined copy."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.targets import pieces
from provisioner.targets.pieces import Pieces

#: A splice: where (two fractions of the length, ordered) and what goes in.
_SPLICE = st.tuples(st.floats(0, 1), st.floats(0, 1), st.binary(max_size=20))


def _bounds(length: int, a: float, b: float) -> tuple[int, int]:
    start, stop = sorted((int(a * length), int(b * length)))
    return start, stop


@given(st.binary(max_size=200), st.lists(_SPLICE, max_size=30))
def test_splices_give_the_bytes_splicing_bytes_gives(
    data: bytes, splices: list[tuple[float, float, bytes]]
) -> None:
    """Any run of splices holds, writes and compares as the same splices of plain bytes."""
    held, plain = Pieces.of(data), data
    for a, b, new in splices:
        start, stop = _bounds(len(plain), a, b)
        held, plain = held.splice(start, stop, new), plain[:start] + new + plain[stop:]
        assert len(held) == len(plain)
        assert held == plain
        assert held == Pieces.of(plain)
    out = io.BytesIO()
    held.write_to(out)
    assert out.getvalue() == plain == held.tobytes()


def test_a_splice_copies_no_old_byte() -> None:
    """The bytes around the splice are views of the old buffer, not copies."""
    data = bytes(range(256)) * 4
    held = Pieces.of(data).splice(100, 110, b"new")
    assert len(held.parts) == 3
    assert all(isinstance(p, memoryview) and p.obj is data for p in (held.parts[0], held.parts[2]))


def test_many_pieces_are_joined_into_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_PARTS pieces a splice joins them into one buffer (old buffers let go)."""
    monkeypatch.setattr(pieces, "MAX_PARTS", 8)
    held = Pieces.of(b"a" * 100)
    for i in range(10):
        held = held.splice(i * 5, i * 5 + 1, b"b")
        assert len(held.parts) <= 8
    assert held == b"".join(b"b" + b"a" * 4 for _ in range(10)) + b"a" * 50


def test_unequal_lengths_or_bytes_compare_unequal() -> None:
    """Equality is by content: another length, another byte, or not bytes at all."""
    held = Pieces.of(b"abcdef").splice(2, 3, b"X")
    assert held == b"abXdef"
    assert held != b"abXde"
    assert held != b"abYdef"
    assert held != "abXdef"
    assert Pieces.of(b"abXdef") == held


def test_a_splice_outside_the_bytes_is_refused() -> None:
    """A range outside the bytes is an error, not a silent clamp."""
    with pytest.raises(ValueError, match="outside 3 bytes"):
        Pieces.of(b"abc").splice(2, 5, b"")


@given(st.binary(max_size=200), st.lists(_SPLICE, max_size=10), st.integers(1, 64))
def test_slices_hold_the_bytes_in_order_none_longer_than_asked(
    data: bytes, splices: list[tuple[float, float, bytes]], size: int
) -> None:
    """The slices of any spliced bytes, joined, are those bytes, each at most ``size``."""
    held = Pieces.of(data)
    for a, b, new in splices:
        start, stop = _bounds(len(held), a, b)
        held = held.splice(start, stop, new)
    parts = list(held.slices(size))
    assert all(0 < len(part) <= size for part in parts)
    assert b"".join(parts) == held.tobytes()
