PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a looser requirement elsewhere would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,logging]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m examples.quickstart.run --output runs/quickstart

clean:
	rm -rf $(VENV) *.egg-info
