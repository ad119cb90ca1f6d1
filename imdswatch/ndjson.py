"""Reading NDJSON input: a path or `-`, plain or gzip (recognised by its magic bytes, so a
compressed file without the .gz suffix works too), as numbered raw lines.

Lines are cut from large blocks rather than read one by one: at hundreds of thousands of
lines a second, per-line I/O calls would cost more than the JSON parsing.
"""

from __future__ import annotations

import io
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 1 << 20


class InputError(OSError):
    """The input cannot be opened or read; the message names it."""


def _open_raw(source: str) -> BinaryIO:
    if source == "-":
        return sys.stdin.buffer
    try:
        return open(source, "rb")  # noqa: SIM115 - closed by numbered_lines
    except OSError as exc:
        raise InputError(f"{source}: cannot open ({exc.strerror})") from None


def _is_gzip(raw: BinaryIO, source: str) -> bool:
    peek = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    return peek == b"\x1f\x8b" or (not peek and source.endswith(".gz"))


def _gunzip_blocks(raw: BinaryIO) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream (several members allowed, as `cat a.gz b.gz`
    makes). zlib checks each member's CRC and length itself; going through it directly
    rather than GzipFile saves a Python-level read loop and a second CRC pass."""
    d = zlib.decompressobj(wbits=31)
    started = False
    while True:
        chunk = raw.read(BLOCK)
        if not chunk:
            break
        while chunk:
            started = True
            out = d.decompress(chunk)
            if out:
                yield out
            if not d.eof:
                break
            chunk = d.unused_data.lstrip(b"\x00")  # padding between members is allowed
            d = zlib.decompressobj(wbits=31)
            started = False
    if started and not d.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _plain_blocks(raw: BinaryIO) -> Iterator[bytes]:
    while True:
        block = raw.read(BLOCK)
        if not block:
            return
        yield block


def numbered_lines(source: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line without its newline) for every non-empty line."""
    raw = _open_raw(source)
    blocks = _gunzip_blocks(raw) if _is_gzip(raw, source) else _plain_blocks(raw)
    lineno = 0
    tail = b""
    try:
        while True:
            try:
                block = next(blocks, b"")
            except (OSError, EOFError, zlib.error) as exc:
                raise InputError(f"{source}: read failed after line {lineno} ({exc})") from None
            if not block:
                break
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lineno += 1
                if line and not line.isspace():
                    yield lineno, line
        if tail and not tail.isspace():
            yield lineno + 1, tail
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()
