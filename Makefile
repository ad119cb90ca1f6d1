# The two commands a newcomer needs: `make run` (set up, then trace live) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PACKAGES := tracer scoring intake exporters policy lab fleet imdswatch
# The modules setup.py compiles with mypyc (keep in step with its COMPILED: a test checks).
COMPILED := scoring/events.py scoring/endpoints.py scoring/known_callers.py scoring/rarity.py \
	scoring/detectors.py scoring/scorer.py intake/parser.py intake/join.py intake/reader.py \
	intake/forked_reader.py intake/reorder.py imdswatch/replay.py
# The project's modules they import, interpreted: the compile reads their types too.
COMPILED_IMPORTS := intake/ecs_schema.py scoring/settings.py scoring/allowlist.py \
	scoring/durations.py intake/ndjson.py
COMPILED_STAMP := $(VENV)/.compiled

.PHONY: setup run demo test lint bench bench-quick clean test-kernels test-image

setup: $(STAMP) $(COMPILED_STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup.sh scripts/kernel-headers.sh
	rm -f ./*__mypyc.*.so  # mypyc's library of an older list of compiled modules
	bash scripts/setup.sh
	touch ./*__mypyc.*.so $(STAMP) $(COMPILED_STAMP)

# The editable install keeps each compiled module beside its source, where it is imported
# instead of it: an edited source is compiled again before anything runs.
$(COMPILED_STAMP): $(COMPILED) $(COMPILED_IMPORTS) | $(STAMP)
	$(PY) setup.py -q build_ext --inplace -j 2 >/dev/null
	touch ./*__mypyc.*.so $(COMPILED_STAMP)  # rebuilt, or already the sources' build

run: setup
	$(VENV)/bin/imdswatch run $(ARGS)

# A minute-long demonstration in a private network namespace (root): see README.
demo: setup
	$(VENV)/bin/imdswatch demo $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The tracer on Debian's 5.10, 6.1 and 6.12 kernels in VMs (KERNELS="6.1" for one); as root.
test-kernels: setup
	bash scripts/test-kernels.sh $(KERNELS)

# deploy/Dockerfile built with podman and run as the DaemonSet runs it; as root.
test-image: setup
	bash scripts/test-image.sh

# The sources compiled first, as pip does when it installs the package (the image): the
# replay's start-up is then timed as users have it, not with a compile of every module.
# `make bench` writes the report the README quotes (docs/benchmarks.md; commit it);
# `make bench-quick` writes its smaller run under build/.
bench: setup
	$(PY) -m compileall -q $(PACKAGES) >/dev/null
	$(PY) -m bench --report docs/benchmarks.md $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m compileall -q $(PACKAGES) >/dev/null
	$(PY) -m bench --quick --report build/benchmarks-quick.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name '*.so' -not -path './.venv/*' -delete
