# No network here: gzip files on disk only.
"""A gzip regular file is decompressed by a thread ahead of the reader
(intake.ndjson._prefetched): same lines in the same order as the single-threaded path,
errors raised after the lines before them, and no thread left behind by a reader that
stops early."""

import gzip
import threading

import pytest

from intake import ndjson
from intake.ndjson import InputError, Interrupt, Interrupted, numbered_lines


def _lines(n):
    # Many lines: more decompressed blocks than the prefetch queue holds.
    return [b'{"n": %d, "pad": "%s"}' % (i, b"x" * (i % 300)) for i in range(n)]


def _gunzip_threads():
    return [t for t in threading.enumerate() if t.name == "imdswatch-gunzip"]


def test_threaded_gzip_reads_exactly_the_lines_of_the_plain_file(tmp_path):
    lines = _lines(150_000)
    plain = tmp_path / "t.ndjson"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    gz = tmp_path / "t.ndjson.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes(), 1) + gzip.compress(b"last\n"))
    got = list(numbered_lines(str(gz)))
    assert len(plain.read_bytes()) > (ndjson.PREFETCH + 2) * ndjson.THREAD_BLOCK
    assert got == [*list(numbered_lines(str(plain))), (len(lines) + 1, b"last")]
    assert not _gunzip_threads()


def test_an_error_midway_comes_after_the_lines_before_it(tmp_path):
    data = gzip.compress(b"\n".join(_lines(60_000)) + b"\n", 1)
    gz = tmp_path / "cut.ndjson.gz"
    gz.write_bytes(data[: len(data) // 2])
    seen = 0
    with pytest.raises(InputError, match="read failed after line"):
        for n, _ in numbered_lines(str(gz)):
            assert n == seen + 1
            seen = n
    assert seen > 10_000
    assert not _gunzip_threads()


def test_a_reader_that_stops_early_leaves_no_thread(tmp_path):
    gz = tmp_path / "t.ndjson.gz"
    gz.write_bytes(gzip.compress(b"\n".join(_lines(60_000)), 1))
    it = numbered_lines(str(gz))
    assert next(it)[0] == 1
    it.close()
    assert not _gunzip_threads()


def test_a_stop_request_ends_the_read_at_a_block_boundary(tmp_path):
    gz = tmp_path / "t.ndjson.gz"
    gz.write_bytes(gzip.compress(b"\n".join(_lines(60_000)), 1))
    stop = Interrupt()
    n = 0
    with pytest.raises(Interrupted):
        for n, _ in numbered_lines(str(gz), stop):
            if n == 10:
                stop.request(2)
    assert 10 <= n < 60_000
    assert not _gunzip_threads()


def test_a_corrupt_member_names_the_file(tmp_path):
    gz = tmp_path / "bad.gz"
    good = gzip.compress(b"\n".join(_lines(1000)))
    gz.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:])
    with pytest.raises(InputError, match="bad.gz"):
        list(numbered_lines(str(gz)))
    assert not _gunzip_threads()
