"""Which replica scores: a lease held as one key in a JetStream key-value bucket.

Acquire: create the key (compare-and-set: refused while it exists). Renew: update it with
the revision of the holder's last write, every quarter of the time to live. The bucket's
max_age is the time to live: a holder that stops renewing (dead, frozen, cut off) loses the
key when it ages out, and the next create by another replica succeeds. nats-server 2.9
tells no watcher when a key ages out, so replicas without the lease try to create it every
`poll` seconds. A holder that stops gives the key up (a delete at its revision), so the
next replica takes over within one poll.

The holder counts the lease valid until the time it *sent* its last successful write plus
three quarters of the time to live, by its own monotonic clock. The server stamps the write
later than it was sent, so the key cannot age out, and no other replica can hold it, before
the holder has stopped by its own clock (a server clock stepped forward by more than that
quarter would shorten it). Writes are also fenced on the bus itself (`fleet.ledger`): a
holder frozen between its check and its write, or outlived by its lease, is refused there.
"""

from __future__ import annotations

import logging
import threading
import time

import nats.js.errors
import orjson

from fleet.bus import TRANSIENT, Bus

log = logging.getLogger("imdswatch.fleet.lease")

KEY = "scorer"
POLL = 0.25


class Lease:
    def __init__(self, bus: Bus, replica_id: str, poll: float = POLL) -> None:
        self.bus = bus
        self.replica_id = replica_id
        self.ttl = bus.lease_ttl
        self.renew_every = self.ttl / 4
        self.valid_for = self.ttl * 3 / 4
        self.poll = poll
        self._lock = threading.Lock()
        self._rev = 0
        self._until = 0.0  # monotonic
        # The revision of this replica's last write of the key: while the key still holds
        # it, nobody else has held the lease since, and an update at it takes it back.
        self._last = 0
        self.changed = threading.Condition(self._lock)
        self._value = orjson.dumps({"replica": replica_id})
        self.stopping = False  # set at a clean stop: renew what is held, take nothing new

    # -- read by the scoring thread ---------------------------------------------------------
    def held(self) -> bool:
        with self._lock:
            return self._rev > 0 and time.monotonic() < self._until

    @property
    def revision(self) -> int:
        with self._lock:
            return self._rev if time.monotonic() < self._until else 0

    def wait_held(self, timeout: float) -> bool:
        with self.changed:
            if not (self._rev > 0 and time.monotonic() < self._until):
                self.changed.wait(timeout)
            return self._rev > 0 and time.monotonic() < self._until

    # -- the lease thread ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.revision == 0:
                self._drop()
                if self.stopping or not self._acquire():
                    stop.wait(self.poll)
            else:
                # Wake at the next renewal, or at the deadline to say the lease is gone
                # when no renewal made it in time.
                with self._lock:
                    left = self._until - time.monotonic()
                stop.wait(max(0.0, min(self.renew_every, left)))
                if stop.is_set():
                    break
                if self.revision == 0:
                    self._drop()
                else:
                    self._renew()

    def _acquire(self) -> bool:
        sent = time.monotonic()
        try:
            if self._last:
                try:
                    rev = self.bus.call(self.bus.kv.update(KEY, self._value, last=self._last),
                                        self.renew_every + 1)
                except nats.js.errors.KeyWrongLastSequenceError:
                    self._last = 0
                    rev = self.bus.call(self.bus.kv.create(KEY, self._value),
                                        self.renew_every + 1)
            else:
                rev = self.bus.call(self.bus.kv.create(KEY, self._value), self.renew_every + 1)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another replica holds it
        except TRANSIENT as exc:
            log.debug("lease: cannot reach the bus to acquire (%s)", exc)
            return False
        self._set(rev, sent)
        log.info("lease: this replica (%s) now holds the scoring lease (revision %d, time "
                 "to live %.1fs)", self.replica_id, rev, self.ttl)
        return True

    def _renew(self) -> None:
        with self._lock:
            rev = self._rev
        if not rev:
            return
        sent = time.monotonic()
        try:
            new = self.bus.call(self.bus.kv.update(KEY, self._value, last=rev),
                                self.renew_every)
        except nats.js.errors.KeyWrongLastSequenceError:
            self._last = 0
            self._drop("the lease changed hands (a renewal was refused)")
            return
        except TRANSIENT as exc:
            if self.revision == 0:
                self._drop(f"no renewal reached the bus in time ({exc or type(exc).__name__})")
            return
        with self._lock:
            if self._rev == rev:  # not dropped meanwhile
                self._set_locked(new, sent)

    def _set(self, rev: int, sent: float) -> None:
        with self._lock:
            self._set_locked(rev, sent)

    def _set_locked(self, rev: int, sent: float) -> None:
        self._rev = self._last = rev
        self._until = sent + self.valid_for
        self.changed.notify_all()

    def _drop(self, why: str = "") -> None:
        with self._lock:
            was, until = self._rev, self._until
            self._rev = 0
            self._until = 0.0
            self.changed.notify_all()
        if not was:
            return
        # When it stopped counting as held, by this replica's clock (the log line may come
        # later on a busy machine).
        ended = time.time() - max(0.0, time.monotonic() - until)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended)) + \
            f",{int(ended * 1000) % 1000:03d}"
        log.warning("lease: this replica no longer holds the scoring lease: %s (held until %s "
                    "by its clock)", why or "no renewal reached the bus in time", stamp)

    def release(self) -> None:
        """Give the lease up (at a clean stop), so another replica takes over at once."""
        with self._lock:
            rev = self._rev or self._last
            self._rev = self._last = 0
            self._until = 0.0
        if rev:
            try:
                self.bus.call(self.bus.kv.delete(KEY, last=rev), 3)
                log.info("lease: released")
            except (nats.js.errors.KeyWrongLastSequenceError, *TRANSIENT) as exc:
                log.warning("lease: could not release (%s); it ages out in %.1fs", exc,
                            self.ttl)
