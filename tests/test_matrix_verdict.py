"""scripts/matrix_verdict.py, the kernel matrix's judge, on junit reports as pytest writes
them: a kprobe/fentry skip, a failure, a group without a report or a probe mode whose live
run never passed each fail the kernel. No kernel or VM needed: the reports are pytest's own,
made here by running a tiny test file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import matrix_verdict  # noqa: E402

DOCTOR = ("[ ok ] kernel: 6.1.0-57-amd64; events go through the ring buffer\n"
          "probe: auto picks fentry (attached and detached for this check)\n")


def _report(tmp: Path, out: Path, group: str, body: str) -> None:
    """Run `body` as tests/test_agent_modes.py-like file; its junit report lands in out."""
    d = tmp / f"src-{group}"
    d.mkdir()
    (d / "test_agent_modes.py").write_text("import pytest\n" + body)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={out / f'junit-{group}.xml'}", "-o", "junit_family=xunit1",
                        str(d)], cwd=d, capture_output=True, text=True, timeout=120)
    (out / f"pytest-{group}.rc").write_text(f"{r.returncode}\n")


MODES_PASS = """
@pytest.mark.parametrize("mode", ["fentry", "kprobe", "cgroup", "tracepoint"])
def test_run_sees_and_alerts_in_each_probe_mode(mode):
    pass
"""


@pytest.fixture
def out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    o.mkdir()
    (o / "release").write_text("6.1.0-57-amd64\n")
    (o / "doctor.txt").write_text(DOCTOR)
    (o / "doctor.rc").write_text("0\n")
    (o / "default-tests").touch()
    return o


def test_every_mode_passed_is_a_pass(tmp_path, out):
    _report(tmp_path, out, "a", MODES_PASS)
    _report(tmp_path, out, "b", "def test_other():\n    pass\n")
    ok, line, details = matrix_verdict.verdict("6.1", out, 421)
    assert ok, details
    assert line.split()[:3] == ["6.1", "6.1.0-57-amd64", "pass"]
    assert "ringbuf" in line and "auto=fentry" in line and "(421s)" in line
    assert "5 passed, 0 failed, 0 skipped" in line


def test_a_kprobe_skip_fails_the_kernel(tmp_path, out):
    _report(tmp_path, out, "a", MODES_PASS.replace(
        "    pass", "    if mode == 'kprobe':\n        pytest.skip('the kprobe probe cannot "
        "attach on this kernel')"))
    ok, line, details = matrix_verdict.verdict("6.1", out, 10)
    assert not ok and " FAIL " in line
    assert any(d.startswith("forbidden skip:") and "[kprobe]" in d for d in details)
    assert any("did not pass in: kprobe" in d for d in details)


def test_a_mode_never_run_fails_the_kernel(tmp_path, out):
    _report(tmp_path, out, "a", MODES_PASS.replace('"fentry", ', ""))
    ok, _line, details = matrix_verdict.verdict("6.1", out, 10)
    assert not ok and details == ["imdswatch run did not pass in: fentry"]


def test_a_failure_or_a_missing_report_fails_the_kernel(tmp_path, out):
    _report(tmp_path, out, "a", MODES_PASS)
    _report(tmp_path, out, "b", "def test_other():\n    assert False\n")
    ok, _line, details = matrix_verdict.verdict("6.1", out, 10)
    assert not ok and any("test_other" in d for d in details)
    (out / "junit-b.xml").unlink()
    ok, _line, details = matrix_verdict.verdict("6.1", out, 10)
    assert not ok and "a pytest group left no junit report" in details


def test_a_vm_that_never_booted(tmp_path):
    (tmp_path / "vng.log").write_text("qemu: terminating on signal 15\n")
    ok, line, _details = matrix_verdict.verdict("5.10", tmp_path, 1500)
    assert not ok and "did not boot" in line
