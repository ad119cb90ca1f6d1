"""A running tracer: BPF attached, endpoint maps filled, events read, enriched and turned
into ECS documents, kernel counters readable."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from tracer import btf, cgroup_attach, identity_seed, kernel, maps, probes
from tracer.cgroup_paths import CgroupPaths
from tracer.clock import MonotonicClock, rfc3339
from tracer.ecs import to_ecs
from tracer.enrich import Enricher
from tracer.layout import (
    KIND_CLOSE,
    KIND_DATA,
    STAT_NAMES,
    KernelEvent,
    decode,
    decode_segment,
    record_kind,
)
from tracer.maps import Endpoint
from tracer.requests import RequestTracker

log = logging.getLogger("imdswatch.tracer")

# Events handled per poll call at most. libbpf keeps consuming while producers keep adding,
# so under a flood one poll would never return; stopping after a batch gives the caller
# its loop back (housekeeping, signals) and bounds what is held in memory.
MAX_BATCH = 2048


class PodResolver(Protocol):
    """What the tracer asks of a pod directory (tracer.kubernetes.PodDirectory): answers
    from memory, never blocking the event path."""

    def lookup(self, pod_uid: str | None) -> tuple[str, str] | None: ...

    def container_image(self, container_id: str | None) -> str | None: ...


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "0"


class Tracer:
    """Usage: `t = Tracer(catalog); t.start(); while ...: for doc in t.poll(100): ...;
    t.close()`. Not thread-safe: poll from one thread."""

    def __init__(
        self,
        catalog: Iterable[Endpoint],
        *,
        probe: str = "auto",
        proc_root: str = "/proc",
        passwd_path: str = "/etc/passwd",
        host_name: str | None = None,
        ringbuf: bool | None = None,
        ringbuf_pages: int = 256,
        count_entries: int = 16384,
        bpf_directory: Path | None = None,
        pods: PodResolver | None = None,
        cgroup_root: str | None = None,
        requests: bool = True,
        request_variant: str | None = None,
        capture_bytes: int = 1024,
        identity: bool = True,
    ) -> None:
        """`requests`: capture the HTTP requests sent on metadata connections (cgroup_skb
        egress; without it, or where the kernel refuses it, connections are reported
        without their requests). `request_variant` "full" or "tracked" forces one egress
        program (tests; by default the kernel decides, `requests_limited` says what the
        tracked one misses). `identity`: read the process's leader name and executable
        in the kernel (needs kernel BTF for the structure offsets)."""
        if probe != "auto" and probe not in probes.MODES:
            raise ValueError(f"probe must be auto or one of {', '.join(probes.MODES)}")
        self.catalog = tuple(catalog)
        self.requested = probe
        self.probe: str | None = None
        self.ringbuf = kernel.ringbuf_supported() if ringbuf is None else ringbuf
        self._compile_args = {
            "ringbuf": self.ringbuf,
            "ringbuf_pages": ringbuf_pages,
            "count_entries": count_entries,
            "directory": bpf_directory,
            "capture_bytes": capture_bytes,
        }
        self.want_requests = requests
        self.request_variant = request_variant
        self.want_identity = identity
        # Why request capture / kernel identity is off, when it is (None: on or not asked).
        self.requests_unavailable: str | None = None
        # What request capture cannot see on this kernel, when it runs limited.
        self.requests_limited: str | None = None
        self.identity_unavailable: str | None = None
        # Why the identity record (bpf/identity.h) is off, when it is.
        self.record_unavailable: str | None = None
        self.records_seeded = 0
        self.tracker: RequestTracker | None = None
        self.cgroup_root = cgroup_root  # cgroup mode: None = found from /proc/self/mounts
        self.enricher = Enricher(proc_root, passwd_path)
        self._cgroup_paths: CgroupPaths | None = None
        self.pods = pods
        self.host_name = host_name if host_name is not None else socket.gethostname()
        self.clock = MonotonicClock()
        self._boot = _boot_id()
        self._bpf: object | None = None
        self._out: list[dict] = []
        self._sink: Callable[[dict], None] | None = None
        self._budget = MAX_BATCH
        self.events_read = 0  # documents produced
        self.records_read = 0  # kernel records read (connects, SYNs, segments)
        self.callback_errors = 0
        self.attach_seconds: float | None = None
        self.paused = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Compile, fill the maps, attach; returns the attached mode. Raises ProbeError."""
        t0 = time.monotonic()
        offsets = None
        if self.want_identity:
            try:
                offsets = btf.task_offsets()
            except btf.BTFError as exc:
                self._identity_off(str(exc))
                self.record_unavailable = str(exc)
            if offsets is not None:
                try:
                    offsets.update(btf.record_offsets())
                except btf.BTFError as exc:
                    self.record_unavailable = str(exc)
        else:
            self.record_unavailable = "kernel-side identity not asked for"
        self._bpf, self.probe = probes.open_mode(
            self.requested, prepare=self._fill_maps, cgroup_root=self.cgroup_root,
            identity_off=self._identity_off, offsets=offsets, **self._compile_args
        )
        b = self._bpf
        if self.record_unavailable is None:
            self._start_record(b)
        elif self.want_identity:
            log.warning("process identity record off (%s): executables, command lines and "
                        "parents come from /proc only, and are missing for processes that "
                        "exit before it is read", self.record_unavailable)
        if self.want_requests:
            try:
                self.requests_limited = probes.attach_requests(
                    b, self.probe, self.cgroup_root, self.request_variant)
                self.tracker = RequestTracker(self._emit, self._stop_capture, self._wall)
                log.info("request capture on: HTTP requests on metadata connections are read "
                         "from the first %d bytes of each segment (cgroup_skb egress)",
                         self._compile_args["capture_bytes"])
                if self.requests_limited:
                    log.warning("request capture limited: %s", self.requests_limited)
            except probes.ProbeError as exc:
                self.requests_unavailable = str(exc)
                log.warning("request capture unavailable (%s): metadata connections are "
                            "reported without their HTTP requests", exc)
        if self.ringbuf:
            b[b"events"].open_ring_buffer(self._on_event)
        else:
            b[b"events"].open_perf_buffer(self._on_event, page_cnt=64,
                                         lost_cb=self._on_lost)
        self.attach_seconds = time.monotonic() - t0
        log.info("tracing TCP connects to %d metadata endpoints with %s (%s), attached in %.2fs",
                 len(self.catalog), self.probe, "ring buffer" if self.ringbuf else "perf buffer",
                 self.attach_seconds)
        return self.probe

    def _start_record(self, b: object) -> None:
        """Attach the identity record's programs, then seed it for processes already running."""
        try:
            probes.attach_identity(b)
        except probes.ProbeError as exc:
            self.record_unavailable = str(exc)
            log.warning("process identity record off (%s): executables, command lines and "
                        "parents come from /proc only", exc)
            return
        self.records_seeded = identity_seed.seed(b[b"identities"], self.enricher.proc_root)
        log.info("process identity record on: written at exec and fork in the kernel, %d "
                 "running processes seeded from %s", self.records_seeded,
                 self.enricher.proc_root)

    def _identity_off(self, reason: str) -> None:
        # The mode attached without the identity reads (its programs were refused with them).
        self.identity_unavailable = reason
        log.warning("kernel-side process identity off (%s): process names are the calling "
                    "thread's and executables come from /proc only", reason)

    def _fill_maps(self, b: object) -> None:
        maps.write(b[b"endpoints4"], b[b"endpoints6"], self.catalog, b[b"first4"],
                   b[b"first6"])

    def set_catalog(self, catalog: Iterable[Endpoint]) -> int:
        """Replace the endpoints the kernel filters on, live. Returns the number of entries."""
        self.catalog = tuple(catalog)
        if self._bpf is None:
            return len(maps.entries(self.catalog))
        b = self._bpf
        n = maps.write(b[b"endpoints4"], b[b"endpoints6"], self.catalog, b[b"first4"],
                       b[b"first6"])
        log.info("endpoint maps reloaded: %d entries", n)
        return n

    def pause(self) -> None:
        """Detach the probes, keeping programs and maps (counts survive); `resume()` undoes."""
        if self._bpf is not None and self.probe is not None and not self.paused:
            probes.detach_mode(self._bpf, self.probe)
            if self.tracker is not None:
                probes.detach_requests(self._bpf)
            self.paused = True

    def resume(self) -> None:
        if self._bpf is not None and self.probe is not None and self.paused:
            probes.attach_mode(self._bpf, self.probe, self.cgroup_root)
            if self.tracker is not None:
                probes.attach_requests(self._bpf, self.probe, self.cgroup_root)
            self.paused = False

    def close(self) -> None:
        """Detach every probe and free the maps. Safe to call twice."""
        b, self._bpf = self._bpf, None
        if b is not None:
            probes.release(b)
            log.info("probes detached")

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, _ctx: object, data: int, size: int) -> int:
        # Called from C: an exception would be printed and lost, so it is logged here.
        self.records_read += 1
        try:
            kind = record_kind(data)
            if kind in (KIND_DATA, KIND_CLOSE):
                if self.tracker is not None:
                    self.tracker.segment(decode_segment(data, size))
            else:
                ev = decode(data, size)
                doc = self.document(ev)  # enriched now, while the process still runs
                if self.tracker is not None:
                    self.tracker.connection(ev, doc)
                else:
                    self._emit(doc)
        except Exception:
            self.callback_errors += 1
            log.exception("event handling failed")
        self._budget -= 1
        return -1 if self._budget <= 0 else 0  # negative: libbpf stops this poll

    def _emit(self, doc: dict) -> None:
        self.events_read += 1
        if self._sink is None:
            self._out.append(doc)
        else:
            self._sink(doc)

    def _wall(self, ts_ns: int) -> str:
        return rfc3339(self.clock.wall_ns(ts_ns))

    def _stop_capture(self, cookie: int) -> None:
        """Userspace has read all it will from this connection: the kernel stops copying."""
        if self._bpf is None:
            return
        table = self._bpf[b"tracked"]
        try:
            del table[table.Key(cookie)]
        except KeyError:
            pass

    def request_stats(self) -> dict[str, int]:
        """Request capture's counters (requests, unreadable, lost_sync, ...), or {}."""
        if self.tracker is None:
            return {}
        st = self.tracker.stats
        return {k: getattr(st, k) for k in st.__slots__}

    def document(self, ev: KernelEvent) -> dict:
        """The enriched ECS document of one kernel event."""
        info = self.enricher.lookup(ev.tgid, ev.tid, ev.comm, ev.exe_ino)
        if info.cgroup is None:
            # Gone before /proc was read: its cgroup, by the id the kernel gave, still says
            # which container it ran in.
            cg = self._cgroups().identity(ev.cgroup_id)
            if cg is not None:
                info = dataclasses.replace(info, cgroup=cg)
        uid = info.euid if info.euid is not None else ev.uid
        pod = image = None
        cg = info.cgroup
        if self.pods is not None and cg is not None and cg.pod_uid:
            pod = self.pods.lookup(cg.pod_uid)
            if cg.container_id:
                image = self.pods.container_image(cg.container_id)
        start = ev.identity.start_ns if ev.identity is not None else None
        if start is None:
            start = info.start_ns
        return to_ecs(
            ev,
            info,
            wall_ns=self.clock.wall_ns(ev.ts_ns),
            start_wall_ns=self.clock.wall_from_boottime(start) if start else None,
            host_name=self.host_name,
            event_id=f"{self._boot}-{ev.ts_ns:x}-{ev.tid:x}",
            user_name=self.enricher.user_name(uid),
            pod=pod,
            image=image,
        )

    def _cgroups(self) -> CgroupPaths:
        if self._cgroup_paths is None:
            try:
                root: str | None = cgroup_attach.cgroup2_root(self.cgroup_root)
            except (cgroup_attach.CgroupError, OSError) as exc:
                log.info("no cgroup v2 tree to resolve cgroup ids in: %s", exc)
                root = None
            self._cgroup_paths = CgroupPaths(root)
        return self._cgroup_paths

    def _on_lost(self, count: int) -> None:
        # Perf buffer overruns are also counted in the kernel's `dropped` stat.
        log.warning("perf buffer lost %d events", count)

    def poll(self, timeout_ms: int = 100,
             sink: Callable[[dict], None] | None = None) -> list[dict]:
        """Wait up to `timeout_ms` for events and read at most MAX_BATCH of them. With a
        `sink`, each ECS document goes to it as soon as it is read (nothing accumulates) and
        the list returned is empty; without, the documents are returned."""
        if self._bpf is None:
            raise RuntimeError("tracer is not started")
        self.clock.refresh()
        self._sink, self._budget = sink, MAX_BATCH
        try:
            if self.ringbuf:
                self._bpf.ring_buffer_poll(timeout_ms)
            else:
                self._bpf.perf_buffer_poll(timeout_ms)
            if self.tracker is not None:
                self.tracker.tick()
        finally:
            self._sink = None
        out, self._out = self._out, []
        return out

    def drain(self, sink: Callable[[dict], None] | None = None,
              max_events: int = 1 << 20, final: bool = False) -> list[dict]:
        """What is already in the buffer, without waiting (bounded by `max_events`). With
        `final`, connections still waiting for their requests are reported too (shutdown)."""
        if self._bpf is None:
            return []
        out: list[dict] = []
        start = self.records_read
        while self.records_read - start < max_events:
            before = self.records_read
            out += self.poll(0, sink)
            if self.records_read == before:
                break
        if final and self.tracker is not None:
            self._sink = sink
            try:
                self.tracker.flush()
            finally:
                self._sink = None
            out += self._out
            self._out = []
        return out

    # -- kernel counters -------------------------------------------------------------------

    def kernel_stats(self) -> dict[str, int]:
        """matched, emitted, dropped, count_map_full, pending_full: totals over all CPUs."""
        if self._bpf is None:
            return dict.fromkeys(STAT_NAMES, 0)
        table = self._bpf[b"stats"]
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(table[table.Key(i)]))
        return out

    def connection_counts(self) -> dict[tuple[str, int, int], int]:
        """Connections to metadata endpoints per (comm, uid, cgroup id), counted in kernel."""
        if self._bpf is None:
            return {}
        return {
            (k.comm.decode("utf-8", "replace"), int(k.uid), int(k.cgroup_id)): int(v.value)
            for k, v in self._bpf[b"conn_counts"].items()
        }
