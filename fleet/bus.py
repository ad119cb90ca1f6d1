"""The fleet's bus (contract section 8): a NATS JetStream connection and what lives in it.

For `--bus-stream NAME` (default IMDSWATCH), created when absent with `--bus-replicas`
copies each, and checked when present:
- stream `NAME`, subject `imdswatch.events`: the fleet's log. Every replica appends the
  batches it acknowledges; the scoring replica reads them in order (`fleet.bus_log`).
  Its duplicate window is the reorder window (at least two minutes).
- stream `NAME_LEDGER`, subjects `imdswatch.ledger.>`: what the scoring replica wrote, in
  one fenced sequence (`fleet.ledger`): takeovers, alerts (republished once each on
  `imdswatch.alerts`) and checkpoint records. Alerts are kept 7 days for readers.
- key-value bucket `NAME_LEASE`: the lease that says which replica scores (`fleet.lease`);
  its max_age is the lease's time to live.
- object store `NAME_CKPT`: checkpoints (the model state) and the model agents fetch.

Only features of nats-server 2.9 are used (Debian 12 ships 2.9.10); newer servers have
them too.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fleet.nats_bridge import (
    Bridge,
    BusError,
    Connection,
    check_servers,
    connect,
    read_credentials,
    tls_context,
)

log = logging.getLogger("imdswatch.fleet.bus")

EVENTS_SUBJECT = "imdswatch.events"
LEDGER_SUBJECTS = "imdswatch.ledger.>"
ALERTS_SUBJECT = "imdswatch.alerts"
LEDGER_ALERT = "imdswatch.ledger.alert"
LEDGER_TAKEOVER = "imdswatch.ledger.takeover"
LEDGER_CHECKPOINT = "imdswatch.ledger.checkpoint"
ALERT_RETENTION = 7 * 24 * 3600.0
MIN_DUPLICATE_WINDOW = 120.0
DEFAULT_LEASE_TTL = 4.0
START_BUDGET = 10.0  # connecting and setting up at start, then exit 2
CALL_TIMEOUT = 5.0
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
FATAL = re.compile(r"authorization|authentication|certificate verify|permissions", re.I)
ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
# Errors that mean "the bus is away or busy now", not "this call is wrong".
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.Error, nats.js.errors.NoStreamResponseError, TimeoutError, OSError)


@dataclass
class BusOptions:
    servers: str
    replica_id: str
    creds: str | None = None
    ca: str | None = None
    stream: str = "IMDSWATCH"
    replicas: int = 1
    lease_ttl: float = DEFAULT_LEASE_TTL
    duplicate_window: float = 600.0


class Bus:
    """The connection and the JetStream objects, shared by every thread of a replica."""

    def __init__(self, opts: BusOptions) -> None:
        if not NAME_RE.fullmatch(opts.stream):
            raise BusError("--bus-stream: 1 to 32 letters, digits, '-' or '_'")
        if not ID_RE.fullmatch(opts.replica_id):
            raise BusError("--replica-id: 1 to 128 letters, digits or '.-_:@'")
        if not 1 <= opts.replicas <= 5:
            raise BusError("--bus-replicas: 1 to 5 copies")
        self.opts = opts
        self.servers = check_servers(opts.servers)
        self.creds = read_credentials(opts.creds) if opts.creds else {}
        self.tls = tls_context(opts.ca)
        self.stream = opts.stream
        self.ledger_stream = f"{opts.stream}_LEDGER"
        self.lease_bucket = f"{opts.stream}_LEASE"
        self.ckpt_bucket = f"{opts.stream}_CKPT"
        self.bridge = Bridge()
        self.conn = Connection()
        self._connected = threading.Event()
        self.conn.on_change.append(self._on_change)
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._obs: ObjectStore | None = None
        self.lease_ttl = opts.lease_ttl

    # -- start ------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect and make sure the streams and buckets exist. Raises BusError with what
        went wrong (and what the server said) within START_BUDGET seconds or so."""
        where = ", ".join(self.servers)
        fut = self.bridge.submit(connect(self.servers, f"imdswatch-serve {self.opts.replica_id}",
                                         self.creds, self.tls, self.conn))
        deadline = time.monotonic() + START_BUDGET
        try:
            # The client retries for ever; a refusal that retrying cannot fix ends it early.
            while not fut.done() and time.monotonic() < deadline:
                if FATAL.search(self.conn.last_error):
                    break
                time.sleep(0.05)
            if not fut.done():
                fut.cancel()
                raise TimeoutError(self.conn.last_error or "no answer")
            self.nc = fut.result()
        except (TimeoutError, concurrent.futures.CancelledError, nats.errors.Error,
                OSError) as exc:
            said = self.conn.last_error or str(exc)
            raise BusError(f"cannot reach the bus at {where}: {said}") from None
        self._connected.set()
        self._js = self.nc.jetstream(timeout=CALL_TIMEOUT)
        try:
            self._ensure_stream(self._events_config())
            self._ensure_stream(self._ledger_config())
            self._kv = self._ensure_lease_bucket()
            self._obs = self._ensure_object_store()
        except BusError:
            raise
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError, OSError) as exc:
            said = self.conn.last_error
            raise BusError(f"the bus at {where} refused to set up the fleet's streams: "
                           f"{exc or type(exc).__name__}" + (f" (the server said: {said})"
                                                             if said else "")) from None

    def _events_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.stream, subjects=[EVENTS_SUBJECT], storage=api.StorageType.FILE,
            num_replicas=self.opts.replicas, retention=api.RetentionPolicy.LIMITS,
            # Full (an operator's max_bytes): refuse new batches (503, agents spool) rather
            # than drop acknowledged ones.
            discard=api.DiscardPolicy.NEW,
            duplicate_window=max(MIN_DUPLICATE_WINDOW, self.opts.duplicate_window),
            description="imdswatch: events acknowledged by the fleet scorer's replicas")

    def _ledger_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.ledger_stream, subjects=[LEDGER_SUBJECTS], storage=api.StorageType.FILE,
            num_replicas=self.opts.replicas, retention=api.RetentionPolicy.LIMITS,
            max_age=ALERT_RETENTION, allow_direct=True, duplicate_window=MIN_DUPLICATE_WINDOW,
            # Stored alert records only: a refused (fenced) or duplicate write never reaches
            # subscribers of imdswatch.alerts.
            republish=api.RePublish(src=LEDGER_ALERT, dest=ALERTS_SUBJECT),
            description="imdswatch: the scoring replica's takeovers, alerts and checkpoints")

    def _ensure_stream(self, config: api.StreamConfig) -> None:
        assert config.name is not None
        try:
            info = self.call(self.js.stream_info(config.name))
        except nats.js.errors.NotFoundError:
            try:
                self.call(self.js.add_stream(config))
                log.info("bus: created stream %s (%d copies)", config.name,
                         config.num_replicas or 1)
                return
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == 10065:
                    raise BusError(
                        f"stream {config.name} cannot capture {config.subjects}: another "
                        "stream on this NATS account does (one fleet per account, or give "
                        "it its own account)") from None
                if exc.err_code != 10058:  # created meanwhile by another replica
                    raise
                info = self.call(self.js.stream_info(config.name))
        have = set(info.config.subjects or [])
        if have != set(config.subjects or []):
            raise BusError(f"stream {config.name} exists with subjects {sorted(have)}, not "
                           f"{config.subjects}: it belongs to something else")
        if (info.config.num_replicas or 1) != config.num_replicas:
            log.warning("bus: stream %s has %d copies (--bus-replicas %d applies only when "
                        "it is created)", config.name, info.config.num_replicas or 1,
                        config.num_replicas)

    def _ensure_lease_bucket(self) -> KeyValue:
        try:
            kv = self.call(self.js.key_value(self.lease_bucket))
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = self.call(self.js.create_key_value(
                    bucket=self.lease_bucket, history=1, ttl=self.opts.lease_ttl,
                    replicas=self.opts.replicas, storage=api.StorageType.FILE,
                    description="imdswatch: which replica scores"))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:
                    raise
                kv = self.call(self.js.key_value(self.lease_bucket))
        status = self.call(kv.status())
        # The lease lasts what the bucket says, whatever this replica was told: the holder
        # stops by this figure.
        ttl = status.ttl
        if not ttl or ttl <= 0:
            raise BusError(f"key-value bucket {self.lease_bucket} has no max_age: it cannot "
                           "hold a lease (delete it; serve creates it)")
        if abs(ttl - self.opts.lease_ttl) > 0.01:
            log.warning("bus: the lease bucket's time to live is %.1fs (--bus-lease-ttl "
                        "%.1fs applies only when it is created)", ttl, self.opts.lease_ttl)
        self.lease_ttl = ttl
        return kv

    def _ensure_object_store(self) -> ObjectStore:
        try:
            return self.call(self.js.object_store(self.ckpt_bucket))
        except nats.js.errors.BucketNotFoundError:
            try:
                return self.call(self.js.create_object_store(
                    self.ckpt_bucket, config=api.ObjectStoreConfig(
                        replicas=self.opts.replicas, storage=api.StorageType.FILE,
                        description="imdswatch: checkpoints and agents' model")))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:
                    raise
                return self.call(self.js.object_store(self.ckpt_bucket))

    # -- use --------------------------------------------------------------------------------
    def call(self, coro: Any, timeout: float = CALL_TIMEOUT + 1.0) -> Any:
        return self.bridge.call(coro, timeout)

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "Bus.open() first"
        return self._js

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "Bus.open() first"
        return self._kv

    @property
    def obs(self) -> ObjectStore:
        assert self._obs is not None, "Bus.open() first"
        return self._obs

    def connected(self) -> bool:
        return self._connected.is_set()

    def max_payload(self) -> int:
        return self.nc.max_payload if self.nc is not None else 1 << 20

    def _on_change(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()

    def close(self) -> None:
        self.conn.closing = True
        if self.nc is not None:
            try:
                self.bridge.call(self.nc.close(), 5)
            except Exception:  # noqa: BLE001 - closing whatever state it is in
                pass
        self.bridge.close()
