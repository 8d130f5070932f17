# `make train` and `make test` build .venv from the pinned requirements.txt on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test clean

$(STAMP): requirements.txt setup.cfg
	@echo "First use: installing the pinned requirements into $(VENV) (about 2 minutes, once)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny

test: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-test.txt
	# two workers, one test file each at a time: module fixtures run once, and the 2 cores
	# overlap one file's compiles with another's steps; the 15 slowest tests are listed last,
	# to keep the suite's 20-minute budget in view
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) runs
