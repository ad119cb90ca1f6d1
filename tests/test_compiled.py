"""The hot-path modules run compiled (setup.py builds them with mypyc), here as in the
image: the tests, `make bench` and users all run the same build. Nothing here connects
anywhere."""

import ast
import importlib
import importlib.machinery
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_list() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


def makefile_list() -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(r"^COMPILED := (.*)$", text, re.M)
    assert m, "the Makefile has no COMPILED list"
    return m.group(1).split()


def test_setup_and_makefile_compile_the_same_modules():
    assert setup_list(), "nothing compiled"
    assert sorted(setup_list()) == sorted(makefile_list())


def test_every_listed_module_is_imported_compiled():
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for path in setup_list():
        name = path.removesuffix(".py").replace("/", ".")
        module = importlib.import_module(name)
        assert module.__file__.endswith(suffixes), f"{name} runs from {module.__file__}"


def test_a_compiled_source_is_newer_than_its_build_only_until_make_runs():
    # `make` rebuilds a module whose source changed; a stale build would test old code.
    # The code of all of them is in one library (mypyc's group, at the top level); each
    # module's own extension only loads it and is rewritten only when its interface changes.
    group = list(ROOT.glob("*__mypyc.*.so"))
    assert len(group) == 1, group
    built = group[0].stat().st_mtime
    for path in setup_list():
        source = ROOT / path
        assert list(source.parent.glob(source.stem + ".*.so")), f"no build of {path}"
        assert built >= source.stat().st_mtime, f"{path} changed after it was compiled: run make"
