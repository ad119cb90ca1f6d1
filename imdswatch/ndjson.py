"""Reading NDJSON input: a path or `-`, plain or gzip (recognised by its magic bytes, so a
compressed file without the .gz suffix works too), as numbered raw lines.

Lines are cut from large blocks rather than read one by one: at hundreds of thousands of
lines a second, per-line I/O calls would cost more than the JSON parsing.
"""

from __future__ import annotations

import gzip
import io
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 1 << 20


class InputError(OSError):
    """The input cannot be opened or read; the message names it."""


def open_binary(source: str) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, underlying file): close both when done."""
    if source == "-":
        raw: BinaryIO = sys.stdin.buffer
    else:
        try:
            raw = open(source, "rb")  # noqa: SIM115 - closed by the caller via the wrapper
        except OSError as exc:
            raise InputError(f"{source}: cannot open ({exc.strerror})") from None
    peek = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    if peek == b"\x1f\x8b" or (not peek and source.endswith(".gz")):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    return raw, raw


def numbered_lines(source: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line without its newline) for every non-empty line."""
    stream, raw = open_binary(source)
    lineno = 0
    tail = b""
    try:
        while True:
            try:
                block = stream.read(BLOCK)
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
            stream.close()
            raw.close()
