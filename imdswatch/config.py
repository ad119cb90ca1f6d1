"""The configuration file (TOML), validated up front so a typo fails at start with the
offending key named, not silently hours later. Every setting has a default; no file at
all means the defaults. See `docs/configuration.md` for an annotated example."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scoring.allowlist import ExceptionRule, parse_exception
from scoring.detectors import DETECTOR_NAMES
from scoring.durations import parse_duration
from scoring.endpoints import EndpointCatalog
from scoring.settings import ScorerSettings
from tracer.enforce_scope import Scope, ScopeError, parse_scope


class ConfigError(ValueError):
    """An unusable configuration; the message names the file and the key."""


@dataclass
class MetricsSettings:
    address: str = "0.0.0.0:9464"
    # Series per labelled metric; beyond it the least recently updated series is evicted.
    max_series: int = 1000
    # An anomalous entity's score gauge disappears this long after its last anomaly,
    # so Prometheus alerts on it resolve.
    anomaly_ttl: float = 900.0


@dataclass
class AlertSettings:
    # At most this many alert lines per window of event time (0: no cap), then one summary
    # line per window saying how many were held back: the Elastic rule this project
    # replaces writes at most 100 alerts per 15-minute run (max_signals).
    max_per_window: int = 100
    window: float = 900.0
    # At most this many alert lines in the whole run (0: no cap).
    max_per_run: int = 0
    # True when the configuration has an [alerts] table. The live agent always caps (an
    # anomaly storm must not bury the SIEM); `replay` caps only when asked to, since its
    # contract is one line for each event that reaches the threshold.
    configured: bool = False


@dataclass
class AgentSettings:
    probe: str = "auto"
    proc_root: str = "/proc"
    passwd: str = "/etc/passwd"
    state_save_interval: float = 300.0
    # How often the agent logs its one-line summary (events, alerts, probe, drops).
    summary_interval: float = 300.0
    # host.name of live events: $NODE_NAME (the DaemonSet sets it from the downward API),
    # else the tracer uses the machine's hostname.
    node_name: str | None = field(default_factory=lambda: os.environ.get("NODE_NAME") or None)
    # Pod name and namespace from the Kubernetes API: "auto" = when running in a cluster
    # ($KUBERNETES_SERVICE_HOST set) or when `kubernetes_api` is given; "on"; "off".
    kubernetes: str = "auto"
    # API base URL, e.g. "http://127.0.0.1:8001" behind `kubectl proxy`; default in-cluster.
    kubernetes_api: str | None = None
    # The cgroup v2 root the `cgroup` probe attaches to; None: the cgroup2 mount at
    # /sys/fs/cgroup, else /sys/fs/cgroup/unified, from /proc/self/mounts.
    cgroup_root: str | None = None
    # With `run --enforce deny`: which callers may be denied (all, hosts, pods,
    # namespaces=a,b); the others are only audited. `--enforce-scope` overrides it.
    enforce_scope: Scope = field(default_factory=Scope)


@dataclass
class Config:
    scorer: ScorerSettings = field(default_factory=ScorerSettings)
    catalog: EndpointCatalog = field(default_factory=EndpointCatalog.from_config)
    exceptions: tuple[ExceptionRule, ...] = ()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    path: str | None = None
    # The [scoring] keys the file set: a command's own defaults give way to them.
    scoring_keys: frozenset[str] = frozenset()


PROBES = ("auto", "kprobe", "fentry", "cgroup", "tracepoint")
KUBERNETES_MODES = ("auto", "on", "off")


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} in [{where}]: "
            f"{', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})"
        )


def _duration(value: Any, where: str, positive: bool = False) -> float:
    """A finite, non-negative duration (TOML's nan and inf are refused here too)."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a duration such as \"30s\" or \"7d\", "
                          f"not {value!r}")
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if positive and seconds <= 0:
        raise ConfigError(f"{where} must be longer than zero")
    return seconds


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    # `lo <= nan` is False, so NaN is refused along with everything out of range.
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}] must be a table, not {value!r}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    return value


# The bounds of `scoring.max_entities`: below the minimum a fleet's own callers would be
# evicted.
MIN_ENTITIES, MAX_ENTITIES = 1000, 100_000_000


