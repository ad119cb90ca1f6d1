"""Builds the modules every replayed or traced event goes through as C extensions with mypyc.

Reading a line (the one parser, `read_doc`), handing it between the replay's two
processes and scoring it (`Scorer.process`) are a few microseconds of plain Python per
event, thousands of attribute reads on small objects; compiled, the same code costs
about a third less (`make bench` measures the replay as built here). The sources stay
the source of truth: mypyc compiles them as they are, type annotations included, and
refuses to build when they do not type-check. Every install compiles them (pip's build
of the image, `make setup`'s editable install, which puts each extension beside its
`.py`; `make` rebuilds them when a source changes).

Everything else (the CLI, the tracer, exporters, the fleet transport) stays
interpreted: it runs per alert, per request or once.
"""

from mypyc.build import mypycify
from setuptools import setup

# The hot path, in data-flow order. Keep in step with COMPILED in the Makefile (a test
# checks that both name the same modules and that each is imported compiled).
COMPILED = [
    "scoring/events.py",
    "scoring/endpoints.py",
    "scoring/known_callers.py",
    "scoring/rarity.py",
    "scoring/detectors.py",
    "scoring/scorer.py",
    "intake/parser.py",
    "intake/join.py",
    "intake/reader.py",
    "intake/forked_reader.py",
    "intake/reorder.py",
    "imdswatch/replay.py",
]

setup(ext_modules=mypycify(COMPILED, opt_level="3"))
