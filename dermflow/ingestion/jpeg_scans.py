"""The part of a progressive JPEG that a grayscale decode uses: the same bytes without the scans
that carry only chroma.

The hash recipe (`dermflow.ingestion.images`) decodes JPEGs in grayscale. For a YCbCr JPEG,
libjpeg's grayscale output is the luma component alone, but it still entropy-decodes every scan,
and a progressive JPEG carries its chroma AC coefficients in scans of their own. Dropping those
scans leaves the grayscale pixels bit for bit the same (checked on all 1,811 progressive atlas20
JPEGs; the tests check every 4th) and saves about a quarter of the decode (`bench/README.md`, issue 18). 87 % of atlas20's JPEGs
are progressive.

`luma_scans` returns the body unchanged unless it is sure: a progressive JPEG with three
components that libjpeg reads as YCbCr, whose segments all parse, from SOI to EOI, with every
dropped scan's header valid against the frame and the Huffman tables defined before it. A body
cut anywhere has no EOI, so it comes back whole and the decode still finds the cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SOI, EOI, SOS, DHT, SOF_PROGRESSIVE = 0xD8, 0xD9, 0xDA, 0xC4, 0xC2
APP0, APP14 = 0xE0, 0xEE
# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
RGB_COMPONENT_IDS = (82, 71, 66)  # "R", "G", "B": what libjpeg reads as RGB without markers


class JpegParseError(ValueError):
    """The bytes are not a JPEG this module is sure about (the body is then decoded whole)."""


@dataclass
class _Frame:
    """What the segments before a scan said: the frame's components and the colour markers."""

    marker: int = 0
    component_ids: tuple[int, ...] = ()
    jfif: bool = False
    adobe_transform: int | None = None
    huffman_tables: set[tuple[int, int]] = field(default_factory=set)  # (class 0 DC / 1 AC, id)

    def is_ycbcr(self) -> bool:
        """libjpeg's guess of a 3-component colour space reads YCbCr (conservatively: an Adobe
        marker that says anything but YCbCr, or "R", "G", "B" ids, is not)."""
        if len(self.component_ids) != 3:
            return False
        if self.adobe_transform is not None:
            return self.adobe_transform == 1
        return self.jfif or self.component_ids != RGB_COMPONENT_IDS


def luma_scans(body: bytes) -> bytes:
    """`body` without its chroma-only scans, if it is a progressive YCbCr JPEG; else `body`."""
    if body[:2] != b"\xff\xd8":
        return body
    try:
        kept, dropped = _split_scans(body)
    except (JpegParseError, IndexError):  # IndexError: a segment runs past the end (a cut body)
        return body
    return b"".join(kept) if dropped else body


def _split_scans(body: bytes) -> tuple[list[bytes], int]:
    """The segments to keep, in order, and how many chroma-only scans were left out."""
    frame = _Frame()
    kept: list[bytes] = [body[:2]]
    dropped = 0
    position = 2
    while True:
        position = _skip_fill_bytes(body, position)
        marker = body[position + 1]
        if marker == EOI:
            kept.append(body[position:position + 2])
            return kept, dropped
        end, header = _segment(body, position, marker)
        _note_segment(frame, marker, header)
        if marker == SOS:
            if frame.marker != SOF_PROGRESSIVE or not frame.is_ycbcr():
                return [body], 0  # every scan is needed: no need to walk the rest
            end = _entropy_end(body, end)
            if _is_chroma_only(frame, header):
                dropped += 1
                position = end
                continue
        kept.append(body[position:end])
        position = end


def _skip_fill_bytes(body: bytes, position: int) -> int:
    if body[position] != 0xFF:
        raise JpegParseError(f"no marker at byte {position}")
    while body[position + 1] == 0xFF:  # a marker may be preceded by any number of 0xFF
        position += 1
    return position


def _segment(body: bytes, position: int, marker: int) -> tuple[int, bytes]:
    """The end of the marker segment at `position` and its header (after the length field)."""
    if marker == SOI or marker == 0x01 or 0xD0 <= marker <= 0xD7:
        raise JpegParseError(f"unexpected standalone marker 0x{marker:02x} at byte {position}")
    length = int.from_bytes(body[position + 2:position + 4], "big")
    end = position + 2 + length
    if length < 2 or end > len(body):
        raise JpegParseError(f"segment 0x{marker:02x} at byte {position} runs past the end")
    return end, body[position + 4:end]


# In entropy-coded data every 0xFF is followed by 0x00 (stuffing), a restart marker (D0-D7) or a
# fill byte (0xFF); any other byte after it starts the next marker.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _entropy_end(body: bytes, position: int) -> int:
    """Where the entropy-coded data starting at `position` ends: the next marker that is neither
    a stuffed 0xFF00 nor a restart marker (JpegParseError where none follows: the body is cut)."""
    found = _MARKER_AFTER_SCAN.search(body, position)
    if found is None:
        raise JpegParseError("a scan runs to the end of the body")
    return found.start()


def _note_segment(frame: _Frame, marker: int, header: bytes) -> None:
    if marker in SOF_MARKERS:
        if frame.marker:
            raise JpegParseError("a second frame header")
        count = header[5]
        if len(header) != 6 + 3 * count:
            raise JpegParseError("frame header of the wrong length")
        frame.marker = marker
        frame.component_ids = tuple(header[6 + 3 * index] for index in range(count))
    elif marker == APP0 and header[:5] == b"JFIF\x00":
        frame.jfif = True
    elif marker == APP14 and header[:5] == b"Adobe" and len(header) >= 12:
        frame.adobe_transform = header[11]
    elif marker == DHT:
        frame.huffman_tables |= _huffman_tables(header)


def _huffman_tables(header: bytes) -> set[tuple[int, int]]:
    """The (class, id) of each table a DHT segment defines."""
    tables, offset = set(), 0
    while offset < len(header):
        table_class, table_id = header[offset] >> 4, header[offset] & 0x0F
        if table_class > 1 or table_id > 3:
            raise JpegParseError("Huffman table of an unknown class or id")
        tables.add((table_class, table_id))
        offset += 17 + sum(header[offset + 1:offset + 17])
    if offset != len(header):
        raise JpegParseError("Huffman table segment of the wrong length")
    return tables


def _is_chroma_only(frame: _Frame, header: bytes) -> bool:
    """A scan of a progressive YCbCr frame that a grayscale decode does not use; raises if such a
    scan's header is not one libjpeg would accept, so the body is decoded whole and libjpeg
    judges it."""
    count = header[0]
    if count != 1 or header[1] == frame.component_ids[0]:
        return False
    if len(header) != 6 or header[1] not in frame.component_ids[1:]:
        raise JpegParseError("chroma scan header does not match the frame")
    dc_table, ac_table = header[2] >> 4, header[2] & 0x0F
    start, end, high, low = header[3], header[4], header[5] >> 4, header[5] & 0x0F
    if not (start <= end <= 63 and high <= 13 and low <= 13 and (start > 0 or end == 0)):
        raise JpegParseError("chroma scan of invalid progression parameters")
    needed = (1, ac_table) if start > 0 else ((0, dc_table) if high == 0 else None)
    if needed is not None and needed not in frame.huffman_tables:
        raise JpegParseError("chroma scan uses a Huffman table not defined before it")
    return True
