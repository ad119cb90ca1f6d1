"""docs/architecture.md lists every module of every package, and only modules that exist."""

from __future__ import annotations

import re

from test_layers import LAYERS, ROOT, modules

DOC = ROOT / "docs" / "architecture.md"


def listed() -> dict[str, set[str]]:
    """Per `### package/` section, the modules its `- \\`package.module\\`` lines name."""
    out: dict[str, set[str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        head = re.fullmatch(r"### (\w+)/", line.strip())
        if head:
            section = head.group(1)
            out[section] = set()
            continue
        item = re.match(r"- `(\w+\.\w+)` –", line)
        if item and section is not None:
            out[section].add(item.group(1))
    return out


def test_every_package_has_a_section_listing_exactly_its_modules() -> None:
    doc = listed()
    assert set(doc) == set(LAYERS)
    actual = {m for m in modules() if "." in m}
    for pkg in LAYERS:
        have = {m for m in actual if m.startswith(pkg + ".")}
        assert doc[pkg] == have, f"{pkg}: missing {have - doc[pkg]}, stale {doc[pkg] - have}"
