"""The Dockerfile is pinned, installs the distribution's BCC and exactly the project's
dependencies at the versions the tests run, ships the BPF sources, and runs `imdswatch run`.
These check the file itself; `make test-image` builds and runs it."""

import re
import tomllib
from importlib.metadata import version
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
    (arg,) = [rest for word, rest in instructions() if word == "ARG"]  # make test-image
    # passes its debootstrapped base through this ARG
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


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((word, rest))
    return stages


def _apt_pins(stage: list[tuple[str, str]]) -> dict[str, str]:
    pins = {}
    for word, rest in stage:
        if word == "RUN" and "apt-get install" in rest:
            words = rest.split("--no-install-recommends", 1)[1].split("&&")[0].split()
            pins.update(w.split("=", 1) for w in words)
    return pins


def test_the_interpreter_itself_is_pinned_alike_in_both_stages() -> None:
    """The venv made in the build stage runs on the runtime stage's python3.11: pinning only
    the python3 metapackage would let the two stages install different interpreters."""
    build, runtime = (_apt_pins(s) for s in _stages())
    interpreter = ("python3", "python3.11", "python3.11-minimal", "libpython3.11-minimal",
                   "libpython3.11-stdlib")
    for package in interpreter:
        assert package in build and package in runtime, package
        assert build[package] == runtime[package], package


def test_apt_caches_are_cleaned_in_the_layer_that_fills_them() -> None:
    for word, rest in instructions():
        if word == "RUN" and "apt-get install" in rest:
            assert "apt-get clean" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest


def test_user_and_group_share_the_fixed_id_the_directories_get() -> None:
    (runtime_user,) = [rest for word, rest in _stages()[1] if word == "USER"]
    setup = " ".join(rest for word, rest in _stages()[1] if word == "RUN")
    uid = runtime_user.split(":")[0]
    assert f"groupadd --system --gid {uid} imdswatch" in setup
    assert f"useradd --system --uid {uid} --gid {uid}" in setup
    assert f"install -d -o {uid} -g {uid} /var/lib/imdswatch" in setup


def test_image_pins_are_the_versions_the_tests_run() -> None:
    """The image installs exactly what this test suite runs against: a pin that differs from
    the environment running the tests is a version nobody tested."""
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert version(req.name) == spec.version, (
                f"{req.name}: the image pins {spec.version}, the tests run {version(req.name)}")


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
    # every package the project installs (a new one forgotten here breaks the build)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    for package in packages:
        assert any(c.startswith(f"{package} ") for c in copies), package
        assert f"!{package}/" in ignore, package
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
