"""User-configured exceptions: callers a fleet owner has vetted.

An exception names a process AND its executable, so allowing `backup-tool` from
/opt/backup/bin never allows a `backup-tool` started from /tmp. User, image and namespace
narrow it further; image and namespace take shell-style globs (`registry.local/agents/*`).
A matching event is still scored and learned; it just never becomes an alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from scoring.events import Event
from scoring.known_callers import comm

_FIELDS = {"name", "executable", "user", "image", "namespace", "detectors", "comment"}


@dataclass(frozen=True, slots=True)
class ExceptionRule:
    name: str
    executable: str
    user: str | None = None
    image: str | None = None
    namespace: str | None = None
    detectors: frozenset[str] = frozenset()  # empty: every detector
    comment: str = ""

    def matches(self, event: Event, detector: str) -> bool:
        if comm(event.name) != comm(self.name) or event.exe is None:
            return False
        if not fnmatchcase(event.exe, self.executable):
            return False
        if self.detectors and detector not in self.detectors:
            return False
        if self.user is not None and event.user != self.user:
            return False
        if self.image is not None and not fnmatchcase(event.image or "", self.image):
            return False
        return self.namespace is None or fnmatchcase(event.namespace or "", self.namespace)


def parse_exception(spec: dict) -> ExceptionRule:
    """Build a rule from a config table; errors say which field is wrong."""
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ValueError(f"exception has unknown fields: {', '.join(sorted(unknown))}")
    for required in ("name", "executable"):
        if not isinstance(spec.get(required), str) or not spec[required]:
            raise ValueError(
                f"exception {spec!r} needs '{required}': an exception names a process and "
                "its executable, so a name from another path is never allowed"
            )
    exe = spec["executable"]
    if not exe.startswith("/") or exe.startswith("/*") or exe.startswith("*"):
        raise ValueError(f"exception executable {exe!r} must be an absolute path")
    writable = _matches_writable(exe)
    if writable:
        raise ValueError(
            f"exception executable {exe!r} also matches {writable}, a path any user can "
            "write: name the directory the vetted binary is installed in")
    for key in ("user", "image", "namespace", "comment"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"exception '{key}' must be a string, not {spec[key]!r}")
    for key in ("image", "namespace"):
        if spec.get(key) is not None and fnmatchcase(_PROBE, spec[key]):
            raise ValueError(f"exception {key} {spec[key]!r} matches everything")
    detectors = spec.get("detectors", [])
    if not isinstance(detectors, list) or not all(isinstance(d, str) for d in detectors):
        raise ValueError("exception 'detectors' must be a list of detector names")
    return ExceptionRule(
        name=spec["name"],
        executable=exe,
        user=spec.get("user"),
        image=spec.get("image"),
        namespace=spec.get("namespace"),
        detectors=frozenset(detectors),
        comment=str(spec.get("comment", "")),
    )


# Directories any local user (or any container image) can put an executable in. An
# exception whose executable pattern reaches into one would let anyone pass as the vetted
# caller by copying a binary there under the right name.
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/user/1000", "/home/user",
                  "/root", "/proc/self/fd", "/imdswatch-probe")
_PROBE = "imdswatch-probe/x y.z:1"
_GLOB = set("*?[")


def _matches_writable(exe: str) -> str | None:
    """A path under a user-writable (or arbitrary) directory that `exe` matches: one with
    the pattern's own file name when that is literal, else any name."""
    parts = exe.split("/")
    literal = len(parts)
    while literal > 1 and not _GLOB & set(parts[literal - 1]):
        literal -= 1
    # The pattern's literal tail (the components after its last glob), and bare names.
    tail = "/".join(parts[literal:])
    names = ["x", "imdswatch-probe"] + ([tail, f"x/{tail}"] if tail else [])
    for d in _WRITABLE_DIRS:
        for name in names:
            for path in (f"{d}/{name}", f"{d}/.hidden/{name}"):
                if fnmatchcase(path, exe):
                    return path
    return None


def first_match(
    rules: tuple[ExceptionRule, ...], event: Event, detector: str
) -> ExceptionRule | None:
    for rule in rules:
        if rule.matches(event, detector):
            return rule
    return None
