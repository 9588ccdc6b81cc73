"""Hostile inputs built small and fast: a pixel-bomb PNG and a gzip bomb."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def pixel_bomb_png(width: int = 12000, height: int = 12000) -> bytes:
    """A valid grayscale PNG of width x height black pixels, a few hundred KB on disk (it is
    compressed row by row, never held decoded)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def gzip_bomb(decompressed_bytes: int, line: bytes = b"a,b,c,d\n") -> bytes:
    """`decompressed_bytes` of repeated `line` as a gzip stream (about 1/1000 of that size)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    block = line * (2**20 // len(line))
    parts = [compressor.compress(block) for _ in range(decompressed_bytes // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)
