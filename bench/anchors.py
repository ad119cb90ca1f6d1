# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The public detections imdswatch is measured against, implemented from their
published definitions (no code of theirs is used; see each class for the source).

Every anchor reads `scoring.events.Event`s in event-time order through `observe(n, ev)`,
where `n` is the event's position in the trace, and reports `Detection`s: "event n is
covered by alert `key`, raised at time `alert_ts`". An alert covers every event its
analyst would see in it (an Elastic anomaly record covers all events of its bucket and
process name), which is how recall and false-positive entities are then counted.
`finish()` flushes what is still pending at the end of the trace.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

from scoring.events import Event

IMDS_V4 = "169.254.169.254"


@dataclass(frozen=True, slots=True)
class Detection:
    alert_ts: float  # when the alert reaches an analyst (event-time clock)
    n: int  # index of the covered event in the trace
    key: Hashable  # identifies the alert, so one alert covering many events counts once


def next_run(t: float, interval: float, phase: float) -> float:
    """The first scheduled run at or after `t` of a rule that runs every `interval`
    seconds at `phase` seconds past the epoch-aligned interval."""
    k = math.ceil((t - phase) / interval)
    return phase + k * interval


class FalcoMetadataFromContainer:
    """Falco's "Contact cloud metadata service from container".

    Source: falcosecurity/rules, rules/falco-incubating_rules.yaml. Condition:
    `outbound and container and fd.sip="169.254.169.254" and not user_known_metadata_access`,
    where the shipped `user_known_metadata_access` is `k8s.ns.name = "kube-system"`.
    Here: every connection attempt is `outbound`; `container` is a container id being
    present; the namespace is `orchestrator.namespace`. Only the IPv4 address matches
    (no IPv6 IMDS, no AWS ECS/EKS/WireServer/GKE endpoints). Falco evaluates each syscall as
    it happens, so an alert is raised at the event's own time and every matching event
    is its own alert.
    """

    name = "Falco: metadata from container"

    def __init__(self, allowed_namespaces: frozenset[str] = frozenset({"kube-system"})) -> None:
        self.allowed = allowed_namespaces
        self.detections: list[Detection] = []

    def choices(self) -> str:
        return (f"alerts on every connection to {IMDS_V4} (IPv4 only) from a container "
                f"outside the namespaces {', '.join(sorted(self.allowed))} (the shipped "
                "`user_known_metadata_access`), at the event's own time, one alert per event")

    def observe(self, n: int, ev: Event) -> None:
        if ev.dst_ip == IMDS_V4 and ev.container_id and ev.namespace not in self.allowed:
            self.detections.append(Detection(ev.ts, n, ("falco", n)))

    def finish(self) -> list[Detection]:
        return self.detections


