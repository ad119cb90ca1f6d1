"""`imdswatch doctor` and the preflight of `imdswatch run`, on this machine for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import doctor, kernel

ROOT = Path(__file__).resolve().parent.parent


def test_doctor_prints_every_check_and_the_probe(capsys):
    rc = doctor.run_doctor()
    out = capsys.readouterr().out
    for name in ("privileges", "kernel", "bcc", "kernel headers", "tracefs", "tracepoint",
                 "kprobes", "btf", "fentry", "cgroup v2"):
        assert f"] {name}: " in out, name
    assert "probe: " in out
    # every failure or warning comes with its fix
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("[FAIL]", "[warn]")):
            assert lines[i + 1].lstrip().startswith("fix: "), line
    if rc == 0 and os.geteuid() == 0:
        assert "auto picks " in out
        # request capture is checked on the cgroup compile, as root, wherever cgroup v2 is
        if "] cgroup hooks: connect4/connect6 programs load, attach" in out:
            assert "[ ok ] request capture: HTTP requests" in out
            if kernel.kernel_version() >= (6, 18):
                assert "NAT'ed connections included" in out
        # where the cgroup v2 hooks attach, the doctor says so and auto takes them before
        # the tracepoint (on kernels without fentry and kprobes)
        if "] cgroup hooks: connect4/connect6 programs load, attach" in out and \
                "[warn] kprobes" in out and "[warn] fentry" in out:
            assert "auto picks cgroup" in out


def test_predicted_mode_follows_auto_order():
    ok = [doctor.Check("x", True, "")]
    assert doctor.predicted_mode(ok) == "fentry"
    no_fentry = ok + [doctor.Check("fentry", False, "", "f", {"fentry"})]
    assert doctor.predicted_mode(no_fentry) == "kprobe"
    assert doctor.predicted_mode(no_fentry, "fentry") is None
    neither = no_fentry + [doctor.Check("kprobes", False, "", "f", {"kprobe"})]
    assert doctor.predicted_mode(neither) == "cgroup"
    no_cgroup = neither + [doctor.Check("cgroup v2", False, "", "f", {"cgroup"})]
    assert doctor.predicted_mode(no_cgroup) == "tracepoint"
    assert doctor.predicted_mode(no_cgroup, "cgroup") is None
    assert doctor.predicted_mode(neither + [doctor.Check("p", False, "", "f", {"all"})]) is None


def test_preflight_as_root_on_this_machine():
    if os.geteuid() != 0:
        pytest.skip("needs root: preflight's verdicts differ for other users")
    try:
        kernel.import_bcc()
    except ImportError as exc:
        pytest.skip(f"needs BCC: {exc}")
    assert doctor.preflight("auto") == []
    assert doctor.preflight("tracepoint") == []
    assert doctor.preflight("cgroup") == []
    if not kernel.kprobes_available():
        (problem,) = doctor.preflight("kprobe")
        assert "CONFIG_KPROBES" in problem and "fix:" in problem


def test_run_without_privileges_exits_2_with_the_fix(tmp_path):
    """`imdswatch run` as an unprivileged user fails fast, saying what to do."""
    if os.geteuid() != 0:
        env_user = []
    else:
        env_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all"]
    exe = ROOT / ".venv" / "bin" / "imdswatch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "imdswatch.cli"]
    try:
        r = subprocess.run([*env_user, *cmd, "run", "--metrics-address", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env={**os.environ, "HOME": str(tmp_path)})
    except PermissionError as exc:
        pytest.skip(f"this user cannot execute the checkout's interpreter: {exc}")
    if r.returncode != 2 and "Permission denied" in r.stderr:
        pytest.skip(f"the unprivileged user cannot run this checkout: {r.stderr[-200:]}")
    assert r.returncode == 2, r.stderr
    assert "privileges" in r.stderr and "fix:" in r.stderr and "CAP_BPF" in r.stderr


def test_tracer_mounts_missing_tracefs_in_a_private_mount_namespace():
    """tracefs is not mounted at boot on some machines: the tracer mounts it as root. Checked
    in a private mount namespace, so the host's mounts are left alone."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounting tracefs")
    code = (
        "import subprocess, sys\n"
        "for m in ('/sys/kernel/debug/tracing', '/sys/kernel/tracing', '/sys/kernel/debug'):\n"
        "    subprocess.run(['umount', m], capture_output=True)\n"
        "from tracer import kernel\n"
        "assert kernel.tracefs_path() is None, 'tracefs still visible'\n"
        "notes = kernel.ensure_tracefs()\n"
        "print(notes)\n"
        "assert kernel.mounted('/sys/kernel/tracing', 'tracefs'), notes\n"
        "assert kernel.tracefs_path() is not None\n"
    )
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                        code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    if r.returncode != 0 and "tracefs still visible" in r.stderr:
        pytest.skip("tracefs could not be unmounted in the private namespace")
    assert r.returncode == 0, r.stderr
    assert "mounted tracefs at /sys/kernel/tracing" in r.stdout


