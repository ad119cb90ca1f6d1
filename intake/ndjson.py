"""Reading NDJSON input: a path (a file, a FIFO, `<(process substitution)`) or `-`, plain or
gzip (recognised by its magic bytes, so a compressed file without the .gz suffix works
too), as numbered raw lines.

Lines are cut from large blocks rather than read one by one: at hundreds of thousands of
lines a second, per-line I/O calls would cost more than the JSON parsing. A line longer
than `MAX_LINE_BYTES` is not kept: its bytes are dropped as they arrive (the cost stays
linear and the memory bounded however long it is) and it comes out as `(number, None)`
so the caller reports it.

`Interrupt` lets a signal handler stop a read: the handler calls `Interrupt.request`, the
reader stops at the next block boundary (so no line is half-processed), and a read that
is blocked waiting for input (a quiet pipe) is abandoned at once.

A gzip regular file is decompressed by a thread a few blocks ahead of the reader: zlib
releases the interpreter lock while it inflates, so on a machine with a second core the
decompression (a sixth of a replay's time) runs beside the parsing and scoring instead of
before it. Pipes and terminals keep the single-threaded path, where a blocked read is the
reader's own and a signal can abandon it.
"""

from __future__ import annotations

import os
import queue
import stat
import sys
import threading
import zlib
from collections.abc import Generator, Iterator
from typing import BinaryIO

BLOCK = 1 << 20
# A whole `_search` response page of 10,000 hits fits; anything longer is refused.
MAX_LINE_BYTES = 64 << 20


class InputError(OSError):
    """The input cannot be opened or read; the message names it."""


class Interrupted(Exception):
    """The read was stopped on request (`signum`: the signal, None for another cause)."""

    def __init__(self, signum: int | None) -> None:
        super().__init__("stopped" if signum is None else f"interrupted by signal {signum}")
        self.signum = signum


