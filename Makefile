# Every target creates .venv on first use and installs the pinned CPU torch, the
# package (editable) and its extras; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# lightly (a parity reference in tests) requires torchvision, which cannot sit beside this
	# torch: install it without dependencies; the tests load its loss modules one by one.
	$(PY) -m pip install -q --no-deps "lightly==1.6.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m embedloss train --output runs/demo --overwrite

lint: $(STAMP)
	$(PY) -m ruff check
	$(PY) -m ruff format --check
	$(PY) -m mypy

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --cov=embedloss --cov-report=term --cov-fail-under=90

bench: $(STAMP)
	$(PY) -m embedloss bench

clean:
	rm -rf $(VENV) .coverage build src/*.egg-info
