"""The live agent: tracer -> scorer -> exporters, in one loop on the main thread.

Start-up fails fast (exit 2, with the doctor's fix) when the machine cannot trace. Once
attached, every ECS document from the kernel goes through `event_from_ecs` and
`Scorer.process`, exactly as a replayed line would; outcomes feed the metrics and alerts
go to the NDJSON output. SIGTERM/SIGINT stop the loop, the probes are detached and the
state saved; SIGHUP reloads the endpoint catalog and exceptions from the config file.
In a Kubernetes cluster a background `PodDirectory` names each event's pod (see
`agent.kubernetes` in docs/configuration.md); the event loop only reads its memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from typing import IO, Any

from exporters.alertcap import AlertCap
from exporters.alerts import AlertWriter
from exporters.httpserver import MetricsServer
from exporters.metrics import MetricsExporter
from exporters.timestamps import rfc3339_millis
from fleet.policy_fetch import FleetPolicy
from fleet.sink import FleetOptions, FleetSink
from imdswatch import libout, lograte, status
from imdswatch.config import AgentSettings, Config
from imdswatch.enforcement import DenyController
from imdswatch.status import AgentStats
from intake.parser import MalformedEvent, event_from_ecs
from policy.gate import WOULD_DENY, PolicyGate, build_policy_alert
from policy.metrics import PolicyMetrics
from policy.model import Policy
from policy.toml_file import PolicyError, load_policy
from scoring.scorer import Scorer
from scoring.state import StateError, load_state, save_state, state_lock
from tracer import doctor
from tracer.enforce_scope import Scope
from tracer.kubernetes import PodDirectory
from tracer.probes import AUTO_ORDER, ProbeError
from tracer.session import Tracer

log = logging.getLogger("imdswatch.agent")

POLL_MS = 100
HOUSEKEEPING_S = 1.0
# How often freed heap goes back to the kernel (well under a millisecond with a full model):
# the model's daily pruning and its evictions under a name flood free memory in the middle
# of the heap, which glibc keeps mapped, and the DaemonSet's limit counts it.
TRIM_S = 60.0
LIVE_STALL_S = 30.0


def release_freed_memory() -> None:
    """Give freed heap back to the kernel. glibc keeps freed memory mapped, so LLVM's
    compile (and each probe mode auto tried) would stay in the agent's resident set, which
    the DaemonSet's memory limit counts, for its lifetime; so would
    what the model frees when it prunes or evicts (every TRIM_S)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no malloc_trim): nothing to give back


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


def start_pod_directory(agent_settings: AgentSettings) -> PodDirectory | None:
    """The pod directory the agent's settings ask for, started; None when Kubernetes
    enrichment is off or not applicable. Never raises: enrichment is optional."""
    mode = agent_settings.kubernetes
    api = agent_settings.kubernetes_api
    if mode == "off":
        return None
    if mode == "auto" and not api and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.debug("not in a Kubernetes cluster: events keep pod UIDs only")
        return None
    try:
        pods = PodDirectory(api, agent_settings.node_name).start()
    except Exception as exc:  # a bad URL or environment must not stop the tracer
        log.warning("Kubernetes pod names unavailable (%s); events keep the pod UID only", exc)
        return None
    if pods.disabled_reason is None:
        log.info("Kubernetes enrichment: watching the pods of node %s at %s", pods.node_name,
                 pods.api_base)
    return pods


def _alert_writer(output: str | IO[Any]) -> AlertWriter:
    """The alert writer for `--output`; RuntimeError (exit 2) when it cannot be opened."""
    if output == "-":
        stdout = sys.stdout
        if stdout is None or getattr(stdout, "buffer", None) is None:
            raise RuntimeError("standard output is closed; give --output FILE")
        return AlertWriter(stdout.buffer)
    try:
        return AlertWriter(output)
    except OSError as exc:
        raise RuntimeError(f"{output}: cannot write alerts ({exc.strerror or exc})") from None