class ElasticRareMetadataProcess:
    """Elastic's "Unusual Linux Process Calling the Metadata Service".

    Source: elastic/detection-rules, rules/ml/credential_access_ml_linux_anomalous_
    metadata_process.toml (anomaly_threshold 50, interval 15m, from now-45m) over the ML
    job `v3_linux_rare_metadata_process` (Kibana security_linux module): detector
    `rare by process.name`, bucket_span 15m, influencers host.name, user.name,
    process.name; the datafeed keeps only destination.ip 169.254.169.254 (IPv4).

    The ML `rare` function is proprietary; this is a principled approximation. The model
    is one population over all hosts. When a bucket closes, each process name in it is
    scored by how rarely it has appeared in past buckets: with `c` = buckets (of the
    `N` elapsed since the job started) that contained the name, its bucket frequency is
    estimated as p = (c + ½) / (N + 1) (Krichevsky–Trofimov, so a never-seen name is not
    infinitely surprising), and the record score is 25·(−log10 p), capped at 100: a name
    in 1% of buckets scores 50, one in 0.01% scores 100, a name never seen in the first
    day of history (N = 96) scores ≥ 57 and one never seen in a week ≥ 78; recurrent names
    decay toward 0 as `c` grows. No record is produced until `min_buckets` of history
    exist (the job's own warm-up). A record at or above the threshold is an alert that
    covers every event of that name in that bucket.

    Latency, modelled from the published schedule: results for a bucket exist only when
    the bucket has closed and the datafeed's `query_delay` has passed (Elastic's default
    is 60–120 s; 90 s is used); the rule then picks them up at its next run, every
    15 minutes at a fixed phase (`rule_phase`, seconds past the quarter hour). So an
    event is alerted 1.5–30 minutes after it happened, never sooner.
    """

    name = "Elastic ML rare process (v3_linux_rare_metadata_process)"

    def __init__(self, bucket_span: float = 900.0, threshold: float = 50.0,
                 query_delay: float = 90.0, rule_interval: float = 900.0,
                 rule_phase: float = 420.0, min_buckets: int = 16) -> None:
        self.bucket_span = bucket_span
        self.threshold = threshold
        self.query_delay = query_delay
        self.rule_interval = rule_interval
        self.rule_phase = rule_phase
        self.min_buckets = min_buckets
        self.buckets_with: dict[str, int] = defaultdict(int)
        self.first_bucket: int | None = None
        self.current: int | None = None
        self.in_bucket: dict[str, list[int]] = {}
        self.detections: list[Detection] = []
        self.records: list[tuple[int, str, float]] = []  # (bucket, name, score)

    def choices(self) -> str:
        return (f"`rare by process.name` over all hosts in {self.bucket_span / 60:g}-minute "
                f"buckets, {IMDS_V4} only (the datafeed's filter); the proprietary ML `rare` "
                "function approximated: record score = 25 x -log10(p), capped at 100, with p = "
                "(buckets holding the name + 1/2) / (buckets elapsed + 1) (Krichevsky-Trofimov),"
                " so a name in 1% of buckets scores 50 and one in 0.01% scores 100; no record "
                f"before {self.min_buckets} buckets of history; alert at record score >= "
                f"{self.threshold:g} (the rule's anomaly_threshold), covering every event of "
                f"the name in the bucket; results read {self.query_delay:g} s after the bucket "
                f"closes (query_delay) by a rule run every {self.rule_interval / 60:g} minutes "
                f"({self.rule_phase:g} s past the quarter hour)")

    def score(self, name: str, elapsed: int) -> float:
        """Record score for `name` in a bucket after `elapsed` buckets of history."""
        p = (self.buckets_with.get(name, 0) + 0.5) / (elapsed + 1)
        return min(100.0, 25.0 * -math.log10(p))

    def _close(self) -> None:
        b = self.current
        if b is None or self.first_bucket is None:
            return
        elapsed = b - self.first_bucket
        end = (b + 1) * self.bucket_span
        alert_ts = next_run(end + self.query_delay, self.rule_interval, self.rule_phase)
        for name, ns in self.in_bucket.items():
            s = self.score(name, elapsed)
            if elapsed >= self.min_buckets and s >= self.threshold:
                self.records.append((b, name, s))
                key = ("ml", b, name)
                self.detections.extend(Detection(alert_ts, n, key) for n in ns)
        for name in self.in_bucket:
            self.buckets_with[name] += 1
        self.in_bucket = {}

    def observe(self, n: int, ev: Event) -> None:
        if ev.dst_ip != IMDS_V4:
            return
        b = int(ev.ts // self.bucket_span)
        if self.current is None:
            self.first_bucket = self.current = b
        elif b != self.current:
            self._close()
            self.current = b
        self.in_bucket.setdefault(ev.name, []).append(n)

    def finish(self) -> list[Detection]:
        self._close()
        self.current = None
        return self.detections


# The new_terms rule's query, as lists (KQL keyword matches are case-sensitive).
_NT_NAMES = frozenset((
    "bash", "dash", "sh", "tcsh", "tclsh", "wish", "csh", "zsh", "ksh", "fish", "mksh",
    "busybox", "ld.so", "ld-linux-x86-64.so.2", "bun", "node", "nodejs", "deno", "java",
    "env", "timeout", "setsid", "flock", "curl", "wget", "pwsh", "terminal", "osascript",
    "nohup", "javaw",
))
_NT_NAME_PREFIXES = ("python", "perl", "ruby", "lua", "php", ".")
_NT_EXE_PREFIXES = ("./", "/boot/", "/dev/shm/", "/run/", "/var/run/", "/tmp/", "/var/tmp/",
                    "/var/www/", "/root/", "/private/var/tmp/", "/var/folders/",
                    "/Users/Shared/", "/var/root/")


class ElasticNewTermsImds:
    """Elastic's "Suspicious Instance Metadata Service (IMDS) API Request" (new_terms).

    Source: elastic/detection-rules, rules/cross-platform/credential_access_suspicious_
    instance_metadata_service_api_request.toml. Query: network events to destination
    169.254.169.254 port 80 whose process.name is a shell, interpreter or download tool
    (bash, sh, curl, wget, node, java, python*, perl*, ruby*, lua*, php*, names starting
    with ".", ...) or whose process.executable lies in a user-writable or temporary place
    (/tmp/*, /var/tmp/*, /dev/shm/*, /run/*, /home/*/*, /root/*, /var/www/*, ./*, ...),
    minus macOS node and VS Code helpers. New-terms fields: host.id + process.executable,
    history window now-7d. The rule has no `interval`, so it runs at Kibana's default of
    every 5 minutes, over `from = now-9m`, on `event.ingested` (timestamp_override).

    Here: host.name stands for host.id (one per node in the scenario). Events are
    ingested `ingest_delay` seconds after they happen (30 s, a typical Elastic Defend
    batch). A run at R looks at events ingested in (R−9m, R]; a (host, executable) pair
    is new when no event of it was ingested in [R−7d, R−9m). An event is alerted by the
    first run that sees it; the alert covers the pair's events in that run's window.
    """

    name = "Elastic new_terms IMDS request"

    def __init__(self, interval: float = 300.0, lookback: float = 540.0,
                 history: float = 7 * 86400.0, ingest_delay: float = 30.0,
                 rule_phase: float = 130.0) -> None:
        self.interval = interval
        self.lookback = lookback
        self.history = history
        self.ingest_delay = ingest_delay
        self.rule_phase = rule_phase
        self.seen: dict[tuple[str | None, str | None], list[float]] = defaultdict(list)
        self.detections: list[Detection] = []

    def choices(self) -> str:
        return (f"the rule's query (shells, interpreters and download tools by name, "
                f"user-writable or temporary executable paths) on {IMDS_V4}:80; a "
                "(host.name, process.executable) pair not seen in the previous "
                f"{self.history / 86400:g} days alerts; runs every {self.interval / 60:g} "
                f"minutes over the last {self.lookback / 60:g} ({self.rule_phase:g} s phase), on "
                f"events ingested {self.ingest_delay:g} s after they happen; host.name stands "
                "for host.id")

    @staticmethod
    def matches(ev: Event) -> bool:
        if ev.dst_ip != IMDS_V4 or ev.dst_port != 80:
            return False
        name, exe = ev.name, ev.exe or ""
        if name in _NT_NAMES or name.startswith(_NT_NAME_PREFIXES):
            return True
        if exe.startswith(_NT_EXE_PREFIXES):
            return True
        # /home/*/*: a file at least one directory below a home directory.
        return exe.startswith("/home/") and exe.count("/") >= 3

    def observe(self, n: int, ev: Event) -> None:
        if ev.exe is None or not self.matches(ev):
            return  # a document without the field has no term to be new
        term = (ev.host, ev.exe)
        ingested = ev.ts + self.ingest_delay
        run = next_run(ingested, self.interval, self.rule_phase)
        times = self.seen[term]
        # History of the run: ingested in [run - history, run - lookback).
        hi = bisect.bisect_left(times, run - self.lookback)
        lo = bisect.bisect_left(times, run - self.history, 0, hi)
        if hi == lo:
            self.detections.append(Detection(run, n, ("new_terms", run, term)))
        times.append(ingested)  # events arrive in time order, so this stays sorted

    def finish(self) -> list[Detection]:
        return self.detections


# Substrings of the credential and token paths of AWS IMDS (and Alibaba's RAM), the AWS ECS
# and EKS Pod Identity credential endpoints, GCP's service-account tokens and Azure's
# managed identity, as a hand-written SIEM or Falco rule on `url.path` would list them.
_SECRET_PATHS = re.compile(
    r"security-credentials|/v2/credentials|/v1/credentials|/service-accounts/[^/]+/token"
    r"|/identity/oauth2/token")


class PathRuleUnguardedCredentials:
    """A fixed rule on the request: "credentials or a token asked for without the
    anti-SSRF header". The simplest request-aware detection (what a team writes once it
    has request capture): `url.path` matches a credential or token path and
    `imdswatch.request.guarded` is false. Evaluated inline on each event (as Falco or an
    agent-side rule would), so an alert is raised at the event's own time, one per event.
    No history, no exceptions: every unguarded legitimate caller alerts every time.
    """

    name = "Path rule: credentials/token without the anti-SSRF header"

    def __init__(self) -> None:
        self.detections: list[Detection] = []

    def choices(self) -> str:
        return ("alerts on every request whose path is a credential or token path (AWS role "
                "credentials, AWS ECS/EKS credential endpoints, GCP service-account tokens, "
                "Azure managed identity) sent without the anti-SSRF header, at the event's own "
                "time, one alert per event; no history, no exceptions")

    def observe(self, n: int, ev: Event) -> None:
        if ev.guarded is False and ev.path is not None and _SECRET_PATHS.search(ev.path):
            self.detections.append(Detection(ev.ts, n, ("path_rule", n)))

    def finish(self) -> list[Detection]:
        return self.detections


ANCHORS = (ElasticRareMetadataProcess, FalcoMetadataFromContainer, ElasticNewTermsImds,
           PathRuleUnguardedCredentials)
