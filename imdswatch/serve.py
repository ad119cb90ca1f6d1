"""`imdswatch serve`: the fleet scorer as a process (contract sections 5 and 8).

Threads: the ingest server's connection threads (parse, log, acknowledge), one scoring
thread (`FleetCore.run`), the metrics server; the main thread waits for SIGTERM/SIGINT,
then closes ingest, scores what is queued, saves a checkpoint and exits 0.

With `--bus` the same process is one replica of several (`fleet.bus_replica`): its scoring
thread scores only while this replica holds the lease, a lease thread acquires and renews
it, a documents thread keeps the newest checkpoint's model for `GET /v1/model`. At
SIGTERM the scoring replica writes its last checkpoint and gives the lease up, so another
takes over within a poll.
"""

from __future__ import annotations

import gzip
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from exporters.alertcap import AlertCap
from exporters.metrics import MetricsExporter
from fleet.alertsink import AlertSink, Record
from fleet.checkpoints import StateFile
from fleet.core import DEFAULT_HOLD, DEFAULT_QUEUE_EVENTS, FleetCore
from fleet.dedup import DEFAULT_CAPACITY, IdWindow
from fleet.eventlog import LocalLog
from fleet.http_api import DEFAULT_BODY_LIMIT, DEFAULT_MAX_CONNECTIONS, IngestServer, tls_context
from fleet.metrics import ServeMetrics
from fleet.policy_doc import PolicyDocument
from fleet.token_file import read_token
from fleet.wal import WalError
from imdswatch.config import Config
from policy.toml_file import PolicyError
from scoring.scorer import Scorer
from scoring.settings import AGENT_MAX_ENTITIES, FLEET_MAX_ENTITIES
from scoring.state import StateError, state_dict

log = logging.getLogger("imdswatch.serve")

DEFAULT_LISTEN = "0.0.0.0:9465"


@dataclass
class ServeOptions:
    state: str
    listen: str = DEFAULT_LISTEN
    metrics_address: str | None = None
    output: str = "-"
    reorder_window: float = 600.0
    reorder_hold: float = DEFAULT_HOLD
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    save_interval: float = 60.0
    body_limit: int = DEFAULT_BODY_LIMIT
    queue_events: int = DEFAULT_QUEUE_EVENTS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    dedup_ids: int = DEFAULT_CAPACITY
    # Section 8: the bus.
    bus: str | None = None
    bus_creds: str | None = None
    bus_ca: str | None = None
    bus_stream: str = "IMDSWATCH"
    bus_replicas: int = 1
    replica_id: str | None = None
    bus_lease_ttl: float = 4.0
    # Section 7: the policy file published at GET /v1/policy.
    policy: str | None = None


def _fail(message: str) -> int:
    print(f"imdswatch serve: {message}", file=sys.stderr, flush=True)
    return 2


