"""A file's bytes held as pieces, so that one edit does not copy all of them.

At 100k users the config file is about 62 MB.  Replacing one user's chunk by joining
the bytes before it, the new chunk and the bytes after it copies all 62 MB into a new
buffer (45-55 ms on the 2-core lab VM, and as much again to free the old one), only for
the write to copy them once more into the page cache.  :class:`Pieces` keeps the edited
bytes as views of the buffers they came from around the new chunk: a splice costs a few
views, and the write hands each piece to the kernel.  Pieces are joined into one buffer
again when there are more than :data:`MAX_PARTS` (one join every few hundred edits), or
when a caller asks for the bytes (:meth:`Pieces.tobytes`, kept once made).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import BinaryIO

__all__ = ["MAX_PARTS", "Pieces"]

#: More pieces than this are joined into one buffer (a bound on the cost of a splice and
#: of a write, and on how many old buffers the views keep alive).
MAX_PARTS = 512


class Pieces:
    """Immutable bytes as a sequence of buffers (``bytes`` or read-only views of bytes)."""

    __slots__ = ("_ends", "_joined", "_parts")

    def __init__(self, parts: Iterable[bytes | memoryview]) -> None:
        self._parts: tuple[bytes | memoryview, ...] = tuple(p for p in parts if len(p))
        #: Where each part ends, counted from the start of the whole.
        self._ends: tuple[int, ...] = tuple(accumulate(map(len, self._parts)))
        self._joined: bytes | None = None
        if len(self._parts) == 1 and isinstance(self._parts[0], bytes):
            self._joined = self._parts[0]

    @classmethod
    def of(cls, data: bytes | Pieces) -> Pieces:
        """``data`` as pieces (pieces as they are)."""
        return data if isinstance(data, Pieces) else cls((data,))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def parts(self) -> tuple[bytes | memoryview, ...]:
        return self._parts

    def splice(self, start: int, stop: int, new: bytes) -> Pieces:
        """These bytes with ``[start:stop)`` replaced by ``new`` (``0 <= start <= stop <=
        len``); no byte is copied unless the result would have more than
        :data:`MAX_PARTS` pieces, when it is joined into one buffer."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"splice [{start}:{stop}) outside {len(self)} bytes")
        parts: list[bytes | memoryview] = [*self._views(0, start), new]
        parts += self._views(stop, len(self))
        if len(parts) > MAX_PARTS:
            return Pieces((b"".join(parts),))
        return Pieces(parts)

    def tobytes(self) -> bytes:
        """The bytes, joined once and kept."""
        if self._joined is None:
            self._joined = b"".join(self._parts)
            # From now on one buffer: the old buffers the views held are let go.
            self._parts, self._ends = (self._joined,), (len(self._joined),)
        return self._joined

    def write_to(self, handle: BinaryIO) -> None:
        """Write the bytes to ``handle``, piece by piece (no joined copy)."""
        for part in self._parts:
            handle.write(part)

    def slices(self, size: int) -> Iterator[bytes | memoryview]:
        """The bytes in order, as buffers of at most ``size`` bytes (views: no copy); a
        piece's end also ends a buffer."""
        for part in self._parts:
            if len(part) <= size:
                yield part
                continue
            view = memoryview(part)
            for start in range(0, len(view), size):
                yield view[start : start + size]

    def _views(self, start: int, stop: int) -> list[memoryview]:
        """Views of the parts covering ``[start:stop)``, cut to it."""
        views: list[memoryview] = []
        index = bisect_right(self._ends, start)
        while start < stop:
            part = self._parts[index]
            begin = self._ends[index] - len(part)
            end = min(stop, self._ends[index])
            views.append(memoryview(part)[start - begin : end - begin])
            start = end
            index += 1
        return views

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pieces):
            return other is self or (len(other) == len(self) and other.tobytes() == self)
        if not isinstance(other, bytes):
            return NotImplemented
        if len(other) != len(self):
            return False
        if self._joined is not None:
            return self._joined == other
        # bytes.startswith compares a view with memcmp; == on memoryviews goes byte by byte.
        offsets = (end - len(part) for part, end in zip(self._parts, self._ends, strict=True))
        return all(map(other.startswith, self._parts, offsets))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Pieces({len(self)} bytes in {len(self._parts)} parts)"
