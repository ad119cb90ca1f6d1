"""One kernel-matrix VM's verdict, from what scripts/kernel-guest.sh left in its output
directory: prints one line (label, release, pass/FAIL, facts, time) and exits 0 only if
doctor passed every check, every pytest group passed with no forbidden skip, and the live
agent passed in every probe mode (when the default tests ran).

A skip is forbidden when it concerns the kprobe or fentry path (its test id names the mode)
or says a probe cannot attach: the matrix's Debian kernels have kprobes, BTF and trampolines,
so such a skip would hide exactly what the matrix exists to prove. So is a missing
end-to-end run of a mode: a test that was never collected proves nothing either.
    python3 scripts/matrix_verdict.py LABEL OUT SECONDS
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FORBIDDEN_ID = re.compile(r"kprobe|fentry")
FORBIDDEN_REASON = re.compile(r"cannot attach|refuses|without kprobes|no kernel BTF|"
                              r"needs BCC|needs root")
# `imdswatch run --probe MODE` end to end: each must have passed on every matrix kernel.
MODE_TEST = "test_agent_modes::test_run_sees_and_alerts_in_each_probe_mode[{}]"
MODES = ("fentry", "kprobe", "cgroup", "tracepoint")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def doctor_facts(text: str) -> tuple[list[str], list[str]]:
    """(problems, facts) from `imdswatch doctor`'s output."""
    problems = [line for line in text.splitlines() if line.startswith(("[FAIL]", "[warn]"))]
    facts = []
    if m := re.search(r"events go through the (ring|perf) buffer", text):
        facts.append(f"{m.group(1)}buf")
    if m := re.search(r"probe: auto picks (\w+)", text):
        facts.append(f"auto={m.group(1)}")
    else:
        problems.append("doctor named no probe that auto attaches")
    return problems, facts


def junit(paths: list[Path]) -> tuple[dict[str, int], list[str], list[str], set[str]]:
    """(counts, failed test ids, forbidden skips with their reasons, passed test ids)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed: list[str] = []
    forbidden: list[str] = []
    passed: set[str] = set()
    cases = []
    for path in paths:
        try:
            cases += list(ET.parse(path).getroot().iter("testcase"))
        except ET.ParseError as exc:
            failed.append(f"{path.name}: unreadable ({exc})")
    for case in cases:
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        skip = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(tid)
        elif skip is not None:
            counts["skipped"] += 1
            reason = skip.get("message", "")
            if FORBIDDEN_ID.search(tid) or FORBIDDEN_REASON.search(reason):
                forbidden.append(f"{tid}: {reason}")
        else:
            counts["passed"] += 1
            passed.add(tid)
    return counts, failed, forbidden, passed


def verdict(label: str, out: Path, seconds: float) -> tuple[bool, str, list[str]]:
    release = _read(out / "release") or "?"
    details: list[str] = []
    if release == "?":
        return False, f"{label:<5} {'?':<24} FAIL  the VM did not boot or ran nothing " \
            f"({seconds:.0f}s)", [_read(out / "vng.log")[-3000:]]
    problems, facts = doctor_facts(_read(out / "doctor.txt"))
    if _read(out / "doctor.rc") != "0":
        problems.append(f"doctor exited {_read(out / 'doctor.rc') or '?'}")
    details += [f"doctor: {p}" for p in problems]
    ok = not problems
    rcs = sorted(out.glob("pytest-*.rc"))
    reports = sorted(out.glob("junit-*.xml"))
    if reports:
        counts, failed, forbidden, passed = junit(reports)
        facts.append(f"{counts['passed']} passed, {counts['failed']} failed, "
                     f"{counts['skipped']} skipped")
        details += [f"failed: {t}" for t in failed]
        details += [f"forbidden skip: {s}" for s in forbidden]
        ok = ok and not failed and not forbidden and counts["passed"] > 0
        if (out / "default-tests").exists():
            missing = [m for m in MODES
                       if not any(t.endswith(MODE_TEST.format(m)) for t in passed)]
            if missing:
                ok = False
                details.append(f"imdswatch run did not pass in: {', '.join(missing)}")
            else:
                facts.insert(0, "run passed in " + "/".join(MODES))
        for rc in rcs:
            if _read(rc) != "0" and not failed:
                ok = False
                details.append(f"{rc.stem} exited {_read(rc) or '?'}")
        if len(reports) < len(rcs) or not rcs:
            ok = False
            details.append("a pytest group left no junit report")
    else:
        ok = False
        details.append("pytest left no junit report (the VM ran out of time or crashed)")
    status = "pass" if ok else "FAIL"
    return ok, f"{label:<5} {release:<24} {status}  {'; '.join(facts)} ({seconds:.0f}s)", details


def main() -> int:
    label, out, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    ok, line, details = verdict(label, out, seconds)
    print(line, flush=True)
    for d in details:
        print(f"      {d}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
