"""Test fixtures around the lab's sandbox (`lab.sandbox`: a network namespace holding the
metadata addresses, served by `lab.mock_imds`) and its agent process.

SAFETY: every connection a test makes to a metadata address goes through
`MetadataNamespace.run`/`popen`, which execute inside a fresh namespace whose only
interface is loopback carrying those addresses. Nothing can reach a real metadata service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.agent_process import AgentProcess, free_port
from lab.cgroups import remove_cgroups
from lab.history import warm_state
from lab.sandbox import V4 as DEFAULT_V4
from lab.sandbox import V6 as DEFAULT_V6
from lab.sandbox import Sandbox
from lab.wait import wait_for

HERE = Path(__file__).resolve().parent
LAB = HERE.parent / "lab"
# How long a test waits for an event it expects. Waits end as soon as it arrives; the bound is
# for a loaded machine (the kernel matrix's emulated CPUs, the other test group beside).
EVENT_TIMEOUT = 20.0


class MetadataNamespace(Sandbox):
    """The lab's sandbox, named as a test's."""

    def __init__(self, v4: tuple[str, ...] = DEFAULT_V4, v6: tuple[str, ...] = DEFAULT_V6,
                 ports: tuple[int, ...] = (80,)) -> None:
        super().__init__("imdsw-test", v4, v6, ports)


__all__ = ["AgentProcess", "MetadataNamespace", "free_port", "wait_for", "warm_state"]


@pytest.fixture
def enforce_cgroup():
    """A cgroup of the test's own below the cgroup v2 root, for programs that can deny:
    only the test's own clients are moved into it, and it is emptied (its processes
    killed) and removed whatever happens."""
    import secrets

    from tracer import cgroup_attach

    path = Path(cgroup_attach.cgroup2_root()) / f"imdsw-enforce-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        assert not remove_cgroups([path]), f"could not remove the test cgroup {path}"


def in_cgroup(cgroup: Path):  # noqa: ANN201 - a preexec_fn
    """A Popen preexec_fn moving the child into `cgroup` before it execs."""
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return enter


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF programs and network namespaces need CAP_SYS_ADMIN")


def require_bcc() -> None:
    require_root()
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"needs BCC (apt-get install python3-bpfcc; make setup): {exc}")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")


def skip_if_kernel_lacks(mode: str, exc: Exception) -> None:
    """Skip for what this kernel genuinely does not offer, matched precisely: kprobes
    compiled out (CONFIG_KPROBES off, read from the kernel, not from the message), or fentry
    refused with EPERM at load or attach (BPF trampolines not allowed). Anything else, a
    compile error in bpf/*.c or a verifier refusal above all, is re-raised: a failure."""
    from tracer import kernel
    from tracer.probes import EPERM_TEXT, ProbeError, VerifierRefused

    if not isinstance(exc, ProbeError) or isinstance(exc, VerifierRefused):
        raise exc
    text = str(exc)
    if "compilation failed" in text:
        raise exc
    if mode == "kprobe" and not kernel.kprobes_available():
        pytest.skip(f"this kernel has no kprobes (CONFIG_KPROBES off): {text}")
    if mode == "fentry" and EPERM_TEXT in text:
        pytest.skip(f"this kernel refuses fentry programs with EPERM: {text}")
    raise exc


def started_tracer(probe: str):  # noqa: ANN201 - tracer.Tracer, imported lazily
    """A tracer of the built-in catalog attached in mode `probe`, or a skip when this
    kernel does not offer that mode (skip_if_kernel_lacks); any other failure fails."""
    from scoring.endpoints import EndpointCatalog
    from tracer.probes import ProbeError
    from tracer.session import Tracer

    t = Tracer(EndpointCatalog.from_config(), probe=probe)
    try:
        t.start()
    except ProbeError as exc:
        skip_if_kernel_lacks(probe, exc)
    return t


@pytest.fixture
def metadata_ns():
    require_bcc()
    with MetadataNamespace() as ns:
        yield ns


class Collector:
    """Polls a started tracer from a background thread (the only thread touching it), so
    events are enriched while their processes still run, as in the agent."""

    def __init__(self, tracer: object) -> None:
        import threading

        self.tracer = tracer
        self.docs: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            docs = self.tracer.poll(50)
            if docs:
                with self._lock:
                    self.docs.extend(docs)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def matching(self, **want: object) -> list[dict]:
        """Documents whose process.name / process.pid / destination.ip / destination.port
        equal `want` (keys: name, pid, ip, port)."""
        def ok(d: dict) -> bool:
            got = {"name": d["process"]["name"], "pid": d["process"]["pid"],
                   "ip": d["destination"]["ip"], "port": d["destination"]["port"]}
            return all(got[k] == v for k, v in want.items())

        with self._lock:
            return [d for d in self.docs if ok(d)]

    def wait(self, n: int = 1, timeout: float = EVENT_TIMEOUT, **want: object) -> list[dict]:
        wait_for(lambda: len(self.matching(**want)) >= n, timeout)
        return self.matching(**want)

    def wait_held(self, p: subprocess.Popen, **want: object) -> list[dict]:
        """`wait` for the events of `p`, a client that lives until its stdin closes, then
        let it go: its enrichment from /proc never races its exit."""
        try:
            return self.wait(**want)
        finally:
            p.communicate(timeout=10)