def _unwritable(state_path: str) -> str | None:
    """Why a state could not be written next to `state_path` (the save writes a temporary
    file there, then renames it), or None. Tried for real: permission bits say nothing about
    capabilities, read-only mounts or a full disk."""
    directory = os.path.dirname(os.path.abspath(state_path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".imdswatch-write-check-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _fail(message: str) -> int:
    print(f"imdswatch run: {message}", file=sys.stderr, flush=True)
    return 2


class EnforceOptions:
    """`--enforce MODE --policy FILE` and, for deny, where and how."""

    def __init__(self, mode: str, policy_path: str, cgroup: str | None = None,
                 off_file: str = "/run/imdswatch/enforce-off", max_callers: int = 20,
                 scope: Scope | None = None) -> None:
        self.mode = mode
        self.policy_path = policy_path
        self.cgroup = cgroup
        self.off_file = off_file
        self.max_callers = max_callers
        self.scope = scope or Scope()  # which callers deny mode may deny (--enforce-scope)


class Agent:
    """One live agent. `run()` blocks until `stop` is set (or a signal sets it)."""

    def __init__(
        self,
        config: Config,
        *,
        state_path: str | None = None,
        output: str | IO[Any] = "-",
        stop: threading.Event | None = None,
        fleet: FleetOptions | None = None,
        enforce: EnforceOptions | None = None,
    ) -> None:
        self.config = config
        self.enforce = enforce
        self.gate: PolicyGate | None = None
        self.policy_metrics: PolicyMetrics | None = None
        self.deny: DenyController | None = None
        self.fleet_policy: FleetPolicy | None = None
        self._policy_stat: tuple | None = None
        self.fleet_options = fleet
        self.fleet: FleetSink | None = None
        self.state_path = state_path
        self.output = output
        self.stop = stop or threading.Event()
        self.reload_requested = False
        self.stats = AgentStats()
        self.scorer = Scorer(config.scorer, config.catalog, config.exceptions)
        self.metrics: MetricsExporter | None = None
        self.writer: AlertWriter | None = None
        self.tracer: Tracer | None = None
        self.pods: PodDirectory | None = None
        self.server: MetricsServer | None = None
        self.attached = False
        # Set when the alert output failed (a full disk, a closed pipe): the agent stops,
        # saves its state and exits 2 with this message.
        self.output_error: str | None = None
        # Why the last save failed (None once one succeeds): a run whose final save fails
        # exits non-zero, since what it learnt is lost.
        self.save_error: str | None = None
        self._last_loop = time.monotonic()
        self._matched_read: int | None = None
        self.mode: str | None = None
        self.log_limiter: lograte.RateLimitFilter | None = None
        self._next_summary = 0.0
        self._state_lock = ExitStack()  # held from start to shutdown: one writer per state

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Load state, serve metrics, attach. Raises RuntimeError with a message to print."""
        cfg = self.config
        self.log_limiter = lograte.install()
        if self.state_path:
            problem = _unwritable(self.state_path)
            if problem:
                raise RuntimeError(
                    f"the state cannot be saved to {self.state_path} ({problem}): make its "
                    f"directory writable for uid {os.geteuid()} or pass another --state")
            try:
                self._state_lock.enter_context(state_lock(self.state_path))
            except StateError as exc:
                raise RuntimeError(str(exc)) from None
        if self.state_path and os.path.exists(self.state_path):
            try:
                load_state(self.state_path, self.scorer)
            except StateError as exc:
                raise RuntimeError(str(exc)) from None
            log.info("state loaded from %s (%d events learned)", self.state_path,
                     self.scorer.events_learned)
        elif self.state_path:
            log.info("no state at %s yet: starting with an empty model", self.state_path)
        self.metrics = MetricsExporter(
            max_series=cfg.metrics.max_series,
            anomaly_ttl=cfg.metrics.anomaly_ttl,
            host=cfg.agent.node_name,
        )
        self.metrics.set_ready(False, "probe not attached yet")
        self.metrics.health.live_check = self._alive
        try:
            self.server = self.metrics.serve(cfg.metrics.address)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot serve metrics on {cfg.metrics.address}: {exc}") from None
        if self.enforce is not None:
            self._load_policy()
        a = cfg.alerts
        self.writer = _alert_writer(self.output)
        self.writer.cap = AlertCap(a.max_per_window, a.window, a.max_per_run,
                                   on_held=self.metrics.observe_held_back)
        if self.fleet_options is not None:
            try:
                self.fleet = FleetSink(self.fleet_options, self.scorer, self.metrics)
            except ValueError as exc:
                raise RuntimeError(str(exc)) from None
            self.fleet.start()  # the fleet model before the first event
        # Started before attaching, so that the first list is usually done by the first event.
        self.pods = start_pod_directory(cfg.agent)
        self.tracer = Tracer(
            cfg.catalog,
            probe=cfg.agent.probe,
            proc_root=cfg.agent.proc_root,
            passwd_path=cfg.agent.passwd,
            host_name=cfg.agent.node_name,
            pods=self.pods,
            cgroup_root=cfg.agent.cgroup_root,
        )
        failure: ProbeError | None = None
        # BCC and libbpf print on fd 2 while modes are tried; said once, in our words.
        with libout.capture_fd2() as library_lines:
            try:
                mode = self.tracer.start()
            except ProbeError as exc:
                failure = exc
        line = library_lines.summary("probe attach")
        if line:
            log.info("%s", line)
        if failure is not None:
            raise RuntimeError(
                f"no probe could attach: {failure}; run `imdswatch doctor` for the fixes")
        self.attached = True
        self.mode = mode
        self._start_deny()
        release_freed_memory()
        fallback = cfg.agent.probe == "auto" and mode != AUTO_ORDER[0]
        self.metrics.set_probe(mode, fallback)
        self.metrics.set_request_capture(self.tracer.tracker is not None,
                                         follows_nat=self.tracer.requests_limited is None)
        self.metrics.set_kernel_identity(self.tracer.identity_unavailable is None,
                                         record=self.tracer.record_unavailable is None)
        self.metrics.update_model(self.scorer)
        log.info("agent ready: probe %s, metrics on http://%s/metrics, learning %s",
                 mode, cfg.metrics.address, "on" if self.scorer.learning else "off")
        log.info("%s", status.learning_status(self.scorer).text)
        self._next_summary = time.monotonic() + cfg.agent.summary_interval

    def _load_policy(self) -> None:
        """The policy file at start (RuntimeError: exit 2); the gate that applies it."""
        assert self.enforce is not None and self.metrics is not None
        if self.enforce.policy_path == "fleet":
            pol = self._fleet_policy()
        else:
            self._policy_stat = self._policy_file_stat()
            try:
                pol = load_policy(self.enforce.policy_path, self.config.catalog)
            except PolicyError as exc:
                raise RuntimeError(str(exc)) from None
        # Deny mode starts as audit: the kernel side arms later (DenyController.tick).
        self.gate = PolicyGate(pol, self.config.catalog, "audit")
        self.policy_metrics = PolicyMetrics(self.metrics.registry)
        self.policy_metrics.set_policy(len(pol.rules))
        self.policy_metrics.set_mode("audit", self.enforce.mode)
        log.info("enforcement %s: policy %s, %d rules, default %s", self.enforce.mode,
                 self.enforce.policy_path, len(pol.rules), pol.default)

    def _policy_file_stat(self) -> tuple | None:
        assert self.enforce is not None
        try:
            st = os.stat(self.enforce.policy_path)  # follows a ConfigMap's symlinks
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _watch_policy_file(self) -> None:
        """A policy file that changed (an edit, a ConfigMap update) is reloaded as on
        SIGHUP."""
        if self.enforce is None or self.fleet_policy is not None or self.gate is None:
            return
        st = self._policy_file_stat()
        if st is not None and st != self._policy_stat:
            self._policy_stat = st
            self.reload_policy()

    def _fleet_policy(self) -> Policy:
        """`--policy fleet`: the fleet's policy, else the last good copy, else an empty
        policy (nothing denied) until one arrives."""
        f = self.fleet_options
        if f is None:
            raise RuntimeError("--policy fleet needs --fleet URL")
        try:
            self.fleet_policy = FleetPolicy(f.url, f.spool, f.token_file, f.ca_file,
                                            self.config.catalog)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        pol, source = self.fleet_policy.initial()
        self.fleet_policy.start()
        if pol is None:
            log.warning("no fleet policy yet: nothing is denied until serve publishes one")
            return Policy()
        log.info("policy from %s", source)
        return pol

    def _apply_fleet_policy(self) -> None:
        """A policy the fetcher got (whole, on this loop), refusals reported as alerts."""
        fp = self.fleet_policy
        if fp is None or self.gate is None or self.policy_metrics is None:
            return
        pol, refusals = fp.take()
        for why in refusals:
            self.policy_metrics.reload_failures.inc()
            self._write_line({"@timestamp": rfc3339_millis(time.time()),
                              "event": {"kind": "alert", "action": "policy_rejected"},
                              "rule": {"name": "Fleet Enforcement Policy Rejected"},
                              "imdswatch": {"policy": {"error": why[:500]}}})
        if pol is not None:
            self.gate.policy = pol
            if self.deny is not None:
                self.deny.set_policy(pol)
            self.policy_metrics.set_policy(len(pol.rules))

    def reload_policy(self) -> None:
        """SIGHUP: the policy file again; a refused one leaves the current one in force."""
        if self.enforce is None or self.gate is None or self.policy_metrics is None:
            return
        if self.fleet_policy is not None:
            return  # the fleet's policy comes from serve
        self._policy_stat = self._policy_file_stat()
        try:
            pol = load_policy(self.enforce.policy_path, self.config.catalog)
        except PolicyError as exc:
            self.policy_metrics.reload_failures.inc()
            log.error("policy reload failed, keeping the current policy: %s", exc)
            return
        self.gate.policy = pol  # one assignment: every call sees the old or the new policy
        if self.deny is not None:
            self.deny.set_policy(pol)
        self.policy_metrics.set_policy(len(pol.rules))
        log.info("policy reloaded from %s: %d rules, default %s", self.enforce.policy_path,
                 len(pol.rules), pol.default)

    def _judge(self, event: Any, cookie: int | None = None) -> None:
        """Apply the policy to one traced call: a metric and a (rate-limited) alert line
        for a call it denies. A call the kernel refused is reported by DenyController
        (connection_denied); every other call the policy denies passed the kernel and is a
        would_deny line, marked why it passed."""
        gate, pm = self.gate, self.policy_metrics
        if gate is None or pm is None:
            return
        verdict = gate.judge(event)
        if verdict is None:
            return
        if self.deny is not None and self.deny.refused(cookie):
            return  # the kernel refused this connect and reported it (DenyController)
        out_of_scope = self.deny is not None and not self.deny.covers(
            event.container_id, event.pod, event.namespace)
        action = WOULD_DENY
        pm.decided(action, verdict.decision.rule, verdict.endpoint.id, verdict.request_class)
        folded = gate.admit_line(event, verdict)
        if folded is None or self.output_error is not None or self.writer is None:
            return
        doc = build_policy_alert(event, verdict, action, gate.mode, folded)
        if out_of_scope:  # allowed in the kernel: outside --enforce-scope
            doc["imdswatch"]["policy"]["scope"] = "out"
        elif gate.mode == "deny":
            # Armed and in scope, yet the kernel let it through: its maps allow more than
            # the policy (a widened allow entry, an audit-only deny rule, a request class
            # it could not tell) or the caller's cgroup had not entered the scope map yet.
            doc["imdswatch"]["policy"]["kernel"] = "not_enforced"
        self._write_line(doc)

    def _write_line(self, doc: dict) -> None:
        if self.output_error is not None or self.writer is None:
            return
        try:
            self.writer.write_document(doc)
        except OSError as exc:
            name = "standard output" if self.output == "-" else str(self.output)
            self.output_error = f"{name}: cannot write alerts ({exc.strerror or exc})"
            log.error("%s: stopping", self.output_error)
            self.stop.set()

    def _start_deny(self) -> None:
        """`--enforce deny`: the kernel side, linked disarmed once the tracer runs."""
        e = self.enforce
        if e is None or e.mode != "deny" or self.gate is None or self.policy_metrics is None:
            return
        assert e.cgroup is not None
        self.deny = DenyController(
            self.gate, self.policy_metrics, e.cgroup, e.off_file, e.max_callers,
            self._write_line, self._learning, self.config.agent.passwd or "/etc/passwd",
            e.scope, self._namespace_of)
        self.deny.start()

    def _namespace_of(self, pod_uid: str) -> str | None:
        found = self.pods.lookup(pod_uid) if self.pods is not None else None
        return found[0] if found is not None else None

    def _learning(self) -> bool:
        return self.scorer.learning and self.config.scorer.learning_period > 0

    def _alive(self) -> bool:
        return time.monotonic() - self._last_loop < LIVE_STALL_S

    # -- the loop --------------------------------------------------------------------------

    def handle(self, doc: dict) -> None:
        """Score one ECS document from the tracer and export the result."""
        assert self.metrics is not None and self.writer is not None
        s = self.stats
        s.events += 1
        try:
            event = event_from_ecs(doc)
        except MalformedEvent as exc:
            s.malformed += 1
            self.metrics.observe_malformed()
            log.warning("unusable event from the tracer: %s", exc)
            return
        try:
            if self.fleet is not None:
                outcome = self.fleet.handle(event)  # scored here only while the fleet is away
            else:
                outcome = self.scorer.process(event)
        except ValueError as exc:  # an event time the model refuses (not epoch seconds)
            s.malformed += 1
            self.metrics.observe_malformed()
            log.warning("unusable event from the tracer: %s", exc)
            return
        except Exception:
            # One event must never stop the agent; the log rate limit keeps a stream of
            # such events from flooding the log with tracebacks.
            s.failed += 1
            self.metrics.observe_failed()
            log.exception("scoring an event failed; the event is skipped")
            return
        if outcome is None:
            # The kernel filter and the catalog agree, so this only happens right after a
            # reload removed an endpoint while its events were in flight.
            s.skipped += 1
            self.metrics.observe_skipped()
            return
        s.scored += 1
        self.metrics.observe(outcome)
        if self.gate is not None:
            try:
                self._judge(event, _socket_cookie(doc))
            except Exception:
                self.metrics.observe_failed()
                log.exception("applying the policy to an event failed; the event is skipped")
        if outcome.alert:
            s.alerts += 1
            if self.output_error is not None:
                return
            try:
                self.writer.write(outcome)
            except OSError as exc:
                name = "standard output" if self.output == "-" else str(self.output)
                self.output_error = f"{name}: cannot write alerts ({exc.strerror or exc})"
                log.error("%s: stopping", self.output_error)
                self.stop.set()

    def run(self) -> None:
        assert self.tracer is not None and self.metrics is not None
        interval = float(self.config.agent.state_save_interval)
        next_house = time.monotonic() + HOUSEKEEPING_S
        next_trim = time.monotonic() + TRIM_S
        next_save = time.monotonic() + interval if self.state_path and interval > 0 else None
        while not self.stop.is_set():
            self.tracer.poll(POLL_MS, self.handle)
            if self.deny is not None:
                self.deny.tick()  # break glass and the kernel's denials, every turn
            now = time.monotonic()
            self._last_loop = now
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
                self.reload_policy()
            if now >= next_house:
                next_house = now + HOUSEKEEPING_S
                self.housekeeping()
            if next_save is not None and now >= next_save:
                next_save = now + interval
                self.save()
                next_trim = now  # saving built the state's chunks: free them now
            if now >= next_trim:
                next_trim = now + TRIM_S
                release_freed_memory()

    def housekeeping(self) -> None:
        assert self.tracer is not None and self.metrics is not None
        self._apply_fleet_policy()
        self._watch_policy_file()
        self.metrics.update_model(self.scorer)
        if self.fleet is not None:
            self.fleet.housekeeping()
        k = self.tracer.kernel_stats()
        self.metrics.set_kernel_counts(k["matched"], k["dropped"])
        self.metrics.set_request_capture(self.tracer.tracker is not None,
                                         k.get("segments_dropped"))
        # The per-(comm, uid, cgroup) map only changes when `matched` does: a quiet second
        # costs no map walk.
        if k["matched"] != self._matched_read:
            self._matched_read = k["matched"]
            self.metrics.set_kernel_connection_counts(self.tracer.connection_counts())
        self._report(k)

    def _report(self, kernel: dict[str, int]) -> None:
        """Alert-cap summaries, learning metrics and the periodic one-line summary."""
        assert self.metrics is not None
        if self.writer is not None and self.output_error is None:
            try:
                # Live events carry the wall clock, so it is also the alert windows' clock.
                self.writer.flush_cap(time.time())
            except OSError as exc:
                self.output_error = f"cannot write alerts ({exc.strerror or exc})"
                log.error("%s: stopping", self.output_error)
                self.stop.set()
        learning = status.learning_status(self.scorer)
        self.metrics.set_learning_end(learning.ends_event_ts, learning.ends_wall_ts)
        if self.log_limiter is not None:
            self.metrics.set_log_suppressed(self.log_limiter.suppressed_total)
        now = time.monotonic()
        if now < self._next_summary:
            return
        self._next_summary = now + self.config.agent.summary_interval
        if self.log_limiter is not None:
            self.log_limiter.flush(log)
        cap = self.writer.cap if self.writer is not None else None
        log.info("%s", status.summary_line(self.stats, self.mode, kernel,
                                           cap.held_total if cap else 0, self.stats.started,
                                           learning))

    def reload(self) -> None:
        """SIGHUP: re-read the config file's endpoints and exceptions, live."""
        from imdswatch.config import ConfigError, load_config

        path = getattr(self.config, "path", None)
        if not path:
            log.info("SIGHUP ignored: the agent runs without a config file")
            return
        try:
            fresh = load_config(path)
        except ConfigError as exc:
            log.error("config reload failed, keeping the current one: %s", exc)
            return
        assert self.tracer is not None
        self.tracer.set_catalog(fresh.catalog)
        self.scorer.catalog = fresh.catalog
        self.scorer.exceptions = tuple(fresh.exceptions)
        self.config.catalog, self.config.exceptions = fresh.catalog, fresh.exceptions
        log.info("config reloaded from %s: %d endpoints, %d exceptions", path,
                 len(fresh.catalog), len(fresh.exceptions))
        if self.gate is not None:
            self.gate.catalog = fresh.catalog

    def save(self) -> None:
        # Never before attaching: a state that failed to load must not be overwritten.
        if not self.state_path or not self.attached:
            return
        try:
            save_state(self.state_path, self.scorer)
        except OSError as exc:
            self.save_error = exc.strerror or str(exc)
            log.error("cannot save state to %s: %s", self.state_path, exc)
        else:
            self.save_error = None

    # -- stop ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Detach, score what is already buffered, save state, close outputs."""
        if self.deny is not None:
            self.deny.close()  # first: nothing denies from here on
            self.deny = None
        if self.fleet_policy is not None:
            self.fleet_policy.close()
        if self.tracer is not None:
            try:
                # Bounded: a flood still going on must not delay the exit.
                # final: connections still waiting for their first request are reported
                self.tracer.drain(self.handle, max_events=20_000, final=True)
                self.housekeeping()
            except Exception as exc:  # never let a last-moment error keep probes attached
                log.error("while draining events: %s", exc)
            self.tracer.close()
        if self.pods is not None:
            self.pods.close()
        if self.fleet is not None:
            self.fleet.close()
        self.save()
        self._state_lock.close()
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                log.error("closing the alert output: %s", exc)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        s = self.stats
        log.info("stopped after %.0fs: %d events, %d scored, %d alerts, %d skipped, "
                 "%d malformed, %d failed", time.monotonic() - s.started, s.events, s.scored,
                 s.alerts, s.skipped, s.malformed, s.failed)


def _install_signals(agent: Agent) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_stop(signum: int, _frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        agent.stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        agent.reload_requested = True

    previous = {}
    for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                         (signal.SIGHUP, on_hup)):
        previous[sig] = signal.signal(sig, handler)
    return previous


def run_agent(
    config: Config,
    state_path: str | None = None,
    probe: str | None = None,
    metrics_address: str | None = None,
    output: str | IO[Any] = "-",
    learning_period: float | None = None,
    *,
    stop: threading.Event | None = None,
    fleet: FleetOptions | None = None,
    enforce: EnforceOptions | None = None,
) -> int:
    """`imdswatch run`. Arguments left None keep the config's values. Returns the exit
    status: 0 after a clean stop, 2 when the machine cannot trace or a setting is unusable."""
    _setup_logging()
    if probe is not None:
        config.agent.probe = probe
    if metrics_address is not None:
        config.metrics.address = metrics_address
    if learning_period is not None:
        config.scorer.learning_period = learning_period
    problems = doctor.preflight(config.agent.probe, config.agent.cgroup_root)
    if problems:
        for p in problems:
            print(f"imdswatch run: {p}", file=sys.stderr)
        return 2
    agent = Agent(config, state_path=state_path, output=output, stop=stop, fleet=fleet,
                  enforce=enforce)
    previous = _install_signals(agent)
    try:
        try:
            agent.start()
        except RuntimeError as exc:
            return _fail(str(exc))
        agent.run()
    finally:
        agent.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = 0
    if agent.output_error is not None:
        status = _fail(agent.output_error)
    if agent.save_error is not None:
        print(f"imdswatch run: the state was not saved to {state_path} ({agent.save_error}); "
              "what this run learnt is lost", file=sys.stderr, flush=True)
        status = status or 1
    return status


def _socket_cookie(doc: dict) -> int | None:
    """The traced connect's socket cookie (`imdswatch.socket_cookie`, cgroup probe mode)."""
    imds = doc.get("imdswatch")
    cookie = imds.get("socket_cookie") if isinstance(imds, dict) else None
    return cookie if isinstance(cookie, int) and not isinstance(cookie, bool) else None