def run_serve(config: Config, opts: ServeOptions, *, stop: threading.Event | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = stop or threading.Event()
    token = None
    if opts.token_file:
        try:
            token = read_token(opts.token_file)
        except ValueError as exc:
            return _fail(str(exc))
    tls = None
    if bool(opts.tls_cert) != bool(opts.tls_key):
        return _fail("--tls-cert and --tls-key go together")
    if opts.tls_cert and opts.tls_key:
        try:
            tls = tls_context(opts.tls_cert, opts.tls_key)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"cannot load the TLS certificate/key: {exc}")
    state_dir = Path(opts.state).parent
    if not state_dir.is_dir():
        return _fail(f"--state {opts.state}: directory {state_dir} does not exist")
    metrics_address = opts.metrics_address or config.metrics.address
    exporter = MetricsExporter(max_series=config.metrics.max_series,
                               anomaly_ttl=config.metrics.anomaly_ttl)
    serve_metrics = ServeMetrics(exporter.registry)
    policy = None
    if opts.policy:
        try:
            policy = PolicyDocument(opts.policy, config.catalog,
                                    serve_metrics.policy_refused.inc)
        except PolicyError as exc:
            return _fail(str(exc))
    exporter.set_ready(False, "restoring state and write-ahead log")
    if "max_entities" not in config.scoring_keys:
        config.scorer.max_entities = FLEET_MAX_ENTITIES
    if opts.bus:
        return _run_bus(config, opts, exporter, serve_metrics, token, tls, metrics_address,
                        stop, policy)
    scorer = Scorer(config.scorer, config.catalog, config.exceptions)
    try:
        a = config.alerts
        # Standard output cannot be read back after a restart: the lines written since the
        # last checkpoint are noted in a journal beside the state.
        alerts = AlertSink(opts.output, sys.stdout.buffer,
                           AlertCap(a.max_per_window, a.window, a.max_per_run,
                                    on_held=exporter.observe_held_back),
                           journal=f"{opts.state}.alerts")
    except OSError as exc:
        return _fail(f"{opts.output}: cannot write alerts ({exc.strerror})")
    state_path = Path(opts.state)
    try:
        event_log = LocalLog(state_path.with_name(state_path.name + ".wal"),
                             IdWindow(opts.dedup_ids), serve_metrics, opts.queue_events)
    except WalError as exc:
        return _fail(str(exc))
    core = FleetCore(scorer, event_log, StateFile(state_path), alerts, serve_metrics,
                     exporter.observe, window=opts.reorder_window, hold=opts.reorder_hold,
                     save_interval=opts.save_interval, source=str(state_path))
    try:
        metrics_server = exporter.serve(metrics_address)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot serve metrics on {metrics_address}: {exc}")
    try:
        core.restore()
    except (StateError, OSError) as exc:
        metrics_server.shutdown()
        return _fail(str(exc))
    exporter.update_model(scorer)
    try:
        server = IngestServer(opts.listen, core, serve_metrics, token=token, tls=tls,
                              body_limit=opts.body_limit, max_connections=opts.max_connections,
                              policy=policy)
    except (OSError, ValueError) as exc:
        metrics_server.shutdown()
        return _fail(f"cannot listen on {opts.listen}: {exc}")

    serve_metrics.leader.set(1)
    previous = _on_signals(stop)
    scoring = threading.Thread(target=core.run, args=(stop,), name="imdswatch-scoring",
                               daemon=True)
    scoring.start()
    server.serve_in_thread()
    exporter.set_ready(True, f"ingesting on {opts.listen}")
    log.info("fleet scorer ready: ingest on %s://%s/v1/events%s, metrics on %s, state %s",
             "https" if tls else "http", opts.listen, ", bearer token required" if token else "",
             metrics_address, opts.state)
    try:
        while not stop.wait(1.0):
            exporter.update_model(scorer)
            if not scoring.is_alive():
                log.error("the scoring thread died; stopping")
                return 1
    finally:
        exporter.set_ready(False, "stopping")
        server.shutdown()
        server.server_close()
        stop.set()
        scoring.join(30)
        core.drain_queue()
        core.checkpoint()
        core.close()
        metrics_server.shutdown()
        metrics_server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped: %d events scored, %d alert lines written", core.scored,
                 alerts.written)
    return 0


def _on_signals(stop: threading.Event) -> dict:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_stop(signum: int, _frame: object) -> None:
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_stop)
    return previous


