"""Library output written straight to fd 2 (as BCC's and libbpf's C code does) is captured
and summarised; Python's own log lines still reach standard error."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fd2_output_of_c_code_is_captured_and_summarised() -> None:
    code = r"""
import ctypes, logging, subprocess, sys
from imdswatch.libout import capture_fd2
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
log = logging.getLogger("x")
libc = ctypes.CDLL(None)
with capture_fd2() as lines:
    msg = b"bpf: Failed to load program: Operation not permitted\n"
    libc.write(2, msg, len(msg))                       # C code, as libbpf does
    subprocess.run(["sh", "-c", "echo 'create_probe_event: open(x): No such file' >&2"])
    libc.write(2, msg, len(msg))
    log.info("our own line, during the capture")
    print("python stderr, during the capture", file=sys.stderr)
log.info(lines.summary("probe attach"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    err = r.stderr.splitlines()
    assert "LOG our own line, during the capture" in err
    assert "python stderr, during the capture" in err
    # The raw library lines are not on stderr on their own...
    assert not any(line.startswith(("bpf:", "create_probe_event")) for line in err)
    # ...but in one summary line of ours.
    summary = [line for line in err if line.startswith("LOG probe attach:")]
    assert len(summary) == 1
    assert "printed 3 lines" in summary[0]
    assert "'bpf: Failed to load program: Operation not permitted' x2" in summary[0]
    assert "create_probe_event" in summary[0]


def test_nothing_captured_means_no_summary() -> None:
    from imdswatch.libout import capture_fd2

    with capture_fd2() as lines:
        pass
    assert lines.summary("x") is None