class Interrupt:
    """A stop request shared by a signal handler (or an output that failed) and the
    reader."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.blocked = False  # inside a read that may wait for input

    def request(self, signum: int | None = None) -> None:
        """Called from a signal handler (always in the main thread, between bytecodes) or
        by the program itself."""
        self.requested = True
        if signum is not None:
            self.signum = signum
        if self.blocked:
            raise Interrupted(signum)


def _open_raw(source: str) -> BinaryIO:
    if source == "-":
        stdin = sys.stdin
        if stdin is None or getattr(stdin, "buffer", None) is None:
            raise InputError("standard input is closed")
        return stdin.buffer
    try:
        st = os.stat(source)
    except OSError as exc:
        raise InputError(f"{source}: cannot open ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{source}: is a directory")
    try:
        return open(source, "rb")  # noqa: SIM115 - closed by numbered_lines
    except OSError as exc:
        raise InputError(f"{source}: cannot open ({exc.strerror})") from None


def _reads(raw: BinaryIO, stop: Interrupt | None) -> Iterator[bytes]:
    """Chunks as they arrive (read1: a pipe's data is used as soon as it is there)."""
    read = getattr(raw, "read1", raw.read)
    while True:
        if stop is not None:
            if stop.requested:
                raise Interrupted(stop.signum)
            stop.blocked = True
            try:
                chunk = read(BLOCK)
            finally:
                stop.blocked = False
        else:
            chunk = read(BLOCK)
        if not chunk:
            return
        yield chunk


def _gunzip(chunks: Iterator[bytes], first: bytes, block: int = BLOCK) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream (several members allowed, as `cat a.gz b.gz`
    makes). zlib checks each member's CRC and length itself."""
    d = zlib.decompressobj(wbits=31)
    started = False
    chunk = first
    while True:
        while chunk:
            started = True
            # Bounded output per call: a small gzip bomb must not become one huge block.
            out = d.decompress(chunk, block)
            if out:
                yield out
            while d.unconsumed_tail and not d.eof:
                out = d.decompress(d.unconsumed_tail, block)
                if out:
                    yield out
            if not d.eof:
                break
            chunk = d.unused_data.lstrip(b"\x00")  # padding between members is allowed
            d = zlib.decompressobj(wbits=31)
            started = False
        chunk = next(chunks, b"")
        if not chunk:
            break
    if started and not d.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _regular(raw: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no descriptor (an in-memory stream)
        return False


# Decompressed blocks held ahead of the reader: bounded memory (PREFETCH x THREAD_BLOCK).
# Each block costs the thread one hand-over of the interpreter lock, during which the
# reader waits for the thread to be scheduled: on a busy machine that wait is long, so
# the blocks are large (a few thousand lines each).
PREFETCH = 3
THREAD_BLOCK = 4 * BLOCK
_END = object()


class _Failed:
    """An exception the producing thread met, re-raised in the reader at its place."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetched(blocks: Iterator[bytes], stop: Interrupt | None) -> Iterator[bytes]:
    """`blocks`, produced by a thread at most PREFETCH blocks ahead, in order; an error
    of the producer is raised here after the blocks before it. Closing this generator
    stops the thread (it finishes at most the block it is making)."""
    q: queue.Queue = queue.Queue(PREFETCH)
    done = threading.Event()

    def put(item: object) -> bool:
        while not done.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            put(_Failed(exc))
            return
        put(_END)

    worker = threading.Thread(target=produce, name="imdswatch-gunzip", daemon=True)
    worker.start()
    try:
        while True:
            if stop is None:
                item = q.get()
            else:
                if stop.requested:
                    raise Interrupted(stop.signum)
                stop.blocked = True  # waiting for input, as in _reads
                try:
                    item = q.get()
                finally:
                    stop.blocked = False
            if item is _END:
                return
            if item.__class__ is _Failed:
                raise item.exc  # type: ignore[union-attr]
            yield item  # type: ignore[misc]
    finally:
        done.set()
        worker.join()


def _blocks(raw: BinaryIO, stop: Interrupt | None) -> Generator[bytes, None, None]:
    chunks = _reads(raw, stop)
    first = b""
    # A pipe may deliver a single byte first: gather two to see the gzip magic.
    while len(first) < 2:
        more = next(chunks, b"")
        if not more:
            break
        first += more
    if first[:2] == b"\x1f\x8b":
        if _regular(raw):
            # Reads of a regular file never wait for input: the thread reads without `stop`
            # and the reader checks it between blocks.
            yield from _prefetched(_gunzip(_reads(raw, None), first, THREAD_BLOCK), stop)
        else:
            yield from _gunzip(chunks, first)
        return
    if first:
        yield first
    yield from chunks


def numbered_lines(source: str, stop: Interrupt | None = None,
                   max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, line without its newline) for every non-blank line; None in
    place of a line longer than `max_line`. Raises InputError when the input cannot be
    read, Interrupted when `stop` was requested."""
    raw = _open_raw(source)
    blocks = _blocks(raw, stop)
    lineno = 0
    parts: list[bytes] = []  # the current unfinished line, kept as pieces (linear cost)
    size = 0
    too_long = False
    try:
        while True:
            try:
                block = next(blocks, b"")
            except Interrupted:
                raise
            except (OSError, EOFError, zlib.error, ValueError) as exc:
                raise InputError(f"{source}: read failed after line {lineno} ({exc})") from None
            if not block:
                break
            # Lines are cut at each newline `find` locates (memchr), not by `split`, which
            # compares every byte in a loop of its own.
            find = block.find
            start = 0
            end = find(b"\n")
            if end >= 0:
                # The first piece ends the line that earlier blocks began.
                head = block[:end]
                line: bytes | None = head
                if too_long or size + end > max_line:
                    line = None
                elif parts:
                    parts.append(head)
                    line = b"".join(parts)
                parts.clear()
                size = 0
                too_long = False
                # Pieces after the first lie within this block: only a block longer
                # than max_line can hold one that is too long.
                check = len(block) > max_line
                while True:
                    lineno += 1
                    if line is None or (check and len(line) > max_line):
                        yield lineno, None
                    elif line and not line.isspace():
                        yield lineno, line
                    start = end + 1
                    end = find(b"\n", start)
                    if end < 0:
                        break
                    line = block[start:end]
            tail = block[start:]
            if tail:
                if too_long or size + len(tail) > max_line:
                    too_long = True
                    parts.clear()
                else:
                    parts.append(tail)
                size += len(tail)
        if too_long:
            yield lineno + 1, None
        elif parts:
            line = b"".join(parts)
            if not line.isspace():
                yield lineno + 1, line
    finally:
        blocks.close()  # stops a decompressing thread before its file is closed
        if source != "-":
            raw.close()
