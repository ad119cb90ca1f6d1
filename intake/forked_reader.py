"""The replay's reading in a second process, so that it runs on a second core beside the
scoring.

Reading a trace (gzip, the typed decode, `read_doc`) and scoring its events cost about the
same; in one interpreter they add up, whatever either is made to cost. The child reads
exactly as an in-process reading would (`intake.reader.read_events`: the one parser, its
rules and reports), and hands the parent every Event in batches; the parent rebuilds them
and scores them through the one `Scorer.process`.

The hand-over is what decides whether this pays (turning whole Events into bytes and back
costs more than scoring them), so a batch carries:
- per event only what changes from one call to the next (time, pids, event id, line
  number) and an index into a table of the fields that repeat for a caller (process,
  user, host, container, request), each row of which is sent once, when first used;
- the raw lines, which only an alert ever decodes (`Event.doc`), not through the pipe but
  through memory both processes share: the child copies a batch's lines into one of a few
  slots of it, the parent copies each line out as the Event's own bytes and gives the slot
  back. Through the pipe, the lines would cost the pair of processes more than all the
  rest of the hand-over. A line longer than a slot travels in the batch's message itself;
- the malformed-line reports of the lines it covers, and the running counts (skipped
  lines by reason, the join's, the last line number), so an early stop loses none of
  what was handed over.

A batch leaves when it is full, and also whenever the child waits for input (a pipe or
FIFO gone quiet): everything read so far is then scored, as it would be in one process.
The child learns that it waits from the `Interrupt` its lines were made with
(`numbered_lines` sets `blocked` around each wait) and checks it from a 50 ms timer: a
signal handler that runs while the read waits, where every event read is complete.

Signals belong to the parent. The child ignores SIGINT (a terminal's Ctrl-C reaches the
whole process group) and is ended by the parent when the replay stops early; the parent's
wait for a batch is interruptible like any other read (`Interrupt.blocked`).
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import marshal
import mmap
import os
import signal
import struct
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from intake.join import ProcessJoin
from intake.ndjson import InputError, Interrupt, Interrupted
from intake.reader import Match, Position, read_events
from scoring.events import EVENT_FIELDS, Event

BATCH = 2048  # events per batch: a few MB with their lines, a few ms of work each side
SLOT_BYTES = 8 << 20  # raw lines of one batch at most (a longer line travels in its message)
SLOTS = 4  # slots of shared memory: the child may be this many batches ahead of the copy
WAIT_CHECK = 0.05  # seconds between the child's checks for a wait on input
MAX_CALLERS = 65536  # rows in the repeating-fields table; when full, both sides restart it
PIPE_BYTES = 1 << 20  # asked of the kernel for the pipe (it may give less)
PR_SET_PDEATHSIG = 1  # prctl(2)
# The reading process's switch interval (sys.setswitchinterval). A gzip input is
# decompressed by a thread of it (intake.ndjson), which needs the interpreter lock for a
# moment after every block it inflates; at the default 5 ms the busy parser keeps it waiting
# that long each time, so the two barely overlap.
SWITCH_INTERVAL = 0.0005

# The Event fields that repeat for one caller, in Event's argument order (the per-event
# ones, PER_EVENT_FIELDS, left out).
PER_EVENT_FIELDS = ("ts", "pid", "ppid", "event_id", "_doc", "_raw")
_CALLER_FIELDS = tuple(f for f in EVENT_FIELDS if f not in PER_EVENT_FIELDS)


def caller_fields(e: Event) -> tuple:
    """`_CALLER_FIELDS` of `e`, spelt out: twice as fast as an attrgetter here."""
    return (e.dst_ip, e.name, e.dst_port, e.exe, e.command_line, e.parent_name,
            e.parent_exe, e.user, e.uid, e.host, e.container_id, e.image, e.namespace, e.pod,
            e.cloud, e.action, e.method, e.path, e.query, e.user_agent, e.guarded,
            e.thread_name, e.exe_mismatch, e.kernel_exe, e.proc_exe, e.container_unknown)


_HEADER = struct.Struct("<I")  # size of the message (marshal) that follows

Report = Callable[[int, str, str], None]


class ForkedReader:
    """`read_events(lines, match, ...)` run by a forked child; `batches()` gives the
    parent its (line number, Event) pairs. `waiting`: the Interrupt `lines` was made with
    (`numbered_lines(source, waiting)`), whose `blocked` says the child waits for input;
    without it a batch leaves only when full or at the end. After it: `lineno` (the last
    line read), `skipped` (by reason), `joined` and `join_evicted` (the join's counts)."""

    def __init__(self, lines: Iterable[tuple[int, bytes | None]], match: Match,
                 waiting: Interrupt | None = None) -> None:
        self.lineno = 0
        self.skipped: Counter = Counter()
        self.joined = 0
        self.join_evicted = 0
        self._pid: int | None = None
        self._input: BinaryIO | None = None
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        self._slot_bytes = SLOT_BYTES
        try:
            # Anonymous and shared (mmap's default): the child's copies are the parent's.
            self._shm: mmap.mmap | None = mmap.mmap(-1, SLOTS * SLOT_BYTES)
        except OSError as exc:
            raise InputError(f"cannot start the reader process ({exc.strerror})") from None
        self._acks: int | None = None
        r, w = os.pipe()
        acks_r, acks_w = os.pipe()  # one byte per slot the parent has copied out
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a smaller pipe costs more switches, nothing else
        parent = os.getpid()
        # The child never frees what it inherits: left in the collector's generations, its
        # collections would walk (and so copy, page by page) a loaded model it never uses.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (r, w, acks_r, acks_w):
                os.close(fd)
            self._shm.close()
            raise InputError(f"cannot start the reader process ({exc.strerror})") from None
        finally:
            if os.getpid() == parent:
                gc.unfreeze()
        if pid == 0:  # the child: never returns
            os.close(r)
            os.close(acks_w)
            _child(w, _Slots(self._shm, self._slot_bytes, acks_r), lines, match, waiting,
                   parent)
        os.close(w)
        os.close(acks_r)
        self._acks = acks_w
        self._pid = pid
        self._input = open(r, "rb", buffering=PIPE_BYTES)  # noqa: SIM115 - closed by close()

    # -- the parent ------------------------------------------------------------------------

    def batches(self, report: Report, stop: Interrupt | None = None
                ) -> Iterator[list[tuple[int, Event]]]:
        """The events in file order, a batch at a time; reports malformed lines through
        `report` as the batches covering them arrive. Raises Interrupted when `stop` is
        requested, InputError when reading failed (after the events read before)."""
        callers: list[tuple] = []
        while True:
            if stop is not None and stop.requested:
                raise Interrupted(stop.signum)
            message = self._receive(stop)
            if message is None:
                raise InputError(self._died())
            if message[0] == "end":
                _, self.lineno, skipped, self.joined, self.join_evicted, error = message
                self.skipped = Counter(skipped)
                self._reap()
                if error is not None:
                    raise InputError(error)
                return
            (_, restart, new, rows, reports, self.lineno, skipped, self.joined,
             self.join_evicted, slot, used) = message
            self.skipped = Counter(skipped)
            for lineno, reason, kind in reports:
                report(lineno, reason, kind)
            if restart:
                callers.clear()
            callers += new
            # Each raw line is copied out of the shared slot as its own bytes: it may
            # outlive the batch (the reorder buffer holds it, an alert reads it), and small
            # lines reuse the memory of those freed before them, where one block per batch
            # would be fresh memory, page by page, every time.
            shm = self._shm
            at = slot * self._slot_bytes
            out: list[tuple[int, Event]] = []
            append = out.append
            for i, ts, pid, ppid, event_id, lineno, size, doc in rows:
                if size.__class__ is not int:
                    raw = size  # a line longer than a slot, in the message itself
                elif size < 0:
                    raw = None
                else:
                    raw = shm[at:at + size]  # type: ignore[index]
                    at += size
                # Unpacked and passed by position: this line runs once per replayed event.
                (ip, name, port, exe, cmd, pname, pexe, user, uid, host, cid, image, ns, pod,
                 cloud, action, method, path, query, ua, guarded, thread, mismatch, kexe,
                 pexe2, unknown_cid) = callers[i]
                append((lineno, Event(ts, ip, name, port, pid, exe, cmd, ppid, pname, pexe,
                                      user, uid, host, cid, image, ns, pod, cloud, event_id,
                                      action, method, path, query, ua, guarded, thread,
                                      mismatch, kexe, pexe2, unknown_cid, doc, raw)))
            if slot >= 0:
                self._give_back()
            yield out

    def _receive(self, stop: Interrupt | None) -> Any:
        """The next message, or None at an end without one (the child died)."""
        f = self._input
        assert f is not None
        if stop is not None:
            stop.blocked = True  # a signal ends the wait (Interrupt.request raises)
        try:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return None
            (size,) = _HEADER.unpack(head)
            meta = f.read(size)
        finally:
            if stop is not None:
                stop.blocked = False
        if len(meta) < size:
            return None
        return marshal.loads(meta)

    def _give_back(self) -> None:
        """Tells the child that its last slot has been copied out."""
        assert self._acks is not None
        try:
            os.write(self._acks, b"\x01")
        except BrokenPipeError:
            pass  # the child is gone: the next read says how

    def _died(self) -> str:
        status = self._reap()
        if status is not None and os.WIFSIGNALED(status):
            return (f"reading stopped: the reader process was killed by signal "
                    f"{os.WTERMSIG(status)}")
        return "reading stopped: the reader process ended without finishing"

    def _reap(self) -> int | None:
        pid, self._pid = self._pid, None
        if pid is None:
            return None
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None

    def close(self) -> None:
        """Ends the child if it still runs (an early stop) and closes the pipe."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._input is not None:
            self._input.close()  # a child blocked writing gets EPIPE
            self._input = None
        if self._acks is not None:
            os.close(self._acks)  # a child waiting for a slot reads the end
            self._acks = None
        self._reap()
        if self._shm is not None:
            self._shm.close()
            self._shm = None


# -- the child -------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Ends this process when `parent` does: it holds what the parent held (the state's
    lock among them), and a child waiting on a quiet FIFO would otherwise keep it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # gone before the request took effect
        os._exit(1)


def _child(fd: int, slots: _Slots, lines: Iterable[tuple[int, bytes | None]],
           match: Match, waiting: Interrupt | None, parent: int) -> None:
    """Reads and sends everything, then exits without running the parent's clean-up."""
    status = 0
    try:
        _die_with(parent)
        sys.setswitchinterval(SWITCH_INTERVAL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the parent gone: end quietly
        with open(fd, "wb", buffering=PIPE_BYTES) as out:
            sender = _Sender(out, slots)
            if waiting is not None:
                signal.signal(signal.SIGALRM, lambda _s, _f: sender.send_if(waiting))
                signal.setitimer(signal.ITIMER_REAL, WAIT_CHECK, WAIT_CHECK)
            sender.run(lines, match)
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ParentGone:
        status = 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        status = 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001, S110
            pass
    finally:
        os._exit(status)


class _ParentGone(Exception):
    """The parent closed its end: the replay stopped; nothing left to do."""


class _Slots:
    """The child's side of the shared memory: `take` waits until a slot is free (the
    parent gives one back for every batch it has copied out) and returns its index."""

    def __init__(self, shm: mmap.mmap, size: int, acks: int) -> None:
        self.shm = shm
        self.size = size
        self.acks = acks
        self.next = 0
        self.out = 0  # slots handed over and not yet given back

    def take(self) -> int:
        if self.out == SLOTS:
            got = os.read(self.acks, SLOTS)  # the parent is SLOTS batches behind: wait
            if not got:
                raise _ParentGone
            self.out -= len(got)
        slot = self.next
        self.next = (slot + 1) % SLOTS
        return slot


class _Sender:
    def __init__(self, out: BinaryIO, slots: _Slots) -> None:
        self.out = out
        self.slots = slots
        self.slot = -1  # the slot holding this batch's lines (-1: none yet)
        self.used = 0  # bytes of it filled
        self.inline = False  # the batch holds a line too long for a slot
        self.ids: dict[tuple, int] = {}
        self.new: list[tuple] = []
        self.rows: list[tuple] = []
        self.reports: list[tuple[int, str, str]] = []
        self.restart = False
        self.sending = False
        self.position = Position()
        self.skipped: Counter = Counter()
        self.join = ProcessJoin()

    def report(self, lineno: int, reason: str, kind: str = "malformed") -> None:
        self.reports.append((lineno, reason, kind))

    def run(self, lines: Iterable[tuple[int, bytes | None]], match: Match) -> None:
        error = None
        ids, rows = self.ids, self.rows
        shm, slot_bytes = self.slots.shm, self.slots.size
        try:
            for lineno, ev, _ in read_events(lines, match, self.report, self.skipped,
                                             self.join, self.position):
                key = caller_fields(ev)
                i = ids.get(key)
                if i is None:
                    if len(ids) >= MAX_CALLERS:
                        self.send()
                        ids.clear()
                        self.restart = True
                    i = ids[key] = len(ids)
                    self.new.append(key)
                raw = ev._raw
                if raw is None:
                    ref: int | bytes = -1
                elif len(raw) > slot_bytes:
                    ref = raw  # marshalled with the batch, which then leaves at once
                    self.inline = True
                else:
                    ref = size = len(raw)
                    if self.slot < 0 or self.used + size > slot_bytes:
                        if self.slot >= 0:  # this batch's slot is full: send it as it is
                            self.send()
                        self.slot = self.slots.take()
                        self.used = 0
                    at = self.slot * slot_bytes + self.used
                    shm[at:at + size] = raw
                    self.used += size
                rows.append((i, ev.ts, ev.pid, ev.ppid, ev.event_id, lineno, ref, ev._doc))
                if len(rows) >= BATCH or self.inline:
                    self.send()
        except InputError as exc:
            error = str(exc)
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.send()
        self._write(("end", self.position.lineno, dict(self.skipped), self.join.filled,
                     self.join.evicted, error))

    def send_if(self, waiting: Interrupt) -> None:
        """From the timer's signal handler: send what is read if the reading waits for
        input (every event then complete) and no send is under way."""
        if waiting.blocked and not self.sending:
            self.send()

    def send(self) -> None:
        if not self.rows and not self.reports and not self.new:
            return
        self.sending = True
        try:
            self._send()
        finally:
            self.sending = False

    def _send(self) -> None:
        self._write(("batch", self.restart, self.new, self.rows, self.reports,
                     self.position.lineno, dict(self.skipped), self.join.filled,
                     self.join.evicted, self.slot, self.used))
        if self.slot >= 0:
            self.slots.out += 1
        # Emptied in place: `run` holds the same lists.
        self.new.clear()
        self.rows.clear()
        self.reports.clear()
        self.slot = -1
        self.used = 0
        self.inline = False
        self.restart = False

    def _write(self, meta: tuple) -> None:
        data = marshal.dumps(meta)
        self.out.write(_HEADER.pack(len(data)))
        self.out.write(data)
        self.out.flush()  # a message is for now, not when the buffer fills
