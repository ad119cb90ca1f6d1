"""A private network namespace that holds the metadata addresses, with the mock service.

SAFETY: everything `imdswatch demo` and `imdswatch simulate` send to a metadata address runs
through `Sandbox.argv`, i.e. inside a fresh namespace whose only interface is loopback
carrying those addresses and served by `imdswatch.mockimds`. Nothing can reach a real
metadata service from there, and nothing outside the namespace is changed.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys

V4 = ("169.254.169.254", "169.254.170.2")
V6 = ("fd00:ec2::254",)


class SandboxError(RuntimeError):
    """The namespace could not be set up; the message says why and what to do."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise SandboxError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


class Sandbox:
    """`with Sandbox() as sb: subprocess.run(sb.argv(["curl", ...]))`"""

    def __init__(self, prefix: str = "imdsw-demo") -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.addresses = (*V4, *V6)
        self._server: subprocess.Popen | None = None
        self._created = False

    def __enter__(self) -> Sandbox:
        if shutil.which("ip") is None:
            raise SandboxError("needs iproute2's `ip` (apt-get install iproute2)")
        try:
            _ip("netns", "add", self.name)
            self._created = True
            _ip("-n", self.name, "link", "set", "lo", "up")
            for a in V4:
                _ip("-n", self.name, "addr", "add", f"{a}/32", "dev", "lo")
            for a in V6:
                _ip("-n", self.name, "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad")
            # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the
            # server itself, in order.
            self._server = subprocess.Popen(
                self.argv([sys.executable, "-m", "imdswatch.mockimds", "80"]),
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