def _scoring(t: dict) -> ScorerSettings:
    t = _table(t, "scoring")
    _check_keys(t, {"threshold", "detector_thresholds", "learning_period", "half_life",
                    "suppression_window", "known_caller_factor", "max_entities"}, "scoring")
    s = ScorerSettings()
    if "threshold" in t:
        s.threshold = _number(t["threshold"], "scoring.threshold", 0, 100)
    for name, value in _table(t.get("detector_thresholds", {}),
                              "scoring.detector_thresholds").items():
        if name not in DETECTOR_NAMES:
            raise ConfigError(
                f"scoring.detector_thresholds: unknown detector {name!r} "
                f"(detectors: {', '.join(DETECTOR_NAMES)})"
            )
        s.detector_thresholds[name] = _number(value, f"scoring.detector_thresholds.{name}", 0, 100)
    if "learning_period" in t:
        s.learning_period = _duration(t["learning_period"], "scoring.learning_period")
    if "half_life" in t:
        s.half_life = _duration(t["half_life"], "scoring.half_life", positive=True)
    if "suppression_window" in t:
        s.suppression_window = _duration(t["suppression_window"], "scoring.suppression_window")
    if "known_caller_factor" in t:
        s.known_caller_factor = _number(t["known_caller_factor"], "scoring.known_caller_factor",
                                        0, 1)
    if "max_entities" in t:
        v = t["max_entities"]
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_ENTITIES <= v <= MAX_ENTITIES:
            raise ConfigError(f"scoring.max_entities must be an integer from {MIN_ENTITIES} to "
                              f"{MAX_ENTITIES}, not {v!r}")
        s.max_entities = v
    return s


ENDPOINT_KEYS = {"id", "provider", "address", "ports"}
# A metadata service is one address; a network wider than these would make ordinary
# traffic "metadata calls" (and 0.0.0.0/0 or ::/0 all of it).
MIN_PREFIX = {4: 16, 6: 64}


def _endpoint_spec(spec: Any, i: int) -> dict:
    where = f"endpoints.add #{i}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a table such as {{ address = \"10.0.0.5\" }}, "
                          f"not {spec!r}")
    _check_keys(spec, ENDPOINT_KEYS, where)
    _string(spec.get("address"), f"{where}.address")
    for key in ("id", "provider"):
        if key in spec:
            _string(spec[key], f"{where}.{key}")
    ports = spec.get("ports", [])
    if not isinstance(ports, list) or any(
            isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536 for p in ports):
        raise ConfigError(f"{where}.ports must be a list of port numbers 1-65535, "
                          f"not {ports!r}")
    return spec


def _endpoints(t: dict) -> EndpointCatalog:
    t = _table(t, "endpoints")
    _check_keys(t, {"add", "remove", "builtin"}, "endpoints")
    builtin = t.get("builtin", True)
    if not isinstance(builtin, bool):
        raise ConfigError(f"endpoints.builtin must be true or false, not {builtin!r}")
    add = t.get("add", [])
    remove = t.get("remove", [])
    if not isinstance(add, list):
        raise ConfigError("endpoints.add must be a list of tables")
    if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
        raise ConfigError(f"endpoints.remove must be a list of endpoint ids or addresses, "
                          f"not {remove!r}")
    specs = [_endpoint_spec(spec, i) for i, spec in enumerate(add, 1)]
    try:
        catalog = EndpointCatalog.from_config(add=specs, remove=remove, builtin=builtin)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"endpoints: {exc}") from None
    for e in catalog:
        n = e.network
        if n.prefixlen < MIN_PREFIX[n.version] or n.network_address.is_unspecified:
            raise ConfigError(
                f"endpoints: {n} is too broad for a metadata endpoint (at most a /"
                f"{MIN_PREFIX[n.version]} network, and not the unspecified address): it "
                "would count ordinary traffic as metadata calls")
    if not len(catalog):
        raise ConfigError("endpoints: no endpoint left to watch")
    return catalog


def _exceptions(rules: Any) -> tuple[ExceptionRule, ...]:
    if not isinstance(rules, list):
        raise ConfigError("exceptions must be an array of tables ([[exceptions]])")
    out = []
    for i, spec in enumerate(rules, 1):
        if not isinstance(spec, dict):
            raise ConfigError(f"exceptions #{i} must be a table, not {spec!r}")
        try:
            rule = parse_exception(spec)
        except ValueError as exc:
            raise ConfigError(f"exceptions #{i}: {exc}") from None
        unknown = rule.detectors - set(DETECTOR_NAMES)
        if unknown:
            raise ConfigError(f"exceptions #{i}: unknown detectors {', '.join(sorted(unknown))} "
                              f"(detectors: {', '.join(DETECTOR_NAMES)})")
        out.append(rule)
    return tuple(out)


