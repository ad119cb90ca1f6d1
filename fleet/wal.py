"""The fleet scorer's write-ahead log: an acknowledged batch is on disk before its 200.

Records go to numbered segment files `<first seq>.wal` in one directory, each record a
header (payload length, CRC-32 of the payload, sequence number) and the payload (the
batch's NDJSON lines). `append` writes under a lock, so the log's order is the order the
scorer consumes; `sync` is a group commit: one fsync covers every record written before it,
so concurrent ingests share fsyncs instead of queueing one each.

Truncation follows the state: the scorer saves a state that contains every record before
some sequence number, then `drop_before` deletes the segments wholly before it. `rotate`
starts a new segment at each checkpoint so that old ones can go.

A record that was being written when the process died fails its length or CRC check at
the next start: it was never acknowledged (the fsync comes after the write), so replay
stops there and the segment is cut back to its last whole record.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("imdswatch.fleet.wal")

HEADER = struct.Struct("<IIQ")  # payload length, crc32, sequence number
MAX_RECORD = 1 << 30


class WalError(OSError):
    """The log cannot be opened or written; the message names the directory."""


class WriteAheadLog:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WalError(f"{self.dir}: cannot create the write-ahead log ({exc.strerror})") \
                from None
        self._lock = threading.Lock()  # order of records, the current segment
        self._sync_lock = threading.Lock()  # one fsync at a time; taken before _lock
        self._fd = -1
        self._next = 0
        self._written = -1
        self._synced = -1
        self.bytes = 0

    # -- start: read back what is on disk ---------------------------------------------------
    def segments(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("*.wal"):
            try:
                out.append((int(p.stem), p))
            except ValueError:
                continue
        return sorted(out)

    def replay(self, start: int) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) of every whole record with seq >= `start`, in order. Cuts a torn
        tail off the last segment. Call once, before `open`."""
        segs = self.segments()
        last_seq = start - 1
        for i, (_, path) in enumerate(segs):
            good = 0
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + HEADER.size <= len(data):
                length, crc, seq = HEADER.unpack_from(data, pos)
                end = pos + HEADER.size + length
                if length > MAX_RECORD or end > len(data):
                    break
                payload = data[pos + HEADER.size:end]
                if zlib.crc32(payload) != crc:
                    break
                pos = good = end
                last_seq = max(last_seq, seq)
                if seq >= start:
                    yield seq, payload
            if good < len(data):
                if i == len(segs) - 1:
                    log.warning("%s: cutting a torn record at byte %d (it was never "
                                "acknowledged)", path, good)
                    with open(path, "r+b") as f:
                        f.truncate(good)
                        os.fsync(f.fileno())
                else:
                    log.error("%s: corrupt record at byte %d; the rest of this segment is "
                              "skipped", path, good)
        self._next = max(self._next, last_seq + 1, start)

    def open(self) -> None:
        """Start a fresh segment for new records (after `replay`)."""
        with self._sync_lock, self._lock:
            self._open_segment()

    def _open_segment(self) -> None:
        path = self.dir / f"{self._next:016d}.wal"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        _fsync_dir(self.dir)
        self._written = self._synced = self._next - 1

    # -- ingest ------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next

    def append_locked(self, payload: bytes) -> int:
        """Write one record; the caller holds `lock()`. Returns its sequence number."""
        seq = self._next
        record = HEADER.pack(len(payload), zlib.crc32(payload), seq) + payload
        view = memoryview(record)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._next = seq + 1
        self._written = seq
        self.bytes += len(record)
        return seq

    def lock(self) -> threading.Lock:
        return self._lock

    def sync(self, seq: int) -> None:
        """Return once record `seq` is on disk (fsyncing if no one else has yet)."""
        if self._synced >= seq:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            with self._lock:
                target, fd = self._written, self._fd
            os.fsync(fd)
            self._synced = target

    # -- checkpoints -------------------------------------------------------------------------
    def rotate(self) -> None:
        """Close the current segment (on disk) and start the next one."""
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
            self._open_segment()

    def drop_before(self, seq: int) -> int:
        """Delete segments whose records are all before `seq` (saved in a state); returns
        the bytes freed."""
        segs = self.segments()
        freed = 0
        for (_, path), (next_first, _) in zip(segs, segs[1:], strict=False):
            if next_first <= seq:
                freed += path.stat().st_size
                path.unlink()
        if freed:
            _fsync_dir(self.dir)
            self.bytes = max(0, self.bytes - freed)
        return freed

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.segments())

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

