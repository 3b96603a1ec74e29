PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the second megatron-core matrix: the newest release, which needs Python >= 3.12
PYTHON_LATEST ?= python3.12
VENV_LATEST := .venv-mcore-latest
PY_LATEST := $(VENV_LATEST)/bin/python
# the tests that touch megatron-core: router, model, converter, training, export, self-check
MCORE_TESTS := tests/test_mor_math.py tests/mcore tests/convert tests/train tests/hf tests/test_selfcheck.py

.PHONY: setup test demo clean setup-latest test-latest

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

# megatron-core 0.19.x on Python 3.12. PyPI has no CPU build of torch for Linux: torch==2.13.0 comes as
# its CUDA build (about 4.7 GB with its libraries), which runs on a CPU.
$(VENV_LATEST)/.installed: setup.py ci/megatron-core-latest.txt
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q torch==2.13.0
	$(PY_LATEST) -m pip install -q -e ".[test,logging]" -c ci/megatron-core-latest.txt
	touch $@

setup-latest: $(VENV_LATEST)/.installed

test-latest: setup-latest
	$(PY_LATEST) -m pytest -q $(MCORE_TESTS)

clean:
	rm -rf $(VENV) $(VENV_LATEST) *.egg-info
