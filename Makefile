# `make demo` and `make test` each build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint format bench clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The constraint pins torch to the local CPU wheel, so no CUDA build is downloaded.
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gradwatch demo

# pytest exits 5 when it collected no tests; that must fail, not pass silently.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The documentation site (docs/, mkdocs.yml) into site/; strict: a broken link or a docstring
# MkDocs cannot read fails the build.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerates every file in benchmarks/results/ from the current code, each stamped with the
# commit and the machine (about an hour on 2 CPU cores). One file: run its script alone.
bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/overhead.py --compile
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/probe_profile.py
	$(PY) benchmarks/guards.py --rounds 3
	$(PY) benchmarks/per_example.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/report_size.py

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .ruff_cache
