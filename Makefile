# Two commands do everything on a fresh machine:
#   make run    - the main job: the whole chain, raw text to RLHF (creates .venv on first use)
#   make test   - the test suite, on CPU with 8 fake devices, one worker per core
# and `make lint` checks the code (ruff check, ruff format --check);
# `make guide` builds the reference manual, docs/_build/guide.pdf (pandoc + Typst, from PyPI).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The install: exactly the versions in constraints.txt, the ones the tests ran with.
INSTALL := $(VENV)/bin/pip install --quiet -c constraints.txt

.PHONY: run test lint guide clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e '.[test,hf,docs]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m experiments.pipeline --workdir=runs/pipeline

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
		$(VENV)/bin/python -m pytest -n 2

guide: $(STAMP)
	$(VENV)/bin/python -m docs.build

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info
