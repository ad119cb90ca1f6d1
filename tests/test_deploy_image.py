"""The Dockerfile is pinned, installs the distribution's BCC and exactly the project's
dependencies, ships the BPF sources, and runs `imdswatch run` (docker cannot build here,
so this checks the file itself)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.txt"


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_pinned_debian_bookworm_slim() -> None:
    (arg,) = [rest for word, rest in instructions() if word == "ARG"]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?", image), image
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert all(f.startswith("${DEBIAN_IMAGE}") for f in froms)


def test_apt_packages_are_pinned_and_bcc_comes_from_debian() -> None:
    installs = [rest for word, rest in instructions()
                if word == "RUN" and "apt-get install" in rest]
    assert installs
    for run in installs:
        packages = [w for w in run.split("--no-install-recommends", 1)[1].split("&&")[0].split()]
        assert packages and all("=" in p for p in packages), packages
    assert any("python3-bpfcc=" in run for run in installs)
    assert "pip install bcc" not in DOCKERFILE  # the PyPI bcc is an unrelated project


def test_python_requirements_are_pinned_and_match_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {Requirement(d) for d in pyproject["project"]["dependencies"]}
    pinned = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pinned[req.name.lower().replace("_", "-")] = spec.version
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is a dependency but not pinned for the image"
        assert req.specifier.contains(pinned[name]), (name, pinned[name], str(req.specifier))
    assert set(pinned) == {r.name.lower().replace("_", "-") for r in wanted}


def test_project_bpf_sources_and_entrypoint() -> None:
    steps = instructions()
    copies = [rest for word, rest in steps if word == "COPY"]
    for package in ("imdswatch", "scoring", "tracer", "exporters"):
        assert any(c.startswith(f"{package} ") for c in copies), package
    assert any(c.startswith("bpf ") for c in copies)
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "IMDSWATCH_BPF_DIR=/opt/imdswatch/bpf" in env
    assert ("ENTRYPOINT", '["imdswatch"]') in steps
    cmd = [rest for word, rest in steps if word == "CMD"][-1]
    assert cmd.startswith('["run"')
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user not in ("0", "root")
    assert ("EXPOSE", "9464") in steps


def test_dockerignore_keeps_what_the_image_copies() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    for path in ("pyproject.toml", "imdswatch/", "scoring/", "tracer/", "exporters/", "bpf/",
                 "deploy/docker/requirements.txt"):
        assert f"!{path}" in ignore
