"""The attack simulations shared by `imdswatch demo` and `imdswatch simulate`.

Each is what an intruder does to take a node's cloud credentials (MITRE ATT&CK T1552.005),
done with a real program: curl with IMDSv1, the IMDSv2 token flow from netcat, wget as the
`nobody` user, Python's urllib, bash's /dev/tcp, the IPv6 endpoint, the AWS ECS credentials
endpoint, and a copy of a known cloud agent started from the wrong place.

Against the sandbox (the default) the requests ask for the role's credentials, as an
attacker would, and the mock answers with fake ones. Against the real service (`--target
metadata`, only when asked for explicitly) every request is harmless: the instance id,
never a credential, a token or user data.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMDS = "169.254.169.254"
IMDS_V6 = "fd00:ec2::254"
AWS_ECS = "169.254.170.2"

# Sets the launcher's process name to "systemd" and runs the rest of argv: the agent (or
# its stand-in, or its masquerading copy) then has the parent name a cloud agent has.
LAUNCH_AS_SERVICE = (
    "import ctypes, subprocess, sys\n"
    "ctypes.CDLL(None).prctl(15, b'systemd', 0, 0, 0)\n"
    "sys.exit(subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, timeout=20).returncode)\n"
)


@dataclass(frozen=True)
class Target:
    name: str
    credentials_path: str  # the IMDS path asked for
    aws_ecs_path: str          # the AWS ECS endpoint path asked for


SANDBOX = Target("sandbox", "/latest/meta-data/iam/security-credentials/demo-role",
                 "/v2/credentials/8b1c6f2e-demo-4d6e-9a55-1f0c2d3e4f5a")
# Harmless against a real service: the instance id and the AWS ECS task metadata, no secret.
METADATA = Target("metadata", "/latest/meta-data/instance-id", "/v2/metadata")


@dataclass(frozen=True)
class Simulation:
    key: str
    title: str
    process: str                     # the process name (comm, 15 bytes) that connects
    address: str                     # the metadata address it connects to
    tools: tuple[str, ...]           # programs it needs on this machine
    build: Callable[[Target, Path], list[str]]
    detail: str = ""                 # how it is done, for the demo's output


def _curl(url: str) -> list[str]:
    return ["curl", "-s", "-m", "5", "-g", url]


def _nc_v2(t: Target, _w: Path) -> list[str]:
    script = (
        "TOKEN=$(printf 'PUT /latest/api/token HTTP/1.0\\r\\n"
        "X-aws-ec2-metadata-token-ttl-seconds: 60\\r\\n\\r\\n' "
        f"| nc -q 2 -w 5 {IMDS} 80 | tail -n 1); "
        f"printf 'GET {t.credentials_path} HTTP/1.0\\r\\nX-aws-ec2-metadata-token: %s\\r\\n\\r\\n' "
        f"\"$TOKEN\" | nc -q 2 -w 5 {IMDS} 80"
    )
    return ["bash", "-c", script]


def _python(t: Target, _w: Path) -> list[str]:
    code = (f"import urllib.request as u; "
            f"u.urlopen('http://{IMDS}{t.credentials_path}', timeout=5).read()")
    return ["python3", "-c", code]


def _dev_tcp(t: Target, _w: Path) -> list[str]:
    script = (f"exec 3<>/dev/tcp/{IMDS}/80; printf 'GET {t.credentials_path} HTTP/1.0\\r\\n"
              f"Host: {IMDS}\\r\\n\\r\\n' >&3; timeout 5 cat <&3")
    return ["bash", "-c", script]


def masquerade_copy(workdir: Path) -> tuple[Path, bool]:
    """A copy of curl (or, in an image without curl, of python3) named like the AWS SSM
    agent, outside the agent's packaged path; True when it is curl."""
    fake = workdir / "amazon-ssm-agent"
    curl = shutil.which("curl")
    if not fake.exists():
        original = curl or shutil.which("python3")
        if original is None:
            raise FileNotFoundError("curl or python3")
        shutil.copy(original, fake)
        fake.chmod(0o755)
    return fake, curl is not None


