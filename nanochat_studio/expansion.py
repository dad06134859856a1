"""Gzip measured by what it expands to: a 570 KB file can hold 196 MB of text (a decompression bomb).

:class:`ExpansionMeter` wraps the stream an upload is read from: it passes the compressed bytes on
unchanged (storage keeps the file as sent) while inflating them on the side, counting the expanded bytes
and throwing them away, so memory stays at one chunk. Past ``cap`` expanded bytes it raises
:class:`ExpansionTooLarge` at once, before the rest is read. :func:`expanded_size` measures a file
already on disk the same way (a dataset fetched from a URL).

Concatenated gzip members (what ``cat a.gz b.gz`` makes) count as one stream, as readers treat them.
"""

from __future__ import annotations

import zlib
from os import PathLike
from typing import IO

CHUNK = 1 << 20
GZIP_WBITS = 16 + zlib.MAX_WBITS


class ExpansionTooLarge(ValueError):
    """The stream expands past the cap; ``cap`` and ``read`` (compressed bytes read so far) say where."""

    def __init__(self, cap: int, read: int) -> None:
        super().__init__(f"expands to more than {cap:,} bytes (stopped after {read:,} compressed bytes)")
        self.cap, self.read = cap, read


class BadGzip(ValueError):
    """Bytes that are not gzip."""


class ExpansionMeter:
    """``read`` over ``stream``, counting what the gzip bytes read so far expand to."""

    def __init__(self, stream: IO[bytes] | object, cap: int) -> None:
        self.stream, self.cap = stream, cap
        self.compressed = 0
        self.expanded = 0
        self._z = zlib.decompressobj(GZIP_WBITS)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)  # type: ignore[attr-defined]
        if data:
            self.compressed += len(data)
            self.feed(data)
        return data

    def feed(self, data: bytes) -> None:
        while data:
            self._in_member = True
            try:
                out = self._z.decompress(data, CHUNK)
            except zlib.error as exc:
                raise BadGzip(f"not a valid gzip file ({exc})") from None
            self.expanded += len(out)
            if self.expanded > self.cap:
                raise ExpansionTooLarge(self.cap, self.compressed)
            if self._z.eof:  # the member ended: the rest is the next member (or trailing zeros)
                data = self._z.unused_data + self._z.unconsumed_tail
                self._z = zlib.decompressobj(GZIP_WBITS)
                self._in_member = False
                if not data.strip(b"\0"):
                    return
            elif self._z.unconsumed_tail:
                data = self._z.unconsumed_tail
            else:
                return

    def finish(self) -> int:
        """The expanded size, once the whole stream was read; BadGzip if it stopped inside a member."""
        if self._in_member or self.compressed == 0:
            raise BadGzip("the gzip file is cut short" if self.compressed else "the gzip file is empty")
        return self.expanded

    _in_member = False


def expanded_size(path: str | PathLike, cap: int) -> int:
    """What the gzip file at ``path`` expands to; ExpansionTooLarge past ``cap``, BadGzip if broken."""
    with open(path, "rb") as fh:
        meter = ExpansionMeter(fh, cap)
        while meter.read(CHUNK):
            pass
    return meter.finish()
