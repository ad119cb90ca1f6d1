"""`imdswatch serve`: the fleet scorer as a process (contract section 5).

Threads: the ingest server's connection threads (parse, log, acknowledge), one scoring
thread (`FleetCore.run`), the metrics server; the main thread waits for SIGTERM/SIGINT,
then closes ingest, scores what is queued, saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from exporters.alertcap import AlertCap
from exporters.metrics import MetricsExporter
from fleet.alertsink import AlertSink
from fleet.checkpoints import StateFile
from fleet.core import DEFAULT_HOLD, DEFAULT_QUEUE_EVENTS, FleetCore
from fleet.dedup import DEFAULT_CAPACITY, IdWindow
from fleet.eventlog import LocalLog
from fleet.http_api import DEFAULT_BODY_LIMIT, DEFAULT_MAX_CONNECTIONS, IngestServer, tls_context
from fleet.metrics import ServeMetrics
from fleet.token_file import read_token
from fleet.wal import WalError
from imdswatch.config import Config
from scoring.scorer import Scorer
from scoring.settings import FLEET_MAX_ENTITIES
from scoring.state import StateError

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
    exporter.set_ready(False, "restoring state and write-ahead log")
    if "max_entities" not in config.scoring_keys:
        config.scorer.max_entities = FLEET_MAX_ENTITIES
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
                              body_limit=opts.body_limit, max_connections=opts.max_connections)
    except (OSError, ValueError) as exc:
        metrics_server.shutdown()
        return _fail(f"cannot listen on {opts.listen}: {exc}")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_stop(signum: int, _frame: object) -> None:
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_stop)

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