CHECKOUT_ONLY = (".venv", "scripts/", "make setup")


def _unprivileged_doctor(deployment: str, tmp_path) -> subprocess.CompletedProcess:
    """`imdswatch doctor` as uid 65534 without capabilities, told where it runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    code = "import sys; from tracer.doctor import run_doctor; sys.exit(run_doctor())"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
                            "PYTHONDONTWRITEBYTECODE": "1",
                            "IMDSWATCH_DEPLOYMENT": deployment})
    if r.returncode not in (0, 1) and "Permission denied" in r.stderr:
        pytest.skip(f"the unprivileged user cannot run this checkout: {r.stderr[-200:]}")
    return r


@pytest.mark.parametrize("deployment", ["container", "installed", "checkout"])
def test_fixes_never_widen_a_shared_interpreter_and_fit_where_they_run(deployment, tmp_path):
    r = _unprivileged_doctor(deployment, tmp_path)
    out = r.stdout
    assert r.returncode == 1 and "[FAIL] privileges: uid 65534" in out, out + r.stderr
    # file capabilities on an interpreter would hand them to every local user
    assert "setcap" not in out
    fixes = "\n".join(line for line in out.splitlines() if line.lstrip().startswith("fix:"))
    if deployment == "checkout":
        assert "sudo .venv/bin/imdswatch run" in fixes
    else:
        assert not [h for h in CHECKOUT_ONLY if h in fixes], fixes
    if deployment == "container":
        assert "runAsUser: 0" in fixes and "--cap-add BPF" in fixes
    else:
        assert "AmbientCapabilities=CAP_BPF CAP_PERFMON" in fixes


def test_unreadable_tracefs_is_not_called_unmounted(tmp_path):
    if kernel.tracefs_path() is None:
        pytest.skip("tracefs is not mounted here for root either")
    mode = os.stat(kernel.tracefs_path()).st_mode & 0o777
    if mode & 0o005 == 0o005:
        pytest.skip(f"tracefs is world-readable here (mode {mode:o})")
    out = _unprivileged_doctor("installed", tmp_path).stdout
    assert "tracefs: mounted at" in out and "not readable by uid 65534" in out, out
    assert "not mounted" not in out


def test_doctor_takes_the_config_whose_cgroup_root_its_fix_names(tmp_path):
    """The cgroup v2 check's fix says to set `agent.cgroup_root`: doctor reads that config,
    so the check it prints is the one the agent would pass or fail."""
    imdswatch = ROOT / ".venv" / "bin" / "imdswatch"
    not_cgroup = tmp_path / "not-a-cgroup"
    not_cgroup.mkdir()
    cfg = tmp_path / "imdswatch.toml"
    cfg.write_text(f'[agent]\ncgroup_root = "{not_cgroup}"\n')
    r = subprocess.run([imdswatch, "doctor", "--config", cfg], capture_output=True, text=True,
                       timeout=600)
    assert "Traceback" not in r.stderr
    assert f"] cgroup v2: {not_cgroup} is not a cgroup v2 directory" in r.stdout, \
        r.stdout + r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\ncgroup_rot = 1\n")
    r = subprocess.run([imdswatch, "doctor", "--config", bad], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "cgroup_rot" in r.stderr and "Traceback" not in r.stderr


def test_doctor_says_whether_enforcement_can_deny_here() -> None:
    from tracer import btf
    from tracer.doctor import check_enforcement

    assert not check_enforcement("5.4.0-100-generic").ok  # no cgroup BPF links yet
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        c = check_enforcement()
        assert c.ok and "--enforce deny available" in c.detail, c.detail
        # Whether requests are judged in the kernel too, read from the same BTF.
        assert ("requests judged in the kernel" in c.detail) == (
            "sk_psock" in btf.BTF.kernel().structs), c.detail