def _run_bus(config: Config, opts: ServeOptions, exporter: MetricsExporter,
             serve_metrics: ServeMetrics, token: str | None, tls: ssl.SSLContext | None,
             metrics_address: str, stop: threading.Event,
             policy: PolicyDocument | None = None) -> int:
    """Section 8: this process is one replica on the bus."""
    from fleet.bus import Bus, BusOptions
    from fleet.bus_replica import BusReplica
    from fleet.nats_bridge import BusError

    replica_id = opts.replica_id or socket.gethostname()
    try:
        bus = Bus(BusOptions(servers=opts.bus, replica_id=replica_id, creds=opts.bus_creds,
                             ca=opts.bus_ca, stream=opts.bus_stream,
                             replicas=opts.bus_replicas, lease_ttl=opts.bus_lease_ttl,
                             duplicate_window=opts.reorder_window))
    except BusError as exc:
        return _fail(str(exc))
    a = config.alerts

    def make_scorer() -> Scorer:
        return Scorer(config.scorer, config.catalog, config.exceptions)

    def make_sink(record: Record | None = None,
                  recorded: Callable[[], Iterable[int]] | None = None) -> AlertSink:
        return AlertSink(opts.output, sys.stdout.buffer,
                         AlertCap(a.max_per_window, a.window, a.max_per_run,
                                  on_held=exporter.observe_held_back),
                         record=record, recorded=recorded)

    try:
        make_sink().close()  # the output is writable before anything else starts
    except OSError as exc:
        bus.close()
        return _fail(f"{opts.output}: cannot write alerts ({exc.strerror})")
    try:
        metrics_server = exporter.serve(metrics_address)
    except (OSError, ValueError) as exc:
        bus.close()
        return _fail(f"cannot serve metrics on {metrics_address}: {exc}")
    try:
        bus.open()
    except BusError as exc:
        bus.close()
        metrics_server.shutdown()
        return _fail(str(exc))
    empty = make_scorer()
    replica = BusReplica(
        bus, replica_id=replica_id, state_path=Path(opts.state), make_scorer=make_scorer,
        make_sink=make_sink, metrics=serve_metrics, observe=exporter.observe,
        window=opts.reorder_window, hold=opts.reorder_hold, save_interval=opts.save_interval,
        dedup_ids=opts.dedup_ids,
        empty_model=gzip.compress(orjson.dumps(state_dict(empty, AGENT_MAX_ENTITIES))))
    try:
        server = IngestServer(opts.listen, replica, serve_metrics, token=token, tls=tls,
                              body_limit=opts.body_limit, max_connections=opts.max_connections,
                              policy=policy)
    except (OSError, ValueError) as exc:
        bus.close()
        metrics_server.shutdown()
        return _fail(f"cannot listen on {opts.listen}: {exc}")
    previous = _on_signals(stop)
    scoring_stop, lease_stop = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=replica.lease.run, args=(lease_stop,), name="imdswatch-lease",
                         daemon=True),
        threading.Thread(target=replica.run, args=(scoring_stop,), name="imdswatch-scoring",
                         daemon=True),
        threading.Thread(target=replica.run_documents, args=(scoring_stop,),
                         name="imdswatch-documents", daemon=True),
    ]
    for t in threads:
        t.start()
    server.serve_in_thread()
    serve_metrics.bus_connected.set(1)
    exporter.set_ready(True, f"ingesting on {opts.listen}")
    log.info("fleet scorer replica %s ready: ingest on %s://%s/v1/events%s, metrics on %s, "
             "bus %s (stream %s)", replica_id, "https" if tls else "http", opts.listen,
             ", bearer token required" if token else "", metrics_address,
             ", ".join(bus.servers), opts.bus_stream)
    try:
        while not stop.wait(1.0):
            up = bus.connected()
            serve_metrics.bus_connected.set(1 if up else 0)
            # A replica cut off from the bus takes no traffic the others could take.
            exporter.set_ready(up, f"ingesting on {opts.listen}" if up else "bus unreachable")
            scorer = replica.scorer
            if scorer is not None:
                exporter.update_model(scorer)
            if not all(t.is_alive() for t in threads):
                log.error("a replica thread died; stopping")
                return 1
    finally:
        exporter.set_ready(False, "stopping")
        replica.lease.stopping = True
        server.shutdown()
        server.server_close()
        scoring_stop.set()
        threads[1].join(30)
        replica.finish()
        lease_stop.set()
        threads[0].join(10)
        replica.lease.release()
        threads[2].join(5)
        bus.close()
        metrics_server.shutdown()
        metrics_server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped")
    return 0
