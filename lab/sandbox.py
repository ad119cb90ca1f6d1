"""A private network namespace that holds the metadata addresses, served by the mock.

SAFETY: everything the demo, `imdswatch simulate`, the tests and the benchmarks send to a
metadata address runs through `Sandbox.argv` (or `run`/`popen`), i.e. inside a fresh
namespace whose only interface is loopback carrying those addresses and served by
`lab.mock_imds`. Nothing can reach a real metadata service from there, and nothing outside
the namespace is changed.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from typing import Any

V4 = ("169.254.169.254", "169.254.170.2")
V6 = ("fd00:ec2::254",)


class SandboxError(RuntimeError):
    """The namespace could not be set up; the message says why and what to do."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise SandboxError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


class Sandbox:
    """`with Sandbox() as sb: sb.run(["curl", ...])`: the addresses `v4` and `v6` on the
    namespace's loopback, the mock listening on `ports` (answers waiting `delay` s)."""

    def __init__(self, prefix: str = "imdsw-lab", v4: tuple[str, ...] = V4,
                 v6: tuple[str, ...] = V6, ports: tuple[int, ...] = (80,),
                 delay: float = 0.0) -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.v4, self.v6, self.ports, self.delay = v4, v6, ports, delay
        self.addresses = (*v4, *v6)
        self._server: subprocess.Popen | None = None
        self._created = False

    def __enter__(self) -> Sandbox:
        if shutil.which("ip") is None:
            raise SandboxError("needs iproute2's `ip` (apt-get install iproute2)")
        try:
            _ip("netns", "add", self.name)
            self._created = True
            _ip("-n", self.name, "link", "set", "lo", "up")
            for a in self.v4:
                _ip("-n", self.name, "addr", "add", f"{a}/32", "dev", "lo")
            for a in self.v6:
                _ip("-n", self.name, "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad")
            # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the
            # server itself, in order.
            self._server = subprocess.Popen(
                self.argv([sys.executable, "-m", "lab.mock_imds", "--delay", str(self.delay),
                           *map(str, self.ports)]),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True,
            )
            line = self._server.stdout.readline() if self._server.stdout else ""
            if line.strip() != "ready":
                raise SandboxError("the mock metadata service did not start in the namespace")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait(timeout=10)
            if self._server.stdout:
                self._server.stdout.close()
            self._server = None
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self._created = False

    def argv(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: list[str], timeout: float = 20, **kw: Any) -> subprocess.CompletedProcess:
        """Run `cmd` inside the namespace, its output captured as text."""
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout,
                              **kw)

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd), **kw)
