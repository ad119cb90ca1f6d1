"""The fleet's log on the bus: the JetStream stream every replica appends to, read in order
by the scoring replica. The second implementation of `fleet.eventlog.EventLog`.

Appending (any replica, for each ingest request): the batch's events, as the NDJSON lines
ingest read, are split into messages under the server's max_payload, in order, and each
message's id is the hash of its bytes. A batch sent again (an agent whose acknowledgement
was lost, to this replica or another) makes the same messages with the same ids, which
the stream answers as duplicates within its duplicate window (the reorder window, at least
two minutes). Past that window the stream stores the copy again, and the scoring replica
drops its events by `event.id`, as the local log does (its id window is in every
checkpoint): the batch is still scored once, its 200 only counts it as accepted.
The request is answered only once the stream has acknowledged every message.

Reading (the scoring replica): an ephemeral consumer from the checkpoint's position,
acknowledging nothing (the position lives in the checkpoints), pulled by a task on the bus's
loop into a bounded queue (`StreamReader`). A message that is not one of ours or not
readable is counted and skipped; its position still advances, so nothing blocks.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js import api

from fleet.bus import EVENTS_SUBJECT, TRANSIENT, Bus
from fleet.dedup import IdWindow
from fleet.eventlog import Batch, LogUnavailable
from fleet.ingest import Item, Parsed, parse
from fleet.metrics import ServeMetrics
from scoring.endpoints import EndpointCatalog

log = logging.getLogger("imdswatch.fleet.bus")

FORMAT_HEADER = "Imdswatch-Batch"
FORMAT = "ndjson-1"
HEADROOM = 4096  # headers and protocol under max_payload
FETCH = 256  # messages a pull asks for (at most), and half the reader's queue
PULL_EXPIRES = 1.0
PUBLISH_BUDGET = 3.0  # seconds of retries (a stream electing a leader) before a 503
RETRY_AFTER = 2


def split(lines: list[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """Lines joined by newlines into messages of at most `limit` bytes: (message, count).
    The same lines give the same messages (their ids must repeat)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        n = len(line) + 1
        if chunk and size + n > limit:
            yield b"\n".join(chunk), len(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield b"\n".join(chunk), len(chunk)


class JetStreamLog:
    POSITION_KEY = "stream_seq"

    def __init__(self, bus: Bus, ids: IdWindow, metrics: ServeMetrics,
                 catalog: EndpointCatalog) -> None:
        self.bus = bus
        self.ids = ids
        self.metrics = metrics
        self.catalog = catalog
        self._reader: StreamReader | None = None
        self._quiet_until = 0.0

    # -- ingest (any thread of any replica) ---------------------------------------------------
    def append(self, parsed: Parsed) -> tuple[int, int]:
        if not parsed.items:
            return 0, 0
        if not self.bus.connected():
            raise LogUnavailable("the bus is unreachable", RETRY_AFTER)
        limit = self.bus.max_payload() - HEADROOM
        lines = []
        for it in parsed.items:
            if len(it.line) >= limit:
                # Larger than any message the bus takes: refused as malformed, and said.
                parsed.malformed += 1
                log.warning("ingest: an event of %d bytes is over the bus's message size "
                            "(%d); refused", len(it.line), limit)
                continue
            lines.append(it.line)
        accepted = duplicates = 0
        for body, n in split(lines, limit):
            if self._publish(body):
                duplicates += n
            else:
                accepted += n
        return accepted, duplicates

    def _publish(self, body: bytes) -> bool:
        """Store one message; True when the stream already had it."""
        msg_id = hashlib.blake2b(body, digest_size=16).hexdigest()
        headers = {"Nats-Msg-Id": msg_id, FORMAT_HEADER: FORMAT}
        deadline = time.monotonic() + PUBLISH_BUDGET
        while True:
            try:
                ack = self.bus.call(self.bus.js.publish(EVENTS_SUBJECT, body, headers=headers,
                                                        timeout=PUBLISH_BUDGET),
                                    PUBLISH_BUDGET + 1)
                return bool(ack.duplicate)
            except nats.js.errors.APIError as exc:
                # The stream full (an operator's limit) or refusing: the agents spool.
                raise LogUnavailable(f"the stream refused a batch: {exc.description}",
                                     RETRY_AFTER) from None
            except TRANSIENT as exc:
                # A timeout is "unknown", not "lost": the agent's retry carries the same id.
                if time.monotonic() >= deadline or not self.bus.connected():
                    raise LogUnavailable(f"the bus did not store a batch in time "
                                         f"({exc or type(exc).__name__})", RETRY_AFTER) \
                        from None
            time.sleep(0.1)

    # -- reading (the scoring replica's thread) ---------------------------------------------
    def resume(self, position: int, catalog: EndpointCatalog) -> Iterator[Batch]:
        """Read from `position` on: the batches come through `take`."""
        self._stop_reader()
        self._reader = StreamReader(self.bus, max(position, 1), self.metrics)
        self._reader.start()
        return iter(())

    def take(self, timeout: float) -> list[Batch]:
        reader = self._reader
        if reader is None:
            time.sleep(timeout)
            return []
        out: list[Batch] = []
        for seq, headers, data in reader.take(timeout):
            items = self._decode(seq, headers, data)
            fresh = [it for it in items if self.ids.add(it.key)]
            if len(fresh) != len(items):
                self.metrics.events.labels(result="duplicate").inc(len(items) - len(fresh))
            out.append((seq, fresh))
        return out

    def _decode(self, seq: int, headers: dict[str, str] | None, data: bytes) -> list[Item]:
        if (headers or {}).get(FORMAT_HEADER) != FORMAT:
            self.metrics.bus_skipped.labels(reason="foreign").inc()
            self._say(f"stream message {seq} is not an imdswatch batch; skipped")
            return []
        try:
            parsed = parse(data, self.catalog)
        except ValueError as exc:
            self.metrics.bus_skipped.labels(reason="corrupt").inc()
            self._say(f"stream message {seq} is not readable ({exc}); skipped")
            return []
        if parsed.malformed:
            self.metrics.bus_skipped.labels(reason="corrupt").inc()
            self._say(f"stream message {seq}: {parsed.malformed} unreadable lines skipped")
        return parsed.items

    def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()

    def _say(self, text: str) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 10.0
            log.warning("%s", text)

    # -- the rest of the interface ----------------------------------------------------------
    def done(self, events: int) -> None:
        pass

    def queued(self) -> int:
        return 0

    def ids_snapshot(self) -> dict:
        return self.ids.dump()  # only the scoring thread touches the window

    def before_checkpoint(self) -> None:
        pass

    def after_checkpoint(self, position: int) -> None:
        pass  # the stream is trimmed by the checkpoint store (it knows what is kept)

    def close(self) -> None:
        self._stop_reader()


Message = tuple[int, dict[str, str] | None, bytes]


class StreamReader:
    """The stream from a position on, in order, into a bounded queue the scoring thread
    takes from. A task on the bus's loop keeps one pull request open at a time on an
    ephemeral consumer that acknowledges nothing; a consumer lost with a server (failover,
    restart) shows as requests that end without a status, and is then recreated from the
    next sequence not yet received. Nothing is skipped: a sequence missing from the stream
    is counted and logged."""

    def __init__(self, bus: Bus, start: int, metrics: ServeMetrics,
                 max_queued: int = 2 * FETCH) -> None:
        self.bus = bus
        self.next = start  # the next sequence to receive
        self.metrics = metrics
        self.max_queued = max_queued
        self._queue: collections.deque[Message] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._task: asyncio.Future[None] | None = None
        self._consumer = ""
        self._quiet_until = 0.0

    def start(self) -> None:
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.bus.bridge.loop)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        with self._cond:
            self._cond.notify_all()

    def take(self, timeout: float) -> list[Message]:
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout)
            out = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        return out

    async def _run(self) -> None:
        nc = self.bus.nc
        assert nc is not None
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            while not self._stopped:
                if not await self._room():
                    continue
                try:
                    if not self._consumer:
                        await self._create()
                    await self._pull(sub, inbox)
                except asyncio.CancelledError:
                    raise
                except (nats.js.errors.Error, *TRANSIENT) as exc:
                    self._say(f"cannot read the stream ({exc or type(exc).__name__}); "
                              "retrying")
                    self._consumer = ""
                    await asyncio.sleep(0.5)
                except Exception:  # a bug here must not stop scoring silently
                    log.exception("reading the stream failed; retrying")
                    self._consumer = ""
                    await asyncio.sleep(1.0)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone
                pass

    async def _room(self) -> bool:
        with self._cond:
            full = len(self._queue) >= self.max_queued
        if full:
            await asyncio.sleep(0.01)
        return not full

    async def _create(self) -> None:
        js = self.bus.js
        info = await js.stream_info(self.bus.stream)
        first = info.state.first_seq
        if self.next < first:
            if self.next > 1:
                self.metrics.bus_skipped.labels(reason="missing").inc(first - self.next)
                log.error("stream sequences %d to %d were removed before they were scored "
                          "(a limit on the stream?)", self.next, first - 1)
            self.next = first
        ci = await js.add_consumer(self.bus.stream, api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.next,
            ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
            num_replicas=1, filter_subject=EVENTS_SUBJECT))
        self._consumer = ci.name

    async def _pull(self, sub: Any, inbox: str) -> None:
        nc = self.bus.nc
        assert nc is not None
        batch = self.max_queued - len(self._queue)
        request = orjson.dumps({"batch": batch, "expires": int(PULL_EXPIRES * 1e9)})
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.bus.stream}.{self._consumer}",
                         request, reply=inbox)
        got = 0
        while got < batch:
            try:
                m = await sub.next_msg(timeout=PULL_EXPIRES + 2.0)
            except nats.errors.TimeoutError:
                # No status either: the consumer (or its server) is gone.
                await self._check()
                return
            status = (m.headers or {}).get("Status") if not m.data else None
            if status is not None:
                if status == "408" or status == "404":
                    self._caught_up()
                elif status == "409":  # consumer deleted or its leader moved
                    self._consumer = ""
                elif status != "100":
                    self._say(f"the stream answered a read with status {status}")
                return
            if not m.reply:
                continue
            md = m.metadata
            seq = md.sequence.stream
            if seq < self.next:
                continue  # delivered again after the consumer was recreated
            if seq > self.next:
                self.metrics.bus_skipped.labels(reason="missing").inc(seq - self.next)
                log.error("stream sequences %d to %d are missing (deleted before they were "
                          "scored)", self.next, seq - 1)
            self.next = seq + 1
            got += 1
            with self._cond:
                self._queue.append((seq, m.headers, m.data))
                self._cond.notify_all()
            self.metrics.bus_lag_messages.set(md.num_pending)
            self.metrics.bus_lag_seconds.set(
                max(0.0, time.time() - md.timestamp.timestamp()) if md.num_pending else 0)

    def _caught_up(self) -> None:
        self.metrics.bus_lag_messages.set(0)
        self.metrics.bus_lag_seconds.set(0)

    async def _check(self) -> None:
        try:
            await self.bus.js.consumer_info(self.bus.stream, self._consumer)
        except nats.js.errors.NotFoundError:
            log.info("the stream's consumer is gone (a server restarted?); reopening at "
                     "sequence %d", self.next)
            self._consumer = ""

    def _say(self, text: str) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 10.0
            log.warning("%s", text)