def _address(value: Any, where: str) -> str:
    text = _string(value, where)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be HOST:PORT, not {value!r}")
    return text


def _metrics(t: dict) -> MetricsSettings:
    t = _table(t, "metrics")
    _check_keys(t, {"address", "max_series", "anomaly_ttl"}, "metrics")
    m = MetricsSettings()
    if "address" in t:
        m.address = _address(t["address"], "metrics.address")
    if "max_series" in t:
        m.max_series = int(_number(t["max_series"], "metrics.max_series", 1, 1_000_000))
    if "anomaly_ttl" in t:
        m.anomaly_ttl = _duration(t["anomaly_ttl"], "metrics.anomaly_ttl")
    return m


def _alerts(t: dict, configured: bool) -> AlertSettings:
    t = _table(t, "alerts")
    _check_keys(t, {"max_per_window", "window", "max_per_run"}, "alerts")
    a = AlertSettings(configured=configured)
    for key in ("max_per_window", "max_per_run"):
        if key in t:
            setattr(a, key, int(_number(t[key], f"alerts.{key}", 0, 1_000_000_000)))
    if "window" in t:
        a.window = _duration(t["window"], "alerts.window")
        if not 0 < a.window < float("inf"):
            raise ConfigError("alerts.window must be a finite duration longer than zero")
    return a


def _agent(t: dict) -> AgentSettings:
    t = _table(t, "agent")
    _check_keys(t, {"probe", "proc_root", "passwd", "state_save_interval", "summary_interval",
                    "node_name",
                    "kubernetes", "kubernetes_api", "cgroup_root", "enforce_scope"}, "agent")
    a = AgentSettings()
    if "probe" in t:
        if t["probe"] not in PROBES:
            raise ConfigError(f"agent.probe must be one of {', '.join(PROBES)}")
        a.probe = t["probe"]
    for key in ("proc_root", "passwd", "node_name", "cgroup_root"):
        if key in t:
            setattr(a, key, _string(t[key], f"agent.{key}"))
    if "kubernetes" in t:
        value = t["kubernetes"]
        if isinstance(value, bool):  # kubernetes = true / false reads naturally too
            value = "on" if value else "off"
        if value not in KUBERNETES_MODES:
            raise ConfigError(f"agent.kubernetes must be one of {', '.join(KUBERNETES_MODES)}")
        a.kubernetes = value
    if "kubernetes_api" in t:
        api = _string(t["kubernetes_api"], "agent.kubernetes_api")
        if not api.startswith(("http://", "https://")):
            raise ConfigError("agent.kubernetes_api must be an http:// or https:// URL")
        a.kubernetes_api = api
    if "enforce_scope" in t:
        try:
            a.enforce_scope = parse_scope(_string(t["enforce_scope"], "agent.enforce_scope"))
        except ScopeError as exc:
            raise ConfigError(f"agent.enforce_scope: {exc}") from None
    if "state_save_interval" in t:
        a.state_save_interval = _duration(t["state_save_interval"],
                                          "agent.state_save_interval")
    if "summary_interval" in t:
        a.summary_interval = _duration(t["summary_interval"], "agent.summary_interval")
        if not 1 <= a.summary_interval < float("inf"):
            raise ConfigError("agent.summary_interval must be a finite duration of 1s or more")
    return a


def parse_config(data: dict, path: str | None = None) -> Config:
    try:
        _check_keys(data, {"scoring", "endpoints", "exceptions", "metrics", "agent", "alerts"},
                    "top level")
        return Config(
            scorer=_scoring(data.get("scoring", {})),
            catalog=_endpoints(data.get("endpoints", {})),
            exceptions=_exceptions(data.get("exceptions", [])),
            metrics=_metrics(data.get("metrics", {})),
            agent=_agent(data.get("agent", {})),
            alerts=_alerts(data.get("alerts", {}), "alerts" in data),
            path=path,
            scoring_keys=frozenset(data.get("scoring", {})),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    except (AttributeError, TypeError) as exc:
        raise ConfigError(f"{path or 'config'}: wrong type of value ({exc})") from None


def load_config(path: str | Path | None) -> Config:
    """The configuration in `path`, or the defaults when `path` is None."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return parse_config(data, str(p))