def _masquerade(t: Target, w: Path) -> list[str]:
    fake, is_curl = masquerade_copy(w)
    url = f"http://{IMDS}{t.credentials_path}"
    request = (["-s", "-m", "5", url] if is_curl else
               ["-c", f"import urllib.request as u; u.urlopen('{url}', timeout=5).read()"])
    return ["python3", "-c", LAUNCH_AS_SERVICE, str(fake), *request]


SIMULATIONS: tuple[Simulation, ...] = (
    Simulation("curl-imdsv1", "curl asks for the role's credentials with IMDSv1", "curl",
               IMDS, ("curl",), lambda t, w: _curl(f"http://{IMDS}{t.credentials_path}"),
               "curl http://169.254.169.254/latest/meta-data/iam/security-credentials/ROLE"),
    Simulation("nc-imdsv2", "the IMDSv2 token flow from netcat", "nc", IMDS, ("nc", "bash"),
               _nc_v2, "PUT /latest/api/token, then GET with the token, over nc"),
    Simulation("wget-nobody", "wget run by the nobody user", "wget", IMDS,
               ("wget", "setpriv"),
               lambda t, w: ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             "wget", "-q", "-T", "5", "-O", "/dev/null",
                             f"http://{IMDS}{t.credentials_path}"],
               "setpriv --reuid=nobody wget ..."),
    Simulation("python-urllib", "Python's urllib", "python3", IMDS, ("python3",), _python,
               "python3 -c 'urllib.request.urlopen(...)'"),
    Simulation("bash-dev-tcp", "bash's /dev/tcp, no HTTP tool at all", "bash", IMDS,
               ("bash", "timeout"), _dev_tcp, "exec 3<>/dev/tcp/169.254.169.254/80"),
    Simulation("curl-ipv6", "the IPv6 endpoint", "curl", IMDS_V6, ("curl",),
               lambda t, w: _curl(f"http://[{IMDS_V6}]{t.credentials_path}"),
               "curl http://[fd00:ec2::254]/..."),
    Simulation("curl-aws-ecs", "the AWS ECS credentials endpoint", "curl", AWS_ECS, ("curl",),
               lambda t, w: _curl(f"http://{AWS_ECS}{t.aws_ecs_path}"),
               "curl http://169.254.170.2/v2/credentials/ID"),
    Simulation("masquerade", "a copy of the SSM agent started from /tmp",
               "amazon-ssm-agen", IMDS, ("python3",), _masquerade,
               "curl copied to /tmp/.../amazon-ssm-agent, started by a parent named systemd"),
)


@dataclass
class Ran:
    simulation: Simulation
    started: float   # wall clock, for matching alerts
    pid: int | None  # the process started (the caller itself, or its parent)
    status: int | None
    seconds: float
    note: str


def missing_tools(sim: Simulation) -> list[str]:
    return [t for t in sim.tools if shutil.which(t) is None]


def run(sim: Simulation, target: Target, workdir: Path,
        wrap: Callable[[list[str]], list[str]] = lambda argv: argv) -> Ran:
    """Run one simulation (inside `wrap`, e.g. the sandbox's namespace)."""
    started = time.time()
    missing = missing_tools(sim)
    if missing:
        return Ran(sim, started, None, None, 0.0,
                   f"skipped: {', '.join(missing)} not installed")
    return run_argv(sim, wrap(sim.build(target, workdir)))


def run_argv(sim: Simulation, argv: list[str]) -> Ran:
    """Run `argv` to its end (30 s at most). `ip netns exec`, `unshare` and `setpriv` exec
    what they run, so the pid is the caller's own or its parent's."""
    started = time.time()
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE) as proc:
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return Ran(sim, started, proc.pid, None, time.monotonic() - t0,
                       "timed out after 30s")
    note = f"exit {proc.returncode}"
    if proc.returncode != 0 and err.strip():
        note += ": " + err.decode("utf-8", "replace").strip().splitlines()[-1][:120]
    return Ran(sim, started, proc.pid, proc.returncode, time.monotonic() - t0, note)
